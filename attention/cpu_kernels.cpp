// Fused row kernels of the CPU attention: one online-softmax step per score block (max, exp,
// sum and the rounding to the GEMM dtype in two passes over the row, in place), the accumulator
// rescale and the final normalisation. Separate ATen ops would make 6-8 passes over every score block, which
// costs as much as the GEMMs; these loops are where attention time goes besides the GEMMs.
// They only ever see CPU memory (the CPU backend's own buffers and CPU tensors).
//
// The AVX-512 versions are compiled with a target attribute and picked at run time, so the
// library builds without -march flags and still runs on CPUs without AVX-512.
#include "attention_internal.h"

#include <c10/util/BFloat16.h>

#include <immintrin.h>

// GCC 12 flags the masked AVX-512 intrinsics' internal undefined vectors (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace vdit::detail {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A row's valid columns as maximal runs [begin, end).
struct Run {
  std::int64_t begin, end;
};

// Runs of row r (merged when adjacent). Empty when the row sees nothing in this block.
void row_runs(const RowWindow& win, std::int64_t r, std::int64_t cols, std::vector<Run>& runs) {
  runs.clear();
  if (win.dense()) {
    runs.push_back({0, cols});
    return;
  }
  const std::int64_t i2 = r % win.q_ext[2];
  const std::int64_t i1 = (r / win.q_ext[2]) % win.q_ext[1];
  const std::int64_t i0 = r / (win.q_ext[2] * win.q_ext[1]);
  const std::int64_t idx[3] = {i0, i1, i2};
  std::int64_t lo[3], hi[3];
  for (int a = 0; a < 3; ++a) {
    lo[a] = win.lo[a] ? win.lo[a][idx[a]] : 0;
    hi[a] = win.hi[a] ? win.hi[a][idx[a]] : win.k_ext[a] - 1;
    if (lo[a] > hi[a]) return;
  }
  for (std::int64_t j0 = lo[0]; j0 <= hi[0]; ++j0) {
    for (std::int64_t j1 = lo[1]; j1 <= hi[1]; ++j1) {
      const std::int64_t b = (j0 * win.k_ext[1] + j1) * win.k_ext[2] + lo[2];
      const std::int64_t e = b + hi[2] - lo[2] + 1;
      if (!runs.empty() && runs.back().end == b)
        runs.back().end = e;
      else
        runs.push_back({b, e});
    }
  }
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
template <class T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

// ------------------------------------------------------------------------------ scalar versions

template <class T>
void softmax_scalar(float* s, std::int64_t rows, std::int64_t cols, const RowWindow& win, float scale, float* m,
                    float* l, float* alpha) {
  std::vector<Run> runs;
  const std::int64_t ldp = cols * static_cast<std::int64_t>(sizeof(float) / sizeof(T));
  for (std::int64_t r = 0; r < rows; ++r) {
    float* row = s + r * cols;
    T* prow = reinterpret_cast<T*>(s) + r * ldp;  // same bytes as row (in place, left to right)
    row_runs(win, r, cols, runs);
    float mx = kNegInf;
    for (const Run& run : runs)
      for (std::int64_t j = run.begin; j < run.end; ++j) mx = std::max(mx, row[j]);
    const float m_new = std::max(m[r], mx * scale);
    if (m_new == kNegInf) {  // nothing visible yet: keep the (zero) accumulator as is
      for (std::int64_t j = 0; j < cols; ++j) prow[j] = from_float<T>(0.f);
      alpha[r] = 1.f;
      continue;
    }
    alpha[r] = std::exp(m[r] - m_new);
    float sum = 0.f;
    std::int64_t pos = 0;
    for (const Run& run : runs) {
      for (; pos < run.begin; ++pos) prow[pos] = from_float<T>(0.f);
      for (; pos < run.end; ++pos) {
        const float p = std::exp(row[pos] * scale - m_new);
        sum += p;
        prow[pos] = from_float<T>(p);
      }
    }
    for (; pos < cols; ++pos) prow[pos] = from_float<T>(0.f);
    l[r] = l[r] * alpha[r] + sum;
    m[r] = m_new;
  }
}

// ------------------------------------------------------------------------------ AVX-512 versions

#define VDIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

VDIT_AVX512 inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
VDIT_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
VDIT_AVX512 inline void store16(float* p, __m512 x, __mmask16 k) { _mm512_mask_storeu_ps(p, k, x); }
// Round to nearest even (inputs here are finite).
VDIT_AVX512 inline void store16(c10::BFloat16* p, __m512 x, __mmask16 k) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), 16);
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(rounded));
}

// exp(x) for x ≤ 0 (arguments are shifted by the row max): 2^n · p(r) with r = x − n·ln2,
// |r| ≤ ln2/2, p a degree-6 Taylor polynomial (relative error < 2e-7); below −87 it is 0.
VDIT_AVX512 inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.f);
  const __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

VDIT_AVX512 inline __mmask16 tail_mask(std::int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// P (as T) overwrites s in place: element j of P row r lies at or before element j of s row r,
// and every s element is loaded before the P elements covering it are stored.
template <class T>
VDIT_AVX512 void softmax_avx512(float* s, std::int64_t rows, std::int64_t cols, const RowWindow& win, float scale,
                                float* m, float* l, float* alpha) {
  std::vector<Run> runs;
  const std::int64_t ldp = cols * static_cast<std::int64_t>(sizeof(float) / sizeof(T));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = s + r * cols;
    T* prow = reinterpret_cast<T*>(s) + r * ldp;
    row_runs(win, r, cols, runs);
    __m512 vmax = _mm512_set1_ps(kNegInf);
    for (const Run& run : runs) {
      for (std::int64_t j = run.begin; j < run.end; j += 16) {
        const __mmask16 k = tail_mask(run.end - j);
        vmax = _mm512_mask_max_ps(vmax, k, vmax, load16(row + j, k));
      }
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    const float m_new = std::max(m[r], mx * scale);
    if (m_new == kNegInf) {
      std::memset(static_cast<void*>(prow), 0, sizeof(T) * cols);
      alpha[r] = 1.f;
      continue;
    }
    alpha[r] = std::exp(m[r] - m_new);
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps();
    std::int64_t pos = 0;
    for (const Run& run : runs) {
      if (run.begin > pos) std::memset(static_cast<void*>(prow + pos), 0, sizeof(T) * (run.begin - pos));
      for (std::int64_t j = run.begin; j < run.end; j += 16) {
        const __mmask16 k = tail_mask(run.end - j);
        const __m512 p = exp16(_mm512_fmsub_ps(load16(row + j, k), vscale, vm));
        vsum = _mm512_mask_add_ps(vsum, k, vsum, p);
        store16(prow + j, p, k);
      }
      pos = run.end;
    }
    if (cols > pos) std::memset(static_cast<void*>(prow + pos), 0, sizeof(T) * (cols - pos));
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(vsum);
    m[r] = m_new;
  }
}

VDIT_AVX512 void scale_avx512(float* acc, std::int64_t rows, std::int64_t dv, const float* alpha) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const __m512 va = _mm512_set1_ps(alpha[r]);
    for (std::int64_t j = 0; j < dv; j += 16) {
      const __mmask16 k = tail_mask(dv - j);
      store16(acc + r * dv + j, _mm512_mul_ps(load16(acc + r * dv + j, k), va), k);
    }
  }
}

template <class T>
VDIT_AVX512 void store_avx512(const float* acc, const float* l, std::int64_t rows, std::int64_t dv, T* out,
                              std::int64_t ld_out) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(l[r] > 0.f ? 1.f / l[r] : 0.f);
    for (std::int64_t j = 0; j < dv; j += 16) {
      const __mmask16 k = tail_mask(dv - j);
      store16(out + r * ld_out + j, _mm512_mul_ps(load16(acc + r * dv + j, k), inv), k);
    }
  }
}

bool have_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

}  // namespace

const char* kernel_isa() { return have_avx512() ? "avx512" : "scalar"; }

template <class T>
void online_softmax_block(float* s, std::int64_t rows, std::int64_t cols, const RowWindow& window, float scale,
                          float* m, float* l, float* alpha) {
  if (have_avx512())
    softmax_avx512<T>(s, rows, cols, window, scale, m, l, alpha);
  else
    softmax_scalar<T>(s, rows, cols, window, scale, m, l, alpha);
}

void scale_rows(float* acc, std::int64_t rows, std::int64_t dv, const float* alpha) {
  if (have_avx512()) return scale_avx512(acc, rows, dv, alpha);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < dv; ++j) acc[r * dv + j] *= alpha[r];
}

template <class T>
void store_rows(const float* acc, const float* l, std::int64_t rows, std::int64_t dv, T* out, std::int64_t ld_out) {
  if (have_avx512()) return store_avx512(acc, l, rows, dv, out, ld_out);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (std::int64_t j = 0; j < dv; ++j) out[r * ld_out + j] = from_float<T>(acc[r * dv + j] * inv);
  }
}

template void online_softmax_block<float>(float*, std::int64_t, std::int64_t, const RowWindow&, float, float*,
                                          float*, float*);
template void online_softmax_block<c10::BFloat16>(float*, std::int64_t, std::int64_t, const RowWindow&, float, float*,
                                                  float*, float*);
template void store_rows<float>(const float*, const float*, std::int64_t, std::int64_t, float*, std::int64_t);
template void store_rows<c10::BFloat16>(const float*, const float*, std::int64_t, std::int64_t, c10::BFloat16*,
                                        std::int64_t);

}  // namespace vdit::detail
