#include "option_groups.h"

#include "cli_common.h"

#include "vdit/common.h"
#include "vdit/io/image_io.h"
#include "vdit/io/init_video.h"
#include "vdit/io/input_file.h"
#include "vdit/io/output_file.h"
#include "vdit/io/safetensors.h"
#include "vdit/pipelines/perturbed_guidance.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <limits>
#include <sstream>
#include <thread>

namespace vdit::cli {

namespace {

namespace fs = std::filesystem;

// A number as a stream prints it (2.5, not std::to_string's 2.500000).
std::string number_text(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

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
    if (!std::isfinite(out.back())) throw InputError("--sigmas: '" + item + "' is not a finite number");
  }
  if (out.empty()) throw InputError("--sigmas: no values");
  if (out.size() > static_cast<std::size_t>(kMaxSteps) + 1)
    throw InputError("--sigmas: " + std::to_string(out.size()) + " values; at most " + std::to_string(kMaxSteps + 1));
  return out;
}

// "Steps: 30, Sampler: unipc, ..." as Stable Diffusion front ends write it, for PNG text chunks.
std::string parameters_text(const std::map<std::string, std::string>& m) {
  const auto get = [&](const char* key) {
    const auto it = m.find(key);
    return it == m.end() ? std::string() : it->second;
  };
  std::ostringstream s;
  s << get("prompt") << "\nNegative prompt: " << get("negative_prompt") << "\nSteps: " << get("steps")
    << ", Sampler: " << get("sampler") << ", Shift: " << get("shift") << ", CFG scale: " << get("guidance")
    << ", Autoguidance: " << get("autoguidance") << ", Seed: " << get("seed") << ", Size: " << get("size")
    << ", Frames: " << get("frames");
  if (m.count("strength")) s << ", Denoising strength: " << get("strength") << ", Init: " << get("init");
  s << ", Model: " << get("model") << ", Software: vdit";
  return s.str();
}

// Input paths the user named: exist, and are what they should be (a FIFO would hang the reader).
void check_input(const std::string& path, const std::string& option, InputKind kind) {
  if (!path.empty()) check_input_path(path, option, kind);
}

bool same_file(const std::string& a, const std::string& b) {
  if (a.empty() || b.empty()) return false;
  std::error_code ec;
  const fs::path ca = fs::weakly_canonical(a, ec);
  if (ec) return a == b;
  const fs::path cb = fs::weakly_canonical(b, ec);
  if (ec) return a == b;
  return ca == cb;
}

std::string lower_extension(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The groups and their --help.

void add_model_options(CLI::App& cmd, ModelOptions& o) {
  cmd.add_option("-m,--model", o.model, "Model directory (original, diffusers or ComfyUI layout); default: the built-in demo model");
  cmd.add_option("--dit", o.overrides.dit, "DiT weights file (overrides the model directory's)");
  cmd.add_option("--dit-config", o.overrides.dit_config, "config.json for the DiT (original or diffusers keys)");
  cmd.add_option("--text-encoder", o.overrides.text_encoder, "umT5 weights file (overrides the model directory's)");
  cmd.add_option("--tokenizer", o.overrides.tokenizer, "sentencepiece spiece.model (overrides the model directory's)");
  cmd.add_option("--vae", o.overrides.vae, "VAE weights file (overrides the model directory's)");
  cmd.add_option("--text-encoder-device", o.text_encoder_device, "Device of the text encoder (default: --device)");
  cmd.add_option("--vae-tile", o.vae_tile, "Decode in spatial tiles of this many pixels, a multiple of 8 (0: off)")
      ->capture_default_str();
  cmd.add_option("--vae-tile-overlap", o.vae_tile_overlap, "Tile overlap in pixels, a multiple of 8 below --vae-tile")
      ->capture_default_str();
}

T2VSettings shapes_judge_defaults() {
  T2VSettings d;
  d.width = d.height = 64;
  d.frames = 9;
  d.steps = 30;
  d.guidance = 4.0;
  d.seed = 0;
  return d;
}

SamplingOptions sampling_defaults(const T2VSettings& d) {
  SamplingOptions o;
  o.size = std::to_string(d.width) + "x" + std::to_string(d.height);
  o.frames = d.frames;
  o.steps = d.steps;
  o.sampler = d.sampler;
  o.eta = d.eta;
  o.shift = d.shift;
  o.seed = std::to_string(d.seed);
  return o;
}

void add_sampling_options(CLI::App& cmd, SamplingOptions& o, const SamplingHelp& help) {
  cmd.add_option("--size", o.size,
                 "WIDTHxHEIGHT; each side a multiple of the VAE's spatial stride times the DiT's patch (16 for "
                 "Wan2.1, 8 for the built-in demo model; the error names the nearest valid size)")
      ->capture_default_str();
  cmd.add_option("--frames", o.frames, "Frame count, 4n+1 for Wan2.1 (1: a still image)")->capture_default_str();
  cmd.add_option("--steps", o.steps, "Sampling steps, 1 to " + std::to_string(kMaxSteps))->capture_default_str();
  cmd.add_option("--sampler", o.sampler, "unipc | dpm++ | euler | euler-a (stochastic)")->capture_default_str();
  cmd.add_option("--eta", o.eta, "euler-a: share of the posterior noise re-drawn each step, 0 (= euler) to 1")
      ->capture_default_str();
  cmd.add_option_function<double>(
      "--shift", [&o](const double& v) { o.shift = v; },
      "Flow shift, > 0 (default: the model's vdit-demo.json or scheduler config, else 5)");
  cmd.add_option("--sigmas", o.sigmas,
                 "Custom sigma list, comma separated, decreasing in (0, 1], the last may be 0 (overrides --steps/--shift)");
  cmd.add_option("-s,--seed", o.seed, help.seed)->capture_default_str();
  if (help.noise)
    cmd.add_option("--noise", o.noise,
                   "safetensors file with tensor 'noise' of the latent shape ([16,F',H/8,W/8] for Wan2.1), finite "
                   "values, replacing the seeded noise");
  cmd.add_flag("--force", o.force,
               "Run even when the memory estimate (latents, activations, attention workspace, VAE decode) exceeds "
               "the free memory");
}

GuidanceOptions guidance_defaults(const T2VSettings& d) {
  GuidanceOptions o;
  o.guidance = d.guidance;
  o.autoguidance = d.autoguidance;
  o.no_batch_cfg = !d.batch_guidance;
  return o;
}

void add_guidance_options(CLI::App& cmd, GuidanceOptions& o, const std::string& negative_prompt_default) {
  cmd.add_option("-g,--guidance", o.guidance, "Classifier-free guidance scale (1: off)")->capture_default_str();
  cmd.add_option_function<std::string>(
      "-n,--negative-prompt", [&o](const std::string& v) { o.negative_prompt = v; },
      "Negative prompt (default: the model's vdit-demo.json, else " + negative_prompt_default + ")");
  cmd.add_option("--autoguidance", o.autoguidance,
                 "Autoguidance weight (1: off): each step adds (W - 1) x (DiT output - guide DiT output), both on the "
                 "prompt, steering away from what a weaker version of the model gets wrong")
      ->capture_default_str();
  cmd.add_option("--guide-dit", o.guide_dit,
                 "The weaker DiT for --autoguidance: a transformer folder, a model directory or a weights file of the "
                 "same latent space (default: the model's vdit-demo.json guide_dit, relative to the model directory)");
  cmd.add_flag("--no-batch-cfg", o.no_batch_cfg,
               "Run the conditional, unconditional and perturbed passes separately (less memory)");
  cmd.add_option_function<double>(
      "--pag-scale", [&o](const double& v) { o.pag_scale = v; },
      "Perturbed-attention guidance scale S: each step adds S x (output - perturbed output), the perturbed pass "
      "being the prompt with the heads of --pag-heads / --pag-layers attending to themselves (0: off; default: the "
      "head file's pag_scale, else 3 when heads are given)");
  cmd.add_option("--pag-layers", o.pag_layers, "Layer-level PAG: perturb every head of these layers (L,L,...)");
  cmd.add_option("--pag-heads", o.pag_heads,
                 "Head-level PAG: 'layer:head,head;layer:head' (global head indices) or a JSON file "
                 "{\"heads\": {\"3\": [0, 2]}, \"soft_pag\": 0.5, \"pag_scale\": 2} as `vdit heads search` writes");
  cmd.add_option_function<double>(
      "--soft-pag", [&o](const double& v) { o.soft_pag = v; },
      "SoftPAG weight u in [0, 1]: perturbed heads give (1 - u) attention + u V (1: PAG; default: the head file's, else 1)");
  cmd.add_option("--pag-steps", o.pag_steps, "The part of the steps PAG acts on, as fractions a:b (default 0:1)");
  cmd.add_option("--slg-layers", o.slg_layers,
                 "Skip-layer guidance: a pass with these blocks skipped (L,L,...); each step in --slg-steps adds "
                 "--slg-scale x (output - skipped output)");
  cmd.add_option("--slg-scale", o.slg_scale, "Skip-layer guidance scale")->capture_default_str();
  cmd.add_option("--slg-steps", o.slg_steps, "The part of the steps SLG acts on, as fractions a:b (default 0.01:0.2)");
  cmd.add_flag("--cfg-zero-star", o.cfg_zero_star,
               "CFG-Zero*: classifier-free guidance with the optimised scale s* = <v_c, v_u> / |v_u|^2 and the first 4 % "
               "of the steps zeroed");
}

void add_init_options(CLI::App& cmd, InitOptions& o) {
  cmd.add_option("--init", o.init,
                 "Start from this image, video (mp4, webm, gif...) or directory of PNG frames (SDEdit): frames are "
                 "resized to --size, the first --frames are used, a single image is repeated");
  cmd.add_option_function<double>(
      "--strength", [&o](const double& v) { o.strength = v; },
      "With --init: how much of the schedule runs, in (0, 1]; 1 ignores the input (default: 1 without --init, " +
          number_text(kInitStrength) + " with --init)");
}

void add_output_options(CLI::App& cmd, OutputOptions& o) {
  cmd.add_option("-o,--output", o.output, "Output file (default vdit-output.mp4, or vdit-output.png for one frame)");
  cmd.add_option("--format", o.format,
                 "mp4 | webm | gif | webp | png (png with several frames: a directory of frame_00001.png ...)");
  cmd.add_option("--fps", o.fps, "Frames per second of the video, in (0, 1000]")->capture_default_str();
  cmd.add_option("--crf", o.crf, "Video quality, 0..63 (x264/VP9 CRF; lower is better)")->capture_default_str();
  cmd.add_option("--sheet", o.sheet, "Also write a contact sheet of all frames (.png or .jpg)");
  cmd.add_option("--save-latents", o.save_latents, "Write the final latent (tensor 'latents') to this safetensors file");
  cmd.add_flag("--overwrite", o.overwrite,
               "Replace existing output files (regular files only, or a directory holding only vdit's PNG frames)");
}

void apply_model_defaults(const std::string& dir, const CLI::App& cmd, SamplingOptions& s, GuidanceOptions& g,
                          OutputOptions* out, bool with_size) {
  const std::optional<ModelDefaults> d = read_model_defaults(dir);
  if (!d) return;
  const auto given = [&](const char* option) { return cmd.count(option) > 0; };
  if (with_size) {
    if (d->size && !given("--size")) s.size = *d->size;
    if (d->frames && !given("--frames")) s.frames = *d->frames;
    if (d->fps && out && !given("--fps")) out->fps = *d->fps;
  }
  if (d->steps && !given("--steps")) s.steps = *d->steps;
  if (d->sampler && !given("--sampler")) s.sampler = *d->sampler;
  if (d->eta && !given("--eta")) s.eta = *d->eta;
  if (d->shift && !given("--shift")) s.shift = *d->shift;
  if (d->guidance && !given("--guidance")) g.guidance = *d->guidance;
  if (d->autoguidance && !given("--autoguidance")) g.autoguidance = *d->autoguidance;
  if (d->guide_dit && !given("--guide-dit")) g.guide_dit = *d->guide_dit;
  if (d->negative_prompt && !given("--negative-prompt")) g.negative_prompt = *d->negative_prompt;
}

// ---------------------------------------------------------------------------------------------
// The validation layer.

std::uint64_t parse_seed(const std::string& text, const std::string& option) {
  const std::string range = "an integer from 0 to 18446744073709551615";
  if (text.empty() || text.size() > 20 || !std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c); }))
    throw InputError(option + " '" + text + "' is not " + range);
  // 20 digits may exceed 2^64 - 1: compare as text against its decimal form.
  if (text.size() == 20 && text > "18446744073709551615") throw InputError(option + " " + text + " is above 2^64 - 1; give " + range);
  std::uint64_t value = 0;
  for (const char c : text) value = value * 10 + static_cast<std::uint64_t>(c - '0');
  return value;
}

std::pair<std::int64_t, std::int64_t> parse_checked_size(const std::string& text, const std::string& option) {
  std::pair<std::int64_t, std::int64_t> size;
  try {
    size = parse_size(text);
  } catch (const InputError&) {
    throw InputError(option + " '" + text + "' is not WIDTHxHEIGHT (e.g. 832x480)");
  }
  const auto [w, h] = size;
  if (w < 1 || h < 1) throw InputError(option + " " + text + ": width and height must be positive");
  if (w > kMaxSide || h > kMaxSide)
    throw InputError(option + " " + text + ": each side must be at most " + std::to_string(kMaxSide) + " pixels");
  return size;
}

int max_threads() {
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::min(4u * cores, 4096u));
}

void check_global_options(const GlobalOptions& global) {
  if (global.threads < 0 || global.threads > max_threads())
    throw InputError("--threads " + std::to_string(global.threads) + ": give 0 (all " +
                     std::to_string(std::max(1u, std::thread::hardware_concurrency())) + " cores) up to " +
                     std::to_string(max_threads()) + " (4 per core)");
  parse_device(global.device);
  if (!global.dtype.empty()) parse_dtype(global.dtype);
  if (global.dist_timeout != -1 && !(global.dist_timeout > 0 && global.dist_timeout <= 1e7))
    throw InputError("--dist-timeout must be a positive number of seconds (at most 1e7)");
}

namespace {

std::vector<int> parse_layer_list(const std::string& text, const std::string& option) {
  std::vector<int> layers;
  std::string item;
  std::istringstream in(text);
  while (std::getline(in, item, ',')) {
    const auto a = item.find_first_not_of(" \t"), b = item.find_last_not_of(" \t");
    const std::string t = a == std::string::npos ? std::string() : item.substr(a, b - a + 1);
    if (t.empty() || t.size() > 6 || !std::all_of(t.begin(), t.end(), [](unsigned char c) { return std::isdigit(c); }))
      throw InputError(option + " '" + text + "': '" + t + "' is not a layer index (write L,L,...)");
    layers.push_back(std::stoi(t));
  }
  if (layers.empty()) throw InputError(option + " names no layer");
  std::sort(layers.begin(), layers.end());
  layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
  return layers;
}

std::pair<double, double> parse_step_fractions(const std::string& text, const std::string& option) {
  const auto colon = text.find(':');
  double a = 0, b = 0;
  try {
    if (colon == std::string::npos) throw std::invalid_argument(text);
    std::size_t used = 0;
    const std::string sa = text.substr(0, colon), sb = text.substr(colon + 1);
    a = std::stod(sa, &used);
    if (used != sa.size()) throw std::invalid_argument(sa);
    b = std::stod(sb, &used);
    if (used != sb.size()) throw std::invalid_argument(sb);
  } catch (const std::exception&) {
    throw InputError(option + " '" + text + "' is not a:b (fractions of the steps, e.g. 0:0.5)");
  }
  if (!(std::isfinite(a) && std::isfinite(b) && a >= 0.0 && b <= 1.0 && a < b))
    throw InputError(option + " '" + text + "': need 0 <= a < b <= 1");
  return {a, b};
}

}  // namespace

void apply_guidance_terms(const GuidanceOptions& g, T2VSettings& settings) {
  std::optional<double> file_scale, file_u;
  if (!g.pag_heads.empty()) {
    std::error_code ec;
    const bool is_file = lower_extension(g.pag_heads) == ".json" || fs::is_regular_file(g.pag_heads, ec);
    if (is_file) {
      HeadSetFile file = read_head_set_file(g.pag_heads);
      if (file.heads.empty()) throw InputError("--pag-heads " + g.pag_heads + ": the file names no head");
      settings.pag_heads = file.heads;
      file_scale = file.pag_scale;
      file_u = file.soft_pag;
    } else {
      settings.pag_heads = parse_head_spec(g.pag_heads);
    }
  }
  if (!g.pag_layers.empty()) settings.pag_layers = parse_layer_list(g.pag_layers, "--pag-layers");
  const bool heads_given = !settings.pag_heads.empty() || !settings.pag_layers.empty();
  const double scale = g.pag_scale ? *g.pag_scale : file_scale ? *file_scale : heads_given ? 3.0 : 0.0;
  if (!std::isfinite(scale)) throw InputError("--pag-scale must be a finite number");
  if (scale != 0.0 && !heads_given) throw InputError("--pag-scale needs the heads to perturb (--pag-heads or --pag-layers)");
  settings.pag_scale = scale;
  const double u = g.soft_pag ? *g.soft_pag : file_u ? *file_u : 1.0;
  if (!(u >= 0.0 && u <= 1.0)) throw InputError("--soft-pag must be in [0, 1] (got " + number_text(u) + ")");
  settings.soft_pag = u;
  if (!g.pag_steps.empty()) std::tie(settings.pag_start, settings.pag_end) = parse_step_fractions(g.pag_steps, "--pag-steps");
  if (!g.slg_layers.empty()) settings.slg_layers = parse_layer_list(g.slg_layers, "--slg-layers");
  if (!std::isfinite(g.slg_scale)) throw InputError("--slg-scale must be a finite number");
  settings.slg_scale = g.slg_scale;
  if (!g.slg_steps.empty()) std::tie(settings.slg_start, settings.slg_end) = parse_step_fractions(g.slg_steps, "--slg-steps");
  settings.cfg_zero_star = g.cfg_zero_star;
  if (g.cfg_zero_star && settings.guidance == 1.0)
    throw InputError("--cfg-zero-star needs classifier-free guidance (--guidance other than 1)");
}

T2VSettings check_settings(const ModelOptions& model, const SamplingOptions& s, const GuidanceOptions& g,
                           const InitOptions* init) {
  T2VSettings settings;
  std::tie(settings.width, settings.height) = parse_checked_size(s.size);
  if (s.frames < 1) throw InputError("--frames must be at least 1 (got " + std::to_string(s.frames) + ")");
  settings.frames = s.frames;
  if (s.steps < 1 || s.steps > kMaxSteps)
    throw InputError("--steps must be from 1 to " + std::to_string(kMaxSteps) + " (got " + std::to_string(s.steps) + ")");
  settings.steps = s.steps;
  check_sampler_name(s.sampler);
  settings.sampler = s.sampler;
  if (!(s.eta >= 0.0 && s.eta <= 1.0)) throw InputError("--eta must be in [0, 1] (got " + number_text(s.eta) + ")");
  settings.eta = s.eta;
  if (s.shift && !(std::isfinite(*s.shift) && *s.shift > 0))
    throw InputError("--shift must be a positive number (got " + number_text(*s.shift) + ")");
  settings.shift = s.shift;
  if (!s.sigmas.empty()) settings.sigmas = parse_sigmas(s.sigmas);
  settings.seed = parse_seed(s.seed);

  if (!std::isfinite(g.guidance)) throw InputError("--guidance must be a finite number");
  if (!std::isfinite(g.autoguidance)) throw InputError("--autoguidance must be a finite number");
  settings.guidance = g.guidance;
  settings.autoguidance = g.autoguidance;
  settings.negative_prompt = g.negative_prompt;
  settings.batch_guidance = !g.no_batch_cfg;
  apply_guidance_terms(g, settings);

  if (init) {
    const bool has_init = !init->init.empty();
    const double strength = init->strength.value_or(has_init ? kInitStrength : 1.0);
    if (!(strength > 0.0 && strength <= 1.0))
      throw InputError("--strength must be in (0, 1] (got " + number_text(strength) + ")");
    if (strength < 1.0 && !has_init)
      throw InputError("--strength below 1 needs --init FILE (the image or video to start from)");
    settings.strength = strength;
  }

  if (model.vae_tile < 0 || (model.vae_tile > 0 && model.vae_tile % 8 != 0))
    throw InputError("--vae-tile must be 0 (off) or a positive multiple of 8 (got " + std::to_string(model.vae_tile) + ")");
  if (model.vae_tile > 0 &&
      (model.vae_tile_overlap < 0 || model.vae_tile_overlap % 8 != 0 || model.vae_tile_overlap >= model.vae_tile))
    throw InputError("--vae-tile-overlap must be a multiple of 8 from 0 to below --vae-tile " +
                     std::to_string(model.vae_tile) + " (got " + std::to_string(model.vae_tile_overlap) + ")");
  if (!model.text_encoder_device.empty()) parse_device(model.text_encoder_device);

  // Every input path, before anything opens one.
  if (!model.model.empty()) {
    std::error_code ec;
    if (!fs::exists(fs::symlink_status(model.model, ec)))
      throw InputError("--model '" + model.model + "': no such model directory");
    check_input(model.model, "--model", InputKind::Directory);
  }
  check_input(model.overrides.dit, "--dit", InputKind::File);
  check_input(model.overrides.dit_config, "--dit-config", InputKind::File);
  check_input(model.overrides.text_encoder, "--text-encoder", InputKind::File);
  check_input(model.overrides.tokenizer, "--tokenizer", InputKind::File);
  check_input(model.overrides.vae, "--vae", InputKind::File);
  if (!g.guide_dit.empty()) {
    std::error_code ec;
    if (!fs::exists(fs::symlink_status(g.guide_dit, ec)))
      throw InputError("--guide-dit '" + g.guide_dit + "': no such guide DiT file or directory");
    check_input(g.guide_dit, "--guide-dit", InputKind::FileOrDirectory);
  }
  check_input(s.noise, "--noise", InputKind::File);
  if (init) check_input(init->init, "--init", InputKind::FileOrDirectory);
  return settings;
}

CheckedRun check_run(const CLI::App& cmd, const GlobalOptions& global, ModelOptions& model, SamplingOptions& sampling,
                     GuidanceOptions& guidance, const InitOptions* init, OutputOptions* output, const RunNeeds& needs,
                     const std::string& default_model_dir) {
  CheckedRun run;
  const bool all_parts =
      !model.overrides.dit.empty() && !model.overrides.text_encoder.empty() && !model.overrides.vae.empty();
  run.model_dir = model.model;
  if (run.model_dir.empty() && !all_parts) {
    run.model_dir = default_model_dir;
    if (run.model_dir.empty())
      throw InputError("no --model given and the built-in demo model (models/shapes) is not installed");
  }
  // The model directory's own defaults first, so that its values are checked like the user's.
  if (!run.model_dir.empty()) {
    std::error_code ec;
    if (fs::is_directory(run.model_dir, ec)) apply_model_defaults(run.model_dir, cmd, sampling, guidance, output, !!output);
  }
  run.settings = check_settings(model, sampling, guidance, init);
  if (needs.strength) {
    if (!(*needs.strength > 0.0 && *needs.strength <= 1.0))
      throw InputError("--strength must be in (0, 1] (got " + number_text(*needs.strength) + ")");
    run.settings.strength = *needs.strength;
  }
  if (output) run.outputs = check_outputs(*output, run.settings.frames);

  run.files = locate_wan_model(run.model_dir, model.overrides);
  run.options.device = parse_device(global.device);
  run.options.guide_dit = guidance.guide_dit;
  run.options.dtype = global.dtype.empty() ? (run.options.device.is_cuda() ? at::kBFloat16 : at::kFloat)
                                           : parse_dtype(global.dtype);
  if (needs.dit || needs.text_encoder) check_compute_dtype(run.options.dtype, run.options.device);
  if (!model.text_encoder_device.empty()) {
    run.options.text_encoder_device = parse_device(model.text_encoder_device);
    check_compute_dtype(run.options.dtype, *run.options.text_encoder_device);
  }
  if (model.vae_tile > 0) {
    run.options.vae_tiling.enabled = true;
    run.options.vae_tiling.tile_px = model.vae_tile;
    run.options.vae_tiling.overlap_px = model.vae_tile_overlap;
  }

  // The size rules depend on the model (VAE strides, DiT patch), read from its configs; no
  // weights are loaded here.
  run.pipeline = std::make_unique<WanT2VPipeline>(run.files, run.options);
  run.pipeline->validate(run.settings);
  T2VSettings& settings = run.settings;
  if (!sampling.noise.empty()) {
    auto file = SafetensorsFile::open(sampling.noise);
    if (!file->find("noise")) throw InputError("--noise '" + sampling.noise + "': no tensor named 'noise'");
    settings.noise = file->tensor("noise").to(at::kFloat).clone();
    run.pipeline->validate(settings);  // its shape
    if (!at::isfinite(settings.noise).all().item<bool>())
      throw InputError("--noise '" + sampling.noise + "': tensor 'noise' holds NaN or infinite values");
  }
  if (init && !init->init.empty()) {
    if (settings.strength < 1.0) {
      settings.init_video = read_init_frames(init->init, settings.frames, settings.height, settings.width);
    } else {
      log_warning("--strength 1 starts from pure noise: --init '" + init->init + "' is not used");
    }
  }
  // The schedule as the run will build it: custom sigmas and a strength that keeps no step are
  // refused here, not after the models load.
  if (needs.dit) run.pipeline->make_sampler_for(settings);

  // Memory: refuse a run that cannot fit before anything big is allocated.
  MemoryModel memory_model = read_memory_model(run.files, settings.autoguidance != 1.0 ? guidance.guide_dit : "");
  if (!needs.text_encoder) memory_model.text_encoder_parameters = 0;
  if (!needs.dit) {
    memory_model.dit_parameters = memory_model.guide_dit_parameters = 0;
    memory_model.dim = memory_model.ffn_dim = 0;
  }
  MemoryRun memory_run;
  memory_run.width = settings.width;
  memory_run.height = settings.height;
  memory_run.frames = settings.frames;
  const std::int64_t passes = 1 + (settings.guidance != 1.0 ? 1 : 0) + (pag_enabled(settings) ? 1 : 0) + (slg_enabled(settings) ? 1 : 0);
  memory_run.batch = (settings.batch_guidance ? passes : 1) * std::max<std::int64_t>(needs.batch_clips, 1);
  memory_run.compute_bytes = static_cast<std::int64_t>(c10::elementSize(run.options.dtype));
  memory_run.vae_tile_px = run.options.vae_tiling.enabled ? run.options.vae_tiling.tile_px : 0;
  memory_run.encode_init = settings.init_video.defined() || needs.encode_video;
  memory_run.on_host = run.options.device.is_cpu();
  run.memory = estimate_t2v_memory(memory_model, memory_run);
  log_verbose("memory estimate: " + run.memory.describe());
  check_memory_fits(run.memory, available_memory_bytes(), sampling.force,
                    "--size " + std::to_string(settings.width) + "x" + std::to_string(settings.height) + " with " +
                        std::to_string(settings.frames) + " frames");
  return run;
}

OutputPlan check_outputs(const OutputOptions& o, std::int64_t frames) {
  OutputPlan plan;
  plan.options = o;
  plan.output = o.output.empty() ? (frames == 1 ? "vdit-output.png" : "vdit-output.mp4") : o.output;
  const std::string ext = lower_extension(plan.output);
  const bool image_ext = ext == ".png" || ext == ".jpg" || ext == ".jpeg";
  std::string format = o.format;
  std::transform(format.begin(), format.end(), format.begin(), [](unsigned char c) { return std::tolower(c); });
  // One frame to a .png/.jpg file: an image (unless --format names a video container).
  plan.still = frames == 1 && image_ext && (format.empty() || format == "png" || format == "jpg" || format == "jpeg");
  if (plan.still) {
    plan.format = format.empty() ? ext.substr(1) : format;
    check_output_path(plan.output, o.overwrite);
  } else {
    plan.format = resolve_video_format(plan.output, o.format);
    VideoWriteOptions video;
    video.fps = o.fps;
    video.crf = o.crf;
    video.format = plan.format;
    video.overwrite = o.overwrite;
    check_video_output(plan.output, video);
  }
  if (!std::isfinite(o.fps) || o.fps <= 0 || o.fps > 1000)
    throw InputError("--fps must be in (0, 1000] (got " + number_text(o.fps) + ")");
  if (o.crf < 0 || o.crf > 63) throw InputError("--crf must be in 0..63 (got " + std::to_string(o.crf) + ")");
  if (!o.sheet.empty()) check_contact_sheet_output(o.sheet, o.overwrite);
  if (!o.save_latents.empty()) check_output_path(o.save_latents, o.overwrite);
  const std::vector<std::pair<std::string, std::string>> named{
      {"-o", plan.output}, {"--sheet", o.sheet}, {"--save-latents", o.save_latents}};
  for (std::size_t i = 0; i < named.size(); ++i)
    for (std::size_t j = i + 1; j < named.size(); ++j)
      if (same_file(named[i].second, named[j].second))
        throw InputError(named[i].first + " and " + named[j].first + " name the same file '" + named[j].second + "'");
  return plan;
}

void write_outputs(const OutputPlan& plan, const T2VResult& result, const std::map<std::string, std::string>& extra) {
  std::map<std::string, std::string> metadata = result.metadata;
  for (const auto& [key, value] : extra) metadata[key] = value;
  const OutputOptions& o = plan.options;
  if (!o.save_latents.empty())
    write_safetensors(o.save_latents, {{"latents", result.latents, std::nullopt}}, metadata, o.overwrite);
  if (plan.still) {
    ImageWriteOptions image;
    image.format = plan.format;
    image.overwrite = o.overwrite;
    image.text = {{"parameters", parameters_text(metadata)}};
    write_image(plan.output, result.video.select(1, 0), image);
  } else {
    VideoWriteOptions video;
    video.fps = o.fps;
    video.crf = o.crf;
    video.format = plan.format;
    video.overwrite = o.overwrite;
    video.metadata = metadata;
    write_video(plan.output, result.video, video);
  }
  if (!o.sheet.empty())
    write_contact_sheet(o.sheet, result.video, 0, {{"parameters", parameters_text(metadata)}}, o.overwrite);
  std::cout << plan.output << std::endl;
  if (!o.sheet.empty()) std::cout << o.sheet << std::endl;
}

}  // namespace vdit::cli
