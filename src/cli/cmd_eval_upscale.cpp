// `vdit eval upscale`: the shapes judge on hi-res refinement. For random captions of the demo
// domain, a clip is generated at the model's size, upscaled by each method (bilinear pixels, and
// the DiT at the target size: direct, window, freeswim), and every result is judged at its own
// size: colour, shape, motion against the caption, one object, agreement with the native clip's
// own judgement, how far the object's centroid track moves from the native clip's (layout), and
// edge sharpness (inverse edge width in output pixels, see edge_sharpness).
#include "cli_common.h"
#include "commands.h"
#include "hires_options.h"
#include "option_groups.h"

#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/io/contact_sheet.h"
#include "vdit/io/init_video.h"
#include "vdit/pipelines/wan_t2v.h"
#include "vdit/progress.h"

#include <c10/core/InferenceMode.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <set>
#include <sstream>

namespace vdit::cli {

namespace {

namespace fs = std::filesystem;
using namespace vdit::shapes;

struct EvalUpscaleOptions {
  ModelOptions model;
  SamplingOptions sampling = sampling_defaults(shapes_judge_defaults());
  GuidanceOptions guidance = guidance_defaults(shapes_judge_defaults());
  HiresCliOptions hires;
  int clips = 100;
  int factor = 4;
  std::string methods = "bilinear,direct,window,freeswim";
  std::string save_dir;
  bool json = false;
};

// Per frame, the centroid (x, y in frame sides) of the pixels farther than `threshold` (RGB
// distance in [0,1] units) from `background`; NaN where a frame has none.
std::vector<std::array<double, 2>> centroid_track(const at::Tensor& video, const at::Tensor& background, double threshold) {
  const at::Tensor rgb = (video.to(at::kFloat) + 1) * 0.5;                         // [3, F, H, W]
  const at::Tensor d = (rgb - background.view({3, 1, 1, 1})).pow(2).sum(0).sqrt();  // [F, H, W]
  const at::Tensor mask = d.gt(threshold).to(at::kFloat);
  const std::int64_t F = video.size(1), H = video.size(2), W = video.size(3);
  const at::Tensor ys = (at::arange(H, at::kFloat) + 0.5) / static_cast<double>(H);
  const at::Tensor xs = (at::arange(W, at::kFloat) + 0.5) / static_cast<double>(W);
  const at::Tensor area = mask.sum({1, 2});
  const at::Tensor cx = (mask * xs.view({1, 1, W})).sum({1, 2}) / area;
  const at::Tensor cy = (mask * ys.view({1, H, 1})).sum({1, 2}) / area;
  std::vector<std::array<double, 2>> track;
  for (std::int64_t f = 0; f < F; ++f) {
    const bool any = area[f].item<float>() > 0;
    track.push_back({any ? cx[f].item<double>() : NAN, any ? cy[f].item<double>() : NAN});
  }
  return track;
}

// Mean over frames of the distance between two centroid tracks (frame sides); NaN when no frame
// has a centroid in both.
double track_distance(const std::vector<std::array<double, 2>>& a, const std::vector<std::array<double, 2>>& b) {
  double sum = 0;
  int n = 0;
  for (std::size_t f = 0; f < std::min(a.size(), b.size()); ++f) {
    if (std::isnan(a[f][0]) || std::isnan(b[f][0])) continue;
    sum += std::hypot(a[f][0] - b[f][0], a[f][1] - b[f][1]);
    ++n;
  }
  return n ? sum / n : NAN;
}

// Edge sharpness: at the object's boundary pixels (foreground pixels with a background
// 4-neighbour, foreground as in centroid_track), the mean RGB gradient magnitude per output pixel
// (central differences, the larger of the two axes) divided by the object-to-background contrast
// (the distance of the foreground's median colour from the background). A step edge gives about
// 0.5, an edge ramp w pixels wide about 1/w: it is the inverse edge width in output pixels.
// NaN without a foreground.
double edge_sharpness(const at::Tensor& video, const at::Tensor& background, double threshold) {
  const at::Tensor rgb = ((video.to(at::kFloat) + 1) * 0.5).contiguous();  // [3, F, H, W]
  const at::Tensor d = (rgb - background.view({3, 1, 1, 1})).pow(2).sum(0).sqrt();
  const at::Tensor fg = d.gt(threshold);
  if (!fg.any().item<bool>()) return NAN;
  const std::int64_t H = video.size(2), W = video.size(3);
  // Boundary: foreground with a background neighbour (inner 1-pixel ring of the frame only).
  const at::Tensor inner = fg.narrow(1, 1, H - 2).narrow(2, 1, W - 2);
  const at::Tensor up = fg.narrow(1, 0, H - 2).narrow(2, 1, W - 2), down = fg.narrow(1, 2, H - 2).narrow(2, 1, W - 2);
  const at::Tensor left = fg.narrow(1, 1, H - 2).narrow(2, 0, W - 2), right = fg.narrow(1, 1, H - 2).narrow(2, 2, W - 2);
  const at::Tensor boundary = inner & (up.logical_not() | down.logical_not() | left.logical_not() | right.logical_not());
  if (!boundary.any().item<bool>()) return NAN;
  const at::Tensor gy = (rgb.narrow(2, 2, H - 2).narrow(3, 1, W - 2) - rgb.narrow(2, 0, H - 2).narrow(3, 1, W - 2)) * 0.5;
  const at::Tensor gx = (rgb.narrow(2, 1, H - 2).narrow(3, 2, W - 2) - rgb.narrow(2, 1, H - 2).narrow(3, 0, W - 2)) * 0.5;
  const at::Tensor grad = at::maximum(gy.pow(2).sum(0).sqrt(), gx.pow(2).sum(0).sqrt());  // [F, H-2, W-2]
  const at::Tensor fg_pixels = rgb.permute({1, 2, 3, 0}).reshape({-1, 3}).index_select(0, fg.reshape({-1}).nonzero().squeeze(1));
  const at::Tensor object = std::get<0>(fg_pixels.median(0));
  const double contrast = (object - background).pow(2).sum().sqrt().item<double>();
  if (contrast <= 0) return NAN;
  return grad.masked_select(boundary).mean().item<double>() / contrast;
}

struct MethodTally {
  int clips = 0, one_object = 0, colour = 0, shape = 0, motion = 0, all = 0;
  int colour_agrees = 0, motion_agrees = 0;
  double layout_sum = 0, sharp_sum = 0;
  int layout_n = 0, sharp_n = 0;
  double seconds = 0;
  void add(const Caption& truth, const Judgement& j, const Judgement& native, double layout, double sharp) {
    ++clips;
    one_object += j.ok && j.objects == 1;
    const bool c = j.ok && j.colour == truth.colour && j.colour_steady, s = j.ok && j.shape == truth.shape,
               m = j.ok && j.motion == truth.motion;
    colour += c;
    shape += s;
    motion += m;
    all += c && s && m;
    colour_agrees += j.ok && native.ok && j.colour == native.colour && j.colour_steady == native.colour_steady;
    motion_agrees += j.ok && native.ok && j.motion == native.motion;
    if (!std::isnan(layout)) layout_sum += layout, ++layout_n;
    if (!std::isnan(sharp)) sharp_sum += sharp, ++sharp_n;
  }
};

std::string percent(int n, int of) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(1) << (of ? 100.0 * n / of : 0.0) << " %";
  return s.str();
}

std::string fixed(double v, int digits) {
  std::ostringstream s;
  if (std::isnan(v)) return "-";
  s << std::fixed << std::setprecision(digits) << v;
  return s.str();
}

void run_eval_upscale(EvalUpscaleOptions o, const CLI::App& cmd, const GlobalOptions& global) {
  if (o.clips < 1) throw InputError("--clips must be at least 1");
  if (o.factor < 1 || o.factor > 16) throw InputError("--factor must be from 1 to 16 (got " + std::to_string(o.factor) + ")");
  check_hires_options(o.hires);
  std::vector<std::string> methods;
  {
    std::stringstream in(o.methods);
    std::string m;
    while (std::getline(in, m, ',')) {
      if (m != "bilinear") (void)parse_hires_method(m, "--methods");
      if (std::find(methods.begin(), methods.end(), m) == methods.end()) methods.push_back(m);
    }
    if (methods.empty()) throw InputError("--methods names no method");
  }
  const std::string model_dir = o.model.model.empty() ? builtin_model_dir() : o.model.model;
  if (model_dir.empty()) throw InputError("the demo model (models/shapes) is not installed; pass --model DIR");
  RunNeeds needs;
  needs.encode_video = true;
  CheckedRun run = check_run(cmd, global, o.model, o.sampling, o.guidance, nullptr, nullptr, needs, model_dir);
  const T2VSettings base = run.settings;
  WanT2VPipeline& pipeline = *run.pipeline;
  T2VSettings hi = base;
  hi.width = base.width * o.factor;
  hi.height = base.height * o.factor;
  hi.steps = o.hires.steps;
  hi.shift = o.hires.shift;
  hi.strength = o.hires.strength;
  std::map<std::string, T2VSettings> per_method;
  for (const auto& m : methods) {
    if (m == "bilinear") continue;
    HiresCliOptions h = o.hires;
    h.method = m;
    T2VSettings s = hi;
    s.hires = resolve_hires(h, pipeline, run.model_dir, hi.width, hi.height, hi.frames);
    pipeline.validate(s);
    pipeline.make_sampler_for(s);
    per_method[m] = s;
  }
  if (!o.save_dir.empty()) {
    std::error_code ec;
    if (fs::exists(fs::symlink_status(o.save_dir, ec)) && !fs::is_directory(o.save_dir, ec))
      throw InputError("--save-dir '" + o.save_dir + "' is not a directory");
  }

  // The judge's background colour: the median of a rendered clip (the object covers little of it).
  std::mt19937_64 probe(1);
  const Caption probe_caption = random_caption(probe);
  const at::Tensor rendered = render_clip(probe_caption, random_layout(probe_caption, 64, 64, probe), 1, 64, 64);
  const at::Tensor background = std::get<0>(((rendered + 1) * 0.5).reshape({3, -1}).median(1));
  const double threshold = 0.25;  // the judge's foreground distance

  std::mt19937_64 caption_rng(base.seed);
  std::vector<Caption> captions;
  for (int i = 0; i < o.clips; ++i) captions.push_back(random_caption(caption_rng));
  std::set<std::string> unique;
  for (const auto& c : captions) unique.insert(c.text());
  std::vector<std::string> prompts(unique.begin(), unique.end());
  const std::string negative = base.negative_prompt.value_or("");
  prompts.push_back(negative);
  const std::vector<at::Tensor> encoded = pipeline.encode_prompts(prompts);
  std::map<std::string, at::Tensor> contexts;
  for (std::size_t k = 0; k + 1 < prompts.size(); ++k) contexts[prompts[k]] = encoded[k];
  const at::Tensor null_context = encoded.back();
  const bool guided = base.guidance != 1.0;
  log_info("vdit eval upscale: " + std::to_string(o.clips) + " clips, " + std::to_string(base.width) + "x" +
           std::to_string(base.height) + " -> " + std::to_string(hi.width) + "x" + std::to_string(hi.height) + ", " +
           std::to_string(base.frames) + " frames; native " + std::to_string(base.steps) + " steps, refinement " +
           std::to_string(hi.steps) + " steps shift " + fixed(*hi.shift, 2) + " strength " + fixed(hi.strength, 2) +
           "; caption seed " + std::to_string(base.seed));
  if (!o.save_dir.empty()) fs::create_directories(o.save_dir);

  // Every tensor below is an inference tensor (the pipeline's outputs): judge them in the same mode.
  c10::InferenceMode inference;
  std::map<std::string, MethodTally> tally;
  MethodTally native_tally;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < o.clips; ++i) {
    const Caption& truth = captions[static_cast<std::size_t>(i)];
    const std::uint64_t clip_seed = base.seed + static_cast<std::uint64_t>(i);
    const at::Tensor& ctx = contexts.at(truth.text());
    const at::Tensor& null_ctx = guided ? null_context : ctx;
    const at::Tensor native_latent =
        pipeline.denoise(seeded_noise(t2v_latent_shape(base, pipeline.latent_geometry()), clip_seed), ctx, null_ctx, base);
    const at::Tensor native = pipeline.decode(native_latent);
    const Judgement nj = judge_clip(native);
    const auto native_track = centroid_track(native, background, threshold);
    native_tally.add(truth, nj, nj, 0.0, edge_sharpness(native, background, threshold));
    const at::Tensor upsampled = fit_init_frames(native, hi.frames, hi.height, hi.width, "the native clip");
    at::Tensor clean;
    std::ostringstream line;
    line << "[" << (i + 1) << "/" << o.clips << "] seed " << clip_seed << "  " << truth.text() << "  native: "
         << (nj.ok ? std::string(colour_name(nj.colour)) + " " + shape_name(nj.shape) + " " + motion_name(nj.motion)
                   : std::string("no object"));
    std::vector<at::Tensor> sheet_rows{native.to(at::kFloat)};
    for (const auto& m : methods) {
      const auto m0 = std::chrono::steady_clock::now();
      at::Tensor video;
      if (m == "bilinear") {
        video = upsampled;
      } else {
        const T2VSettings& s = per_method.at(m);
        if (!clean.defined() && s.strength < 1.0) clean = pipeline.encode(upsampled);
        const at::Tensor latent =
            pipeline.denoise(seeded_noise(t2v_latent_shape(s, pipeline.latent_geometry()), clip_seed), ctx, null_ctx, s, {},
                             s.strength < 1.0 ? clean : at::Tensor());
        video = pipeline.decode(latent);
      }
      const Judgement j = judge_clip(video);
      const double layout = track_distance(centroid_track(video, background, threshold), native_track);
      const double sharp = edge_sharpness(video, background, threshold);
      MethodTally& t = tally[m];
      t.add(truth, j, nj, layout, sharp);
      t.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - m0).count();
      line << " | " << m << ": " << (j.ok ? std::to_string(j.objects) + " obj " + colour_name(j.colour) + " " +
                                                shape_name(j.shape) + " " + motion_name(j.motion)
                                          : std::string("no object"))
           << " d=" << fixed(layout, 3) << " s=" << fixed(sharp, 2);
      if (!o.save_dir.empty()) sheet_rows.push_back(video);
    }
    log_info(line.str());
    if (!o.save_dir.empty()) {
      char number[16];
      std::snprintf(number, sizeof(number), "%04d", i + 1);
      for (std::size_t k = 0; k < sheet_rows.size(); ++k) {
        const std::string label = k == 0 ? "native" : methods[k - 1];
        const std::string file = std::string("clip_") + number + "_" + label + ".png";
        write_contact_sheet(sheet_rows[k], (fs::path(o.save_dir) / file).string(),
                            {{"prompt", truth.text()}, {"seed", std::to_string(clip_seed)}, {"method", label}}, 0, true);
      }
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::ostringstream table;
  table << "| method | size | one object | colour | shape | motion | all | colour = native | motion = native | layout "
           "distance | edge sharpness | s/clip |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  const auto row = [&](const std::string& name, const MethodTally& t, std::int64_t w, std::int64_t h) {
    table << "| " << name << " | " << w << "x" << h << " | " << percent(t.one_object, t.clips) << " | "
          << percent(t.colour, t.clips) << " | " << percent(t.shape, t.clips) << " | " << percent(t.motion, t.clips) << " | "
          << percent(t.all, t.clips) << " | " << percent(t.colour_agrees, t.clips) << " | "
          << percent(t.motion_agrees, t.clips) << " | " << fixed(t.layout_n ? t.layout_sum / t.layout_n : NAN, 4) << " | "
          << fixed(t.sharp_n ? t.sharp_sum / t.sharp_n : NAN, 3) << " | " << fixed(t.seconds / std::max(t.clips, 1), 1)
          << " |\n";
  };
  row("native", native_tally, base.width, base.height);
  for (const auto& m : methods) row(m, tally[m], hi.width, hi.height);
  std::string report = table.str() + "clips " + std::to_string(o.clips) + ", caption seed " + std::to_string(base.seed) +
                       ", time " + format_duration(seconds) + "\n";
  if (o.json) {
    log_info(report);
    nlohmann::json j = {{"task", "upscale"}, {"clips", o.clips}, {"seed", base.seed}, {"factor", o.factor},
                        {"base_size", std::to_string(base.width) + "x" + std::to_string(base.height)},
                        {"strength", hi.strength}, {"steps", hi.steps}, {"shift", *hi.shift}, {"seconds", seconds}};
    for (const auto& m : methods) {
      const MethodTally& t = tally[m];
      const double n = std::max(t.clips, 1);
      j["methods"][m] = {{"one_object", t.one_object / n}, {"colour", t.colour / n}, {"shape", t.shape / n},
                         {"motion", t.motion / n}, {"all", t.all / n}, {"colour_agrees", t.colour_agrees / n},
                         {"motion_agrees", t.motion_agrees / n},
                         {"layout_distance", t.layout_n ? t.layout_sum / t.layout_n : -1.0},
                         {"edge_sharpness", t.sharp_n ? t.sharp_sum / t.sharp_n : -1.0}};
    }
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << report << std::flush;
  }
}

}  // namespace

void register_eval_upscale_command(CLI::App& eval, GlobalOptions& global) {
  auto o = std::make_shared<EvalUpscaleOptions>();
  CLI::App* cmd = eval.add_subcommand(
      "upscale",
      "Shapes judge on hi-res refinement: generate at the model's size, upscale by each method, judge each at its own size");
  add_model_options(*cmd, o->model);
  SamplingHelp help;
  help.seed = "Seed of the caption draw; clip i uses seed+i for its noise (native and refinement)";
  help.noise = false;
  add_sampling_options(*cmd, o->sampling, help);
  add_guidance_options(*cmd, o->guidance, "empty");
  add_hires_options(*cmd, o->hires, "--hires-strength", true);
  cmd->add_option("--clips", o->clips, "Number of random captions")->capture_default_str();
  cmd->add_option("--factor", o->factor, "Upscale factor per side")->capture_default_str();
  cmd->add_option("--methods", o->methods, "Comma list of bilinear, direct, window, freeswim")->capture_default_str();
  cmd->add_option("--save-dir", o->save_dir, "Write contact sheets of every clip and method here (replacing files)");
  cmd->add_flag("--json", o->json, "One JSON line on stdout (the table goes to stderr)");
  cmd->footer(
      "Layout distance: mean over frames of the distance between the object's centroid in the result and in the "
      "native clip, in frame sides.\nEdge sharpness: mean gradient magnitude on the object's boundary pixels over "
      "the object/background contrast (about 1 / edge width in output pixels; a step edge is 0.5).");
  cmd->callback([o, cmd, &global] { run_eval_upscale(*o, *cmd, global); });
}

}  // namespace vdit::cli
