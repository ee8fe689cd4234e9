// The demo trainer's generated decoder pairs (DemoTrainConfig::decoder_generated_clips): the
// finished model's DiT generates clips of random captions, layout_from_pixels measures where and
// how large the object came out, and each latent is paired with the clip its caption asks for,
// rendered at that layout. VAETrainer::set_generated_pairs (train_vae.cpp) takes them.
#include "train_internal.h"

#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/models/wan_checkpoint.h"
#include "vdit/pipelines/wan_t2v.h"

#include <map>
#include <optional>

namespace vdit::demo {

using namespace detail;

std::optional<shapes::ClipLayout> layout_from_pixels(const at::Tensor& video, const shapes::Caption& caption) {
  if (video.dim() != 4 || video.size(0) != 3) throw InputError("layout_from_pixels: a clip must be [3, F, H, W]");
  const std::int64_t frames = video.size(1), height = video.size(2), width = video.size(3);
  // The judge's foreground (farther than 0.25 from the background in [0, 1] units, 0.5 in [-1, 1])
  // finds the object's box; inside it (grown by a pixel) each pixel's coverage is its colour's
  // share of the way from the background to the caption's colour. Every shape's widest row or
  // column spans its size, so the column profile (most coverage per column) sums to the size and
  // the profiles' weighted means give the centre: anti-aliased edges count by their coverage,
  // where a bounding box of thresholded pixels was measured up to 1.3 px too wide on rendered clips.
  const at::Tensor clip = video.to(at::kFloat).to(at::kCPU);
  const at::Tensor background = background_pixels().view({3, 1, 1, 1});
  const shapes::RGB& rgb = shapes::kPalette[static_cast<int>(caption.colour)];
  const at::Tensor colour =
      at::tensor({2 * rgb[0] - 1, 2 * rgb[1] - 1, 2 * rgb[2] - 1}).view({3, 1, 1, 1}) - background;
  const at::Tensor offset = clip - background;
  const at::Tensor mask = offset.pow(2).sum(0).gt(0.25);                                       // [F, H, W]
  const at::Tensor coverage = ((offset * colour).sum(0) / colour.pow(2).sum()).clamp(0.0, 1.0);  // [F, H, W]
  std::vector<double> cx(frames), cy(frames), side(frames);
  for (std::int64_t f = 0; f < frames; ++f) {
    const at::Tensor ys = mask[f].any(1).nonzero(), xs = mask[f].any(0).nonzero();
    if (ys.numel() == 0) return std::nullopt;
    const std::int64_t y0 = std::max<std::int64_t>(0, ys.min().item<std::int64_t>() - 1);
    const std::int64_t y1 = std::min<std::int64_t>(height, ys.max().item<std::int64_t>() + 2);
    const std::int64_t x0 = std::max<std::int64_t>(0, xs.min().item<std::int64_t>() - 1);
    const std::int64_t x1 = std::min<std::int64_t>(width, xs.max().item<std::int64_t>() + 2);
    const at::Tensor box = coverage[f].narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0);
    const at::Tensor columns = box.amax(0), rows = box.amax(1);
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    const double column_sum = columns.sum().item<double>(), row_sum = rows.sum().item<double>();
    if (!(column_sum > 0) || !(row_sum > 0)) return std::nullopt;
    cx[f] = ((at::arange(x1 - x0, opts) + (x0 + 0.5)) * columns).sum().item<double>() / column_sum;
    cy[f] = ((at::arange(y1 - y0, opts) + (y0 + 0.5)) * rows).sum().item<double>() / row_sum;
    // A triangle's base corners are too sharp for any column to be covered fully near them: its
    // size comes from its area (size^2 / 2) instead.
    side[f] = caption.shape == shapes::Shape::Triangle ? std::sqrt(2.0 * box.sum().item<double>()) : column_sum;
  }
  std::vector<double> sorted = side;
  std::nth_element(sorted.begin(), sorted.begin() + frames / 2, sorted.end());
  const double nominal = shapes::nominal_object_size(width, height);
  shapes::ClipLayout layout;
  layout.size = static_cast<float>(std::clamp(sorted[frames / 2], 0.85 * nominal, 1.15 * nominal));
  // Least squares c(t) = c0 + d t over t = f / (F - 1); a still caption keeps its mean place.
  const bool still = caption.motion == shapes::Motion::Still || frames < 2;
  auto fit = [&](const std::vector<double>& c, float& start, float& delta) {
    double mean_t = 0, mean_c = 0;
    for (std::int64_t f = 0; f < frames; ++f) {
      mean_t += frames > 1 ? static_cast<double>(f) / (frames - 1) : 0.0;
      mean_c += c[f];
    }
    mean_t /= frames;
    mean_c /= frames;
    double cov = 0, var = 0;
    for (std::int64_t f = 0; f < frames && !still; ++f) {
      const double t = static_cast<double>(f) / (frames - 1) - mean_t;
      cov += t * (c[f] - mean_c);
      var += t * t;
    }
    const double d = still || var == 0 ? 0.0 : cov / var;
    delta = static_cast<float>(d);
    start = static_cast<float>(mean_c - d * mean_t);
  };
  fit(cx, layout.x0, layout.dx);
  fit(cy, layout.y0, layout.dy);
  return layout;
}

GeneratedDecoderPairs generate_decoder_pairs(const std::string& model_dir, const DemoTrainConfig& config,
                                             std::int64_t clips, std::uint64_t seed,
                                             const std::function<void(std::int64_t, std::int64_t)>& on_clip) {
  torch::NoGradGuard no_grad;
  WanT2VOptions options;  // CPU, f32: what `vdit generate` and `vdit eval shapes` run here
  WanT2VPipeline pipeline(locate_wan_model(model_dir), options);
  T2VSettings settings;
  settings.width = config.width;
  settings.height = config.height;
  settings.frames = config.frames;
  settings.steps = static_cast<int>(config.sample_steps);
  settings.guidance = config.sample_guidance;
  settings.shift = config.sample_shift;
  pipeline.validate(settings);
  // Every caption once, and "" (the unconditional caption the DiT was trained with).
  std::vector<std::string> prompts;
  for (const auto& c : shapes::Caption::all()) prompts.push_back(c.text());
  prompts.push_back("");
  const std::vector<at::Tensor> encoded = pipeline.encode_prompts(prompts);
  std::map<std::string, at::Tensor> contexts;
  for (std::size_t k = 0; k + 1 < prompts.size(); ++k) contexts[prompts[k]] = encoded[k];
  const at::Tensor null_context = encoded.back();
  const bool guided = settings.guidance != 1.0;

  std::mt19937_64 caption_rng(seed);
  std::vector<at::Tensor> latents, targets;
  GeneratedDecoderPairs pairs;
  const auto shape = t2v_latent_shape(settings, pipeline.latent_geometry());
  for (std::int64_t i = 0; i < clips; ++i) {
    const shapes::Caption caption = shapes::random_caption(caption_rng);
    const at::Tensor& context = contexts.at(caption.text());
    const at::Tensor latent = pipeline.denoise(seeded_noise(shape, seed + static_cast<std::uint64_t>(i)), context,
                                               guided ? null_context : context, settings);
    const at::Tensor video = pipeline.decode(latent);
    const shapes::Judgement judged = shapes::judge_clip(video);
    const std::optional<shapes::ClipLayout> layout =
        judged.ok && judged.objects == 1 ? layout_from_pixels(video, caption) : std::nullopt;
    if (layout) {
      latents.push_back(latent.to(at::kFloat).contiguous());
      targets.push_back(shapes::render_clip(caption, *layout, config.frames, config.width, config.height));
    } else {
      ++pairs.skipped;
    }
    if (on_clip) on_clip(i + 1, clips);
  }
  if (latents.empty()) throw RuntimeError("decoder pairs: none of the " + std::to_string(clips) + " generated clips showed one object");
  pairs.latents = at::stack(latents);
  pairs.targets = at::stack(targets);
  return pairs;
}

}  // namespace vdit::demo
