// Steppers for the flow loop: see include/vdit/samplers/stepper.h.
#include "vdit/samplers/stepper.h"

#include "vdit/common.h"

namespace vdit {

SamplerStepper::SamplerStepper(std::unique_ptr<FlowSampler> sampler) : sampler_(std::move(sampler)) {
  if (!sampler_) throw RuntimeError("SamplerStepper: no sampler");
}

StepInfo SamplerStepper::info(int index) const {
  if (index < 0 || index >= count()) throw RuntimeError("SamplerStepper: step " + std::to_string(index) + " out of range");
  StepInfo s;
  s.index = index;
  s.first = first_index();
  s.count = count();
  s.sigma = sampler_->sigmas()[static_cast<std::size_t>(index)];
  s.sigma_next = sampler_->sigmas()[static_cast<std::size_t>(index) + 1];
  s.timestep = static_cast<double>(sampler_->timesteps()[static_cast<std::size_t>(index)]);
  return s;
}

at::Tensor SamplerStepper::step(const at::Tensor& velocity, const StepInfo& step, const at::Tensor& x) {
  return sampler_->step(velocity, step.index, x);
}

EulerInversionStepper::EulerInversionStepper(std::vector<float> sigmas, std::vector<std::int64_t> timesteps, int stop_index)
    : sigmas_(std::move(sigmas)), timesteps_(std::move(timesteps)), stop_(stop_index) {
  if (sigmas_.size() < 2 || timesteps_.size() + 1 != sigmas_.size())
    throw RuntimeError("EulerInversionStepper: needs n + 1 sigmas and n timesteps");
  if (stop_ < 0 || stop_ >= static_cast<int>(timesteps_.size()))
    throw RuntimeError("EulerInversionStepper: stop index " + std::to_string(stop_) + " out of range");
}

EulerInversionStepper::EulerInversionStepper(const FlowSampler& sampler)
    : EulerInversionStepper(sampler.sigmas(), sampler.timesteps(), sampler.begin_index()) {}

StepInfo EulerInversionStepper::info(int index) const {
  if (index < 0 || index >= count())
    throw RuntimeError("EulerInversionStepper: step " + std::to_string(index) + " out of range");
  const std::size_t n = timesteps_.size();
  const std::size_t from = n - static_cast<std::size_t>(index);  // grid index of the current sigma
  StepInfo s;
  s.index = index;
  s.first = 0;
  s.count = count();
  s.sigma = sigmas_[from];
  s.sigma_next = sigmas_[from - 1];
  s.timestep = from < n ? static_cast<double>(timesteps_[from]) : 0.0;
  return s;
}

at::Tensor EulerInversionStepper::step(const at::Tensor& velocity, const StepInfo& step, const at::Tensor& x) {
  return euler_inversion_step(velocity, x, static_cast<float>(step.sigma), static_cast<float>(step.sigma_next));
}

}  // namespace vdit
