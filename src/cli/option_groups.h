// Option groups shared by the commands that run the text-to-video pipeline (`generate`, `eval
// shapes`; next `upscale` and `edit`): model, sampling, guidance, init and output options. Each
// group is a struct whose defaults come from the library's own (T2VSettings, VideoWriteOptions,
// VAETiling: one source of truth), one function registering it with CLI11 (the only place its
// --help text is written), and the checks of the one validation layer, which turn the groups
// into pipeline settings, locate the model and read its configs, read --noise and --init, and
// estimate the run's memory - all before any model loads. Everything it refuses is an InputError
// (exit 2, one line). `write_outputs` is the one place that writes a run's files and metadata.
#pragma once

#include "commands.h"

#include "vdit/io/video_io.h"
#include "vdit/models/wan_checkpoint.h"
#include "vdit/pipelines/memory_estimate.h"
#include "vdit/pipelines/wan_t2v.h"

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace vdit::cli {

// Limits of the validation layer.
constexpr int kMaxSteps = 10000;            // sampling steps (and custom sigmas, less one)
constexpr std::int64_t kMaxSide = 16384;    // pixels per side of --size

// ---- model: which weights, and how the VAE and text encoder run -------------------------------
struct ModelOptions {
  std::string model;            // -m/--model; empty: the built-in demo model
  WanModelOverrides overrides;  // --dit --dit-config --text-encoder --tokenizer --vae
  std::string text_encoder_device;
  std::int64_t vae_tile = 0;    // 0: untiled
  std::int64_t vae_tile_overlap = VAETiling{}.overlap_px;
};
void add_model_options(CLI::App& cmd, ModelOptions& o);

// ---- sampling: size, schedule, seed ------------------------------------------------------------
struct SamplingOptions {
  std::string size;
  std::int64_t frames = 0;
  int steps = 0;
  std::string sampler;
  double eta = 0;
  std::optional<double> shift;  // unset: the model's vdit-demo.json or scheduler config, else 5
  std::string sigmas;           // comma-separated custom schedule
  std::string seed;             // decimal text, 0 to 2^64-1 (parsed by parse_seed, never clamped)
  std::string noise;            // safetensors file with tensor 'noise'
  bool force = false;           // run even when the memory estimate exceeds the free memory
};
// The defaults of a command: `generate` takes T2VSettings{}'s, `eval shapes` its own.
SamplingOptions sampling_defaults(const T2VSettings& defaults);
// The commands that run the shapes judge (eval shapes, heads search): the judge is calibrated for
// 64x64 and 9 frames; 30 steps, guidance 4, seed 0 unless a command says otherwise.
T2VSettings shapes_judge_defaults();
struct SamplingHelp {
  std::string seed = "Seed of the initial noise, 0 to 18446744073709551615";
  bool noise = true;  // offer --noise
};
void add_sampling_options(CLI::App& cmd, SamplingOptions& o, const SamplingHelp& help = {});

// ---- guidance ---------------------------------------------------------------------------------
struct GuidanceOptions {
  double guidance = 0;
  double autoguidance = 0;
  std::string guide_dit;
  std::optional<std::string> negative_prompt;  // unset: the model's vdit-demo.json, else the command's default
  bool no_batch_cfg = false;
  // Perturbed-attention guidance (PAG / SoftPAG on heads), skip-layer guidance, CFG-Zero*.
  std::optional<double> pag_scale;  // unset: the head file's pag_scale, else 3 when heads are given
  std::string pag_layers;           // "L,L"
  std::string pag_heads;            // "layer:head,head;layer:head" or a JSON file
  std::optional<double> soft_pag;   // unset: the head file's soft_pag, else 1 (PAG)
  std::string pag_steps;            // "a:b" fractions of the steps
  std::string slg_layers;           // "L,L"
  double slg_scale = T2VSettings{}.slg_scale;
  std::string slg_steps;
  bool cfg_zero_star = false;
};
GuidanceOptions guidance_defaults(const T2VSettings& defaults);
void add_guidance_options(CLI::App& cmd, GuidanceOptions& o, const std::string& negative_prompt_default);

// ---- init: start from an image or a video (SDEdit) ---------------------------------------------
constexpr double kInitStrength = 0.7;  // --strength's default with --init (1 without)
struct InitOptions {
  std::string init;
  std::optional<double> strength;
};
void add_init_options(CLI::App& cmd, InitOptions& o);

// ---- output: the files a run writes ------------------------------------------------------------
struct OutputOptions {
  std::string output, format, sheet, save_latents;
  double fps = VideoWriteOptions{}.fps;
  int crf = VideoWriteOptions{}.crf;
  bool overwrite = false;
};
void add_output_options(CLI::App& cmd, OutputOptions& o);

// The model's vdit-demo.json applied to the options the user did not give (command line or
// --config). `with_size` false: --size, --frames and --fps stay the command's (eval's judge is
// calibrated for its own).
void apply_model_defaults(const std::string& model_dir, const CLI::App& cmd, SamplingOptions& sampling,
                          GuidanceOptions& guidance, OutputOptions* output, bool with_size);

// ---- the validation layer ---------------------------------------------------------------------

// --seed text -> 0..2^64-1; anything else (a sign, a fraction, 2^64 or more) is refused.
std::uint64_t parse_seed(const std::string& text, const std::string& option = "--seed");
// "WIDTHxHEIGHT", each side 1..kMaxSide.
std::pair<std::int64_t, std::int64_t> parse_checked_size(const std::string& text, const std::string& option = "--size");
// Global options: --threads 0 (all cores) up to max_threads(), --device, --dtype.
int max_threads();
void check_global_options(const GlobalOptions& global);

// The settings of the groups, with every value checked that needs no model: size, frames, steps
// (1..kMaxSteps), sampler, eta, shift (> 0), sigmas, seed, guidance, autoguidance, strength, the
// VAE tiling, and that every input path names a regular file or directory (no FIFO, no device,
// no symlink loop).
// The PAG / SLG / CFG-Zero* options into `settings` (--pag-heads' JSON file read here); the
// model-free checks. Layer and head ranges are checked against the model by the pipeline.
void apply_guidance_terms(const GuidanceOptions& guidance, T2VSettings& settings);
T2VSettings check_settings(const ModelOptions& model, const SamplingOptions& sampling, const GuidanceOptions& guidance,
                           const InitOptions* init);

// Outputs of a run, checked before anything runs: the video (or still image) path and format,
// fps, crf, the contact sheet (.png/.jpg), the latents file, that no two are the same file, and
// that each can be written (or replaced, with --overwrite, when it is a regular file, or a
// directory of vdit's PNG frames).
struct OutputPlan {
  OutputOptions options;
  std::string output, format;
  bool still = false;  // one frame as one image
};
OutputPlan check_outputs(const OutputOptions& options, std::int64_t frames);

// A run the validation layer accepted: the model's files, the pipeline (constructed, configs
// read, no weights loaded), the settings with --noise and --init read into them, and the
// checked outputs.
struct CheckedRun {
  std::string model_dir;  // empty when every part was given as a file
  WanModelFiles files;
  WanT2VOptions options;
  T2VSettings settings;
  std::unique_ptr<WanT2VPipeline> pipeline;
  MemoryEstimate memory;
  std::optional<OutputPlan> outputs;  // when check_run was given output options
};
struct RunNeeds {
  bool text_encoder = true, dit = true, vae = true;
  std::int64_t batch_clips = 1;  // runs held at once (for the estimate)
  bool encode_video = false;     // eval's SDEdit starts encode rendered clips
  std::optional<double> strength;  // a command's own part-way start (eval's rendered clips), in (0, 1]
};
// The whole validation layer for a pipeline run: check_settings, check_outputs (with `output`),
// then the model located and its
// configs read (size rules from its latent geometry), --noise read (shape, finite values) and
// --init read and fitted, the sampler's schedule built, and the memory estimate checked against
// the free memory (--force overrides). The model's vdit-demo.json fills in what the user did not
// give first (with `output`: --size, --frames and --fps too). No --model and not every part
// given: `default_model_dir`. Throws InputError.
CheckedRun check_run(const CLI::App& cmd, const GlobalOptions& global, ModelOptions& model, SamplingOptions& sampling,
                     GuidanceOptions& guidance, const InitOptions* init, OutputOptions* output, const RunNeeds& needs,
                     const std::string& default_model_dir);

// Writes the run's files: the latents, the video or image, the contact sheet, each with the
// run's metadata (`extra` entries added to the result's), and prints their paths on stdout.
void write_outputs(const OutputPlan& plan, const T2VResult& result, const std::map<std::string, std::string>& extra = {});

}  // namespace vdit::cli
