// The demo trainer's VAE stage: the training window and reconstruction loss, VAETrainer (first
// phase and decoder phase, the latter optionally on generated decoder pairs), the round-trip
// judge, the latent statistics and their folding into the VAE, and run_vae_stage.
#include "train_internal.h"

#include "vdit/common.h"
#include "vdit/demo/shapes.h"

#include <ATen/CPUGeneratorImpl.h>

#include <fstream>
#include <iomanip>
#include <sstream>
#include <tuple>

namespace vdit::demo {

using namespace detail;

namespace {

// Where a module's weights live (the CPU for one without parameters).
at::Device module_device(torch::nn::Module& m) {
  const auto params = m.parameters();
  return params.empty() ? at::Device(at::kCPU) : params.front().device();
}

// Training runs the VAE without latent normalisation (statistics are measured afterwards).
WanVAEConfig unnormalised(WanVAEConfig c) {
  c.latent_mean.assign(static_cast<std::size_t>(c.z_dim), 0.f);
  c.latent_std.assign(static_cast<std::size_t>(c.z_dim), 1.f);
  return c;
}

}  // namespace

at::Tensor vae_training_window(const at::Tensor& video, const DemoTrainConfig& config, std::mt19937_64& rng) {
  at::Tensor out = config.vae_frames > 0 ? video.narrow(2, 0, config.vae_frames) : video;
  const std::int64_t crop = config.vae_crop;
  const std::int64_t h = out.size(3), w = out.size(4);
  if (crop == 0 || (crop >= h && crop >= w)) return out.contiguous();
  // The object's centre in the middle kept frame (the frame centre if it has none).
  const at::Tensor mask = object_mask(out.narrow(2, out.size(2) / 2, 1)).squeeze(2).squeeze(1);  // [B, H, W]
  const auto [cy, cx] = mask_centres(mask, h / 2.0, w / 2.0);
  std::uniform_int_distribution<std::int64_t> jitter(-crop / 4, crop / 4);
  std::vector<at::Tensor> windows;
  for (std::int64_t b = 0; b < out.size(0); ++b) {
    const std::int64_t y0 = std::clamp<std::int64_t>(std::lround(cy[b].item<float>()) - crop / 2 + jitter(rng), 0, h - crop);
    const std::int64_t x0 = std::clamp<std::int64_t>(std::lround(cx[b].item<float>()) - crop / 2 + jitter(rng), 0, w - crop);
    windows.push_back(out[b].narrow(2, y0, crop).narrow(3, x0, crop));
  }
  return at::stack(windows).contiguous();
}

at::Tensor vae_reconstruction_loss(const at::Tensor& recon, const at::Tensor& video, const DemoTrainConfig& config) {
  // The object covers ~2 % of the frame: plain L1 is dominated by the flat background and
  // settles on a dim, smeared object (measured: a fixed 8x foreground weight plateaued at a
  // reconstruction that lost most colours). The object's region and the background's are
  // therefore averaged separately, and the object's mean counts vae_foreground_weight times.
  // The object's region is its mask dilated by vae_edge_margin pixels: with the bare mask, a
  // blurred halo around the object lands in the background's mean, where each pixel weighs ~50x
  // less, and the VAE learned round blobs (measured: shape judged at chance after 1200 steps).
  const at::Tensor object = object_mask(video);
  at::Tensor fg = object;
  if (config.vae_edge_margin > 0) {
    const std::int64_t k = 2 * config.vae_edge_margin + 1;
    fg = at::max_pool3d(fg, {1, k, k}, {1, 1, 1}, {0, config.vae_edge_margin, config.vae_edge_margin});
  }
  const at::Tensor region = fg;  // [B, 1, F, H, W]
  fg = fg.expand_as(video);
  const at::Tensor diff = recon - video;
  const at::Tensor err = diff.abs() + config.vae_object_mse_weight * diff.pow(2);
  const at::Tensor fg_loss = (err * fg).sum() / fg.sum().clamp_min(1.0);
  const at::Tensor bg_loss = (err * (1.0 - fg)).sum() / (1.0 - fg).sum().clamp_min(1.0);
  at::Tensor loss = bg_loss + config.vae_foreground_weight * fg_loss;
  if (config.vae_colour_weight > 0) {
    // Mean colour of the object per clip and frame [B, 3, F]; frames where it is absent count 0.
    const at::Tensor area = object.sum({3, 4});
    const at::Tensor present = (area > 0).to(at::kFloat);
    const at::Tensor mean_error = (diff * object).sum({3, 4}) / area.clamp_min(1.0);
    const at::Tensor colour_loss = (mean_error.abs() * present).sum() / (3.0 * present.sum().clamp_min(1.0));
    loss = loss + config.vae_colour_weight * colour_loss;
  }
  if (config.vae_gradient_weight > 0) {
    // Error of the horizontal and vertical pixel differences inside the object's region. A
    // rounded corner costs only a few pixels of |d|, but it changes the differences along both
    // edges next to it, so this term pulls the decoder towards the square's sharp outline
    // (measured: the round trip of 100 clips judged 14 of 29 squares circle with |d| + 2 d^2 alone).
    // diff(recon - video) along an axis is the difference of the two images' gradients there.
    at::Tensor error_sum = at::zeros({}, diff.options()), count = at::zeros({}, diff.options());
    for (std::int64_t dim : {3, 4}) {
      const std::int64_t n = diff.size(dim);
      if (n < 2) continue;
      const at::Tensor grad_error = diff.narrow(dim, 1, n - 1) - diff.narrow(dim, 0, n - 1);
      const at::Tensor inside = at::maximum(region.narrow(dim, 1, n - 1), region.narrow(dim, 0, n - 1)).expand_as(grad_error);
      error_sum = error_sum + (grad_error.abs() * inside).sum();
      count = count + inside.sum();
    }
    loss = loss + config.vae_gradient_weight * error_sum / count.clamp_min(1.0);
  }
  return loss;
}

VAETrainer::VAETrainer(const DemoTrainConfig& config, std::uint64_t seed, at::Device device)
    : config_(config), device_(device), data_rng_(seed), noise_gen_(at::make_generator<at::CPUGeneratorImpl>(seed + 1)) {
  torch::manual_seed(seed);
  vae_ = WanVAE(unnormalised(config.vae));
  vae_->train();
  {
    torch::NoGradGuard no_grad;
    const std::int64_t z = config.vae.z_dim;
    vae_->named_parameters()["conv1.bias"].narrow(0, z, z).fill_(config.vae_logvar_init);
  }
  vae_->to(device_);
  trained_ = vae_->parameters();
  if (config.vae_shape_probe_weight > 0) {
    // Drawn after the VAE's own initialisation, so the VAE starts as it does without a probe.
    probe_weight_ = (0.01 * torch::randn({shapes::kShapes, config.vae.z_dim})).to(device_).set_requires_grad(true);
    probe_bias_ = torch::zeros({shapes::kShapes}, at::device(device_)).set_requires_grad(true);
    trained_.push_back(probe_weight_);
    trained_.push_back(probe_bias_);
  }
  optimizer_ = std::make_unique<torch::optim::AdamW>(
      trained_, torch::optim::AdamWOptions(config.vae_lr).betas({0.9, 0.99}).weight_decay(0.0));
}

void VAETrainer::start_decoder_phase() {
  if (decoder_phase_) return;
  decoder_phase_ = true;
  trained_.clear();
  for (auto& item : vae_->named_parameters()) {
    const bool frozen = item.key().rfind("encoder.", 0) == 0 || item.key().rfind("conv1.", 0) == 0;
    item.value().set_requires_grad(!frozen);
    if (!frozen) trained_.push_back(item.value());
  }
  optimizer_ = std::make_unique<torch::optim::AdamW>(
      trained_, torch::optim::AdamWOptions(config_.vae_decoder_lr).betas({0.9, 0.99}).weight_decay(0.0));
  step_ = 0;
}

VAEStepResult VAETrainer::step(double lr_scale) {
  set_lr(*optimizer_, (decoder_phase_ ? config_.vae_decoder_lr : config_.vae_lr) * lr_scale);
  auto batch = shapes::random_batch(config_.vae_batch, config_.frames, config_.width, config_.height, data_rng_);
  DemoTrainConfig window = config_;
  if (decoder_phase_) window.vae_frames = config_.vae_decoder_frames;
  const at::Tensor video = vae_training_window(batch.video, window, data_rng_).to(device_);
  at::Tensor mu, logvar;
  {
    // The frozen encoder needs no graph: the decoder phase's backward stops at the latent.
    c10::AutoGradMode encoder_grad(!decoder_phase_);
    std::tie(mu, logvar) = vae_->encode_moments(video);
  }
  logvar = logvar.clamp(-30.0, 20.0);
  // Drawn on the CPU generator and copied: the same draws on every device.
  const at::Tensor eps = at::randn(mu.sizes(), noise_gen_, at::kFloat).to(device_);
  at::Tensor z = mu + at::exp(0.5 * logvar) * eps;
  if (config_.vae_latent_noise > 0) {
    const at::Tensor spread = mu.detach().std({0, 2, 3, 4}, /*unbiased=*/false, /*keepdim=*/true);
    z = z + config_.vae_latent_noise * spread * at::randn(mu.sizes(), noise_gen_, at::kFloat).to(device_);
  }
  const at::Tensor recon = vae_->decode_unclamped(z);
  at::Tensor recon_loss = vae_reconstruction_loss(recon, video, config_);
  if (decoder_phase_ && generated_latents_.defined() && config_.decoder_generated_batch > 0) {
    // The DiT's own latents, decoded towards the clips their captions ask for.
    std::uniform_int_distribution<std::int64_t> pick(0, generated_latents_.size(0) - 1);
    std::vector<std::int64_t> chosen;
    for (std::int64_t k = 0; k < config_.decoder_generated_batch; ++k) chosen.push_back(pick(data_rng_));
    // The same vae_crop window as the rendered clips (around the object in the middle frame, at a
    // random offset), cut on the latent grid: the decoder is convolutional, and whole 64x64 clips
    // made a step four times slower.
    const std::int64_t stride = vae_->config().spatial_stride();
    const std::int64_t lh = generated_latents_.size(3), lw = generated_latents_.size(4);
    const std::int64_t crop = config_.vae_crop / stride;
    std::vector<at::Tensor> latents, targets;
    for (const std::int64_t i : chosen) {
      at::Tensor latent = generated_latents_[i], target = generated_targets_[i];
      if (crop > 0 && (crop < lh || crop < lw)) {
        const auto [cy, cx] = generated_centres_[static_cast<std::size_t>(i)];
        std::uniform_int_distribution<std::int64_t> jitter(-crop / 4, crop / 4);
        const std::int64_t y0 = std::clamp<std::int64_t>(std::lround(cy / stride) - crop / 2 + jitter(data_rng_), 0, std::max<std::int64_t>(0, lh - crop));
        const std::int64_t x0 = std::clamp<std::int64_t>(std::lround(cx / stride) - crop / 2 + jitter(data_rng_), 0, std::max<std::int64_t>(0, lw - crop));
        const std::int64_t ch = std::min(crop, lh), cw = std::min(crop, lw);
        latent = latent.narrow(2, y0, ch).narrow(3, x0, cw);
        target = target.narrow(2, y0 * stride, ch * stride).narrow(3, x0 * stride, cw * stride);
      }
      latents.push_back(latent);
      targets.push_back(target);
    }
    const at::Tensor generated = vae_->decode_unclamped(at::stack(latents).contiguous());
    recon_loss = recon_loss + config_.decoder_generated_weight *
                                  vae_reconstruction_loss(generated, at::stack(targets).contiguous(), config_);
  }
  const at::Tensor kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean();
  // The KL term has no gradient in the decoder phase (the encoder is frozen); it is still reported.
  at::Tensor loss = decoder_phase_ ? recon_loss : recon_loss + config_.vae_kl_weight * kl;
  double probe_accuracy = -1;
  if (!decoder_phase_ && probe_weight_.defined()) {
    // Cross-entropy of the clip's shape, read linearly from every cell that holds the object.
    const at::Tensor cells = latent_object_cells(video, vae_->config().temporal_stride(), vae_->config().spatial_stride())
                                 .squeeze(1);  // [B, F', h, w]
    std::vector<std::int64_t> shape_ids;
    for (const auto& c : batch.captions) shape_ids.push_back(static_cast<std::int64_t>(c.shape));
    const at::Tensor labels = at::tensor(shape_ids, at::kLong).to(device_).view({-1, 1, 1, 1}).expand_as(cells);
    const std::int64_t z = mu.size(1);
    const at::Tensor logits =
        at::conv3d(mu, probe_weight_.view({shapes::kShapes, z, 1, 1, 1}), probe_bias_);  // [B, 3, F', h, w]
    const at::Tensor nll = -at::log_softmax(logits, 1).gather(1, labels.unsqueeze(1)).squeeze(1);
    const at::Tensor count = cells.sum().clamp_min(1.0);
    loss = loss + config_.vae_shape_probe_weight * (nll * cells).sum() / count;
    probe_accuracy = ((logits.argmax(1) == labels).to(at::kFloat) * cells).sum().item<double>() / count.item<double>();
  }
  optimizer_->zero_grad();
  loss.backward();
  if (config_.grad_clip > 0) torch::nn::utils::clip_grad_norm_(trained_, config_.grad_clip);
  optimizer_->step();
  ++step_;
  VAEStepResult r;
  r.loss = loss.item<double>();
  r.recon = (recon.detach() - video).abs().mean().item<double>();
  r.kl = kl.item<double>();
  r.probe_accuracy = probe_accuracy;
  return r;
}

void VAETrainer::save_state(const std::string& path) const {
  torch::serialize::OutputArchive ar, model, optim;
  vae_->save(model);
  optimizer_->save(optim);
  ar.write("model", model);
  ar.write("optim", optim);
  ar.write("step", at::tensor(step_));
  ar.write("decoder_phase", at::tensor(static_cast<std::int64_t>(decoder_phase_)));
  if (probe_weight_.defined()) {
    ar.write("probe_weight", probe_weight_.detach());
    ar.write("probe_bias", probe_bias_.detach());
  }
  write_rng(ar, data_rng_, noise_gen_);
  save_archive(ar, path);
}

void VAETrainer::load_state(const std::string& path) {
  torch::serialize::InputArchive ar, model, optim;
  ar.load_from(path);
  // States written before the decoder phase existed have no flag: they are first-phase states.
  at::Tensor flag;
  const bool saved_decoder_phase = ar.try_read("decoder_phase", flag) && flag.item<std::int64_t>() != 0;
  if (saved_decoder_phase != decoder_phase_)
    throw InputError(path + ": a " + (saved_decoder_phase ? "decoder-phase" : "first-phase") +
                     " VAE training state cannot resume the " + (decoder_phase_ ? "decoder phase" : "first phase"));
  ar.read("model", model);
  ar.read("optim", optim);
  vae_->load(model);
  vae_->to(device_);
  if (probe_weight_.defined() && !decoder_phase_) {
    at::Tensor w, b;
    if (!ar.try_read("probe_weight", w) || !ar.try_read("probe_bias", b))
      throw InputError(path + ": the state has no shape probe, but vae_shape_probe_weight is set");
    torch::NoGradGuard no_grad;
    probe_weight_.copy_(w);
    probe_bias_.copy_(b);
  }
  optimizer_->load(optim);
  move_adamw_state(*optimizer_, device_);
  step_ = read_int(ar, "step");
  read_rng(ar, data_rng_, noise_gen_);
}

void VAETrainer::load_weights(const std::string& path) {
  torch::serialize::InputArchive ar, model;
  ar.load_from(path);
  ar.read("model", model);
  vae_->load(model);
  vae_->to(device_);
}

void VAETrainer::load_finished_vae(WanVAE& finished, const std::string& source) {
  const WanVAEConfig& found = finished->config();
  const WanVAEConfig& want = config_.vae;
  if (found.dim != want.dim || found.z_dim != want.z_dim || found.dim_mult != want.dim_mult ||
      found.num_res_blocks != want.num_res_blocks || found.temporal_downsample != want.temporal_downsample)
    throw InputError(source + ": its VAE architecture differs from the training config's vae section");
  copy_parameters(*finished, *vae_);
}

void VAETrainer::set_generated_pairs(const GeneratedDecoderPairs& pairs) {
  if (!pairs.latents.defined() || pairs.latents.size(0) != pairs.targets.size(0) || pairs.latents.size(0) == 0)
    throw InputError("decoder pairs: latents and targets must be non-empty and of the same count");
  generated_latents_ = pairs.latents.to(device_);
  generated_targets_ = pairs.targets.to(device_);
  // The crop centres, once: bounding-box centre of the object in each target's middle frame (the
  // frame centre where it has none).
  generated_centres_.clear();
  const at::Tensor middle =
      object_mask(pairs.targets.narrow(2, pairs.targets.size(2) / 2, 1)).squeeze(2).squeeze(1);  // [N, H, W]
  for (std::int64_t i = 0; i < middle.size(0); ++i) {
    const at::Tensor ys = middle[i].any(1).nonzero(), xs = middle[i].any(0).nonzero();
    const double cy = ys.numel() ? 0.5 * (ys.min().item<std::int64_t>() + ys.max().item<std::int64_t>() + 1) : 0.5 * middle.size(1);
    const double cx = xs.numel() ? 0.5 * (xs.min().item<std::int64_t>() + xs.max().item<std::int64_t>() + 1) : 0.5 * middle.size(2);
    generated_centres_.emplace_back(cy, cx);
  }
}

shapes::JudgeSummary judge_round_trip(WanVAE& vae, const DemoTrainConfig& config, std::int64_t clips, std::uint64_t seed) {
  torch::NoGradGuard no_grad;
  std::mt19937_64 rng(seed);
  const at::Device device = module_device(*vae);
  shapes::JudgeSummary summary;
  for (std::int64_t done = 0; done < clips;) {
    const std::int64_t n = std::min<std::int64_t>(8, clips - done);
    // Stratified by colour (clip i has palette colour i mod 6): every check shows every colour,
    // which a 30-clip random draw does not.
    auto batch = shapes::random_batch(n, config.frames, config.width, config.height, rng,
                                      static_cast<int>(done % shapes::kColours));
    const at::Tensor mu = vae->encode_moments(batch.video.to(device)).first;
    const at::Tensor decoded = vae->decode_unclamped(mu).clamp(-1.0, 1.0).to(at::kCPU);
    for (std::int64_t i = 0; i < n; ++i) summary.add(batch.captions[i], shapes::judge_clip(decoded[i]));
    done += n;
  }
  return summary;
}

std::pair<std::vector<float>, std::vector<float>> measure_latent_stats(WanVAE& vae, const DemoTrainConfig& config,
                                                                      std::int64_t clips, std::uint64_t seed) {
  torch::NoGradGuard no_grad;
  std::mt19937_64 rng(seed);
  const std::int64_t z = vae->config().z_dim;
  const at::Device device = module_device(*vae);
  at::Tensor sum = at::zeros({z}, at::kDouble), sumsq = at::zeros({z}, at::kDouble);
  std::int64_t count = 0;
  for (std::int64_t done = 0; done < clips;) {
    const std::int64_t n = std::min<std::int64_t>(16, clips - done);
    auto batch = shapes::random_batch(n, config.frames, config.width, config.height, rng);
    const at::Tensor mu = vae->encode_moments(batch.video.to(device)).first.to(at::kCPU, at::kDouble);
    sum += mu.sum({0, 2, 3, 4});
    sumsq += mu.pow(2).sum({0, 2, 3, 4});
    count += mu.numel() / z;
    done += n;
  }
  const at::Tensor mean = sum / static_cast<double>(count);
  const at::Tensor var = (sumsq / static_cast<double>(count) - mean.pow(2)).clamp_min(1e-12);
  const at::Tensor mf = mean.to(at::kFloat).contiguous(), sf = var.sqrt().to(at::kFloat).contiguous();
  return {std::vector<float>(mf.data_ptr<float>(), mf.data_ptr<float>() + z),
          std::vector<float>(sf.data_ptr<float>(), sf.data_ptr<float>() + z)};
}

void fold_latent_stats(WanVAE& vae, const std::vector<float>& mean, const std::vector<float>& std) {
  const auto& cfg = vae->config();
  const std::int64_t z = cfg.z_dim;
  if (static_cast<std::int64_t>(mean.size()) != z || static_cast<std::int64_t>(std.size()) != z)
    throw InputError("fold_latent_stats: statistics need z_dim entries");
  torch::NoGradGuard no_grad;
  auto params = vae->named_parameters();
  at::Tensor w1 = params["conv1.weight"], b1 = params["conv1.bias"];  // [2z, 2z, 1,1,1], [2z]
  at::Tensor w2 = params["conv2.weight"], b2 = params["conv2.bias"];  // [z, z, 1,1,1], [z]
  const at::Tensor m = at::tensor(mean).to(at::kDouble), s = at::tensor(std).to(at::kDouble);
  const at::Tensor M = at::tensor(cfg.latent_mean).to(at::kDouble), S = at::tensor(cfg.latent_std).to(at::kDouble);
  const at::Tensor ratio = S / s;  // new raw mu = M + (S/s) (mu - m)
  // Encoder side: scale and shift the mu rows; the log-variance rows move by 2 log(S/s) so the
  // posterior keeps its width relative to the mean.
  at::Tensor w1d = w1.to(at::kDouble), b1d = b1.to(at::kDouble);
  w1d.narrow(0, 0, z).mul_(ratio.view({z, 1, 1, 1, 1}));
  b1d.narrow(0, 0, z).sub_(m).mul_(ratio).add_(M);
  b1d.narrow(0, z, z).add_(2.0 * ratio.log());
  // Decoder side: conv2 receives the new raw mu; mu = m + (s/S)(mu' - M).
  at::Tensor w2d = w2.to(at::kDouble), b2d = b2.to(at::kDouble);
  const at::Tensor w2flat = w2d.view({z, z});
  const at::Tensor shift = at::mv(w2flat, m - M / ratio);
  b2d.add_(shift);
  w2d.mul_((1.0 / ratio).view({1, z, 1, 1, 1}));
  w1.copy_(w1d);
  b1.copy_(b1d);
  w2.copy_(w2d);
  b2.copy_(b2d);
}

// ---- the stages ---------------------------------------------------------------------------------

namespace {

std::string round_trip_line(WanVAE& vae, const DemoTrainConfig& config) {
  // Fixed seed: every check scores the same clips, so the numbers are comparable across steps.
  const shapes::JudgeSummary s = judge_round_trip(vae, config, config.vae_validate_clips, config.seed * 1000 + 9);
  auto pct = [&](int right) {
    std::ostringstream o;
    o << std::fixed << std::setprecision(0) << 100.0 * s.accuracy(right) << "%";
    return o.str();
  };
  return "colour " + pct(s.colour_right) + " shape " + pct(s.shape_right) + " motion " + pct(s.motion_right) + " all " +
         pct(s.all_right) + " (" + std::to_string(s.clips) + " clips, " + std::to_string(s.no_object) + " without object)";
}

// Warm-up over warmup steps, then a cosine from 1 to 0.1 over the budget (steps or minutes): the
// last steps refine instead of jittering.
double warmup_cosine(const Budget& budget, std::int64_t step, double elapsed, std::int64_t warmup) {
  const double warm = std::min(1.0, (step + 1) / static_cast<double>(warmup));
  return warm * cosine_decay(budget.fraction(step, elapsed), 0.1);
}

}  // namespace

namespace detail {

// The first phase (windowed, whole VAE) and the decoder phase (frozen encoder, whole clips); the
// "vae-decoder" stage runs only the latter, from the first phase's final state.
void run_vae_stage(const DemoTrainConfig& config, const DemoTrainOptions& options, bool decoder_only) {
  const fs::path root(options.out_dir), state_dir = root / "train-state";
  const std::string state = (state_dir / "vae.pt").string(), decoder_state = (state_dir / "vae-decoder.pt").string();
  const bool decoder_phase = config.vae_decoder_steps > 0 || config.vae_decoder_minutes > 0;
  if (decoder_only && !decoder_phase)
    throw InputError("train-demo: the vae-decoder stage needs vae_decoder_steps or vae_decoder_minutes above 0");
  const bool resume_decoder = options.resume && decoder_phase && fs::exists(decoder_state);
  VAETrainer trainer(config, config.seed * 1000 + 1, options.device);
  if (!options.device.is_cpu()) log_info("vae: training on " + options.device.str() + " (f32)");
  // One phase: resume from its state file when asked, train to its budget (the elapsed time rides
  // along so a minutes budget counts over resumed runs), log the result.
  auto train_phase = [&](const std::string& name, const std::string& state_path, const Budget& budget,
                         std::int64_t warmup, bool resume) {
    const fs::path elapsed_path = fs::path(state_path).replace_extension(".elapsed");
    double elapsed = 0;
    if (resume) {
      trainer.load_state(state_path);
      std::ifstream in(elapsed_path);
      if (in) in >> elapsed;
      log_info(name + ": resuming at step " + std::to_string(trainer.steps_done()));
    }
    auto save = [&] {
      trainer.save_state(state_path);
      std::ofstream(elapsed_path) << std::setprecision(17) << elapsed;
    };
    const double avg = run_budget(name, "L1", budget, trainer, elapsed, config.checkpoint_minutes, options.quiet_progress,
                                  [&] {
                                    const VAEStepResult r =
                                        trainer.step(warmup_cosine(budget, trainer.steps_done(), elapsed, warmup));
                                    if (config.vae_validate_every > 0 && trainer.steps_done() % config.vae_validate_every == 0)
                                      log_info(name + ": step " + std::to_string(trainer.steps_done()) + " round trip " +
                                               round_trip_line(trainer.vae(), config));
                                    return std::make_pair(r.recon, " kl " + fmt(r.kl, 3) +
                                                                       (r.probe_accuracy >= 0 ? " probe " + fmt(r.probe_accuracy, 2) : std::string()));
                                  },
                                  save);
    log_info(name + ": " + std::to_string(trainer.steps_done()) + " steps, " + format_duration(elapsed) + ", L1 " + fmt(avg));
    log_info(name + ": round trip " + round_trip_line(trainer.vae(), config));
  };

  const bool from_model = !options.decoder_from.empty();
  if (from_model && !resume_decoder) {
    WanVAE finished = load_trained_vae(options.decoder_from);
    trainer.load_finished_vae(finished, options.decoder_from);
    log_info("vae decoder: starting from " + options.decoder_from + "/vae, round trip " +
             round_trip_line(trainer.vae(), config));
  } else if (!decoder_only && !resume_decoder) {
    train_phase("vae", state, Budget{config.vae_steps, config.vae_minutes}, 100, options.resume && fs::exists(state));
  } else if (!resume_decoder) {
    if (!fs::exists(state)) throw InputError(state + " is missing: run the vae stage first");
    trainer.load_weights(state);
  }

  if (config.decoder_generated_clips > 0) {
    if (!from_model && !resume_decoder)
      throw InputError("train-demo: decoder_generated_clips needs --decoder-from MODEL, a finished model with its DiT");
    // Saved with the train-state, so a resumed decoder phase trains on the same pairs.
    const std::string pairs_path = (state_dir / "decoder-generated.pt").string();
    GeneratedDecoderPairs pairs;
    if (resume_decoder && fs::exists(pairs_path)) {
      torch::serialize::InputArchive ar;
      ar.load_from(pairs_path);
      ar.read("latents", pairs.latents);
      ar.read("targets", pairs.targets);
    } else {
      if (!from_model) throw InputError(pairs_path + " is missing: start the decoder phase again with --decoder-from");
      const auto t0 = Clock::now();
      ProgressBar bar("generate decoder pairs", config.decoder_generated_clips);
      pairs = generate_decoder_pairs(options.decoder_from, config, config.decoder_generated_clips, config.seed * 1000 + 50000,
                                     [&](std::int64_t done, std::int64_t) {
                                       if (!options.quiet_progress) bar.update(done);
                                     });
      bar.finish();
      torch::serialize::OutputArchive ar;
      ar.write("latents", pairs.latents);
      ar.write("targets", pairs.targets);
      save_archive(ar, pairs_path);
      log_info("vae decoder: " + std::to_string(pairs.latents.size(0)) + " generated pairs (" +
               std::to_string(pairs.skipped) + " clips without exactly one object skipped) in " +
               format_duration(seconds_since(t0)));
    }
    trainer.set_generated_pairs(pairs);
  }
  if (decoder_phase) {
    trainer.start_decoder_phase();
    train_phase("vae decoder", decoder_state, Budget{config.vae_decoder_steps, config.vae_decoder_minutes}, 20,
                resume_decoder);
  }

  // Normalise the latent: measure, fold into the 1x1x1 convolutions, write the final VAE. The
  // decoder phase leaves the encoder as it was, so the statistics (same clips) and with them the
  // latents a DiT was trained on stay the same.
  WanVAEConfig final_config = config.vae;  // published latent statistics
  WanVAE final_vae(final_config);
  copy_parameters(*trainer.vae(), *final_vae);
  if (!from_model) {  // a finished model's VAE has its statistics folded in already
    auto [mean, std] = measure_latent_stats(trainer.vae(), config, config.vae_stats_clips, config.seed * 1000 + 7);
    fold_latent_stats(final_vae, mean, std);
  }
  final_vae->eval();
  write_vae(root, final_vae);
  log_info("vae: written to " + (root / "vae").string());
}

}  // namespace detail

}  // namespace vdit::demo
