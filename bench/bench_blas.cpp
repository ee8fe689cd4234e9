// f32 GEMM rate and a GEMM/elementwise mix under the OpenBLAS set-up vdit selects
// (vdit::configure_blas: kernels and thread spin) against OpenBLAS's own, measured in one run:
// this program times vdit's set-up, then runs itself again without it (VDIT_KEEP_BLAS=1, the three
// variables removed) and prints one JSON line per GEMM size with the ratio, then one for the mix,
// which is also timed with everything but the OpenMP wait policy (that setting's own share).
// Sizes: square GEMMs and the demo DiT's FFN shape.
//
//   bench_blas            # both measurements and the ratios
//   bench_blas --single   # this process only (what the parent calls)
#include "vdit/common.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <unistd.h>
#include <iostream>
#include <string>
#include <vector>

namespace {

struct Shape {
  std::int64_t m, k, n;
};
const std::vector<Shape> kShapes = {{256, 256, 256}, {1024, 1024, 1024}, {2048, 2048, 2048}, {6144, 128, 512}};

// Median GFLOP/s over 5 timed runs of enough repetitions to last ~0.2 s each.
double gemm_gflops(const Shape& s) {
  const at::Tensor a = at::randn({s.m, s.k}), b = at::randn({s.k, s.n});
  const double flops = 2.0 * s.m * s.k * s.n;
  at::mm(a, b);
  const auto t0 = std::chrono::steady_clock::now();
  at::mm(a, b);
  const double once = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int reps = std::max(1, static_cast<int>(0.2 / std::max(once, 1e-6)));
  std::vector<double> rates;
  for (int r = 0; r < 5; ++r) {
    const auto t = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) at::mm(a, b);
    rates.push_back(flops * reps / std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

// A sampling step's pattern in miniature: small GEMMs alternating with elementwise work on
// LibTorch's OpenMP threads (where OpenBLAS workers that keep spinning after a GEMM steal the
// cores). Median milliseconds per 100 rounds.
double mixed_ms() {
  const at::Tensor x = at::randn({384, 128}), w1 = at::randn({128, 512}), w2 = at::randn({512, 128});
  std::vector<double> ms;
  for (int r = 0; r < 6; ++r) {
    const auto t = std::chrono::steady_clock::now();
    at::Tensor h = x;
    for (int i = 0; i < 100; ++i) h = at::layer_norm(at::mm(at::gelu(at::mm(h, w1)), w2) + h, {128});
    if (r > 0) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

nlohmann::json measure() {
  nlohmann::json out;
  out["blas"] = vdit::blas_description();
  for (const Shape& s : kShapes) {
    out["gflops"].push_back({{"m", s.m}, {"k", s.k}, {"n", s.n}, {"gflops", gemm_gflops(s)}});
  }
  out["mixed_ms"] = mixed_ms();
  return out;
}

// Runs this program again (COMMAND) and parses the one JSON line it prints.
nlohmann::json run_child(const std::string& command) {
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) throw vdit::RuntimeError("bench_blas: cannot run " + command);
  std::string text;
  char buf[4096];
  while (fgets(buf, sizeof buf, pipe)) text += buf;
  if (pclose(pipe) != 0 || text.empty()) throw vdit::RuntimeError("bench_blas: the child run failed: " + command);
  return nlohmann::json::parse(text);
}

}  // namespace

int main(int argc, char** argv) {
  vdit::configure_blas(argv);
  try {
    vdit::set_threads(0);
    if (argc > 1 && std::strcmp(argv[1], "--single") == 0) {
      std::cout << measure().dump() << std::endl;
      return 0;
    }
    const nlohmann::json selected = measure();
    // The library's own choice: the same program, told not to re-select.
    const std::string self = " VDIT_KEEP_BLAS=1 /proc/" + std::to_string(::getpid()) + "/exe --single";
    const nlohmann::json own = run_child("env -u OPENBLAS_CORETYPE -u OPENBLAS_THREAD_TIMEOUT -u OMP_WAIT_POLICY" + self);
    const nlohmann::json spinning_omp = run_child("env -u OMP_WAIT_POLICY" + self);
    for (std::size_t i = 0; i < kShapes.size(); ++i) {
      const double a = selected["gflops"][i]["gflops"], b = own["gflops"][i]["gflops"];
      nlohmann::json line = {{"m", kShapes[i].m},         {"k", kShapes[i].k},       {"n", kShapes[i].n},
                             {"blas_selected", selected["blas"]}, {"gflops_selected", a},
                             {"blas_own", own["blas"]},     {"gflops_own", b},         {"ratio", a / b}};
      std::cout << line.dump() << std::endl;
    }
    const double ms_selected = selected["mixed_ms"], ms_own = own["mixed_ms"], ms_spin = spinning_omp["mixed_ms"];
    std::cout << nlohmann::json{{"workload", "100 x (mm 384x128x512, gelu, mm, add, layer_norm)"},
                                {"ms_selected", ms_selected}, {"ms_own", ms_own}, {"speedup", ms_own / ms_selected},
                                {"ms_selected_but_omp_active", ms_spin}, {"omp_passive_speedup", ms_spin / ms_selected}}
                     .dump()
              << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "bench_blas: error: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
