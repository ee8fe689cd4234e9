// `vdit eval shapes --edit`: see eval_edit.h. Generated mode: for each attribute (colour, shape,
// direction) and each clip a random source caption, one attribute swapped to another value, the
// source and the edit generated in one edit run from the clip's seed, both judged from pixels.
// Real mode (--edit-real): rendered clips inverted under their caption (both inversion methods)
// and regenerated without an edit (PSNR against the rendered input), then a colour swap on the
// fixed-point inversion judged against the rendered input.
#include "eval_edit.h"

#include "cli_common.h"
#include "edit_session.h"

#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/progress.h"

#include <chrono>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>

namespace vdit::cli {

namespace {

using namespace vdit::shapes;

enum class Attribute { Colour, Shape, Direction };

const char* attribute_name(Attribute a) {
  return a == Attribute::Colour ? "colour" : a == Attribute::Shape ? "shape" : "direction";
}

std::string fixed(double value, int digits) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(digits) << value;
  return out.str();
}

std::string percent(int count, int total) {
  return total > 0 ? fixed(100.0 * count / total, 0) + " % (" + std::to_string(count) + "/" + std::to_string(total) + ")" : "-";
}

// The caption with `attribute` changed to another value drawn from `rng`.
Caption swapped(const Caption& c, Attribute attribute, std::mt19937_64& rng) {
  Caption t = c;
  if (attribute == Attribute::Colour) {
    while (t.colour == c.colour) t.colour = static_cast<Colour>(std::uniform_int_distribution<int>(0, kColours - 1)(rng));
  } else if (attribute == Attribute::Shape) {
    while (t.shape == c.shape) t.shape = static_cast<Shape>(std::uniform_int_distribution<int>(0, kShapes - 1)(rng));
  } else {
    // Among the four directions (a direction swap needs a moving source).
    while (t.motion == c.motion) t.motion = static_cast<Motion>(std::uniform_int_distribution<int>(0, 3)(rng));
  }
  return t;
}

// Per frame, the centroid (x, y) in pixels of the pixels far from the background colour; nullopt
// for a frame without any.
std::vector<std::optional<std::pair<double, double>>> centroid_track(const at::Tensor& video) {
  const at::Tensor pixels = (video.to(at::kFloat) + 1) / 2;  // [3, F, H, W] in [0, 1]
  const at::Tensor background = at::tensor({kBackground[0], kBackground[1], kBackground[2]}).view({3, 1, 1, 1});
  const at::Tensor foreground = (pixels - background).abs().amax(0).gt(0.25).to(at::kFloat);  // [F, H, W]
  const std::int64_t F = foreground.size(0), H = foreground.size(1), W = foreground.size(2);
  const at::Tensor xs = at::arange(W, at::kFloat).view({1, 1, W}), ys = at::arange(H, at::kFloat).view({1, H, 1});
  const at::Tensor mass = foreground.sum({1, 2});
  const at::Tensor cx = (foreground * xs).sum({1, 2}), cy = (foreground * ys).sum({1, 2});
  std::vector<std::optional<std::pair<double, double>>> track;
  for (std::int64_t f = 0; f < F; ++f) {
    const double m = mass[f].item<double>();
    if (m < 1) track.emplace_back(std::nullopt);
    else track.emplace_back(std::make_pair(cx[f].item<double>() / m, cy[f].item<double>() / m));
  }
  return track;
}

// Largest per-frame centroid distance between two clips (infinity when a frame has no object).
double track_distance(const at::Tensor& a, const at::Tensor& b) {
  const auto ta = centroid_track(a), tb = centroid_track(b);
  double worst = 0;
  for (std::size_t f = 0; f < ta.size() && f < tb.size(); ++f) {
    if (!ta[f] || !tb[f]) return INFINITY;
    worst = std::max(worst, std::hypot(ta[f]->first - tb[f]->first, ta[f]->second - tb[f]->second));
  }
  return worst;
}

double psnr(const at::Tensor& a, const at::Tensor& b) {
  const double mse = ((a.to(at::kFloat) - b.to(at::kFloat)) / 2).pow(2).mean().item<double>();  // on [0, 1] pixels
  return mse > 0 ? 10.0 * std::log10(1.0 / mse) : INFINITY;
}

bool attribute_equal(const Judgement& j, const Caption& c, Attribute a) {
  if (a == Attribute::Colour) return j.colour == c.colour && j.colour_steady;
  if (a == Attribute::Shape) return j.shape == c.shape;
  return j.motion == c.motion;
}

// The judged caption of a clip (for "unchanged" comparisons between source and edit).
Caption judged_caption(const Judgement& j) {
  Caption c;
  c.colour = j.colour;
  c.shape = j.shape;
  c.motion = j.motion;
  return c;
}

struct SwapTally {
  int clips = 0, source_right = 0, edited = 0, others = 0, track = 0, all = 0, track_changed = 0, no_object = 0;
  double track_sum = 0;
  int track_count = 0;
};

// One clip's verdicts: the edit's attribute against the target, the other two against `reference`
// (the source's judged caption), the centroid track against `reference_video`.
void tally(SwapTally& t, Attribute a, const Judgement& edit, const Caption& target, const Caption& reference,
           const at::Tensor& edit_video, const at::Tensor& reference_video, bool source_right) {
  t.clips += 1;
  t.source_right += source_right ? 1 : 0;
  if (!edit.ok) t.no_object += 1;
  const bool edited = edit.ok && attribute_equal(edit, target, a);
  bool others = edit.ok;
  for (Attribute other : {Attribute::Colour, Attribute::Shape, Attribute::Direction})
    if (other != a) others = others && attribute_equal(edit, reference, other);
  const double distance = track_distance(edit_video, reference_video);
  const bool track = distance <= 3.0;
  if (std::isfinite(distance)) {
    t.track_sum += distance;
    t.track_count += 1;
  }
  t.edited += edited;
  t.others += others;
  t.track += track;
  t.track_changed += !track;
  t.all += edited && others && (a == Attribute::Direction || track);
}

std::string swap_table(const std::vector<std::pair<Attribute, SwapTally>>& rows) {
  std::ostringstream out;
  out << "| swap | clips | source right | edited attribute = target | other two unchanged | track within 3 px | all | "
         "mean track distance (px) | no object |\n|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& [a, t] : rows) {
    out << "| " << attribute_name(a) << " | " << t.clips << " | " << percent(t.source_right, t.clips) << " | "
        << percent(t.edited, t.clips) << " | " << percent(t.others, t.clips) << " | ";
    if (a == Attribute::Direction) out << "changed: " << percent(t.track_changed, t.clips);
    else out << percent(t.track, t.clips);
    out << " | " << percent(t.all, t.clips) << " | "
        << (t.track_count ? fixed(t.track_sum / t.track_count, 2) : std::string("-")) << " | " << t.no_object << " |\n";
  }
  return out.str();
}

std::vector<Attribute> parse_attributes(const std::string& text) {
  std::vector<Attribute> out;
  std::istringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (item == "colour" || item == "color") out.push_back(Attribute::Colour);
    else if (item == "shape") out.push_back(Attribute::Shape);
    else if (item == "direction") out.push_back(Attribute::Direction);
    else throw InputError("--edit-attributes: '" + item + "' is not colour, shape or direction");
  }
  if (out.empty()) throw InputError("--edit-attributes names no attribute");
  return out;
}

}  // namespace

void add_edit_eval_options(CLI::App& cmd, EditEvalOptions& o) {
  cmd.add_flag("--edit", o.enabled,
               "Judge Prompt-to-Prompt edits (vdit edit): per attribute, --clips source captions with that attribute "
               "swapped; source and edit judged (edited attribute, the other two, the centroid track)");
  cmd.add_option("--edit-attributes", o.attributes, "With --edit: the attributes swapped, colour,shape,direction")
      ->capture_default_str();
  cmd.add_option("--cross-replace", o.cross_replace, "With --edit: vdit edit's --cross-replace")->capture_default_str();
  cmd.add_option("--self-replace", o.self_replace, "With --edit: vdit edit's --self-replace")->capture_default_str();
  cmd.add_flag("--edit-blend", o.blend, "With --edit: local blend on the swapped words (vdit edit --blend)");
  cmd.add_flag("--edit-real", o.real,
               "With --edit: rendered clips inverted (euler and fixed-point) and regenerated (PSNR), then a colour "
               "swap on the fixed-point inversion judged against the rendered input");
  cmd.add_option("--inversion-iterations", o.inversion_iterations, "With --edit-real: fixed-point iterations per step")
      ->capture_default_str();
}

void run_eval_edit(const EditEvalOptions& edit, ModelOptions model, SamplingOptions sampling, GuidanceOptions guidance,
                   int clips, const std::string& model_dir, const CLI::App& cmd, const GlobalOptions& global) {
  // ---- validation, before any model loads
  if (clips < 1) throw InputError("--clips must be at least 1");
  const std::vector<Attribute> attributes = parse_attributes(edit.attributes);
  if (edit.inversion_iterations < 1 || edit.inversion_iterations > 20)
    throw InputError("--inversion-iterations must be 1 to 20");
  if (edit.real && cmd.count("--sampler") && sampling.sampler != "euler")
    throw InputError("--edit-real regenerates on the inversion's Euler grid: --sampler must be euler");
  EditControls controls;
  controls.cross_replace = edit.cross_replace;
  controls.self_replace = edit.self_replace;
  RunNeeds needs;
  needs.batch_clips = 2;
  needs.encode_video = edit.real;
  CheckedRun run = check_run(cmd, global, model, sampling, guidance, nullptr, nullptr, needs, model_dir);
  T2VSettings settings = run.settings;
  if (edit.real) {
    settings.sampler = "euler";
    if (!cmd.count("--guidance")) settings.guidance = 1.0;
  }
  EditSession session(*run.pipeline, settings);
  session.plan("a red circle moving left", "a blue circle moving left", controls);  // the controls' ranges
  const std::int64_t width = settings.width, height = settings.height;
  const std::uint64_t seed = settings.seed;
  std::mt19937_64 rng(seed);
  std::mt19937_64 layout_rng(seed + 0x5eed5eedULL);
  const std::vector<std::int64_t> shape = t2v_latent_shape(settings, run.pipeline->latent_geometry());

  std::ostringstream head;
  head << "vdit eval shapes --edit" << (edit.real ? " --edit-real" : "") << ": " << clips << " clips"
       << (edit.real ? "" : " per attribute") << ", " << width << "x" << height << ", " << settings.frames << " frames, "
       << settings.steps << " steps " << settings.sampler << ", guidance " << settings.guidance << ", cross-replace "
       << controls.cross_replace << ", self-replace " << controls.self_replace << (edit.blend ? ", local blend" : "")
       << ", seed " << seed << ", model " << run.model_dir;
  log_info(head.str());
  const auto t0 = std::chrono::steady_clock::now();

  if (!edit.real) {
    // Every clip's captions first, so the text encoder runs once.
    struct Job {
      Attribute attribute;
      Caption source, target;
      std::uint64_t seed;
    };
    std::vector<Job> jobs;
    std::vector<std::string> prompts{settings.negative_prompt.value_or("")};
    for (Attribute a : attributes)
      for (int i = 0; i < clips; ++i) {
        Caption c = random_caption(rng);
        while (a == Attribute::Direction && c.motion == Motion::Still) c = random_caption(rng);
        const Caption t = swapped(c, a, rng);
        jobs.push_back({a, c, t, seed + static_cast<std::uint64_t>(i)});
        prompts.push_back(c.text());
        prompts.push_back(t.text());
      }
    session.encode(prompts);
    std::map<Attribute, SwapTally> tallies;
    ProgressBar bar("edit clips", static_cast<int>(jobs.size()));
    int done = 0;
    for (const Job& job : jobs) {
      EditRequest request;
      request.source_prompt = job.source.text();
      request.target_prompt = job.target.text();
      request.controls = controls;
      if (edit.blend) {
        const std::string a = job.attribute == Attribute::Colour ? colour_name(job.source.colour)
                              : job.attribute == Attribute::Shape ? shape_name(job.source.shape)
                                                                  : motion_name(job.source.motion);
        const std::string b = job.attribute == Attribute::Colour ? colour_name(job.target.colour)
                              : job.attribute == Attribute::Shape ? shape_name(job.target.shape)
                                                                  : motion_name(job.target.motion);
        request.controls.blend = {a, b};
      }
      request.noise = seeded_noise(shape, job.seed);
      const EditOutcome outcome = session.run(request);
      const at::Tensor source_video = run.pipeline->decode(outcome.source_latent);
      const at::Tensor edit_video = run.pipeline->decode(outcome.target_latent);
      const Judgement js = judge_clip(source_video), je = judge_clip(edit_video);
      const bool source_right = js.ok && js.colour == job.source.colour && js.colour_steady &&
                                js.shape == job.source.shape && js.motion == job.source.motion;
      tally(tallies[job.attribute], job.attribute, je, job.target, judged_caption(js), edit_video, source_video, source_right);
      bar.update(++done);
    }
    bar.finish();
    std::vector<std::pair<Attribute, SwapTally>> rows;
    for (Attribute a : attributes) rows.emplace_back(a, tallies[a]);
    std::cout << head.str() << "\n\n" << swap_table(rows);
  } else {
    struct Job {
      Caption source, target;
      at::Tensor video;
    };
    std::vector<Job> jobs;
    std::vector<std::string> prompts{settings.negative_prompt.value_or("")};
    for (int i = 0; i < clips; ++i) {
      const Caption c = random_caption(rng);
      const ClipLayout layout = random_layout(c, width, height, layout_rng);
      jobs.push_back({c, swapped(c, Attribute::Colour, rng), render_clip(c, layout, settings.frames, width, height)});
      prompts.push_back(jobs.back().source.text());
      prompts.push_back(jobs.back().target.text());
    }
    session.encode(prompts);
    double vae_sum = 0, vae_min = INFINITY;
    std::map<InversionMethod, std::pair<double, double>> psnr_stats;  // sum, min
    for (InversionMethod m : {InversionMethod::Euler, InversionMethod::FixedPoint}) psnr_stats[m] = {0.0, INFINITY};
    SwapTally swap;
    ProgressBar bar("real clips", clips);
    int done = 0;
    for (const Job& job : jobs) {
      const Judgement rendered = judge_clip(job.video);
      const bool rendered_ok = rendered.ok && rendered.colour == job.source.colour && rendered.shape == job.source.shape &&
                               rendered.motion == job.source.motion;
      for (InversionMethod m : {InversionMethod::Euler, InversionMethod::FixedPoint}) {
        EditRequest request;
        request.source_prompt = request.target_prompt = job.source.text();
        request.controls = controls;
        request.input_video = job.video;
        request.inversion = m;
        request.inversion_iterations = edit.inversion_iterations;
        const EditOutcome outcome = session.run(request);
        const double p = psnr(run.pipeline->decode(outcome.source_latent), job.video);
        psnr_stats[m].first += p;
        psnr_stats[m].second = std::min(psnr_stats[m].second, p);
        if (m == InversionMethod::Euler) {
          const double ceiling = psnr(run.pipeline->decode(outcome.input_latent), job.video);
          vae_sum += ceiling;
          vae_min = std::min(vae_min, ceiling);
        }
      }
      EditRequest request;
      request.source_prompt = job.source.text();
      request.target_prompt = job.target.text();
      request.controls = controls;
      if (edit.blend) request.controls.blend = {colour_name(job.source.colour), colour_name(job.target.colour)};
      request.input_video = job.video;
      request.inversion = InversionMethod::FixedPoint;
      request.inversion_iterations = edit.inversion_iterations;
      const EditOutcome outcome = session.run(request);
      const at::Tensor edit_video = run.pipeline->decode(outcome.target_latent);
      tally(swap, Attribute::Colour, judge_clip(edit_video), job.target, job.source, edit_video, job.video, rendered_ok);
      bar.update(++done);
    }
    bar.finish();
    std::ostringstream out;
    out << head.str() << "\n\n| regeneration of rendered clips (no edit) | clips | mean PSNR (dB) | min PSNR (dB) |\n"
        << "|---|---|---|---|\n"
        << "| VAE round trip (ceiling) | " << clips << " | " << fixed(vae_sum / clips, 2) << " | " << fixed(vae_min, 2) << " |\n";
    for (InversionMethod m : {InversionMethod::Euler, InversionMethod::FixedPoint}) {
      out << "| " << inversion_method_name(m)
          << (m == InversionMethod::FixedPoint ? " (" + std::to_string(edit.inversion_iterations) + " iterations)" : std::string())
          << " inversion + Euler sampling | " << clips << " | " << fixed(psnr_stats[m].first / clips, 2) << " | "
          << fixed(psnr_stats[m].second, 2) << " |\n";
    }
    out << "\nColour swap on the fixed-point inversion (other attributes and track against the rendered input; "
           "'source right' = the judge reads the rendered clip's caption):\n\n"
        << swap_table({{Attribute::Colour, swap}});
    std::cout << out.str();
  }
  log_info("time " + format_duration(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()));
}

}  // namespace vdit::cli
