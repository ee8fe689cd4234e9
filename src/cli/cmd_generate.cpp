// `vdit generate`: text-to-video (MP4/WebM/GIF/WebP/PNG frames) and text-to-image (PNG).
#include "cli_common.h"
#include "commands.h"
#include "hires_options.h"
#include "long_video_options.h"
#include "option_groups.h"

#include "vdit/common.h"
#include "vdit/distributed.h"
#include "vdit/io/init_video.h"
#include "vdit/pipelines/wan_t2v.h"
#include "vdit/progress.h"

#include <filesystem>
#include <iostream>
#include <optional>
#include <tuple>
#include <sstream>

namespace vdit::cli {

namespace {

struct GenerateOptions {
  LongVideoOptions long_video;  // -p (repeatable), --prompts, the context windows
  ModelOptions model;
  SamplingOptions sampling = sampling_defaults(T2VSettings{});
  GuidanceOptions guidance = guidance_defaults(T2VSettings{});
  InitOptions init;
  OutputOptions output;
  // --hires WxH: refine the result at WxH in the same run (cmd_upscale.cpp's path).
  std::string hires_size, save_base;
  HiresCliOptions hires;
};

std::string number_text(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

}  // namespace

void register_generate_command(CLI::App& app, GlobalOptions& global) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Text-to-video, or text-to-image with --frames 1; image/video-to-video with --init");
  add_long_video_options(*cmd, o->long_video);
  add_model_options(*cmd, o->model);
  add_sampling_options(*cmd, o->sampling);
  add_guidance_options(*cmd, o->guidance, "Wan2.1's own");
  add_init_options(*cmd, o->init);
  add_output_options(*cmd, o->output);
  cmd->add_option("--hires", o->hires_size,
                  "Then refine the result at WIDTHxHEIGHT (vdit upscale's FreeSwim path, text encoded once); only the "
                  "hi-res video is written unless --save-base");
  cmd->add_option("--save-base", o->save_base, "With --hires: also write the native-size result to this file");
  add_hires_options(*cmd, o->hires, "--hires-strength", true);

  cmd->footer(
      "A model directory may hold vdit-demo.json with generation defaults for that model (keys: size, frames,\n"
      "steps, sampler, eta, shift, guidance, fps, negative_prompt, autoguidance, guide_dit (relative to the model\n"
      "directory), trained_frames (default: frames)); options given on the command line win. Every option and path is checked, and the run's\n"
      "memory estimated, before any model loads: bad input exits 2 with one line and changes no file.");

  cmd->callback([o, cmd, &global] {
    // The validation layer: every option value, input and output path, the model's configs and
    // the memory estimate, before any model loads.
    const std::vector<std::string> prompts = resolve_prompts(o->long_video);
    // torchrun / vdit launch: the environment names this process's rank; checked before
    // anything loads. On GPUs each local rank takes its own device (--device cuda -> cuda:LOCAL_RANK).
    const DistributedEnv dist_env = read_distributed_env();
    const auto dist_timeout = distributed_timeout(global.dist_timeout);
    if (dist_env.world_size > 1 && global.device == "cuda") global.device = "cuda:" + std::to_string(dist_env.local_rank);
    CheckedRun run = check_run(*cmd, global, o->model, o->sampling, o->guidance, &o->init, &o->output, RunNeeds{},
                               builtin_model_dir());
    const std::string windows_line =
        apply_long_video(o->long_video, prompts, trained_frames(run.model_dir),
                         run.pipeline->latent_geometry().temporal_stride, run.settings);
    // The rendezvous comes after every input check, so bad input exits 2 on every rank at once.
    check_ulysses_heads(run.pipeline->dit_config().num_heads, dist_env.world_size);
    run.pipeline->validate(run.settings);
    std::shared_ptr<DistributedGroup> group;
    if (dist_env.world_size > 1) {
      group = DistributedGroup::create(dist_env, dist_timeout, run.options.device);
      run.pipeline->set_distributed(group);
      if (group->is_main())
        log_info("sequence parallel: " + std::to_string(group->world_size()) + " ranks (" + group->backend() + ", Ulysses)");
    }
    const bool main_rank = !group || group->is_main();

    std::map<std::string, std::string> extra;
    if (run.settings.init_video.defined()) {
      extra["init"] = o->init.init;
      extra["strength"] = number_text(run.settings.strength);
    }

    if (main_rank) log_info("vdit: " + std::to_string(run.settings.width) + "x" + std::to_string(run.settings.height) + ", " +
             std::to_string(run.settings.frames) + " frames, " + run.settings.sampler + ", model " +
             (run.model_dir.empty() ? run.files.dit.front() : run.model_dir));
    if (!windows_line.empty() && main_rank) log_info(windows_line);
    // --hires: the refinement's settings, checked with the rest before anything loads.
    std::optional<T2VSettings> hires;
    std::optional<OutputPlan> base_plan;
    if (o->hires_size.empty()) {
      if (!o->save_base.empty()) throw InputError("--save-base needs --hires WIDTHxHEIGHT");
    } else {
      check_hires_options(o->hires);
      // Rank 0 alone decodes the native frames that the refinement starts from.
      if (dist_env.world_size > 1)
        throw InputError("--hires does not run under sequence parallelism yet; run vdit upscale on the native output");
      if (run.settings.windows) throw InputError("--hires does not combine with long-video context windows");
      hires = run.settings;
      std::tie(hires->width, hires->height) = parse_checked_size(o->hires_size, "--hires");
      hires->steps = o->hires.steps;
      hires->shift = o->hires.shift;
      hires->strength = o->hires.strength;
      hires->init_video = at::Tensor();
      hires->noise = at::Tensor();
      hires->hires = resolve_hires(o->hires, *run.pipeline, run.model_dir, hires->width, hires->height, hires->frames);
      run.pipeline->validate(*hires);
      run.pipeline->make_sampler_for(*hires);
      for (const auto& [k, v] : hires_metadata(o->hires, run.model_dir, run.pipeline->dit_config().dim)) extra[k] = v;
      extra["hires_from"] = std::to_string(run.settings.width) + "x" + std::to_string(run.settings.height);
      if (!o->save_base.empty()) {
        OutputOptions base_output = o->output;
        base_output.output = o->save_base;
        base_output.sheet.clear();
        base_output.save_latents.clear();
        base_plan = check_outputs(base_output, run.settings.frames);
        std::error_code ec;
        if (std::filesystem::weakly_canonical(base_plan->output, ec) == std::filesystem::weakly_canonical(run.outputs->output, ec))
          throw InputError("--save-base and -o name the same file '" + o->save_base + "'");
      }
    }

    std::unique_ptr<ProgressBar> bar;
    const auto on_step = [&](int done, int total) {
      if (!main_rank) return;  // one progress bar per job
      if (!bar) bar = std::make_unique<ProgressBar>("denoise", total);
      bar->update(done);
    };
    T2VResult result;
    if (!hires) {
      result = run.pipeline->generate(run.settings, on_step);
    } else {
      const std::vector<at::Tensor> contexts = run.pipeline->encode_prompts(run.pipeline->prompts_of(run.settings));
      T2VResult base = run.pipeline->generate_encoded(run.settings, contexts, on_step);
      if (bar) bar->finish();
      bar.reset();
      if (base_plan) write_outputs(*base_plan, base, extra);
      // The native frames, resized bilinearly to the hi-res size, are the refinement's input.
      hires->init_video = fit_init_frames(base.video, hires->frames, hires->height, hires->width, "the native result");
      if (hires->strength >= 1.0) hires->init_video = at::Tensor();
      log_info("hi-res: refining " + std::to_string(run.settings.width) + "x" + std::to_string(run.settings.height) +
               " at " + std::to_string(hires->width) + "x" + std::to_string(hires->height));
      result = run.pipeline->generate_encoded(*hires, contexts, on_step);
      result.times.text = base.times.text;
      result.times.load += base.times.load;
      result.times.denoise += base.times.denoise;
      result.times.decode += base.times.decode;
    }
    if (bar) bar->finish();

    const auto& t = result.times;
    std::ostringstream summary;
    summary << "time: text " << format_duration(t.text) << ", load " << format_duration(t.load) << ", denoise "
            << format_duration(t.denoise) << ", decode " << format_duration(t.decode) << "; peak memory "
            << format_bytes(static_cast<double>(peak_rss_bytes())) << " (estimated " << format_bytes(run.memory.total) << ")";
    if (!main_rank) return;  // rank 0 writes the output
    log_info(summary.str());
    if (group) extra["sequence_parallel"] = std::to_string(group->world_size()) + " ranks (" + group->backend() + ", Ulysses)";
    write_outputs(*run.outputs, result, extra);
  });
}

}  // namespace vdit::cli
