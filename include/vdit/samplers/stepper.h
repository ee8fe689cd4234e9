// Steppers: what moves a latent from one noise level to the next in the shared flow loop
// (pipelines/flow_loop.h). Sampling walks a FlowSampler's schedule down; inversion walks the same
// grid up, from a clean latent towards the noise that would regenerate it.
#pragma once

#include "vdit/samplers/sampler.h"
#include "vdit/step_info.h"

#include <ATen/ATen.h>

#include <memory>

namespace vdit {

class Stepper {
 public:
  virtual ~Stepper() = default;
  virtual int first_index() const = 0;  // the run takes steps first_index() .. count() - 1
  virtual int count() const = 0;
  virtual StepInfo info(int index) const = 0;
  // x at step.sigma and the velocity there -> x at step.sigma_next.
  virtual at::Tensor step(const at::Tensor& velocity, const StepInfo& step, const at::Tensor& x) = 0;
  // Noise level the run starts from (info(first_index()).sigma).
  double start_sigma() const { return info(first_index()).sigma; }
};

// A FlowSampler's schedule, walked down from its begin index (set_begin_index for strength < 1).
class SamplerStepper : public Stepper {
 public:
  explicit SamplerStepper(std::unique_ptr<FlowSampler> sampler);
  int first_index() const override { return sampler_->begin_index(); }
  int count() const override { return sampler_->num_steps(); }
  StepInfo info(int index) const override;
  at::Tensor step(const at::Tensor& velocity, const StepInfo& step, const at::Tensor& x) override;
  const FlowSampler& sampler() const { return *sampler_; }

 private:
  std::unique_ptr<FlowSampler> sampler_;
};

// Euler inversion on a sampler's grid (sigmas s_0 > ... > s_n = 0, timesteps t_i at s_i): step k
// goes from s_{n-k} up to s_{n-k-1}, evaluating the model at s_{n-k} (timestep t_{n-k}; 0 at
// s_n = 0), and the run ends at s_{stop}: the begin index of a sampling run that would regenerate
// the input (0: all the way to the first sigma).
class EulerInversionStepper : public Stepper {
 public:
  EulerInversionStepper(std::vector<float> sigmas, std::vector<std::int64_t> timesteps, int stop_index = 0);
  // The grid of `sampler` (its schedule set), stopping at its begin index.
  explicit EulerInversionStepper(const FlowSampler& sampler);
  int first_index() const override { return 0; }
  int count() const override { return static_cast<int>(sigmas_.size()) - 1 - stop_; }
  StepInfo info(int index) const override;
  at::Tensor step(const at::Tensor& velocity, const StepInfo& step, const at::Tensor& x) override;

 private:
  std::vector<float> sigmas_;
  std::vector<std::int64_t> timesteps_;
  int stop_ = 0;
};

}  // namespace vdit
