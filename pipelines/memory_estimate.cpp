#include "vdit/pipelines/memory_estimate.h"

#include "vdit/attention/attention.h"
#include "vdit/common.h"
#include "vdit/io/checkpoint.h"
#include "vdit/models/wan_dit.h"
#include "vdit/models/wan_vae.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace vdit {

namespace {

namespace fs = std::filesystem;

// Parameters of a Wan2.1 t2v DiT of `c`, counted from its layer shapes.
double dit_parameter_count(const WanDiTConfig& c) {
  const double d = static_cast<double>(c.dim), f = static_cast<double>(c.ffn_dim);
  const double pv = static_cast<double>(c.patch_volume());
  const double embed = c.in_dim * pv * d + d                      // patch embedding
                       + c.text_dim * d + d + d * d + d             // text embedding
                       + c.freq_dim * d + d + d * d + d             // time embedding
                       + d * 6 * d + 6 * d;                         // time projection
  const double block = 2 * (4 * (d * d + d) + 2 * d)  // self and cross attention with q/k norms
                       + 2 * d                        // norm3
                       + d * f + f + f * d + d        // feed-forward
                       + 6 * d;                       // modulation
  const double head = d * c.out_dim * pv + c.out_dim * pv + 2 * d;
  return embed + c.num_layers * block + head;
}

// Parameters in a weights file: the header's count for safetensors; for a torch.save archive, whose
// tensors would have to be read, its size over the element size its name suggests (the released
// Wan2.1 text encoder is "...-bf16.pth"), else over 4 bytes.
double file_parameter_count(const std::string& path) {
  if (path.empty()) return 0;
  std::error_code ec;
  const std::string name = fs::path(path).filename().string();
  const bool pth = name.size() >= 4 && (name.compare(name.size() - 4, 4, ".pth") == 0 ||
                                        (name.size() >= 3 && name.compare(name.size() - 3, 3, ".pt") == 0));
  if (pth) {
    const double bytes = static_cast<double>(fs::file_size(path, ec));
    if (ec) return 0;
    const bool half = name.find("bf16") != std::string::npos || name.find("fp16") != std::string::npos ||
                      name.find("f16") != std::string::npos;
    return bytes / (half ? 2.0 : 4.0);
  }
  return static_cast<double>(WeightFile::open(path)->parameter_count());
}

}  // namespace

MemoryModel read_memory_model(const WanModelFiles& files, const std::string& guide_dit) {
  MemoryModel m;
  std::vector<std::shared_ptr<WeightFile>> dit_weights;
  if (files.dit_config.empty())
    for (const auto& path : files.dit) dit_weights.push_back(WeightFile::open(path));
  const WanDiTConfig dc = files.dit_config.empty() ? WanDiTConfig::infer_from_weights(dit_weights)
                                                   : WanDiTConfig::from_file(files.dit_config);
  m.dit_parameters = dit_parameter_count(dc);
  m.dim = dc.dim;
  m.ffn_dim = dc.ffn_dim;
  m.num_heads = dc.num_heads;
  m.text_len = dc.text_len;
  m.patch_t = dc.patch_size[0];
  m.patch_h = dc.patch_size[1];
  m.patch_w = dc.patch_size[2];
  if (!guide_dit.empty()) {
    // A guide DiT file's own count when its header says it cheaply; else the model's (a guide is
    // the same architecture or a smaller one).
    m.guide_dit_parameters = m.dit_parameters;
    std::error_code ec;
    fs::path guide(guide_dit);
    if (fs::is_directory(guide, ec)) guide = guide / "diffusion_pytorch_model.safetensors";
    if (fs::is_regular_file(guide, ec) && guide.extension() == ".safetensors")
      m.guide_dit_parameters = static_cast<double>(WeightFile::open(guide.string())->parameter_count());
  }
  m.text_encoder_parameters = file_parameter_count(files.text_encoder);
  if (!files.vae.empty()) {
    const auto vae = WeightFile::open(files.vae);
    const WanVAEConfig vc = WanVAEConfig::infer_from_weights(*vae);
    m.vae_parameters = static_cast<double>(vae->parameter_count());
    m.vae_dim = vc.dim;
    m.z_dim = vc.z_dim;
    m.vae_res_blocks = vc.num_res_blocks;
    m.vae_dim_mult = vc.dim_mult;
    m.vae_temporal_downsample = vc.temporal_downsample;
    m.temporal_stride = vc.temporal_stride();
    m.spatial_stride = vc.spatial_stride();
  }
  return m;
}

MemoryEstimate estimate_t2v_memory(const MemoryModel& m, const MemoryRun& r) {
  MemoryEstimate e;
  // Sizes as doubles: an absurd request must give an absurd estimate, not an overflow.
  const double W = static_cast<double>(r.width), H = static_cast<double>(r.height), F = static_cast<double>(r.frames);
  const double ss = static_cast<double>(std::max<std::int64_t>(m.spatial_stride, 1));
  const double ts = static_cast<double>(std::max<std::int64_t>(m.temporal_stride, 1));
  const double lf = std::floor((F - 1) / ts) + 1, lh = std::ceil(H / ss), lw = std::ceil(W / ss);
  const double latent = static_cast<double>(m.z_dim) * lf * lh * lw * 4.0;
  const double B = static_cast<double>(std::max<std::int64_t>(r.batch, 1));
  const double cb = static_cast<double>(r.compute_bytes);
  const double pixels = 3.0 * F * H * W;
  // The init video lives in the settings for the whole run.
  const double init = r.encode_init ? pixels * 4.0 : 0.0;

  // Text encoding: the encoder's weights (its activations for a few prompts are small).
  const double text_weights = m.text_encoder_parameters * cb;

  // Denoising. Tokens = latent frames x patch grid. One block holds the residual stream, its
  // normalised input, q, k, v, the attention output and projection (about 10 [B, N, dim] tensors),
  // or in the feed-forward the stream, its input and the hidden layer twice ([B, N, ffn_dim]),
  // in f32 (the stream stays f32 under a bf16 compute dtype).
  const double tokens = std::ceil(lf / static_cast<double>(std::max<std::int64_t>(m.patch_t, 1))) *
                        std::ceil(lh / static_cast<double>(std::max<std::int64_t>(m.patch_h, 1))) *
                        std::ceil(lw / static_cast<double>(std::max<std::int64_t>(m.patch_w, 1)));
  const double d = static_cast<double>(m.dim), f = static_cast<double>(m.ffn_dim);
  const double activations = B * tokens * 4.0 * std::max(10.0 * d, 3.0 * d + 2.0 * f);
  const std::int64_t heads = std::max<std::int64_t>(m.num_heads, 1);
  const std::int64_t head_dim = std::max<std::int64_t>(m.dim / heads, 1);
  double attention = 0;
  // attention_cost's block plan is arithmetic on the sizes; past 2^40 tokens the rest of the
  // estimate says enough.
  if (tokens < 1e12) {
    const auto n = static_cast<std::int64_t>(tokens);
    attention = attention_cost(static_cast<std::int64_t>(B), heads, n, n, head_dim, head_dim,
                               r.compute_bytes == 2 ? at::kBFloat16 : at::kFloat, AttentionCall{})
                    .workspace_bytes;
  }
  attention += tokens * static_cast<double>(head_dim) * 4.0 * 2.0;  // rotary tables
  // The latent, its batch copy, the guided output and the multistep samplers' history.
  const double latents = latent * (4.0 * B + 8.0);
  const double dit_weights = (m.dit_parameters + m.guide_dit_parameters) * cb;

  // Decoding, one latent frame at a time: per decoder stage (latent resolution up to the full
  // one, channels dim x dim_mult reversed, frames doubling where the encoder halved them) a
  // residual block holds up to eight tensors of the chunk with two cached frames in front, and
  // every causal convolution keeps two frames of its input between chunks. (Calibrated on the
  // demo model's VAE: 512x512x9 peaks at 1.3 GiB, 832x480x81 at 2.5 GiB.)
  const std::int64_t stages = static_cast<std::int64_t>(m.vae_dim_mult.size());
  const double tile = r.vae_tile_px > 0 ? static_cast<double>(r.vae_tile_px) : 0.0;
  double stage_peak = 0, caches = 0, frames_in_chunk = 1;
  for (std::int64_t i = 0; i < stages; ++i) {
    const double scale = std::pow(2.0, static_cast<double>(stages - 1 - i));
    const double h = (tile > 0 ? std::min(H, tile) : H) / scale, w = (tile > 0 ? std::min(W, tile) : W) / scale;
    const double c = static_cast<double>(m.vae_dim * m.vae_dim_mult[static_cast<std::size_t>(stages - 1 - i)]);
    stage_peak = std::max(stage_peak, 8.0 * c * (frames_in_chunk + 2.0) * h * w * 4.0);
    caches += 2.0 * static_cast<double>(m.vae_res_blocks + 1) * c * 2.0 * h * w * 4.0;
    // The decoder upsamples in time where the encoder downsampled (mirrored).
    const std::size_t mirrored = static_cast<std::size_t>(stages - 2 - i);
    if (i + 1 < stages && mirrored < m.vae_temporal_downsample.size() && m.vae_temporal_downsample[mirrored])
      frames_in_chunk *= 2;
  }
  const double vae_weights = m.vae_parameters * 4.0;  // the VAE runs in f32
  // The decoded video in f32 and the copies the writers make (the [0, 255] rounding, 8-bit frames).
  const double video = pixels * 4.0 * 2.0 + pixels;

  e.latents = latents;
  e.video = video + init;
  if (r.on_host) {
    e.text_stage = text_weights + init;
    e.denoise_stage = dit_weights + activations + attention + latents + init;
    e.decode_stage = vae_weights + stage_peak + caches + video + init + (r.encode_init ? stage_peak + caches : 0.0);
    e.weights = dit_weights;
    e.activations = activations;
    e.attention = attention;
    e.vae = vae_weights + stage_peak + caches;
  } else {
    // On a GPU only what comes back to the host counts here.
    e.text_stage = init;
    e.denoise_stage = latents + init;
    e.decode_stage = video + init;
  }
  // The process itself: LibTorch, its thread pools, the loaded code (about 230 MiB measured).
  constexpr double kBaseline = 256.0 * 1024 * 1024;
  e.total = kBaseline + std::max({e.text_stage, e.denoise_stage, e.decode_stage});
  return e;
}

std::string MemoryEstimate::describe() const {
  std::ostringstream s;
  s << format_bytes(total);
  if (denoise_stage >= decode_stage && denoise_stage >= text_stage && weights + activations > 0) {
    s << " (denoising: DiT weights " << format_bytes(weights) << ", activations " << format_bytes(activations)
      << ", attention workspace " << format_bytes(attention) << ", latents " << format_bytes(latents) << ")";
  } else if (decode_stage >= text_stage) {
    s << " (decoding: VAE and its activations " << format_bytes(vae) << ", video " << format_bytes(video) << ")";
  } else {
    s << " (text encoder weights)";
  }
  return s.str();
}

namespace {

double read_number_file(const std::string& path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text == "max") return -1;
  try {
    return std::stod(text);
  } catch (const std::exception&) {
    return -1;
  }
}

}  // namespace

double available_memory_bytes() {
  double available = 0;
  {
    std::ifstream in("/proc/meminfo");
    std::string key, unit;
    double kb = 0;
    while (in >> key >> kb >> unit) {
      if (key == "MemAvailable:") {
        available = kb * 1024.0;
        break;
      }
    }
  }
  // A container's memory limit binds before the machine's (cgroup v2, then v1).
  double limit = read_number_file("/sys/fs/cgroup/memory.max");
  double used = read_number_file("/sys/fs/cgroup/memory.current");
  if (limit < 0) {
    limit = read_number_file("/sys/fs/cgroup/memory/memory.limit_in_bytes");
    used = read_number_file("/sys/fs/cgroup/memory/memory.usage_in_bytes");
  }
  if (limit > 0 && limit < 1e18 && used >= 0) {
    const double room = std::max(0.0, limit - used);
    available = available > 0 ? std::min(available, room) : room;
  }
  return available;
}

void check_memory_fits(const MemoryEstimate& estimate, double available, bool force, const std::string& what) {
  if (force || available <= 0 || estimate.total <= available) return;
  throw InputError(what + " needs about " + estimate.describe() + " but only " + format_bytes(available) +
                   " of memory is free; choose a smaller size or fewer frames, or pass --force to try anyway");
}

}  // namespace vdit
