// Long video by sliding-window denoising (pipelines/temporal_windows.h): window plans, fusion
// weights and the FreeNoise reschedule as properties; the window denoiser against plain
// denoising and against a hand-fused CFG computation on the wan-tiny DiT.
#include <catch2/catch.hpp>

#include "test_helpers.h"
#include "tiny_models.h"
#include "vdit/common.h"
#include "vdit/io/checkpoint.h"
#include "vdit/io/safetensors.h"
#include "vdit/models/wan_dit.h"
#include "vdit/models/wan_vae.h"
#include "vdit/pipelines/flow_loop.h"
#include "vdit/pipelines/guidance.h"
#include "vdit/pipelines/temporal_windows.h"
#include "vdit/samplers/stepper.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <set>

using namespace vdit;
using vdit_test::bitwise_equal;

namespace {

using vdit_test::fixture;

TemporalWindowOptions opts(std::int64_t L, std::int64_t O, WindowSchedule s = WindowSchedule::Static,
                           WindowFuse f = WindowFuse::Linear, WindowAnchor a = WindowAnchor::None) {
  TemporalWindowOptions o;
  o.context = L;
  o.overlap = O;
  o.schedule = s;
  o.fuse = f;
  o.anchor = a;
  return o;
}

// v = a fixed function of each frame alone (no temporal mixing, no position).
struct FramewiseDenoiser : Denoiser {
  std::int64_t calls = 0;
  at::Tensor velocity(const at::Tensor& x, const StepInfo& step) override {
    ++calls;
    return at::sin(x) * 2.0 + step.sigma;
  }
};

struct ConstantDenoiser : Denoiser {
  double value = 0;
  std::vector<std::int64_t> frames_seen;
  at::Tensor velocity(const at::Tensor& x, const StepInfo&) override {
    frames_seen.push_back(x.size(2));
    return at::full(x.sizes(), value, x.options());
  }
};

}  // namespace

TEST_CASE("window plans match the reference lists and cover every frame under every schedule", "[long]") {
  // ComfyUI's static_standard for F' = 41, L = 21, O = 4: starts 0, 17, and the last moved back to 20.
  const auto plan = plan_windows(41, opts(21, 4), 0);
  REQUIRE(plan.size() == 3);
  CHECK((plan[0] == TemporalWindow{0, 21}));
  CHECK((plan[1] == TemporalWindow{17, 21}));
  CHECK((plan[2] == TemporalWindow{20, 21}));
  for (int step = 0; step < 4; ++step) CHECK(plan_windows(41, opts(21, 4), step) == plan);
  // Shifted: step 0 is static; later steps move the interior starts by floor(h(step) * S).
  CHECK(plan_windows(41, opts(21, 4, WindowSchedule::Shifted), 0) == plan);
  const auto s1 = plan_windows(41, opts(21, 4, WindowSchedule::Shifted), 1);  // h = 1/2, d = 8
  REQUIRE(s1.size() == 3);
  CHECK((s1[0] == TemporalWindow{0, 21}));
  CHECK((s1[1] == TemporalWindow{8, 21}));
  CHECK((s1[2] == TemporalWindow{20, 21}));
  CHECK(van_der_corput(0) == 0.0);
  CHECK(van_der_corput(1) == 0.5);
  CHECK(van_der_corput(2) == 0.25);
  CHECK(van_der_corput(3) == 0.75);
  // A window at least as long as the video: one window, every weight 1.
  CHECK((plan_windows(9, opts(21, 4), 0) == std::vector<TemporalWindow>{{0, 9}}));
  CHECK((window_weights({0, 9}, 9, opts(21, 4, WindowSchedule::Static, WindowFuse::Pyramid)) == std::vector<double>(9, 1.0)));

  // The property over lengths, contexts, overlaps, steps, schedules and fusions.
  for (std::int64_t F = 1; F <= 48; ++F)
    for (std::int64_t L = 1; L <= 13; ++L)
      for (std::int64_t O = 0; O < L; ++O)
        for (auto sched : {WindowSchedule::Static, WindowSchedule::Shifted})
          for (int step = 0; step < 6; ++step) {
            const auto windows = plan_windows(F, opts(L, O, sched), step);
            REQUIRE(!windows.empty());
            std::vector<int> covered(static_cast<std::size_t>(F), 0);
            for (std::size_t k = 0; k < windows.size(); ++k) {
              const TemporalWindow& w = windows[k];
              REQUIRE(w.start >= 0);
              REQUIRE(w.end() <= F);
              REQUIRE(w.length == std::min(L, F));
              if (k > 0) {
                REQUIRE(w.start > windows[k - 1].start);
                REQUIRE(windows[k - 1].end() - w.start >= O);  // consecutive windows overlap by >= O
              }
              for (std::int64_t f = w.start; f < w.end(); ++f) ++covered[static_cast<std::size_t>(f)];
            }
            for (std::int64_t f = 0; f < F; ++f) REQUIRE(covered[static_cast<std::size_t>(f)] >= 1);
            for (auto fuse : {WindowFuse::Flat, WindowFuse::Linear, WindowFuse::Pyramid}) {
              std::vector<double> total(static_cast<std::size_t>(F), 0.0);
              for (const auto& w : windows) {
                const auto weights = window_weights(w, F, opts(L, O, sched, fuse));
                REQUIRE(static_cast<std::int64_t>(weights.size()) == w.length);
                for (std::int64_t i = 0; i < w.length; ++i) {
                  REQUIRE(weights[static_cast<std::size_t>(i)] > 0.0);
                  REQUIRE(weights[static_cast<std::size_t>(i)] <= 1.0);
                  total[static_cast<std::size_t>(w.start + i)] += weights[static_cast<std::size_t>(i)];
                }
              }
              for (double t : total) REQUIRE(t > 0.0);
            }
          }
}

TEST_CASE("linear ramps of consecutive static windows sum to exactly 1 on every latent frame", "[long]") {
  // (With O > L / 2 a frame lies in three windows and the sum is above 1; the fusion normalises.)
  for (std::int64_t L = 2; L <= 21; ++L)
    for (std::int64_t O = 0; 2 * O <= L; ++O)
      for (std::int64_t k = 1; k <= 4; ++k) {
        const std::int64_t F = L + k * (L - O);  // static windows end exactly at F: every overlap is O
        const auto windows = plan_windows(F, opts(L, O), 0);
        REQUIRE(static_cast<std::int64_t>(windows.size()) == k + 1);
        std::vector<double> total(static_cast<std::size_t>(F), 0.0);
        for (const auto& w : windows) {
          const auto weights = window_weights(w, F, opts(L, O));
          for (std::int64_t i = 0; i < w.length; ++i) total[static_cast<std::size_t>(w.start + i)] += weights[static_cast<std::size_t>(i)];
        }
        for (double t : total) REQUIRE(t == 1.0);
      }
  // Pyramid: triangular with peak 1, flattened to 1 on the O frames at the video's ends.
  CHECK((window_weights({0, 4}, 10, opts(4, 0, WindowSchedule::Static, WindowFuse::Pyramid)) ==
         std::vector<double>{0.5, 1.0, 1.0, 0.5}));
  CHECK((window_weights({3, 5}, 10, opts(5, 0, WindowSchedule::Static, WindowFuse::Pyramid)) ==
         std::vector<double>{1.0 / 3, 2.0 / 3, 1.0, 2.0 / 3, 1.0 / 3}));
  CHECK((window_weights({0, 5}, 10, opts(5, 2, WindowSchedule::Static, WindowFuse::Pyramid)) ==
         std::vector<double>{1.0, 1.0, 1.0, 2.0 / 3, 1.0 / 3}));
  CHECK((window_weights({2, 4}, 6, opts(4, 1, WindowSchedule::Static, WindowFuse::Linear)) ==
         std::vector<double>{0.5, 1.0, 1.0, 1.0}));
}

TEST_CASE("the FreeNoise reschedule is a seeded permutation within each block", "[long]") {
  const std::int64_t L = 5, O = 2, S = L - O, F = 17;
  const at::Tensor noise = at::randn({16, F, 2, 3});
  const at::Tensor out = reschedule_noise(noise, L, O, 7);
  CHECK(bitwise_equal(out, reschedule_noise(noise, L, O, 7)));
  CHECK(!bitwise_equal(out, reschedule_noise(noise, L, O, 8)));
  CHECK(bitwise_equal(out.narrow(1, 0, L), noise.narrow(1, 0, L)));
  for (std::int64_t i = L; i < F; i += S) {
    const std::int64_t n = std::min(S, F - i);
    std::set<std::int64_t> used;
    for (std::int64_t j = 0; j < n; ++j) {
      int matches = 0;
      for (std::int64_t s = 0; s < S; ++s)
        if (bitwise_equal(out.select(1, i + j), out.select(1, i - L + s))) {
          ++matches;
          used.insert(s);
        }
      REQUIRE(matches == 1);  // each frame of the block is one frame of its source block
    }
    REQUIRE(static_cast<std::int64_t>(used.size()) == n);  // and no source frame twice
  }
  // Batched [B, C, F, H, W] works on the same axis; short clips are unchanged.
  CHECK(bitwise_equal(reschedule_noise(noise.unsqueeze(0), L, O, 7).squeeze(0), out));
  CHECK(bitwise_equal(reschedule_noise(noise.narrow(1, 0, L), L, O, 7), noise.narrow(1, 0, L)));
}

TEST_CASE("with a window covering every frame the window denoiser equals plain generation bitwise", "[long]") {
  c10::InferenceMode guard;
  WanDiT dit = vdit_test::load_tiny_dit();
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  const WanTextCondition cond = dit->encode_text(file->tensor("context_positive"));
  const WanTextCondition uncond = dit->encode_text(file->tensor("context_negative"));
  const at::Tensor noise = file->tensor("noise").unsqueeze(0);
  Guidance guidance;
  guidance.add(std::make_shared<ClassifierFreeGuidance>(5.0));
  DiTDenoiser inner(*dit, guidance, {});
  inner.set_condition(RowRole::Cond, cond);
  inner.set_condition(RowRole::Uncond, uncond);
  const auto run = [&](Denoiser& d) {
    auto sampler = make_sampler("unipc");
    sampler->set_schedule(4, 3.0);
    SamplerStepper stepper(std::move(sampler));
    return run_flow(noise, stepper, d);
  };
  const at::Tensor plain = run(inner);
  for (auto sched : {WindowSchedule::Static, WindowSchedule::Shifted})
    for (auto fuse : {WindowFuse::Flat, WindowFuse::Linear, WindowFuse::Pyramid}) {
      TemporalWindowDenoiser windows(inner, opts(noise.size(2) + 3, 2, sched, fuse, WindowAnchor::First));
      CHECK(bitwise_equal(run(windows), plain));
      CHECK(windows.window_calls() == 4);
    }
}

TEST_CASE("windows fuse frame-wise models exactly, pick each window's prompt segment, and drop the anchor", "[long]") {
  const at::Tensor x = at::randn({1, 4, 23, 2, 2});
  StepInfo step;
  step.sigma = 0.3;
  FramewiseDenoiser framewise;
  const at::Tensor plain = framewise.velocity(x, step);
  for (std::int64_t L : {1, 4, 7, 22})
    for (std::int64_t O = 0; O < L; O += 2)
      for (auto sched : {WindowSchedule::Static, WindowSchedule::Shifted})
        for (auto fuse : {WindowFuse::Flat, WindowFuse::Linear, WindowFuse::Pyramid})
          for (auto anchor : {WindowAnchor::None, WindowAnchor::First})
            for (int index : {0, 3}) {
              step.index = index;
              TemporalWindowDenoiser windows(framewise, opts(L, O, sched, fuse, anchor));
              REQUIRE(at::allclose(windows.velocity(x, step), plain, 1e-6, 1e-6));
            }
  // A constant model gives that constant; the anchor adds frame 0 to the windows without it.
  ConstantDenoiser a, b;
  a.value = -1.5;
  b.value = 4.0;
  TemporalWindowDenoiser two({&a, &b}, opts(7, 2, WindowSchedule::Static, WindowFuse::Pyramid, WindowAnchor::First));
  const at::Tensor v = two.velocity(x, step);
  // Windows of 23 frames, L 7, S 5: [0,7) [5,12) [10,17) [15,22) [16,23); halves at 11.5 frames.
  REQUIRE(two.last_windows().size() == 5);
  CHECK((a.frames_seen == std::vector<std::int64_t>{7, 8}));
  CHECK((b.frames_seen == std::vector<std::int64_t>{8, 8, 8}));
  CHECK((window_segment({5, 7}, 23, 2) == 0));
  CHECK((window_segment({10, 7}, 23, 2) == 1));
  CHECK(bitwise_equal(v.narrow(2, 0, 5), at::full({1, 4, 5, 2, 2}, -1.5)));
  CHECK(bitwise_equal(v.narrow(2, 17, 6), at::full({1, 4, 6, 2, 2}, 4.0)));
}

TEST_CASE("the window denoiser composes with CFG on the wan-tiny DiT as a hand-fused computation", "[long]") {
  c10::InferenceMode guard;
  WanDiT dit = vdit_test::load_tiny_dit();
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  const WanTextCondition cond = dit->encode_text(file->tensor("context_positive"));
  const WanTextCondition uncond = dit->encode_text(file->tensor("context_negative"));
  const at::Tensor base = file->tensor("noise").unsqueeze(0);
  torch::manual_seed(3);
  const at::Tensor x = at::randn({1, base.size(1), 5, base.size(3), base.size(4)});
  StepInfo step;
  step.index = 1;
  step.sigma = 0.7;
  step.timestep = 700;
  Guidance guidance;
  guidance.add(std::make_shared<ClassifierFreeGuidance>(5.0));
  DiTDenoiser inner(*dit, guidance, {});
  inner.set_condition(RowRole::Cond, cond);
  inner.set_condition(RowRole::Uncond, uncond);
  TemporalWindowDenoiser windows(inner, opts(3, 1));
  const at::Tensor v = windows.velocity(x, step);
  // By hand: windows [0,3) and [2,5); linear weights with O = 1: 1/2 each on frame 2.
  REQUIRE((windows.last_windows() == std::vector<TemporalWindow>{{0, 3}, {2, 3}}));
  const at::Tensor t = at::full({1}, 700.0);
  const auto cfg = [&](const at::Tensor& xw) {
    const at::Tensor oc = dit->forward(xw, t, cond), ou = dit->forward(xw, t, uncond);
    return ou + 5.0 * (oc - ou);
  };
  const at::Tensor v0 = cfg(x.narrow(2, 0, 3).contiguous()), v1 = cfg(x.narrow(2, 2, 3).contiguous());
  const at::Tensor by_hand = at::cat({v0.narrow(2, 0, 2), 0.5 * v0.narrow(2, 2, 1) + 0.5 * v1.narrow(2, 0, 1), v1.narrow(2, 1, 2)}, 2);
  CHECK(at::allclose(v, by_hand, 1e-5, 1e-5));
  // The windows are not the whole clip: the windowed velocity differs from the plain one.
  CHECK(!at::allclose(v, cfg(x), 1e-4, 1e-4));
}

TEST_CASE("long decode: the chunked causal decode equals the whole-clip decode on the wan-tiny VAE", "[long]") {
  c10::InferenceMode guard;
  const std::string dir = fixture("wan-tiny/vae/");
  nlohmann::json manifest;
  {
    std::ifstream in(dir + "manifest.json");
    manifest = nlohmann::json::parse(in);
  }
  WanVAE vae(WanVAEConfig::from_json(manifest["config"]));
  load_wan_vae_weights(vae, *WeightFile::open(dir + "weights.safetensors"), at::kFloat);
  vae->eval();
  torch::manual_seed(5);
  const at::Tensor z = at::randn({1, vae->config().z_dim, 7, 4, 4});
  const at::Tensor whole = vae->decode(z);
  for (std::int64_t chunk : {1, 2, 3, 7, 10}) {
    std::vector<at::Tensor> parts;
    std::vector<std::int64_t> lengths;
    vae->decode_stream(z, chunk, [&](const at::Tensor& frames) {
      parts.push_back(frames.clone());
      lengths.push_back(frames.size(2));
    });
    const at::Tensor streamed = at::cat(parts, 2);
    REQUIRE(streamed.sizes() == whole.sizes());
    CHECK(at::allclose(streamed, whole, 1e-5, 1e-5));
    // Chunk k holds latent frames [k c, (k+1) c): 1 + 4 (c - 1) pixel frames first, 4 c after.
    const std::int64_t ts = vae->config().temporal_stride();
    CHECK((lengths.front() == 1 + ts * (std::min<std::int64_t>(chunk, 7) - 1)));
  }
  CHECK_THROWS_AS(vae->decode_stream(z, 0, [](const at::Tensor&) {}), InputError);
}
