// The FreeSwim dual-path denoiser (pipelines/freeswim.h) on the wan-tiny DiT, against a reference
// built in the test from plain (materialised, float64) attention calls.
#include <catch2/catch.hpp>

#include "test_helpers.h"
#include "tiny_models.h"
#include "vdit/attention/processors.h"
#include "vdit/common.h"
#include "vdit/pipelines/flow_loop.h"
#include "vdit/pipelines/freeswim.h"
#include "vdit/pipelines/guidance.h"
#include "vdit/pipelines/wan_t2v.h"
#include "vdit/io/safetensors.h"
#include "vdit/samplers/stepper.h"

#include <map>

using namespace vdit;
using vdit_test::bitwise_equal;

namespace {

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// The reference's attention: every call as softmax(q kᵀ s + mask) v in float64 with the explicit
// inward-clamped mask of the call's window. In Record mode the cross-attention outputs are kept
// per layer; in Override mode the kept output of the layer replaces the cross-attention.
struct ReferenceAttention : AttentionProcessor {
  enum class Mode { Plain, Record, Override };
  Mode mode = Mode::Plain;
  std::map<int, at::Tensor> recorded;
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn&) override {
    if (site.kind == AttentionKind::Cross && mode == Mode::Override) return recorded.at(site.layer).clone();
    at::Tensor out =
        attention_materialized(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), call).to(q.scalar_type());
    if (site.kind == AttentionKind::Cross && mode == Mode::Record) recorded[site.layer] = out.clone();
    return out;
  }
};

// Counts self-attention calls by whether they are windowed, with the rows they ran.
struct CountingProcessor : AttentionProcessor {
  int full_self = 0, windowed_self = 0, cross = 0;
  std::vector<std::vector<RowRole>> full_rows;
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override {
    if (site.kind == AttentionKind::Cross) {
      ++cross;
    } else if (call.window) {
      ++windowed_self;
    } else {
      ++full_self;
      full_rows.push_back(site.rows ? *site.rows : std::vector<RowRole>{});
    }
    return inner(site, q, k, v, call);
  }
};

struct Setup {
  WanDiT dit = vdit_test::load_tiny_dit();
  at::Tensor x, context, context_null;
  WanTextCondition cond, uncond;
  Setup() {
    torch::NoGradGuard no_grad;
    at::manual_seed(5);
    // A 2 x 6 x 8 token grid (latent 2 x 12 x 16): larger than the 3 x 3 windows on both axes.
    x = at::randn({1, dit->config.in_dim, 2, 12, 16});
    context = at::randn({1, 7, dit->config.text_dim});
    context_null = at::randn({1, 4, dit->config.text_dim});
    cond = dit->encode_text(context);
    uncond = dit->encode_text(context_null);
  }
};

Guidance cfg(double scale) {
  Guidance g;
  g.add(std::make_shared<ClassifierFreeGuidance>(scale));
  return g;
}

HiresOptions hires_options(HiresMethod method, int every) {
  HiresOptions h;
  h.method = method;
  h.window.size = {0, 3, 3};
  h.attn_scale_factor = kFreeSwimScaleFactor;
  h.cross_cache_every = every;
  return h;
}

StepInfo step_at(int index, int first = 0) {
  StepInfo s;
  s.index = index;
  s.first = first;
  s.count = 10;
  s.sigma = 0.6;
  s.sigma_next = 0.5;
  s.timestep = 600;
  return s;
}

std::unique_ptr<FlowSampler> euler(int steps) {
  auto sampler = make_sampler("euler");
  sampler->set_schedule(steps, 3.0);
  return sampler;
}

}  // namespace

TEST_CASE("FreeSwim dual path equals the reference built from plain attention calls", "[freeswim]") {
  Setup s;
  torch::NoGradGuard no_grad;
  const double guidance = 5.0;
  const StepInfo step = step_at(3);
  const at::Tensor t = at::full({1}, step.timestep);
  auto reference = std::make_shared<ReferenceAttention>();
  AttentionProcessors ref_set;
  ref_set.set(reference);
  DiTCall full_call;
  full_call.processors = &ref_set;
  full_call.self_attn_scale_factor = kFreeSwimScaleFactor;
  DiTCall window_call = full_call;
  window_call.self_attn_window = Window3{{0, 3, 3}, {1, 1, 1}};
  // One pass of the reference's batch of two: the full branch (b1) records its cross-attention
  // outputs, the window branch (b0) runs with them in place of its own.
  const auto dual = [&](const WanTextCondition& c) {
    reference->mode = ReferenceAttention::Mode::Record;
    reference->recorded.clear();
    (void)s.dit->forward(s.x, t, c, full_call);
    reference->mode = ReferenceAttention::Mode::Override;
    const at::Tensor out = s.dit->forward(s.x, t, c, window_call);
    reference->mode = ReferenceAttention::Mode::Plain;
    return out;
  };
  const at::Tensor cond_dual = dual(s.cond);
  const at::Tensor uncond_dual = dual(s.uncond);
  const at::Tensor uncond_window = s.dit->forward(s.x, t, s.uncond, window_call);  // own cross-attention
  const at::Tensor cond_window = s.dit->forward(s.x, t, s.cond, window_call);
  // CFG on both rows; the window branch's output is the velocity of the kept latent.
  const at::Tensor expected_cache_mode = uncond_window + guidance * (cond_dual - uncond_window);
  const at::Tensor expected_nocache_mode = uncond_dual + guidance * (cond_dual - uncond_dual);
  const at::Tensor expected_window = uncond_window + guidance * (cond_window - uncond_window);

  for (const bool override_uncond : {false, true}) {
    for (const int every : {0, 2}) {
      INFO("override_uncond " << override_uncond << ", cross_cache_every " << every);
      HiresOptions h = hires_options(HiresMethod::FreeSwim, every);
      h.override_uncond = override_uncond;
      FreeSwimDenoiser denoiser(*s.dit, cfg(guidance), DiTDenoiser::Options{}, h);
      denoiser.set_condition(RowRole::Cond, s.cond);
      denoiser.set_condition(RowRole::Uncond, s.uncond);
      const at::Tensor v = denoiser.velocity(s.x, step_at(0));
      // Each pass against the reference's (f32 against float64 attention: 1e-5), and the guided
      // velocity, whose error CFG multiplies by up to 1 + 2 x 5.
      const PassOutputs& passes = denoiser.window_path().last_outputs();
      const double cond_err = max_abs_diff(passes.at(RowRole::Cond), cond_dual);
      const double uncond_err = max_abs_diff(passes.at(RowRole::Uncond), override_uncond ? uncond_dual : uncond_window);
      const at::Tensor& expected = override_uncond ? expected_nocache_mode : expected_cache_mode;
      const double err = max_abs_diff(v, expected);
      std::printf("[freeswim] dual path vs reference (override_uncond %d, every %d): cond %.3g, uncond %.3g, guided %.3g\n",
                  override_uncond ? 1 : 0, every, cond_err, uncond_err, err);
      CHECK(cond_err < 1e-5);
      CHECK(uncond_err < 1e-5);
      CHECK(err < 1.1e-4);
    }
  }
  // The override matters, and the window ablation is the window path alone.
  CHECK(max_abs_diff(expected_cache_mode, expected_window) > 1e-3);
  FreeSwimDenoiser window_only(*s.dit, cfg(guidance), DiTDenoiser::Options{}, hires_options(HiresMethod::Window, 2));
  window_only.set_condition(RowRole::Cond, s.cond);
  window_only.set_condition(RowRole::Uncond, s.uncond);
  CHECK(max_abs_diff(window_only.velocity(s.x, step), expected_window) < 1.1e-4);
  CHECK(max_abs_diff(window_only.window_path().last_outputs().at(RowRole::Cond), cond_window) < 1e-5);
  CHECK(window_only.full_path_forwards() == 0);
}

TEST_CASE("FreeSwim cache: every 1 equals no cache bitwise, every 2 runs the full path on refresh steps only", "[freeswim]") {
  Setup s;
  torch::NoGradGuard no_grad;
  const int steps = 5;
  const at::Tensor noise = at::randn(s.x.sizes());
  struct Run {
    at::Tensor x;
    std::int64_t full_forwards;
    std::shared_ptr<CountingProcessor> counts;
    std::int64_t peak_cache;
  };
  const auto run = [&](int every, bool on_cpu) {
    auto counts = std::make_shared<CountingProcessor>();
    AttentionProcessors observed;
    observed.set(counts);
    DiTDenoiser::Options options;
    options.processors = &observed;
    HiresOptions h = hires_options(HiresMethod::FreeSwim, every);
    h.cache_on_cpu = on_cpu;
    FreeSwimDenoiser denoiser(*s.dit, cfg(4.0), options, h);
    denoiser.set_condition(RowRole::Cond, s.cond);
    denoiser.set_condition(RowRole::Uncond, s.uncond);
    SamplerStepper stepper(euler(steps));
    const at::Tensor x = run_flow(flow_start(stepper, noise), stepper, denoiser);
    return Run{x, denoiser.full_path_forwards(), counts, denoiser.peak_cache_bytes()};
  };
  const Run none = run(0, false), every1 = run(1, true), every2 = run(2, false);
  const int layers = static_cast<int>(s.dit->config.num_layers);
  CHECK(bitwise_equal(every1.x, none.x));
  CHECK(none.full_forwards == steps);
  CHECK(every1.full_forwards == steps);
  // Steps 0, 2, 4 refresh: 3 full-path forwards, each one row of the prompt.
  CHECK(every2.full_forwards == 3);
  CHECK(every2.counts->full_self == 3 * layers);
  for (const auto& rows : every2.counts->full_rows) CHECK(rows == std::vector<RowRole>{RowRole::Cond});
  // The window path runs cond and uncond on every step.
  CHECK(every2.counts->windowed_self == 2 * steps * layers);
  // Cross-attention computed: the full path's, and the uncond window path's; the cond window path
  // reuses the recorded outputs and computes none.
  CHECK(every2.counts->cross == (3 + steps) * layers);
  CHECK_FALSE(bitwise_equal(every2.x, none.x));
  CHECK(max_abs_diff(every2.x, none.x) < 0.5);  // stale outputs, same flow
  // The cache holds one [1, heads, N, head_dim] f32 output per layer.
  const std::int64_t tokens = 2 * 6 * 8;
  CHECK(every2.peak_cache == layers * tokens * s.dit->config.dim * 4);
}

TEST_CASE("FreeSwim with a window covering the grid is plain attention", "[freeswim]") {
  Setup s;
  torch::NoGradGuard no_grad;
  const StepInfo step = step_at(1);
  const auto velocity = [&](HiresMethod method, std::array<std::int64_t, 3> window) {
    HiresOptions h = hires_options(method, 2);
    h.window.size = window;
    DiTDenoiser::Options options;
    options.batch_passes = false;  // as FreeSwim runs them: one forward per pass
    FreeSwimDenoiser denoiser(*s.dit, cfg(3.0), options, h);
    denoiser.set_condition(RowRole::Cond, s.cond);
    denoiser.set_condition(RowRole::Uncond, s.uncond);
    return denoiser.velocity(s.x, step);
  };
  const at::Tensor direct = velocity(HiresMethod::Direct, {0, 3, 3});
  CHECK(bitwise_equal(velocity(HiresMethod::Window, {0, 6, 8}), direct));
  CHECK(bitwise_equal(velocity(HiresMethod::Window, {0, 50, 50}), direct));
  // Window path = full path: the override puts back the same cross-attention.
  CHECK(bitwise_equal(velocity(HiresMethod::FreeSwim, {0, 50, 50}), direct));
  CHECK(max_abs_diff(velocity(HiresMethod::Window, {0, 3, 3}), direct) > 1e-4);
  CHECK(window_clamp_notes(Window3{{0, 50, 3}, {1, 1, 1}}, Grid3{2, 6, 8}).size() == 1);
  CHECK(window_clamp_notes(Window3{{0, 3, 3}, {1, 1, 1}}, Grid3{2, 6, 8}).empty());
}

TEST_CASE("FreeSwim window from the base size, method names", "[freeswim]") {
  // Wan2.1 1.3B at 480x832, 16 px per token: 30 x 52 tokens, window 31 x 53.
  const Window3 w = freeswim_window(832, 480, 16, 16);
  CHECK(w.size == std::array<std::int64_t, 3>{0, 31, 53});
  CHECK(freeswim_window(1280, 720, 16, 16).size == std::array<std::int64_t, 3>{0, 45, 81});
  CHECK(freeswim_window(64, 64, 8, 8).size == std::array<std::int64_t, 3>{0, 9, 9});
  CHECK(parse_hires_method("window") == HiresMethod::Window);
  CHECK(std::string(hires_method_name(HiresMethod::FreeSwim)) == "freeswim");
  CHECK_THROWS_AS(parse_hires_method("bilinear"), InputError);
}

TEST_CASE("hi-res pipeline runs: strength 1 starts from pure noise, below 1 from the input", "[freeswim][pipeline]") {
  using vdit_test::fixture;
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  WanModelFiles files;
  files.dit = {fixture("wan-tiny/dit/weights.safetensors")};
  files.dit_config = fixture("wan-tiny/e2e/dit_config.json");
  files.vae = fixture("wan-tiny/vae/weights.safetensors");
  WanT2VPipeline pipeline(files, WanT2VOptions{});
  T2VSettings settings;
  settings.width = 48;
  settings.height = 32;
  settings.frames = 9;
  settings.steps = 4;
  settings.sampler = "euler";
  settings.guidance = 5.0;
  settings.hires = hires_options(HiresMethod::FreeSwim, 2);
  const at::Tensor noise = file->tensor("noise");
  const at::Tensor pos = file->tensor("context_positive"), neg = file->tensor("context_negative");
  const at::Tensor clean = 0.5 * at::tanh(noise.flip({1}));
  settings.strength = 1.0;
  const at::Tensor from_noise = pipeline.denoise(noise, pos, neg, settings);
  CHECK(bitwise_equal(pipeline.denoise(noise, pos, neg, settings, {}, clean), from_noise));
  settings.strength = 0.5;
  const at::Tensor from_clean = pipeline.denoise(noise, pos, neg, settings, {}, clean);
  CHECK(max_abs_diff(from_clean, from_noise) > 1e-2);
  // The dual path is what ran: the plain guided DiT gives another latent.
  T2VSettings plain = settings;
  plain.hires.reset();
  CHECK(max_abs_diff(pipeline.denoise(noise, pos, neg, plain, {}, clean), from_clean) > 1e-4);
  // PAG combines with the dual path: its perturbed pass reads the cond pass's full-path
  // cross-attention, so with u = 0 (no perturbation) it equals the cond pass and the run equals the
  // run without PAG bitwise; with u = 1 the run changes.
  T2VSettings pag = settings;
  pag.pag_scale = 3.0;
  pag.pag_layers = {0};
  pag.soft_pag = 0.0;
  pipeline.validate(pag);
  CHECK(bitwise_equal(pipeline.denoise(noise, pos, neg, pag, {}, clean), from_clean));
  pag.soft_pag = 1.0;
  CHECK(max_abs_diff(pipeline.denoise(noise, pos, neg, pag, {}, clean), from_clean) > 1e-5);
}

TEST_CASE("windowed attention under InferenceMode on worker threads equals it outside", "[freeswim][attention]") {
  // The windowed kernel writes boxes of the caller's output from pool workers: the caller's
  // InferenceMode must hold there (an upscale run on more than one thread once failed here).
  at::manual_seed(2);
  const at::Tensor q = at::randn({1, 2, 3 * 12 * 16, 32}), k = at::randn({1, 2, 3 * 12 * 16, 32}),
                   v = at::randn({1, 2, 3 * 12 * 16, 32});
  AttentionCall call;
  call.grid = Grid3{3, 12, 16};
  call.window = Window3{{0, 5, 5}, {1, 1, 1}};
  const at::Tensor outside = attention(q, k, v, call);
  at::Tensor inside;
  {
    c10::InferenceMode guard;
    inside = attention(q, k, v, call);
  }
  CHECK(bitwise_equal(inside, outside));
}
