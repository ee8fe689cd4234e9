// `vdit train-demo`: trains the built-in "shapes" demo model from scratch, in C++ on LibTorch
// autograd, with the same model classes inference uses (WanVAE, UMT5Encoder, WanDiT), and writes
// it in the diffusers layout that locate_wan_model / WanT2VPipeline read.
//
// Stages, in order:
//   tokenizer - a sentencepiece model over the 90 captions of the shapes grammar (spm_train)
//   vae       - the narrow causal 3D Wan VAE: reconstruction + a small KL term
//   dit       - the Wan DiT: flow matching on VAE latents of rendered clips, 10 % caption dropout
// The umT5 text encoder is not trained: it stays at its seeded random initialisation (the domain
// has 90 captions; a frozen random encoder already gives each a distinct, deterministic embedding
// that the DiT's text MLP and cross-attention learn to read, and it costs no training time).
#pragma once

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "vdit/demo/process_tuning.h"
#include "vdit/models/umt5.h"
#include "vdit/models/wan_dit.h"
#include "vdit/demo/shapes.h"
#include "vdit/models/wan_vae.h"

namespace vdit::demo {

// Model and training hyper-parameters (configs/demo/shapes-demo.json). Every key is optional; the
// defaults are the shipped demo model's.
struct DemoTrainConfig {
  // Clips.
  std::int64_t width = 64, height = 64, frames = 9, fps = 8;

  // Tokenizer and text encoder.
  std::int64_t vocab_size = 64;  // an upper bound: spm_train may stop below it
  UMT5Config text_encoder = default_text_encoder();  // vocab: the tokenizer's piece count
  std::uint64_t text_encoder_seed = 1234;

  // Models.
  WanVAEConfig vae = default_vae();
  WanDiTConfig dit = default_dit();  // text_dim is always text_encoder.dim

  // VAE training.
  std::int64_t vae_batch = 4;
  double vae_lr = 1e-3;
  double vae_kl_weight = 1e-5;       // on the per-element mean KL
  double vae_foreground_weight = 1;  // weight of the object pixels' mean L1 against the background's
  // Budgets of the three phases below are steps (0: use the minutes instead), so a run's length
  // does not depend on the machine's speed. The defaults are the step counts the shipped model's
  // run reached with budgets of 30, 10 and 75 minutes on the 2-core CPU (about 2 h in all).
  std::int64_t vae_steps = 6943;
  double vae_minutes = 30;
  std::int64_t vae_stats_clips = 256;  // clips used to measure the latent mean/std
  // Initial bias of the encoder's log-variance outputs. At 0 the sampled latent starts with unit
  // noise, far larger than the signal, and the decoder first learns a blurred average (measured:
  // shape unreadable after 850 steps); the small KL term moves it from here as it needs.
  double vae_logvar_init = -8.0;
  // Pixels around the object counted with it in the reconstruction loss (see VAETrainer::step).
  std::int64_t vae_edge_margin = 3;
  // Weight of a squared-error term added to the per-pixel L1 (err = |d| + w d^2). L1 alone pulls
  // a pixel the decoder cannot yet place to the per-channel median, which for the small object is
  // the background: measured, red and green objects vanished in the round trip; with w = 2 none did.
  double vae_object_mse_weight = 2.0;
  // Weight of the per-frame mean-colour error of the object (its bare mask, reconstruction against
  // input): a direct signal for the palette, which the judge reads from the object's median colour.
  double vae_colour_weight = 4.0;
  // Weight of the L1 error of horizontal and vertical pixel differences inside the object's region
  // (the edges' sharpness). 0, the shipped recipe: off until a run shows it keeps squares square.
  double vae_gradient_weight = 0.0;
  // Shape probe (first phase only): a linear 3-way classifier trained with the VAE reads the clip's
  // shape from every latent cell that holds part of the object, and its cross-entropy, times this
  // weight, joins the VAE's loss. Why: the DiT gets colour right in every clip, and colour is a
  // value each object cell carries; shape is spread over the corners, which the DiT rounds. With
  // the probe the encoder must also write the shape into each object cell, where the DiT can
  // paint it like a colour and the decoder can read it. The probe itself is not part of the
  // model. 0: off.
  double vae_shape_probe_weight = 0.0;
  // Training windows: the VAE is convolutional (its attention is over whatever grid it gets), so it
  // trains on the first vae_frames frames (4n+1; 0: all) and a vae_crop x vae_crop window around
  // the object (multiple of 16; 0: the whole frame). 5 frames and 32x32 cost ~1/7 of a full clip,
  // and colour and shape are learnt per optimizer step, not per pixel seen. Validation, latent
  // statistics and the DiT always use whole clips.
  std::int64_t vae_frames = 5;
  std::int64_t vae_crop = 32;
  // Extra Gaussian noise added to the sampled latent in training, as a fraction of each latent
  // channel's spread in the batch (std of mu, no gradient). The DiT's samples are off by a
  // fraction of the latent's spread; with this noise the decoder must tell apart only what the
  // encoder keeps that far apart. Measured on the 40-minute VAE without it (normalised latent,
  // whole clips): red and purple lie 11 apart, circle and square 16, a 4-pixel shift 45 - the
  // DiT's mistakes are those small distances (purple -> red, square -> circle). 0: off. The
  // shipped model uses 0.25.
  double vae_latent_noise = 0.25;
  // Decoder phase: after the windowed training above, the encoder (and conv1) is frozen and the
  // decoder fine-tuned on vae_decoder_frames frames (4n+1; 0: all) at the same crop. A decoder
  // trained on 5-frame windows only ever decodes two latent frames: measured on 64 round-tripped
  // 9-frame clips, the third latent frame (frames 5-8) came out another colour in 45 of them. The
  // frozen encoder keeps the latent space (and a DiT trained on it) valid.
  std::int64_t vae_decoder_steps = 1466;  // 0: use minutes
  double vae_decoder_minutes = 10;       // 0 with vae_decoder_steps 0: no decoder phase
  double vae_decoder_lr = 3e-4;
  std::int64_t vae_decoder_frames = 0;
  // Decoder fine-tune on the model's own samples (stage "vae-decoder" with --decoder-from a
  // finished model, DiT included). Before the decoder phase, decoder_generated_clips random
  // captions are generated by that model's DiT (unipc, sample_steps, sample_guidance,
  // sample_shift: what `vdit generate` and `vdit eval shapes` use) and each latent is paired with
  // the clip the caption asks for, rendered at the object's measured place and size in the
  // latent's decoded pixels (layout_from_pixels; clips with no object or a second one are
  // skipped). Every decoder step then adds decoder_generated_weight times the reconstruction
  // loss of decoder_generated_batch such pairs to that of its rendered clips. Why: the DiT's
  // latents are not the encoder's. Its squares decode with rounded corners (fill ratio 0.85-0.94
  // against >= 0.93 rendered), yet they differ from its circles; a decoder that has seen such
  // latents can draw the shape they lean to. 0: off.
  std::int64_t decoder_generated_clips = 0;
  std::int64_t decoder_generated_batch = 4;
  double decoder_generated_weight = 1.0;
  std::int64_t vae_validate_every = 200;  // steps between round-trip judge checks (0: never)
  std::int64_t vae_validate_clips = 30;   // clips encoded, decoded and judged per check

  // DiT training.
  std::int64_t dit_batch = 32;
  double dit_lr = 5e-4;
  std::int64_t dit_warmup = 200;
  // After the warm-up the learning rate follows a cosine from dit_lr down to dit_lr_final * dit_lr
  // over the stage's budget (steps or minutes). 1, the shipped recipe: constant, as the shipped DiT
  // was trained (its later phases are continuations at lower constant rates, configs/demo/
  // shapes-demo-continue*.json); below 1 one run does that decay by itself.
  double dit_lr_final = 1.0;
  // Every this many DiT steps (0: never) the EMA DiT is also written as a complete model directory
  // OUT/snapshots/step-NNNNNN (the other parts copied from OUT), so one run gives the curve of
  // `vdit eval shapes --model` over its steps. Snapshots are not part of the model.
  std::int64_t dit_snapshot_every = 0;
  // What the DiT outputs, written to the model's scheduler config as its prediction_type:
  // "flow_prediction" (the velocity noise - x0, as every released Wan2.1 model and the shipped demo
  // DiT) or "sample" (the clean latent x0). Either way the loss is on the velocity: a sample
  // prediction x^ is turned into (x_sigma - x^) / max(sigma, 0.05) against (x_sigma - x0) /
  // max(sigma, 0.05), the noise - x0 target above sigma 0.05 with its weight capped below.
  // Predicting x0 keeps the output on the low-dimensional data manifold, which is said to matter
  // when a token's patch holds more values than the model width (Li & He 2025, "Back to Basics:
  // Let Denoising Generative Models Denoise").
  std::string dit_prediction = "flow_prediction";
  double dit_weight_decay = 0.01;
  double grad_clip = 1.0;
  double caption_dropout = 0.1;
  double flow_shift = 3.0;  // sigma = shift*u / (1 + (shift-1) u), u ~ U(0,1): the sampler's density
  double ema_decay = 0.999;
  std::int64_t pool_size = 2048;       // pre-encoded latents the DiT batches are drawn from
  std::int64_t pool_refresh = 2;       // clips re-rendered and re-encoded per DiT step
  // Extra weight of the latent positions covered by the object (see dit_flow_loss): the object is
  // ~2% of the latent, so an unweighted loss is dominated by the trivial background. Measured at
  // 3850 steps on the same VAE, 100 judged clips: 0 gave colour 49 % shape 33 % (45 clips), 8 gave
  // colour 83 % shape 48 % motion 95 % (colour then by the clip's median; see judge_clip).
  double dit_object_weight = 8;
  // Pixel term (0: off, the shipped recipe): for up to dit_pixel_samples clips of each batch whose
  // sigma is below dit_pixel_max_sigma, the DiT's clean-latent estimate x0^ = x_sigma - sigma v^ and
  // the true latent x0 are cut to a dit_pixel_crop-cell square window around the object, both are
  // decoded by the frozen VAE, and the mean of |d| + 2 d^2 over the decoded pixels (see
  // dit_pixel_loss) times this weight joins the flow loss. The latent MSE weighs every latent
  // direction alike, while the decoder turns some (a square's corners) into many more pixels than
  // others; the pixel term weighs the DiT's errors by what they draw. Low sigma only, where x0 is
  // nearly determined by x_sigma: at high noise x0^ is a blend of many clips and a pixel loss on it
  // would fight the velocity target.
  double dit_pixel_weight = 0;
  double dit_pixel_max_sigma = 0.6;
  std::int64_t dit_pixel_samples = 4;
  std::int64_t dit_pixel_crop = 8;  // latent cells (x the VAE's spatial stride pixels)
  // A steps budget, so the DiT's length does not depend on the machine's speed (0: use dit_minutes).
  // The shipped DiT: 6570 steps, ~1.46 steps/s on the 2-core CPU with f32 RoPE (1 h 15 min).
  std::int64_t dit_steps = 6570;
  double dit_minutes = 75;
  // The DiT forward under CPU bf16 autocast (f32 master weights, optimizer and loss). Measured
  // at batch 32 on an AVX-512 EPYC: 0.75 s/step against 1.8 s/step in f32. Without AVX-512 the
  // bf16 GEMM is emulated: 3.7 GFLOP/s against 135 for f32 on an AVX2-only EPYC, where one bf16
  // step took over 8 s. Auto (JSON "auto", the default) times both GEMMs at start-up and picks
  // the faster; JSON true / false force it.
  enum class Bf16Autocast { Off, On, Auto };
  Bf16Autocast bf16_autocast = Bf16Autocast::Auto;

  // Defaults written to vdit-demo.json for `vdit generate`.
  std::int64_t sample_steps = 30;
  // Guidance 2.5 rather than 4: on the shipped model's 100 judged clips (seed 1000) colour 91 -> 94 %,
  // shape 51 -> 56 %, motion 83 -> 85 %, clips with a second object 30 -> 19. Stronger guidance
  // adds objects (23 of 50 clips at 6), weaker loses motion (76 % at 1.5).
  double sample_guidance = 2.5;
  // Flow shift `vdit generate` samples with (vdit-demo.json); training draws sigmas with
  // flow_shift. For the 8000-step model, 1.5 against 3: judged shape 60 -> 70 % on the same 30 clips.
  double sample_shift = 1.5;

  double checkpoint_minutes = 5;  // train-state/ is rewritten this often and at the end of a stage
  std::uint64_t seed = 0;

  // The demo's architectures (the library structs default to the 1.3B model's).
  static UMT5Config default_text_encoder();
  static WanVAEConfig default_vae();
  static WanDiTConfig default_dit();

  static DemoTrainConfig from_json(const nlohmann::json& j);
  // A recipe file (configs/demo/). It may name a base recipe, "_base": "FILE" (relative to its own
  // folder; bases may have bases), and give only the keys it changes: they are merged over the
  // base's as a JSON merge patch (RFC 7396), so a section such as "vae" or "dit" changes key by
  // key, any other value replaces the base's, and null removes a key (its default applies).
  static DemoTrainConfig from_file(const std::string& path);
  nlohmann::json to_json() const;
};

struct DemoTrainOptions {
  std::string out_dir;
  // tokenizer | vae | vae-decoder | dit | all. "vae" runs both VAE phases; "vae-decoder" only the
  // decoder phase, starting from a finished first phase (train-state/vae.pt).
  std::string stage = "all";
  // With stage "vae-decoder": start the decoder phase from this finished model's VAE (DIR/vae)
  // instead of train-state/vae.pt, and write it back without re-measuring the latent statistics,
  // so the encoder, its latents and a DiT trained on them stay exactly as they were.
  std::string decoder_from;
  // With stage "dit": start the DiT (its live and EMA weights) from this finished model's
  // transformer (DIR/transformer) instead of a random initialisation; the optimizer starts
  // afresh. Continues a shipped DiT at another learning rate without its train-state.
  std::string dit_from;
  bool resume = false;
  bool quiet_progress = false;
  // Where the VAE and DiT stages train (the tokenizer stage and the decoder-pairs generation run
  // on the CPU). On a GPU they train in f32 (bf16_autocast is a CPU setting); noise and data are
  // drawn on the CPU either way, so a run's random draws do not depend on the device. A
  // train-state resumes on any device.
  at::Device device = at::kCPU;
};

// Runs the requested stage(s). Later stages read the earlier ones' results from out_dir
// (tokenizer/spiece.model, train-state/vae.pt). Writes the diffusers layout at the end of the
// vae and dit stages (the DiT stage's output is the complete model).
// Changes nothing of the process: a program that trains for long should call
// tune_process_for_training() first, as `vdit train-demo` does.
void train_demo(const DemoTrainConfig& config, const DemoTrainOptions& options);

// The 90 captions plus nothing else, one per line: the tokenizer's training text.
std::vector<std::string> caption_corpus();

// Trains the caption tokenizer with the `spm_train` program into dir/spiece.model and returns
// its path. Throws RuntimeError when spm_train is missing or fails.
std::string train_caption_tokenizer(const std::string& dir, std::int64_t vocab_size);

// ---- pieces the trainer is built from (public for the tests) ---------------------------------

// One VAE optimisation step on a random batch; returns (total loss, reconstruction L1).
struct VAEStepResult {
  double loss = 0, recon = 0, kl = 0;
  double probe_accuracy = -1;  // share of object cells the shape probe reads right (-1: no probe)
};

// The VAE's reconstruction loss for clips [B, 3, F, H, W] in [-1, 1] (see the comments in the
// definition): object region (mask dilated by vae_edge_margin) and background averaged separately,
// per-pixel error |d| + vae_object_mse_weight d^2, plus vae_colour_weight times the L1 of the
// object's per-frame mean colour, plus vae_gradient_weight times the L1 of the error of pixel
// differences along H and W inside the object's region. Zero exactly when recon == video.
// The VAE's training input: the first config.vae_frames frames of each clip [B, 3, F, H, W] and a
// vae_crop window per clip that contains the object's centre in the middle kept frame, at a random
// offset drawn from `rng` (clamped inside the frame). Returns the input unchanged where both are 0.
at::Tensor vae_training_window(const at::Tensor& video, const DemoTrainConfig& config, std::mt19937_64& rng);

at::Tensor vae_reconstruction_loss(const at::Tensor& recon, const at::Tensor& video, const DemoTrainConfig& config);

// The layout (ClipLayout) of the one object in a decoded clip [3, F, H, W] in [-1, 1]. Per frame, the
// pixels farther than the judge's foreground distance from the background bound the object; inside
// that box (grown by a pixel) each pixel's coverage of the caption's colour gives row and column
// profiles (every shape fills the same size x size box around its centre): their weighted means
// are the centre, the column profile's sum the size (a triangle's from its area). The size is the
// frames' median clamped to the domain's 0.85-1.15 x nominal size, the centres are fitted by least
// squares to linear motion (none for a still caption). nullopt when a frame shows no object.
std::optional<shapes::ClipLayout> layout_from_pixels(const at::Tensor& video, const shapes::Caption& caption);

// Pairs for the decoder fine-tune on generated latents (DemoTrainConfig::decoder_generated_clips).
struct GeneratedDecoderPairs {
  at::Tensor latents;  // [N, C, F', h, w] the DiT's final latents (normalised, as decode() takes them)
  at::Tensor targets;  // [N, 3, F, H, W] rendered clips of the captions at the fitted layouts
  std::int64_t skipped = 0;  // generated clips without exactly one object
};
// Generates `clips` random captions with the finished model in model_dir (CPU, f32) and pairs them
// as above. Captions and noise come from `seed` (noise seed seed + i for clip i).
GeneratedDecoderPairs generate_decoder_pairs(const std::string& model_dir, const DemoTrainConfig& config,
                                             std::int64_t clips, std::uint64_t seed,
                                             const std::function<void(std::int64_t, std::int64_t)>& on_clip = {});

class VAETrainer {
 public:
  // The VAE (and the shape probe) train on `device`. Weights are initialised and clips and noise
  // drawn on the CPU, then moved, so a run draws the same data on every device; a state saved on
  // one device resumes on another.
  VAETrainer(const DemoTrainConfig& config, std::uint64_t seed, at::Device device = at::kCPU);
  // One step at learning rate vae_lr * lr_scale (the stage passes its warm-up/cosine schedule).
  VAEStepResult step(double lr_scale = 1.0);
  // Freezes the encoder and conv1, restarts the step count and gives the decoder and conv2 a
  // fresh optimizer at vae_decoder_lr; later steps train on vae_decoder_frames frames.
  void start_decoder_phase();
  bool decoder_phase() const { return decoder_phase_; }
  std::int64_t steps_done() const { return step_; }
  WanVAE& vae() { return vae_; }
  // Weights, optimizer, step counter and both random generators. A decoder-phase state loads only
  // into a trainer in the decoder phase, and a first-phase state only into one that is not.
  void save_state(const std::string& path) const;
  void load_state(const std::string& path);
  // The weights alone (any phase's state file).
  void load_weights(const std::string& path);
  // The weights of a finished VAE (as loaded from a model's vae/ directory; `source` names it in
  // errors). Throws InputError when its architecture differs from config.vae.
  void load_finished_vae(WanVAE& finished, const std::string& source);
  // Decoder phase: every later step also trains on decoder_generated_batch of these pairs.
  void set_generated_pairs(const GeneratedDecoderPairs& pairs);

 private:
  DemoTrainConfig config_;
  at::Device device_;
  bool decoder_phase_ = false;
  WanVAE vae_{nullptr};
  std::vector<at::Tensor> trained_;  // the parameters the optimizer updates (and clips)
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  std::mt19937_64 data_rng_;
  at::Generator noise_gen_;
  std::int64_t step_ = 0;
  at::Tensor generated_latents_, generated_targets_;
  // Per pair, the centre (y, x) of the target's object in its middle frame, where the crop goes.
  std::vector<std::pair<double, double>> generated_centres_;
  at::Tensor probe_weight_, probe_bias_;  // vae_shape_probe_weight > 0: [3, z_dim], [3]
};

// Encodes and decodes `clips` random clips (seeded) with the VAE's mean latent and scores the
// decoded pixels with the shapes judge against the true captions: the VAE is only good enough for
// the DiT stage when its round trip keeps colour, shape and motion readable.
shapes::JudgeSummary judge_round_trip(WanVAE& vae, const DemoTrainConfig& config, std::int64_t clips, std::uint64_t seed);

// Per-channel mean and std of the VAE's raw mu over `clips` random clips.
std::pair<std::vector<float>, std::vector<float>> measure_latent_stats(WanVAE& vae, const DemoTrainConfig& config,
                                                                      std::int64_t clips, std::uint64_t seed);

// Rewrites the 1x1x1 conv1 (mu rows) and conv2 of a trained VAE so that its raw latent, once
// normalised with the config's latent_mean/latent_std (Wan's published statistics, which every
// loader applies), equals (mu - mean) / std of the measured statistics: the decoder sees the same
// input as before. Exact up to f32 rounding because both convolutions are affine.
void fold_latent_stats(WanVAE& vae, const std::vector<float>& mean, const std::vector<float>& std);

// The DiT stage: a frozen VAE and frozen text contexts, a pool of pre-encoded latents, AdamW,
// EMA weights.
struct DiTStepResult {
  double loss = 0;        // what the optimizer minimised (flow loss, plus the weighted pixel term)
  double pixel_loss = 0;  // the unweighted pixel term (0 when off or no clip of the batch qualified)
};

// Latent positions [B, 1, F', H/s, W/s] (f32 0/1) whose pixels hold any of the object in clips
// [B, 3, F, H, W], grown by one latent position on each side. Latent frame 0 covers pixel frame 0
// and frame k >= 1 covers pixel frames t(k-1)+1 .. tk, as the causal VAE compresses them.
at::Tensor latent_object_mask(const at::Tensor& video, std::int64_t temporal_stride, std::int64_t spatial_stride);
// The same cells before the growth: those whose pixels hold any of the object.
at::Tensor latent_object_cells(const at::Tensor& video, std::int64_t temporal_stride, std::int64_t spatial_stride);

// The DiT's flow-matching loss: mean of w (pred - target)^2 divided by the mean of w, with
// w = 1 + object_weight * mask (mask [B, 1, F', h, w] broadcast over channels). object_weight 0 is
// plain MSE; a uniform error e gives e^2 whatever the mask.
at::Tensor dit_flow_loss(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask, double object_weight);

// A sample-predicting DiT's loss terms (DemoTrainConfig::dit_prediction "sample"): the velocity its
// x0 prediction implies and the target, {(noisy - x0_pred) / s, (noisy - x0) / s} with
// s = max(sigma, 0.05) (sigma broadcast against the latents). Above sigma 0.05 the target is
// exactly noise - x0, the velocity model's.
std::pair<at::Tensor, at::Tensor> sample_prediction_velocities(const at::Tensor& x0_pred, const at::Tensor& x0,
                                                               const at::Tensor& noisy, const at::Tensor& sigma);

// Square windows of `crop` latent cells, one per clip, of `latents` [B, C, F', h, w], centred on the
// mean position of mask [B, 1, F', h, w] > 0 over all frames (the frame centre where the mask is
// empty) and moved inwards at the borders; every tensor in `latents` is cut at the same place.
// crop must be at most h and w.
std::vector<at::Tensor> crop_latents_around_object(const std::vector<at::Tensor>& latents, const at::Tensor& mask,
                                                   std::int64_t crop);

// The DiT's pixel term (DemoTrainConfig::dit_pixel_weight): mean of |d| + 2 d^2 with
// d = vae.decode_unclamped(x0_pred) - vae.decode_unclamped(x0); the target is decoded without a
// graph, so only x0_pred receives a gradient.
at::Tensor dit_pixel_loss(WanVAE& vae, const at::Tensor& x0_pred, const at::Tensor& x0);

class DiTTrainer {
 public:
  // vae: trained (stats folded); contexts: the frozen umT5 output per caption in
  // shapes::Caption::all() order, each [L_i, text_dim]; null_context: the output for "".
  // Everything the step touches (VAE, contexts, DiT, EMA, latent pool) lives on `device`; the VAE
  // is a module handle, so the caller's VAE moves there too.
  DiTTrainer(const DemoTrainConfig& config, WanVAE vae, std::vector<at::Tensor> contexts, at::Tensor null_context,
             std::uint64_t seed, at::Device device = at::kCPU);
  // Fills the latent pool (config.pool_size clips) if it is empty.
  void fill_pool(const std::function<void(std::int64_t, std::int64_t)>& progress = {});
  // One step at learning rate dit_lr * warm-up * lr_scale (the stage passes its decay schedule).
  DiTStepResult step(double lr_scale = 1.0);
  std::int64_t steps_done() const { return step_; }
  WanDiT& dit() { return dit_; }
  WanDiT& ema() { return ema_; }
  void save_state(const std::string& path) const;
  void load_state(const std::string& path);
  // Starts both the live and the EMA DiT from `finished` (same architecture as config.dit, else
  // InputError naming `source`); the step count and optimizer stay at zero.
  void load_finished_dit(WanDiT& finished, const std::string& source);
  // The batch's text contexts padded to text_len: [B, text_len, text_dim].
  at::Tensor contexts_for(const std::vector<std::int64_t>& caption_index, const std::vector<bool>& dropped) const;

 private:
  void refresh(std::int64_t count);
  DemoTrainConfig config_;
  at::Device device_;
  WanVAE vae_;
  std::vector<at::Tensor> contexts_;
  at::Tensor null_context_;
  WanDiT dit_{nullptr}, ema_{nullptr};
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  at::Tensor pool_;                          // [pool_size, 16, F', h, w] normalised latents
  at::Tensor pool_mask_;                     // [pool_size, 1, F', h, w] latent_object_mask, u8
  std::vector<std::int64_t> pool_caption_;   // index into Caption::all()
  std::int64_t pool_cursor_ = 0;             // next pool slot to refresh
  std::mt19937_64 data_rng_;
  at::Generator noise_gen_;
  std::int64_t step_ = 0;
  bool bf16_autocast_ = false;               // config_.bf16_autocast with Auto resolved
};

// The learning-rate factor of a cosine decay from 1 at done = 0 to final_fraction at done >= 1.
double cosine_decay(double done, double final_fraction);

// True when a bf16 GEMM of the demo DiT's FFN size runs faster than the f32 one on this CPU
// (timed once per process; what Bf16Autocast::Auto decides by).
bool cpu_bf16_gemm_is_faster();

// Frozen umT5 at its seeded random initialisation, sized to the tokenizer.
UMT5Encoder make_text_encoder(const DemoTrainConfig& config, std::int64_t vocab);

// Writes the diffusers layout: model_index.json, transformer/, text_encoder/, tokenizer/,
// vae/, scheduler/, vdit-demo.json. Weights are stored under the original Wan names (the
// loader accepts them in every layout); f32.
void save_diffusers_model(const std::string& dir, const DemoTrainConfig& config, WanDiT& dit, UMT5Encoder& text_encoder,
                          const std::string& tokenizer_path, WanVAE& vae);

}  // namespace vdit::demo
