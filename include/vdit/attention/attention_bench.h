// The attention benchmark behind `vdit bench attention` and bench/bench_attention: times
// vdit::attention on random inputs against a plain GEMM and the materialised softmax(QKᵀ)V
// measured in the same run, and reports one JSON object.
#pragma once

#include "vdit/attention/attention.h"

#include <nlohmann/json.hpp>

#include <optional>
#include <string>

namespace vdit {

struct AttentionBenchOptions {
  Grid3 grid{8, 32, 32};
  std::int64_t batch = 1, heads = 12, head_dim = 128;
  std::optional<Window3> window;  // nullopt: full attention
  at::ScalarType dtype = at::kBFloat16;
  at::Device device = at::kCPU;
  double scale_factor = 1.0;
  int repeats = 3;            // timed runs after one warm-up run; the median is reported
  bool naive = true;          // time the materialised attention (when it fits)
  bool compare_full = true;   // windowed: also time full attention on the same inputs
  double naive_limit_bytes = 0;  // 0: min(available memory / 3, 8 GiB)
  std::uint64_t seed = 0;
};

// Runs the benchmark; fields: backend, device, dtype, threads, batch, heads, head_dim, grid,
// window, dilation, tokens, flops_useful, flops_spent, seconds (median), gflops (useful FLOPs per
// second), gemm_gflops (plain at::mm, n×n×n, same dtype, median interleaved with the attention
// runs), gemm_workers_gflops (the same GEMM run as one single-threaded GEMM per worker, as the
// attention kernel runs its GEMMs), attention_over_gemm, naive_seconds (null when it does not
// fit), naive_speedup, naive_max_abs_diff, peak_extra_bytes (peak resident memory of one call
// beyond q/k/v/out, measured; "peak_extra_source" says how), workspace_bytes (kernel scratch,
// computed), and for windows full_seconds, speedup_vs_full, ideal_speedup.
nlohmann::json run_attention_bench(const AttentionBenchOptions& options);

// "T,H,W" (three positive integers).
Grid3 parse_grid(const std::string& text, const std::string& option = "--grid");
// "full" or "t,h,w" (sizes; 0 or >= the axis: full along that axis), with dilation "a,b,c".
std::optional<Window3> parse_window(const std::string& text, const std::string& dilation = "1,1,1",
                                    const std::string& option = "--window");

}  // namespace vdit
