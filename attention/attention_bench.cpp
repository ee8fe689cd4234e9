// The attention benchmark (see attention_bench.h). Every ratio it reports is measured within one
// run, with GEMM and attention timings interleaved, because the machines it runs on are shared.
#include "vdit/attention/attention_bench.h"

#include "attention_internal.h"
#include "vdit/common.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>
#include <vector>

namespace vdit {
namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Waits for the device (a scalar read synchronises CUDA; a no-op cost on the CPU).
void sync(const at::Tensor& t) {
  if (!t.is_cpu() && t.numel() > 0) (void)t.reshape({-1})[0].item<double>();
}

// "/proc/self/status" field in bytes (0 when unknown).
std::int64_t status_bytes(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      std::istringstream s(line.substr(field.size() + 1));
      std::int64_t kb = 0;
      s >> kb;
      return kb * 1024;
    }
  }
  return 0;
}

double available_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024.0;
  }
  return 4.0 * (1ull << 30);
}

std::vector<std::int64_t> parse_ints(const std::string& text, const std::string& option, std::size_t count) {
  std::vector<std::int64_t> values;
  std::stringstream s(text);
  std::string item;
  while (std::getline(s, item, ',')) {
    try {
      std::size_t used = 0;
      const long long v = std::stoll(item, &used);
      if (used != item.size()) throw std::invalid_argument(item);
      values.push_back(v);
    } catch (const std::exception&) {
      throw InputError(option + ": '" + text + "' is not a list of " + std::to_string(count) + " integers");
    }
  }
  if (values.size() != count) throw InputError(option + ": expected " + std::to_string(count) + " comma-separated integers, got '" + text + "'");
  return values;
}

std::string backend_name(const AttentionBenchOptions& o, bool windowed) {
  const bool cpu_kernel = o.device.is_cpu() && (o.dtype == at::kFloat || o.dtype == at::kBFloat16);
  if (cpu_kernel) {
    // bf16 inputs: which dtype the GEMMs ran in (see cpu_attention.cpp on why f32 without AMX).
    const bool f32_gemm = o.dtype == at::kFloat || !detail::bf16_gemms();
    return std::string(windowed ? "cpu-window-" : "cpu-blocked-") + detail::kernel_isa() +
           (f32_gemm ? "-gemm-f32" : "-gemm-bf16");
  }
#if TORCH_VERSION_MAJOR >= 2
  if (o.device.is_cuda() && !windowed) return "sdpa";
#endif
  return "generic";
}

}  // namespace

Grid3 parse_grid(const std::string& text, const std::string& option) {
  const auto v = parse_ints(text, option, 3);
  for (auto x : v)
    if (x < 1) throw InputError(option + ": every grid axis must be >= 1, got '" + text + "'");
  return Grid3{v[0], v[1], v[2]};
}

std::optional<Window3> parse_window(const std::string& text, const std::string& dilation, const std::string& option) {
  if (text == "full" || text.empty()) return std::nullopt;
  const auto sizes = parse_ints(text, option, 3);
  const auto dil = parse_ints(dilation, "--dilation", 3);
  Window3 w;
  for (int a = 0; a < 3; ++a) {
    if (sizes[a] < 0) throw InputError(option + ": window sizes must be >= 0 (0: whole axis), got '" + text + "'");
    if (dil[a] < 1) throw InputError("--dilation: every dilation must be >= 1, got '" + dilation + "'");
    w.size[a] = sizes[a];
    w.dilation[a] = dil[a];
  }
  return w;
}

nlohmann::json run_attention_bench(const AttentionBenchOptions& o) {
  if (o.batch < 1 || o.heads < 1 || o.head_dim < 1) throw InputError("bench attention: batch, heads and head-dim must be >= 1");
  if (o.repeats < 1) throw InputError("bench attention: --repeats must be >= 1");
  if (o.dtype != at::kFloat && o.dtype != at::kBFloat16 && o.dtype != at::kHalf && o.dtype != at::kDouble)
    throw InputError("bench attention: --dtype must be f32, bf16, f16 or f64");
  at::NoGradGuard no_grad;
  const std::int64_t N = o.grid.numel();
  const auto opts = at::TensorOptions().dtype(o.dtype).device(o.device);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  const auto random = [&](std::vector<std::int64_t> shape) {
    return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)).to(opts);
  };
  const at::Tensor q = random({o.batch, o.heads, N, o.head_dim});
  const at::Tensor k = random({o.batch, o.heads, N, o.head_dim});
  const at::Tensor v = random({o.batch, o.heads, N, o.head_dim});
  AttentionCall call;
  call.grid = o.grid;
  call.window = o.window;
  call.scale_factor = o.scale_factor;
  const bool windowed = o.window && !detail::window_is_full(o.grid, *o.window);
  const AttentionCost cost = attention_cost(o.batch, o.heads, N, N, o.head_dim, o.head_dim, o.dtype, call);
  const double elt = static_cast<double>(c10::elementSize(o.dtype));
  const double out_bytes = elt * o.batch * o.heads * N * o.head_dim;

  nlohmann::json j;
  j["backend"] = backend_name(o, windowed);
  j["device"] = o.device.str();
  j["dtype"] = dtype_name(o.dtype);
  j["threads"] = at::get_num_threads();
  j["batch"] = o.batch;
  j["heads"] = o.heads;
  j["head_dim"] = o.head_dim;
  j["grid"] = {o.grid.t, o.grid.h, o.grid.w};
  if (o.window) {
    j["window"] = {o.window->size[0], o.window->size[1], o.window->size[2]};
    j["dilation"] = {o.window->dilation[0], o.window->dilation[1], o.window->dilation[2]};
  } else {
    j["window"] = "full";
  }
  j["tokens"] = N;
  j["flops_useful"] = cost.flops_useful;
  j["flops_spent"] = cost.flops_spent;
  j["spent_over_useful"] = cost.flops_spent / std::max(cost.flops_useful, 1.0);
  j["query_block"] = cost.query_block;
  j["key_block"] = cost.key_block;

  // Warm-up call, which also measures peak memory: the resident high-water mark is reset first.
  const std::int64_t rss_before = status_bytes("VmRSS");
  const bool rss_ok = o.device.is_cpu() && rss_before > 0 && reset_peak_rss();
  at::Tensor out = attention(q, k, v, call);
  sync(out);
  if (rss_ok) {
    j["peak_extra_bytes"] = std::max<double>(0.0, static_cast<double>(status_bytes("VmHWM") - rss_before) - out_bytes);
    j["peak_extra_source"] = "rss";
  } else {
    j["peak_extra_bytes"] = cost.workspace_bytes;
    j["peak_extra_source"] = "estimate";
  }
  j["workspace_bytes"] = cost.workspace_bytes;

  // GEMM reference: n×n×n in the same dtype.
  const std::int64_t n = 2048;
  const at::Tensor ga = random({n, n}), gb = random({n, n});
  at::Tensor gc = at::empty({n, n}, opts);
  const double gemm_flops = 2.0 * n * n * n;
  std::vector<double> attn_times, gemm_times;
  const auto time_gemm = [&] {
    const double t0 = now_seconds();
    at::mm_out(gc, ga, gb);
    sync(gc);
    gemm_times.push_back(now_seconds() - t0);
  };
  time_gemm();  // warm-up
  gemm_times.clear();
  for (int r = 0; r < o.repeats; ++r) {
    for (int g = 0; g < 3; ++g) time_gemm();
    const double t0 = now_seconds();
    out = attention(q, k, v, call);
    sync(out);
    attn_times.push_back(now_seconds() - t0);
  }
  const double seconds = median(attn_times);
  const double gemm_seconds = median(gemm_times);
  j["seconds"] = seconds;
  j["seconds_all"] = attn_times;
  j["gflops"] = cost.flops_useful / seconds / 1e9;
  j["gflops_spent"] = cost.flops_spent / seconds / 1e9;
  j["gemm_shape"] = {n, n, n};
  j["gemm_gflops"] = gemm_flops / gemm_seconds / 1e9;

  // The same GEMM as the attention kernel runs its GEMMs: single-threaded, one per worker.
  double gemm_workers_gflops = 0;
  if (o.device.is_cpu()) {
    const int workers = detail::worker_count(1 << 20);
    std::vector<at::Tensor> wa, wb, wc;
    for (int w = 0; w < workers; ++w) {
      wa.push_back(random({n / 2, n}));
      wb.push_back(random({n, n}));
      wc.push_back(at::empty({n / 2, n}, opts));
    }
    std::vector<double> times;
    for (int r = 0; r < 3; ++r) {
      const double t0 = now_seconds();
      detail::run_workers(workers, [&](int w) { at::mm_out(wc[w], wa[w], wb[w]); });
      times.push_back(now_seconds() - t0);
    }
    gemm_workers_gflops = workers * gemm_flops / 2 / median(times) / 1e9;
    j["gemm_workers_gflops"] = gemm_workers_gflops;
  } else {
    j["gemm_workers_gflops"] = nullptr;
  }
  j["attention_over_gemm"] = cost.flops_useful / seconds / 1e9 / std::max(j["gemm_gflops"].get<double>(), gemm_workers_gflops);

  // Materialised softmax(QKᵀ)V in the same dtype, when its [B, heads, N, N] scores fit.
  const double limit = o.naive_limit_bytes > 0 ? o.naive_limit_bytes
                                               : std::min(available_memory_bytes() / 3.0, 8.0 * (1ull << 30));
  const double naive_bytes = 2.0 * elt * o.batch * o.heads * static_cast<double>(N) * N + (windowed ? 2.0 * N * N : 0.0);
  j["naive_bytes"] = naive_bytes;
  if (o.naive && naive_bytes <= limit) {
    std::vector<double> times;
    at::Tensor ref;
    for (int r = 0; r < std::min(o.repeats, 2); ++r) {
      ref = at::Tensor();
      const double t0 = now_seconds();
      ref = attention_materialized(q, k, v, call);
      sync(ref);
      times.push_back(now_seconds() - t0);
    }
    const double naive_seconds = median(times);
    j["naive_seconds"] = naive_seconds;
    j["naive_speedup"] = naive_seconds / seconds;
    j["naive_max_abs_diff"] = (ref.to(at::kFloat) - out.to(at::kFloat)).abs().max().item<double>();
  } else {
    j["naive_seconds"] = nullptr;
    j["naive_speedup"] = nullptr;
  }

  if (windowed && o.compare_full) {
    AttentionCall full = call;
    full.window = std::nullopt;
    const double full_flops = attention_cost(o.batch, o.heads, N, N, o.head_dim, o.head_dim, o.dtype, full).flops_useful;
    std::vector<double> times;
    for (int r = 0; r < o.repeats; ++r) {
      const double t0 = now_seconds();
      at::Tensor f = attention(q, k, v, full);
      sync(f);
      times.push_back(now_seconds() - t0);
    }
    const double full_seconds = median(times);
    j["full_seconds"] = full_seconds;
    j["speedup_vs_full"] = full_seconds / seconds;
    j["ideal_speedup"] = full_flops / cost.flops_useful;
    j["speedup_over_ideal"] = (full_seconds / seconds) / (full_flops / cost.flops_useful);
  }
  return j;
}

}  // namespace vdit
