// The concrete flow-matching solvers behind make_sampler(). Each mirrors the reference's
// arithmetic: scalar coefficients in f32 (the reference's sigmas are f32 0-dim tensors), tensor
// updates as separate ops in the same order, so trajectories agree to f32 rounding.
#pragma once

#include "vdit/samplers/sampler.h"

#include <vector>

namespace vdit {

// Wan's FlowUniPCMultistepScheduler: UniP predictor (B(h) bh2 or bh1, predict_x0) of order up to
// solver_order, UniC corrector applied at the start of each step with the new model output,
// lower_order_final.
class UniPCSampler final : public FlowSampler {
 public:
  explicit UniPCSampler(SamplerConfig config);
  at::Tensor step(const at::Tensor& model_output, int step_index, const at::Tensor& sample) override;
  void reset() override;

 private:
  at::Tensor predict(const at::Tensor& x, int order, int step_index) const;
  at::Tensor correct(const at::Tensor& x0_now, int order, int step_index) const;

  std::vector<at::Tensor> x0_history_;  // data predictions of the latest steps, newest last
  at::Tensor last_sample_;              // the (corrected) sample the previous predictor started from
  int last_order_ = 0;                  // order of the previous predictor = order of this corrector
  int lower_order_nums_ = 0;
};

// Wan's FlowDPMSolverMultistepScheduler, algorithm dpmsolver++, midpoint, order up to 2. The
// first sigma may be exactly 1 (lambda = -inf): IEEE infinities give the reference's finite result.
class DPMppSampler final : public FlowSampler {
 public:
  explicit DPMppSampler(SamplerConfig config);
  at::Tensor step(const at::Tensor& model_output, int step_index, const at::Tensor& sample) override;
  void reset() override;

 private:
  std::vector<at::Tensor> x0_history_;
  int lower_order_nums_ = 0;
};

// Flow Euler: x + (sigma_next - sigma) * v. Stateless.
class EulerSampler final : public FlowSampler {
 public:
  explicit EulerSampler(SamplerConfig config);
  at::Tensor step(const at::Tensor& model_output, int step_index, const at::Tensor& sample) override;
};

// Stochastic flow sampler ("euler-a"): DDIM with eta on the flow path x = (1 - s) x0 + s noise.
// From the velocity v at sigma: x0^ = x - sigma v, noise^ = x + (1 - sigma) v; the next sample is
// (1 - s') x0^ + sqrt(s'^2 - r^2) noise^ + r z with z ~ N(0, 1) fresh and
// r^2 = eta^2 s'^2 (1 - ((1 - sigma) s' / ((1 - s') sigma))^2), the posterior variance of the path
// scaled by eta^2. eta 0 is exactly the Euler step; eta 1 draws from the DDPM-style posterior given
// x0^. z is drawn on the CPU from a generator seeded with noise_seed (then moved to the sample's
// device), so a run is reproducible and the same on every device. Stateless apart from the
// generator, which set_schedule()/set_sigmas()/reset() reseed.
class EulerAncestralSampler final : public FlowSampler {
 public:
  explicit EulerAncestralSampler(SamplerConfig config);
  at::Tensor step(const at::Tensor& model_output, int step_index, const at::Tensor& sample) override;
  void reset() override;

 private:
  at::Generator generator_;
};

}  // namespace vdit
