// The shared denoising loop: see include/vdit/pipelines/flow_loop.h.
#include "vdit/pipelines/flow_loop.h"

#include "vdit/common.h"

namespace vdit {

at::Tensor flow_start(const Stepper& stepper, const at::Tensor& noise, const at::Tensor& clean) {
  if (!clean.defined() || stepper.first_index() == 0) return noise;
  if (clean.sizes() != noise.sizes()) throw RuntimeError("flow_start: the clean latent and the noise differ in shape");
  return add_noise(clean.to(noise.device(), noise.scalar_type()), noise, stepper.start_sigma());
}

at::Tensor run_flow(at::Tensor x, Stepper& stepper, Denoiser& denoiser, const std::vector<StepHook*>& hooks) {
  for (int i = stepper.first_index(); i < stepper.count(); ++i) {
    const StepInfo step = stepper.info(i);
    for (StepHook* hook : hooks) hook->before_step(step, x);
    const at::Tensor velocity = denoiser.velocity(x, step);
    x = stepper.step(velocity, step, x);
    // One reduction per step (a DiT forward is far dearer) buys a clear stop instead of a grey video.
    if (!at::isfinite(x).all().item<bool>())
      throw RuntimeError("the latent became non-finite (NaN or Inf) at step " + std::to_string(step.done()) + " of " +
                         std::to_string(step.total()) + " (sigma " + std::to_string(step.sigma) + ")");
    for (StepHook* hook : hooks) hook->after_step(step, x);
  }
  return x;
}

}  // namespace vdit
