// Flow-matching samplers against the reference's schedules and trajectories (fixtures from
// Wan2.1's FlowUniPCMultistepScheduler / FlowDPMSolverMultistepScheduler), plus exact invariants.
#include <catch2/catch.hpp>

#include "vdit/common.h"
#include "vdit/io/safetensors.h"
#include "vdit/samplers/sampler.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

using nlohmann::json;

const std::string kSamplerDir = std::string(VDIT_FIXTURES_DIR) + "/wan-tiny/sampler";

json load_json(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  return json::parse(in);
}

std::uint32_t float_bits(float value) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// Bitwise comparison of our f32 sigmas with the reference's (JSON holds the f32 values as doubles).
void require_sigmas_bitwise(const std::vector<float>& ours, const json& expected) {
  REQUIRE(ours.size() == expected.size());
  for (std::size_t i = 0; i < ours.size(); ++i) {
    const float want = static_cast<float>(expected[i].get<double>());
    INFO("sigma index " << i << ": ours " << ours[i] << " reference " << want);
    CHECK(float_bits(ours[i]) == float_bits(want));
  }
}

void require_timesteps_equal(const std::vector<std::int64_t>& ours, const json& expected) {
  REQUIRE(ours.size() == expected.size());
  for (std::size_t i = 0; i < ours.size(); ++i) {
    INFO("timestep index " << i);
    CHECK(ours[i] == expected[i].get<std::int64_t>());
  }
}

struct Closeness {
  double max_abs = 0.0;
  bool within = true;
};

// allclose: |a - b| <= atol + rtol * |b| everywhere, and the largest |a - b|.
Closeness compare(const at::Tensor& actual, const at::Tensor& expected, double atol, double rtol) {
  const at::Tensor a = actual.to(at::kDouble);
  const at::Tensor b = expected.to(at::kDouble);
  const at::Tensor diff = (a - b).abs();
  Closeness c;
  c.max_abs = diff.max().item<double>();
  c.within = (diff <= atol + rtol * b.abs()).all().item<bool>();
  return c;
}

std::string fixture_prefix(const std::string& sampler) { return sampler == "dpm++" ? "dpmpp" : sampler; }

}  // namespace

TEST_CASE("sampler: 10-step schedules equal the reference bitwise", "[sampler]") {
  const json manifest = load_json(kSamplerDir + "/manifest.json");
  const double shift = manifest["config"]["shift"].get<double>();
  const int steps = manifest["config"]["steps"].get<int>();
  for (const std::string name : {"unipc", "dpm++", "euler"}) {
    SECTION(name) {
      const json& expected = manifest["schedules"][fixture_prefix(name)];
      auto sampler = vdit::make_sampler(name);
      sampler->set_schedule(steps, shift);
      REQUIRE(sampler->num_steps() == steps);
      require_sigmas_bitwise(sampler->sigmas(), expected["sigmas_f32"]);
      require_timesteps_equal(sampler->timesteps(), expected["timesteps_int64"]);
    }
  }
}

TEST_CASE("sampler: 50-step default schedules for shifts 5, 8 and 3", "[sampler]") {
  const json schedules = load_json(kSamplerDir + "/default_schedules.json");
  for (const double shift : {5.0, 8.0, 3.0}) {
    const json& entry = schedules["steps50_shift" + std::to_string(static_cast<int>(shift))];
    REQUIRE(entry.is_object());
    for (const std::string name : {"unipc", "dpm++", "euler"}) {
      INFO("sampler " << name << " shift " << shift);
      // Euler shares the DPM++ grid (Wan's get_sampling_sigmas).
      const json& expected = entry[name == "unipc" ? "unipc" : "dpmpp"];
      auto sampler = vdit::make_sampler(name);
      sampler->set_schedule(50, shift);
      require_sigmas_bitwise(sampler->sigmas(), expected["sigmas"]);
      require_timesteps_equal(sampler->timesteps(), expected["timesteps"]);
    }
  }
}

TEST_CASE("sampler: trajectories match the reference for fixed model outputs", "[sampler]") {
  const json manifest = load_json(kSamplerDir + "/manifest.json");
  const double atol = manifest["tolerance"]["samples"]["atol"].get<double>();
  const double rtol = manifest["tolerance"]["samples"]["rtol"].get<double>();
  const auto file = vdit::SafetensorsFile::open(kSamplerDir + "/case_steps.safetensors");
  const at::Tensor model_outputs = file->tensor("model_outputs");
  const at::Tensor x_T = file->tensor("x_T");
  const int steps = manifest["config"]["steps"].get<int>();
  REQUIRE(model_outputs.size(0) == steps);

  for (const std::string name : {"unipc", "dpm++", "euler"}) {
    SECTION(name) {
      const std::string prefix = fixture_prefix(name);
      const at::Tensor expected = file->tensor(prefix + ".samples");
      const at::Tensor fixture_sigmas = file->tensor(prefix + ".sigmas");
      const at::Tensor fixture_timesteps = file->tensor(prefix + ".timesteps");

      auto sampler = vdit::make_sampler(name);
      sampler->set_schedule(steps, manifest["config"]["shift"].get<double>());
      for (int i = 0; i <= steps; ++i) {
        CHECK(float_bits(sampler->sigmas()[static_cast<std::size_t>(i)]) == float_bits(fixture_sigmas[i].item<float>()));
      }
      for (int i = 0; i < steps; ++i) {
        CHECK(sampler->timesteps()[static_cast<std::size_t>(i)] ==
              static_cast<std::int64_t>(fixture_timesteps[i].item<float>()));
      }

      // As the reference: batch of one.
      at::Tensor x = x_T.unsqueeze(0);
      double worst = 0.0;
      for (int i = 0; i < steps; ++i) {
        x = sampler->step(model_outputs[i].unsqueeze(0), i, x);
        const Closeness c = compare(x[0], expected[i], atol, rtol);
        worst = std::max(worst, c.max_abs);
        INFO(name << " step " << i << " max |diff| " << c.max_abs);
        CHECK(c.within);
      }
      INFO(name << " trajectory max |diff| over all steps " << worst);
      CHECK(worst <= atol);
    }
  }
}

TEST_CASE("sampler: straight-line flow is followed exactly by every solver", "[sampler]") {
  // With v = noise - x0 at every step the exact solution is x_sigma = (1 - sigma) x0 + sigma noise;
  // every solver here is exact on it (the data prediction is x0 at each step), also for a first
  // sigma of exactly 1 (lambda = -inf paths).
  at::manual_seed(11);
  const at::Tensor x0 = at::randn({2, 16, 3, 4, 5});
  const at::Tensor noise = at::randn({2, 16, 3, 4, 5});
  const at::Tensor velocity = noise - x0;
  for (const std::string name : {"unipc", "dpm++", "euler"}) {
    for (const bool custom : {false, true}) {
      INFO("sampler " << name << (custom ? " with sigmas starting at 1" : " default schedule"));
      auto sampler = vdit::make_sampler(name);
      if (custom) {
        sampler->set_sigmas({1.0, 0.9, 0.7, 0.45, 0.2, 0.05});
      } else {
        sampler->set_schedule(12, 5.0);
      }
      at::Tensor x = vdit::add_noise(x0, noise, sampler->sigmas()[0]);
      for (int i = 0; i < sampler->num_steps(); ++i) {
        x = sampler->step(velocity, i, x);
        const at::Tensor exact = vdit::add_noise(x0, noise, sampler->sigmas()[static_cast<std::size_t>(i + 1)]);
        INFO("step " << i);
        REQUIRE(at::isfinite(x).all().item<bool>());
        CHECK(compare(x, exact, 2e-6, 2e-6).within);
      }
      CHECK(compare(x, x0, 2e-6, 2e-6).within);
    }
  }
}

TEST_CASE("sampler: a sample-predicting model's true x0 lands every solver on it", "[sampler]") {
  // velocity_from_sample turns a predicted x0 into (x - x0) / sigma; with the true x0 that is the
  // straight-line velocity noise - x0 at every step, so each solver ends on x0.
  at::manual_seed(12);
  const at::Tensor x0 = at::randn({1, 16, 3, 4, 5});
  const at::Tensor noise = at::randn({1, 16, 3, 4, 5});
  for (double sigma : {1.0, 0.5, 0.05}) {
    INFO("sigma " << sigma);
    CHECK(compare(vdit::velocity_from_sample(x0, vdit::add_noise(x0, noise, sigma), sigma), noise - x0, 1e-5, 1e-5).within);
  }
  CHECK_THROWS_AS(vdit::velocity_from_sample(x0, x0, 0.0), vdit::RuntimeError);
  for (const std::string name : {"unipc", "dpm++", "euler"}) {
    INFO("sampler " << name);
    auto sampler = vdit::make_sampler(name);
    sampler->set_schedule(12, 5.0);
    at::Tensor x = vdit::add_noise(x0, noise, sampler->sigmas()[0]);
    for (int i = 0; i < sampler->num_steps(); ++i)
      x = sampler->step(vdit::velocity_from_sample(x0, x, sampler->sigmas()[static_cast<std::size_t>(i)]), i, x);
    CHECK(compare(x, x0, 1e-5, 1e-5).within);
  }
}

TEST_CASE("sampler: Euler step is x + (sigma_next - sigma) * v, and equals first-order DPM++", "[sampler]") {
  at::manual_seed(12);
  const at::Tensor x = at::randn({16, 2, 4, 6});
  const at::Tensor v = at::randn({16, 2, 4, 6});
  auto euler = vdit::make_sampler("euler");
  euler->set_schedule(10, 5.0);
  const std::vector<float>& sigmas = euler->sigmas();
  for (int i = 0; i < 10; ++i) {
    const at::Tensor next = euler->step(v, i, x);
    // Exact f32 arithmetic done element by element.
    const float dt = sigmas[static_cast<std::size_t>(i + 1)] - sigmas[static_cast<std::size_t>(i)];
    const at::Tensor xc = x.contiguous();
    const at::Tensor vc = v.contiguous();
    const float* xp = xc.data_ptr<float>();
    const float* vp = vc.data_ptr<float>();
    const at::Tensor nc = next.contiguous();
    const float* np = nc.data_ptr<float>();
    bool exact = true;
    for (std::int64_t k = 0; k < x.numel(); ++k) {
      const float product = dt * vp[k];
      const float want = xp[k] + product;
      exact = exact && float_bits(np[k]) == float_bits(want);
    }
    INFO("step " << i);
    CHECK(exact);
  }

  // Stateless: steps can be taken in any order.
  const at::Tensor late = euler->step(v, 7, x);
  const at::Tensor early = euler->step(v, 2, x);
  CHECK(at::equal(late, euler->step(v, 7, x)));
  CHECK(!at::equal(late, early));

  // DPM-Solver++ of order 1 on a flow model is Euler up to rounding (the reference's Euler).
  vdit::SamplerConfig first_order;
  first_order.name = "dpm++";
  first_order.solver_order = 1;
  auto dpm1 = vdit::make_sampler(first_order);
  dpm1->set_schedule(10, 5.0);
  at::Tensor xe = x, xd = x;
  for (int i = 0; i < 10; ++i) {
    const at::Tensor vi = v * (1.0 + 0.1 * i);
    xe = euler->step(vi, i, xe);
    xd = dpm1->step(vi, i, xd);
  }
  const Closeness c = compare(xe, xd, 2e-6, 2e-6);
  INFO("euler vs first-order dpm++ max |diff| " << c.max_abs);
  CHECK(c.within);
}

TEST_CASE("sampler: Euler inversion then sampling with a constant velocity returns x0", "[sampler]") {
  at::manual_seed(13);
  const at::Tensor x0 = at::randn({16, 3, 4, 6});
  const at::Tensor v = at::randn({16, 3, 4, 6});
  auto sampler = vdit::make_sampler("euler");
  sampler->set_schedule(20, 5.0);
  const std::vector<float>& sigmas = sampler->sigmas();
  const int n = sampler->num_steps();

  at::Tensor x = x0;
  for (int i = n - 1; i >= 0; --i) {
    x = vdit::euler_inversion_step(v, x, sigmas[static_cast<std::size_t>(i + 1)], sigmas[static_cast<std::size_t>(i)]);
  }
  // With a constant v the inverted latent is x0 + sigma_0 v.
  CHECK(compare(x, x0 + v * static_cast<double>(sigmas[0]), 1e-5, 1e-5).within);

  for (int i = 0; i < n; ++i) x = sampler->step(v, i, x);
  const Closeness c = compare(x, x0, 1e-5, 1e-5);
  INFO("inversion round trip max |diff| " << c.max_abs);
  CHECK(c.within);

  CHECK_THROWS_AS(vdit::euler_inversion_step(v, x0, 0.5f, 0.25f), vdit::InputError);
}

TEST_CASE("sampler: img2img begin index runs the tail of the schedule", "[sampler]") {
  const auto file = vdit::SafetensorsFile::open(kSamplerDir + "/case_steps.safetensors");
  const at::Tensor model_outputs = file->tensor("model_outputs");
  const at::Tensor x_T = file->tensor("x_T");
  CHECK(vdit::img2img_begin_index(50, 0.7) == 15);
  CHECK(vdit::img2img_begin_index(10, 1.0) == 0);
  CHECK(vdit::img2img_begin_index(10, 0.0) == 10);
  CHECK_THROWS_AS(vdit::img2img_begin_index(10, 1.5), vdit::InputError);

  for (const std::string name : {"unipc", "dpm++", "euler"}) {
    INFO("sampler " << name);
    const int begin = 4;
    auto full = vdit::make_sampler(name);
    full->set_schedule(10, 5.0);
    full->set_begin_index(begin);
    CHECK_THROWS_AS(full->step(model_outputs[0], 0, x_T), vdit::RuntimeError);

    // The same steps on a schedule that simply is the tail.
    auto tail = vdit::make_sampler(name);
    std::vector<double> tail_sigmas(full->sigmas().begin() + begin, full->sigmas().end());
    tail->set_sigmas(tail_sigmas);
    REQUIRE(tail->num_steps() == 10 - begin);
    for (int i = 0; i < tail->num_steps(); ++i) {
      CHECK(float_bits(tail->sigmas()[static_cast<std::size_t>(i)]) ==
            float_bits(full->sigmas()[static_cast<std::size_t>(begin + i)]));
    }

    at::Tensor a = x_T, b = x_T;
    for (int i = begin; i < 10; ++i) {
      a = full->step(model_outputs[i], i, a);
      b = tail->step(model_outputs[i], i - begin, b);
      CHECK(at::equal(a, b));
    }
  }
}

TEST_CASE("sampler: a new run from the begin index repeats the trajectory, misuse is reported", "[sampler]") {
  const auto file = vdit::SafetensorsFile::open(kSamplerDir + "/case_steps.safetensors");
  const at::Tensor model_outputs = file->tensor("model_outputs");
  const at::Tensor x_T = file->tensor("x_T");
  for (const std::string name : {"unipc", "dpm++"}) {
    INFO("sampler " << name);
    auto sampler = vdit::make_sampler(name);
    sampler->set_schedule(10, 5.0);
    std::vector<at::Tensor> first;
    at::Tensor x = x_T;
    for (int i = 0; i < 10; ++i) first.push_back(x = sampler->step(model_outputs[i], i, x));
    x = x_T;
    for (int i = 0; i < 10; ++i) {
      x = sampler->step(model_outputs[i], i, x);
      CHECK(at::equal(x, first[static_cast<std::size_t>(i)]));
    }
    // Skipping a step breaks the multistep history.
    sampler->reset();
    x = sampler->step(model_outputs[0], 0, x_T);
    CHECK_THROWS_AS(sampler->step(model_outputs[2], 2, x), vdit::RuntimeError);
    CHECK_THROWS_AS(sampler->step(model_outputs[0], 10, x), vdit::RuntimeError);
    CHECK_THROWS_AS(sampler->step(model_outputs[0].flatten(), 1, x), vdit::RuntimeError);
  }
  auto unscheduled = vdit::make_sampler("unipc");
  CHECK_THROWS_AS(unscheduled->step(x_T, 0, x_T), vdit::RuntimeError);
}

TEST_CASE("sampler: names, custom sigmas and their errors", "[sampler]") {
  CHECK_THROWS_AS(vdit::make_sampler("ddim"), vdit::InputError);
  CHECK_THROWS_AS(vdit::make_sampler(""), vdit::InputError);
  CHECK(vdit::make_sampler("dpmpp")->name() == "dpm++");

  auto sampler = vdit::make_sampler("dpm++");
  sampler->set_sigmas({1.0, 0.5, 0.25});
  CHECK(sampler->sigmas() == std::vector<float>{1.0f, 0.5f, 0.25f, 0.0f});
  CHECK(sampler->timesteps() == std::vector<std::int64_t>{1000, 500, 250});
  sampler->set_sigmas({0.8, 0.3, 0.0});  // a final 0 is not appended twice
  CHECK(sampler->sigmas() == std::vector<float>{0.8f, 0.3f, 0.0f});
  CHECK(sampler->timesteps() == std::vector<std::int64_t>{800, 300});

  CHECK_THROWS_AS(sampler->set_sigmas({}), vdit::InputError);
  CHECK_THROWS_AS(sampler->set_sigmas({0.0}), vdit::InputError);
  CHECK_THROWS_AS(sampler->set_sigmas({0.5, 0.7}), vdit::InputError);
  CHECK_THROWS_AS(sampler->set_sigmas({1.5, 0.5}), vdit::InputError);
  CHECK_THROWS_AS(sampler->set_sigmas({0.9, 0.0, 0.5}), vdit::InputError);
  CHECK_THROWS_AS(sampler->set_sigmas({0.9, std::nan("")}), vdit::InputError);
  CHECK_THROWS_AS(sampler->set_schedule(0, 5.0), vdit::InputError);
  CHECK_THROWS_AS(sampler->set_schedule(10, 0.0), vdit::InputError);
  CHECK_THROWS_AS(sampler->set_begin_index(4), vdit::InputError);  // 2 steps only

  vdit::SamplerConfig order3;
  order3.solver_order = 3;
  CHECK_THROWS_AS(vdit::make_sampler(order3), vdit::InputError);
}

TEST_CASE("sampler: add_noise mixes (1 - sigma) x0 + sigma noise", "[sampler]") {
  at::manual_seed(14);
  const at::Tensor x0 = at::randn({4, 5, 6});
  const at::Tensor noise = at::randn({4, 5, 6});
  CHECK(at::equal(vdit::add_noise(x0, noise, 0.0), x0));
  CHECK(at::equal(vdit::add_noise(x0, noise, 1.0), noise));
  const float sigma = 0.6818181872367859f;
  const at::Tensor mixed = vdit::add_noise(x0, noise, sigma);
  const at::Tensor expected = x0.to(at::kDouble) * (1.0 - sigma) + noise.to(at::kDouble) * static_cast<double>(sigma);
  CHECK(compare(mixed, expected, 1e-6, 1e-6).within);
  CHECK(mixed.scalar_type() == at::kFloat);
}

TEST_CASE("sampler: diffusers scheduler_config.json", "[sampler]") {
  // The scheduler config of the diffusers Wan2.1 T2V repositories.
  const std::string wan_diffusers = R"({
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": true, "num_train_timesteps": 1000, "predict_x0": true,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": false, "sample_max_value": 1.0,
    "solver_order": 2, "solver_p": null, "solver_type": "bh2", "steps_offset": 0, "thresholding": false,
    "timestep_spacing": "linspace", "trained_betas": null, "use_beta_sigmas": false,
    "use_exponential_sigmas": false, "use_flow_sigmas": true, "use_karras_sigmas": false})";
  const vdit::SamplerConfig config = vdit::from_scheduler_config(wan_diffusers);
  CHECK(config.name == "unipc");
  CHECK(config.shift == 3.0);
  CHECK(config.solver_order == 2);
  CHECK(config.num_train_timesteps == 1000);
  CHECK(config.grid == vdit::SigmaGrid::DiffusersFlow);
  CHECK(config.unipc_bh2);

  // diffusers' grid is 1 - linspace(1, 1/N, n+1) shifted: the same points as Wan's
  // linspace(0.999, 0, n+1) up to rounding (Wan's 0.999 is an f32), and identical ends.
  auto diffusers = vdit::make_sampler(config);
  diffusers->set_schedule(50, config.shift);
  auto wan = vdit::make_sampler("unipc");
  wan->set_schedule(50, config.shift);
  REQUIRE(diffusers->num_steps() == 50);
  CHECK(diffusers->sigmas()[0] == static_cast<float>(vdit::shift_sigma(0.999, 3.0)));
  CHECK(diffusers->sigmas().back() == 0.0f);
  for (std::size_t i = 0; i < 50; ++i) {
    CHECK(std::fabs(diffusers->sigmas()[i] - wan->sigmas()[i]) < 1e-6f);
    CHECK(std::llabs(diffusers->timesteps()[i] - wan->timesteps()[i]) <= 1);
  }

  const vdit::SamplerConfig euler = vdit::from_scheduler_config(
      R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 8.0, "num_train_timesteps": 1000})");
  CHECK(euler.name == "euler");
  CHECK(euler.shift == 8.0);
  const vdit::SamplerConfig wan_dpm = vdit::from_scheduler_config(
      R"({"_class_name": "FlowDPMSolverMultistepScheduler", "shift": 5, "solver_order": 1})");
  CHECK(wan_dpm.name == "dpm++");
  CHECK(wan_dpm.solver_order == 1);
  CHECK(wan_dpm.grid == vdit::SigmaGrid::SolverDefault);

  // A model that predicts x0 says so with diffusers' "sample"; velocity is the default.
  CHECK(config.prediction == vdit::ModelPrediction::Velocity);
  CHECK(euler.prediction == vdit::ModelPrediction::Velocity);
  CHECK(vdit::from_scheduler_config(R"({"_class_name": "UniPCMultistepScheduler", "prediction_type": "sample",
                                        "use_flow_sigmas": true})")
            .prediction == vdit::ModelPrediction::Sample);
  CHECK(vdit::from_scheduler_config(R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "prediction_type": "sample"})")
            .prediction == vdit::ModelPrediction::Sample);
  CHECK_THROWS_AS(vdit::from_scheduler_config(R"({"_class_name": "FlowUniPCMultistepScheduler", "prediction_type": "epsilon"})"),
                  vdit::InputError);

  CHECK_THROWS_AS(vdit::from_scheduler_config("{not json"), vdit::InputError);
  // Integers past int's range were wrapped silently (4294967298 read as 2).
  CHECK_THROWS_WITH(vdit::from_scheduler_config(R"({"_class_name": "FlowUniPCMultistepScheduler", "solver_order": 4294967298})"),
                    Catch::Contains("'solver_order' is out of range"));
  CHECK_THROWS_WITH(vdit::from_scheduler_config(
                        R"({"_class_name": "FlowUniPCMultistepScheduler", "disable_corrector": [18446744073709551615]})"),
                    Catch::Contains("'disable_corrector' is out of range"));
  CHECK_THROWS_AS(vdit::from_scheduler_config("[1, 2]"), vdit::InputError);
  CHECK_THROWS_AS(vdit::from_scheduler_config(R"({"_class_name": "DDIMScheduler"})"), vdit::InputError);
  CHECK_THROWS_AS(vdit::from_scheduler_config(R"({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": true})"),
                  vdit::InputError);  // epsilon prediction by default
  CHECK_THROWS_AS(vdit::from_scheduler_config(
                      R"({"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                          "use_flow_sigmas": true, "solver_order": 3})"),
                  vdit::InputError);
  CHECK_THROWS_AS(vdit::from_scheduler_config(
                      R"({"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                          "use_flow_sigmas": true, "flow_shift": "3"})"),
                  vdit::InputError);
  CHECK_THROWS_AS(vdit::read_scheduler_config(kSamplerDir + "/no_such_config.json"), vdit::InputError);
}

namespace {

// Runs euler-a over `x` with a model whose data prediction is `x0_of(x, sigma)`.
template <class X0Of>
at::Tensor run_euler_a(double eta, std::uint64_t noise_seed, int steps, double shift, at::Tensor x, X0Of x0_of) {
  vdit::SamplerConfig config;
  config.name = "euler-a";
  config.eta = eta;
  config.noise_seed = noise_seed;
  auto sampler = vdit::make_sampler(config);
  sampler->set_schedule(steps, shift);
  for (int i = 0; i < sampler->num_steps(); ++i) {
    const double sigma = sampler->sigmas()[static_cast<std::size_t>(i)];
    x = sampler->step(vdit::velocity_from_sample(x0_of(x, sigma), x, sigma), i, x);
  }
  return x;
}

}  // namespace

TEST_CASE("sampler: euler-a with eta 0 is the Euler step, the oracle x0 lands it on x0 for any eta", "[sampler]") {
  at::manual_seed(21);
  const at::Tensor x0 = at::randn({1, 16, 3, 4, 5});
  const at::Tensor noise = at::randn({1, 16, 3, 4, 5});
  const at::Tensor v = at::randn({1, 16, 3, 4, 5});
  // eta 0: (1 - s') x0^ + s' noise^ is algebraically x + (s' - s) v; f32 rounding differs slightly.
  vdit::SamplerConfig config;
  config.name = "euler-a";
  config.eta = 0.0;
  auto ancestral = vdit::make_sampler(config);
  auto euler = vdit::make_sampler("euler");
  ancestral->set_sigmas({1.0, 0.8, 0.5, 0.2});
  euler->set_sigmas({1.0, 0.8, 0.5, 0.2});
  at::Tensor xa = noise, xe = noise;
  for (int i = 0; i < 4; ++i) {
    INFO("step " << i);
    xa = ancestral->step(v, i, xa);
    xe = euler->step(v, i, xe);
    CHECK(compare(xa, xe, 1e-5, 1e-5).within);
  }
  // With the true x0 every step's x0^ is x0; the last step (sigma_next 0) has no fresh noise.
  for (const double eta : {0.0, 0.5, 1.0}) {
    INFO("eta " << eta);
    const at::Tensor x = run_euler_a(eta, 5, 12, 5.0, noise, [&](const at::Tensor&, double) { return x0; });
    CHECK(compare(x, x0, 1e-5, 1e-5).within);
  }
  config.eta = 1.5;
  CHECK_THROWS_AS(vdit::make_sampler(config), vdit::InputError);
  config.eta = -0.1;
  CHECK_THROWS_AS(vdit::make_sampler(config), vdit::InputError);
}

TEST_CASE("sampler: euler-a samples Gaussian data with the right mean and spread", "[sampler]") {
  // Data x0 ~ N(mu, s^2) per element: the exact denoiser is E[x0 | x] =
  // mu + a s^2 / (a^2 s^2 + sigma^2) (x - a mu) with a = 1 - sigma. Fed that, a sampler that adds
  // the right amount of noise ends near N(mu, s^2). Measured at 400 steps (shift 1, 2e5 samples,
  // standard errors ~0.0007 on the mean and ~0.0005 on the spread): spread off by 0.0013 / 0.0024 /
  // 0.0040 and mean by <= 0.0012 for eta 0 / 0.5 / 1 (40 steps: 0.014 / 0.017 / 0.029, the
  // discretisation error, first order). Tolerances 0.008 and 0.004. Two wrong noise mixes were
  // tried against this test and failed it: keeping sigma' of the predicted noise while adding the
  // fresh noise (spread off by 0.33 / 0.85 at eta 0.5 / 1), and mixing (1 - eta) sigma' predicted
  // with eta sigma' fresh noise (0.15 / 0.09).
  const double mu = 0.5, s = 0.3;
  const auto exact_x0 = [&](const at::Tensor& x, double sigma) {
    const double a = 1.0 - sigma;
    return mu + (a * s * s / (a * a * s * s + sigma * sigma)) * (x - a * mu);
  };
  at::manual_seed(22);
  const at::Tensor noise = at::randn({200000});
  for (const double eta : {0.0, 0.5, 1.0}) {
    INFO("eta " << eta);
    const at::Tensor x = run_euler_a(eta, 7, 400, 1.0, noise, exact_x0);
    CHECK(std::abs(x.mean().item<double>() - mu) < 0.004);
    CHECK(std::abs(x.std().item<double>() - s) < 0.008);
  }
}

TEST_CASE("sampler: euler-a is reproducible from its noise seed and restarts at the begin index", "[sampler]") {
  at::manual_seed(23);
  const at::Tensor x0 = at::randn({1, 16, 3, 4, 5});
  const at::Tensor noise = at::randn({1, 16, 3, 4, 5});
  // A model that is not an oracle (its x0 guess depends on x), so the fresh noise matters.
  const auto blurry_x0 = [&](const at::Tensor& x, double sigma) { return 0.5 * x0 + 0.5 * (1 - sigma) * x; };
  const at::Tensor a = run_euler_a(1.0, 3, 10, 5.0, noise, blurry_x0);
  const at::Tensor b = run_euler_a(1.0, 3, 10, 5.0, noise, blurry_x0);
  const at::Tensor c = run_euler_a(1.0, 4, 10, 5.0, noise, blurry_x0);
  CHECK(at::equal(a, b));
  CHECK(!at::allclose(a, c));

  // The same sampler object run twice from its begin index reseeds and repeats the trajectory.
  vdit::SamplerConfig config;
  config.name = "euler-a";
  config.noise_seed = 3;
  auto sampler = vdit::make_sampler(config);
  sampler->set_schedule(10, 5.0);
  for (int run = 0; run < 2; ++run) {
    at::Tensor x = noise;
    for (int i = 0; i < sampler->num_steps(); ++i) {
      const double sigma = sampler->sigmas()[static_cast<std::size_t>(i)];
      x = sampler->step(vdit::velocity_from_sample(blurry_x0(x, sigma), x, sigma), i, x);
    }
    INFO("run " << run);
    CHECK(at::equal(x, a));
  }
}
