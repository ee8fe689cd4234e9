// Wan2.1 text-to-video / text-to-image: prompts -> umT5 -> DiT denoising with classifier-free
// guidance under a flow-matching sampler -> causal VAE decode. Each stage loads its model, runs
// and releases it, so peak memory is the largest model, not the sum.
#pragma once

#include "vdit/models/wan_checkpoint.h"
#include "vdit/models/wan_vae.h"
#include "vdit/pipelines/freeswim.h"
#include "vdit/pipelines/guidance.h"
#include "vdit/pipelines/temporal_windows.h"
#include "vdit/samplers/sampler.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace vdit {

class WanDiTImpl;

// The fixed negative prompt of Wan2.1's configs, used when none is given.
extern const char* const kWanDefaultNegativePrompt;

struct T2VSettings {
  std::string prompt;
  std::optional<std::string> negative_prompt;  // nullopt: kWanDefaultNegativePrompt ("" is a valid prompt)
  std::int64_t width = 832, height = 480, frames = 81;
  int steps = 50;
  std::string sampler = "unipc";  // unipc | dpm++ | euler | euler-a
  double eta = 1.0;               // euler-a: share of the posterior noise re-drawn per step, [0, 1]
  // img2img / SDEdit: below 1 the run starts at img2img_begin_index(steps, strength) from the
  // clean latent noised to that step's sigma (add_noise); 1 starts from pure noise.
  double strength = 1.0;
  // The SDEdit input for generate(): [3, frames, height, width] f32 in [-1, 1], exactly the run's
  // size and frame count (the CLI resizes and picks frames). Used when strength < 1.
  at::Tensor init_video;
  std::optional<double> shift;    // default: the model's scheduler config, else 5.0
  double guidance = 5.0;
  // Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
  // with a weaker DiT of the same latent space (WanT2VOptions::guide_dit), each step adds
  // (autoguidance - 1) * (output(c) - guide_output(c)) to the guided output, pushing the sample
  // away from the errors the weaker model makes more of. 1: off (no guide model is loaded).
  double autoguidance = 1.0;
  std::uint64_t seed = 42;         // also the CLI's default (--seed): defined here only
  std::vector<double> sigmas;     // custom schedule; empty: the sampler's own
  at::Tensor noise;               // optional latent-shaped tensor replacing the seeded noise
  bool batch_guidance = true;     // cond, uncond (and perturbed) passes in one batched forward
  // Perturbed-attention guidance (PAG; SoftPAG and head sets after HeadHunter): on the steps in
  // [pag_start, pag_end) (fractions of the run) the output gains pag_scale * (cond - perturbed),
  // the perturbed pass being the prompt with the self-attention of the heads in pag_heads
  // interpolated towards the identity map by soft_pag: (1 - u) attention + u V (1: PAG, the head
  // returns its V). pag_scale 0 or an empty head set: off (no perturbed pass).
  double pag_scale = 0.0;
  std::map<int, std::vector<int>> pag_heads;  // layer -> global head indices
  std::vector<int> pag_layers;                // layer-level PAG: every head of these layers too
  double soft_pag = 1.0;
  double pag_start = 0.0, pag_end = 1.0;
  // Skip-layer guidance (SD3.5 / ComfyUI SkipLayerGuidanceDiT): on the steps in [slg_start,
  // slg_end) the output gains slg_scale * (cond - skipped), the skipped pass being the prompt
  // with the blocks slg_layers bypassed. Empty: off.
  std::vector<int> slg_layers;
  double slg_scale = 3.0;
  double slg_start = 0.01, slg_end = 0.2;
  // CFG-Zero* (Fan et al. 2025) in place of CFG: v = s* v_u + w (v_c - s* v_u) with
  // s* = <v_c, v_u> / |v_u|^2, and a zero velocity on the first cfg_zero_init_steps steps.
  bool cfg_zero_star = false;
  int cfg_zero_init_steps = -1;  // -1: ceil(4 % of the steps), the authors' default
  // Long video (pipelines/temporal_windows.h, ALGORITHMS.md 5.4): when set, every step runs the
  // guided DiT on overlapping windows of latent frames and fuses the velocities; nullopt: one
  // window holding every frame.
  std::optional<TemporalWindowOptions> windows;
  // FreeNoise on the seeded initial noise (with windows; a --noise tensor is used as given).
  NoiseReschedule noise_reschedule = NoiseReschedule::None;
  // Prompts along the video, spread evenly over its latent frames (each window takes the prompt of
  // its position: window_segment); empty: `prompt` everywhere.
  std::vector<std::string> segment_prompts;
  // Hi-res refinement (pipelines/freeswim.h): the run denoises with the FreeSwim dual path (or one
  // of its ablations) at width x height; nullopt: the plain guided DiT.
  std::optional<HiresOptions> hires;
};

// How pixels map to the DiT's latent grid: the VAE's latent channels and strides and the DiT's
// spatial patch. The defaults are every released Wan2.1 model's (16 channels, 4x temporal and 8x
// spatial compression, 1x2x2 patches); the built-in demo model uses a 4x spatial VAE.
struct LatentGeometry {
  std::int64_t channels = 16;
  std::int64_t temporal_stride = 4;
  std::int64_t spatial_stride = 8;
  std::int64_t patch_h = 2, patch_w = 2;
  // Sizes must be multiples of spatial_stride * patch (16 for Wan2.1) on each side.
  std::int64_t size_multiple_h() const { return spatial_stride * patch_h; }
  std::int64_t size_multiple_w() const { return spatial_stride * patch_w; }
};

// Throws InputError, before any model is loaded, for sizes the model cannot take, suggesting
// the nearest valid values (multiples of 16 and 4n+1 frames for Wan2.1).
void validate_t2v_settings(const T2VSettings& settings, const LatentGeometry& geometry = LatentGeometry{});
// {channels, (F - 1) / temporal_stride + 1, H / spatial_stride, W / spatial_stride}
std::vector<std::int64_t> t2v_latent_shape(const T2VSettings& settings, const LatentGeometry& geometry = LatentGeometry{});
// Seeded standard-normal noise drawn on the CPU with LibTorch's generator (equal to torch.randn
// with torch.Generator("cpu").manual_seed(seed)), so a seed means the same noise on every device.
at::Tensor seeded_noise(const std::vector<std::int64_t>& shape, std::uint64_t seed);
// The seed of a stochastic sampler's (euler-a) per-step noise for a run of seed `seed`.
std::uint64_t sampler_noise_seed(std::uint64_t seed);
// The guidance terms beyond CFG as one line ("none", or "cfg-zero* ...; pag scale ... heads ...;
// slg ..."): what a run's metadata and eval's JSON record.
std::string guidance_terms_text(const T2VSettings& settings);

class DistributedGroup;  // vdit/distributed.h

struct WanT2VOptions {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;          // DiT and text-encoder compute dtype
  std::optional<at::Device> text_encoder_device;  // default: device
  VAETiling vae_tiling;
  // The weaker DiT for T2VSettings::autoguidance: a model directory (its transformer/ or DiT
  // file is found as for the main model) or a DiT weights file; it must share the main DiT's
  // latent channels, patch and text width, and predict what it predicts (the model's scheduler
  // config says which; Wan2.1 1.3B can guide 14B).
  std::string guide_dit;
  // Sequence parallelism over this process group (null or one process: off). Text is encoded on
  // rank 0 and broadcast, every rank draws the same seeded noise, the DiT runs token-sharded;
  // only rank 0 decodes (result.video stays undefined on the other ranks).
  std::shared_ptr<DistributedGroup> distributed;
};

struct StageTimes {
  double text = 0, load = 0, denoise = 0, decode = 0;
};

struct T2VResult {
  at::Tensor latents;  // t2v_latent_shape(settings, latent_geometry()) f32, CPU
  at::Tensor video;    // [3, F, H, W] in [-1, 1], f32, CPU
  StageTimes times;
  std::map<std::string, std::string> metadata;  // settings to store with the output
};

// Called after each denoising step: (step done, total).
using StepCallback = std::function<void(int, int)>;

class WanT2VPipeline {
 public:
  WanT2VPipeline(WanModelFiles files, WanT2VOptions options);
  // Runs the next generate() over `group` (WanT2VOptions::distributed).
  void set_distributed(std::shared_ptr<DistributedGroup> group) { options_.distributed = std::move(group); }

  // Loads the text encoder, encodes, releases it: one [L_i, text_dim] f32 tensor per prompt.
  std::vector<at::Tensor> encode_prompts(const std::vector<std::string>& prompts);
  // The denoising loop on prepared contexts ([L, text_dim]) from `noise` (latent shape); loads
  // the DiT if needed. With settings.strength < 1, `clean` (a latent, e.g. encode()'s) is noised
  // with `noise` to the first kept sigma and the remaining steps run (SDEdit). Returns the final
  // latent.
  // With settings.windows, `segment_contexts` (one per prompt segment, the first being `context`'s
  // prompt) give each window its prompt; empty: `context` everywhere.
  at::Tensor denoise(const at::Tensor& noise, const at::Tensor& context, const at::Tensor& context_null,
                     const T2VSettings& settings, const StepCallback& on_step = {}, const at::Tensor& clean = {},
                     const std::vector<at::Tensor>& segment_contexts = {});
  // Video [3, F, H, W] in [-1, 1] -> the posterior mean latent [C, F', h, w] in the normalised
  // space decode() takes; loads the VAE if needed.
  at::Tensor encode(const at::Tensor& video);
  // Latent [C, F', h, w] -> video [3, F, H, W] in [-1, 1]; loads the VAE if needed.
  at::Tensor decode(const at::Tensor& latent);
  // validate_t2v_settings for this model's latent geometry, plus the checks that need the options:
  // autoguidance needs a guide DiT. Reads configs only; no weights are loaded.
  void validate(const T2VSettings& settings);
  // The whole run. Stage times are filled in.
  T2VResult generate(const T2VSettings& settings, const StepCallback& on_step = {});
  // The prompts generate() encodes, in the order generate_encoded() takes them: the prompt (or
  // the segment prompts), then the negative prompt when the run is guided.
  std::vector<std::string> prompts_of(const T2VSettings& settings) const;
  // generate() on contexts encode_prompts(prompts_of(settings)) returned, so several runs (a
  // base run and its hi-res refinement) share one text encoding.
  T2VResult generate_encoded(const T2VSettings& settings, const std::vector<at::Tensor>& contexts,
                             const StepCallback& on_step = {});

  void release_dit();
  void release_vae();
  // The DiT, loaded if needed, for pipelines that drive the loop themselves (vdit edit).
  WanDiTImpl& loaded_dit();
  // The sampler this pipeline would use for `settings` (scheduler config honoured).
  std::unique_ptr<FlowSampler> make_sampler_for(const T2VSettings& settings) const;
  // The guidance terms of `settings`: CFG or CFG-Zero* (guidance != 1), autoguidance
  // (autoguidance != 1), PAG (pag_scale != 0 and a head set), skip-layer guidance (slg_layers).
  Guidance guidance_for(const T2VSettings& settings) const;

  const WanModelFiles& files() const { return files_; }
  // Read from the model's VAE and DiT configs (weights are not loaded). Computed once.
  const LatentGeometry& latent_geometry();
  // The DiT's config (its config.json, else inferred from the weights' shapes; none is loaded).
  const WanDiTConfig& dit_config();

 private:
  void load_dit();
  void load_guide_dit();
  void load_vae();

  WanModelFiles files_;
  WanT2VOptions options_;
  std::optional<SamplerConfig> scheduler_config_;
  std::shared_ptr<WanDiTImpl> dit_;
  std::shared_ptr<WanDiTImpl> guide_dit_;
  std::optional<WanVAE> vae_;
  std::optional<LatentGeometry> geometry_;
  std::optional<WanDiTConfig> dit_config_;
  StageTimes times_;
};

}  // namespace vdit
