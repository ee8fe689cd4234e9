// The one attention entry point every model calls, and the attention-processor interface through
// which guidance, editing, caching and parallelism change attention per layer, row and head.
//
// Backends behind vdit::attention():
//  - CPU, f32 or bf16: blocked attention with an online softmax. GEMMs run in the input dtype
//    (bf16 reaches oneDNN), softmax statistics and the output accumulator are f32, and the extra
//    memory is O(threads x query_block x key_block). Windowed attention runs dense GEMMs over 3D
//    query boxes and the union of their windows, with the exact window applied per row.
//  - LibTorch >= 2 on CUDA, full attention: scaled_dot_product_attention.
//  - anything else (other dtypes, other devices): the same blocking written with plain ATen ops.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "vdit/step_info.h"

namespace vdit {

// The 3D token grid of a video latent after patching: T latent frames of H x W tokens, flattened
// in (t, h, w) order with w fastest.
struct Grid3 {
  std::int64_t t = 1, h = 1, w = 1;
  std::int64_t numel() const { return t * h * w; }
};

// A 3D neighbourhood window: per-axis kernel sizes (a size <= 0 or >= the axis means the whole
// axis) and dilations. Windows are clamped inward at borders, so every query sees exactly
// prod(size) keys (NATTEN's non-causal rule, stride 1).
// Dilation d splits an axis into d interleaved groups (coordinate mod d); attention stays inside
// a group, and in a group shorter than the kernel the kernel is clamped to the group length.
// A size that covers the axis ignores that axis's dilation (the whole axis is visible).
struct Window3 {
  std::array<std::int64_t, 3> size{0, 0, 0};
  std::array<std::int64_t, 3> dilation{1, 1, 1};
};

enum class AttentionBackend {
  Auto,     // CPU blocked kernel for f32/bf16 on the CPU, SDPA on CUDA (LibTorch 2), else Generic
  Generic,  // device-agnostic ATen-op implementation (reference quality, slower)
};

struct AttentionCall {
  double scale = 0.0;               // softmax scale; 0 means 1/sqrt(head_dim)
  Grid3 grid;                       // token grid of the queries (self-attention: of the keys too)
  std::optional<Window3> window;    // nullopt: full attention
  std::int64_t valid_keys = -1;     // keys at index >= valid_keys are masked out; -1: all keys
  double scale_factor = 1.0;        // temperature multiplier on the scale (FreeSwim: 1.04608)
  AttentionBackend backend = AttentionBackend::Auto;
};

// scale (or 1/sqrt(head_dim) when 0) times scale_factor.
double effective_scale(const AttentionCall& call, std::int64_t head_dim);

// q [B, heads, Nq, D], k [B, heads, Nk, D], v [B, heads, Nk, Dv] -> [B, heads, Nq, Dv] in q's
// dtype and q's memory layout. Windowed calls need Nq = Nk = grid.numel(). Shape errors throw
// vdit::InputError.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call);

// The materialised reference: softmax(q kᵀ · scale + mask) v computed in q's dtype with the full
// [B, heads, Nq, Nk] score tensor (the "naive" attention; pass f64 tensors for a reference).
at::Tensor attention_materialized(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const AttentionCall& call);

// Boolean [N, N] neighbourhood mask of `window` on `grid` (true: key visible), built from the
// per-axis NATTEN rule; N must stay small (it is N x N).
at::Tensor neighborhood_mask(const Grid3& grid, const Window3& window);

// For one axis of length n with kernel k and dilation d: the visible key coordinates of query x
// are first, first + step, ..., last.
struct AxisRange {
  std::int64_t first = 0, last = 0, step = 1;
  std::int64_t count() const { return (last - first) / step + 1; }
};
AxisRange window_axis_range(std::int64_t n, std::int64_t kernel, std::int64_t dilation, std::int64_t x);

// FLOPs of one attention call (QKᵀ and PV, 2 per multiply-add, softmax not counted).
struct AttentionCost {
  double flops_useful = 0;     // 4·B·heads·D·Σ_q |visible keys of q| (D = mean of q and v dims)
  double flops_spent = 0;      // what the CPU blocked kernel multiplies, masked-out products included
  double workspace_bytes = 0;  // scratch the CPU blocked kernel allocates (all workers)
  std::int64_t query_block = 0, key_block = 0;  // rows x columns of one score block
};
AttentionCost attention_cost(std::int64_t batch, std::int64_t heads, std::int64_t nq, std::int64_t nk,
                             std::int64_t head_dim, std::int64_t value_dim, at::ScalarType dtype,
                             const AttentionCall& call);

// Process-wide totals over every vdit::attention() call since the last reset.
struct AttentionCounters {
  std::int64_t calls = 0;
  double flops_useful = 0, flops_spent = 0;
};
AttentionCounters attention_counters();
void reset_attention_counters();

// Block sizes of the CPU kernel (0 keeps the built-in choice). Global; for benchmarks and tuning.
struct AttentionTuning {
  std::int64_t query_block = 0;    // full attention: query rows per block
  std::int64_t key_block = 0;      // full attention: keys per block
  std::int64_t window_queries = 0; // windowed: largest query box
  std::int64_t window_keys = 0;    // windowed: largest key chunk of a box's window union
  int bf16_gemm = 0;               // CPU, bf16 inputs: 1 GEMMs in bf16, -1 widened to f32, 0 bf16 with AMX or on AMD AVX512-BF16
};
AttentionTuning attention_tuning();
void set_attention_tuning(const AttentionTuning& tuning);

enum class AttentionKind { Self, Cross };

// Where an attention call sits and what it is for, handed to processors by the model. Everything
// a processor needs arrives here, never through fields of the model.
struct AttentionSite {
  int layer = 0;
  AttentionKind kind = AttentionKind::Self;
  const StepInfo* step = nullptr;             // the loop's step; null outside a sampling run
  const std::vector<RowRole>* rows = nullptr;  // the role of every batch row; null: unlabelled
  Grid3 grid;                                 // token grid of the queries
  // The heads of this call are the layer's global heads head_offset .. head_offset + q.size(1) - 1
  // (a sequence-parallel processor hands its inner call a slice of the heads).
  std::int64_t head_offset = 0;

  // The batch rows a processor restricted to `roles` acts on: every row when `roles` is empty,
  // else the rows labelled with one of them (none when the rows are unlabelled).
  std::vector<std::int64_t> rows_in(const std::vector<RowRole>& roles, std::int64_t batch) const;
};

class AttentionProcessor;

// Computes attention for a site: the next processor of a chain, or the plain kernel.
using AttentionFn = std::function<at::Tensor(const AttentionSite&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const AttentionCall&)>;

// An attention processor (diffusers' term): models call it instead of attention() at the sites it
// is registered for. process() is the one entry point: `inner` computes attention for whatever
// comes after this processor (the rest of a ProcessorChain, or vdit::attention), so processors
// compose; a processor that does not act on a call returns inner(site, q, k, v, call).
class AttentionProcessor {
 public:
  virtual ~AttentionProcessor() = default;
  virtual at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const AttentionCall& call, const AttentionFn& inner) = 0;
  // process() with the plain kernel as `inner`.
  at::Tensor attend(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const AttentionCall& call) {
    return process(site, q, k, v, call, plain_attention());
  }
  // vdit::attention as an AttentionFn.
  static const AttentionFn& plain_attention();
};

// Which processor runs at which site, as diffusers' set_attn_processor: one for every site, one
// per kind, or one per (layer, kind); the most specific registration wins. Sites with none run
// the plain kernel.
class AttentionProcessors {
 public:
  AttentionProcessors& set(std::shared_ptr<AttentionProcessor> processor);
  AttentionProcessors& set(AttentionKind kind, std::shared_ptr<AttentionProcessor> processor);
  AttentionProcessors& set(int layer, AttentionKind kind, std::shared_ptr<AttentionProcessor> processor);
  AttentionProcessor* find(int layer, AttentionKind kind) const;
  bool empty() const { return !all_ && by_kind_.empty() && by_site_.empty(); }

 private:
  std::shared_ptr<AttentionProcessor> all_;
  std::map<AttentionKind, std::shared_ptr<AttentionProcessor>> by_kind_;
  std::map<std::pair<int, AttentionKind>, std::shared_ptr<AttentionProcessor>> by_site_;
};

}  // namespace vdit
