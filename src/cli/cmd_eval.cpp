// `vdit eval shapes`: how often the demo model draws what its caption asks for. Random captions
// of the shapes domain are generated with the text-to-video pipeline and scored from their
// pixels by shapes::judge_clip (colour, shape, motion); --render-only scores rendered
// ground-truth clips instead, which checks the judge itself without a model; --round-trip
// scores rendered clips after the model's VAE alone (optionally with latent noise), the ceiling a
// DiT on that VAE can reach.
#include "cli_common.h"
#include "commands.h"
#include "eval_edit.h"
#include "long_video_options.h"
#include "option_groups.h"

#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/io/contact_sheet.h"
#include "vdit/io/output_file.h"
#include "vdit/pipelines/wan_t2v.h"
#include "vdit/progress.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

namespace vdit::cli {

namespace {

namespace fs = std::filesystem;
using namespace vdit::shapes;

// Layout draws come from their own generator, so a seed picks the same captions with and without
// --render-only and a rendered run can be compared caption for caption with a generated one.
constexpr std::uint64_t kLayoutSeedOffset = 0x5eed5eedULL;

struct EvalOptions {
  ModelOptions model;
  // The shapes judge's defaults; the model's vdit-demo.json overrides the ones the user does not give.
  SamplingOptions sampling = sampling_defaults(shapes_judge_defaults());
  GuidanceOptions guidance = guidance_defaults(shapes_judge_defaults());
  int clips = 100;
  double strength = 1.0;     // below 1: denoise the rendered clip from that share of the schedule
  std::string save_dir;
  bool json = false;
  bool per_clip = false;      // with json: every clip's verdict and shape features too
  bool render_only = false;
  bool round_trip = false;    // rendered clips through the model's VAE only (no text encoder, no DiT)
  double latent_noise = 0;   // round trip: Gaussian noise of this std added to the normalised latent
  double latent_blur = 0;    // round trip: spatial Gaussian blur of this std (latent cells) on the latent
  bool overwrite = false;
  int long_factor = 1;       // long-video mode: clips of this many times the trained length (1: off)
  LongVideoOptions long_video;  // the context windows of the long-video mode
};

// Long-video mode (issue 43): a clip of several trained lengths judged segment by segment.
struct LongVerdict {
  bool one_object = true;     // every frame holds exactly one object
  bool same = true;           // colour (steady) and shape as captioned in every segment
  bool motion = true;         // motion as captioned in every segment where an object is found
  bool no_jump = true;        // no frame-to-frame centroid step above 3x the clip's median step
  double max_step = 0, median_step = 0;  // frame sides
};

// Segments of `segment` frames from the start, the last one moved back to end at the clip's end.
LongVerdict judge_long(const at::Tensor& video, const Caption& truth, std::int64_t segment) {
  LongVerdict v;
  const std::int64_t F = video.size(1);
  for (std::int64_t f = 0; f < F; ++f) {
    const Judgement j = judge_clip(video.narrow(1, f, 1));
    if (!j.ok || j.objects != 1) v.one_object = false;
  }
  for (std::int64_t start = 0;; start += segment) {
    const std::int64_t s = std::min(start, std::max<std::int64_t>(F - segment, 0));
    const Judgement j = judge_clip(video.narrow(1, s, std::min(segment, F)));
    if (!j.ok || j.colour != truth.colour || !j.colour_steady || j.shape != truth.shape) v.same = false;
    if (j.ok && j.motion != truth.motion) v.motion = false;
    if (s + segment >= F) break;
  }
  std::vector<double> steps;
  for (std::int64_t f = 0; f + 1 < F; ++f) {
    const Judgement j = judge_clip(video.narrow(1, f, 2));
    if (j.ok) steps.push_back(std::hypot(j.displacement_x, j.displacement_y));
  }
  if (!steps.empty()) {
    std::vector<double> sorted = steps;
    std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(sorted.size() / 2), sorted.end());
    v.median_step = sorted[sorted.size() / 2];
    v.max_step = *std::max_element(steps.begin(), steps.end());
    // A still object has median 0: a step of a pixel's worth is not a jump.
    v.no_jump = v.max_step <= 3.0 * std::max(v.median_step, 1.0 / static_cast<double>(video.size(3)));
  }
  return v;
}

std::string default_model_dir() {
  const std::string installed = builtin_model_dir();
  return installed.empty() ? (fs::path(VDIT_SOURCE_DIR) / "models" / "shapes").string() : installed;
}

std::string judged_text(const Judgement& j) {
  if (!j.ok) return "no object";
  std::string out = std::string(colour_name(j.colour)) + " " + shape_name(j.shape) + " " + motion_name(j.motion);
  if (!j.colour_steady) out += " (colour changes)";
  if (j.objects > 1) out += " (" + std::to_string(j.objects) + " objects)";
  return out;
}

// "colour, motion" for the attributes the judge disagrees on; "ok" when none.
std::string verdict(const Caption& truth, const Judgement& j) {
  if (!j.ok) return "MISS";
  std::string wrong;
  const auto add = [&](const char* what) { wrong += (wrong.empty() ? "" : ",") + std::string(what); };
  if (j.colour != truth.colour || !j.colour_steady) add("colour");
  if (j.shape != truth.shape) add("shape");
  if (j.motion != truth.motion) add("motion");
  return wrong.empty() ? "ok" : "WRONG " + wrong;
}

// A number as the stream prints it (2.5, not std::to_string's 2.500000).
std::string number_text(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// Separable Gaussian blur of a latent [C, F', h, w] over h and w (std in latent cells, edges
// replicated): what a DiT that is unsure where the object's edges lie to within a cell makes of it.
at::Tensor blur_latent(const at::Tensor& latent, double sigma) {
  const std::int64_t radius = static_cast<std::int64_t>(std::ceil(3 * sigma));
  const at::Tensor x = at::arange(-radius, radius + 1, latent.options());
  at::Tensor kernel = at::exp(-0.5 * (x / sigma).pow(2));
  kernel = kernel / kernel.sum();
  const std::int64_t c = latent.size(0), f = latent.size(1), h = latent.size(2), w = latent.size(3);
  at::Tensor planes = at::replication_pad2d(latent.reshape({c * f, 1, h, w}), {radius, radius, radius, radius});
  planes = at::conv2d(planes, kernel.view({1, 1, 1, -1}));
  planes = at::conv2d(planes, kernel.view({1, 1, -1, 1}));
  return planes.reshape({c, f, h, w});
}

std::string sheet_name(int index) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "clip_%04d.png", index + 1);
  return buffer;
}

void run_eval_shapes(const EvalOptions& given, const CLI::App& cmd, const GlobalOptions& global) {
  EvalOptions o = given;
  // Everything a user can get wrong is checked before any model is loaded: the command's own
  // options here, the shared ones by the validation layer (check_settings / check_run).
  if (o.clips < 1) throw InputError("--clips must be at least 1");
  if (o.round_trip && o.render_only) throw InputError("--round-trip and --render-only exclude each other");
  if (!(o.latent_noise >= 0) || !std::isfinite(o.latent_noise)) throw InputError("--latent-noise must be a finite number >= 0");
  if (o.latent_noise > 0 && !o.round_trip) throw InputError("--latent-noise needs --round-trip");
  if (!(o.latent_blur >= 0) || !std::isfinite(o.latent_blur)) throw InputError("--latent-blur must be a finite number >= 0");
  if (o.latent_blur > 0 && !o.round_trip) throw InputError("--latent-blur needs --round-trip");
  if (o.strength != 1.0 && (o.round_trip || o.render_only))
    throw InputError("--strength judges generated clips; it excludes --round-trip and --render-only");
  if (!(o.strength > 0.0 && o.strength <= 1.0))
    throw InputError("--strength must be in (0, 1] (got " + number_text(o.strength) + ")");
  if (o.long_factor < 1 || o.long_factor > 64) throw InputError("--long must be from 1 to 64 (got " + std::to_string(o.long_factor) + ")");
  if (o.long_factor > 1 && (o.round_trip || o.render_only || o.strength != 1.0))
    throw InputError("--long judges generated clips; it excludes --round-trip, --render-only and --strength");
  {
    const auto [w, h] = parse_checked_size(o.sampling.size);
    if (w < 32 || h < 32) throw InputError("--size " + o.sampling.size + ": the shapes domain needs at least 32x32");
  }

  std::string model_dir;
  std::optional<CheckedRun> run;
  T2VSettings settings;
  if (o.render_only) {
    settings = check_settings(o.model, o.sampling, o.guidance, nullptr);
    // Rendering holds one clip (and the judge's copies of it) at a time.
    MemoryModel nothing;
    nothing.dim = nothing.ffn_dim = 0;
    nothing.vae_dim_mult.clear();
    MemoryRun clip;
    clip.width = settings.width;
    clip.height = settings.height;
    clip.frames = settings.frames;
    check_memory_fits(estimate_t2v_memory(nothing, clip), available_memory_bytes(), o.sampling.force,
                      "--size " + o.sampling.size + " with " + std::to_string(settings.frames) + " frames");
  } else {
    model_dir = o.model.model.empty() ? default_model_dir() : o.model.model;
    std::error_code ec;
    if (!fs::exists(fs::symlink_status(model_dir, ec)))
      throw InputError(o.model.model.empty()
                           ? "the demo model is not at " + model_dir + " (train it with `vdit train-demo`, pass --model DIR, or use --render-only)"
                           : "--model " + model_dir + ": no such directory");
    RunNeeds needs;
    if (o.round_trip) needs.text_encoder = needs.dit = false;
    needs.encode_video = o.round_trip || o.strength < 1.0;
    needs.strength = o.strength;
    run = check_run(cmd, global, o.model, o.sampling, o.guidance, nullptr, nullptr, needs, model_dir);
    settings = run->settings;
  }
  // Long-video mode: clips of long_factor trained lengths (in latent frames), windows of the
  // trained length unless --context-frames says otherwise; segments of the trained length judged.
  std::int64_t segment_frames = settings.frames;
  std::string windows_line;
  if (o.long_factor > 1) {
    const std::int64_t trained = trained_frames(model_dir);
    const std::int64_t ts = run->pipeline->latent_geometry().temporal_stride;
    if ((trained - 1) % ts != 0) throw InputError("the model's trained length " + std::to_string(trained) + " is not " + std::to_string(ts) + "n+1");
    const std::int64_t latent = o.long_factor * ((trained - 1) / ts + 1);
    settings.frames = ts * (latent - 1) + 1;
    segment_frames = trained;
    windows_line = apply_long_video(o.long_video, {"(caption)"}, trained, ts, settings);
    run->pipeline->validate(settings);
  }
  // --save-dir: its files are checked now, the directory created only before the first clip.
  if (!o.save_dir.empty()) {
    std::error_code ec;
    if (fs::exists(fs::symlink_status(o.save_dir, ec))) {
      if (!fs::is_directory(o.save_dir, ec)) throw InputError("--save-dir '" + o.save_dir + "' is not a directory");
      for (int i = 0; i < o.clips; ++i)
        check_contact_sheet_output((fs::path(o.save_dir) / sheet_name(i)).string(), o.overwrite);
    } else {
      check_output_path(o.save_dir, false, /*directory=*/true);
    }
  }
  const std::int64_t width = settings.width, height = settings.height;
  const std::uint64_t seed = settings.seed;
  // The settings as the model's vdit-demo.json completed them, for the report.
  const int steps = settings.steps;
  const std::string sampler = settings.sampler;
  const std::optional<double> shift = settings.shift;
  const std::string negative_prompt = settings.negative_prompt.value_or("");  // the demo model's unconditional caption

  std::mt19937_64 caption_rng(seed);
  std::mt19937_64 layout_rng(seed + kLayoutSeedOffset);
  std::vector<Caption> captions;
  for (int i = 0; i < o.clips; ++i) captions.push_back(random_caption(caption_rng));

  WanT2VPipeline* pipeline = run ? run->pipeline.get() : nullptr;
  std::map<std::string, at::Tensor> contexts;  // caption text -> [L, text_dim]
  at::Tensor null_context;
  const bool guided = settings.guidance != 1.0;
  if (o.round_trip) {
    log_info("vdit eval shapes: " + std::to_string(o.clips) + " rendered clips through the VAE of " + model_dir + ", " +
             std::to_string(width) + "x" + std::to_string(height) + ", " + std::to_string(settings.frames) +
             " frames, latent noise " + number_text(o.latent_noise) + ", latent blur " + number_text(o.latent_blur));
  } else if (!o.render_only) {
    // Every distinct caption (at most 90) and the negative prompt are encoded once, before the
    // DiT is loaded; the text encoder is released after.
    std::set<std::string> unique;
    for (const auto& c : captions) unique.insert(c.text());
    std::vector<std::string> prompts(unique.begin(), unique.end());
    prompts.push_back(negative_prompt);
    std::vector<at::Tensor> encoded = pipeline->encode_prompts(prompts);
    for (std::size_t k = 0; k + 1 < prompts.size(); ++k) contexts[prompts[k]] = encoded[k];
    null_context = encoded.back();
    log_info("vdit eval shapes: " + std::to_string(o.clips) + " clips, " + std::to_string(width) + "x" +
             std::to_string(height) + ", " + std::to_string(settings.frames) + " frames, " + std::to_string(steps) + " steps " +
             sampler + ", guidance " + std::to_string(settings.guidance).substr(0, 4) +
             (o.strength < 1.0 ? ", strength " + number_text(o.strength) + " from rendered clips" : std::string()) +
             ", model " + model_dir);
    if (o.long_factor > 1)
      log_info(windows_line.empty() ? "long video: one window of every frame (windows off)" : windows_line);
  } else {
    log_info("vdit eval shapes: " + std::to_string(o.clips) + " rendered clips, " + std::to_string(width) + "x" +
             std::to_string(height) + ", " + std::to_string(settings.frames) + " frames");
  }

  // Contact sheets: the directory is created before the first clip; it and every file name were
  // checked by the validation above, so a refused run leaves no empty directory behind.
  if (!o.save_dir.empty()) {
    std::error_code ec;
    fs::create_directories(o.save_dir, ec);
    if (!fs::is_directory(o.save_dir, ec)) throw InputError("--save-dir " + o.save_dir + ": cannot create the directory");
  }

  JudgeSummary summary;
  int long_one_object = 0, long_same = 0, long_motion = 0, long_no_jump = 0, long_all = 0;
  nlohmann::json per_clip = nlohmann::json::array();  // --per-clip records, in clip order
  const auto t0 = std::chrono::steady_clock::now();
  const int digits = static_cast<int>(std::to_string(o.clips).size());
  // Generated clips draw their noise from the clip's seed, and so do noisy round trips.
  const bool clips_use_seed = !o.render_only && !(o.round_trip && o.latent_noise == 0);
  for (int i = 0; i < o.clips; ++i) {
    const Caption& truth = captions[i];
    // Clip i uses seed + i, so `vdit generate -p CAPTION --seed SEED+i` with the same settings
    // reproduces any clip of the run.
    const std::uint64_t clip_seed = seed + static_cast<std::uint64_t>(i);
    at::Tensor video;
    if (o.render_only || o.round_trip) {
      const ClipLayout layout = random_layout(truth, width, height, layout_rng);
      video = render_clip(truth, layout, settings.frames, width, height);
      if (o.round_trip) {
        // The noise stands in for a DiT sample's error: how much the decoder's shapes survive a
        // latent that misses by about this much (the demo VAE's latent has unit spread per channel).
        at::Tensor latent = pipeline->encode(video);
        if (o.latent_noise > 0)
          latent = latent + o.latent_noise * seeded_noise(latent.sizes().vec(), clip_seed);
        if (o.latent_blur > 0) latent = blur_latent(latent, o.latent_blur);
        video = pipeline->decode(latent);
      }
    } else {
      // DiT and VAE stay loaded together for the whole run: the demo model is small, and a
      // verdict per clip as it is made beats holding every latent until the DiT is released.
      at::Tensor noise = seeded_noise(t2v_latent_shape(settings, pipeline->latent_geometry()), clip_seed);
      if (settings.windows && settings.noise_reschedule == NoiseReschedule::Shuffle)
        noise = reschedule_noise(noise, settings.windows->context, settings.windows->overlap, sampler_noise_seed(clip_seed) + 1);
      at::Tensor clean;
      if (settings.strength < 1.0) {
        // SDEdit from the rendered ground truth: where along the schedule the DiT loses (or keeps)
        // what the clip already shows. The pipeline noises it to the first kept sigma.
        const ClipLayout layout = random_layout(truth, width, height, layout_rng);
        clean = pipeline->encode(render_clip(truth, layout, settings.frames, width, height));
      }
      const at::Tensor latent = pipeline->denoise(noise, contexts.at(truth.text()),
                                                  guided ? null_context : contexts.at(truth.text()), settings, {}, clean);
      video = pipeline->decode(latent);
    }
    const Judgement j = judge_clip(video);
    summary.add(truth, j);
    std::string long_text;
    if (o.long_factor > 1) {
      const LongVerdict lv = judge_long(video, truth, segment_frames);
      long_one_object += lv.one_object;
      long_same += lv.same;
      long_motion += lv.motion;
      long_no_jump += lv.no_jump;
      long_all += lv.one_object && lv.same && lv.motion && lv.no_jump;
      long_text = std::string("  long:") + (lv.one_object ? "" : " objects") + (lv.same ? "" : " segment-differs") +
                  (lv.motion ? "" : " motion") + (lv.no_jump ? "" : " jump") +
                  (lv.one_object && lv.same && lv.motion && lv.no_jump ? " ok" : "");
    }
    if (o.per_clip) {
      nlohmann::json clip = {{"caption", truth.text()},
                             {"judged", judged_text(j)},
                             {"verdict", verdict(truth, j)},
                             {"objects", j.objects},
                             {"fill", j.fill},
                             {"skew", j.skew},
                             {"displacement", {j.displacement_x, j.displacement_y}}};
      if (clips_use_seed) clip["seed"] = clip_seed;
      per_clip.push_back(std::move(clip));
    }

    std::ostringstream line;
    line << "[" << std::setw(digits) << (i + 1) << "/" << o.clips << "] ";
    if (clips_use_seed) line << "seed " << clip_seed << "  ";
    line << truth.text() << "  ->  " << judged_text(j) << "  " << verdict(truth, j) << long_text;
    log_info(line.str());

    if (!o.save_dir.empty()) {
      std::map<std::string, std::string> metadata{{"prompt", truth.text()},
                                                  {"judged", judged_text(j)},
                                                  {"verdict", verdict(truth, j)},
                                                  {"size", std::to_string(width) + "x" + std::to_string(height)},
                                                  {"frames", std::to_string(settings.frames)},
                                                  {"software", "vdit eval shapes"}};
      if (clips_use_seed) metadata["seed"] = std::to_string(clip_seed);
      if (!o.render_only) metadata["model"] = model_dir;
      if (o.render_only) {
        metadata["source"] = "rendered";
      } else if (o.round_trip) {
        metadata["source"] = "VAE round trip";
        metadata["latent noise"] = number_text(o.latent_noise);
        if (o.latent_blur > 0) metadata["latent blur"] = number_text(o.latent_blur);
      } else {
        metadata["steps"] = std::to_string(steps);
        if (o.strength < 1.0) metadata["strength"] = number_text(o.strength);
        metadata["sampler"] = sampler;
        if (sampler == "euler-a") metadata["eta"] = number_text(settings.eta);
        metadata["guidance"] = number_text(settings.guidance);
        metadata["guidance_terms"] = guidance_terms_text(settings);
        if (shift) metadata["shift"] = number_text(*shift);
      }
      write_contact_sheet(video, (fs::path(o.save_dir) / sheet_name(i)).string(), metadata, 0, o.overwrite);
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::string report = summary.report();
  const auto share = [&](int n) { return number_text(std::round(1000.0 * n / std::max(o.clips, 1)) / 10.0) + "%"; };
  if (o.long_factor > 1)
    report += "long video (" + std::to_string(o.long_factor) + "x, " + std::to_string(settings.frames) + " frames, segments of " +
              std::to_string(segment_frames) + "): one object every frame " + share(long_one_object) +
              ", colour and shape every segment " + share(long_same) + ", motion every segment " + share(long_motion) +
              ", no jump > 3x median step " + share(long_no_jump) + ", all " + share(long_all) + "\n";
  report += "time: " + format_duration(seconds) + "\n";
  if (o.json) {
    // stdout carries only the JSON line, so the command can feed a script.
    log_info(report);
    nlohmann::json j = {{"task", "shapes"},
                        {"source", o.render_only ? "rendered" : o.round_trip ? "round-trip" : "generated"},
                        {"clips", summary.clips},
                        {"colour", summary.accuracy(summary.colour_right)},
                        {"shape", summary.accuracy(summary.shape_right)},
                        {"motion", summary.accuracy(summary.motion_right)},
                        {"all", summary.accuracy(summary.all_right)},
                        {"multi_object", summary.multi_object},
                        {"no_object", summary.no_object},
                        {"colour_unsteady", summary.colour_unsteady},
                        {"seed", seed},
                        {"size", std::to_string(width) + "x" + std::to_string(height)},
                        {"frames", settings.frames},
                        {"seconds", seconds}};
    // The confusion tables too, so a script sees which shapes the model mixes up, not just how
    // often: confusion.<attribute>.rows[caption][judged], in the order of .labels.
    for (int attribute = 0; attribute < JudgeSummary::kAttributes; ++attribute)
      j["confusion"][JudgeSummary::attribute_name(attribute)] = {
          {"labels", JudgeSummary::category_names(attribute)}, {"rows", summary.confusion[attribute]}};
    if (o.per_clip) j["per_clip"] = std::move(per_clip);
    if (o.long_factor > 1) {
      const double n = std::max(o.clips, 1);
      j["long"] = {{"factor", o.long_factor},
                   {"segment_frames", segment_frames},
                   {"windows", settings.windows ? nlohmann::json({{"context", settings.windows->context},
                                                                  {"overlap", settings.windows->overlap},
                                                                  {"schedule", name_of(settings.windows->schedule)},
                                                                  {"fuse", name_of(settings.windows->fuse)},
                                                                  {"anchor", name_of(settings.windows->anchor)},
                                                                  {"noise", name_of(settings.noise_reschedule)}})
                                                : nlohmann::json(nullptr)},
                   {"one_object", long_one_object / n},
                   {"same", long_same / n},
                   {"motion", long_motion / n},
                   {"no_jump", long_no_jump / n},
                   {"all", long_all / n}};
    }
    if (o.round_trip) {
      j["model"] = model_dir;
      j["latent_noise"] = o.latent_noise;
      if (o.latent_blur > 0) j["latent_blur"] = o.latent_blur;
    } else if (!o.render_only) {
      j["model"] = model_dir;
      j["steps"] = steps;
      if (o.strength < 1.0) j["strength"] = o.strength;
      j["guidance"] = settings.guidance;
      j["guidance_terms"] = guidance_terms_text(settings);
      j["sampler"] = sampler;
      if (sampler == "euler-a") j["eta"] = settings.eta;
      // null: the scheduler config's flow_shift.
      j["shift"] = shift ? nlohmann::json(*shift) : nlohmann::json(nullptr);
    }
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << report << std::flush;
  }
}

}  // namespace

void register_eval_command(CLI::App& app, GlobalOptions& global) {
  CLI::App* eval = app.add_subcommand("eval", "Score a model's outputs automatically");
  eval->require_subcommand(1);
  register_eval_upscale_command(*eval, global);

  auto o = std::make_shared<EvalOptions>();
  CLI::App* cmd = eval->add_subcommand(
      "shapes", "Generate random captions of the shapes demo domain and judge colour, shape and motion from the pixels");
  add_model_options(*cmd, o->model);
  SamplingHelp sampling_help;
  sampling_help.seed = "Seed of the caption draw, 0 to 18446744073709551615; clip i is generated with seed+i";
  sampling_help.noise = false;  // every clip draws its own noise
  add_sampling_options(*cmd, o->sampling, sampling_help);
  add_guidance_options(*cmd, o->guidance, "empty");
  cmd->add_option("--clips", o->clips, "Number of random captions to generate and judge")->capture_default_str();
  cmd->add_option("--strength", o->strength,
                  "Below 1: start each clip from its rendered ground truth noised to that share of the schedule "
                  "(SDEdit), to see at which noise level the model keeps or loses shape, colour and motion")
      ->capture_default_str();
  cmd->add_option("--latent-blur", o->latent_blur,
                  "With --round-trip: blur the latent spatially with a Gaussian of this std in latent cells before "
                  "decoding (how much of each attribute survives a DiT's positional uncertainty)");
  cmd->add_option("--long", o->long_factor,
                  "Long-video mode: generate each clip at this many times the model's trained length (windows of it, "
                  "see --context-*; --context-frames above the length turns windows off) and judge every trained-length "
                  "segment: one object per frame, colour and shape in every segment, no jump above 3x the median step")
      ->capture_default_str();
  add_long_video_options(*cmd, o->long_video, /*prompts=*/false);
  cmd->add_option("--save-dir", o->save_dir, "Write each clip's contact sheet here (clip_0001.png, ...)");
  cmd->add_flag("--overwrite", o->overwrite, "Replace existing contact sheets in --save-dir");
  CLI::Option* json_flag = cmd->add_flag("--json", o->json, "Print one JSON line with the accuracies and confusion tables on stdout (the report goes to stderr)");
  cmd->add_flag("--per-clip", o->per_clip,
                "With --json: also list every clip (caption, judged, verdict, objects, the shape features fill and "
                "skew, displacement) under per_clip")
      ->needs(json_flag);
  cmd->add_flag("--render-only", o->render_only, "Judge rendered ground-truth clips instead of generated ones (no model)");
  cmd->add_flag("--round-trip", o->round_trip,
                "Judge rendered clips after the model's VAE encodes and decodes them (the VAE's ceiling; no DiT)");
  cmd->add_option("--latent-noise", o->latent_noise,
                  "With --round-trip: add Gaussian noise of this std to the latent before decoding (seed+i per clip)")
      ->capture_default_str();
  cmd->footer("Model: default " + default_model_dir() +
              ". Sampling and guidance defaults: the model's vdit-demo.json, else the values shown. Sizes: at least "
              "32x32 (the judge's domain).");
  auto edit = std::make_shared<EditEvalOptions>();
  add_edit_eval_options(*cmd, *edit);
  cmd->callback([o, edit, cmd, &global] {
    if (!edit->enabled) return run_eval_shapes(*o, *cmd, global);
    if (o->render_only || o->round_trip || o->strength != 1.0 || o->long_factor > 1 || o->json || !o->save_dir.empty())
      throw InputError("--edit excludes --render-only, --round-trip, --strength, --long, --json and --save-dir");
    run_eval_edit(*edit, o->model, o->sampling, o->guidance, o->clips,
                  o->model.model.empty() ? default_model_dir() : o->model.model, *cmd, global);
  });
}

}  // namespace vdit::cli
