// Attention benchmark suite: the configurations behind the attention targets, each printed as
// one JSON line by vdit::run_attention_bench (the function `vdit bench attention` runs), then a
// summary line with the target checks. Usage: bench_attention [--quick] [--dtype bf16|f32]
// [--wan] (--wan adds Wan 1.3B 480p full attention: 12 heads x 128 on 21x30x52, ~30 s in bf16).
#include "vdit/attention/attention_bench.h"
#include "vdit/common.h"

#include <cstring>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
  vdit::configure_blas(argv);
  bool quick = false, wan = false;
  std::string dtype = "bf16";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--wan")) wan = true;
    else if (!std::strcmp(argv[i], "--dtype") && i + 1 < argc) dtype = argv[++i];
    else {
      std::cerr << "usage: bench_attention [--quick] [--wan] [--dtype bf16|f32]\n";
      return 2;
    }
  }
  try {
    vdit::set_threads(0);
    vdit::AttentionBenchOptions base;
    base.dtype = vdit::parse_dtype(dtype);
    base.repeats = quick ? 1 : 3;
    nlohmann::json summary;

    // Full attention at 8192 tokens (Wan heads).
    vdit::AttentionBenchOptions full = base;
    full.grid = vdit::Grid3{8, 32, 32};
    full.heads = quick ? 4 : 12;
    const auto jf = vdit::run_attention_bench(full);
    std::cout << jf.dump() << std::endl;
    summary["full_8k_attention_over_gemm"] = jf["attention_over_gemm"];
    summary["full_8k_naive_speedup"] = jf["naive_speedup"];

    // FreeSwim-style window (all frames, a spatial window) covering 20 % of Wan 480p's grid.
    vdit::AttentionBenchOptions win = base;
    win.grid = vdit::Grid3{21, 30, 52};
    win.heads = quick ? 2 : 4;
    win.window = vdit::Window3{{21, 13, 24}, {1, 1, 1}};
    win.naive = false;
    const auto jw = vdit::run_attention_bench(win);
    std::cout << jw.dump() << std::endl;
    summary["window20_speedup_over_ideal"] = jw["speedup_over_ideal"];

    if (wan) {
      vdit::AttentionBenchOptions w480 = base;
      w480.grid = vdit::Grid3{21, 30, 52};
      w480.heads = 12;
      w480.repeats = 1;
      const auto jwan = vdit::run_attention_bench(w480);
      std::cout << jwan.dump() << std::endl;
      summary["wan480_full_seconds"] = jwan["seconds"];
    }
    std::cout << summary.dump() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "bench_attention: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
