// Device-agnostic backend written with plain ATen ops: query blocks with an exact softmax over
// all (valid) keys, and for windows the same query boxes as the CPU kernel with a boolean mask.
// It is differentiable (no in-place ops on inputs), so it also serves calls that need autograd.
#include "attention_internal.h"

#include "vdit/common.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace vdit::detail {
namespace {

// Scores are computed and kept in f32 (f64 stays f64) whatever the input dtype: a bf16 score
// matrix alone costs ~1% relative error after the softmax, which is what flash kernels avoid by
// keeping scores in f32 registers. Only P·V runs in the input dtype.
at::ScalarType score_dtype(at::ScalarType t) { return at::promote_types(t, at::kFloat); }

constexpr double kScoreBudgetBytes = 256.0 * 1024 * 1024;

at::Tensor tile_indices(const AxisTile& tile, bool keys) {
  const std::int64_t first = keys ? tile.k_first : tile.q_first;
  const std::int64_t count = keys ? tile.k_count : tile.q_count;
  return at::arange(count, at::kLong) * tile.step + first;
}

at::Tensor tile_mask(const AxisTile& tile) {
  at::Tensor m = at::zeros({tile.q_count, tile.k_count}, at::kBool);
  auto acc = m.accessor<bool, 2>();
  for (std::int64_t i = 0; i < tile.q_count; ++i)
    for (std::int64_t j = tile.lo[i]; j <= tile.hi[i]; ++j) acc[i][j] = true;
  return m;
}

}  // namespace

at::Tensor generic_full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const auto B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2);
  if (Nk == 0) return at::zeros({B, H, Nq, v.size(3)}, q.options());
  const double per_row = 4.0 * std::max<std::int64_t>(1, B * H * Nk);
  const std::int64_t block = std::clamp<std::int64_t>(static_cast<std::int64_t>(kScoreBudgetBytes / per_row), 16,
                                                      std::max<std::int64_t>(Nq, 1));
  const at::Tensor kt = k.transpose(-2, -1).to(score_dtype(q.scalar_type()));
  std::vector<at::Tensor> outs;
  for (std::int64_t s = 0; s < Nq; s += block) {
    const std::int64_t e = std::min(Nq, s + block);
    const at::ScalarType sd = score_dtype(q.scalar_type());
    const at::Tensor scores = at::matmul(q.slice(2, s, e).to(sd), kt) * scale;
    outs.push_back(matmul_f32_accumulate(at::softmax(scores, -1).to(v.scalar_type()), v));
  }
  return outs.empty() ? at::empty({B, H, 0, v.size(3)}, q.options()) : at::cat(outs, 2);
}

at::Tensor generic_window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                    const WindowPlan& plan, const Grid3& grid) {
  const auto B = q.size(0), H = q.size(1);
  const auto& tt = plan.axis[0].tiles;
  const auto& th = plan.axis[1].tiles;
  const auto& tw = plan.axis[2].tiles;
  const auto flat = [&](const at::Tensor& it, const at::Tensor& ih, const at::Tensor& iw) {
    return (it.view({-1, 1, 1}) * (grid.h * grid.w) + ih.view({1, -1, 1}) * grid.w + iw.view({1, 1, -1})).reshape({-1});
  };
  std::vector<at::Tensor> outs, order;
  for (const AxisTile& a : tt) {
    for (const AxisTile& b : th) {
      for (const AxisTile& c : tw) {
        const at::Tensor qi = flat(tile_indices(a, false), tile_indices(b, false), tile_indices(c, false)).to(q.device());
        const at::Tensor ki = flat(tile_indices(a, true), tile_indices(b, true), tile_indices(c, true)).to(q.device());
        const at::Tensor mask = (tile_mask(a).view({a.q_count, 1, 1, a.k_count, 1, 1}) &
                                 tile_mask(b).view({1, b.q_count, 1, 1, b.k_count, 1}) &
                                 tile_mask(c).view({1, 1, c.q_count, 1, 1, c.k_count}))
                                    .reshape({qi.size(0), ki.size(0)})
                                    .to(q.device());
        const double per_head = 4.0 * B * qi.size(0) * ki.size(0);
        const std::int64_t heads_per_step =
            std::clamp<std::int64_t>(static_cast<std::int64_t>(kScoreBudgetBytes / per_head), 1, H);
        std::vector<at::Tensor> parts;
        for (std::int64_t h0 = 0; h0 < H; h0 += heads_per_step) {
          const std::int64_t h1 = std::min(H, h0 + heads_per_step);
          const at::Tensor qb = q.slice(1, h0, h1).index_select(2, qi);
          const at::Tensor kb = k.slice(1, h0, h1).index_select(2, ki);
          const at::Tensor vb = v.slice(1, h0, h1).index_select(2, ki);
          const at::ScalarType sd = score_dtype(q.scalar_type());
          const at::Tensor scores = (at::matmul(qb.to(sd), kb.to(sd).transpose(-2, -1)) * scale)
                                        .masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
          parts.push_back(matmul_f32_accumulate(at::softmax(scores, -1).to(v.scalar_type()), vb));
        }
        outs.push_back(parts.size() == 1 ? parts[0] : at::cat(parts, 1));
        order.push_back(qi);
      }
    }
  }
  const at::Tensor boxed = at::cat(outs, 2);
  const at::Tensor inverse = at::argsort(at::cat(order));
  return boxed.index_select(2, inverse);
}

}  // namespace vdit::detail
