// Schedules, the FlowSampler base, the factory, scheduler_config.json parsing and the small
// flow-matching helpers (add_noise, Euler / inversion steps).
#include "vdit/samplers/sampler.h"

#include "vdit/common.h"
#include "vdit/samplers/solvers.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

namespace vdit {

namespace {

// Stores through a volatile so the compiler cannot fuse a product with the following sum into
// one FMA: numpy rounds every operation, and the schedules must match it bit for bit.
double rounded(double value) {
  volatile double stored = value;
  return stored;
}

// numpy.linspace(start, stop, num) with endpoint: y_i = i*step + start, the last value = stop.
std::vector<double> numpy_linspace(double start, double stop, int num) {
  std::vector<double> values(static_cast<std::size_t>(num), start);
  if (num < 2) return values;
  const double div = static_cast<double>(num - 1);
  const double delta = stop - start;
  const double step = delta / div;
  for (int i = 0; i < num; ++i) {
    // numpy falls back to (i/div)*delta when the step underflows to 0.
    const double offset = step == 0.0 ? rounded(static_cast<double>(i) / div) * delta
                                      : rounded(static_cast<double>(i) * step);
    values[static_cast<std::size_t>(i)] = offset + start;
  }
  values.back() = stop;
  return values;
}

void check_grid_args(int steps, double shift, int num_train_timesteps) {
  if (steps < 1) throw InputError("--steps must be at least 1 (got " + std::to_string(steps) + ")");
  if (!(shift > 0.0) || !std::isfinite(shift))
    throw InputError("--shift must be a positive number (got " + std::to_string(shift) + ")");
  if (num_train_timesteps < 2)
    throw InputError("num_train_timesteps must be at least 2 (got " + std::to_string(num_train_timesteps) + ")");
}

// sigmas (float64, without the final 0) -> f32 sigmas + final 0, int64(sigma*N) timesteps.
SigmaSchedule finish_schedule(const std::vector<double>& sigmas64, int num_train_timesteps) {
  SigmaSchedule schedule;
  schedule.sigmas.reserve(sigmas64.size() + 1);
  schedule.timesteps.reserve(sigmas64.size());
  for (double sigma : sigmas64) {
    schedule.sigmas.push_back(static_cast<float>(sigma));
    // numpy multiplies in float64; torch's int64 cast truncates toward zero.
    schedule.timesteps.push_back(static_cast<std::int64_t>(sigma * static_cast<double>(num_train_timesteps)));
  }
  schedule.sigmas.push_back(0.0f);
  return schedule;
}

}  // namespace

double shift_sigma(double sigma, double shift) {
  const double numerator = rounded(shift * sigma);
  const double denominator = 1.0 + rounded((shift - 1.0) * sigma);
  return numerator / denominator;
}

SigmaSchedule wan_unipc_schedule(int steps, double shift, int num_train_timesteps) {
  check_grid_args(steps, shift, num_train_timesteps);
  // The scheduler's sigma_max is its training table's first sigma, 1 - 1/N, stored as f32.
  const double sigma_max = static_cast<double>(static_cast<float>(1.0 - 1.0 / num_train_timesteps));
  std::vector<double> grid = numpy_linspace(sigma_max, 0.0, steps + 1);
  grid.pop_back();
  for (double& sigma : grid) sigma = shift_sigma(sigma, shift);
  return finish_schedule(grid, num_train_timesteps);
}

SigmaSchedule wan_linear_schedule(int steps, double shift, int num_train_timesteps) {
  check_grid_args(steps, shift, num_train_timesteps);
  std::vector<double> grid = numpy_linspace(1.0, 0.0, steps + 1);
  grid.pop_back();
  // get_sampling_sigmas shifts; set_timesteps then applies the scheduler's shift 1 (an identity).
  for (double& sigma : grid) sigma = shift_sigma(sigma, shift);
  return finish_schedule(grid, num_train_timesteps);
}

SigmaSchedule diffusers_flow_schedule(int steps, double shift, int num_train_timesteps) {
  check_grid_args(steps, shift, num_train_timesteps);
  const std::vector<double> alphas = numpy_linspace(1.0, 1.0 / num_train_timesteps, steps + 1);
  std::vector<double> grid;
  grid.reserve(static_cast<std::size_t>(steps));
  // flip(shift(1 - alphas))[:-1]: from the last alpha down to the second one.
  for (int j = steps; j >= 1; --j) grid.push_back(shift_sigma(1.0 - alphas[static_cast<std::size_t>(j)], shift));
  return finish_schedule(grid, num_train_timesteps);
}

SigmaSchedule custom_schedule(const std::vector<double>& sigmas, int num_train_timesteps) {
  if (num_train_timesteps < 1)
    throw InputError("num_train_timesteps must be positive (got " + std::to_string(num_train_timesteps) + ")");
  std::vector<double> grid = sigmas;
  if (!grid.empty() && grid.back() == 0.0) grid.pop_back();
  if (grid.empty()) throw InputError("--sigmas needs at least one value above 0");
  for (std::size_t i = 0; i < grid.size(); ++i) {
    const double sigma = grid[i];
    if (!std::isfinite(sigma) || sigma <= 0.0 || sigma > 1.0)
      throw InputError("--sigmas: value " + std::to_string(sigma) + " at position " + std::to_string(i) +
                       " is outside (0, 1] (only the last value may be 0)");
    if (i > 0 && !(static_cast<float>(sigma) < static_cast<float>(grid[i - 1])))
      throw InputError("--sigmas must be strictly decreasing (position " + std::to_string(i) + ")");
  }
  return finish_schedule(grid, num_train_timesteps);
}

// ---------------------------------------------------------------------------------------------
// FlowSampler

FlowSampler::FlowSampler(SamplerConfig config) : config_(std::move(config)) {}
FlowSampler::~FlowSampler() = default;

void FlowSampler::set_schedule(int steps, double shift) {
  SigmaGrid grid = config_.grid;
  if (grid == SigmaGrid::SolverDefault) grid = config_.name == "unipc" ? SigmaGrid::WanUniPC : SigmaGrid::WanLinear;
  switch (grid) {
    case SigmaGrid::WanUniPC:
      adopt_schedule(wan_unipc_schedule(steps, shift, config_.num_train_timesteps));
      break;
    case SigmaGrid::DiffusersFlow:
      adopt_schedule(diffusers_flow_schedule(steps, shift, config_.num_train_timesteps));
      break;
    default:
      adopt_schedule(wan_linear_schedule(steps, shift, config_.num_train_timesteps));
      break;
  }
}

void FlowSampler::set_sigmas(const std::vector<double>& sigmas) {
  adopt_schedule(custom_schedule(sigmas, config_.num_train_timesteps));
}

void FlowSampler::adopt_schedule(SigmaSchedule schedule) {
  sigmas_ = std::move(schedule.sigmas);
  timesteps_ = std::move(schedule.timesteps);
  begin_index_ = 0;
  reset();
}

void FlowSampler::set_begin_index(int index) {
  if (index < 0 || index > num_steps())
    throw InputError("sampler begin index " + std::to_string(index) + " is outside 0.." + std::to_string(num_steps()));
  begin_index_ = index;
  reset();
}

void FlowSampler::reset() { last_step_index_ = -1; }

void FlowSampler::begin_step(int step_index, const at::Tensor& model_output, const at::Tensor& sample,
                             bool multistep) {
  if (timesteps_.empty()) throw RuntimeError("sampler " + name() + ": step() before set_schedule()/set_sigmas()");
  if (step_index < begin_index_ || step_index >= num_steps())
    throw RuntimeError("sampler " + name() + ": step index " + std::to_string(step_index) + " outside " +
                       std::to_string(begin_index_) + ".." + std::to_string(num_steps() - 1));
  if (!model_output.defined() || !sample.defined() || model_output.sizes() != sample.sizes())
    throw RuntimeError("sampler " + name() + ": model output and sample must be defined and of the same shape");
  if (multistep) {
    if (step_index == begin_index_) {
      reset();  // a new run
    } else if (step_index != last_step_index_ + 1) {
      throw RuntimeError("sampler " + name() + ": step " + std::to_string(step_index) + " follows step " +
                         std::to_string(last_step_index_) + "; multistep solvers need consecutive steps");
    }
  }
  last_step_index_ = step_index;
}

// ---------------------------------------------------------------------------------------------
// Factory and scheduler_config.json

void check_sampler_name(const std::string& name) {
  if (name != "unipc" && name != "dpm++" && name != "euler" && name != "euler-a")
    throw InputError("unknown sampler '" + name + "' (expected unipc, dpm++, euler or euler-a)");
}

std::unique_ptr<FlowSampler> make_sampler(const SamplerConfig& config) {
  if (config.num_train_timesteps < 2)
    throw InputError("num_train_timesteps must be at least 2 (got " + std::to_string(config.num_train_timesteps) + ")");
  check_sampler_name(config.name);
  if (config.name == "unipc") return std::make_unique<UniPCSampler>(config);
  if (config.name == "dpm++") return std::make_unique<DPMppSampler>(config);
  if (config.name == "euler") return std::make_unique<EulerSampler>(config);
  return std::make_unique<EulerAncestralSampler>(config);  // "euler-a", the one name left
}

std::unique_ptr<FlowSampler> make_sampler(const std::string& name, int num_train_timesteps) {
  SamplerConfig config;
  config.name = name == "dpmpp" ? std::string("dpm++") : name;
  config.num_train_timesteps = num_train_timesteps;
  return make_sampler(config);
}

namespace {

using nlohmann::json;

const json* find_key(const json& doc, const char* key) {
  auto it = doc.find(key);
  return (it == doc.end() || it->is_null()) ? nullptr : &*it;
}

double number_or(const json& doc, const char* key, double fallback, const std::string& label) {
  const json* value = find_key(doc, key);
  if (!value) return fallback;
  if (!value->is_number()) throw InputError(label + ": '" + key + "' must be a number");
  return value->get<double>();
}

// A JSON integer as an int; one past int's range is refused (get<int> would wrap it silently).
int checked_int(const json& value, const char* key, const std::string& label) {
  const bool fits = value.is_number_unsigned()
                        ? value.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<int>::max())
                        : value.get<std::int64_t>() >= std::numeric_limits<int>::min() &&
                              value.get<std::int64_t>() <= std::numeric_limits<int>::max();
  if (!fits) throw InputError(label + ": '" + key + "' is out of range, got " + value.dump());
  return value.get<int>();
}

int int_or(const json& doc, const char* key, int fallback, const std::string& label) {
  const json* value = find_key(doc, key);
  if (!value) return fallback;
  if (!value->is_number_integer()) throw InputError(label + ": '" + key + "' must be an integer");
  return checked_int(*value, key, label);
}

bool bool_or(const json& doc, const char* key, bool fallback, const std::string& label) {
  const json* value = find_key(doc, key);
  if (!value) return fallback;
  if (!value->is_boolean()) throw InputError(label + ": '" + key + "' must be true or false");
  return value->get<bool>();
}

std::string string_or(const json& doc, const char* key, const std::string& fallback, const std::string& label) {
  const json* value = find_key(doc, key);
  if (!value) return fallback;
  if (!value->is_string()) throw InputError(label + ": '" + key + "' must be a string");
  return value->get<std::string>();
}

}  // namespace

SamplerConfig from_scheduler_config(const std::string& json_text, const std::string& label) {
  json doc;
  try {
    doc = json::parse(json_text);
  } catch (const json::exception& e) {
    throw InputError(label + ": invalid JSON (" + std::string(e.what()) + ")");
  }
  if (!doc.is_object()) throw InputError(label + ": expected a JSON object");

  const std::string class_name = string_or(doc, "_class_name", "", label);
  SamplerConfig config;
  bool diffusers_class = false;
  if (class_name == "UniPCMultistepScheduler" || class_name == "FlowUniPCMultistepScheduler") {
    config.name = "unipc";
    diffusers_class = class_name == "UniPCMultistepScheduler";
  } else if (class_name == "DPMSolverMultistepScheduler" || class_name == "FlowDPMSolverMultistepScheduler") {
    config.name = "dpm++";
    diffusers_class = class_name == "DPMSolverMultistepScheduler";
  } else if (class_name == "FlowMatchEulerDiscreteScheduler") {
    config.name = "euler";
  } else {
    throw InputError(label + ": unsupported scheduler class '" + class_name +
                     "' (expected UniPCMultistepScheduler, DPMSolverMultistepScheduler or FlowMatchEulerDiscreteScheduler)");
  }

  // FlowMatchEuler has no prediction_type of its own: velocity unless the key says otherwise.
  const std::string default_prediction = diffusers_class ? "epsilon" : "flow_prediction";
  const std::string prediction = string_or(doc, "prediction_type", default_prediction, label);
  if (prediction == "sample") {
    config.prediction = ModelPrediction::Sample;
  } else if (prediction != "flow_prediction") {
    throw InputError(label + ": 'prediction_type' must be flow_prediction or sample (vdit runs flow-matching models; got " +
                     prediction + ")");
  }
  if (bool_or(doc, "use_dynamic_shifting", false, label))
    throw InputError(label + ": 'use_dynamic_shifting' is not supported");
  if (bool_or(doc, "thresholding", false, label)) throw InputError(label + ": 'thresholding' is not supported");
  if (string_or(doc, "final_sigmas_type", "zero", label) != "zero")
    throw InputError(label + ": 'final_sigmas_type' must be zero");

  config.num_train_timesteps = int_or(doc, "num_train_timesteps", 1000, label);
  if (config.num_train_timesteps < 2) throw InputError(label + ": 'num_train_timesteps' must be at least 2");

  if (diffusers_class) {
    if (!bool_or(doc, "use_flow_sigmas", false, label))
      throw InputError(label + ": 'use_flow_sigmas' must be true for a flow-matching model");
    config.shift = number_or(doc, "flow_shift", 1.0, label);
    config.grid = SigmaGrid::DiffusersFlow;
  } else {
    config.shift = number_or(doc, "shift", 1.0, label);
    config.grid = SigmaGrid::SolverDefault;
  }
  if (!(config.shift > 0.0)) throw InputError(label + ": the shift must be positive");

  if (config.name != "euler") {
    config.solver_order = int_or(doc, "solver_order", 2, label);
    if (config.solver_order < 1 || config.solver_order > 2)
      throw InputError(label + ": 'solver_order' " + std::to_string(config.solver_order) + " is not supported (1 or 2)");
    config.lower_order_final = bool_or(doc, "lower_order_final", true, label);
  }
  if (config.name == "unipc") {
    if (!bool_or(doc, "predict_x0", true, label)) throw InputError(label + ": 'predict_x0' false is not supported");
    const std::string solver_type = string_or(doc, "solver_type", "bh2", label);
    if (solver_type == "bh1") {
      config.unipc_bh2 = false;
    } else if (solver_type == "bh2" || solver_type == "midpoint" || solver_type == "heun" || solver_type == "logrho") {
      config.unipc_bh2 = true;  // the reference maps the other names to bh2
    } else {
      throw InputError(label + ": 'solver_type' " + solver_type + " is not supported");
    }
    if (const json* disabled = find_key(doc, "disable_corrector")) {
      if (!disabled->is_array()) throw InputError(label + ": 'disable_corrector' must be a list of step indices");
      for (const json& index : *disabled) {
        if (!index.is_number_integer()) throw InputError(label + ": 'disable_corrector' must be a list of step indices");
        config.disable_corrector.push_back(checked_int(index, "disable_corrector", label));
      }
    }
    if (find_key(doc, "solver_p")) throw InputError(label + ": 'solver_p' is not supported");
  } else if (config.name == "dpm++") {
    if (string_or(doc, "algorithm_type", "dpmsolver++", label) != "dpmsolver++")
      throw InputError(label + ": 'algorithm_type' must be dpmsolver++");
    if (string_or(doc, "solver_type", "midpoint", label) == "heun")
      throw InputError(label + ": 'solver_type' heun is not supported (midpoint only)");
  }
  return config;
}

SamplerConfig read_scheduler_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot open scheduler config");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw InputError(path + ": cannot read scheduler config");
  return from_scheduler_config(text.str(), path);
}

// ---------------------------------------------------------------------------------------------
// Helpers

at::Tensor velocity_from_sample(const at::Tensor& sample_prediction, const at::Tensor& noisy, double sigma) {
  if (!(sigma > 0.0))
    throw RuntimeError("velocity_from_sample: sigma must be positive (got " + std::to_string(sigma) + ")");
  const at::Tensor v = (noisy.to(at::kFloat) - sample_prediction.to(at::kFloat)) / sigma;
  return v.to(sample_prediction.scalar_type());
}

at::Tensor add_noise(const at::Tensor& x0, const at::Tensor& noise, double sigma) {
  if (!x0.defined() || !noise.defined() || x0.sizes() != noise.sizes())
    throw RuntimeError("add_noise: clean latent and noise must be defined and of the same shape");
  // The reference casts its f32 sigma to the latent's dtype and forms 1 - sigma in that dtype.
  const at::Tensor sigma_t = at::scalar_tensor(sigma, at::TensorOptions().dtype(x0.scalar_type()));
  const at::Tensor alpha_t = at::rsub(sigma_t, 1);
  return x0 * alpha_t.item() + noise * sigma_t.item();
}

int img2img_begin_index(int steps, double strength) {
  if (steps < 1) throw InputError("--steps must be at least 1 (got " + std::to_string(steps) + ")");
  if (!(strength >= 0.0 && strength <= 1.0))
    throw InputError("--strength must be in [0, 1] (got " + std::to_string(strength) + ")");
  // Python int() of steps * strength (float64), as diffusers' get_timesteps.
  const int kept = std::min(static_cast<int>(static_cast<double>(steps) * strength), steps);
  return steps - kept;
}

at::Tensor euler_flow_step(const at::Tensor& velocity, const at::Tensor& sample, float sigma, float sigma_next) {
  const float dt = sigma_next - sigma;
  const at::Tensor next = sample.to(at::kFloat) + velocity * static_cast<double>(dt);
  return next.to(velocity.scalar_type());
}

at::Tensor euler_inversion_step(const at::Tensor& velocity, const at::Tensor& sample, float sigma, float sigma_next) {
  if (!(sigma_next > sigma))
    throw InputError("Euler inversion needs increasing sigmas (got " + std::to_string(sigma) + " -> " +
                     std::to_string(sigma_next) + ")");
  return euler_flow_step(velocity, sample, sigma, sigma_next);
}

}  // namespace vdit
