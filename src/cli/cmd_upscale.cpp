// `vdit upscale`: hi-res refinement of a video, an image or a frame directory (FreeSwim,
// pipelines/freeswim.h). The frames are resized bilinearly to --size, encoded, noised to
// --strength and denoised at --size with the dual-path denoiser (or an ablation).
#include "cli_common.h"
#include "commands.h"
#include "hires_options.h"
#include "option_groups.h"

#include "vdit/common.h"
#include "vdit/io/image_io.h"
#include "vdit/io/init_video.h"
#include "vdit/io/input_file.h"
#include "vdit/io/video_io.h"
#include "vdit/pipelines/wan_t2v.h"
#include "vdit/progress.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <iostream>
#include <sstream>

namespace vdit::cli {

namespace {

constexpr int kUpscaleSteps = 50;     // FreeSwim's 50 scheduled steps
constexpr double kUpscaleShift = 9.0;  // and its flow shift

struct UpscaleOptions {
  std::string input, prompt;
  ModelOptions model;
  SamplingOptions sampling = sampling_defaults(T2VSettings{});
  GuidanceOptions guidance = guidance_defaults(T2VSettings{});
  HiresCliOptions hires;
  OutputOptions output;
};

bool is_image_file(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp" || ext == ".tga";
}

// The input's frames [3, F, H, W] in [-1, 1]; InputError naming the file when it cannot be read.
at::Tensor read_input_frames(const std::string& path) {
  check_input_path(path, "-i", InputKind::FileOrDirectory);
  std::error_code ec;
  at::Tensor frames;
  try {
    if (!std::filesystem::is_directory(path, ec) && is_image_file(path)) frames = read_image(path).unsqueeze(1);
    else frames = read_video(path).frames;
  } catch (const InputError&) {
    throw;
  } catch (const std::exception& e) {
    std::string what = e.what();
    throw InputError("-i '" + path + "': cannot be read (" + what.substr(0, what.find('\n')) + ")");
  }
  if (!frames.defined() || frames.dim() != 4 || frames.size(0) != 3 || frames.size(1) < 1)
    throw InputError("-i '" + path + "': no RGB frames could be read");
  return frames;
}

}  // namespace

void register_upscale_command(CLI::App& app, GlobalOptions& global) {
  auto o = std::make_shared<UpscaleOptions>();
  o->sampling.steps = kUpscaleSteps;
  o->sampling.shift = kUpscaleShift;
  o->sampling.frames = 0;  // from the input unless given
  CLI::App* cmd = app.add_subcommand(
      "upscale", "Refine a video or image at a larger size than the model was trained at (FreeSwim dual path)");
  cmd->add_option("-i,--input", o->input, "Video (mp4, webm, gif...), image, or directory of PNG frames")->required();
  cmd->add_option("-p,--prompt", o->prompt, "The prompt (what the video shows)")->required();
  add_model_options(*cmd, o->model);
  add_sampling_options(*cmd, o->sampling, SamplingHelp{});
  add_guidance_options(*cmd, o->guidance, "Wan2.1's own");
  add_hires_options(*cmd, o->hires, "--strength", false);
  add_output_options(*cmd, o->output);
  cmd->footer(
      "--size is the target (required; each side a multiple of 16 for Wan2.1). --frames defaults to the input's\n"
      "length cut to the model's 4n+1; --steps defaults to 50 and --shift to 9 (FreeSwim's), not the model's own.\n"
      "Every option and the input are checked before any model loads: bad input exits 2 with one line.");

  cmd->callback([o, cmd, &global] {
    if (cmd->count("--size") == 0) throw InputError("--size WIDTHxHEIGHT (the target size) is required");
    check_hires_options(o->hires);
    const at::Tensor input = read_input_frames(o->input);
    const std::int64_t available = input.size(1);
    if (o->sampling.frames == 0) o->sampling.frames = available == 1 ? 1 : ((available - 1) / 4) * 4 + 1;
    if (available > 1 && o->sampling.frames > available)
      throw InputError("-i '" + o->input + "' has " + std::to_string(available) + " frames; --frames " +
                       std::to_string(o->sampling.frames) + " asks for more");
    const OutputPlan outputs = check_outputs(o->output, o->sampling.frames);
    RunNeeds needs;
    needs.encode_video = true;
    needs.strength = o->hires.strength;
    // No output options here: the model's vdit-demo.json size and frames are its native ones.
    CheckedRun run = check_run(*cmd, global, o->model, o->sampling, o->guidance, nullptr, nullptr, needs, builtin_model_dir());
    T2VSettings& settings = run.settings;
    // FreeSwim's schedule unless given on the command line (a model's vdit-demo.json is for native runs).
    if (cmd->count("--steps") == 0) settings.steps = kUpscaleSteps;
    if (cmd->count("--shift") == 0) settings.shift = kUpscaleShift;
    settings.prompt = o->prompt;
    settings.hires = resolve_hires(o->hires, *run.pipeline, run.model_dir, settings.width, settings.height, settings.frames);
    if (settings.strength < 1.0) {
      settings.init_video = fit_init_frames(input, settings.frames, settings.height, settings.width, "-i '" + o->input + "'");
    } else {
      log_warning("--strength 1 starts from pure noise: -i '" + o->input + "' is not used");
    }
    run.pipeline->validate(settings);
    run.pipeline->make_sampler_for(settings);

    std::map<std::string, std::string> extra = hires_metadata(o->hires, run.model_dir, run.pipeline->dit_config().dim);
    extra["input"] = o->input;
    log_info("vdit upscale: " + o->input + " (" + std::to_string(input.size(3)) + "x" + std::to_string(input.size(2)) +
             ", " + std::to_string(available) + " frames) to " + std::to_string(settings.width) + "x" +
             std::to_string(settings.height) + ", " + std::to_string(settings.frames) + " frames, " + o->hires.method +
             ", strength " + std::to_string(settings.strength).substr(0, 4));
    std::unique_ptr<ProgressBar> bar;
    T2VResult result = run.pipeline->generate(settings, [&](int done, int total) {
      if (!bar) bar = std::make_unique<ProgressBar>("upscale", total);
      bar->update(done);
    });
    if (bar) bar->finish();
    const auto& t = result.times;
    std::ostringstream summary;
    summary << "time: text " << format_duration(t.text) << ", load " << format_duration(t.load) << ", denoise "
            << format_duration(t.denoise) << ", decode " << format_duration(t.decode) << "; peak memory "
            << format_bytes(static_cast<double>(peak_rss_bytes()));
    log_info(summary.str());
    write_outputs(outputs, result, extra);
  });
}

}  // namespace vdit::cli
