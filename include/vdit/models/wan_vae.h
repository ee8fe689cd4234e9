// The Wan2.1 causal 3D VAE (video <-> 16-channel latent, stride 4 in time and 8 in space).
//
// Parameter names follow the original Wan2.1 checkpoint (`Wan2.1_VAE.pth`, ComfyUI's
// `wan_2.1_vae.safetensors`): encoder.conv1, encoder.downsamples.J.residual.{0,2,3,6},
// ..., conv1, conv2, decoder.... diffusers (`AutoencoderKLWan`) files are renamed on load.
//
// Encoding and decoding run chunk by chunk in time exactly like the reference: the encoder sees
// frame 0, then frames 1-4, 5-8, ...; the decoder sees one latent frame at a time. Every causal
// convolution keeps the last two frames of its input from the previous chunk (the feature cache),
// so memory does not grow with the frame count. Optional spatial tiling bounds memory in H and W.
#pragma once

#include <torch/torch.h>

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "vdit/io/checkpoint.h"

namespace vdit {

struct WanVAEConfig {
  std::int64_t dim = 96;
  std::int64_t z_dim = 16;
  std::vector<std::int64_t> dim_mult{1, 2, 4, 4};
  std::int64_t num_res_blocks = 2;
  std::vector<double> attn_scales{};                     // spatial scales (1, 0.5, ...) with attention
  std::vector<bool> temporal_downsample{false, true, true};  // per encoder stage transition
  // Per-channel latent statistics: encode returns (mu - mean) / std, decode inverts it.
  std::vector<float> latent_mean{-0.7571f, -0.7089f, -0.9113f, 0.1075f,  -0.1745f, 0.9653f,
                                 -0.1517f, 1.5508f,  0.4134f,  -0.0715f, 0.5517f,  -0.3632f,
                                 -0.1922f, -0.9497f, 0.2503f,  -0.2921f};
  std::vector<float> latent_std{2.8184f, 1.4541f, 2.3275f, 2.6558f, 1.2196f, 1.7708f,
                                2.6052f, 2.0743f, 3.2687f, 2.1526f, 2.8652f, 1.5579f,
                                1.6382f, 1.1253f, 2.8251f, 1.9160f};

  // Reads the original spelling (dim, z_dim, dim_mult, num_res_blocks, attn_scales,
  // temperal_downsample) and diffusers' (base_dim, latents_mean, latents_std); keys it does not
  // know are ignored, missing keys keep the defaults. Throws InputError naming a bad field.
  static WanVAEConfig from_json(const nlohmann::json& j);
  // The architecture read off the tensor shapes of a checkpoint (original or diffusers names);
  // latent statistics keep the published defaults. Throws InputError if the file is no Wan VAE.
  static WanVAEConfig infer_from_weights(const WeightFile& file);

  void validate() const;                       // InputError on an inconsistent config
  std::int64_t spatial_stride() const;         // 2^(stages-1) = 8
  std::int64_t temporal_stride() const;        // 2^(temporal downsamples) = 4
};

// Spatial tiling: the input is cut into overlapping tiles of tile_px x tile_px pixels (the
// decoder works on tile_px/8 latent pixels), each tile is coded on its own with the full temporal
// chunking, and overlaps are blended with linear ramps. Both sizes must be multiples of 8 and
// 0 <= overlap_px < tile_px. An input that fits into one tile takes the untiled path.
struct VAETiling {
  bool enabled = false;
  std::int64_t tile_px = 256;
  std::int64_t overlap_px = 64;
};

namespace wan_vae_detail {
class CausalConv3dImpl;
class Encoder3dImpl;
class Decoder3dImpl;
}  // namespace wan_vae_detail

class WanVAEImpl : public torch::nn::Module {
 public:
  explicit WanVAEImpl(const WanVAEConfig& config = WanVAEConfig{});

  // video [B,3,F,H,W] in [-1,1], F = 4n+1 -> normalised latent mu [B,z_dim,n+1,H/8,W/8] (f32).
  at::Tensor encode(const at::Tensor& video, const VAETiling& tiling = VAETiling{});
  // The same before the mean/std normalisation.
  at::Tensor encode_raw_mu(const at::Tensor& video, const VAETiling& tiling = VAETiling{});
  // Training entry point (vdit train-demo): video -> (raw mu, raw log-variance) of the posterior,
  // each [B,z_dim,n+1,H/8,W/8] in the parameter dtype, untiled, autograd intact. encode_raw_mu
  // drops the log-variance, which the KL term of VAE training needs.
  std::pair<at::Tensor, at::Tensor> encode_moments(const at::Tensor& video);
  // normalised latent [B,z_dim,F',h,w] -> video [B,3,4(F'-1)+1,8h,8w] in [-1,1] (f32).
  at::Tensor decode(const at::Tensor& latent, const VAETiling& tiling = VAETiling{});
  // The decoder output before the clamp to [-1,1].
  at::Tensor decode_unclamped(const at::Tensor& latent, const VAETiling& tiling = VAETiling{});
  // Long video: decode() (untiled) in temporal chunks with one causal feature cache carried
  // across them, handing each chunk's pixel frames ([B,3,n,8h,8w] in [-1,1], f32) to `on_frames`
  // as soon as `chunk_latent_frames` latent frames are decoded, so the whole video is never held
  // (decoder memory is one latent frame's activations plus the cache, whatever the length). The
  // chunks concatenated equal decode(latent).
  void decode_stream(const at::Tensor& latent, std::int64_t chunk_latent_frames,
                     const std::function<void(const at::Tensor&)>& on_frames);

  at::Tensor normalize_latent(const at::Tensor& mu) const;    // (mu - mean) * (1/std), f32
  at::Tensor denormalize_latent(const at::Tensor& z) const;   // z / (1/std) + mean, f32

  const WanVAEConfig& config() const { return config_; }
  // The dtype and device of the parameters: the computation runs there (f32 by default, as in
  // the reference). Change both with to().
  at::ScalarType dtype() const;
  at::Device device() const;

 private:
  at::Tensor encode_mu_untiled(const at::Tensor& video);
  // The encoder's chunked pass and conv1: [B, 2·z_dim, F', h, w] = (mu, log_var), unnormalised.
  at::Tensor encode_moments_untiled(const at::Tensor& x);
  at::Tensor decode_untiled(const at::Tensor& x_latent);  // x_latent: after conv2
  at::Tensor check_video(const at::Tensor& video) const;
  at::Tensor prepare_latent(const at::Tensor& latent) const;

  WanVAEConfig config_;
  std::shared_ptr<wan_vae_detail::Encoder3dImpl> encoder_;
  std::shared_ptr<wan_vae_detail::CausalConv3dImpl> conv1_;  // 1x1x1: encoder out -> (mu, logvar)
  std::shared_ptr<wan_vae_detail::CausalConv3dImpl> conv2_;  // 1x1x1: latent -> decoder in
  std::shared_ptr<wan_vae_detail::Decoder3dImpl> decoder_;
};
TORCH_MODULE(WanVAE);

// The original Wan name of a checkpoint key: strips a "first_stage_model." or "vae." prefix and
// renames diffusers (AutoencoderKLWan) keys; original keys come back unchanged. The decoder's
// flat block index depends on num_res_blocks.
std::string canonical_wan_vae_key(const std::string& key, std::int64_t num_res_blocks = 2);
// The diffusers (AutoencoderKLWan) name of an original key: the inverse of canonical_wan_vae_key.
std::string diffusers_wan_vae_key(const std::string& key, std::int64_t num_res_blocks = 2);

// Copies every parameter from the file (original or diffusers names, any stored float dtype)
// into the model, converted to `dtype`, on the model's device, and freezes the parameters (the
// reference VAE is inference-only). Strict: a missing key, a shape mismatch or a tensor the
// model does not have throws InputError naming the key and the file.
void load_wan_vae_weights(WanVAE& vae, const WeightFile& file, at::ScalarType dtype = at::kFloat);

}  // namespace vdit
