// Internals the demo trainer's files share (not installed, not part of the public API): timing,
// file and training-archive helpers, the object masks, the stage budget and loop, the model
// export's writers, and the stage entry points train_demo() calls. The trainer itself is split by
// what it trains: train_config.cpp (DemoTrainConfig), train_common.cpp (these helpers, tokenizer,
// text encoder, export, train_demo), train_vae.cpp, train_dit.cpp, train_decoder_pairs.cpp.
#pragma once

#include "vdit/demo/train_demo.h"
#include "vdit/progress.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <utility>

namespace vdit::demo {

namespace fs = std::filesystem;

namespace detail {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0);
void write_text(const fs::path& path, const std::string& text);
nlohmann::json read_json(const std::string& path);

// Random-generator state, counters and atomic saves of a training archive (train_common.cpp).
void write_rng(torch::serialize::OutputArchive& ar, const std::mt19937_64& data_rng, const at::Generator& gen);
void read_rng(torch::serialize::InputArchive& ar, std::mt19937_64& data_rng, at::Generator& gen);
std::int64_t read_int(torch::serialize::InputArchive& ar, const std::string& key);
void save_archive(torch::serialize::OutputArchive& ar, const std::string& path);

void set_lr(torch::optim::Optimizer& opt, double lr);
at::Tensor background_pixels();
at::Tensor object_mask(const at::Tensor& video);
std::pair<at::Tensor, at::Tensor> mask_centres(const at::Tensor& mask, double fallback_y, double fallback_x);
std::string fmt(double v, int precision = 4);
nlohmann::json vae_config_json(const WanVAEConfig& c);
void copy_parameters(torch::nn::Module& from, torch::nn::Module& to);
void move_adamw_state(torch::optim::AdamW& optimizer, at::Device device);

// A stage's budget: steps when given, otherwise wall-clock minutes (counted over resumed runs).
struct Budget {
  std::int64_t steps = 0;
  double minutes = 0;
  bool done(std::int64_t step, double seconds) const {
    return steps > 0 ? step >= steps : seconds >= minutes * 60.0;
  }
  std::int64_t total() const { return steps > 0 ? steps : static_cast<std::int64_t>(std::ceil(minutes * 60)); }
  std::int64_t progress(std::int64_t step, double seconds) const {
    return steps > 0 ? step : static_cast<std::int64_t>(seconds);
  }
  // Share of the budget spent (can pass 1 by the last step's overshoot).
  double fraction(std::int64_t step, double seconds) const {
    return static_cast<double>(progress(step, seconds)) / static_cast<double>(std::max<std::int64_t>(1, total()));
  }
};

// The training loop both stages share: steps until the budget is spent (elapsed seconds carry
// over resumed runs), a progress line with the smoothed loss, a checkpoint every
// checkpoint_minutes and one at the end. step() runs one step and returns its loss and any extra
// progress text. Returns the smoothed loss.
template <class Trainer, class Step>
double run_budget(const std::string& name, const std::string& loss_name, const Budget& budget, Trainer& trainer,
                  double& elapsed, double checkpoint_minutes, bool quiet, Step step,
                  const std::function<void()>& save) {
  ProgressBar bar("train " + name, budget.total(), budget.progress(trainer.steps_done(), elapsed));
  const auto t0 = Clock::now();
  const double base = elapsed;
  auto last_save = Clock::now();
  double avg = 0;
  bool first = true;
  while (!budget.done(trainer.steps_done(), elapsed)) {
    const auto [loss, extra] = step();
    avg = first ? loss : 0.98 * avg + 0.02 * loss;  // smoothed for the progress line
    first = false;
    elapsed = base + seconds_since(t0);
    if (!quiet)
      bar.update(budget.progress(trainer.steps_done(), elapsed),
                 "step " + std::to_string(trainer.steps_done()) + " " + loss_name + " " + fmt(avg) + extra);
    if (seconds_since(last_save) > checkpoint_minutes * 60) {
      save();
      last_save = Clock::now();
    }
  }
  bar.finish();
  save();
  return avg;
}

// Parts of the diffusers layout (train_common.cpp).
void write_vae(const fs::path& dir, WanVAE& vae);
void write_text_encoder(const fs::path& dir, UMT5Encoder& t5, const std::string& tokenizer_path);
void write_pipeline_files(const fs::path& dir, const DemoTrainConfig& config);
void write_transformer(const fs::path& dir, WanDiT& dit);
WanVAE load_trained_vae(const fs::path& dir);

// The stages train_demo() runs (train_vae.cpp, train_dit.cpp).
void run_vae_stage(const DemoTrainConfig& config, const DemoTrainOptions& options, bool decoder_only);
void run_dit_stage(const DemoTrainConfig& config, const DemoTrainOptions& options);

}  // namespace detail

}  // namespace vdit::demo
