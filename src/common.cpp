#include "vdit/common.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <map>
#include <mutex>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

namespace vdit {

namespace {
std::atomic<int> g_log_level{static_cast<int>(LogLevel::Info)};
}

void set_log_level(LogLevel level) { g_log_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_log_level.load()); }

void log_info(const std::string& message) {
  if (g_log_level.load() >= static_cast<int>(LogLevel::Info)) std::cerr << message << std::endl;
}
void log_verbose(const std::string& message) {
  if (g_log_level.load() >= static_cast<int>(LogLevel::Verbose)) std::cerr << message << std::endl;
}
void log_warning(const std::string& message) { std::cerr << "warning: " << message << std::endl; }

void set_threads(int n) {
  if (n <= 0) {
    unsigned hw = std::thread::hardware_concurrency();
    n = hw == 0 ? 1 : static_cast<int>(hw);
  }
  at::set_num_threads(n);
}

namespace {
// OpenBLAS's own entry points, looked up at run time so that vdit does not link OpenBLAS itself
// (LibTorch loads it through libblas.so.3 when that alternative points at OpenBLAS).
const char* openblas_corename() {
  using Fn = char* (*)();
  static Fn fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  return fn ? fn() : nullptr;
}
int openblas_parallel_kind() {
  using Fn = int (*)();
  static Fn fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"));
  return fn ? fn() : -1;
}
}  // namespace

void configure_blas(char** argv) {
  if (std::getenv("VDIT_KEEP_BLAS") || !argv || !argv[0]) return;
  const char* core = openblas_corename();
  if (!core) return;
  bool changed = false;
  if (!std::getenv("OPENBLAS_CORETYPE")) {
    const char* target = nullptr;
#if defined(__x86_64__) || defined(__i386__)
    // OpenBLAS's fallbacks when it does not know the CPU model; a known core is left alone.
    static const char* const generic[] = {"prescott", "core2",  "nehalem", "katmai",
                                          "coppermine", "northwood", "banias", "unknown"};
    std::string name = core;
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (std::any_of(std::begin(generic), std::end(generic), [&](const char* g) { return name == g; })) {
      __builtin_cpu_init();
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
        target = "SKYLAKEX";
      } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        target = "HASWELL";
      }
    }
#endif
    if (target && setenv("OPENBLAS_CORETYPE", target, 1) == 0) changed = true;
  }
  const bool openblas_pthreads = openblas_parallel_kind() == 1;
  if (openblas_pthreads && !std::getenv("OPENBLAS_THREAD_TIMEOUT") && !std::getenv("GOTO_THREAD_TIMEOUT")) {
    if (setenv("OPENBLAS_THREAD_TIMEOUT", "4", 1) == 0) changed = true;
  }
  // The other side of the same contention: LibTorch's OpenMP workers spin after each parallel
  // region (libgomp's default wait policy, read once at load, hence the re-execution) while
  // OpenBLAS's threads want the cores for the next GEMM. On an AVX2-only 2-core EPYC, with the
  // thread timeout already set, the demo model's 30 sampling steps took 10.2 s and 5.8 s with
  // OMP_WAIT_POLICY=PASSIVE, a demo DiT training step 1.89 s and 1.23 s. Kept when the user set
  // OMP_WAIT_POLICY or GOMP_SPINCOUNT.
  if (openblas_pthreads && !std::getenv("OMP_WAIT_POLICY") && !std::getenv("GOMP_SPINCOUNT")) {
    if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1) == 0) changed = true;
  }
  if (!changed) return;
  execv("/proc/self/exe", argv);
  // Only reached when exec failed: carry on as loaded (correct, just slower). The variables stay
  // set, so a child process gets them.
}

std::string blas_description() {
  const char* core = openblas_corename();
  if (!core) return "not OpenBLAS";
  const int kind = openblas_parallel_kind();
  return std::string("OpenBLAS ") + core + (kind == 0 ? " (sequential)" : kind == 1 ? " (pthreads)" : kind == 2 ? " (OpenMP)" : "");
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "f32" || name == "float32" || name == "fp32" || name == "float") return at::kFloat;
  if (name == "bf16" || name == "bfloat16") return at::kBFloat16;
  if (name == "f16" || name == "float16" || name == "fp16" || name == "half") return at::kHalf;
  if (name == "f64" || name == "float64") return at::kDouble;
  throw InputError("unknown dtype '" + name + "' (expected f32, bf16 or f16)");
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "f32";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "f16";
    case at::kDouble: return "f64";
    case at::kLong: return "i64";
    case at::kInt: return "i32";
    case at::kShort: return "i16";
    case at::kChar: return "i8";
    case at::kByte: return "u8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

bool matmul_supported(at::ScalarType dtype, at::Device device) {
  static std::mutex mutex;
  static std::map<std::pair<int, std::string>, bool> known;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(dtype), device.str());
  if (auto it = known.find(key); it != known.end()) return it->second;
  bool ok = true;
  try {
    at::Tensor a = at::ones({2, 2}, at::TensorOptions().dtype(dtype).device(device));
    (void)at::matmul(a, a);
  } catch (const std::exception&) {
    ok = false;
  }
  known[key] = ok;
  return ok;
}

bool cpu_gemm_needs_widening(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  static std::mutex mutex;
  static std::map<std::pair<int, bool>, bool> known;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(dtype), at::globalContext().userEnabledMkldnn());
  if (auto it = known.find(key); it != known.end()) return it->second;
  bool widen = false;
  try {
    // Positive terms, so nothing cancels: f32 accumulation leaves only the final rounding to the
    // reduced dtype (<= 0.4 % for bf16), bf16 accumulation over 4096 terms is tens of percent off.
    // The convolution is probed separately: LibTorch picks its kernel by its own rules.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(12345);
    const at::Tensor a = at::rand({4, 4096}, gen).to(dtype), b = at::rand({4096, 4}, gen).to(dtype);
    const at::Tensor exact = at::mm(a.to(at::kDouble), b.to(at::kDouble));
    const double mm_err = ((at::mm(a, b).to(at::kDouble) - exact).abs() / exact).max().item<double>();
    const at::Tensor x = a.view({1, 4096, 1, 2, 2}), w = b.t().contiguous().view({4, 4096, 1, 1, 1});
    const at::Tensor cexact = at::conv3d(x.to(at::kDouble), w.to(at::kDouble));
    const double conv_err = ((at::conv3d(x, w).to(at::kDouble) - cexact).abs() / cexact).max().item<double>();
    widen = !(mm_err < 0.01 && conv_err < 0.01);
  } catch (const std::exception&) {
    widen = true;  // no kernel for this dtype
  }
  known[key] = widen;
  if (widen) log_verbose(dtype_name(dtype) + " CPU GEMMs and convolutions run widened to f32 (LibTorch's own kernel would sum in " + dtype_name(dtype) + ")");
  return widen;
}

namespace {
bool widen_on_cpu(const at::Tensor& t) { return t.device().is_cpu() && cpu_gemm_needs_widening(t.scalar_type()); }
at::Tensor widened(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }
}  // namespace

at::Tensor linear_f32_accumulate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!widen_on_cpu(x)) return at::linear(x, weight, bias);
  return at::linear(widened(x), widened(weight), widened(bias)).to(x.scalar_type());
}

at::Tensor matmul_f32_accumulate(const at::Tensor& a, const at::Tensor& b) {
  if (!widen_on_cpu(a)) return at::matmul(a, b);
  return at::matmul(widened(a), widened(b)).to(a.scalar_type());
}

at::Tensor conv3d_f32_accumulate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 at::IntArrayRef stride) {
  if (!widen_on_cpu(x)) return at::conv3d(x, weight, bias, stride);
  return at::conv3d(widened(x), widened(weight), widened(bias), stride).to(x.scalar_type());
}

void check_compute_dtype(at::ScalarType dtype, at::Device device) {
  if (!matmul_supported(dtype, device))
    throw InputError("--dtype " + dtype_name(dtype) + " is not supported on " + device.str() +
                     " by this LibTorch build (use f32 or bf16)");
}

at::Device parse_device(const std::string& name) {
  if (name == "cpu") return at::Device(at::kCPU);
  if (name.rfind("cuda", 0) == 0) {
    int index = -1;
    if (name.size() > 4) {
      if (name[4] != ':' || name.size() == 5) throw InputError("bad device '" + name + "' (expected cpu, cuda or cuda:N)");
      try {
        size_t used = 0;
        index = std::stoi(name.substr(5), &used);
        if (used != name.size() - 5 || index < 0) throw std::invalid_argument("index");
      } catch (const std::exception&) {
        throw InputError("bad device '" + name + "' (expected cpu, cuda or cuda:N)");
      }
    }
    if (!at::hasCUDA()) throw InputError("device '" + name + "' requested but this build of LibTorch has no CUDA support");
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  throw InputError("bad device '" + name + "' (expected cpu, cuda or cuda:N)");
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

std::int64_t peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream in(line.substr(6));
      std::int64_t kib = 0;
      in >> kib;
      return kib * 1024;
    }
  }
  return 0;
}

bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  if (!out) return false;
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

}  // namespace vdit
