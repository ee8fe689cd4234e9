// Shared basics: the two error kinds the CLI maps to exit codes, logging, threads, dtypes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace vdit {

// Bad input from the user (a corrupt file, a wrong option, an impossible size): exit code 2.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A failure while doing valid work (out of memory, an encoder that refuses): exit code 1.
struct RuntimeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class LogLevel { Quiet = 0, Info = 1, Verbose = 2 };
void set_log_level(LogLevel level);
LogLevel log_level();
void log_info(const std::string& message);     // stderr unless quiet
void log_verbose(const std::string& message);  // stderr with -v
void log_warning(const std::string& message);  // stderr always, prefixed "warning: "

// Sets LibTorch's intra-op thread count; n <= 0 means "all cores of this machine".
void set_threads(int n);

// OpenBLAS (LibTorch's f32 GEMM on Debian) fixes two things when it loads, from the environment:
// - its kernels. Version 0.3.21 does not recognise some current Xeons (virtual machines report a
//   generic model) and falls back to its Prescott kernels: on this project's 2-core machine a
//   2048^2 GEMM runs at 61 GFLOP/s instead of 302 with the SkylakeX ones (bench_blas);
// - how long its worker threads spin after a GEMM (2^28 cycles by default). They spin while
//   LibTorch's OpenMP threads run the elementwise work between GEMMs, on the same cores: the demo
//   model's 30 sampling steps took 11.9 s, and 6.8 s with OPENBLAS_THREAD_TIMEOUT=4 (16 cycles).
// Call first thing in main(): when OpenBLAS reports a generic core on a CPU with AVX-512 (or AVX2 +
// FMA) it sets OPENBLAS_CORETYPE, and for the pthreads build OPENBLAS_THREAD_TIMEOUT=4, then
// re-executes the program once with the same arguments (~0.4 s of start-up). A variable the user
// has set is kept; VDIT_KEEP_BLAS=1 turns all of this off; not OpenBLAS: nothing happens. Returns
// normally when re-execution is impossible.
void configure_blas(char** argv);

// "OpenBLAS SkylakeX (pthreads)", "not OpenBLAS"...: for logs and benchmark lines.
std::string blas_description();

// "f32" | "bf16" | "f16" (also "float32", "bfloat16", "float16", "fp16"...).
at::ScalarType parse_dtype(const std::string& name);
std::string dtype_name(at::ScalarType t);

// Whether matrix products in `dtype` run on `device` with this LibTorch (LibTorch 1.13 has no f16
// GEMM on the CPU). Probed once per pair with a 2x2 product.
bool matmul_supported(at::ScalarType dtype, at::Device device);
// InputError, naming the option, when the compute dtype cannot run on the device.
void check_compute_dtype(at::ScalarType dtype, at::Device device);

// Whether a CPU matrix product or convolution on `dtype` operands must be widened to f32 to sum its
// products in f32. LibTorch 1.13 runs bf16 GEMMs through oneDNN only on CPUs with AVX-512; elsewhere
// its own kernel accumulates in bf16, which loses most digits past a few hundred terms (27 %
// relative error at K = 1024, 76 % at K = 4096). Also true where there is no kernel (f16 on 1.13).
// Probed once per dtype and oneDNN setting, with sums of positive values against f64.
bool cpu_gemm_needs_widening(at::ScalarType dtype);

// at::linear, at::matmul and at::conv3d that sum in f32 whatever the operand dtype, as GPU bf16/f16
// kernels do: where cpu_gemm_needs_widening, the operands go to f32 and the result is rounded back
// to the first operand's dtype; elsewhere they are the plain ATen op.
at::Tensor linear_f32_accumulate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {});
at::Tensor matmul_f32_accumulate(const at::Tensor& a, const at::Tensor& b);
at::Tensor conv3d_f32_accumulate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 at::IntArrayRef stride);

// "cpu", "cuda", "cuda:1".
at::Device parse_device(const std::string& name);

// Human-readable byte count, e.g. "1.5 GiB".
std::string format_bytes(double bytes);

// Resident-set high-water mark of this process, in bytes (0 where unknown).
std::int64_t peak_rss_bytes();
// Resets that mark to the current RSS (Linux: "5" to /proc/self/clear_refs), so a benchmark can
// measure each method's own peak in one process. False where the kernel does not allow it.
bool reset_peak_rss();

}  // namespace vdit
