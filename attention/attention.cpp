// Placeholder inside of the attention entry point: exact softmax attention over query blocks, so
// no N x N score matrix is formed for long sequences. The attention-engine work replaces this.
#include "vdit/attention/attention.h"

#include <cmath>
#include <limits>

namespace vdit {

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention expects [B, heads, N, D]");
  TORCH_CHECK(!call.window.has_value(), "windowed attention is not implemented yet");
  const double scale = call.scale > 0 ? call.scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  const std::int64_t nq = q.size(2), nk = k.size(2);
  const std::int64_t block = 1024;
  at::Tensor kt = k.transpose(-2, -1);
  at::Tensor key_mask;
  if (call.valid_keys >= 0 && call.valid_keys < nk) {
    key_mask = at::arange(nk, q.options().dtype(at::kLong)).ge(call.valid_keys);
  }
  at::Tensor out = at::empty_like(q);
  for (std::int64_t s = 0; s < nq; s += block) {
    const std::int64_t e = std::min(nq, s + block);
    at::Tensor scores = at::matmul(q.slice(2, s, e), kt).to(at::kFloat).mul_(scale);
    if (key_mask.defined()) scores.masked_fill_(key_mask, -std::numeric_limits<float>::infinity());
    at::Tensor probs = at::softmax(scores, -1).to(v.scalar_type());
    out.slice(2, s, e).copy_(at::matmul(probs, v));
  }
  return out;
}

}  // namespace vdit
