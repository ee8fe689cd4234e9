// Wan2.1 causal 3D VAE. The module tree mirrors the original one so that named_parameters() are
// the checkpoint keys; numbered children ("residual.2", "head.0") sit where the original
// nn.Sequential put them, parameter-free layers (SiLU, dropout, padding) leave gaps.
#include "vdit/models/wan_vae.h"

#include "vdit/attention/attention.h"
#include "vdit/common.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <deque>
#include <map>
#include <set>
#include <sstream>
#include <type_traits>

namespace vdit {

namespace {

// Frames of its input every causal 3x3x3 convolution keeps for the next temporal chunk.
constexpr std::int64_t kCacheFrames = 2;
// The encoder sees the first frame alone, then chunks of this many frames.
constexpr std::int64_t kEncodeChunkFrames = 4;

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream s;
  s << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s << (i ? "," : "") << shape[i];
  s << "]";
  return s.str();
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

at::Tensor last_frames(const at::Tensor& x, std::int64_t n) {
  const std::int64_t t = x.size(2);
  return x.narrow(2, std::max<std::int64_t>(0, t - n), std::min(t, n));
}

// Applies a 2D function to every frame: [B,C,T,H,W] -> [(B T),C,H,W] -> f -> [B,C',T,H',W'].
template <typename F>
at::Tensor per_frame(const at::Tensor& x, F&& fn) {
  const auto b = x.size(0), c = x.size(1), t = x.size(2), h = x.size(3), w = x.size(4);
  at::Tensor y = fn(x.permute({0, 2, 1, 3, 4}).reshape({b * t, c, h, w}));
  return y.reshape({b, t, y.size(1), y.size(2), y.size(3)}).permute({0, 2, 1, 3, 4});
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Building blocks

namespace wan_vae_detail {

// One feature-cache entry per cached layer, visited in the same order on every chunk.
struct CacheSlot {
  enum class State { Empty, Repeat, Frames };
  State state = State::Empty;
  at::Tensor frames;  // the last <= 2 input frames of the previous chunk(s)
};

class FeatureCache {
 public:
  CacheSlot& next() {
    if (cursor_ == slots_.size()) slots_.emplace_back();
    return slots_[cursor_++];
  }
  void rewind() { cursor_ = 0; }

 private:
  std::deque<CacheSlot> slots_;  // deque: references stay valid while it grows
  std::size_t cursor_ = 0;
};

// A Conv3d that pads time only in front (2*pad_t frames) so an output frame never sees later
// input frames; frames cached from the previous chunk replace that much of the zero padding.
class CausalConv3dImpl : public torch::nn::Module {
 public:
  CausalConv3dImpl(std::int64_t in, std::int64_t out, std::array<std::int64_t, 3> kernel,
                   std::array<std::int64_t, 3> stride = {1, 1, 1},
                   std::array<std::int64_t, 3> padding = {0, 0, 0})
      : stride_(stride), padding_(padding) {
    weight = register_parameter("weight", torch::empty({out, in, kernel[0], kernel[1], kernel[2]}));
    bias = register_parameter("bias", torch::empty({out}));
    // PyTorch's default Conv initialisation, so an unloaded model is still a sane starting point.
    torch::NoGradGuard no_grad;
    torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
    const double bound = 1.0 / std::sqrt(static_cast<double>(in * kernel[0] * kernel[1] * kernel[2]));
    torch::nn::init::uniform_(bias, -bound, bound);
  }

  at::Tensor forward(const at::Tensor& x, const at::Tensor& cache = at::Tensor()) const {
    at::Tensor input = x;
    std::int64_t front = 2 * padding_[0];
    if (cache.defined() && front > 0) {
      input = at::cat({cache.to(x.device()), x}, 2);
      front -= cache.size(2);
    }
    if (front > 0 || padding_[1] > 0 || padding_[2] > 0) {
      input = at::constant_pad_nd(input, {padding_[2], padding_[2], padding_[1], padding_[1], front, 0}, 0);
    }
    return conv3d_f32_accumulate(input, weight, bias, {stride_[0], stride_[1], stride_[2]});
  }

  at::Tensor weight, bias;

 private:
  std::array<std::int64_t, 3> stride_;
  std::array<std::int64_t, 3> padding_;
};
using CausalConv3dPtr = std::shared_ptr<CausalConv3dImpl>;

std::shared_ptr<CausalConv3dImpl> make_conv3(std::int64_t in, std::int64_t out) {
  return std::make_shared<CausalConv3dImpl>(in, out, std::array<std::int64_t, 3>{3, 3, 3},
                                            std::array<std::int64_t, 3>{1, 1, 1},
                                            std::array<std::int64_t, 3>{1, 1, 1});
}
std::shared_ptr<CausalConv3dImpl> make_conv1(std::int64_t in, std::int64_t out) {
  return std::make_shared<CausalConv3dImpl>(in, out, std::array<std::int64_t, 3>{1, 1, 1});
}

// Runs a causal conv on this chunk with the frames cached from the previous one, then caches the
// last two frames of this chunk's input (topped up with the previous cache when the chunk is one
// frame long), as the reference does.
at::Tensor cached_conv(const CausalConv3dImpl& conv, const at::Tensor& x, FeatureCache& cache) {
  CacheSlot& slot = cache.next();
  const bool have = slot.state == CacheSlot::State::Frames;
  at::Tensor tail = last_frames(x, kCacheFrames);
  if (tail.size(2) < kCacheFrames && have) {
    tail = at::cat({last_frames(slot.frames, 1).to(tail.device()), tail}, 2);
  }
  at::Tensor y = conv.forward(x, have ? slot.frames : at::Tensor());
  slot.frames = tail.clone();
  slot.state = CacheSlot::State::Frames;
  return y;
}

// x / ||x||_2 over channels * sqrt(C) * gamma (F.normalize with eps 1e-12).
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(std::int64_t dim, bool images) : scale_(std::sqrt(static_cast<double>(dim))) {
    gamma = register_parameter("gamma", images ? torch::ones({dim, 1, 1}) : torch::ones({dim, 1, 1, 1}));
  }
  at::Tensor forward(const at::Tensor& x) const {
    at::Tensor denom = at::norm(x, 2, {1}, /*keepdim=*/true).clamp_min(1e-12);
    return x.div(denom).mul(scale_).mul(gamma);
  }
  at::Tensor gamma;

 private:
  double scale_;
};

class ResidualBlockImpl : public torch::nn::Module {
 public:
  ResidualBlockImpl(std::int64_t in, std::int64_t out) {
    auto residual = register_module("residual", std::make_shared<torch::nn::Module>());
    norm1_ = residual->register_module("0", std::make_shared<RMSNormImpl>(in, false));
    conv1_ = residual->register_module("2", make_conv3(in, out));
    norm2_ = residual->register_module("3", std::make_shared<RMSNormImpl>(out, false));
    conv2_ = residual->register_module("6", make_conv3(out, out));
    if (in != out) shortcut_ = register_module("shortcut", make_conv1(in, out));
  }
  at::Tensor forward(const at::Tensor& x, FeatureCache& cache) const {
    at::Tensor h = shortcut_ ? shortcut_->forward(x) : x;
    at::Tensor y = at::silu(norm1_->forward(x));
    y = cached_conv(*conv1_, y, cache);
    y = at::silu(norm2_->forward(y));  // dropout 0: identity
    y = cached_conv(*conv2_, y, cache);
    return y + h;
  }

 private:
  std::shared_ptr<RMSNormImpl> norm1_, norm2_;
  CausalConv3dPtr conv1_, conv2_, shortcut_;
};

// Single-head self-attention over the pixels of each frame.
class AttentionBlockImpl : public torch::nn::Module {
 public:
  explicit AttentionBlockImpl(std::int64_t dim) {
    norm_ = register_module("norm", std::make_shared<RMSNormImpl>(dim, true));
    to_qkv_ = register_module("to_qkv", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, dim * 3, 1)));
    proj_ = register_module("proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, dim, 1)));
  }
  at::Tensor forward(const at::Tensor& x) const {
    return per_frame(x, [&](const at::Tensor& frames) {
             const auto n = frames.size(0), c = frames.size(1), h = frames.size(2), w = frames.size(3);
             at::Tensor qkv = to_qkv_->forward(norm_->forward(frames));
             // [n, 3c, h, w] -> tokens [n, h*w, 3c]; q, k, v are consecutive channel thirds.
             qkv = qkv.reshape({n, 3 * c, h * w}).transpose(1, 2);
             auto parts = qkv.chunk(3, -1);
             AttentionCall call;
             call.grid = Grid3{1, h, w};
             at::Tensor o = attention(parts[0].unsqueeze(1).contiguous(), parts[1].unsqueeze(1).contiguous(),
                                      parts[2].unsqueeze(1).contiguous(), call);
             o = o.squeeze(1).transpose(1, 2).reshape({n, c, h, w});
             return proj_->forward(o);
           }) +
           x;
  }

 private:
  std::shared_ptr<RMSNormImpl> norm_;
  std::shared_ptr<torch::nn::Conv2dImpl> to_qkv_, proj_;
};

enum class ResampleMode { Upsample2d, Upsample3d, Downsample2d, Downsample3d };

class ResampleImpl : public torch::nn::Module {
 public:
  ResampleImpl(std::int64_t dim, ResampleMode mode) : mode_(mode) {
    auto resample = register_module("resample", std::make_shared<torch::nn::Module>());
    const bool up = mode == ResampleMode::Upsample2d || mode == ResampleMode::Upsample3d;
    if (up) {
      conv_ = resample->register_module(
          "1", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, dim / 2, 3).padding(1)));
    } else {
      conv_ = resample->register_module("1", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, dim, 3).stride(2)));
    }
    if (mode == ResampleMode::Upsample3d) {
      time_conv_ = register_module(
          "time_conv", std::make_shared<CausalConv3dImpl>(dim, dim * 2, std::array<std::int64_t, 3>{3, 1, 1},
                                                          std::array<std::int64_t, 3>{1, 1, 1},
                                                          std::array<std::int64_t, 3>{1, 0, 0}));
    } else if (mode == ResampleMode::Downsample3d) {
      time_conv_ = register_module(
          "time_conv", std::make_shared<CausalConv3dImpl>(dim, dim, std::array<std::int64_t, 3>{3, 1, 1},
                                                          std::array<std::int64_t, 3>{2, 1, 1}));
    }
  }

  at::Tensor forward(const at::Tensor& input, FeatureCache& cache) const {
    at::Tensor x = input;
    if (mode_ == ResampleMode::Upsample3d) x = upsample_time(x, cache);
    if (mode_ == ResampleMode::Upsample2d || mode_ == ResampleMode::Upsample3d) {
      x = per_frame(x, [&](const at::Tensor& f) {
        const auto n = f.size(0), c = f.size(1), h = f.size(2), w = f.size(3);
        // Nearest 2x (for an integer factor "nearest-exact" is plain pixel repetition).
        at::Tensor up = f.reshape({n, c, h, 1, w, 1}).expand({n, c, h, 2, w, 2}).reshape({n, c, 2 * h, 2 * w});
        return conv_->forward(up);
      });
    } else {
      x = per_frame(x, [&](const at::Tensor& f) { return conv_->forward(at::constant_pad_nd(f, {0, 1, 0, 1}, 0)); });
    }
    if (mode_ == ResampleMode::Downsample3d) x = downsample_time(x, cache);
    return x;
  }

 private:
  // Doubles the frame count: time_conv yields 2C channels, read as (2, C) and interleaved in time.
  // The first chunk passes through unchanged (the reference's "Rep" marker); on the second chunk
  // the conv runs on zero padding and zeros top up its cache.
  at::Tensor upsample_time(const at::Tensor& x, FeatureCache& cache) const {
    CacheSlot& slot = cache.next();
    if (slot.state == CacheSlot::State::Empty) {
      slot.state = CacheSlot::State::Repeat;
      return x;
    }
    at::Tensor tail = last_frames(x, kCacheFrames);
    if (tail.size(2) < kCacheFrames) {
      at::Tensor before = slot.state == CacheSlot::State::Frames ? last_frames(slot.frames, 1).to(tail.device())
                                                                 : at::zeros_like(tail);
      tail = at::cat({before, tail}, 2);
    }
    at::Tensor y = slot.state == CacheSlot::State::Frames ? time_conv_->forward(x, slot.frames)
                                                          : time_conv_->forward(x);
    slot.frames = tail.clone();
    slot.state = CacheSlot::State::Frames;
    const auto b = x.size(0), c = x.size(1), t = x.size(2), h = x.size(3), w = x.size(4);
    return y.reshape({b, 2, c, t, h, w}).permute({0, 2, 3, 1, 4, 5}).reshape({b, c, 2 * t, h, w});
  }

  // Halves the frame count (stride 2, no padding) with the last frame of the previous chunk in
  // front; the first chunk (one frame) passes through and is only remembered.
  at::Tensor downsample_time(const at::Tensor& x, FeatureCache& cache) const {
    CacheSlot& slot = cache.next();
    at::Tensor tail = last_frames(x, 1).clone();
    if (slot.state == CacheSlot::State::Empty) {
      slot.frames = tail;
      slot.state = CacheSlot::State::Frames;
      return x;
    }
    at::Tensor y = time_conv_->forward(at::cat({slot.frames.to(x.device()), x}, 2));
    slot.frames = tail;
    return y;
  }

  ResampleMode mode_;
  std::shared_ptr<torch::nn::Conv2dImpl> conv_;
  CausalConv3dPtr time_conv_;
};

// One entry of the encoder's `downsamples` / decoder's `upsamples` sequence.
struct StageBlock {
  std::shared_ptr<ResidualBlockImpl> residual;
  std::shared_ptr<AttentionBlockImpl> attention;
  std::shared_ptr<ResampleImpl> resample;
  at::Tensor forward(const at::Tensor& x, FeatureCache& cache) const {
    if (residual) return residual->forward(x, cache);
    if (attention) return attention->forward(x);
    return resample->forward(x, cache);
  }
};

// Parameter-free container that gives its children numeric names.
class SequenceBuilder {
 public:
  explicit SequenceBuilder(std::shared_ptr<torch::nn::Module> parent) : parent_(std::move(parent)) {}
  template <typename M>
  std::shared_ptr<M> add(std::shared_ptr<M> m) {
    return parent_->register_module(std::to_string(count_++), std::move(m));
  }

 private:
  std::shared_ptr<torch::nn::Module> parent_;
  int count_ = 0;
};

// middle (residual, attention, residual) and head (RMS norm, SiLU, conv) shared by both halves.
class MiddleAndHead {
 public:
  void build_middle(torch::nn::Module& owner, std::int64_t dim) {
    auto middle = owner.register_module("middle", std::make_shared<torch::nn::Module>());
    mid1_ = middle->register_module("0", std::make_shared<ResidualBlockImpl>(dim, dim));
    mid_attn_ = middle->register_module("1", std::make_shared<AttentionBlockImpl>(dim));
    mid2_ = middle->register_module("2", std::make_shared<ResidualBlockImpl>(dim, dim));
  }
  void build_head(torch::nn::Module& owner, std::int64_t in_dim, std::int64_t out_dim) {
    auto head = owner.register_module("head", std::make_shared<torch::nn::Module>());
    head_norm_ = head->register_module("0", std::make_shared<RMSNormImpl>(in_dim, false));
    head_conv_ = head->register_module("2", make_conv3(in_dim, out_dim));
  }
  at::Tensor middle(const at::Tensor& x, FeatureCache& cache) const {
    at::Tensor y = mid1_->forward(x, cache);
    y = mid_attn_->forward(y);
    return mid2_->forward(y, cache);
  }
  at::Tensor head(const at::Tensor& x, FeatureCache& cache) const {
    return cached_conv(*head_conv_, at::silu(head_norm_->forward(x)), cache);
  }

 private:
  std::shared_ptr<ResidualBlockImpl> mid1_, mid2_;
  std::shared_ptr<AttentionBlockImpl> mid_attn_;
  std::shared_ptr<RMSNormImpl> head_norm_;
  CausalConv3dPtr head_conv_;
};

bool has_scale(const std::vector<double>& scales, double scale) {
  return std::find(scales.begin(), scales.end(), scale) != scales.end();
}

class Encoder3dImpl : public torch::nn::Module {
 public:
  explicit Encoder3dImpl(const WanVAEConfig& cfg) {
    std::vector<std::int64_t> dims{cfg.dim};
    for (auto m : cfg.dim_mult) dims.push_back(cfg.dim * m);
    conv1_ = register_module("conv1", make_conv3(3, dims[0]));
    SequenceBuilder seq(register_module("downsamples", std::make_shared<torch::nn::Module>()));
    double scale = 1.0;
    const std::size_t stages = cfg.dim_mult.size();
    for (std::size_t i = 0; i < stages; ++i) {
      std::int64_t in = dims[i];
      const std::int64_t out = dims[i + 1];
      for (std::int64_t r = 0; r < cfg.num_res_blocks; ++r) {
        blocks_.push_back({seq.add(std::make_shared<ResidualBlockImpl>(in, out)), nullptr, nullptr});
        if (has_scale(cfg.attn_scales, scale)) {
          blocks_.push_back({nullptr, seq.add(std::make_shared<AttentionBlockImpl>(out)), nullptr});
        }
        in = out;
      }
      if (i + 1 != stages) {
        const auto mode = cfg.temporal_downsample[i] ? ResampleMode::Downsample3d : ResampleMode::Downsample2d;
        blocks_.push_back({nullptr, nullptr, seq.add(std::make_shared<ResampleImpl>(out, mode))});
        scale /= 2.0;
      }
    }
    tail_.build_middle(*this, dims.back());
    tail_.build_head(*this, dims.back(), 2 * cfg.z_dim);
  }

  at::Tensor forward(const at::Tensor& x, FeatureCache& cache) const {
    at::Tensor y = cached_conv(*conv1_, x, cache);
    for (const auto& block : blocks_) y = block.forward(y, cache);
    y = tail_.middle(y, cache);
    return tail_.head(y, cache);
  }

 private:
  CausalConv3dPtr conv1_;
  std::vector<StageBlock> blocks_;
  MiddleAndHead tail_;
};

class Decoder3dImpl : public torch::nn::Module {
 public:
  explicit Decoder3dImpl(const WanVAEConfig& cfg) {
    const std::size_t stages = cfg.dim_mult.size();
    std::vector<std::int64_t> dims{cfg.dim * cfg.dim_mult.back()};
    for (auto it = cfg.dim_mult.rbegin(); it != cfg.dim_mult.rend(); ++it) dims.push_back(cfg.dim * *it);
    conv1_ = register_module("conv1", make_conv3(cfg.z_dim, dims[0]));
    tail_.build_middle(*this, dims[0]);
    SequenceBuilder seq(register_module("upsamples", std::make_shared<torch::nn::Module>()));
    double scale = 1.0 / static_cast<double>(std::int64_t{1} << (stages - 2));
    for (std::size_t i = 0; i < stages; ++i) {
      // Every stage after the first receives the halved channels of the previous upsampler.
      std::int64_t in = i == 0 ? dims[i] : dims[i] / 2;
      const std::int64_t out = dims[i + 1];
      for (std::int64_t r = 0; r < cfg.num_res_blocks + 1; ++r) {
        blocks_.push_back({seq.add(std::make_shared<ResidualBlockImpl>(in, out)), nullptr, nullptr});
        if (has_scale(cfg.attn_scales, scale)) {
          blocks_.push_back({nullptr, seq.add(std::make_shared<AttentionBlockImpl>(out)), nullptr});
        }
        in = out;
      }
      if (i + 1 != stages) {
        // The decoder mirrors the encoder: temporal upsampling where the encoder downsampled.
        const bool temporal = cfg.temporal_downsample[stages - 2 - i];
        const auto mode = temporal ? ResampleMode::Upsample3d : ResampleMode::Upsample2d;
        blocks_.push_back({nullptr, nullptr, seq.add(std::make_shared<ResampleImpl>(out, mode))});
        scale *= 2.0;
      }
    }
    tail_.build_head(*this, dims.back(), 3);
  }

  at::Tensor forward(const at::Tensor& x, FeatureCache& cache) const {
    at::Tensor y = cached_conv(*conv1_, x, cache);
    y = tail_.middle(y, cache);
    for (const auto& block : blocks_) y = block.forward(y, cache);
    return tail_.head(y, cache);
  }

 private:
  CausalConv3dPtr conv1_;
  std::vector<StageBlock> blocks_;
  MiddleAndHead tail_;
};

}  // namespace wan_vae_detail

using namespace wan_vae_detail;

// ---------------------------------------------------------------------------------------------
// Config

namespace {
// Far above any published VAE (Wan2.1: 16, Wan2.2: 48); a config past it is refused before the
// latent statistics are sized from it (fuzz_json_configs: "z_dim": 1e15 asked for petabytes).
constexpr std::int64_t kMaxZDim = 4096;
}  // namespace

void WanVAEConfig::validate() const {
  auto fail = [](const std::string& what) { throw InputError("wan vae config: " + what); };
  if (dim <= 0) fail("dim must be positive");
  if (z_dim <= 0) fail("z_dim must be positive");
  if (z_dim > kMaxZDim) fail("z_dim must be at most " + std::to_string(kMaxZDim) + ", got " + std::to_string(z_dim));
  if (dim_mult.size() < 2) fail("dim_mult needs at least 2 entries");
  if (dim_mult.size() > 16) fail("dim_mult has at most 16 entries (a spatial stride of 2^15)");
  for (auto m : dim_mult)
    if (m <= 0) fail("dim_mult entries must be positive");
  if (num_res_blocks < 1) fail("num_res_blocks must be >= 1");
  if (temporal_downsample.size() + 1 != dim_mult.size())
    fail("temperal_downsample needs " + std::to_string(dim_mult.size() - 1) + " entries (one per downsampling)");
  if (latent_mean.size() != static_cast<std::size_t>(z_dim)) fail("latents_mean needs z_dim entries");
  if (latent_std.size() != static_cast<std::size_t>(z_dim)) fail("latents_std needs z_dim entries");
  for (float s : latent_std)
    if (!(s > 0.f)) fail("latents_std entries must be positive");
}

std::int64_t WanVAEConfig::spatial_stride() const {
  return std::int64_t{1} << (dim_mult.size() - 1);
}

std::int64_t WanVAEConfig::temporal_stride() const {
  std::int64_t s = 1;
  for (bool t : temporal_downsample)
    if (t) s *= 2;
  return s;
}

namespace {
// Wan publishes latent statistics for its 16-channel latent only: a latent of another width whose
// config does not give its own gets neutral ones (mean 0, std 1).
void neutral_statistics_where_missing(WanVAEConfig& c, bool mean_given, bool std_given) {
  if (c.z_dim > kMaxZDim) return;  // validate() refuses it
  const auto z = static_cast<std::size_t>(std::max<std::int64_t>(c.z_dim, 0));
  if (!mean_given && c.latent_mean.size() != z) c.latent_mean.assign(z, 0.f);
  if (!std_given && c.latent_std.size() != z) c.latent_std.assign(z, 1.f);
}
}  // namespace

WanVAEConfig WanVAEConfig::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw InputError("wan vae config: expected a JSON object");
  WanVAEConfig c;
  auto field = [&](std::initializer_list<const char*> names) -> const nlohmann::json* {
    for (const char* n : names) {
      auto it = j.find(n);
      if (it != j.end() && !it->is_null()) return &*it;
    }
    return nullptr;
  };
  // An integer field takes JSON integers (or whole floats) up to 2^62: nlohmann's conversion of a
  // larger double (1e300) to int64 would be undefined, an unsigned past 2^63-1 would wrap.
  auto check_integer = [&](const nlohmann::json& v, const char* name) {
    constexpr double kLimit = 4611686018427387904.0;  // 2^62
    const bool ok = v.is_number_integer() ? (v.is_number_unsigned() ? v.get<std::uint64_t>() <= (std::uint64_t{1} << 62)
                                                                    : std::fabs(static_cast<double>(v.get<std::int64_t>())) <= kLimit)
                                          : !v.is_number_float() || (std::floor(v.get<double>()) == v.get<double>() &&
                                                                     std::fabs(v.get<double>()) <= kLimit);
    if (!ok) throw InputError(std::string("wan vae config: field '") + name + "' must be an integer up to 2^62, got " + v.dump());
  };
  auto read = [&](std::initializer_list<const char*> names, auto& target) {
    const nlohmann::json* v = field(names);
    if (!v) return;
    using Target = std::decay_t<decltype(target)>;
    if constexpr (std::is_same_v<Target, std::int64_t>) {
      check_integer(*v, *names.begin());
    } else if constexpr (std::is_same_v<Target, std::vector<std::int64_t>>) {
      if (v->is_array())
        for (const auto& e : *v) check_integer(e, *names.begin());
    }
    try {
      v->get_to(target);
    } catch (const nlohmann::json::exception&) {
      throw InputError(std::string("wan vae config: field '") + *names.begin() + "' has the wrong type");
    }
  };
  read({"dim", "base_dim"}, c.dim);
  read({"z_dim"}, c.z_dim);
  read({"dim_mult"}, c.dim_mult);
  read({"num_res_blocks"}, c.num_res_blocks);
  read({"attn_scales"}, c.attn_scales);
  read({"temperal_downsample", "temporal_downsample"}, c.temporal_downsample);
  read({"latents_mean", "latent_mean"}, c.latent_mean);
  read({"latents_std", "latent_std"}, c.latent_std);
  // Statistics the config gives are checked as given.
  neutral_statistics_where_missing(c, field({"latents_mean", "latent_mean"}) != nullptr,
                                   field({"latents_std", "latent_std"}) != nullptr);
  c.validate();
  return c;
}

namespace {

// The keys of a file that belong to the VAE, as (stored key, key without prefix). A file that
// holds a whole pipeline keeps the VAE under "first_stage_model." (ComfyUI) or "vae.".
std::vector<std::pair<std::string, std::string>> vae_keys(const WeightFile& file) {
  std::string prefix;
  for (const char* p : {"first_stage_model.", "vae."}) {
    for (const auto& k : file.keys())
      if (starts_with(k, p)) {
        prefix = p;
        break;
      }
    if (!prefix.empty()) break;
  }
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& k : file.keys()) {
    if (prefix.empty()) out.emplace_back(k, k);
    else if (starts_with(k, prefix)) out.emplace_back(k, k.substr(prefix.size()));
  }
  return out;
}

// diffusers resnet leaf <-> original leaf (resample/time_conv leaves are spelled the same); one
// table for both directions.
std::string residual_leaf(const std::string& leaf, bool to_original = true) {
  static const std::array<std::pair<const char*, const char*>, 5> kMap{{{"norm1.", "residual.0."},
                                                                        {"conv1.", "residual.2."},
                                                                        {"norm2.", "residual.3."},
                                                                        {"conv2.", "residual.6."},
                                                                        {"conv_shortcut.", "shortcut."}}};
  for (const auto& [diffusers, original] : kMap) {
    const std::string from = to_original ? diffusers : original, to = to_original ? original : diffusers;
    if (starts_with(leaf, from)) return to + leaf.substr(from.size());
  }
  return leaf;
}

// Splits "N.rest" into N and rest; false when the text does not start with a number and a dot.
bool split_index(const std::string& s, std::int64_t& index, std::string& rest) {
  std::size_t dot = s.find('.');
  if (dot == 0 || dot == std::string::npos) return false;
  for (std::size_t i = 0; i < dot; ++i)
    if (s[i] < '0' || s[i] > '9') return false;
  index = std::stoll(s.substr(0, dot));
  rest = s.substr(dot + 1);
  return true;
}

}  // namespace

std::string canonical_wan_vae_key(const std::string& key_in, std::int64_t num_res_blocks) {
  std::string key = key_in;
  for (const char* p : {"first_stage_model.", "vae."})
    if (starts_with(key, p)) key = key.substr(std::string(p).size());
  if (starts_with(key, "quant_conv.")) return "conv1." + key.substr(11);
  if (starts_with(key, "post_quant_conv.")) return "conv2." + key.substr(16);
  for (const std::string side : {"encoder.", "decoder."}) {
    if (!starts_with(key, side)) continue;
    const std::string rest = key.substr(side.size());
    std::int64_t i = 0, k = 0;
    std::string tail, tail2;
    if (starts_with(rest, "conv_in.")) return side + "conv1." + rest.substr(8);
    if (starts_with(rest, "conv_out.")) return side + "head.2." + rest.substr(9);
    if (starts_with(rest, "norm_out.")) return side + "head.0." + rest.substr(9);
    if (starts_with(rest, "mid_block.attentions.0.")) return side + "middle.1." + rest.substr(23);
    if (starts_with(rest, "mid_block.resnets.") && split_index(rest.substr(18), i, tail)) {
      return side + "middle." + std::to_string(2 * i) + "." + residual_leaf(tail);
    }
    if (side == "encoder." && starts_with(rest, "down_blocks.") && split_index(rest.substr(12), i, tail)) {
      return side + "downsamples." + std::to_string(i) + "." + residual_leaf(tail);
    }
    if (side == "decoder." && starts_with(rest, "up_blocks.") && split_index(rest.substr(10), i, tail)) {
      const std::int64_t per_stage = num_res_blocks + 2;  // resnets then one upsampler
      if (starts_with(tail, "resnets.") && split_index(tail.substr(8), k, tail2)) {
        return side + "upsamples." + std::to_string(i * per_stage + k) + "." + residual_leaf(tail2);
      }
      if (starts_with(tail, "upsamplers.0.")) {
        return side + "upsamples." + std::to_string(i * per_stage + num_res_blocks + 1) + "." + tail.substr(13);
      }
    }
  }
  return key;
}

std::string diffusers_wan_vae_key(const std::string& key, std::int64_t num_res_blocks) {
  // The inverse of canonical_wan_vae_key on AutoencoderKLWan names.
  auto residual = [](const std::string& leaf) { return residual_leaf(leaf, false); };
  if (starts_with(key, "conv1.")) return "quant_conv." + key.substr(6);
  if (starts_with(key, "conv2.")) return "post_quant_conv." + key.substr(6);
  for (const std::string side : {"encoder.", "decoder."}) {
    if (!starts_with(key, side)) continue;
    const std::string rest = key.substr(side.size());
    std::int64_t i = 0;
    std::string tail;
    if (starts_with(rest, "conv1.")) return side + "conv_in." + rest.substr(6);
    if (starts_with(rest, "head.2.")) return side + "conv_out." + rest.substr(7);
    if (starts_with(rest, "head.0.")) return side + "norm_out." + rest.substr(7);
    if (starts_with(rest, "middle.") && split_index(rest.substr(7), i, tail)) {
      if (i == 1) return side + "mid_block.attentions.0." + tail;
      return side + "mid_block.resnets." + std::to_string(i / 2) + "." + residual(tail);
    }
    if (side == "encoder." && starts_with(rest, "downsamples.") && split_index(rest.substr(12), i, tail))
      return side + "down_blocks." + std::to_string(i) + "." + residual(tail);
    if (side == "decoder." && starts_with(rest, "upsamples.") && split_index(rest.substr(10), i, tail)) {
      const std::int64_t per_stage = num_res_blocks + 2, stage = i / per_stage, k = i % per_stage;
      if (k == num_res_blocks + 1) return side + "up_blocks." + std::to_string(stage) + ".upsamplers.0." + tail;
      return side + "up_blocks." + std::to_string(stage) + ".resnets." + std::to_string(k) + "." + residual(tail);
    }
  }
  return key;
}

WanVAEConfig WanVAEConfig::infer_from_weights(const WeightFile& file) {
  // Encoder names do not depend on num_res_blocks, and only the encoder is read here.
  std::map<std::string, std::vector<std::int64_t>> shapes;
  for (const auto& [stored, bare] : vae_keys(file)) shapes[canonical_wan_vae_key(bare)] = file.meta(stored).shape;
  auto shape = [&](const std::string& k) -> const std::vector<std::int64_t>* {
    auto it = shapes.find(k);
    return it == shapes.end() ? nullptr : &it->second;
  };
  auto has_prefix = [&](const std::string& p) {
    auto it = shapes.lower_bound(p);
    return it != shapes.end() && starts_with(it->first, p);
  };
  const auto* conv_in = shape("encoder.conv1.weight");
  if (!conv_in || conv_in->size() != 5 || (*conv_in)[1] != 3)
    throw InputError(file.path() + ": not a Wan VAE checkpoint (no encoder.conv1.weight of shape [C,3,3,3,3])");
  WanVAEConfig c;
  c.dim = (*conv_in)[0];
  if (const auto* s = shape("conv2.weight")) c.z_dim = (*s)[0];
  else if (const auto* s2 = shape("decoder.conv1.weight")) c.z_dim = (*s2)[1];
  else throw InputError(file.path() + ": not a Wan VAE checkpoint (no conv2.weight)");

  std::vector<std::int64_t> stage_out;
  std::vector<std::int64_t> stage_blocks;
  std::int64_t current_out = 0, current_blocks = 0;
  c.temporal_downsample.clear();
  c.attn_scales.clear();
  for (std::int64_t j = 0; has_prefix("encoder.downsamples." + std::to_string(j) + "."); ++j) {
    const std::string p = "encoder.downsamples." + std::to_string(j) + ".";
    if (const auto* s = shape(p + "residual.2.weight")) {
      current_out = (*s)[0];
      ++current_blocks;
    } else if (shape(p + "resample.1.weight")) {
      stage_out.push_back(current_out);
      stage_blocks.push_back(current_blocks);
      current_blocks = 0;
      c.temporal_downsample.push_back(shape(p + "time_conv.weight") != nullptr);
    } else if (shape(p + "to_qkv.weight")) {
      const double scale = 1.0 / static_cast<double>(std::int64_t{1} << stage_out.size());
      if (!has_scale(c.attn_scales, scale)) c.attn_scales.push_back(scale);
    } else {
      throw InputError(file.path() + ": unrecognised Wan VAE encoder block 'encoder.downsamples." +
                       std::to_string(j) + "'");
    }
  }
  stage_out.push_back(current_out);
  stage_blocks.push_back(current_blocks);
  c.dim_mult.clear();
  for (std::size_t i = 0; i < stage_out.size(); ++i) {
    if (stage_out[i] <= 0 || stage_out[i] % c.dim != 0 || stage_blocks[i] != stage_blocks[0])
      throw InputError(file.path() + ": inconsistent Wan VAE encoder stage " + std::to_string(i));
    c.dim_mult.push_back(stage_out[i] / c.dim);
  }
  c.num_res_blocks = stage_blocks[0];
  neutral_statistics_where_missing(c, /*mean_given=*/false, /*std_given=*/false);
  c.validate();
  return c;
}

// ---------------------------------------------------------------------------------------------
// Weights

void load_wan_vae_weights(WanVAE& vae, const WeightFile& file, at::ScalarType dtype) {
  if (!at::isFloatingType(dtype)) throw InputError("wan vae: weights dtype must be floating point");
  const std::int64_t nrb = vae->config().num_res_blocks;
  std::map<std::string, std::string> stored_of;  // canonical -> stored key
  for (const auto& [stored, bare] : vae_keys(file)) {
    const std::string canonical = canonical_wan_vae_key(bare, nrb);
    auto [it, fresh] = stored_of.emplace(canonical, stored);
    if (!fresh)
      throw InputError(file.path() + ": tensors '" + it->second + "' and '" + stored +
                       "' are both the Wan VAE weight '" + canonical + "'");
  }
  // Check everything before touching the model, so a bad file leaves it as it was.
  auto params = vae->named_parameters(/*recurse=*/true);
  std::set<std::string> used;
  for (const auto& p : params) {
    auto it = stored_of.find(p.key());
    if (it == stored_of.end()) throw InputError(file.path() + ": missing Wan VAE weight '" + p.key() + "'");
    const TensorMeta& meta = file.meta(it->second);
    if (!at::IntArrayRef(meta.shape).equals(p.value().sizes()))
      throw InputError(file.path() + ": Wan VAE weight '" + it->second + "' has shape " + shape_str(meta.shape) +
                       ", expected " + shape_str(p.value().sizes()));
    if (meta.dtype != "F32" && meta.dtype != "F16" && meta.dtype != "BF16" && meta.dtype != "F64" &&
        !starts_with(meta.dtype, "F8"))
      throw InputError(file.path() + ": Wan VAE weight '" + it->second + "' has non-float dtype " + meta.dtype);
    used.insert(p.key());
  }
  for (const auto& [canonical, stored] : stored_of)
    if (!used.count(canonical))
      throw InputError(file.path() + ": unexpected tensor '" + stored + "' (not a weight of this Wan VAE config)");

  torch::NoGradGuard no_grad;
  const at::Device device = vae->device();
  for (auto& p : params) {
    at::Tensor t = file.load(stored_of.at(p.key())).to(device, dtype).contiguous();
    p.value().set_data(t);
    p.value().set_requires_grad(false);
  }
}

// ---------------------------------------------------------------------------------------------
// Tiling helpers

namespace {

struct Span {
  std::int64_t begin, end;
};

// Tiles of `tile` units with at least `overlap` units shared by neighbours; the last tile is
// moved back to end at `length`, so all tiles have the same size.
std::vector<Span> tile_spans(std::int64_t length, std::int64_t tile, std::int64_t overlap) {
  if (length <= tile) return {{0, length}};
  std::vector<Span> spans;
  for (std::int64_t s = 0;; s += tile - overlap) {
    if (s + tile >= length) {
      spans.push_back({length - tile, length});
      break;
    }
    spans.push_back({s, s + tile});
  }
  return spans;
}

// Blend weights of tile k along one axis, in units `factor` times finer than the spans: a linear
// ramp across each overlap with a neighbour, 1 elsewhere. Normalised later by the weight sum.
at::Tensor blend_ramp(const std::vector<Span>& spans, std::size_t k, std::int64_t factor,
                      const at::TensorOptions& options) {
  const std::int64_t begin = spans[k].begin * factor, end = spans[k].end * factor, n = end - begin;
  at::Tensor pos = at::arange(n, options).add_(0.5);  // pixel centres, from the tile's start
  at::Tensor w = at::ones({n}, options);
  if (k > 0) {
    const std::int64_t ov = spans[k - 1].end * factor - begin;
    if (ov > 0) w.mul_(pos.div(static_cast<double>(ov)).clamp_max_(1.0));
  }
  if (k + 1 < spans.size()) {
    const std::int64_t ov = end - spans[k + 1].begin * factor;
    if (ov > 0) w.mul_(pos.neg().add_(static_cast<double>(n)).div_(static_cast<double>(ov)).clamp_max_(1.0));
  }
  return w;
}

void check_tiling(const VAETiling& t) {
  if (t.tile_px <= 0 || t.tile_px % 8 != 0)
    throw InputError("vae tiling: tile size " + std::to_string(t.tile_px) + " px must be a positive multiple of 8");
  if (t.overlap_px < 0 || t.overlap_px % 8 != 0 || t.overlap_px >= t.tile_px)
    throw InputError("vae tiling: overlap " + std::to_string(t.overlap_px) +
                     " px must be a multiple of 8 and smaller than the tile size");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// WanVAEImpl

WanVAEImpl::WanVAEImpl(const WanVAEConfig& config) : config_(config) {
  config_.validate();
  encoder_ = register_module("encoder", std::make_shared<Encoder3dImpl>(config_));
  conv1_ = register_module("conv1", make_conv1(2 * config_.z_dim, 2 * config_.z_dim));
  conv2_ = register_module("conv2", make_conv1(config_.z_dim, config_.z_dim));
  decoder_ = register_module("decoder", std::make_shared<Decoder3dImpl>(config_));
}

at::ScalarType WanVAEImpl::dtype() const { return conv1_->weight.scalar_type(); }
at::Device WanVAEImpl::device() const { return conv1_->weight.device(); }

at::Tensor WanVAEImpl::normalize_latent(const at::Tensor& mu) const {
  auto opts = mu.options().dtype(at::kFloat);
  at::Tensor mean = at::tensor(config_.latent_mean, at::TensorOptions().dtype(at::kFloat)).to(opts.device());
  at::Tensor inv_std = at::tensor(config_.latent_std, at::TensorOptions().dtype(at::kFloat)).to(opts.device()).reciprocal();
  return (mu.to(at::kFloat) - mean.view({1, -1, 1, 1, 1})) * inv_std.view({1, -1, 1, 1, 1});
}

at::Tensor WanVAEImpl::denormalize_latent(const at::Tensor& z) const {
  auto device = z.device();
  at::Tensor mean = at::tensor(config_.latent_mean, at::TensorOptions().dtype(at::kFloat)).to(device);
  at::Tensor inv_std = at::tensor(config_.latent_std, at::TensorOptions().dtype(at::kFloat)).to(device).reciprocal();
  // Divides by 1/std, not multiplies by std, exactly like the reference.
  return z.to(at::kFloat) / inv_std.view({1, -1, 1, 1, 1}) + mean.view({1, -1, 1, 1, 1});
}

at::Tensor WanVAEImpl::check_video(const at::Tensor& video) const {
  if (!video.defined() || video.dim() != 5 || video.size(1) != 3)
    throw InputError("wan vae encode: expected a video [B,3,F,H,W], got " +
                     (video.defined() ? shape_str(video.sizes()) : std::string("nothing")));
  if (video.size(2) < 1 || (video.size(2) - 1) % kEncodeChunkFrames != 0)
    throw InputError("wan vae encode: frame count " + std::to_string(video.size(2)) + " is not 4n+1");
  const std::int64_t s = config_.spatial_stride();
  if (video.size(3) < s || video.size(4) < s)
    throw InputError("wan vae encode: frames of " + std::to_string(video.size(3)) + "x" +
                     std::to_string(video.size(4)) + " are smaller than the " + std::to_string(s) + " px stride");
  if (!at::isFloatingType(video.scalar_type())) throw InputError("wan vae encode: video must be floating point");
  return video.to(device(), dtype());
}

at::Tensor WanVAEImpl::prepare_latent(const at::Tensor& latent) const {
  if (!latent.defined() || latent.dim() != 5 || latent.size(1) != config_.z_dim || latent.size(2) < 1)
    throw InputError("wan vae decode: expected a latent [B," + std::to_string(config_.z_dim) + ",F,h,w], got " +
                     (latent.defined() ? shape_str(latent.sizes()) : std::string("nothing")));
  if (!at::isFloatingType(latent.scalar_type())) throw InputError("wan vae decode: latent must be floating point");
  at::Tensor z = denormalize_latent(latent.to(device())).to(dtype());
  return conv2_->forward(z);
}

std::pair<at::Tensor, at::Tensor> WanVAEImpl::encode_moments(const at::Tensor& video) {
  const at::Tensor out = encode_moments_untiled(check_video(video));
  return {out.narrow(1, 0, config_.z_dim), out.narrow(1, config_.z_dim, config_.z_dim)};
}

at::Tensor WanVAEImpl::encode_moments_untiled(const at::Tensor& x) {
  FeatureCache cache;
  std::vector<at::Tensor> outs;
  const std::int64_t frames = x.size(2);
  for (std::int64_t start = 0; start < frames;) {
    const std::int64_t len = start == 0 ? 1 : kEncodeChunkFrames;
    cache.rewind();
    outs.push_back(encoder_->forward(x.narrow(2, start, len), cache));
    start += len;
  }
  return conv1_->forward(at::cat(outs, 2));
}

at::Tensor WanVAEImpl::encode_mu_untiled(const at::Tensor& x) {
  return encode_moments_untiled(x).narrow(1, 0, config_.z_dim).to(at::kFloat);  // (mu, log_var): keep mu
}

at::Tensor WanVAEImpl::encode_raw_mu(const at::Tensor& video, const VAETiling& tiling) {
  at::Tensor x = check_video(video);
  if (!tiling.enabled) return encode_mu_untiled(x);
  check_tiling(tiling);
  const std::int64_t s = config_.spatial_stride();
  const std::int64_t H = x.size(3), W = x.size(4);
  const std::int64_t tile = tiling.tile_px / s, overlap = tiling.overlap_px / s;
  if (H <= tiling.tile_px && W <= tiling.tile_px) return encode_mu_untiled(x);
  if (H % s != 0 || W % s != 0)
    throw InputError("wan vae encode: tiled encoding needs frame sizes divisible by " + std::to_string(s) + ", got " +
                     std::to_string(H) + "x" + std::to_string(W));
  // Spans are in latent pixels (blocks of s x s video pixels).
  const auto hs = tile_spans(H / s, tile, overlap), ws = tile_spans(W / s, tile, overlap);
  at::Tensor out, weight_sum;
  for (std::size_t i = 0; i < hs.size(); ++i) {
    for (std::size_t j = 0; j < ws.size(); ++j) {
      at::Tensor crop = x.slice(3, hs[i].begin * s, hs[i].end * s).slice(4, ws[j].begin * s, ws[j].end * s);
      at::Tensor mu = encode_mu_untiled(crop);
      if (!out.defined()) {
        out = at::zeros({mu.size(0), mu.size(1), mu.size(2), H / s, W / s}, mu.options());
        weight_sum = at::zeros({H / s, W / s}, mu.options());
      }
      at::Tensor w = blend_ramp(hs, i, 1, mu.options()).unsqueeze(1) * blend_ramp(ws, j, 1, mu.options()).unsqueeze(0);
      out.slice(3, hs[i].begin, hs[i].end).slice(4, ws[j].begin, ws[j].end).add_(mu * w);
      weight_sum.slice(0, hs[i].begin, hs[i].end).slice(1, ws[j].begin, ws[j].end).add_(w);
    }
  }
  return out.div_(weight_sum);
}

at::Tensor WanVAEImpl::encode(const at::Tensor& video, const VAETiling& tiling) {
  return normalize_latent(encode_raw_mu(video, tiling));
}

at::Tensor WanVAEImpl::decode_untiled(const at::Tensor& x) {
  FeatureCache cache;
  at::Tensor out;
  const std::int64_t frames = x.size(2);
  std::int64_t written = 0;
  for (std::int64_t i = 0; i < frames; ++i) {
    cache.rewind();
    at::Tensor chunk = decoder_->forward(x.narrow(2, i, 1), cache);
    if (!out.defined()) {
      // Frame 0 decodes to one frame, every later latent frame to temporal_stride frames.
      const std::int64_t total = chunk.size(2) + (frames - 1) * config_.temporal_stride();
      out = at::empty({chunk.size(0), chunk.size(1), total, chunk.size(3), chunk.size(4)},
                      chunk.options().dtype(at::kFloat));
    }
    TORCH_CHECK(written + chunk.size(2) <= out.size(2), "wan vae decode: unexpected chunk length");
    out.narrow(2, written, chunk.size(2)).copy_(chunk);
    written += chunk.size(2);
  }
  TORCH_CHECK(written == out.size(2), "wan vae decode: unexpected output length");
  return out;
}

at::Tensor WanVAEImpl::decode_unclamped(const at::Tensor& latent, const VAETiling& tiling) {
  at::Tensor x = prepare_latent(latent);
  if (!tiling.enabled) return decode_untiled(x);
  check_tiling(tiling);
  const std::int64_t s = config_.spatial_stride();
  const std::int64_t h = x.size(3), w = x.size(4);
  const std::int64_t tile = tiling.tile_px / s, overlap = tiling.overlap_px / s;
  if (h <= tile && w <= tile) return decode_untiled(x);
  const auto hs = tile_spans(h, tile, overlap), ws = tile_spans(w, tile, overlap);
  at::Tensor out, weight_sum;
  for (std::size_t i = 0; i < hs.size(); ++i) {
    for (std::size_t j = 0; j < ws.size(); ++j) {
      at::Tensor video = decode_untiled(x.slice(3, hs[i].begin, hs[i].end).slice(4, ws[j].begin, ws[j].end));
      if (!out.defined()) {
        out = at::zeros({video.size(0), video.size(1), video.size(2), h * s, w * s}, video.options());
        weight_sum = at::zeros({h * s, w * s}, video.options());
      }
      at::Tensor wt = blend_ramp(hs, i, s, video.options()).unsqueeze(1) * blend_ramp(ws, j, s, video.options()).unsqueeze(0);
      out.slice(3, hs[i].begin * s, hs[i].end * s).slice(4, ws[j].begin * s, ws[j].end * s).add_(video * wt);
      weight_sum.slice(0, hs[i].begin * s, hs[i].end * s).slice(1, ws[j].begin * s, ws[j].end * s).add_(wt);
    }
  }
  return out.div_(weight_sum);
}

void WanVAEImpl::decode_stream(const at::Tensor& latent, std::int64_t chunk_latent_frames,
                               const std::function<void(const at::Tensor&)>& on_frames) {
  if (chunk_latent_frames < 1) throw InputError("wan vae decode: chunks must hold at least one latent frame");
  const at::Tensor x = prepare_latent(latent);  // conv2 is 1x1x1: per frame, latent-sized
  FeatureCache cache;
  std::vector<at::Tensor> pending;
  const std::int64_t frames = x.size(2);
  for (std::int64_t i = 0; i < frames; ++i) {
    cache.rewind();
    pending.push_back(decoder_->forward(x.narrow(2, i, 1), cache).to(at::kFloat));
    if (static_cast<std::int64_t>(pending.size()) == chunk_latent_frames || i + 1 == frames) {
      on_frames(at::cat(pending, 2).clamp_(-1.0, 1.0));
      pending.clear();
    }
  }
}

at::Tensor WanVAEImpl::decode(const at::Tensor& latent, const VAETiling& tiling) {
  return decode_unclamped(latent, tiling).clamp_(-1.0, 1.0);
}

}  // namespace vdit
