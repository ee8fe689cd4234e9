// The shared loop (pipelines/flow_loop.h), its steppers and the guidance pieces, checked against
// exact invariants and hand-computed combinations.
#include <catch2/catch.hpp>

#include "test_helpers.h"
#include "tiny_models.h"
#include "vdit/attention/processors.h"
#include "vdit/common.h"
#include "vdit/io/safetensors.h"
#include "vdit/pipelines/flow_loop.h"
#include "vdit/pipelines/guidance.h"
#include "vdit/samplers/stepper.h"

#include <cmath>
#include <limits>

using namespace vdit;
using vdit_test::bitwise_equal;
using vdit_test::fixture;

namespace {

// v(x, step) = a fixed tensor: a straight flow, on which Euler is exact.
struct ConstantVelocity : Denoiser {
  at::Tensor v;
  std::vector<StepInfo> seen;
  at::Tensor velocity(const at::Tensor&, const StepInfo& step) override {
    seen.push_back(step);
    return v;
  }
};

struct RecordingHook : StepHook {
  std::vector<std::pair<char, int>> calls;
  void before_step(const StepInfo& step, const at::Tensor&) override { calls.emplace_back('b', step.index); }
  void after_step(const StepInfo& step, at::Tensor&) override { calls.emplace_back('a', step.index); }
};

std::unique_ptr<FlowSampler> euler(int steps, double shift = 3.0) {
  auto sampler = make_sampler("euler");
  sampler->set_schedule(steps, shift);
  return sampler;
}

}  // namespace

TEST_CASE("run_flow takes every step of the stepper once, in order, with hooks around each", "[loop]") {
  SamplerStepper stepper(euler(5));
  ConstantVelocity denoiser;
  denoiser.v = at::randn({1, 4, 2, 3, 3});
  RecordingHook hook;
  const at::Tensor x0 = at::randn({1, 4, 2, 3, 3});
  run_flow(x0, stepper, denoiser, {&hook});
  REQUIRE(denoiser.seen.size() == 5);
  for (int i = 0; i < 5; ++i) {
    const StepInfo& s = denoiser.seen[static_cast<std::size_t>(i)];
    CHECK(s.index == i);
    CHECK(s.first == 0);
    CHECK(s.count == 5);
    CHECK(s.sigma == stepper.sampler().sigmas()[static_cast<std::size_t>(i)]);
    CHECK(s.sigma_next == stepper.sampler().sigmas()[static_cast<std::size_t>(i) + 1]);
    CHECK(s.timestep == static_cast<double>(stepper.sampler().timesteps()[static_cast<std::size_t>(i)]));
    CHECK(s.done() == i + 1);
    CHECK(s.total() == 5);
  }
  REQUIRE(hook.calls.size() == 10);
  for (int i = 0; i < 5; ++i) {
    CHECK(hook.calls[2 * static_cast<std::size_t>(i)] == std::make_pair('b', i));
    CHECK(hook.calls[2 * static_cast<std::size_t>(i) + 1] == std::make_pair('a', i));
  }
}

TEST_CASE("a run that starts part-way: the SDEdit start and the tail of the schedule", "[loop]") {
  auto sampler = euler(10);
  sampler->set_begin_index(img2img_begin_index(10, 0.3));  // 10 - int(3) = 7
  SamplerStepper stepper(std::move(sampler));
  REQUIRE(stepper.first_index() == 7);
  const at::Tensor noise = at::randn({1, 4, 1, 2, 2}), clean = at::randn({1, 4, 1, 2, 2});
  // The definition: (1 - s) clean + s noise at the first kept sigma, as add_noise computes it.
  const double s = stepper.sampler().sigmas()[7];
  CHECK(bitwise_equal(flow_start(stepper, noise, clean), add_noise(clean, noise, s)));
  CHECK(at::allclose(flow_start(stepper, noise, clean), (1 - s) * clean + s * noise, 1e-6, 1e-6));
  // No clean latent, or a run from the first step: pure noise.
  CHECK(bitwise_equal(flow_start(stepper, noise), noise));
  SamplerStepper whole(euler(10));
  CHECK(bitwise_equal(flow_start(whole, noise, clean), noise));
  // Only the kept steps run, and on a straight flow Euler lands on clean exactly where it aimed.
  ConstantVelocity denoiser;
  denoiser.v = noise - clean;
  const at::Tensor end = run_flow(flow_start(stepper, noise, clean), stepper, denoiser);
  CHECK(denoiser.seen.size() == 3);
  CHECK(denoiser.seen.front().first == 7);
  CHECK(denoiser.seen.front().total() == 3);
  CHECK(at::allclose(end, clean, 1e-5, 1e-5));
}

TEST_CASE("inversion walks the sampler's grid up, on a straight flow it undoes sampling", "[loop]") {
  auto sampler = euler(6);
  const std::vector<float> sigmas = sampler->sigmas();
  EulerInversionStepper inversion(*sampler);
  REQUIRE(inversion.count() == 6);
  const StepInfo first = inversion.info(0), last = inversion.info(5);
  CHECK(first.sigma == 0.0);
  CHECK(first.sigma_next == sigmas[5]);
  CHECK(first.timestep == 0.0);
  CHECK(last.sigma == sigmas[1]);
  CHECK(last.sigma_next == sigmas[0]);
  CHECK(last.timestep == static_cast<double>(sampler->timesteps()[1]));
  for (int k = 0; k < 6; ++k) CHECK(inversion.info(k).sigma_next > inversion.info(k).sigma);

  const at::Tensor clean = at::randn({1, 4, 1, 2, 2}), noise = at::randn({1, 4, 1, 2, 2});
  ConstantVelocity denoiser;
  denoiser.v = noise - clean;
  // Up from clean: x at sigma_0 = (1 - s0) clean + s0 noise; back down: clean again.
  const at::Tensor inverted = run_flow(clean, inversion, denoiser);
  CHECK(at::allclose(inverted, add_noise(clean, noise, sigmas[0]), 1e-5, 1e-5));
  SamplerStepper down(std::move(sampler));
  CHECK(at::allclose(run_flow(inverted, down, denoiser), clean, 1e-5, 1e-5));

  // Stopping at a begin index: inversion to the sigma a strength-0.5 run would start from.
  auto half = euler(6);
  half->set_begin_index(3);
  EulerInversionStepper partial(*half);
  CHECK(partial.count() == 3);
  CHECK(partial.info(2).sigma_next == half->sigmas()[3]);
}

TEST_CASE("a latent that turns non-finite stops the run naming the step", "[loop]") {
  SamplerStepper stepper(euler(4));
  struct NanAtStep2 : Denoiser {
    at::Tensor velocity(const at::Tensor& x, const StepInfo& step) override {
      return step.index == 2 ? at::full_like(x, std::numeric_limits<float>::quiet_NaN()) : at::zeros_like(x);
    }
  } denoiser;
  CHECK_THROWS_WITH(run_flow(at::zeros({1, 4, 1, 2, 2}), stepper, denoiser),
                    Catch::Contains("non-finite") && Catch::Contains("step 3 of 4"));
}

TEST_CASE("guidance names its passes and combines them by the formulas", "[loop]") {
  StepInfo step;
  Guidance none;
  CHECK(none.passes(step) == std::vector<RowRole>{RowRole::Cond});
  Guidance both;
  both.add(std::make_shared<ClassifierFreeGuidance>(4.0)).add(std::make_shared<Autoguidance>(2.5));
  CHECK(both.passes(step) == std::vector<RowRole>{RowRole::Cond, RowRole::Uncond, RowRole::Guide});
  const at::Tensor c = at::randn({1, 4, 1, 2, 2}), u = at::randn({1, 4, 1, 2, 2}), g = at::randn({1, 4, 1, 2, 2});
  const PassOutputs out{{RowRole::Cond, c}, {RowRole::Uncond, u}, {RowRole::Guide, g}};
  CHECK(bitwise_equal(none.combine(out, step), c));
  CHECK(at::allclose(both.combine(out, step), u + 4.0 * (c - u) + 1.5 * (c - g), 1e-6, 1e-6));
  // A term whose pass did not run is a pipeline bug, said plainly.
  CHECK_THROWS_AS(both.combine({{RowRole::Cond, c}}, step), RuntimeError);
}

namespace {

struct RowRecorder : AttentionProcessor {
  std::vector<std::vector<RowRole>> rows;
  std::vector<int> steps;
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override {
    if (site.layer == 0 && site.kind == AttentionKind::Self) {
      rows.push_back(site.rows ? *site.rows : std::vector<RowRole>{});
      steps.push_back(site.step ? site.step->index : -1);
    }
    return inner(site, q, k, v, call);
  }
};

}  // namespace

TEST_CASE("the DiT denoiser batches the main model's passes, labels rows by role, and equals CFG by hand", "[loop]") {
  c10::InferenceMode guard;
  WanDiT dit = vdit_test::load_tiny_dit();
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  const WanTextCondition cond = dit->encode_text(file->tensor("context_positive"));
  const WanTextCondition uncond = dit->encode_text(file->tensor("context_negative"));
  const at::Tensor x = file->tensor("noise").unsqueeze(0).narrow(2, 0, 2);
  StepInfo step;
  step.index = 3;
  step.sigma = 0.7;
  step.timestep = 700;
  const auto denoiser_for = [&](bool batch, const AttentionProcessors* processors) {
    Guidance guidance;
    guidance.add(std::make_shared<ClassifierFreeGuidance>(5.0));
    DiTDenoiser::Options options;
    options.batch_passes = batch;
    options.processors = processors;
    DiTDenoiser d(*dit, guidance, options);
    d.set_condition(RowRole::Cond, cond);
    d.set_condition(RowRole::Uncond, uncond);
    return d;
  };
  auto recorder = std::make_shared<RowRecorder>();
  AttentionProcessors processors;
  processors.set(recorder);
  DiTDenoiser batched = denoiser_for(true, &processors);
  const at::Tensor v_batched = batched.velocity(x, step);
  REQUIRE(recorder->rows.size() == 1);
  CHECK(recorder->rows[0] == std::vector<RowRole>{RowRole::Cond, RowRole::Uncond});
  CHECK(recorder->steps[0] == 3);
  DiTDenoiser separate = denoiser_for(false, &processors);
  const at::Tensor v_separate = separate.velocity(x, step);
  REQUIRE(recorder->rows.size() == 3);
  CHECK(recorder->rows[1] == std::vector<RowRole>{RowRole::Cond});
  CHECK(recorder->rows[2] == std::vector<RowRole>{RowRole::Uncond});
  // By hand: two plain forwards and the CFG formula (f32; batch rows and single rows agree to 1e-5).
  const at::Tensor t = at::full({1}, 700.0);
  const at::Tensor oc = dit->forward(x, t, cond), ou = dit->forward(x, t, uncond);
  const at::Tensor by_hand = ou + 5.0 * (oc - ou);
  CHECK(bitwise_equal(v_separate, by_hand));
  CHECK(at::allclose(v_batched, by_hand, 1e-5, 1e-5));
  CHECK(bitwise_equal(batched.last_outputs().at(RowRole::Cond).squeeze(0), batched.last_outputs().at(RowRole::Cond)[0]));
}
