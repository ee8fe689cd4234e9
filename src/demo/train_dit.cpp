// The demo trainer's DiT stage: the latent object masks and the flow-matching loss, the optional
// pixel term, DiTTrainer (latent pool, bf16 autocast, EMA), the frozen caption contexts, snapshots,
// and run_dit_stage.
#include "train_internal.h"

#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/io/checkpoint.h"
#include "vdit/models/tokenizer.h"
#include "vdit/models/wan_checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include <cstdio>
#include <fstream>
#include <iomanip>
#include <tuple>

namespace vdit::demo {

using namespace detail;

namespace {

// Sample-predicting DiT: sigmas below this count as this in the velocity loss (the weight of an x0
// error is 1 / sigma^2 there, which would otherwise grow without bound as sigma -> 0).
constexpr double kSamplePredictionLossMinSigma = 0.05;

// Index of a caption in Caption::all() (the order the frozen text contexts are stored in).
std::int64_t caption_index(const shapes::Caption& c) {
  static const std::vector<shapes::Caption> all = shapes::Caption::all();
  for (std::size_t i = 0; i < all.size(); ++i)
    if (all[i] == c) return static_cast<std::int64_t>(i);
  throw RuntimeError("caption '" + c.text() + "' is not in Caption::all()");
}

// RAII: CPU bf16 autocast for the DiT forward when the config asks for it.
struct AutocastScope {
  explicit AutocastScope(bool on) : on_(on) {
    if (!on_) return;
    prev_enabled_ = at::autocast::is_cpu_enabled();
    prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  }
  ~AutocastScope() {
    if (!on_) return;
    at::autocast::set_cpu_enabled(prev_enabled_);
    at::autocast::set_autocast_cpu_dtype(prev_dtype_);
    at::autocast::clear_cache();
  }
  bool on_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

// The frozen contexts of the 90 captions and of "" (the demo's negative prompt), computed with
// the same TextEncoder the pipeline uses.
std::pair<std::vector<at::Tensor>, at::Tensor> caption_contexts(UMT5Encoder t5, const WanTokenizer& tokenizer) {
  TextEncoder encoder(std::move(t5), tokenizer);
  std::vector<std::string> prompts = caption_corpus();
  prompts.push_back("");
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> out = encoder.encode(prompts);
  for (auto& t : out) t = t.detach().clone();
  at::Tensor null = out.back();
  out.pop_back();
  return {out, null};
}

// A finished model's DiT from DIR/transformer (diffusers config.json and weights), which the DiT
// stage writes; the counterpart of load_trained_vae.
WanDiT load_trained_dit(const fs::path& dir) {
  const fs::path config_path = dir / "transformer" / "config.json";
  const std::string path = (dir / "transformer" / "diffusion_pytorch_model.safetensors").string();
  if (!fs::exists(config_path) || !fs::exists(path))
    throw InputError((dir / "transformer").string() + " has no config.json and diffusion_pytorch_model.safetensors");
  WanDiT dit(WanDiTConfig::from_json(read_json(config_path.string())));
  load_wan_dit_weights(dit, {WeightFile::open(path)}, at::kFloat);
  return dit;
}

// OUT/snapshots/step-NNNNNN: a complete model directory with the EMA DiT of that step and OUT's
// other parts (written before the DiT stage starts), for judging a run's progress afterwards.
void write_dit_snapshot(const fs::path& root, const DemoTrainConfig& config, WanDiT& ema, std::int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%06lld", static_cast<long long>(step));
  const fs::path dir = root / "snapshots" / name;
  fs::create_directories(dir);
  for (const char* part : {"text_encoder", "tokenizer", "vae"})
    fs::copy(root / part, dir / part, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  write_transformer(dir, ema);
  write_pipeline_files(dir, config);
  log_info("dit: step " + std::to_string(step) + " snapshot written to " + dir.string());
}

}  // namespace

at::Tensor latent_object_cells(const at::Tensor& video, std::int64_t temporal_stride, std::int64_t spatial_stride) {
  if (video.dim() != 5 || video.size(1) != 3) throw InputError("latent object cells: clips must be [B, 3, F, H, W]");
  at::Tensor mask = object_mask(video);  // [B, 1, F, H, W]
  // Repeat frame 0 so that each later latent frame pools exactly its own temporal_stride frames.
  if (temporal_stride > 1) mask = at::cat({mask.narrow(2, 0, 1).expand({-1, -1, temporal_stride - 1, -1, -1}), mask}, 2);
  return at::max_pool3d(mask, {temporal_stride, spatial_stride, spatial_stride}, {temporal_stride, spatial_stride, spatial_stride});
}

at::Tensor latent_object_mask(const at::Tensor& video, std::int64_t temporal_stride, std::int64_t spatial_stride) {
  return at::max_pool3d(latent_object_cells(video, temporal_stride, spatial_stride), {1, 3, 3}, {1, 1, 1}, {0, 1, 1});
}

at::Tensor dit_flow_loss(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask, double object_weight) {
  const at::Tensor err = (pred - target).pow(2);
  if (object_weight == 0) return err.mean();
  const at::Tensor w = (1.0 + object_weight * mask).expand_as(err);
  return (w * err).mean() / w.mean();
}

std::vector<at::Tensor> crop_latents_around_object(const std::vector<at::Tensor>& latents, const at::Tensor& mask,
                                                   std::int64_t crop) {
  if (mask.dim() != 5) throw InputError("crop around object: mask must be [B, 1, F', h, w]");
  const std::int64_t B = mask.size(0), h = mask.size(3), w = mask.size(4);
  if (crop < 1 || crop > h || crop > w) throw InputError("crop around object: crop must be in [1, min(h, w)]");
  // Per clip: the mean row and column of the object's cells over all latent frames.
  const auto [cy, cx] = mask_centres((mask > 0).to(at::kFloat).sum({1, 2}).cpu(), (h - 1) / 2.0, (w - 1) / 2.0);
  std::vector<std::vector<at::Tensor>> parts(latents.size());
  for (std::int64_t b = 0; b < B; ++b) {
    // The window's first cell so that its centre (crop - 1) / 2 lands on the object's centre.
    const std::int64_t y0 = std::clamp<std::int64_t>(std::lround(cy[b].item<float>() - (crop - 1) / 2.0), 0, h - crop);
    const std::int64_t x0 = std::clamp<std::int64_t>(std::lround(cx[b].item<float>() - (crop - 1) / 2.0), 0, w - crop);
    for (std::size_t k = 0; k < latents.size(); ++k)
      parts[k].push_back(latents[k].narrow(0, b, 1).narrow(3, y0, crop).narrow(4, x0, crop));
  }
  std::vector<at::Tensor> out;
  for (auto& p : parts) out.push_back(at::cat(p, 0));
  return out;
}

at::Tensor dit_pixel_loss(WanVAE& vae, const at::Tensor& x0_pred, const at::Tensor& x0) {
  at::Tensor target;
  {
    torch::NoGradGuard no_grad;
    target = vae->decode_unclamped(x0);
  }
  // Both unclamped: the loss is zero exactly when the latents are, and an overshoot past the
  // colour range still has a gradient back.
  const at::Tensor d = vae->decode_unclamped(x0_pred) - target;
  return (d.abs() + 2.0 * d.pow(2)).mean();
}

std::pair<at::Tensor, at::Tensor> sample_prediction_velocities(const at::Tensor& x0_pred, const at::Tensor& x0,
                                                               const at::Tensor& noisy, const at::Tensor& sigma) {
  // The floor keeps the lowest-noise samples from dominating: an x0 error weighs 1 / s^2.
  const at::Tensor s = sigma.clamp_min(kSamplePredictionLossMinSigma);
  return {(noisy - x0_pred) / s, (noisy - x0) / s};
}

// ---- DiT ----------------------------------------------------------------------------------------

double cosine_decay(double done, double final_fraction) {
  return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + std::cos(M_PI * std::clamp(done, 0.0, 1.0)));
}

bool cpu_bf16_gemm_is_faster() {
  static const bool faster = [] {
    // The FFN's first GEMM at a 1024-token slice: [1024, 128] x [128, 512]. Best of 3 after a
    // warm-up, so one-off costs (oneDNN's kernel generation) do not count.
    auto best_seconds = [](at::ScalarType dtype) {
      const at::Tensor a = at::randn({1024, 128}).to(dtype), b = at::randn({128, 512}).to(dtype);
      at::mm(a, b);
      double best = 1e30;
      for (int r = 0; r < 3; ++r) {
        const auto t0 = Clock::now();
        at::mm(a, b);
        best = std::min(best, seconds_since(t0));
      }
      return best;
    };
    const double f32 = best_seconds(at::kFloat), bf16 = best_seconds(at::kBFloat16);
    const double gflop = 2.0 * 1024 * 128 * 512 / 1e9;
    log_info("bf16 autocast " + std::string(bf16 < f32 ? "on" : "off") + ": bf16 GEMM " + fmt(gflop / bf16) +
             " GFLOP/s, f32 " + fmt(gflop / f32) + " GFLOP/s on this CPU");
    return bf16 < f32;
  }();
  return faster;
}

DiTTrainer::DiTTrainer(const DemoTrainConfig& config, WanVAE vae, std::vector<at::Tensor> contexts,
                       at::Tensor null_context, std::uint64_t seed, at::Device device)
    : config_(config),
      device_(device),
      vae_(std::move(vae)),
      contexts_(std::move(contexts)),
      null_context_(std::move(null_context)),
      data_rng_(seed),
      noise_gen_(at::make_generator<at::CPUGeneratorImpl>(seed + 1)) {
  if (contexts_.size() != shapes::Caption::all().size())
    throw InputError("DiT trainer: need one text context per caption");
  for (const auto& c : contexts_)
    if (c.size(0) > config_.dit.text_len)
      throw InputError("DiT trainer: a caption has " + std::to_string(c.size(0)) + " tokens, more than text_len " +
                       std::to_string(config_.dit.text_len));
  vae_->eval();
  for (auto& p : vae_->parameters()) p.set_requires_grad(false);
  vae_->to(device_);
  for (auto& c : contexts_) c = c.to(device_);
  null_context_ = null_context_.to(device_);
  // Autocast calls LibTorch's bf16 GEMMs directly, so "auto" also refuses a CPU where they would
  // sum in bf16 (common.h: cpu_gemm_needs_widening); "on" is obeyed with a warning there.
  const bool bf16_sums_in_f32 = !cpu_gemm_needs_widening(at::kBFloat16);
  // CPU autocast only: on a GPU the DiT trains in f32 (CUDA autocast is not wired up; at the
  // demo's sizes an H200 already ran 16.6 f32 steps/s at batch 128).
  bf16_autocast_ = device_.is_cpu() &&
                   (config_.bf16_autocast == DemoTrainConfig::Bf16Autocast::On ||
                    (config_.bf16_autocast == DemoTrainConfig::Bf16Autocast::Auto && bf16_sums_in_f32 &&
                     cpu_bf16_gemm_is_faster()));
  if (bf16_autocast_ && !bf16_sums_in_f32)
    log_warning("dit: bf16 autocast on a CPU where LibTorch's bf16 GEMM sums in bf16: gradients lose most digits");
  torch::manual_seed(seed);
  dit_ = WanDiT(config_.dit);
  dit_->reset_parameters();
  dit_->train();
  // f32 RoPE while training (see WanDiTImpl::rope_dtype); the exported weights are dtype-free.
  dit_->rope_dtype = at::kFloat;
  ema_ = WanDiT(config_.dit);
  copy_parameters(*dit_, *ema_);
  dit_->to(device_);
  ema_->to(device_);
  ema_->eval();
  for (auto& p : ema_->parameters()) p.set_requires_grad(false);
  optimizer_ = std::make_unique<torch::optim::AdamW>(
      dit_->parameters(),
      torch::optim::AdamWOptions(config_.dit_lr).betas({0.9, 0.99}).weight_decay(config_.dit_weight_decay));
}

void DiTTrainer::refresh(std::int64_t count) {
  torch::NoGradGuard no_grad;
  const std::int64_t n = pool_.size(0);
  for (std::int64_t done = 0; done < count;) {
    const std::int64_t k = std::min<std::int64_t>({16, count - done, n - pool_cursor_});
    auto batch = shapes::random_batch(k, config_.frames, config_.width, config_.height, data_rng_);
    const at::Tensor video = batch.video.to(device_);
    pool_.narrow(0, pool_cursor_, k).copy_(vae_->encode(video));
    pool_mask_.narrow(0, pool_cursor_, k)
        .copy_(latent_object_mask(video, vae_->config().temporal_stride(), vae_->config().spatial_stride()));
    for (std::int64_t i = 0; i < k; ++i) pool_caption_[pool_cursor_ + i] = caption_index(batch.captions[i]);
    pool_cursor_ = (pool_cursor_ + k) % n;
    done += k;
  }
}

void DiTTrainer::fill_pool(const std::function<void(std::int64_t, std::int64_t)>& progress) {
  if (pool_.defined()) return;
  const std::int64_t n = config_.pool_size;
  const std::int64_t f = (config_.frames - 1) / vae_->config().temporal_stride() + 1;
  const std::int64_t s = vae_->config().spatial_stride();
  pool_ = at::zeros({n, vae_->config().z_dim, f, config_.height / s, config_.width / s}, at::device(device_));
  pool_mask_ = at::zeros({n, 1, f, config_.height / s, config_.width / s}, at::device(device_).dtype(at::kByte));
  pool_caption_.assign(static_cast<std::size_t>(n), 0);
  pool_cursor_ = 0;
  for (std::int64_t done = 0; done < n;) {
    const std::int64_t k = std::min<std::int64_t>(64, n - done);
    refresh(k);
    done += k;
    if (progress) progress(done, n);
  }
}

at::Tensor DiTTrainer::contexts_for(const std::vector<std::int64_t>& caption_index, const std::vector<bool>& dropped) const {
  std::vector<at::Tensor> rows;
  for (std::size_t i = 0; i < caption_index.size(); ++i) {
    const at::Tensor& c = dropped[i] ? null_context_ : contexts_[static_cast<std::size_t>(caption_index[i])];
    // Zero rows up to text_len, exactly what WanDiT::encode_text does to the pipeline's context.
    rows.push_back(at::constant_pad_nd(c, {0, 0, 0, config_.dit.text_len - c.size(0)}, 0.0));
  }
  return at::stack(rows);
}

DiTStepResult DiTTrainer::step(double lr_scale) {
  if (!pool_.defined()) fill_pool();
  const std::int64_t B = config_.dit_batch, n = pool_.size(0);
  std::uniform_int_distribution<std::int64_t> pick(0, n - 1);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  std::vector<std::int64_t> idx(B), cap(B);
  std::vector<bool> dropped(B);
  for (std::int64_t i = 0; i < B; ++i) {
    idx[i] = pick(data_rng_);
    cap[i] = pool_caption_[idx[i]];
    dropped[i] = coin(data_rng_) < config_.caption_dropout;
  }
  const at::Tensor index = at::tensor(idx).to(device_);
  const at::Tensor x0 = pool_.index_select(0, index);
  // Drawn on the CPU generator and copied: the same draws on every device.
  const at::Tensor eps = at::randn(x0.sizes(), noise_gen_, at::kFloat).to(device_);
  // sigma = shift*u / (1 + (shift-1) u), u uniform: the density of the sampler's shifted schedule
  // at inference, so training effort goes where sampling spends its steps (high noise).
  const at::Tensor u = at::rand({B}, noise_gen_, at::kFloat).to(device_);
  const at::Tensor sigma = config_.flow_shift * u / (1.0 + (config_.flow_shift - 1.0) * u);
  const at::Tensor sv = sigma.view({B, 1, 1, 1, 1});
  const at::Tensor xt = (1.0 - sv) * x0 + sv * eps;
  const at::Tensor target = eps - x0;
  const at::Tensor t = sigma * 1000.0;
  const at::Tensor ctx = contexts_for(cap, dropped);

  // Linear warm-up, then the stage's schedule (constant in the shipped recipe: the EMA does the
  // late-training smoothing).
  const double lr = config_.dit_lr * lr_scale *
                    std::min(1.0, static_cast<double>(step_ + 1) / std::max<std::int64_t>(1, config_.dit_warmup));
  set_lr(*optimizer_, lr);
  at::Tensor pred;
  {
    AutocastScope autocast(bf16_autocast_);
    WanTextCondition cond = dit_->encode_text(ctx);
    pred = dit_->forward(xt, t, cond);
  }
  at::Tensor velocity = pred.to(at::kFloat), velocity_target = target;
  if (config_.dit_prediction == "sample") std::tie(velocity, velocity_target) = sample_prediction_velocities(velocity, x0, xt, sv);
  const at::Tensor mask = pool_mask_.index_select(0, index);
  at::Tensor loss = dit_flow_loss(velocity, velocity_target, mask.to(at::kFloat), config_.dit_object_weight);
  double pixel_loss = 0;
  if (config_.dit_pixel_weight > 0 && config_.dit_pixel_samples > 0) {
    // The first dit_pixel_samples clips below the sigma bound (the batch is already random).
    const at::Tensor sigma_cpu = sigma.cpu();
    std::vector<std::int64_t> chosen;
    for (std::int64_t i = 0; i < B && static_cast<std::int64_t>(chosen.size()) < config_.dit_pixel_samples; ++i)
      if (sigma_cpu[i].item<float>() < config_.dit_pixel_max_sigma) chosen.push_back(i);
    if (!chosen.empty()) {
      const at::Tensor sel = at::tensor(chosen).to(device_);
      // x0^ = x_sigma - sigma v^ (for a sample-predicting DiT, its output).
      const at::Tensor x0_pred = config_.dit_prediction == "sample"
                                     ? pred.to(at::kFloat).index_select(0, sel)
                                     : xt.index_select(0, sel) - sv.index_select(0, sel) * velocity.index_select(0, sel);
      const auto crops = crop_latents_around_object({x0_pred, x0.index_select(0, sel)}, mask.index_select(0, sel),
                                                    config_.dit_pixel_crop);
      const at::Tensor pixel = dit_pixel_loss(vae_, crops[0], crops[1]);
      loss = loss + config_.dit_pixel_weight * pixel;
      pixel_loss = pixel.item<double>();
    }
  }
  optimizer_->zero_grad();
  loss.backward();
  if (config_.grad_clip > 0) torch::nn::utils::clip_grad_norm_(dit_->parameters(), config_.grad_clip);
  optimizer_->step();
  ++step_;
  {
    // EMA with the usual warm-up (short runs are not dominated by the random initialisation).
    torch::NoGradGuard no_grad;
    const double d = std::min(config_.ema_decay, (1.0 + step_) / (10.0 + step_));
    auto live = dit_->named_parameters();
    for (auto& p : ema_->named_parameters()) p.value().mul_(d).add_(live[p.key()].detach(), 1.0 - d);
  }
  if (config_.pool_refresh > 0) refresh(config_.pool_refresh);
  return {loss.item<double>(), pixel_loss};
}

void DiTTrainer::load_finished_dit(WanDiT& finished, const std::string& source) {
  if (finished->config != config_.dit)
    throw InputError(source + ": its DiT architecture differs from the training config's dit section");
  copy_parameters(*finished, *dit_);
  copy_parameters(*finished, *ema_);
}

void DiTTrainer::save_state(const std::string& path) const {
  torch::serialize::OutputArchive ar, model, ema, optim;
  dit_->save(model);
  ema_->save(ema);
  optimizer_->save(optim);
  ar.write("model", model);
  ar.write("ema", ema);
  ar.write("optim", optim);
  ar.write("step", at::tensor(step_));
  if (pool_.defined()) {
    ar.write("pool", pool_);
    ar.write("pool_caption", at::tensor(pool_caption_));
    ar.write("pool_cursor", at::tensor(pool_cursor_));
    ar.write("pool_mask", pool_mask_);
  }
  write_rng(ar, data_rng_, noise_gen_);
  save_archive(ar, path);
}

void DiTTrainer::load_state(const std::string& path) {
  torch::serialize::InputArchive ar, model, ema, optim;
  ar.load_from(path);
  ar.read("model", model);
  ar.read("ema", ema);
  ar.read("optim", optim);
  dit_->load(model);
  ema_->load(ema);
  // The archive keeps the device each tensor was saved from; a state resumes on any device.
  dit_->to(device_);
  ema_->to(device_);
  optimizer_->load(optim);
  move_adamw_state(*optimizer_, device_);
  step_ = read_int(ar, "step");
  at::Tensor pool;
  if (ar.try_read("pool", pool)) {
    pool_ = pool.to(device_);
    at::Tensor caps;
    ar.read("pool_caption", caps);
    caps = caps.contiguous();
    pool_caption_.assign(caps.data_ptr<std::int64_t>(), caps.data_ptr<std::int64_t>() + caps.numel());
    pool_cursor_ = read_int(ar, "pool_cursor");
    if (ar.try_read("pool_mask", pool_mask_)) {
      pool_mask_ = pool_mask_.to(device_);
    } else {
      // A state from before the object weighting: its clips count as all background until refreshed.
      pool_mask_ = at::zeros({pool_.size(0), 1, pool_.size(2), pool_.size(3), pool_.size(4)}, at::device(device_).dtype(at::kByte));
      if (config_.dit_object_weight > 0) log_warning("dit: resumed pool has no object masks; weighting starts as pool clips are refreshed");
    }
  }
  read_rng(ar, data_rng_, noise_gen_);
}

namespace detail {

void run_dit_stage(const DemoTrainConfig& config, const DemoTrainOptions& options) {
  const fs::path root(options.out_dir), state_dir = root / "train-state";
  const std::string tokenizer_path = (root / "tokenizer" / "spiece.model").string();
  if (!fs::exists(tokenizer_path)) throw InputError(tokenizer_path + " is missing: run the tokenizer stage first");
  WanTokenizer tokenizer = WanTokenizer::from_file(tokenizer_path);
  UMT5Encoder t5 = make_text_encoder(config, tokenizer.vocab_size());
  write_text_encoder(root, t5, tokenizer_path);
  auto [contexts, null_context] = caption_contexts(t5, tokenizer);
  WanVAE vae = load_trained_vae(root);

  DiTTrainer trainer(config, vae, contexts, null_context, config.seed * 1000 + 2, options.device);
  if (!options.device.is_cpu()) log_info("dit: training on " + options.device.str() + " (f32)");
  const std::string state = (state_dir / "dit.pt").string();
  double elapsed = 0;
  if (options.resume && fs::exists(state)) {
    trainer.load_state(state);
    std::ifstream in(state_dir / "dit.elapsed");
    if (in) in >> elapsed;
    log_info("dit: resuming at step " + std::to_string(trainer.steps_done()));
  } else if (!options.dit_from.empty()) {
    WanDiT finished = load_trained_dit(options.dit_from);
    trainer.load_finished_dit(finished, options.dit_from);
    log_info("dit: starting from " + options.dit_from + "/transformer");
  }
  {
    const auto t0 = Clock::now();
    ProgressBar pool_bar("encode latent pool", config.pool_size);
    trainer.fill_pool([&](std::int64_t done, std::int64_t) {
      if (!options.quiet_progress) pool_bar.update(done);
    });
    pool_bar.finish();
    log_info("dit: latent pool of " + std::to_string(config.pool_size) + " clips encoded in " +
             format_duration(seconds_since(t0)) + " (not counted in the training budget)");
  }
  const Budget budget{config.dit_steps, config.dit_minutes};
  auto save = [&] {
    trainer.save_state(state);
    std::ofstream(state_dir / "dit.elapsed") << std::setprecision(17) << elapsed;
  };
  const double avg = run_budget("dit", "loss", budget, trainer, elapsed, config.checkpoint_minutes, options.quiet_progress,
                                [&] {
                                  // dit_lr_final 1 (the shipped recipe) makes this exactly 1.
                                  const double scale = cosine_decay(budget.fraction(trainer.steps_done(), elapsed), config.dit_lr_final);
                                  const DiTStepResult r = trainer.step(scale);
                                  if (config.dit_snapshot_every > 0 && trainer.steps_done() % config.dit_snapshot_every == 0)
                                    write_dit_snapshot(root, config, trainer.ema(), trainer.steps_done());
                                  return std::make_pair(r.loss, config.dit_pixel_weight > 0 ? " pixel " + fmt(r.pixel_loss) : std::string());
                                },
                                save);
  log_info("dit: " + std::to_string(trainer.steps_done()) + " steps, " + format_duration(elapsed) + ", loss " + fmt(avg));
  write_transformer(root, trainer.ema());
  write_pipeline_files(root, config);
  log_info("dit: model written to " + root.string());
}

}  // namespace detail

}  // namespace vdit::demo
