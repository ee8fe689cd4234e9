// How much memory a text-to-video run will need, estimated from the model's configs and the run's
// size before anything loads, so that a run that cannot fit (`--frames 100001`, `--size
// 100000x100000`) is refused up front instead of growing until the kernel kills it.
//
// The estimate is the largest of the run's three stages (each loads its model, runs and releases
// it): text encoding (the encoder's weights), denoising (the DiT's weights and a guide DiT's, the
// activations of one transformer block at the run's token count and batch, the attention kernel's
// workspace, the latents and the sampler's history) and decoding (the VAE's weights, the
// activations of its highest-resolution decoder stage on one chunk of frames, its causal-conv
// caches, and the decoded video with the copies the writers make). It aims at the right order of
// magnitude, not at bytes: a refusal says how far over the run is, and --force overrides it.
#pragma once

#include "vdit/models/wan_checkpoint.h"

#include <cstdint>
#include <string>
#include <vector>

namespace vdit {

// What the estimate needs to know about a model, read from configs and file headers.
struct MemoryModel {
  // DiT
  double dit_parameters = 0, guide_dit_parameters = 0;  // 0: no guide DiT
  std::int64_t dim = 1536, ffn_dim = 8960, num_heads = 12, text_len = 512;
  std::int64_t patch_t = 1, patch_h = 2, patch_w = 2;
  // text encoder
  double text_encoder_parameters = 0;
  // VAE
  double vae_parameters = 0;
  std::int64_t vae_dim = 96, z_dim = 16, vae_res_blocks = 2;
  std::vector<std::int64_t> vae_dim_mult{1, 2, 4, 4};
  std::vector<bool> vae_temporal_downsample{false, true, true};
  std::int64_t temporal_stride = 4, spatial_stride = 8;
};

// Reads configs and weight-file headers only (a .pth VAE is read whole, as the pipeline's size
// rules already do). `guide_dit`: the autoguidance DiT's path, or empty.
MemoryModel read_memory_model(const WanModelFiles& files, const std::string& guide_dit = "");

struct MemoryRun {
  std::int64_t width = 832, height = 480, frames = 81;
  std::int64_t batch = 2;              // DiT forward batch: 2 with batched classifier-free guidance
  std::int64_t compute_bytes = 4;      // bytes per element of the DiT and text-encoder dtype
  std::int64_t vae_tile_px = 0;        // 0: untiled decode
  bool encode_init = false;            // an init video is encoded (SDEdit)
  bool on_host = true;                 // models run on the CPU; false: only the decoded video is host memory
};

struct MemoryEstimate {
  double text_stage = 0, denoise_stage = 0, decode_stage = 0;
  // parts of the stages, for the message
  double weights = 0, activations = 0, attention = 0, latents = 0, vae = 0, video = 0;
  double total = 0;  // the largest stage, plus the process's own ~256 MiB
  std::string describe() const;  // "12.3 GiB (DiT weights 2.6 GiB, activations ..., ...)"
};

MemoryEstimate estimate_t2v_memory(const MemoryModel& model, const MemoryRun& run);

// Memory this process may still take: /proc/meminfo's MemAvailable, capped by the cgroup's
// limit less its usage (v2 or v1) when there is one. 0 when unknown.
double available_memory_bytes();

// InputError unless `estimate` fits in `available` bytes (or `force`): names the estimate, its
// largest parts and the free memory, and says that --force overrides. `available` <= 0: unknown,
// nothing is refused.
void check_memory_fits(const MemoryEstimate& estimate, double available, bool force, const std::string& what = "this run");

}  // namespace vdit
