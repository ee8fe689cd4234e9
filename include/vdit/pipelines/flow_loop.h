// The one denoising loop every pipeline runs (generate, img2img, upscale, edit, long video):
//
//   x = flow_start(stepper, noise, clean)            pure noise, or clean noised to the first sigma
//   for each step of the stepper:
//     hooks.before_step(step, x)
//     v = denoiser.velocity(x, step)                  guidance, windows, dual paths live in here
//     x = stepper.step(v, step, x)                    one sampler (or inversion) step on the whole latent
//     hooks.after_step(step, x)
//
// What varies between pipelines is the Stepper (samplers down, inversion up), the Denoiser (the
// DiT with guidance, or wrappers around another denoiser) and the StepHooks; the loop itself never
// changes. The sampler steps the whole latent once per step, so multistep history stays valid
// whatever the denoiser does inside.
#pragma once

#include "vdit/samplers/stepper.h"
#include "vdit/step_info.h"

#include <ATen/ATen.h>

#include <functional>
#include <vector>

namespace vdit {

// (x, step) -> the velocity noise - x0 at step.sigma. x is [B, C, F, H, W] on the model's device.
class Denoiser {
 public:
  virtual ~Denoiser() = default;
  virtual at::Tensor velocity(const at::Tensor& x, const StepInfo& step) = 0;
};

// Called around every step: progress, recording attention maps, switching processors' modes,
// local blending. after_step may replace the latent.
class StepHook {
 public:
  virtual ~StepHook() = default;
  virtual void before_step(const StepInfo& step, const at::Tensor& x) {}
  virtual void after_step(const StepInfo& step, at::Tensor& x) {}
};

// A StepHook that reports (steps done, steps in the run) after every step.
class ProgressHook : public StepHook {
 public:
  explicit ProgressHook(std::function<void(int, int)> on_step) : on_step_(std::move(on_step)) {}
  void after_step(const StepInfo& step, at::Tensor&) override {
    if (on_step_) on_step_(step.done(), step.total());
  }

 private:
  std::function<void(int, int)> on_step_;
};

// The latent a run starts from: `noise` when the run starts at its first step (or no clean latent
// is given), else the clean latent noised to the first kept sigma (SDEdit: add_noise(clean,
// noise, sigma)). Shapes must agree.
at::Tensor flow_start(const Stepper& stepper, const at::Tensor& noise, const at::Tensor& clean = at::Tensor());

// Runs every step of `stepper` on x and returns the final latent. A latent that turns non-finite
// (NaN or Inf) stops the run with a RuntimeError naming the step.
at::Tensor run_flow(at::Tensor x, Stepper& stepper, Denoiser& denoiser, const std::vector<StepHook*>& hooks = {});

}  // namespace vdit
