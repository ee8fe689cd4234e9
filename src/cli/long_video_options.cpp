#include "long_video_options.h"

#include "cli_common.h"

#include "vdit/common.h"
#include "vdit/io/input_file.h"

#include <algorithm>
#include <fstream>

namespace vdit::cli {

void add_long_video_options(CLI::App& cmd, LongVideoOptions& o, bool prompts) {
  if (prompts) {
    cmd.add_option("-p,--prompt", o.prompts,
                   "Text prompt; give it several times to change the prompt along the video (segments of equal "
                   "length, each window taking the prompt of its position)")
        ->allow_extra_args(false);
    cmd.add_option("--prompts", o.prompts_file, "A text file with one prompt per line, one segment each (instead of -p)");
  }
  cmd.add_option_function<std::int64_t>(
      "--context-frames", [&o](const std::int64_t& v) { o.context_frames = v; },
      "Long video: frames per denoising window, 4n+1 (default: the model's trained length, 81 for Wan2.1); "
      "--frames above it denoise in overlapping windows fused every step");
  cmd.add_option_function<std::int64_t>(
      "--context-overlap", [&o](const std::int64_t& v) { o.context_overlap = v; },
      "Frames shared by consecutive windows, a multiple of 4 below --context-frames (default 16, at most half the window)");
  cmd.add_option("--context-schedule", o.schedule, "static | shifted (window starts move every step, so seams move)")
      ->capture_default_str();
  cmd.add_option("--context-fuse", o.fuse, "flat | linear | pyramid: weights of the windows' velocities on shared frames")
      ->capture_default_str();
  cmd.add_option("--noise-reschedule", o.noise_reschedule, "none | shuffle (FreeNoise: later blocks reuse shuffled earlier noise)")
      ->capture_default_str();
  cmd.add_option("--anchor", o.anchor, "none | first: prepend the first latent frame to every window")->capture_default_str();
}

std::int64_t trained_frames(const std::string& model_dir) {
  if (model_dir.empty()) return kWanTrainedFrames;
  const std::optional<ModelDefaults> d = read_model_defaults(model_dir);
  if (d && d->trained_frames) return *d->trained_frames;
  if (d && d->frames) return *d->frames;
  return kWanTrainedFrames;
}

std::vector<std::string> resolve_prompts(const LongVideoOptions& o) {
  if (!o.prompts.empty() && !o.prompts_file.empty()) throw InputError("give -p/--prompt or --prompts FILE, not both");
  if (o.prompts_file.empty()) {
    if (o.prompts.empty()) throw InputError("no prompt: give -p TEXT (several times for segments) or --prompts FILE");
    return o.prompts;
  }
  check_input_path(o.prompts_file, "--prompts", InputKind::File);
  std::ifstream in(o.prompts_file);
  if (!in) throw InputError("--prompts '" + o.prompts_file + "': cannot be read");
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") != std::string::npos) out.push_back(line);
  }
  if (out.empty()) throw InputError("--prompts '" + o.prompts_file + "': no prompt in the file (one prompt per line)");
  return out;
}

std::string apply_long_video(const LongVideoOptions& o, const std::vector<std::string>& prompts, std::int64_t trained,
                             std::int64_t ts, T2VSettings& settings) {
  TemporalWindowOptions w;
  w.schedule = parse_window_schedule(o.schedule);
  w.fuse = parse_window_fuse(o.fuse);
  w.anchor = parse_window_anchor(o.anchor);
  const NoiseReschedule noise = parse_noise_reschedule(o.noise_reschedule);
  const std::int64_t context = o.context_frames.value_or(trained);
  if (context < 1 || (context - 1) % ts != 0)
    throw InputError("--context-frames " + std::to_string(context) + " is not " + std::to_string(ts) + "n+1" +
                     (o.context_frames ? "" : " (the model's trained length)"));
  w.context = (context - 1) / ts + 1;
  const std::int64_t overlap = o.context_overlap.value_or(std::min<std::int64_t>(16, (w.context - 1) / 2 * ts));
  if (overlap < 0 || overlap % ts != 0)
    throw InputError("--context-overlap " + std::to_string(overlap) + " is not a multiple of " + std::to_string(ts) +
                     " from 0 (whole latent frames)");
  if (overlap >= context)
    throw InputError("--context-overlap " + std::to_string(overlap) + " must be below --context-frames " +
                     std::to_string(context));
  w.overlap = overlap / ts;
  if (w.overlap >= w.context)
    throw InputError("--context-overlap " + std::to_string(overlap) + " leaves no new latent frame per window of " +
                     std::to_string(context) + " frames");
  settings.prompt = prompts.front();
  settings.segment_prompts = prompts;
  settings.noise_reschedule = noise;
  if (settings.frames <= context) {
    if (prompts.size() > 1)
      log_warning(std::to_string(prompts.size()) + " prompts but --frames " + std::to_string(settings.frames) +
                  " fits one window of " + std::to_string(context) + ": only the first prompt is used");
    return "";
  }
  settings.windows = w;
  return "long video: " + std::to_string(settings.frames) + " frames above the window of " + std::to_string(context) +
         " (the model's trained length " + std::to_string(trained) + "): denoising in windows";
}

}  // namespace vdit::cli
