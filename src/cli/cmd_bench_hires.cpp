// `vdit bench hires`: the cost of one hi-res denoising step on a random-weights DiT of Wan2.1
// 1.3B's widths (dim 1536, 12 heads, ffn 8960; fewer layers), measured in one run: FreeSwim with
// and without the cross-attention cache, the window path alone, and plain full attention
// (direct), with the share of each step spent in attention, peak RSS per method and the cache's
// bytes. One JSON line on stdout.
#include "commands.h"

#include "vdit/common.h"
#include "vdit/models/wan_dit.h"
#include "vdit/pipelines/flow_loop.h"
#include "vdit/pipelines/freeswim.h"
#include "vdit/progress.h"
#include "vdit/samplers/stepper.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <sstream>

namespace vdit::cli {

namespace {

using Clock = std::chrono::steady_clock;

// Times every attention call it sees (the inner kernel), so a step's attention share is known.
class AttentionTimer : public AttentionProcessor {
 public:
  double seconds = 0;
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override {
    const auto t0 = Clock::now();
    at::Tensor out = inner(site, q, k, v, call);
    seconds += std::chrono::duration<double>(Clock::now() - t0).count();
    return out;
  }
};


std::array<std::int64_t, 3> parse_triple(const std::string& text, const std::string& option) {
  std::array<std::int64_t, 3> v{};
  std::stringstream in(text);
  std::string item;
  std::size_t i = 0;
  while (std::getline(in, item, ',')) {
    if (i >= 3 || item.empty() || item.find_first_not_of("0123456789") != std::string::npos || item.size() > 6)
      throw InputError(option + " '" + text + "' is not three positive integers T,H,W");
    v[i++] = std::stoll(item);
  }
  if (i != 3 || v[0] < 1 || v[1] < 1 || v[2] < 1) throw InputError(option + " '" + text + "' is not three positive integers T,H,W");
  return v;
}

}  // namespace

void register_bench_hires_command(CLI::App& bench, GlobalOptions& global) {
  struct Args {
    int layers = 2, steps = 4, cache_every = 2;
    std::string grid = "2,32,32", base = "2,16,16";
    std::uint64_t seed = 0;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = bench.add_subcommand(
      "hires", "Time hi-res denoising steps (FreeSwim with and without cache, window, direct) on a 1.3B-width random DiT");
  cmd->add_option("--layers", args->layers, "DiT blocks (Wan2.1 1.3B has 30; time scales linearly)")->capture_default_str();
  cmd->add_option("--grid", args->grid, "Hi-res token grid T,H,W (latent frames, height/16, width/16 for Wan2.1)")
      ->capture_default_str();
  cmd->add_option("--base", args->base, "The training grid in tokens T,H,W; sets the window (2*floor(h/2)+1, 2*floor(w/2)+1)")
      ->capture_default_str();
  cmd->add_option("--steps", args->steps, "Timed steps per method (an even count: cache refresh and reuse alike)")
      ->capture_default_str();
  cmd->add_option("--cross-cache-every", args->cache_every, "FreeSwim's cache period for the cached run")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the weights and inputs")->capture_default_str();
  cmd->callback([args, &global] {
    const auto grid = parse_triple(args->grid, "--grid");
    const auto base = parse_triple(args->base, "--base");
    if (args->layers < 1 || args->layers > 30) throw InputError("--layers must be from 1 to 30");
    if (args->steps < 1 || args->steps > 100) throw InputError("--steps must be from 1 to 100");
    if (args->cache_every < 1) throw InputError("--cross-cache-every must be at least 1 here (the uncached run is measured too)");
    const at::Device device = parse_device(global.device);
    WanDiTConfig config = WanDiTConfig::t2v_1_3b();
    config.num_layers = args->layers;
    at::manual_seed(static_cast<std::int64_t>(args->seed));
    WanDiT dit(config);
    dit->reset_parameters();
    dit->to(device);
    dit->eval();
    c10::InferenceMode guard;
    const at::Tensor x = at::randn({1, config.in_dim, grid[0], grid[1] * 2, grid[2] * 2}).to(device);
    const WanTextCondition cond = dit->encode_text(at::randn({1, 32, config.text_dim}).to(device));
    const WanTextCondition uncond = dit->encode_text(at::randn({1, 8, config.text_dim}).to(device));
    Window3 window;
    window.size = {0, 2 * (base[1] / 2) + 1, 2 * (base[2] / 2) + 1};
    const Grid3 g{grid[0], grid[1], grid[2]};
    const double token_ratio = static_cast<double>(g.numel()) / static_cast<double>(base[0] * base[1] * base[2]);

    struct Method {
      std::string name;
      HiresMethod method;
      int every;
    };
    const std::vector<Method> methods{{"direct", HiresMethod::Direct, 2},
                                      {"window", HiresMethod::Window, 2},
                                      {"freeswim_nocache", HiresMethod::FreeSwim, 0},
                                      {"freeswim_cache", HiresMethod::FreeSwim, args->cache_every},
                                      {"freeswim_cache_cpu", HiresMethod::FreeSwim, args->cache_every}};
    nlohmann::json out = {{"bench", "hires"},
                          {"dit", {{"dim", config.dim}, {"heads", config.num_heads}, {"ffn_dim", config.ffn_dim},
                                   {"layers", config.num_layers}}},
                          {"grid", {g.t, g.h, g.w}},
                          {"tokens", g.numel()},
                          {"base", {base[0], base[1], base[2]}},
                          {"tokens_over_base", token_ratio},
                          {"window", {window.size[0], window.size[1], window.size[2]}},
                          {"steps", args->steps},
                          {"cross_cache_every", args->cache_every},
                          {"device", device.str()},
                          {"threads", at::get_num_threads()}};
    std::map<std::string, double> step_seconds;
    for (const Method& m : methods) {
      auto timer = std::make_shared<AttentionTimer>();
      AttentionProcessors timed;
      timed.set(timer);
      DiTDenoiser::Options options;
      options.processors = &timed;
      HiresOptions h;
      h.method = m.method;
      h.window = window;
      h.cross_cache_every = m.every;
      h.cache_on_cpu = m.name == "freeswim_cache_cpu";
      Guidance guidance;
      guidance.add(std::make_shared<ClassifierFreeGuidance>(5.0));
      FreeSwimDenoiser denoiser(*dit, guidance, options, h);
      denoiser.set_condition(RowRole::Cond, cond);
      denoiser.set_condition(RowRole::Uncond, uncond);
      auto sampler = make_sampler("euler");
      sampler->set_schedule(args->steps + 1, 9.0);
      const bool reset = reset_peak_rss();
      const std::int64_t rss_before = peak_rss_bytes();
      // Step 0 warms up (allocator, kernels); the timed steps are 1..steps.
      StepInfo step;
      step.count = args->steps + 1;
      at::Tensor latent = x;
      double total = 0;
      double attention = 0;
      for (int i = 0; i <= args->steps; ++i) {
        step.index = i;
        step.sigma = sampler->sigmas()[static_cast<std::size_t>(i)];
        step.timestep = 1000.0 * step.sigma;
        const double attention_before = timer->seconds;
        const auto t0 = Clock::now();
        const at::Tensor v = denoiser.velocity(latent, step);
        if (device.is_cuda()) v.cpu();
        const double s = std::chrono::duration<double>(Clock::now() - t0).count();
        if (i > 0) {
          total += s;
          attention += timer->seconds - attention_before;
        }
        log_info("bench hires: " + m.name + " step " + std::to_string(i) + (i == 0 ? " (warm-up)" : "") + ": " +
                 format_duration(s));
      }
      const double per_step = total / args->steps;
      step_seconds[m.name] = per_step;
      out["methods"][m.name] = {{"seconds_per_step", per_step},
                                {"attention_share", total > 0 ? attention / total : 0.0},
                                {"full_path_forwards", denoiser.full_path_forwards()},
                                {"cache_bytes", denoiser.peak_cache_bytes()},
                                {"peak_rss_bytes", peak_rss_bytes()},
                                {"peak_rss_reset", reset},
                                {"rss_at_start_bytes", rss_before}};
    }
    out["ratios"] = {{"freeswim_cache_over_nocache", step_seconds["freeswim_cache"] / step_seconds["freeswim_nocache"]},
                     {"freeswim_cache_over_direct", step_seconds["freeswim_cache"] / step_seconds["direct"]},
                     {"freeswim_nocache_over_direct", step_seconds["freeswim_nocache"] / step_seconds["direct"]},
                     {"window_over_direct", step_seconds["window"] / step_seconds["direct"]}};
    std::cout << out.dump() << std::endl;
  });
}

}  // namespace vdit::cli
