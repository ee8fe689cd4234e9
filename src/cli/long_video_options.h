// The long-video option group (`vdit generate --frames N` above the model's trained length):
// sliding-window denoising (pipelines/temporal_windows.h) and prompts along the video. Options
// are in pixel frames and converted to latent frames here; every check runs before any model
// loads (InputError: exit 2, one line).
#pragma once

#include "commands.h"

#include "vdit/pipelines/wan_t2v.h"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace vdit::cli {

constexpr std::int64_t kWanTrainedFrames = 81;  // Wan2.1: 5 s at 16 fps

struct LongVideoOptions {
  std::optional<std::int64_t> context_frames;   // pixel frames; unset: the model's trained length
  std::optional<std::int64_t> context_overlap;  // pixel frames; unset: 16, at most half the window
  std::string schedule = "static", fuse = "linear", noise_reschedule = "none", anchor = "none";
  std::vector<std::string> prompts;  // -p/--prompt, once per segment
  std::string prompts_file;          // --prompts FILE: one prompt per line
};
// Registers the context options, and with `prompts` -p/--prompt (repeatable) and --prompts.
void add_long_video_options(CLI::App& cmd, LongVideoOptions& o, bool prompts = true);

// The model's trained length in pixel frames: vdit-demo.json's trained_frames, else its frames,
// else kWanTrainedFrames.
std::int64_t trained_frames(const std::string& model_dir);

// The prompts of the run: the -p values, or the non-empty lines of --prompts (not both; one of them).
std::vector<std::string> resolve_prompts(const LongVideoOptions& o);

// Checks the options and fills settings.windows (when settings.frames is above the context
// length), noise_reschedule, segment_prompts and prompt. `temporal_stride`: pixel frames per latent
// frame after the first (4 for Wan2.1). Returns a log line describing the plan ("" without windows).
std::string apply_long_video(const LongVideoOptions& o, const std::vector<std::string>& prompts,
                             std::int64_t trained, std::int64_t temporal_stride, T2VSettings& settings);

}  // namespace vdit::cli
