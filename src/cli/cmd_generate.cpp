// `vdit generate`: text-to-video (MP4/WebM/GIF/WebP/PNG frames) and text-to-image (PNG).
#include "cli_common.h"
#include "commands.h"

#include "vdit/common.h"
#include "vdit/io/image_io.h"
#include "vdit/io/output_file.h"
#include "vdit/io/safetensors.h"
#include "vdit/io/video_io.h"
#include "vdit/pipelines/wan_t2v.h"
#include "vdit/progress.h"

#include <filesystem>
#include <iostream>
#include <sstream>

namespace vdit::cli {

namespace {

namespace fs = std::filesystem;

std::vector<double> parse_sigmas(const std::string& text) {
  std::vector<double> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      std::size_t used = 0;
      out.push_back(std::stod(item, &used));
      if (used != item.size()) throw std::invalid_argument("junk");
    } catch (const std::exception&) {
      throw InputError("--sigmas: '" + item + "' is not a number");
    }
  }
  return out;
}

std::string parameters_text(const std::map<std::string, std::string>& m) {
  std::ostringstream s;
  s << m.at("prompt") << "\nNegative prompt: " << m.at("negative_prompt") << "\nSteps: " << m.at("steps")
    << ", Sampler: " << m.at("sampler") << ", Shift: " << m.at("shift") << ", CFG scale: " << m.at("guidance")
    << ", Autoguidance: " << m.at("autoguidance")
    << ", Seed: " << m.at("seed") << ", Size: " << m.at("size") << ", Frames: " << m.at("frames")
    << ", Model: " << m.at("model") << ", Software: vdit";
  return s.str();
}

struct GenerateOptions {
  std::string model;
  WanModelOverrides overrides;
  std::string prompt, negative_prompt;
  std::string size = "832x480";
  std::int64_t frames = 81;
  int steps = 50;
  std::string sampler = "unipc";
  double eta = 1.0;  // euler-a only
  double shift = 0;  // 0: from the model's scheduler config, else 5
  double guidance = 5.0;
  double autoguidance = 1.0;  // 1: off
  std::string guide_dit;
  std::int64_t seed = 42;
  std::string sigmas;
  std::string noise_file, save_latents, output, format, sheet;
  double fps = 16;
  int crf = 18;
  bool overwrite = false;
  bool no_batch_cfg = false;
  std::string text_encoder_device;
  std::int64_t vae_tile = 0, vae_tile_overlap = 64;
};

// Options the user did not give, from the model's vdit-demo.json.
void apply_model_defaults(const std::string& dir, const CLI::App& cmd, GenerateOptions& o,
                          std::optional<std::string>& negative_prompt) {
  const std::optional<ModelDefaults> d = read_model_defaults(dir);
  if (!d) return;
  const auto given = [&](const char* option) { return cmd.count(option) > 0; };
  if (d->size && !given("--size")) o.size = *d->size;
  if (d->frames && !given("--frames")) o.frames = *d->frames;
  if (d->steps && !given("--steps")) o.steps = *d->steps;
  if (d->sampler && !given("--sampler")) o.sampler = *d->sampler;
  if (d->eta && !given("--eta")) o.eta = *d->eta;
  if (d->shift && !given("--shift")) o.shift = *d->shift;
  if (d->guidance && !given("--guidance")) o.guidance = *d->guidance;
  if (d->fps && !given("--fps")) o.fps = *d->fps;
  if (d->autoguidance && !given("--autoguidance")) o.autoguidance = *d->autoguidance;
  if (d->guide_dit && !given("--guide-dit")) o.guide_dit = *d->guide_dit;
  if (d->negative_prompt && !negative_prompt) negative_prompt = *d->negative_prompt;
}

}  // namespace

void register_generate_command(CLI::App& app, GlobalOptions& global) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Text-to-video, or text-to-image with --frames 1");
  cmd->add_option("-m,--model", o->model, "Model directory (original, diffusers or ComfyUI layout); default: the built-in demo model");
  cmd->add_option("--dit", o->overrides.dit, "DiT weights file (overrides the model directory's)");
  cmd->add_option("--dit-config", o->overrides.dit_config, "config.json for the DiT (original or diffusers keys)");
  cmd->add_option("--text-encoder", o->overrides.text_encoder, "umT5 weights file");
  cmd->add_option("--tokenizer", o->overrides.tokenizer, "sentencepiece spiece.model");
  cmd->add_option("--vae", o->overrides.vae, "VAE weights file");
  cmd->add_option("-p,--prompt", o->prompt, "Text prompt")->required();
  cmd->add_option("-n,--negative-prompt", o->negative_prompt, "Negative prompt (default: the model's vdit-demo.json, else Wan2.1's own)");
  cmd->add_option("--size", o->size, "WIDTHxHEIGHT, multiples of 16")->capture_default_str();
  cmd->add_option("--frames", o->frames, "Frame count, 4n+1 (1: a still image)")->capture_default_str();
  cmd->add_option("--steps", o->steps, "Sampling steps")->capture_default_str();
  cmd->add_option("--sampler", o->sampler, "unipc | dpm++ | euler | euler-a (stochastic)")->capture_default_str();
  cmd->add_option("--eta", o->eta, "euler-a: share of the posterior noise re-drawn each step, 0 (= euler) to 1")->capture_default_str();
  cmd->add_option("--shift", o->shift, "Flow shift (default: the model's scheduler config, else 5)");
  cmd->add_option("-g,--guidance", o->guidance, "Classifier-free guidance scale (1: off)")->capture_default_str();
  cmd->add_option("--autoguidance", o->autoguidance,
                  "Autoguidance weight (1: off): each step adds (W - 1) x (DiT output - guide DiT output), both on the "
                  "prompt, steering away from what a weaker version of the model gets wrong")
      ->capture_default_str();
  cmd->add_option("--guide-dit", o->guide_dit,
                  "The weaker DiT for --autoguidance: a transformer folder, a model directory or a weights file of the "
                  "same latent space");
  cmd->add_option("-s,--seed", o->seed, "Seed of the initial noise")->capture_default_str();
  cmd->add_option("--sigmas", o->sigmas, "Custom sigma list, comma separated (overrides --steps/--shift)");
  cmd->add_option("--noise", o->noise_file, "safetensors file with tensor 'noise' of the latent shape ([16,F',H/8,W/8] for Wan2.1) replacing the seeded noise");
  cmd->add_option("--save-latents", o->save_latents, "Write the final latent (tensor 'latents') to this safetensors file");
  cmd->add_option("-o,--output", o->output, "Output file (default vdit-output.mp4, or .png for one frame)");
  cmd->add_option("--format", o->format, "mp4 | webm | gif | webp | png (png with several frames: a directory of frame_00001.png ...)");
  cmd->add_option("--fps", o->fps, "Frames per second of the video")->capture_default_str();
  cmd->add_option("--crf", o->crf, "Video quality (x264/VP9 CRF; lower is better)")->capture_default_str();
  cmd->add_option("--sheet", o->sheet, "Also write a contact sheet PNG of all frames");
  cmd->add_flag("--overwrite", o->overwrite, "Replace existing output files");
  cmd->add_flag("--no-batch-cfg", o->no_batch_cfg, "Run conditional and unconditional passes separately (less memory)");
  cmd->add_option("--text-encoder-device", o->text_encoder_device, "Device of the text encoder (default: --device)");
  cmd->add_option("--vae-tile", o->vae_tile, "Decode in spatial tiles of this many pixels (0: off)")->capture_default_str();
  cmd->add_option("--vae-tile-overlap", o->vae_tile_overlap, "Tile overlap in pixels")->capture_default_str();

  cmd->footer(
      "A model directory may hold vdit-demo.json with generation defaults for that model (keys: size, frames,\n"
      "steps, sampler, shift, guidance, fps, negative_prompt, autoguidance, guide_dit (relative to the model\n"
      "directory)); options given on the command line win.");

  cmd->callback([o, cmd, &global] {
    const bool all_parts = !o->overrides.dit.empty() && !o->overrides.text_encoder.empty() && !o->overrides.vae.empty();
    std::string model_dir = o->model;
    if (model_dir.empty() && !all_parts) {
      model_dir = builtin_model_dir();
      if (model_dir.empty()) throw InputError("no --model given and the built-in demo model (models/shapes) is not installed");
    }
    std::optional<std::string> negative_prompt;
    if (cmd->count("--negative-prompt")) negative_prompt = o->negative_prompt;
    if (!model_dir.empty()) apply_model_defaults(model_dir, *cmd, *o, negative_prompt);

    // Everything a user can get wrong is checked before any model is loaded.
    T2VSettings settings;
    settings.prompt = o->prompt;
    settings.negative_prompt = negative_prompt;
    std::tie(settings.width, settings.height) = parse_size(o->size);
    settings.frames = o->frames;
    settings.steps = o->steps;
    settings.sampler = o->sampler;
    settings.eta = o->eta;
    if (o->shift != 0) settings.shift = o->shift;
    settings.guidance = o->guidance;
    settings.autoguidance = o->autoguidance;
    if (o->seed < 0) throw InputError("--seed must be >= 0");
    settings.seed = static_cast<std::uint64_t>(o->seed);
    if (!o->sigmas.empty()) settings.sigmas = parse_sigmas(o->sigmas);
    settings.batch_guidance = !o->no_batch_cfg;

    std::string output = o->output;
    if (output.empty()) output = settings.frames == 1 ? "vdit-output.png" : "vdit-output.mp4";
    std::string format = o->format.empty() ? resolve_video_format(output) : o->format;
    const bool still = settings.frames == 1 && (format == "png" || format == "jpg" || format == "jpeg") && fs::path(output).has_extension();
    VideoWriteOptions video_options;
    video_options.fps = o->fps;
    video_options.crf = o->crf;
    video_options.format = format;
    video_options.overwrite = o->overwrite;
    if (still) check_output_path(output, o->overwrite);
    else check_video_output(output, video_options);
    if (!o->sheet.empty()) check_output_path(o->sheet, o->overwrite);
    if (!o->save_latents.empty()) check_output_path(o->save_latents, o->overwrite);

    WanModelFiles files = locate_wan_model(model_dir, o->overrides);

    WanT2VOptions options;
    options.device = parse_device(global.device);
    options.guide_dit = o->guide_dit;
    options.dtype = global.dtype.empty() ? (options.device.is_cuda() ? at::kBFloat16 : at::kFloat) : parse_dtype(global.dtype);
    check_compute_dtype(options.dtype, options.device);
    if (!o->text_encoder_device.empty()) {
      options.text_encoder_device = parse_device(o->text_encoder_device);
      check_compute_dtype(options.dtype, *options.text_encoder_device);
    }
    if (o->vae_tile > 0) {
      options.vae_tiling.enabled = true;
      options.vae_tiling.tile_px = o->vae_tile;
      options.vae_tiling.overlap_px = o->vae_tile_overlap;
    }
    // The size rules depend on the model (VAE strides, DiT patch), read from its configs; no
    // weights are loaded before the settings pass.
    WanT2VPipeline pipeline(files, options);
    pipeline.validate(settings);
    if (!o->noise_file.empty()) {
      auto file = SafetensorsFile::open(o->noise_file);
      if (!file->find("noise")) throw InputError(o->noise_file + ": no tensor named 'noise'");
      settings.noise = file->tensor("noise").to(at::kFloat).clone();
      pipeline.validate(settings);
    }
    install_interrupt_cleanup();

    log_info("vdit: " + std::to_string(settings.width) + "x" + std::to_string(settings.height) + ", " +
             std::to_string(settings.frames) + " frames, " + settings.sampler + ", model " + (model_dir.empty() ? files.dit.front() : model_dir));
    std::unique_ptr<ProgressBar> bar;
    T2VResult result = pipeline.generate(settings, [&](int done, int total) {
      if (!bar) bar = std::make_unique<ProgressBar>("denoise", total);
      bar->update(done);
    });
    if (bar) bar->finish();

    if (!o->save_latents.empty())
      write_safetensors(o->save_latents, {{"latents", result.latents, std::nullopt}}, result.metadata, o->overwrite);
    if (still) {
      ImageWriteOptions image_options;
      image_options.format = format;
      image_options.overwrite = o->overwrite;
      image_options.text = {{"parameters", parameters_text(result.metadata)}};
      write_image(output, result.video.select(1, 0), image_options);
    } else {
      video_options.metadata = result.metadata;
      write_video(output, result.video, video_options);
    }
    if (!o->sheet.empty()) write_contact_sheet(o->sheet, result.video, 0, {{"parameters", parameters_text(result.metadata)}}, o->overwrite);

    const auto& t = result.times;
    std::ostringstream summary;
    summary << "time: text " << format_duration(t.text) << ", load " << format_duration(t.load) << ", denoise "
            << format_duration(t.denoise) << ", decode " << format_duration(t.decode) << "; peak memory "
            << format_bytes(static_cast<double>(peak_rss_bytes()));
    log_info(summary.str());
    std::cout << output << std::endl;
    if (!o->sheet.empty()) std::cout << o->sheet << std::endl;
  });
}

}  // namespace vdit::cli
