// UniPC, DPM++ and Euler for flow matching (alpha = 1 - sigma), following Wan2.1's
// FlowUniPCMultistepScheduler and FlowDPMSolverMultistepScheduler step by step.
//
// Precision: the reference keeps sigmas as f32 0-dim tensors, so every scalar coefficient (logs,
// expm1, ratios, the UniC 2x2 solve) is computed here in float; each tensor update is a separate
// ATen op with a scalar operand, in the reference's order, so the roundings coincide.
#include "vdit/samplers/solvers.h"

#include "vdit/common.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace vdit {

namespace {

// A float coefficient as an ATen scalar (exact in double; the kernels cast it back to f32).
at::Scalar coeff(float value) { return at::Scalar(static_cast<double>(value)); }

// Half log-SNR of the flow path: log(alpha) - log(sigma) with alpha = 1 - sigma.
// -inf at sigma = 1 and +inf at sigma = 0, as in the reference.
float flow_lambda(float sigma) {
  const float alpha = 1.0f - sigma;
  return std::log(alpha) - std::log(sigma);
}

// Solves [[1, 1], [rk, 1]] rho = [b1, b2] by LU with partial pivoting, the way LAPACK's gesv
// (torch.linalg.solve in the reference) does. Pivoting keeps rk = -inf (a first sigma of 1)
// finite: rho = [0, b1].
std::pair<float, float> solve_unic_2x2(float rk, float b1, float b2) {
  float a00 = 1.0f, a01 = 1.0f, a10 = rk, a11 = 1.0f;
  float y0 = b1, y1 = b2;
  if (std::fabs(a10) > std::fabs(a00)) {
    std::swap(a00, a10);
    std::swap(a01, a11);
    std::swap(y0, y1);
  }
  const float l10 = a10 * (1.0f / a00);
  const float u11 = a11 - l10 * a01;
  const float z1 = y1 - l10 * y0;
  const float rho1 = z1 / u11;
  const float rho0 = (y0 - a01 * rho1) / a00;
  return {rho0, rho1};
}

void check_order(const SamplerConfig& config) {
  if (config.solver_order < 1 || config.solver_order > 2)
    throw InputError("sampler " + config.name + ": solver order " + std::to_string(config.solver_order) +
                     " is not supported (1 or 2)");
}

void push_history(std::vector<at::Tensor>& history, at::Tensor x0, int keep) {
  history.push_back(std::move(x0));
  while (static_cast<int>(history.size()) > keep) history.erase(history.begin());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// UniPC

UniPCSampler::UniPCSampler(SamplerConfig config) : FlowSampler(std::move(config)) { check_order(config_); }

void UniPCSampler::reset() {
  FlowSampler::reset();
  x0_history_.clear();
  last_sample_ = at::Tensor();
  last_order_ = 0;
  lower_order_nums_ = 0;
}

at::Tensor UniPCSampler::step(const at::Tensor& model_output, int step_index, const at::Tensor& sample) {
  begin_step(step_index, model_output, sample, /*multistep=*/true);
  const int max_order = config_.solver_order;

  // Data prediction from the sample as given (before the corrector adjusts it).
  at::Tensor x0_now = sample - model_output * coeff(sigmas_[static_cast<std::size_t>(step_index)]);

  const bool corrector_disabled =
      std::find(config_.disable_corrector.begin(), config_.disable_corrector.end(), step_index - 1) !=
      config_.disable_corrector.end();
  at::Tensor x = sample;
  if (step_index > 0 && !corrector_disabled && last_sample_.defined()) x = correct(x0_now, last_order_, step_index);

  push_history(x0_history_, x0_now, max_order);

  int order = config_.lower_order_final ? std::min(max_order, num_steps() - step_index) : max_order;
  order = std::min(order, lower_order_nums_ + 1);  // warm-up: no more history than steps taken

  last_sample_ = x;
  last_order_ = order;
  at::Tensor next = predict(x, order, step_index);
  if (lower_order_nums_ < max_order) ++lower_order_nums_;
  return next;
}

// UniP: from sigma_s0 = sigmas[i] to sigma_t = sigmas[i+1]; x0_history_ ends with x0 at i.
at::Tensor UniPCSampler::predict(const at::Tensor& x, int order, int i) const {
  const float sigma_t = sigmas_[static_cast<std::size_t>(i + 1)];
  const float sigma_s0 = sigmas_[static_cast<std::size_t>(i)];
  const float alpha_t = 1.0f - sigma_t;
  const float lambda_s0 = flow_lambda(sigma_s0);
  const float h = flow_lambda(sigma_t) - lambda_s0;
  const float hh = -h;  // predict_x0
  const float h_phi_1 = std::expm1(hh);
  const float b_h = config_.unipc_bh2 ? std::expm1(hh) : hh;

  const at::Tensor& m0 = x0_history_.back();
  at::Tensor x_t = x * coeff(sigma_t / sigma_s0) - m0 * coeff(alpha_t * h_phi_1);
  if (order == 2) {
    const at::Tensor& m1 = x0_history_[x0_history_.size() - 2];
    const float rk = (flow_lambda(sigmas_[static_cast<std::size_t>(i - 1)]) - lambda_s0) / h;
    const at::Tensor d1 = (m1 - m0) / coeff(rk);
    // The reference fixes rho_p = 0.5 for order 2.
    x_t = x_t - (d1 * 0.5) * coeff(alpha_t * b_h);
  }
  return x_t.to(x.scalar_type());
}

// UniC: re-derives the sample at sigmas[i] from the previous start point last_sample_ (at
// sigmas[i-1]) using the new data prediction x0_now; x0_history_ still ends with x0 at i-1.
at::Tensor UniPCSampler::correct(const at::Tensor& x0_now, int order, int i) const {
  const float sigma_t = sigmas_[static_cast<std::size_t>(i)];
  const float sigma_s0 = sigmas_[static_cast<std::size_t>(i - 1)];
  const float alpha_t = 1.0f - sigma_t;
  const float lambda_s0 = flow_lambda(sigma_s0);
  const float h = flow_lambda(sigma_t) - lambda_s0;
  const float hh = -h;
  const float h_phi_1 = std::expm1(hh);
  const float b_h = config_.unipc_bh2 ? std::expm1(hh) : hh;

  const at::Tensor& x = last_sample_;
  const at::Tensor& m0 = x0_history_.back();
  at::Tensor x_t = x * coeff(sigma_t / sigma_s0) - m0 * coeff(alpha_t * h_phi_1);
  const at::Tensor d1_t = x0_now - m0;
  if (order == 1) {
    // The reference fixes rho_c = 0.5 for order 1.
    x_t = x_t - (d1_t * 0.5) * coeff(alpha_t * b_h);
  } else {
    const at::Tensor& m1 = x0_history_[x0_history_.size() - 2];
    const float rk = (flow_lambda(sigmas_[static_cast<std::size_t>(i - 2)]) - lambda_s0) / h;
    const at::Tensor d1 = (m1 - m0) / coeff(rk);
    // b_k = h_phi_k * k! / B(h) with h_phi_1' = h_phi_1/hh - 1 and h_phi_{k+1} = h_phi_k/hh - 1/(k+1)!.
    float h_phi_k = h_phi_1 / hh - 1.0f;
    const float b1 = h_phi_k * 1.0f / b_h;
    h_phi_k = h_phi_k / hh - 0.5f;
    const float b2 = h_phi_k * 2.0f / b_h;
    const auto [rho0, rho1] = solve_unic_2x2(rk, b1, b2);
    const at::Tensor correction = d1 * coeff(rho0) + d1_t * coeff(rho1);
    x_t = x_t - correction * coeff(alpha_t * b_h);
  }
  return x_t.to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// DPM++ (multistep, data prediction, midpoint)

DPMppSampler::DPMppSampler(SamplerConfig config) : FlowSampler(std::move(config)) { check_order(config_); }

void DPMppSampler::reset() {
  FlowSampler::reset();
  x0_history_.clear();
  lower_order_nums_ = 0;
}

at::Tensor DPMppSampler::step(const at::Tensor& model_output, int step_index, const at::Tensor& sample) {
  begin_step(step_index, model_output, sample, /*multistep=*/true);
  const int max_order = config_.solver_order;
  const std::size_t i = static_cast<std::size_t>(step_index);

  at::Tensor x0_now = sample - model_output * coeff(sigmas_[i]);
  const at::ScalarType out_dtype = x0_now.scalar_type();
  push_history(x0_history_, std::move(x0_now), max_order);
  // The final sigma is 0, so the reference always takes a first-order last step.
  const bool final_step = step_index == num_steps() - 1;

  const at::Tensor x = sample.to(at::kFloat);  // the reference upcasts the sample
  const float sigma_t = sigmas_[i + 1];
  const float sigma_s0 = sigmas_[i];
  const float alpha_t = 1.0f - sigma_t;
  const float lambda_s0 = flow_lambda(sigma_s0);
  const float h = flow_lambda(sigma_t) - lambda_s0;
  // At sigma_s0 = 1 (lambda = -inf) h = +inf and exp(-h) = 0: the update stays finite.
  const float phi = alpha_t * (std::exp(-h) - 1.0f);

  const at::Tensor& m0 = x0_history_.back();
  at::Tensor next = x * coeff(sigma_t / sigma_s0) - m0 * coeff(phi);
  if (!(max_order == 1 || lower_order_nums_ < 1 || final_step)) {
    const at::Tensor& m1 = x0_history_[x0_history_.size() - 2];
    const float h_0 = lambda_s0 - flow_lambda(sigmas_[i - 1]);
    const float r0 = h_0 / h;  // +inf after a first sigma of 1: D1 becomes 0
    const at::Tensor d1 = (m0 - m1) * coeff(1.0f / r0);
    next = next - d1 * coeff(0.5f * phi);
  }
  if (lower_order_nums_ < max_order) ++lower_order_nums_;
  return next.to(out_dtype);
}

// ---------------------------------------------------------------------------------------------
// Euler

EulerSampler::EulerSampler(SamplerConfig config) : FlowSampler(std::move(config)) {}

at::Tensor EulerSampler::step(const at::Tensor& model_output, int step_index, const at::Tensor& sample) {
  begin_step(step_index, model_output, sample, /*multistep=*/false);
  const std::size_t i = static_cast<std::size_t>(step_index);
  return euler_flow_step(model_output, sample, sigmas_[i], sigmas_[i + 1]);
}

// ---------------------------------------------------------------------------------------------
// Euler ancestral (DDIM-eta on the flow path)

EulerAncestralSampler::EulerAncestralSampler(SamplerConfig config) : FlowSampler(std::move(config)) {
  if (!(config_.eta >= 0.0 && config_.eta <= 1.0))
    throw InputError("sampler eta must be in [0, 1] (got " + std::to_string(config_.eta) + ")");
  generator_ = at::make_generator<at::CPUGeneratorImpl>(config_.noise_seed);
}

void EulerAncestralSampler::reset() {
  FlowSampler::reset();
  generator_ = at::make_generator<at::CPUGeneratorImpl>(config_.noise_seed);
}

at::Tensor EulerAncestralSampler::step(const at::Tensor& model_output, int step_index, const at::Tensor& sample) {
  // A run restarts (and reseeds) at the begin index, like the multistep solvers' history.
  if (step_index == begin_index_) reset();
  begin_step(step_index, model_output, sample, /*multistep=*/false);
  const std::size_t i = static_cast<std::size_t>(step_index);
  const double sigma = sigmas_[i], sigma_next = sigmas_[i + 1];
  // Schedules strictly decrease (set_sigmas enforces it), so sigma > sigma_next >= 0 here. The
  // posterior variance needs the path's signal ratio; at sigma = 1 (no signal) it is eta^2 s'^2,
  // and at sigma_next = 0 it is 0: the last step lands on x0^ exactly like Euler.
  const double ratio = sigma >= 1.0 ? 0.0 : ((1.0 - sigma) * sigma_next) / ((1.0 - sigma_next) * sigma);
  const double r2 = config_.eta * config_.eta * sigma_next * sigma_next * std::max(0.0, 1.0 - ratio * ratio);
  const double r = std::sqrt(r2);
  const double keep = std::sqrt(std::max(0.0, sigma_next * sigma_next - r2));
  const at::Tensor x = sample.to(at::kFloat), v = model_output.to(at::kFloat);
  const at::Tensor x0 = x - sigma * v;
  const at::Tensor noise = x + (1.0 - sigma) * v;
  const at::Tensor z = at::randn(sample.sizes(), generator_, at::TensorOptions().dtype(at::kFloat)).to(sample.device());
  return ((1.0 - sigma_next) * x0 + keep * noise + r * z).to(model_output.scalar_type());
}

}  // namespace vdit
