// CPU backend: blocked attention with an online softmax (full), and dense GEMMs over 3D query
// boxes and the union of their windows (windowed). f32 and bf16; GEMMs in the input dtype through
// at::mm_out (bf16 reaches oneDNN, f32 the BLAS), softmax statistics and accumulators in f32.
//
// Threading: tasks are (batch·head, query block) pairs pulled by workers from one atomic counter,
// each worker with single-threaded GEMMs and its own buffers. The alternative, one multi-threaded
// GEMM at a time, synchronises all cores twice per block; on a shared 2-core machine one stalled
// core then stalls every block, and small GEMMs do not scale anyway.
#include "attention_internal.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>
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

template <class T>
struct Stats {
  std::vector<float> m, l, alpha;
  explicit Stats(std::int64_t rows) : m(rows), l(rows), alpha(rows) {}
  void reset(std::int64_t rows) {
    std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.begin() + rows, 0.f);
  }
};

template <class T>
void full_attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, float scale) {
  const auto B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), Dv = v.size(3);
  const FullBlocks blocks = full_blocks(B * H, Nq, Nk);
  const std::int64_t q_blocks = (Nq + blocks.query - 1) / blocks.query;
  const std::int64_t tasks = B * H * q_blocks;
  std::atomic<std::int64_t> next{0};
  run_workers(worker_count(tasks), [&](int) {
    at::NoGradGuard no_grad;
    at::Tensor scores = at::empty({blocks.query * blocks.key}, q.options());
    at::Tensor partial = at::empty({blocks.query * Dv}, q.options());
    std::vector<float> acc(blocks.query * Dv);
    Stats<T> st(blocks.query);
    for (std::int64_t task = next++; task < tasks; task = next++) {
      const std::int64_t bh = task / q_blocks, qb = task % q_blocks;
      const std::int64_t b = bh / H, h = bh % H;
      const at::Tensor q_bh = q[b][h], k_bh = k[b][h], v_bh = v[b][h];
      at::Tensor out_bh = out[b][h];
      const std::int64_t s0 = qb * blocks.query, rows = std::min(blocks.query, Nq - s0);
      const at::Tensor q_blk = q_bh.narrow(0, s0, rows);
      st.reset(rows);
      for (std::int64_t j0 = 0; j0 < Nk; j0 += blocks.key) {
        const std::int64_t cols = std::min(blocks.key, Nk - j0);
        at::Tensor s = scores.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(s, q_blk, k_bh.narrow(0, j0, cols).t());
        online_softmax_block<T>(s.data_ptr<T>(), rows, cols, RowWindow{}, scale, st.m.data(), st.l.data(),
                                st.alpha.data());
        at::Tensor o = partial.narrow(0, 0, rows * Dv).view({rows, Dv});
        at::mm_out(o, s, v_bh.narrow(0, j0, cols));
        accumulate_rows<T>(o.data_ptr<T>(), rows, Dv, st.alpha.data(), acc.data(), j0 == 0);
      }
      store_rows<T>(acc.data(), st.l.data(), rows, Dv, out_bh.narrow(0, s0, rows).data_ptr<T>(), out_bh.stride(0));
    }
  });
}

template <class T>
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
    at::Tensor q_buf = at::empty({qmax * D}, q.options());
    at::Tensor k_buf = at::empty({kmax * D}, q.options());
    at::Tensor v_buf = at::empty({kmax * Dv}, q.options());
    at::Tensor o_buf = at::empty({qmax * Dv}, q.options());
    at::Tensor scores = at::empty({qmax * kmax}, q.options());
    at::Tensor partial = at::empty({qmax * Dv}, q.options());
    std::vector<float> acc(qmax * Dv);
    std::vector<std::int32_t> lo[3], hi[3];
    Stats<T> st(qmax);
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
      if (!flat_rows(q_box, q_rows)) {
        q_rows = q_buf.narrow(0, 0, rows * D).view({rows, D});
        q_rows.view({q_count[0], q_count[1], q_count[2], D}).copy_(q_box);
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
                const std::int64_t l = std::max<std::int64_t>(tile[a]->lo[i], c[a]) - c[a];
                const std::int64_t u = std::min<std::int64_t>(tile[a]->hi[i], c[a] + cn[a] - 1) - c[a];
                lo[a][i] = static_cast<std::int32_t>(l);
                hi[a][i] = static_cast<std::int32_t>(u);  // l > u: nothing visible in this chunk
              }
              win.lo[a] = lo[a].data();
              win.hi[a] = hi[a].data();
            }
            const std::int64_t cols = cn[0] * cn[1] * cn[2];
            const at::Tensor k_box = box_view(k_bh, grid, cf, cn, step);
            const at::Tensor v_box = box_view(v_bh, grid, cf, cn, step);
            at::Tensor k_rows, v_rows;
            if (!flat_rows(k_box, k_rows)) {
              k_rows = k_buf.narrow(0, 0, cols * D).view({cols, D});
              k_rows.view({cn[0], cn[1], cn[2], D}).copy_(k_box);
            }
            if (!flat_rows(v_box, v_rows)) {
              v_rows = v_buf.narrow(0, 0, cols * Dv).view({cols, Dv});
              v_rows.view({cn[0], cn[1], cn[2], Dv}).copy_(v_box);
            }
            at::Tensor s = scores.narrow(0, 0, rows * cols).view({rows, cols});
            at::mm_out(s, q_rows, k_rows.t());
            online_softmax_block<T>(s.data_ptr<T>(), rows, cols, win, scale, st.m.data(), st.l.data(),
                                    st.alpha.data());
            at::Tensor o = partial.narrow(0, 0, rows * Dv).view({rows, Dv});
            at::mm_out(o, s, v_rows);
            accumulate_rows<T>(o.data_ptr<T>(), rows, Dv, st.alpha.data(), acc.data(), first);
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

void run_workers(int workers, const std::function<void(int worker)>& body) {
  if (workers <= 1) {
    body(0);
    return;
  }
  BlasSingleThreaded blas_guard;
  std::vector<std::thread> threads;
  threads.reserve(workers);
  std::mutex mutex;
  std::exception_ptr error;
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      try {
        // Let LibTorch's lazy per-thread init run first (it would reset the team size later),
        // then make this thread's OpenMP team (oneDNN GEMMs) one thread.
        (void)at::get_num_threads();
        if (const auto set = omp_set_threads()) set(1);
        body(w);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!error) error = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
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
  if (q.scalar_type() == at::kBFloat16)
    full_attention_typed<c10::BFloat16>(q, k, v, out, static_cast<float>(scale));
  else
    full_attention_typed<float>(q, k, v, out, static_cast<float>(scale));
  return out;
}

at::Tensor cpu_window_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                                const WindowPlan& plan, const Grid3& grid) {
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  at::Tensor out = empty_output(q, v.size(3));
  if (q.size(2) == 0 || q.size(0) * q.size(1) == 0) return out;
  if (q.scalar_type() == at::kBFloat16)
    window_attention_typed<c10::BFloat16>(q, k, v, out, static_cast<float>(scale), plan, grid);
  else
    window_attention_typed<float>(q, k, v, out, static_cast<float>(scale), plan, grid);
  return out;
}

}  // namespace vdit::detail
