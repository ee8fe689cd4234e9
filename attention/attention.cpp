// The attention entry point: input checks, backend choice, FLOP accounting, the materialised
// reference and the hook base.
#include "attention_internal.h"

#include "vdit/common.h"

#include <torch/version.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <sstream>

namespace vdit {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionCall& call) {
  if (!q.defined() || !k.defined() || !v.defined()) throw InputError("attention: q, k and v must be defined tensors");
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) {
    throw InputError("attention: q, k, v must be [B, heads, N, D], got q " + shape_of(q) + ", k " + shape_of(k) +
                     ", v " + shape_of(v));
  }
  if (k.size(0) != q.size(0) || v.size(0) != q.size(0) || k.size(1) != q.size(1) || v.size(1) != q.size(1) ||
      k.size(3) != q.size(3) || v.size(2) != k.size(2)) {
    throw InputError("attention: shapes disagree: q " + shape_of(q) + ", k " + shape_of(k) + ", v " + shape_of(v));
  }
  if (k.scalar_type() != q.scalar_type() || v.scalar_type() != q.scalar_type() || !at::isFloatingType(q.scalar_type())) {
    throw InputError("attention: q, k, v must share one floating dtype, got " + std::string(c10::toString(q.scalar_type())) +
                     ", " + c10::toString(k.scalar_type()) + ", " + c10::toString(v.scalar_type()));
  }
  if (k.device() != q.device() || v.device() != q.device()) throw InputError("attention: q, k, v on different devices");
  if (!(call.scale >= 0.0) || !std::isfinite(call.scale)) throw InputError("attention: scale must be >= 0 (0: 1/sqrt(head_dim))");
  if (!(call.scale_factor > 0.0) || !std::isfinite(call.scale_factor)) throw InputError("attention: scale_factor must be > 0");
  if (call.valid_keys < -1) throw InputError("attention: valid_keys must be >= 0 (or -1 for all keys)");
  if (call.window) {
    const auto& w = *call.window;
    for (int a = 0; a < 3; ++a) {
      if (w.dilation[a] < 1) throw InputError("attention: window dilation must be >= 1 on every axis");
    }
    if (call.grid.t < 1 || call.grid.h < 1 || call.grid.w < 1)
      throw InputError("attention: windowed attention needs a grid with every axis >= 1");
    if (q.size(2) != call.grid.numel() || k.size(2) != call.grid.numel()) {
      throw InputError("attention: windowed attention needs Nq = Nk = grid T·H·W = " + std::to_string(call.grid.numel()) +
                       ", got Nq " + std::to_string(q.size(2)) + ", Nk " + std::to_string(k.size(2)));
    }
    if (call.valid_keys >= 0 && call.valid_keys < k.size(2))
      throw InputError("attention: valid_keys cannot be combined with a window");
  }
}

// The window, or nullopt when it covers the whole grid (plain full attention).
std::optional<Window3> effective_window(const AttentionCall& call) {
  if (!call.window || detail::window_is_full(call.grid, *call.window)) return std::nullopt;
  return call.window;
}

std::int64_t keys_used(const AttentionCall& call, std::int64_t nk) {
  return call.valid_keys >= 0 ? std::min(call.valid_keys, nk) : nk;
}

std::mutex counters_mutex;
AttentionCounters counters;
std::mutex tuning_mutex;
AttentionTuning tuning_value;

bool wants_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
}

}  // namespace

double effective_scale(const AttentionCall& call, std::int64_t head_dim) {
  const double base = call.scale > 0 ? call.scale : 1.0 / std::sqrt(static_cast<double>(std::max<std::int64_t>(head_dim, 1)));
  return base * call.scale_factor;
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in, const AttentionCall& call) {
  check_inputs(q, k_in, v_in, call);
  const double scale = effective_scale(call, q.size(3));
  const std::int64_t nk = keys_used(call, k_in.size(2));
  // Masked keys form a suffix: dropping them equals masking them.
  const at::Tensor k = nk < k_in.size(2) ? k_in.narrow(2, 0, nk) : k_in;
  const at::Tensor v = nk < v_in.size(2) ? v_in.narrow(2, 0, nk) : v_in;
  const bool cpu_kernel = call.backend == AttentionBackend::Auto && q.is_cpu() &&
                          (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) && !wants_grad(q, k, v);
  const std::optional<Window3> window = effective_window(call);
  const double dims = static_cast<double>(q.size(3) + v.size(3));
  const double bh = static_cast<double>(q.size(0) * q.size(1));
  at::Tensor out;
  double useful = 0, spent = 0;
  if (window) {
    const auto plan = detail::plan_window(call.grid, *window);
    out = cpu_kernel ? detail::cpu_window_attention(q, k, v, scale, *plan, call.grid)
                     : detail::generic_window_attention(q, k, v, scale, *plan, call.grid);
    useful = 2.0 * dims * bh * plan->visible_pairs;
    spent = 2.0 * dims * bh * plan->spent_pairs;
  } else {
    useful = spent = 2.0 * dims * bh * static_cast<double>(q.size(2)) * static_cast<double>(nk);
#if TORCH_VERSION_MAJOR >= 2
    if (call.backend == AttentionBackend::Auto && q.is_cuda() && nk > 0) {
      // Flash / memory-efficient kernels; SDPA takes an explicit scale from 2.1 on.
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 1
      out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, scale);
#else
      out = at::scaled_dot_product_attention(q * (scale * std::sqrt(static_cast<double>(q.size(3)))), k, v, {}, 0.0,
                                             false);
#endif
    }
#endif
    if (!out.defined()) out = cpu_kernel ? detail::cpu_full_attention(q, k, v, scale) : detail::generic_full_attention(q, k, v, scale);
  }
  {
    std::lock_guard<std::mutex> lock(counters_mutex);
    counters.calls += 1;
    counters.flops_useful += useful;
    counters.flops_spent += spent;
  }
  return out;
}

at::Tensor attention_materialized(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionCall& call) {
  check_inputs(q, k, v, call);
  const double scale = effective_scale(call, q.size(3));
  at::Tensor scores = matmul_f32_accumulate(q, k.transpose(-2, -1)).mul_(scale);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  if (const auto window = effective_window(call)) {
    scores.masked_fill_(neighborhood_mask(call.grid, *window).logical_not().to(q.device()), neg_inf);
  }
  if (call.valid_keys >= 0 && call.valid_keys < k.size(2)) {
    scores.masked_fill_(at::arange(k.size(2), q.options().dtype(at::kLong)).ge(call.valid_keys), neg_inf);
  }
  at::Tensor probs = at::softmax(scores, -1);
  scores = at::Tensor();
  if (call.valid_keys == 0) probs.zero_();  // no visible key: 0, as the kernels
  return matmul_f32_accumulate(probs, v);
}

AttentionCost attention_cost(std::int64_t batch, std::int64_t heads, std::int64_t nq, std::int64_t nk,
                             std::int64_t head_dim, std::int64_t value_dim, at::ScalarType dtype, const AttentionCall& call) {
  AttentionCost cost;
  const double bh = static_cast<double>(batch * heads);
  const double dims = static_cast<double>(head_dim + value_dim);
  // The CPU backend widens bf16 blocks to f32 for its GEMMs unless it runs them in bf16.
  const bool widened = dtype == at::kBFloat16 && !detail::bf16_gemms();
  const double elt = widened ? 4.0 : static_cast<double>(c10::elementSize(dtype));
  const int workers = detail::worker_count(std::numeric_limits<std::int64_t>::max());
  const std::int64_t keys = keys_used(call, nk);
  const std::optional<Window3> window = effective_window(call);
  if (window) {
    const auto plan = detail::plan_window(call.grid, *window);
    cost.flops_useful = 2.0 * dims * bh * plan->visible_pairs;
    cost.flops_spent = 2.0 * dims * bh * plan->spent_pairs;
    cost.query_block = plan->max_box_queries;
    cost.key_block = plan->max_chunk_keys;
    const double qk = static_cast<double>(cost.query_block), kk = static_cast<double>(cost.key_block);
    // Per worker: f32 scores, gather buffers for q/k/v/out, f32 accumulator and row statistics.
    cost.workspace_bytes = workers * (4.0 * qk * kk + elt * (qk * (head_dim + value_dim) + kk * dims) +
                                      4.0 * (qk * value_dim + 3.0 * qk));
  } else {
    cost.flops_useful = cost.flops_spent = 2.0 * dims * bh * static_cast<double>(nq) * static_cast<double>(keys);
    const detail::FullBlocks blocks = detail::full_blocks(batch * heads, nq, keys);
    cost.query_block = blocks.query;
    cost.key_block = blocks.key;
    const double qk = static_cast<double>(blocks.query), kk = static_cast<double>(blocks.key);
    // Per worker: f32 scores (P overwrites them), f32 accumulator and row statistics, and when
    // widening the f32 copies of one head's keys and values and of the query block.
    const double widened_bytes = widened ? 4.0 * (static_cast<double>(keys) * dims + qk * head_dim) : 0.0;
    cost.workspace_bytes = workers * (4.0 * qk * kk + 4.0 * (qk * value_dim + 3.0 * qk) + widened_bytes);
  }
  return cost;
}

AttentionCounters attention_counters() {
  std::lock_guard<std::mutex> lock(counters_mutex);
  return counters;
}

void reset_attention_counters() {
  std::lock_guard<std::mutex> lock(counters_mutex);
  counters = AttentionCounters{};
}

AttentionTuning attention_tuning() {
  std::lock_guard<std::mutex> lock(tuning_mutex);
  return tuning_value;
}

void set_attention_tuning(const AttentionTuning& tuning) {
  std::lock_guard<std::mutex> lock(tuning_mutex);
  tuning_value = tuning;
}

const AttentionFn& AttentionProcessor::plain_attention() {
  static const AttentionFn fn = [](const AttentionSite&, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const AttentionCall& call) { return attention(q, k, v, call); };
  return fn;
}

std::vector<std::int64_t> AttentionSite::rows_in(const std::vector<RowRole>& roles, std::int64_t batch) const {
  std::vector<std::int64_t> out;
  for (std::int64_t r = 0; r < batch; ++r) {
    bool wanted = roles.empty();
    if (!wanted && rows && r < static_cast<std::int64_t>(rows->size()))
      for (RowRole role : roles) wanted = wanted || (*rows)[static_cast<std::size_t>(r)] == role;
    if (wanted) out.push_back(r);
  }
  return out;
}

AttentionProcessors& AttentionProcessors::set(std::shared_ptr<AttentionProcessor> processor) {
  all_ = std::move(processor);
  return *this;
}

AttentionProcessors& AttentionProcessors::set(AttentionKind kind, std::shared_ptr<AttentionProcessor> processor) {
  if (processor) by_kind_[kind] = std::move(processor);
  else by_kind_.erase(kind);
  return *this;
}

AttentionProcessors& AttentionProcessors::set(int layer, AttentionKind kind, std::shared_ptr<AttentionProcessor> processor) {
  if (layer < 0) throw InputError("attention processors: layer " + std::to_string(layer) + " does not exist");
  if (processor) by_site_[{layer, kind}] = std::move(processor);
  else by_site_.erase({layer, kind});
  return *this;
}

AttentionProcessor* AttentionProcessors::find(int layer, AttentionKind kind) const {
  if (auto it = by_site_.find({layer, kind}); it != by_site_.end()) return it->second.get();
  if (auto it = by_kind_.find(kind); it != by_kind_.end()) return it->second.get();
  return all_.get();
}


}  // namespace vdit
