#include "hires_options.h"

#include "cli_common.h"

#include "vdit/common.h"

#include <cmath>
#include <sstream>

namespace vdit::cli {

namespace {

std::string number_text(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

// "T,H,W", each an integer >= 0 (0: the whole axis).
Window3 parse_window(const std::string& text) {
  Window3 w;
  std::stringstream in(text);
  std::string item;
  std::size_t i = 0;
  while (std::getline(in, item, ',')) {
    if (i >= 3 || item.empty() || item.find_first_not_of("0123456789") != std::string::npos || item.size() > 9)
      throw InputError("--window '" + text + "' is not T,H,W in tokens (integers, 0: the whole axis), e.g. 0,31,53");
    w.size[i++] = std::stoll(item);
  }
  if (i != 3) throw InputError("--window '" + text + "' is not T,H,W in tokens (integers, 0: the whole axis), e.g. 0,31,53");
  return w;
}

}  // namespace

void add_hires_options(CLI::App& cmd, HiresCliOptions& o, const std::string& strength_option, bool schedule_options) {
  cmd.add_option("--method", o.method,
                 "freeswim (window self-attention + the full path's cross-attention) | window (the window path alone) "
                 "| direct (plain full attention at the target size)")
      ->capture_default_str();
  cmd.add_option("--base-size", o.base_size,
                 "WIDTHxHEIGHT the model was trained at; sets the window (default: the model directory's vdit-demo.json "
                 "size, else 832x480 for Wan2.1 1.3B, 1280x720 for 14B)");
  cmd.add_option("--window", o.window,
                 "Window override in tokens T,H,W (0: the whole axis; default 0 and 2*floor(base tokens/2)+1 per side)");
  cmd.add_option("--attn-scale-factor", o.attn_scale_factor,
                 "Multiplies 1/sqrt(head_dim) in self-attention (default FreeSwim's 1.04608; 1: off)");
  cmd.add_option("--cross-cache-every", o.cross_cache_every,
                 "freeswim: recompute the full path's cross-attention every N steps (0: every step, no cache)")
      ->capture_default_str();
  cmd.add_option("--cache-device", o.cache_device, "Where the cross-attention cache lives: cpu | same")->capture_default_str();
  cmd.add_flag("--override-uncond", o.override_uncond,
               "freeswim: give the unconditional pass a full path of its own too (the reference's no-cache mode; one "
               "more full forward per refresh step)");
  cmd.add_option(strength_option, o.strength, "How much of the schedule the refinement runs, in (0, 1]; 1: from pure noise")
      ->capture_default_str();
  if (schedule_options) {
    cmd.add_option("--hires-steps", o.steps, "The refinement's scheduled steps (it runs strength x steps of them)")
        ->capture_default_str();
    cmd.add_option("--hires-shift", o.shift, "The refinement's flow shift")->capture_default_str();
  }
}

void check_hires_options(const HiresCliOptions& o) {
  (void)parse_hires_method(o.method);
  if (o.cache_device != "cpu" && o.cache_device != "same")
    throw InputError("--cache-device must be cpu or same (got '" + o.cache_device + "')");
  if (!o.window.empty()) (void)parse_window(o.window);
  if (!o.base_size.empty()) (void)parse_checked_size(o.base_size, "--base-size");
  if (!(std::isfinite(o.attn_scale_factor) && o.attn_scale_factor > 0))
    throw InputError("--attn-scale-factor must be a positive number (got " + number_text(o.attn_scale_factor) + ")");
  if (o.cross_cache_every < 0)
    throw InputError("--cross-cache-every must be 0 (no cache) or more (got " + std::to_string(o.cross_cache_every) + ")");
  if (o.steps < 1 || o.steps > kMaxSteps)
    throw InputError("--hires-steps must be from 1 to " + std::to_string(kMaxSteps) + " (got " + std::to_string(o.steps) + ")");
  if (!(std::isfinite(o.shift) && o.shift > 0))
    throw InputError("--hires-shift must be a positive number (got " + number_text(o.shift) + ")");
  if (!(o.strength > 0.0 && o.strength <= 1.0))
    throw InputError("--strength must be in (0, 1] (got " + number_text(o.strength) + ")");
}

std::pair<std::int64_t, std::int64_t> resolve_base_size(const HiresCliOptions& o, const std::string& model_dir,
                                                         std::int64_t dit_dim) {
  if (!o.base_size.empty()) return parse_checked_size(o.base_size, "--base-size");
  if (!model_dir.empty()) {
    const auto defaults = read_model_defaults(model_dir);
    if (defaults && defaults->size) return parse_checked_size(*defaults->size, model_dir + "/vdit-demo.json size");
  }
  if (dit_dim == 1536) return {832, 480};
  if (dit_dim == 5120) return {1280, 720};
  throw InputError("the model's training size is not known (DiT width " + std::to_string(dit_dim) +
                   "): give --base-size WIDTHxHEIGHT");
}

HiresOptions resolve_hires(const HiresCliOptions& o, WanT2VPipeline& pipeline, const std::string& model_dir,
                           std::int64_t width, std::int64_t height, std::int64_t frames) {
  check_hires_options(o);
  HiresOptions h;
  h.method = parse_hires_method(o.method);
  h.attn_scale_factor = o.attn_scale_factor;
  h.cross_cache_every = o.cross_cache_every;
  h.cache_on_cpu = o.cache_device == "cpu";
  h.override_uncond = o.override_uncond;
  const LatentGeometry& g = pipeline.latent_geometry();
  const WanDiTConfig& dit = pipeline.dit_config();
  if (!o.window.empty()) {
    h.window = parse_window(o.window);
  } else {
    const auto [bw, bh] = resolve_base_size(o, model_dir, dit.dim);
    h.window = freeswim_window(bw, bh, g.size_multiple_h(), g.size_multiple_w());
  }
  const Grid3 grid{(frames - 1) / g.temporal_stride + 1, height / g.size_multiple_h(), width / g.size_multiple_w()};
  if (h.method != HiresMethod::Direct) {
    log_info("hi-res: " + std::string(hires_method_name(h.method)) + " on a " + std::to_string(grid.t) + "x" +
             std::to_string(grid.h) + "x" + std::to_string(grid.w) + " token grid, window " +
             (h.window.size[0] <= 0 ? std::string("all") : std::to_string(h.window.size[0])) + "x" +
             std::to_string(h.window.size[1]) + "x" + std::to_string(h.window.size[2]));
    for (const auto& note : window_clamp_notes(h.window, grid)) log_info("hi-res: " + note);
  }
  return h;
}

std::map<std::string, std::string> hires_metadata(const HiresCliOptions& o, const std::string& model_dir,
                                                  std::int64_t dit_dim) {
  std::map<std::string, std::string> m;
  if (o.window.empty()) {
    const auto [bw, bh] = resolve_base_size(o, model_dir, dit_dim);
    m["base_size"] = std::to_string(bw) + "x" + std::to_string(bh);
  } else {
    m["window_override"] = o.window;
  }
  return m;
}

}  // namespace vdit::cli
