// Internals shared by the attention sources: the window planner, the CPU kernels and the worker
// pool. Not installed.
#pragma once

#include "vdit/attention/attention.h"

#include <cstdint>
#include <functional>
#include <vector>

namespace vdit::detail {

// ---------------------------------------------------------------------------------------------
// Window planning. A query box is the product of one tile per axis; its keys are the product of
// the per-axis unions of its queries' windows. Everything is separable per axis because the mask
// is the AND of per-axis masks.

struct AxisTile {
  std::int64_t q_first = 0, q_count = 0;   // queries at coordinates q_first + i·step
  std::int64_t k_first = 0, k_count = 0;   // union of their windows: k_first + j·step
  std::int64_t step = 1;                   // the axis dilation (1 on a fully visible axis)
  std::vector<std::int32_t> lo, hi;        // query i sees union indices lo[i]..hi[i]
  bool dense = false;                      // every query sees the whole union
};

struct AxisTiling {
  std::int64_t n = 1;
  bool full = true;           // the window covers the axis
  std::int64_t extent = 1;    // tile extent chosen (queries per tile, per group)
  std::vector<AxisTile> tiles;
  double visible = 0;         // Σ over queries of visible keys on this axis
  double spent = 0;           // Σ over tiles of q_count · k_count
};

// Builds the tiling of one axis for a tile extent.
AxisTiling tile_axis(std::int64_t n, std::int64_t kernel, std::int64_t dilation, std::int64_t extent);

struct WindowPlan {
  AxisTiling axis[3];
  std::int64_t max_box_queries = 0;  // largest query box
  std::int64_t max_chunk_keys = 0;   // key chunk limit (a union larger than this is split)
  double visible_pairs = 0;          // Σ_q |keys(q)| per (batch, head)
  double spent_pairs = 0;            // Σ_box queries × union keys per (batch, head)
  std::int64_t boxes() const {
    return static_cast<std::int64_t>(axis[0].tiles.size() * axis[1].tiles.size() * axis[2].tiles.size());
  }
};

// true when the window covers the grid on every axis (the call is plain full attention).
bool window_is_full(const Grid3& grid, const Window3& window);

// The plan used for (grid, window) with the current tuning (cached; thread-safe).
std::shared_ptr<const WindowPlan> plan_window(const Grid3& grid, const Window3& window);

// Key chunk extents (per axis) for a union box, so that a chunk holds at most `limit` keys.
std::array<std::int64_t, 3> chunk_extents(const std::array<std::int64_t, 3>& union_ext, std::int64_t limit);

// ---------------------------------------------------------------------------------------------
// CPU kernels on contiguous blocks (T = float or c10::BFloat16).

// Valid columns of each score row: row r = (i0·q_ext[1] + i1)·q_ext[2] + i2 of a query box sees
// column (j0·k_ext[1] + j1)·k_ext[2] + j2 iff lo[a][i_a] ≤ j_a ≤ hi[a][i_a] on every axis a
// (lo[a] == nullptr: the whole extent on that axis). All lo null: every column is valid.
struct RowWindow {
  std::int64_t q_ext[3] = {1, 1, 1};
  std::int64_t k_ext[3] = {1, 1, 1};
  const std::int32_t* lo[3] = {nullptr, nullptr, nullptr};
  const std::int32_t* hi[3] = {nullptr, nullptr, nullptr};
  bool dense() const { return !lo[0] && !lo[1] && !lo[2]; }
};

// One online-softmax step. s holds the raw f32 scores q·k [rows, cols] (contiguous); it is
// overwritten in place by the unnormalised probabilities exp(s·scale − m_new) (0 on invalid
// columns) as T: row r of P starts where row r of s starts, so P has a leading dimension of
// cols·4/sizeof(T) elements. m (running max of the scaled scores), l (running sum) and alpha
// (factor to rescale the accumulator by) are per row.
template <class T>
void online_softmax_block(float* s, std::int64_t rows, std::int64_t cols, const RowWindow& window, float scale,
                          float* m, float* l, float* alpha);

// acc[r] *= alpha[r]; acc is [rows, dv] contiguous.
void scale_rows(float* acc, std::int64_t rows, std::int64_t dv, const float* alpha);

// out[r] = acc[r] / l[r] (0 when l[r] == 0); out rows are ld_out elements apart.
template <class T>
void store_rows(const float* acc, const float* l, std::int64_t rows, std::int64_t dv, T* out, std::int64_t ld_out);

// Name of the vector ISA the kernels use ("avx512" or "scalar").
const char* kernel_isa();

// ---------------------------------------------------------------------------------------------
// Worker pool: runs body(worker) for worker = 0..workers-1 on persistent pool threads (on the
// caller's thread when workers is 1, or when called from inside a worker), the caller waiting.
// Each worker restricts its own OpenMP/BLAS team to one thread, so GEMMs inside stay
// single-threaded and the workers never wait on each other until the end. Callers from several
// threads take turns. Exceptions are rethrown in the caller.
void run_workers(int workers, const std::function<void(int worker)>& body);

// Workers to use for `tasks` independent tasks: min(at::get_num_threads(), tasks).
int worker_count(std::int64_t tasks);

// ---------------------------------------------------------------------------------------------
// Backends (inputs validated; scale is the effective scale; keys already cut to valid_keys).
at::Tensor cpu_full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
at::Tensor cpu_window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                const WindowPlan& plan, const Grid3& grid);
at::Tensor generic_full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
at::Tensor generic_window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                    const WindowPlan& plan, const Grid3& grid);

// Whether the CPU backend runs its GEMMs in bf16 for bf16 inputs (AMX, or AVX512-BF16 on an AMD
// CPU, or forced by the tuning); otherwise bf16 blocks are widened to f32 for the GEMMs.
bool cpu_has_amx_bf16();
bool bf16_gemms();

// Block sizes of the CPU full-attention kernel for these sizes (tuning applied).
struct FullBlocks {
  std::int64_t query = 0, key = 0;
};
FullBlocks full_blocks(std::int64_t batch_heads, std::int64_t nq, std::int64_t nk);

}  // namespace vdit::detail
