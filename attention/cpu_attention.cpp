// CPU backend: blocked attention with an online softmax (full), and dense GEMMs over 3D query
// boxes and the union of their windows (windowed). f32 and bf16 inputs; GEMMs produce f32,
// softmax statistics and accumulators are f32.
//
// GEMM dtype for bf16 inputs: measured with oneDNN 2.6 on an AVX512-BF16 Xeon without AMX, the
// bf16 GEMM (dnnl_gemm_bf16bf16f32) runs at ~82 GFLOP/s per core and the f32 one at ~150, so
// there bf16 blocks are widened to f32 as they are used (per worker, per head: O(tokens) extra
// memory) and the GEMMs run in f32, which is also more accurate. With AMX (where oneDNN's bf16
// path is several times the f32 rate) the GEMMs take bf16 directly and P is rounded to bf16. On an
// AVX512-BF16 AMD EPYC without AMX oneDNN's bf16 GEMM ran at twice the f32 rate (400 against 196
// GFLOP/s at 2048^3), so there the GEMMs take bf16 too (bf16_gemms).
//
// Threading: tasks are (batch·head, query block) pairs pulled by workers from one atomic counter,
// each worker with single-threaded GEMMs and its own buffers. The alternative, one multi-threaded
// GEMM at a time, synchronises all cores twice per block; on a shared 2-core machine one stalled
// core then stalls every block, and small GEMMs do not scale anyway.
#include <c10/core/InferenceMode.h>
#include "attention_internal.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cpuid.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace vdit::detail {
namespace {

// The OpenMP runtime and OpenBLAS are reached through dlsym: the library is not compiled with
// -fopenmp and must not depend on which BLAS LibTorch was built with. Missing symbols are skipped.
using SetThreadsFn = void (*)(int);
using GetThreadsFn = int (*)();

SetThreadsFn omp_set_threads() {
  static const auto fn = reinterpret_cast<SetThreadsFn>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  return fn;
}

// OpenBLAS (pthread build) runs its own pool; concurrent multi-threaded calls from our workers
// would serialise on it, so it is set to one thread while the workers run.
class BlasSingleThreaded {
 public:
  BlasSingleThreaded() {
    static const auto get = reinterpret_cast<GetThreadsFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    static const auto set = reinterpret_cast<SetThreadsFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
    if (get && set) {
      set_ = set;
      previous_ = get();
      set_(1);
    }
  }
  ~BlasSingleThreaded() {
    if (set_) set_(previous_);
  }
  BlasSingleThreaded(const BlasSingleThreaded&) = delete;
  BlasSingleThreaded& operator=(const BlasSingleThreaded&) = delete;

 private:
  SetThreadsFn set_ = nullptr;
  int previous_ = 1;
};

constexpr std::int64_t kDefaultQueryBlock = 256;
constexpr std::int64_t kDefaultKeyBlock = 4096;

// Output in q's layout when q is a [B, N, H, D] tensor seen as [B, H, N, D] (what the models pass),
// so that the caller's transpose back is free.
at::Tensor empty_output(const at::Tensor& q, std::int64_t dv) {
  const auto B = q.size(0), H = q.size(1), N = q.size(2);
  if (q.stride(1) < q.stride(2) && H > 1) return at::empty({B, N, H, dv}, q.options()).transpose(1, 2);
  return at::empty({B, H, N, dv}, q.options());
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A [a, b, c, D] box view as [a·b·c, D] rows with one stride, when its layout allows it.
bool flat_rows(const at::Tensor& box, at::Tensor& rows) {
  std::int64_t stride = -1, expect = -1;
  for (int d = 2; d >= 0; --d) {
    if (box.size(d) == 1) continue;
    if (stride < 0) {
      stride = box.stride(d);
    } else if (box.stride(d) != expect) {
      return false;
    }
    expect = box.stride(d) * box.size(d);
  }
  const std::int64_t n = box.size(0) * box.size(1) * box.size(2);
  rows = box.as_strided({n, box.size(3)}, {stride < 0 ? box.size(3) : stride, 1});
  return true;
}

// [T·H·W, D] per-head matrix -> the 3D sub-box of one tile per axis (first + i·step, count each).
at::Tensor box_view(const at::Tensor& mat, const Grid3& grid, const std::int64_t first[3], const std::int64_t count[3],
                    const std::int64_t step[3]) {
  at::Tensor t = mat.view({grid.t, grid.h, grid.w, mat.size(1)});
  for (int a = 0; a < 3; ++a) t = t.slice(a, first[a], first[a] + (count[a] - 1) * step[a] + 1, step[a]);
  return t;
}

// The GEMMs: C[M, N] (f32, row-major, leading dimension ldc) = A[M, K] · op(B) + beta·C with A, B
// in T. oneDNN's C API takes bf16 inputs with an f32 result, so scores reach the softmax unrounded
// and the PV products accumulate in f32 across key blocks; both are reached through dlsym, like
// the OpenMP runtime. Without them (another LibTorch build), ATen in f32 does the same.
using DnnlGemmBf16 = int (*)(char, char, std::int64_t, std::int64_t, std::int64_t, float, const std::uint16_t*,
                             std::int64_t, const std::uint16_t*, std::int64_t, float, float*, std::int64_t);
using DnnlGemmF32 = int (*)(char, char, std::int64_t, std::int64_t, std::int64_t, float, const float*, std::int64_t,
                            const float*, std::int64_t, float, float*, std::int64_t);

template <class T>
void gemm_f32(bool b_transposed, std::int64_t M, std::int64_t N, std::int64_t K, const T* A, std::int64_t lda,
              const T* B, std::int64_t ldb, float beta, float* C, std::int64_t ldc) {
  const char tb = b_transposed ? 'T' : 'N';
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    static const auto fn = reinterpret_cast<DnnlGemmBf16>(dlsym(RTLD_DEFAULT, "dnnl_gemm_bf16bf16f32"));
    if (fn && fn('N', tb, M, N, K, 1.f, reinterpret_cast<const std::uint16_t*>(A), lda,
                 reinterpret_cast<const std::uint16_t*>(B), ldb, beta, C, ldc) == 0)
      return;
  } else {
    static const auto fn = reinterpret_cast<DnnlGemmF32>(dlsym(RTLD_DEFAULT, "dnnl_sgemm"));
    if (fn && fn('N', tb, M, N, K, 1.f, A, lda, B, ldb, beta, C, ldc) == 0) return;
  }
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  const at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, dtype).to(at::kFloat);
  const at::Tensor b = b_transposed ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, dtype).to(at::kFloat).t()
                                    : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, dtype).to(at::kFloat);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, at::kFloat);
  if (beta == 0.f)
    at::mm_out(c, a, b);
  else
    c.mul_(beta).addmm_(a, b);
}

// Per-row online-softmax state of one query block.
struct RowStats {
  std::vector<float> m, l, alpha;
  explicit RowStats(std::int64_t rows) : m(rows), l(rows), alpha(rows) {}
  void reset(std::int64_t rows) {
    std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.begin() + rows, 0.f);
  }
};

// One key block of one query block: scores, online softmax (P in place over the scores, as T),
// rescale of the accumulator, acc += P·V.
template <class T>
void attend_block(const T* q, std::int64_t ldq, const T* k, std::int64_t ldk, const T* v, std::int64_t ldv,
                  std::int64_t rows, std::int64_t cols, std::int64_t D, std::int64_t Dv, const RowWindow& win,
                  float scale, float* scores, RowStats& st, float* acc, bool first) {
  gemm_f32<T>(true, rows, cols, D, q, ldq, k, ldk, 0.f, scores, cols);
  online_softmax_block<T>(scores, rows, cols, win, scale, st.m.data(), st.l.data(), st.alpha.data());
  if (!first) scale_rows(acc, rows, Dv, st.alpha.data());
  const std::int64_t ldp = cols * static_cast<std::int64_t>(sizeof(float) / sizeof(T));
  gemm_f32<T>(false, rows, Dv, cols, reinterpret_cast<const T*>(scores), ldp, v, ldv, first ? 0.f : 1.f, acc, Dv);
}

template <class T>
const T* head_ptr(const at::Tensor& t, std::int64_t b, std::int64_t h) {
  return t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1);
}


template <class T, class C>
inline void convert_run(const T* src, std::int64_t n, C* dst) {
  if constexpr (std::is_same_v<T, C>) {
    std::memcpy(dst, src, sizeof(T) * n);
  } else {
    // bf16 -> f32 is a 16-bit shift; written on the raw bits so the compiler vectorises it.
    static_assert(std::is_same_v<T, c10::BFloat16> && std::is_same_v<C, float>);
    const auto* bits = reinterpret_cast<const std::uint16_t*>(src);
    auto* out = reinterpret_cast<std::uint32_t*>(dst);
    for (std::int64_t j = 0; j < n; ++j) out[j] = static_cast<std::uint32_t>(bits[j]) << 16;
  }
}

// A [a, b, c, D] box view (last dim contiguous) -> contiguous [a·b·c, D] rows in C, copying the
// longest contiguous runs (ATen's strided copy with a dtype change is several times slower here).
template <class T, class C>
void gather_box(const at::Tensor& box, C* dst) {
  const std::int64_t n0 = box.size(0), n1 = box.size(1), n2 = box.size(2), D = box.size(3);
  const std::int64_t s0 = box.stride(0), s1 = box.stride(1), s2 = box.stride(2);
  const T* base = box.data_ptr<T>();
  const bool rows_contiguous = n2 == 1 || s2 == D;
  for (std::int64_t i0 = 0; i0 < n0; ++i0) {
    for (std::int64_t i1 = 0; i1 < n1; ++i1) {
      const T* src = base + i0 * s0 + i1 * s1;
      C* out = dst + (i0 * n1 + i1) * n2 * D;
      if (rows_contiguous) {
        convert_run(src, n2 * D, out);
      } else {
        for (std::int64_t i2 = 0; i2 < n2; ++i2) convert_run(src + i2 * s2, D, out + i2 * D);
      }
    }
  }
}

// rows × cols bf16 (row stride ld) -> contiguous f32.
void widen_rows(const c10::BFloat16* src, std::int64_t ld, std::int64_t rows, std::int64_t cols, float* dst) {
  for (std::int64_t r = 0; r < rows; ++r) convert_run(src + r * ld, cols, dst + r * cols);
}

// Rows of a T matrix as seen by GEMMs in C: the matrix itself when C == T, else a widened copy
// in `buffer` (resized as needed). Returns the data pointer and sets ld.
template <class T, class C>
const C* gemm_rows(const T* src, std::int64_t ld_src, std::int64_t rows, std::int64_t cols, std::vector<C>& buffer,
                   std::int64_t& ld) {
  if constexpr (std::is_same_v<T, C>) {
    ld = ld_src;
    return src;
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16> && std::is_same_v<C, float>);
    if (static_cast<std::int64_t>(buffer.size()) < rows * cols) buffer.resize(rows * cols);
    widen_rows(src, ld_src, rows, cols, buffer.data());
    ld = cols;
    return buffer.data();
  }
}

template <class T, class C>
void full_attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, float scale) {
  const auto B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3), Dv = v.size(3);
  const FullBlocks blocks = full_blocks(B * H, Nq, Nk);
  const std::int64_t q_blocks = (Nq + blocks.query - 1) / blocks.query;
  const std::int64_t tasks = B * H * q_blocks;
  std::atomic<std::int64_t> next{0};
  run_workers(worker_count(tasks), [&](int) {
    std::vector<float> scores(blocks.query * blocks.key), acc(blocks.query * Dv);
    std::vector<C> q_wide, k_wide, v_wide;  // widened copies (C != T): q block, k and v of one head
    std::int64_t wide_bh = -1, ldq = 0, ldk = 0, ldv = 0;
    const C* k_bh = nullptr;
    const C* v_bh = nullptr;
    RowStats st(blocks.query);
    for (std::int64_t task = next++; task < tasks; task = next++) {
      const std::int64_t bh = task / q_blocks, qb = task % q_blocks;
      const std::int64_t b = bh / H, h = bh % H;
      const std::int64_t s0 = qb * blocks.query, rows = std::min(blocks.query, Nq - s0);
      const C* q_rows = gemm_rows<T, C>(head_ptr<T>(q, b, h) + s0 * q.stride(2), q.stride(2), rows, D, q_wide, ldq);
      if (bh != wide_bh) {  // tasks come in head order, so each worker widens a head about once
        k_bh = gemm_rows<T, C>(head_ptr<T>(k, b, h), k.stride(2), Nk, D, k_wide, ldk);
        v_bh = gemm_rows<T, C>(head_ptr<T>(v, b, h), v.stride(2), Nk, Dv, v_wide, ldv);
        wide_bh = bh;
      }
      st.reset(rows);
      for (std::int64_t j0 = 0; j0 < Nk; j0 += blocks.key) {
        const std::int64_t cols = std::min(blocks.key, Nk - j0);
        attend_block<C>(q_rows, ldq, k_bh + j0 * ldk, ldk, v_bh + j0 * ldv, ldv, rows, cols, D, Dv, RowWindow{}, scale,
                        scores.data(), st, acc.data(), j0 == 0);
      }
      T* out_rows = out.data_ptr<T>() + b * out.stride(0) + h * out.stride(1) + s0 * out.stride(2);
      store_rows<T>(acc.data(), st.l.data(), rows, Dv, out_rows, out.stride(2));
    }
  });
}

template <class T, class C>
void window_attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, float scale,
                            const WindowPlan& plan, const Grid3& grid) {
  const auto B = q.size(0), H = q.size(1), D = q.size(3), Dv = v.size(3);
  const auto& tiles_t = plan.axis[0].tiles;
  const auto& tiles_h = plan.axis[1].tiles;
  const auto& tiles_w = plan.axis[2].tiles;
  const std::int64_t boxes = plan.boxes();
  const std::int64_t tasks = B * H * boxes;
  const std::int64_t qmax = plan.max_box_queries;
  const std::int64_t kmax = plan.max_chunk_keys;
  std::atomic<std::int64_t> next{0};
  run_workers(worker_count(tasks), [&](int) {
    at::NoGradGuard no_grad;
    // Gather buffers in the GEMM dtype, for boxes whose rows are not evenly strided in memory
    // and for every box when the GEMMs widen bf16 to f32.
    constexpr bool widen = !std::is_same_v<T, C>;
    const auto gemm_options = q.options().dtype(c10::CppTypeToScalarType<C>::value);
    at::Tensor q_buf = at::empty({qmax * D}, gemm_options);
    at::Tensor k_buf = at::empty({kmax * D}, gemm_options);
    at::Tensor v_buf = at::empty({kmax * Dv}, gemm_options);
    at::Tensor o_buf = at::empty({qmax * Dv}, q.options());
    std::vector<float> scores(qmax * kmax), acc(qmax * Dv);
    std::vector<std::int32_t> lo[3], hi[3];
    RowStats st(qmax);
    for (std::int64_t task = next++; task < tasks; task = next++) {
      const std::int64_t bh = task / boxes, box = task % boxes;
      const std::int64_t b = bh / H, h = bh % H;
      const AxisTile* tile[3] = {&tiles_t[box / (tiles_h.size() * tiles_w.size())],
                                 &tiles_h[(box / tiles_w.size()) % tiles_h.size()], &tiles_w[box % tiles_w.size()]};
      std::int64_t q_first[3], q_count[3], k_first[3], k_count[3], step[3];
      for (int a = 0; a < 3; ++a) {
        q_first[a] = tile[a]->q_first;
        q_count[a] = tile[a]->q_count;
        k_first[a] = tile[a]->k_first;
        k_count[a] = tile[a]->k_count;
        step[a] = tile[a]->step;
      }
      const std::int64_t rows = q_count[0] * q_count[1] * q_count[2];
      const at::Tensor q_bh = q[b][h], k_bh = k[b][h], v_bh = v[b][h];
      at::Tensor out_bh = out[b][h];

      const at::Tensor q_box = box_view(q_bh, grid, q_first, q_count, step);
      at::Tensor q_rows;
      if (widen || !flat_rows(q_box, q_rows)) {
        q_rows = q_buf.narrow(0, 0, rows * D).view({rows, D});
        gather_box<T, C>(q_box, q_rows.data_ptr<C>());
      }

      const auto ext = chunk_extents({k_count[0], k_count[1], k_count[2]}, kmax);
      st.reset(rows);
      bool first = true;
      for (std::int64_t c0 = 0; c0 < k_count[0]; c0 += ext[0]) {
        for (std::int64_t c1 = 0; c1 < k_count[1]; c1 += ext[1]) {
          for (std::int64_t c2 = 0; c2 < k_count[2]; c2 += ext[2]) {
            const std::int64_t c[3] = {c0, c1, c2};
            std::int64_t cf[3], cn[3];
            RowWindow win;
            for (int a = 0; a < 3; ++a) {
              cn[a] = std::min(ext[a], k_count[a] - c[a]);
              cf[a] = k_first[a] + c[a] * step[a];
              win.q_ext[a] = q_count[a];
              win.k_ext[a] = cn[a];
              if (tile[a]->dense && cn[a] == k_count[a]) continue;  // every query sees the whole chunk axis
              lo[a].resize(q_count[a]);
              hi[a].resize(q_count[a]);
              for (std::int64_t i = 0; i < q_count[a]; ++i) {
                // Intersection with the chunk; lo > hi: nothing visible in this chunk.
                lo[a][i] = static_cast<std::int32_t>(std::max<std::int64_t>(tile[a]->lo[i], c[a]) - c[a]);
                hi[a][i] = static_cast<std::int32_t>(std::min<std::int64_t>(tile[a]->hi[i], c[a] + cn[a] - 1) - c[a]);
              }
              win.lo[a] = lo[a].data();
              win.hi[a] = hi[a].data();
            }
            const std::int64_t cols = cn[0] * cn[1] * cn[2];
            const at::Tensor k_box = box_view(k_bh, grid, cf, cn, step);
            const at::Tensor v_box = box_view(v_bh, grid, cf, cn, step);
            at::Tensor k_rows, v_rows;
            if (widen || !flat_rows(k_box, k_rows)) {
              k_rows = k_buf.narrow(0, 0, cols * D).view({cols, D});
              gather_box<T, C>(k_box, k_rows.data_ptr<C>());
            }
            if (widen || !flat_rows(v_box, v_rows)) {
              v_rows = v_buf.narrow(0, 0, cols * Dv).view({cols, Dv});
              gather_box<T, C>(v_box, v_rows.data_ptr<C>());
            }
            attend_block<C>(q_rows.data_ptr<C>(), q_rows.stride(0), k_rows.data_ptr<C>(), k_rows.stride(0),
                            v_rows.data_ptr<C>(), v_rows.stride(0), rows, cols, D, Dv, win, scale, scores.data(), st,
                            acc.data(), first);
            first = false;
          }
        }
      }
      const at::Tensor out_box = box_view(out_bh, grid, q_first, q_count, step);
      at::Tensor out_rows;
      if (flat_rows(out_box, out_rows)) {
        store_rows<T>(acc.data(), st.l.data(), rows, Dv, out_rows.data_ptr<T>(), out_rows.stride(0));
      } else {
        at::Tensor o = o_buf.narrow(0, 0, rows * Dv);
        store_rows<T>(acc.data(), st.l.data(), rows, Dv, o.data_ptr<T>(), Dv);
        out_box.copy_(o.view({q_count[0], q_count[1], q_count[2], Dv}));
      }
    }
  });
}

}  // namespace

bool cpu_has_amx_bf16() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (d & (1u << 22)) != 0;  // CPUID.(EAX=7,ECX=0):EDX[22] = AMX-BF16
  }();
  return ok;
}

namespace {

// AVX512-BF16 on an AMD CPU (Zen 4 and later). Without AMX, which GEMM dtype is faster depends on
// the CPU (see the top of this file): half the f32 rate on an AVX512-BF16 Xeon, twice it on an
// AVX512-BF16 AMD EPYC (full attention at 8k tokens: 1.33-1.50 s with bf16 GEMMs, 2.76-3.16 s
// widened). A timed choice was tried and rejected: on the EPYC a 1024-token probe measured bf16
// 1.02-1.77x faster from run to run, so it would flip, and with it the rounding of every output.
bool amd_with_avx512_bf16() {
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
    if (!amd || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return (a & (1u << 5)) != 0;  // CPUID.(EAX=7,ECX=1):EAX[5] = AVX512_BF16
  }();
  return yes;
}

}  // namespace

bool bf16_gemms() {
  const AttentionTuning tuning = attention_tuning();
  if (tuning.bf16_gemm > 0) return true;
  if (tuning.bf16_gemm < 0) return false;
  // oneDNN's bf16 GEMM (bf16 in, f32 out) runs natively on both.
  return cpu_has_amx_bf16() || amd_with_avx512_bf16();
}

namespace {

// Persistent workers. They used to be fresh std::threads per call, and a new thread's first
// LibTorch call runs its lazy per-thread init, which calls at::set_num_threads, which recreates
// LibTorch's internal pthreadpool: with 2 threads a demo generate spent two thirds of its cycles in
// pools being created, spun up and destroyed (490 per generate) and ran 4-9x slower than with one
// thread. Threads created once pay that init once.
thread_local bool in_pool_worker = false;

class WorkerPool {
 public:
  // Never destroyed: joining blocked workers during static destruction would race LibTorch's own
  // statics; the threads just sleep until the process exits.
  static WorkerPool& instance() {
    static WorkerPool* const pool = new WorkerPool();
    return *pool;
  }

  // body(0..workers-1), one per pool thread; returns when all have returned, rethrowing the first
  // exception. Callers from different threads take turns.
  void run(int workers, const std::function<void(int)>& body) {
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    grow(workers);
    std::unique_lock<std::mutex> lock(mutex_);
    body_ = &body;
    active_ = workers;
    remaining_ = workers;
    error_ = nullptr;
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    body_ = nullptr;
    if (error_) {
      std::exception_ptr error = error_;
      error_ = nullptr;
      std::rethrow_exception(error);
    }
  }

 private:
  WorkerPool() = default;

  void grow(int workers) {
    while (static_cast<int>(threads_) < workers) {
      const int index = static_cast<int>(threads_++);
      std::thread([this, index] { loop(index); }).detach();
    }
  }

  void loop(int index) {
    in_pool_worker = true;
    // Let LibTorch's lazy per-thread init run first (it would reset the team size later), then
    // make this thread's OpenMP team (oneDNN GEMMs) one thread.
    (void)at::get_num_threads();
    if (const auto set = omp_set_threads()) set(1);
    std::uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* body = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= active_) continue;
        body = body_;
      }
      std::exception_ptr error;
      try {
        (*body)(index);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex_);
      if (error && !error_) error_ = error;
      if (--remaining_ == 0) done_.notify_all();
    }
  }

  std::mutex job_mutex_;  // one job at a time
  std::mutex mutex_;      // guards everything below
  std::condition_variable wake_, done_;
  std::size_t threads_ = 0;
  std::uint64_t generation_ = 0;
  const std::function<void(int)>* body_ = nullptr;
  int active_ = 0, remaining_ = 0;
  std::exception_ptr error_;
};

}  // namespace

void run_workers(int workers, const std::function<void(int worker)>& body) {
  if (workers <= 1) {
    body(0);
    return;
  }
  // Called from inside a worker (nested): the pool is busy with the outer job, so run inline.
  if (in_pool_worker) {
    for (int w = 0; w < workers; ++w) body(w);
    return;
  }
  BlasSingleThreaded blas_guard;
  // InferenceMode is thread-local: a caller's mode must hold in the workers too, or writing into
  // the caller's (inference) output tensors there is refused.
  if (c10::InferenceMode::is_enabled()) {
    WorkerPool::instance().run(workers, [&body](int w) {
      c10::InferenceMode inference;
      body(w);
    });
    return;
  }
  WorkerPool::instance().run(workers, body);
}

int worker_count(std::int64_t tasks) {
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(at::get_num_threads(), tasks)));
}

FullBlocks full_blocks(std::int64_t batch_heads, std::int64_t nq, std::int64_t nk) {
  const AttentionTuning tuning = attention_tuning();
  FullBlocks b;
  b.query = tuning.query_block > 0 ? tuning.query_block : kDefaultQueryBlock;
  b.key = tuning.key_block > 0 ? tuning.key_block : kDefaultKeyBlock;
  // Enough tasks for every worker (halving keeps GEMMs reasonably tall).
  const std::int64_t threads = at::get_num_threads();
  while (b.query > 32 && batch_heads * ((nq + b.query - 1) / b.query) < 2 * threads) b.query /= 2;
  b.query = std::max<std::int64_t>(1, std::min(b.query, nq));
  b.key = std::max<std::int64_t>(1, std::min(b.key, nk));
  return b;
}

at::Tensor cpu_full_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale) {
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  at::Tensor out = empty_output(q, v.size(3));
  if (q.size(2) == 0 || q.size(0) * q.size(1) == 0) return out;
  if (k.size(2) == 0) return out.zero_();
  if (q.scalar_type() != at::kBFloat16)
    full_attention_typed<float, float>(q, k, v, out, static_cast<float>(scale));
  else if (bf16_gemms())
    full_attention_typed<c10::BFloat16, c10::BFloat16>(q, k, v, out, static_cast<float>(scale));
  else
    full_attention_typed<c10::BFloat16, float>(q, k, v, out, static_cast<float>(scale));
  return out;
}

at::Tensor cpu_window_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                                const WindowPlan& plan, const Grid3& grid) {
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  at::Tensor out = empty_output(q, v.size(3));
  if (q.size(2) == 0 || q.size(0) * q.size(1) == 0) return out;
  if (q.scalar_type() != at::kBFloat16)
    window_attention_typed<float, float>(q, k, v, out, static_cast<float>(scale), plan, grid);
  else if (bf16_gemms())
    window_attention_typed<c10::BFloat16, c10::BFloat16>(q, k, v, out, static_cast<float>(scale), plan, grid);
  else
    window_attention_typed<c10::BFloat16, float>(q, k, v, out, static_cast<float>(scale), plan, grid);
  return out;
}

}  // namespace vdit::detail
