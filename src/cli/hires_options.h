// The hi-res refinement options shared by `vdit upscale` and `vdit generate --hires` (FreeSwim,
// pipelines/freeswim.h): registration with --help text, the model-free checks, and their
// resolution against the model (base size, window in tokens, clamp notes).
#pragma once

#include "option_groups.h"

#include "vdit/pipelines/freeswim.h"

#include <map>
#include <string>

namespace vdit::cli {

struct HiresCliOptions {
  std::string method = "freeswim";
  std::string base_size;  // WxH; empty: the model directory's vdit-demo.json size, else by DiT width
  std::string window;     // "T,H,W" tokens; empty: from the base size
  double attn_scale_factor = kFreeSwimScaleFactor;
  int cross_cache_every = HiresOptions{}.cross_cache_every;
  std::string cache_device = "same";
  bool override_uncond = false;
  double strength = kInitStrength;
  // generate --hires only: the refinement's own schedule (FreeSwim's 50 steps, shift 9).
  int steps = 50;
  double shift = 9.0;
};
// `strength_option` names the strength option ("--strength" for upscale, "--hires-strength" for
// generate, whose --strength is the SDEdit one); `schedule_options` adds --hires-steps/--hires-shift.
void add_hires_options(CLI::App& cmd, HiresCliOptions& o, const std::string& strength_option, bool schedule_options);

// Values that need no model: method, cache device, window and base-size text, scale factor,
// cache period, strength in (0, 1]. InputError.
void check_hires_options(const HiresCliOptions& o);

// The base size (pixels) the window comes from: --base-size, else the model directory's
// vdit-demo.json size, else 832x480 for a 1536-wide DiT (Wan2.1 1.3B) and 1280x720 for a
// 5120-wide one (14B); otherwise InputError asking for --base-size.
std::pair<std::int64_t, std::int64_t> resolve_base_size(const HiresCliOptions& o, const std::string& model_dir,
                                                         std::int64_t dit_dim);

// HiresOptions for a run at width x height with `frames` pixel frames: the window from --window
// or the base size, clamp notes logged (a window covering the grid is full attention there).
HiresOptions resolve_hires(const HiresCliOptions& o, WanT2VPipeline& pipeline, const std::string& model_dir,
                           std::int64_t width, std::int64_t height, std::int64_t frames);

// Metadata entries naming the settings the pipeline does not record itself.
std::map<std::string, std::string> hires_metadata(const HiresCliOptions& o, const std::string& model_dir,
                                                  std::int64_t dit_dim);

}  // namespace vdit::cli
