// The one attention entry point every model calls, and the hook interface (attention processors)
// through which guidance and editing methods change attention per layer and per head.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>

namespace vdit {

// The 3D token grid of a video latent after patching: T latent frames of H x W tokens, flattened
// in (t, h, w) order with w fastest.
struct Grid3 {
  std::int64_t t = 1, h = 1, w = 1;
  std::int64_t numel() const { return t * h * w; }
};

// A 3D neighbourhood window: per-axis kernel sizes (a size <= 0 or >= the axis means the whole
// axis) and dilations. Windows are clamped inward at borders, so every query sees exactly
// prod(size) keys (NATTEN's non-causal rule).
struct Window3 {
  std::array<std::int64_t, 3> size{0, 0, 0};
  std::array<std::int64_t, 3> dilation{1, 1, 1};
};

struct AttentionCall {
  double scale = 0.0;               // softmax scale; 0 means 1/sqrt(head_dim)
  Grid3 grid;                       // token grid of the queries (self-attention: of the keys too)
  std::optional<Window3> window;    // nullopt: full attention
  std::int64_t valid_keys = -1;     // keys at index >= valid_keys are masked out; -1: all keys
};

// q [B, heads, Nq, D], k and v [B, heads, Nk, D] -> [B, heads, Nq, D] in q's dtype.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call);

enum class AttentionKind { Self, Cross };

// Where an attention call sits in a model, handed to hooks.
struct AttentionSite {
  int layer = 0;
  AttentionKind kind = AttentionKind::Self;
  int branch = 0;  // which forward of a guided step (0 cond, 1 uncond, ...), set by pipelines
};

// An attention processor. Models call hooks->attend() instead of attention() when a hook is set;
// with no hook the fast path runs untouched.
class AttentionHooks {
 public:
  virtual ~AttentionHooks() = default;
  virtual at::Tensor attend(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const AttentionCall& call) {
    return attention(q, k, v, call);
  }
};

}  // namespace vdit
