// Thread-count benchmark: the demo DiT's self-attention calls (small: 2 x 4 heads x 192 tokens x 32)
// and one mid-sized call, each timed at one intra-op thread and at all cores, in one run. Small calls
// are where per-call thread start-up showed: when the CPU kernel's workers were fresh threads,
// every call re-ran LibTorch's per-thread init and rebuilt its thread pool, and the demo generated
// 4-9x slower at 2 threads than at 1. Prints one JSON line per size and a summary; target: the
// small-call ratio (all cores over one thread) at most 1.5, reported as small_target_met. Usage: bench_threads [--quick]
#include "vdit/attention/attention.h"
#include "vdit/common.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iostream>
#include <thread>
#include <vector>

namespace {

// Median seconds per attention call over `rounds` rounds of `calls` calls.
double seconds_per_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const vdit::AttentionCall& call,
                        int calls, int rounds) {
  std::vector<double> per_call;
  (void)vdit::attention(q, k, v, call);  // warm-up (first use of the workers)
  for (int r = 0; r < rounds; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) (void)vdit::attention(q, k, v, call);
    per_call.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / calls);
  }
  std::sort(per_call.begin(), per_call.end());
  return per_call[per_call.size() / 2];
}

nlohmann::json measure(const char* name, vdit::Grid3 grid, std::int64_t batch, std::int64_t heads, std::int64_t dim,
                       int calls, int rounds, int all_cores) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const std::int64_t n = grid.t * grid.h * grid.w;
  const auto q = at::randn({batch, heads, n, dim}, gen), k = at::randn({batch, heads, n, dim}, gen),
             v = at::randn({batch, heads, n, dim}, gen);
  vdit::AttentionCall call;
  call.grid = grid;
  // Alternate the thread counts within each round set so drift on a shared machine hits both.
  vdit::set_threads(1);
  const double one_a = seconds_per_call(q, k, v, call, calls, rounds);
  vdit::set_threads(all_cores);
  const double all_a = seconds_per_call(q, k, v, call, calls, rounds);
  vdit::set_threads(1);
  const double one_b = seconds_per_call(q, k, v, call, calls, rounds);
  vdit::set_threads(all_cores);
  const double all_b = seconds_per_call(q, k, v, call, calls, rounds);
  const double one = std::min(one_a, one_b), all = std::min(all_a, all_b);
  nlohmann::json j;
  j["case"] = name;
  j["tokens"] = n;
  j["batch_heads"] = batch * heads;
  j["threads"] = all_cores;
  j["us_per_call_1_thread"] = one * 1e6;
  j["us_per_call_all_threads"] = all * 1e6;
  j["all_over_one"] = all / one;
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  vdit::configure_blas(argv);
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) {
      quick = true;
    } else {
      std::cerr << "usage: bench_threads [--quick]\n";
      return 2;
    }
  }
  try {
    vdit::set_threads(0);
    const int all_cores = at::get_num_threads();
    const int rounds = quick ? 3 : 7;
    // The demo DiT at 64x64, 9 frames: 3 x 8 x 8 tokens, 4 heads of 32, cond and uncond batched.
    const auto small = measure("demo_self_attention", vdit::Grid3{3, 8, 8}, 2, 4, 32, quick ? 100 : 400, rounds, all_cores);
    std::cout << small.dump() << std::endl;
    const auto mid = measure("4k_tokens", vdit::Grid3{4, 32, 32}, 1, 4, 64, quick ? 2 : 6, rounds, all_cores);
    std::cout << mid.dump() << std::endl;
    nlohmann::json summary;
    summary["small_all_over_one"] = small["all_over_one"];
    summary["mid_all_over_one"] = mid["all_over_one"];
    summary["small_target_max"] = 1.5;
    summary["small_target_met"] = all_cores == 1 || small["all_over_one"].get<double>() <= 1.5;
    std::cout << summary.dump() << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "bench_threads: " << e.what() << std::endl;
    return 1;
  }
}
