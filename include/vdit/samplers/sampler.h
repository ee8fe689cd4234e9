// Flow-matching samplers (UniPC, DPM++, Euler) that pipelines drive one step at a time.
//
// Conventions (flow matching, as Wan2.1): x_sigma = (1 - sigma) * x0 + sigma * noise, the model
// predicts the velocity v = noise - x0 (or, for a scheduler config with prediction_type "sample",
// the clean latent x0, which a pipeline turns into that velocity with velocity_from_sample before
// stepping), sampling walks sigma from ~1 down to 0.
// Schedules are computed in float64 and stored as f32 sigmas, with int64 timesteps truncated from
// the float64 values (sigma * num_train_timesteps), exactly as the reference schedulers do.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vdit {

// Which sigma grid set_schedule() builds.
enum class SigmaGrid {
  SolverDefault,  // the reference's own grid for the solver: unipc -> WanUniPC, dpm++/euler -> WanLinear
  WanUniPC,       // Wan FlowUniPCMultistepScheduler: linspace(f32(1 - 1/N), 0, n+1)[:-1], shifted
  WanLinear,      // Wan get_sampling_sigmas (dpm++ / euler): linspace(1, 0, n+1)[:-1], shifted
  DiffusersFlow,  // diffusers use_flow_sigmas: flip(shift(1 - linspace(1, 1/N, n+1)))[:-1]
};

// What the model's output is: the velocity noise - x0 (prediction_type "flow_prediction", every
// released Wan2.1 model) or the clean latent x0 itself ("sample"). Samplers always take velocities.
enum class ModelPrediction { Velocity, Sample };

struct SamplerConfig {
  std::string name = "unipc";     // unipc | dpm++ | euler
  ModelPrediction prediction = ModelPrediction::Velocity;
  int num_train_timesteps = 1000;
  double shift = 5.0;             // default shift a pipeline passes to set_schedule
  int solver_order = 2;           // unipc: 1..2, dpm++: 1..2, euler: ignored
  bool lower_order_final = true;
  bool unipc_bh2 = true;          // UniPC B(h) variant: bh2 (expm1) or bh1 (h)
  std::vector<int> disable_corrector;  // UniPC: step indices whose following corrector is skipped
  SigmaGrid grid = SigmaGrid::SolverDefault;
  // euler-a only: the share of the posterior noise re-drawn each step (0: deterministic, exactly
  // euler; 1: ancestral, the DDPM posterior) and the seed of those draws.
  double eta = 1.0;
  std::uint64_t noise_seed = 0;
};

struct SigmaSchedule {
  std::vector<float> sigmas;          // steps + 1 values, the last one 0
  std::vector<std::int64_t> timesteps;  // steps values
};

// The individual grids (steps >= 1, shift > 0, else InputError).
SigmaSchedule wan_unipc_schedule(int steps, double shift, int num_train_timesteps = 1000);
SigmaSchedule wan_linear_schedule(int steps, double shift, int num_train_timesteps = 1000);
SigmaSchedule diffusers_flow_schedule(int steps, double shift, int num_train_timesteps = 1000);
// A user list (--sigmas): values in [0, 1], strictly decreasing, a final 0 appended if absent.
SigmaSchedule custom_schedule(const std::vector<double>& sigmas, int num_train_timesteps = 1000);
// Shift s*sigma/(1+(s-1)*sigma) in float64, rounded like numpy (no fused multiply-add).
double shift_sigma(double sigma, double shift);

class FlowSampler {
 public:
  explicit FlowSampler(SamplerConfig config);
  virtual ~FlowSampler();
  FlowSampler(const FlowSampler&) = delete;
  FlowSampler& operator=(const FlowSampler&) = delete;

  const std::string& name() const { return config_.name; }
  const SamplerConfig& config() const { return config_; }

  // The reference's own schedule for this solver (config().grid); clears history, begin index 0.
  virtual void set_schedule(int steps, double shift);
  // A custom list (--sigmas), final 0 appended if absent; clears history, begin index 0.
  virtual void set_sigmas(const std::vector<double>& sigmas);

  const std::vector<float>& sigmas() const { return sigmas_; }               // num_steps()+1, f32
  const std::vector<std::int64_t>& timesteps() const { return timesteps_; }  // num_steps()
  int num_steps() const { return static_cast<int>(timesteps_.size()); }

  // img2img: the run starts at schedule index `index` (0 <= index < num_steps()); clears history.
  // Noise the clean latent with add_noise(x0, noise, sigmas()[index]) and step index..num_steps()-1.
  void set_begin_index(int index);
  int begin_index() const { return begin_index_; }

  // Advances `sample` (at sigmas()[step_index]) to sigmas()[step_index + 1] given the model's
  // velocity there. Multistep solvers need consecutive indices from begin_index(); calling with
  // begin_index() again starts a new run (history cleared). Out-of-range or non-consecutive
  // indices throw vdit::RuntimeError (a pipeline bug, not user input).
  virtual at::Tensor step(const at::Tensor& model_output, int step_index, const at::Tensor& sample) = 0;

  // Clears the multistep history (the schedule and begin index stay).
  virtual void reset();

 protected:
  // Validates the index and shapes; for multistep solvers also enforces consecutive indices,
  // restarting the run (reset()) at begin_index(). Records step_index as the last one taken.
  void begin_step(int step_index, const at::Tensor& model_output, const at::Tensor& sample, bool multistep);
  void adopt_schedule(SigmaSchedule schedule);

  SamplerConfig config_;
  std::vector<float> sigmas_;
  std::vector<std::int64_t> timesteps_;
  int begin_index_ = 0;
  int last_step_index_ = -1;  // -1: no step taken since the last reset
};

// Throws vdit::InputError naming the choices unless `name` is unipc, dpm++, euler or euler-a.
void check_sampler_name(const std::string& name);
// name: "unipc" | "dpm++" (also "dpmpp") | "euler" | "euler-a"; anything else -> vdit::InputError.
std::unique_ptr<FlowSampler> make_sampler(const std::string& name, int num_train_timesteps = 1000);
std::unique_ptr<FlowSampler> make_sampler(const SamplerConfig& config);

// A diffusers / Wan scheduler_config.json (the text, `label` names it in errors). Understood:
// UniPCMultistepScheduler and DPMSolverMultistepScheduler with flow_prediction + use_flow_sigmas
// (diffusers flow grid, shift = flow_shift), Wan's FlowUniPCMultistepScheduler /
// FlowDPMSolverMultistepScheduler (shift = shift), FlowMatchEulerDiscreteScheduler (euler with
// its shift on the Wan linear grid; diffusers' own Euler grid and float timesteps are not
// reproduced). prediction_type flow_prediction (a velocity model) or sample (an x0 model, see
// ModelPrediction). Anything vdit cannot honour exactly (another class or prediction type, dynamic
// shifting, thresholding, solver order 3, final sigma != 0) -> InputError naming the key.
SamplerConfig from_scheduler_config(const std::string& json_text, const std::string& label = "scheduler_config.json");
// Reads the file (e.g. <model>/scheduler/scheduler_config.json); InputError if unreadable.
SamplerConfig read_scheduler_config(const std::string& path);

// The velocity a sample-predicting model implies at `noisy` (x at sigma): (noisy - x0) / sigma,
// computed in f32 and returned in the prediction's dtype. For sigma <= 0 (where no model is
// evaluated) throws vdit::RuntimeError. With the true x0 this is exactly noise - x0.
at::Tensor velocity_from_sample(const at::Tensor& sample_prediction, const at::Tensor& noisy, double sigma);

// (1 - sigma) * x0 + sigma * noise, with sigma rounded to x0's dtype first (as the reference).
at::Tensor add_noise(const at::Tensor& x0, const at::Tensor& noise, double sigma);

// img2img: index of the first kept step for `strength` in [0, 1] (diffusers rule:
// steps - min(int(steps * strength), steps)). strength 1 -> 0, strength 0 -> steps.
int img2img_begin_index(int steps, double strength);

// One Euler step from sigma to sigma_next: x + (sigma_next - sigma) * v, with the difference
// taken in f32 and x upcast to f32 (FlowMatchEuler's precision), returned in v's dtype.
// The sampler's Euler step is this with decreasing sigmas; inversion runs the same grid upwards:
// for i = n-1 .. 0: x = euler_flow_step(v(x, sigmas[i+1]), x, sigmas[i+1], sigmas[i]).
at::Tensor euler_flow_step(const at::Tensor& velocity, const at::Tensor& sample, float sigma, float sigma_next);
// Inversion step (sigma_next > sigma required, else InputError): the same update, noise-wards.
at::Tensor euler_inversion_step(const at::Tensor& velocity, const at::Tensor& sample, float sigma, float sigma_next);

}  // namespace vdit
