// Reduced-precision CPU GEMMs sum in f32 (common.h: cpu_gemm_needs_widening and the *_f32_accumulate
// ops), also on LibTorch's own kernels, the path a CPU without AVX-512 takes for bf16.
#include <catch2/catch.hpp>

#include "vdit/common.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

using namespace vdit;

namespace {

// LibTorch's own bf16 kernels are what a CPU without AVX-512 runs; switching oneDNN off selects
// them on any CPU.
struct OneDnnGuard {
  bool saved = at::globalContext().userEnabledMkldnn();
  explicit OneDnnGuard(bool enabled) { at::globalContext().setUserEnabledMkldnn(enabled); }
  ~OneDnnGuard() { at::globalContext().setUserEnabledMkldnn(saved); }
};

at::Tensor positive(std::vector<std::int64_t> shape, std::uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::rand(shape, gen).to(at::kBFloat16);
}

// Largest |a - exact| / |exact| over elements (all exact values are positive here).
double max_rel(const at::Tensor& a, const at::Tensor& exact) {
  return ((a.to(at::kDouble) - exact).abs() / exact).max().item<double>();
}

}  // namespace

TEST_CASE("bf16 CPU GEMMs and convolutions sum in f32 with and without oneDNN", "[dtype]") {
  // Long positive sums, so nothing cancels. With f32 accumulation the error is the final rounding
  // to bf16, at most 2^-8 relative (round to nearest, 8 significant bits), plus at most K * 2^-24
  // from summing K positive terms in f32: 0.0043 for K = 4096. bf16 accumulation over 4096 terms
  // loses tens of percent.
  const double bound = std::ldexp(1.0, -8) + 4096 * std::ldexp(1.0, -24);
  const at::Tensor a = positive({8, 4096}, 1), b = positive({4096, 8}, 2), bias = positive({8}, 3);
  const at::Tensor a64 = a.to(at::kDouble), b64 = b.to(at::kDouble), bias64 = bias.to(at::kDouble);
  const at::Tensor x = a.view({1, 4096, 2, 2, 2}), w = b.t().contiguous().view({8, 4096, 1, 1, 1});
  for (bool onednn : {true, false}) {
    OneDnnGuard guard(onednn);
    INFO("oneDNN " << (onednn ? "on" : "off") << ", widened: " << cpu_gemm_needs_widening(at::kBFloat16));
    const at::Tensor mm = matmul_f32_accumulate(a, b);
    CHECK(mm.scalar_type() == at::kBFloat16);
    CHECK(max_rel(mm, at::mm(a64, b64)) <= bound);
    const at::Tensor lin = linear_f32_accumulate(a, b.t(), bias);
    CHECK(lin.scalar_type() == at::kBFloat16);
    CHECK(max_rel(lin, at::linear(a64, b64.t(), bias64)) <= bound);
    const at::Tensor conv = conv3d_f32_accumulate(x, w, bias, {1, 1, 1});
    CHECK(conv.scalar_type() == at::kBFloat16);
    CHECK(max_rel(conv, at::conv3d(x.to(at::kDouble), w.to(at::kDouble), bias64)) <= bound);
    // The probe agrees with what the plain op does: widening is asked for exactly when the plain
    // bf16 product would be off by more than the output rounding.
    CHECK(cpu_gemm_needs_widening(at::kBFloat16) == (max_rel(at::mm(a, b), at::mm(a64, b64)) > bound));
  }
  // f32 and f64 are never widened; CPU f16 is whenever this LibTorch has no f16 GEMM.
  CHECK_FALSE(cpu_gemm_needs_widening(at::kFloat));
  CHECK_FALSE(cpu_gemm_needs_widening(at::kDouble));
  if (!matmul_supported(at::kHalf, at::kCPU)) CHECK(cpu_gemm_needs_widening(at::kHalf));
}
