// The shapes demo-model trainer (see include/vdit/demo/train_demo.h for the stages and the
// choices behind them).
#include "vdit/demo/train_demo.h"

#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/io/checkpoint.h"
#include "vdit/io/safetensors.h"
#include "vdit/models/tokenizer.h"
#include "vdit/progress.h"
#include "vdit/pipelines/wan_t2v.h"
#include "vdit/models/wan_checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>

#include <spawn.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <sys/wait.h>
#include <fcntl.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <functional>
#include <map>
#include <optional>
#include <iomanip>
#include <sstream>
#include <tuple>

extern char** environ;

namespace vdit::demo {

namespace fs = std::filesystem;

namespace {

// Sample-predicting DiT: sigmas below this count as this in the velocity loss (the weight of an x0
// error is 1 / sigma^2 there, which would otherwise grow without bound as sigma -> 0).
constexpr double kSamplePredictionLossMinSigma = 0.05;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path);
  out << text;
  if (!out) throw RuntimeError("cannot write " + path.string());
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError("cannot open " + path);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path + ": invalid JSON (" + e.what() + ")");
  }
}

// ---- random-generator state in a training archive ---------------------------------------------
// Both generators go into the state so a resumed run draws the same data and noise as an
// uninterrupted one.

at::Tensor string_tensor(const std::string& s) {
  at::Tensor t = at::empty({static_cast<std::int64_t>(s.size())}, at::kByte);
  if (!s.empty()) std::memcpy(t.data_ptr(), s.data(), s.size());
  return t;
}

std::string tensor_string(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::string(reinterpret_cast<const char*>(c.data_ptr<std::uint8_t>()), static_cast<std::size_t>(c.numel()));
}

void write_rng(torch::serialize::OutputArchive& ar, const std::mt19937_64& data_rng, const at::Generator& gen) {
  std::ostringstream s;
  s << data_rng;
  ar.write("data_rng", string_tensor(s.str()));
  ar.write("noise_gen", gen.get_state());
}

void read_rng(torch::serialize::InputArchive& ar, std::mt19937_64& data_rng, at::Generator& gen) {
  at::Tensor t;
  ar.read("data_rng", t);
  std::istringstream s(tensor_string(t));
  s >> data_rng;
  at::Tensor g;
  ar.read("noise_gen", g);
  gen.set_state(g);
}

std::int64_t read_int(torch::serialize::InputArchive& ar, const std::string& key) {
  at::Tensor t;
  ar.read(key, t);
  return t.item<std::int64_t>();
}

// Saves to a temporary name and renames, so an interrupted save never leaves a torn state file.
void save_archive(torch::serialize::OutputArchive& ar, const std::string& path) {
  fs::create_directories(fs::path(path).parent_path());
  const std::string tmp = path + ".tmp";
  ar.save_to(tmp);
  fs::rename(tmp, path);
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& group : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

// Index of a caption in Caption::all() (the order the frozen text contexts are stored in).
std::int64_t caption_index(const shapes::Caption& c) {
  static const std::vector<shapes::Caption> all = shapes::Caption::all();
  for (std::size_t i = 0; i < all.size(); ++i)
    if (all[i] == c) return static_cast<std::int64_t>(i);
  throw RuntimeError("caption '" + c.text() + "' is not in Caption::all()");
}

// The background colour in the [-1, 1] pixel range the renderer produces.
at::Tensor background_pixels() {
  return at::tensor({2 * shapes::kBackground[0] - 1, 2 * shapes::kBackground[1] - 1, 2 * shapes::kBackground[2] - 1})
      .view({1, 3, 1, 1, 1});
}

// RAII: CPU bf16 autocast for the DiT forward when the config asks for it.
struct AutocastScope {
  explicit AutocastScope(bool on) : on_(on) {
    if (!on_) return;
    prev_enabled_ = at::autocast::is_cpu_enabled();
    prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  }
  ~AutocastScope() {
    if (!on_) return;
    at::autocast::set_cpu_enabled(prev_enabled_);
    at::autocast::set_autocast_cpu_dtype(prev_dtype_);
    at::autocast::clear_cache();
  }
  bool on_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

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

std::string fmt(double v, int precision = 4) {
  std::ostringstream s;
  s << std::setprecision(precision) << v;
  return s.str();
}

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

nlohmann::json vae_config_json(const WanVAEConfig& c) {
  nlohmann::json j;
  j["_class_name"] = "AutoencoderKLWan";
  j["base_dim"] = c.dim;
  j["z_dim"] = c.z_dim;
  j["dim_mult"] = c.dim_mult;
  j["num_res_blocks"] = c.num_res_blocks;
  j["attn_scales"] = c.attn_scales;
  j["temperal_downsample"] = c.temporal_downsample;
  j["dropout"] = 0.0;
  j["latents_mean"] = c.latent_mean;
  j["latents_std"] = c.latent_std;
  return j;
}

nlohmann::json t5_config_json(const UMT5Config& c) {
  // The Hugging Face UMT5EncoderModel spelling, for readers that want it; vdit infers the sizes
  // from the weights.
  return {{"architectures", {"UMT5EncoderModel"}},
          {"model_type", "umt5"},
          {"vocab_size", c.vocab},
          {"d_model", c.dim},
          {"d_kv", c.head_dim()},
          {"d_ff", c.dim_ffn},
          {"num_heads", c.num_heads},
          {"num_layers", c.num_layers},
          {"relative_attention_num_buckets", c.num_buckets},
          {"relative_attention_max_distance", c.max_distance},
          {"layer_norm_epsilon", c.eps},
          {"feed_forward_proj", "gated-gelu"},
          {"pad_token_id", 0},
          {"eos_token_id", 1}};
}

// The module's parameters as f32 entries, named by `rename` (the diffusers / HF spelling of each
// original name, so the files read like any diffusers Wan checkpoint).
std::vector<WriteEntry> parameter_entries(torch::nn::Module& m, const std::function<std::string(const std::string&)>& rename) {
  std::vector<WriteEntry> out;
  for (const auto& p : m.named_parameters())
    out.push_back({rename(p.key()), p.value().detach().to(at::kCPU, at::kFloat).contiguous(), std::nullopt});
  return out;
}

void copy_parameters(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto src = from.named_parameters();
  for (auto& p : to.named_parameters()) p.value().copy_(src[p.key()]);
}

// A loaded optimizer keeps its moments on the device they were saved from; a state resumes on any.
void move_adamw_state(torch::optim::AdamW& optimizer, at::Device device) {
  for (auto& entry : optimizer.state()) {
    auto& st = static_cast<torch::optim::AdamWParamState&>(*entry.second);
    st.exp_avg(st.exp_avg().to(device));
    st.exp_avg_sq(st.exp_avg_sq().to(device));
    if (st.max_exp_avg_sq().defined()) st.max_exp_avg_sq(st.max_exp_avg_sq().to(device));
  }
}

// Where a module's weights live (the CPU for one without parameters).
at::Device module_device(torch::nn::Module& m) {
  const auto params = m.parameters();
  return params.empty() ? at::Device(at::kCPU) : params.front().device();
}

}  // namespace

// ---- config -------------------------------------------------------------------------------------

UMT5Config DemoTrainConfig::default_text_encoder() {
  UMT5Config c;
  c.vocab = 64;
  c.dim = 64;
  c.dim_attn = 64;
  c.dim_ffn = 128;
  c.num_heads = 4;
  c.num_layers = 2;
  c.num_buckets = 32;
  c.max_distance = 128;
  return c;
}

WanVAEConfig DemoTrainConfig::default_vae() {
  WanVAEConfig c;  // z_dim 16 and Wan's published latent statistics
  // Two downsampling stages (4x spatial, 4x temporal); see the README's demo-model section.
  c.dim = 16;
  c.num_res_blocks = 1;
  c.dim_mult = {1, 2, 4};
  c.temporal_downsample = {true, true};
  c.attn_scales = {};
  return c;
}

WanDiTConfig DemoTrainConfig::default_dit() {
  WanDiTConfig c;
  c.dim = 128;
  c.ffn_dim = 512;
  c.freq_dim = 64;
  c.num_heads = 4;
  c.num_layers = 4;
  c.patch_size = {1, 2, 2};
  c.text_dim = 64;
  c.text_len = 16;
  return c;
}

DemoTrainConfig DemoTrainConfig::from_json(const nlohmann::json& j) {
  DemoTrainConfig c;
  if (!j.is_object()) throw InputError("demo training config must be a JSON object");
  auto get = [&](const char* key, auto& field) {
    if (j.contains(key)) {
      try {
        j.at(key).get_to(field);
      } catch (const nlohmann::json::exception&) {
        throw InputError(std::string("demo training config: bad value for '") + key + "'");
      }
    }
  };
  get("width", c.width);
  get("height", c.height);
  get("frames", c.frames);
  get("fps", c.fps);
  get("vocab_size", c.vocab_size);
  get("text_encoder_seed", c.text_encoder_seed);
  if (j.contains("text_encoder")) {
    const auto& t = j.at("text_encoder");
    auto tget = [&](const char* key, std::int64_t& field) {
      if (t.contains(key)) field = t.at(key).get<std::int64_t>();
    };
    tget("dim", c.text_encoder.dim);
    tget("dim_attn", c.text_encoder.dim_attn);
    tget("dim_ffn", c.text_encoder.dim_ffn);
    tget("num_heads", c.text_encoder.num_heads);
    tget("num_layers", c.text_encoder.num_layers);
    tget("num_buckets", c.text_encoder.num_buckets);
    tget("max_distance", c.text_encoder.max_distance);
  }
  if (j.contains("vae")) {
    // Keep Wan's published latent statistics (see fold_latent_stats); they exist for the
    // 16-channel latent only, and another z_dim keeps from_json's neutral ones.
    const WanVAEConfig published;
    c.vae = WanVAEConfig::from_json(j.at("vae"));
    if (c.vae.z_dim == published.z_dim) {
      c.vae.latent_mean = published.latent_mean;
      c.vae.latent_std = published.latent_std;
    }
  }
  if (j.contains("dit")) c.dit = WanDiTConfig::from_json(j.at("dit"));
  c.dit.text_dim = c.text_encoder.dim;  // the DiT reads the encoder's output
  get("vae_batch", c.vae_batch);
  get("vae_lr", c.vae_lr);
  get("vae_kl_weight", c.vae_kl_weight);
  get("vae_foreground_weight", c.vae_foreground_weight);
  get("vae_steps", c.vae_steps);
  get("vae_minutes", c.vae_minutes);
  get("vae_stats_clips", c.vae_stats_clips);
  get("vae_logvar_init", c.vae_logvar_init);
  get("vae_edge_margin", c.vae_edge_margin);
  get("vae_frames", c.vae_frames);
  get("vae_crop", c.vae_crop);
  get("vae_latent_noise", c.vae_latent_noise);
  get("vae_decoder_steps", c.vae_decoder_steps);
  get("vae_decoder_minutes", c.vae_decoder_minutes);
  get("vae_decoder_lr", c.vae_decoder_lr);
  get("vae_decoder_frames", c.vae_decoder_frames);
  get("vae_object_mse_weight", c.vae_object_mse_weight);
  get("vae_colour_weight", c.vae_colour_weight);
  get("vae_gradient_weight", c.vae_gradient_weight);
  get("vae_shape_probe_weight", c.vae_shape_probe_weight);
  get("decoder_generated_clips", c.decoder_generated_clips);
  get("decoder_generated_batch", c.decoder_generated_batch);
  get("decoder_generated_weight", c.decoder_generated_weight);
  get("vae_validate_every", c.vae_validate_every);
  get("vae_validate_clips", c.vae_validate_clips);
  get("dit_batch", c.dit_batch);
  get("dit_lr", c.dit_lr);
  get("dit_warmup", c.dit_warmup);
  get("dit_snapshot_every", c.dit_snapshot_every);
  get("dit_lr_final", c.dit_lr_final);
  get("dit_prediction", c.dit_prediction);
  get("dit_weight_decay", c.dit_weight_decay);
  get("grad_clip", c.grad_clip);
  get("caption_dropout", c.caption_dropout);
  get("flow_shift", c.flow_shift);
  get("ema_decay", c.ema_decay);
  get("pool_size", c.pool_size);
  get("pool_refresh", c.pool_refresh);
  get("dit_object_weight", c.dit_object_weight);
  get("dit_pixel_weight", c.dit_pixel_weight);
  get("dit_pixel_max_sigma", c.dit_pixel_max_sigma);
  get("dit_pixel_samples", c.dit_pixel_samples);
  get("dit_pixel_crop", c.dit_pixel_crop);
  get("dit_steps", c.dit_steps);
  get("dit_minutes", c.dit_minutes);
  if (j.contains("bf16_autocast")) {
    const auto& v = j.at("bf16_autocast");
    if (v.is_boolean()) {
      c.bf16_autocast = v.get<bool>() ? DemoTrainConfig::Bf16Autocast::On : DemoTrainConfig::Bf16Autocast::Off;
    } else if (v.is_string() && v.get<std::string>() == "auto") {
      c.bf16_autocast = DemoTrainConfig::Bf16Autocast::Auto;
    } else {
      throw InputError("demo training config: bad value for 'bf16_autocast' (expected true, false or \"auto\")");
    }
  }
  get("sample_steps", c.sample_steps);
  get("sample_guidance", c.sample_guidance);
  get("sample_shift", c.sample_shift);
  get("checkpoint_minutes", c.checkpoint_minutes);
  get("seed", c.seed);
  c.vae.validate();
  c.dit.validate();
  c.text_encoder.validate();
  if (c.dit.in_dim != c.vae.z_dim || c.dit.out_dim != c.vae.z_dim)
    throw InputError("demo training config: the DiT's in_dim and out_dim (" + std::to_string(c.dit.in_dim) + ", " +
                     std::to_string(c.dit.out_dim) + ") must equal the VAE's z_dim (" + std::to_string(c.vae.z_dim) + ")");
  if (c.frames < 1 || (c.frames - 1) % 4 != 0) throw InputError("demo training config: frames must be 4n+1");
  if (c.width % 16 != 0 || c.height % 16 != 0) throw InputError("demo training config: width and height must be multiples of 16");
  if (c.vae_frames < 0 || c.vae_frames > c.frames || (c.vae_frames > 0 && (c.vae_frames - 1) % 4 != 0))
    throw InputError("demo training config: vae_frames must be 0 or 4n+1 and at most frames");
  if (c.vae_decoder_frames < 0 || c.vae_decoder_frames > c.frames ||
      (c.vae_decoder_frames > 0 && (c.vae_decoder_frames - 1) % 4 != 0))
    throw InputError("demo training config: vae_decoder_frames must be 0 or 4n+1 and at most frames");
  if (!(c.vae_latent_noise >= 0)) throw InputError("demo training config: vae_latent_noise must be >= 0");
  if (c.vae_decoder_steps < 0 || c.vae_decoder_minutes < 0 || !(c.vae_decoder_lr > 0))
    throw InputError("demo training config: vae_decoder_steps and vae_decoder_minutes must be >= 0, vae_decoder_lr > 0");
  if (c.vae_crop < 0 || c.vae_crop % 16 != 0 || c.vae_crop > std::min(c.width, c.height))
    throw InputError("demo training config: vae_crop must be 0 or a multiple of 16 no larger than the frame");
  if (c.vae_batch < 1 || c.dit_batch < 1) throw InputError("demo training config: batch sizes must be >= 1");
  if (c.pool_size < 1) throw InputError("demo training config: pool_size must be >= 1");
  if (c.vae_gradient_weight < 0) throw InputError("demo training config: vae_gradient_weight must be >= 0");
  if (!(c.vae_shape_probe_weight >= 0)) throw InputError("demo training config: vae_shape_probe_weight must be >= 0");
  if (c.decoder_generated_clips < 0 || c.decoder_generated_batch < 0 || !(c.decoder_generated_weight >= 0))
    throw InputError("demo training config: decoder_generated_clips, decoder_generated_batch and decoder_generated_weight must be >= 0");
  if (c.dit_object_weight < 0) throw InputError("demo training config: dit_object_weight must be >= 0");
  if (!(c.dit_pixel_weight >= 0) || !(c.dit_pixel_max_sigma > 0 && c.dit_pixel_max_sigma <= 1) ||
      c.dit_pixel_samples < 0)
    throw InputError("demo training config: dit_pixel_weight must be >= 0, dit_pixel_max_sigma in (0, 1], dit_pixel_samples >= 0");
  if (c.dit_pixel_weight > 0) {
    if (c.dit_pixel_crop < 1 || c.dit_pixel_crop * c.vae.spatial_stride() > std::min(c.width, c.height))
      throw InputError("demo training config: dit_pixel_crop must be >= 1 latent cell and fit in the frame");
  }
  if (c.dit_snapshot_every < 0) throw InputError("demo training config: dit_snapshot_every must be >= 0");
  if (!(c.dit_lr_final > 0 && c.dit_lr_final <= 1)) throw InputError("demo training config: dit_lr_final must be in (0, 1]");
  if (c.dit_prediction != "flow_prediction" && c.dit_prediction != "sample")
    throw InputError("demo training config: dit_prediction must be \"flow_prediction\" or \"sample\"");
  if (!(c.flow_shift > 0) || !(c.sample_shift > 0))
    throw InputError("demo training config: flow_shift and sample_shift must be > 0");
  return c;
}

DemoTrainConfig DemoTrainConfig::from_file(const std::string& path) { return from_json(read_json(path)); }

nlohmann::json DemoTrainConfig::to_json() const {
  nlohmann::json j;
  j["width"] = width;
  j["height"] = height;
  j["frames"] = frames;
  j["fps"] = fps;
  j["vocab_size"] = vocab_size;
  j["text_encoder_seed"] = text_encoder_seed;
  j["text_encoder"] = {{"dim", text_encoder.dim},           {"dim_attn", text_encoder.dim_attn},
                       {"dim_ffn", text_encoder.dim_ffn},   {"num_heads", text_encoder.num_heads},
                       {"num_layers", text_encoder.num_layers}, {"num_buckets", text_encoder.num_buckets},
                       {"max_distance", text_encoder.max_distance}};
  nlohmann::json v = vae_config_json(vae);
  v.erase("_class_name");
  v.erase("latents_mean");
  v.erase("latents_std");
  v.erase("dropout");
  j["vae"] = v;
  nlohmann::json d = dit.to_json();
  d.erase("text_dim");  // always the text encoder's dim
  j["dit"] = d;
  j["vae_batch"] = vae_batch;
  j["vae_lr"] = vae_lr;
  j["vae_kl_weight"] = vae_kl_weight;
  j["vae_foreground_weight"] = vae_foreground_weight;
  j["vae_steps"] = vae_steps;
  j["vae_minutes"] = vae_minutes;
  j["vae_stats_clips"] = vae_stats_clips;
  j["vae_logvar_init"] = vae_logvar_init;
  j["vae_edge_margin"] = vae_edge_margin;
  j["vae_frames"] = vae_frames;
  j["vae_crop"] = vae_crop;
  j["vae_latent_noise"] = vae_latent_noise;
  j["vae_decoder_steps"] = vae_decoder_steps;
  j["vae_decoder_minutes"] = vae_decoder_minutes;
  j["vae_decoder_lr"] = vae_decoder_lr;
  j["vae_decoder_frames"] = vae_decoder_frames;
  j["vae_object_mse_weight"] = vae_object_mse_weight;
  j["vae_colour_weight"] = vae_colour_weight;
  j["vae_gradient_weight"] = vae_gradient_weight;
  j["vae_shape_probe_weight"] = vae_shape_probe_weight;
  j["decoder_generated_clips"] = decoder_generated_clips;
  j["decoder_generated_batch"] = decoder_generated_batch;
  j["decoder_generated_weight"] = decoder_generated_weight;
  j["vae_validate_every"] = vae_validate_every;
  j["vae_validate_clips"] = vae_validate_clips;
  j["dit_batch"] = dit_batch;
  j["dit_lr"] = dit_lr;
  j["dit_warmup"] = dit_warmup;
  j["dit_snapshot_every"] = dit_snapshot_every;
  j["dit_lr_final"] = dit_lr_final;
  j["dit_prediction"] = dit_prediction;
  j["dit_weight_decay"] = dit_weight_decay;
  j["grad_clip"] = grad_clip;
  j["caption_dropout"] = caption_dropout;
  j["flow_shift"] = flow_shift;
  j["ema_decay"] = ema_decay;
  j["pool_size"] = pool_size;
  j["pool_refresh"] = pool_refresh;
  j["dit_object_weight"] = dit_object_weight;
  j["dit_pixel_weight"] = dit_pixel_weight;
  j["dit_pixel_max_sigma"] = dit_pixel_max_sigma;
  j["dit_pixel_samples"] = dit_pixel_samples;
  j["dit_pixel_crop"] = dit_pixel_crop;
  j["dit_steps"] = dit_steps;
  j["dit_minutes"] = dit_minutes;
  if (bf16_autocast == Bf16Autocast::Auto) {
    j["bf16_autocast"] = "auto";
  } else {
    j["bf16_autocast"] = bf16_autocast == Bf16Autocast::On;
  }
  j["sample_steps"] = sample_steps;
  j["sample_guidance"] = sample_guidance;
  j["sample_shift"] = sample_shift;
  j["checkpoint_minutes"] = checkpoint_minutes;
  j["seed"] = seed;
  return j;
}

// ---- tokenizer ----------------------------------------------------------------------------------

std::vector<std::string> caption_corpus() {
  std::vector<std::string> out;
  for (const auto& c : shapes::Caption::all()) out.push_back(c.text());
  return out;
}

std::string train_caption_tokenizer(const std::string& dir, std::int64_t vocab_size) {
  // spm_train (Debian package `sentencepiece`) runs as a child process: the sentencepiece
  // training library is not linked anywhere (the shim only loads models, and linking the trainer
  // beside LibTorch meets the same protobuf clash the shim exists for), and a separate process
  // cannot clash with anything.
  //
  // model_type=word: a unigram model trained on 90 short sentences keeps mostly single
  // characters (measured: "red" -> "re" "d"), which makes captions 25+ tokens; the grammar has 17
  // words, and one piece per word keeps a caption at 6-7 tokens. pad 0, eos 1, unk 2, no bos:
  // umT5's ids. nmt_nfkc_cf folds case so "A Red Circle" tokenizes like the captions.
  fs::create_directories(dir);
  const fs::path corpus = fs::path(dir) / "captions.txt";
  {
    std::ofstream out(corpus);
    for (const auto& line : caption_corpus()) out << line << "\n";
    if (!out) throw RuntimeError("cannot write " + corpus.string());
  }
  const fs::path prefix = fs::path(dir) / "spiece";
  const fs::path log = fs::path(dir) / "spm_train.log";
  std::vector<std::string> args = {"spm_train",
                                   "--input=" + corpus.string(),
                                   "--model_prefix=" + prefix.string(),
                                   "--vocab_size=" + std::to_string(vocab_size),
                                   "--model_type=word",
                                   "--hard_vocab_limit=false",
                                   "--normalization_rule_name=nmt_nfkc_cf",
                                   "--pad_id=0",
                                   "--eos_id=1",
                                   "--unk_id=2",
                                   "--bos_id=-1",
                                   "--num_threads=1"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, "spm_train", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0)
    throw RuntimeError("cannot run spm_train (" + std::string(std::strerror(rc)) +
                       "); install the Debian/Ubuntu package 'sentencepiece'");
  int status = 0;
  if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw RuntimeError("spm_train failed; see " + log.string());
  std::error_code ec;
  fs::remove(corpus, ec);
  fs::remove(fs::path(dir) / "spiece.vocab", ec);
  fs::remove(log, ec);
  return (fs::path(dir) / "spiece.model").string();
}

// ---- VAE ----------------------------------------------------------------------------------------

namespace {
// Training runs the VAE without latent normalisation (statistics are measured afterwards).
WanVAEConfig unnormalised(WanVAEConfig c) {
  c.latent_mean.assign(static_cast<std::size_t>(c.z_dim), 0.f);
  c.latent_std.assign(static_cast<std::size_t>(c.z_dim), 1.f);
  return c;
}

// Pixels of clips [B, 3, F, H, W] that differ from the background: the object, [B, 1, F, H, W] f32.
at::Tensor object_mask(const at::Tensor& video) {
  return ((video - background_pixels().to(video.device())).abs().amax(1, true) > 0.1).to(at::kFloat);
}
}  // namespace

at::Tensor latent_object_cells(const at::Tensor& video, std::int64_t temporal_stride, std::int64_t spatial_stride) {
  if (video.dim() != 5 || video.size(1) != 3) throw InputError("latent object cells: clips must be [B, 3, F, H, W]");
  at::Tensor mask = object_mask(video);  // [B, 1, F, H, W]
  // Repeat frame 0 so that each later latent frame pools exactly its own temporal_stride frames.
  if (temporal_stride > 1) mask = at::cat({mask.narrow(2, 0, 1).expand({-1, -1, temporal_stride - 1, -1, -1}), mask}, 2);
  return at::max_pool3d(mask, {temporal_stride, spatial_stride, spatial_stride}, {temporal_stride, spatial_stride, spatial_stride});
}

at::Tensor latent_object_mask(const at::Tensor& video, std::int64_t temporal_stride, std::int64_t spatial_stride) {
  return at::max_pool3d(latent_object_cells(video, temporal_stride, spatial_stride), {1, 3, 3}, {1, 1, 1}, {0, 1, 1});
}

at::Tensor dit_flow_loss(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask, double object_weight) {
  const at::Tensor err = (pred - target).pow(2);
  if (object_weight == 0) return err.mean();
  const at::Tensor w = (1.0 + object_weight * mask).expand_as(err);
  return (w * err).mean() / w.mean();
}

namespace {

// The weighted mean row and column of each mask [B, H, W] (f32 weights, e.g. 0/1 or counts), and
// (fallback_y, fallback_x) for a mask without weight: two [B] tensors on the mask's device.
std::pair<at::Tensor, at::Tensor> mask_centres(const at::Tensor& mask, double fallback_y, double fallback_x) {
  const std::int64_t h = mask.size(1), w = mask.size(2);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(mask.device());
  const at::Tensor ys = at::arange(h, opts).view({1, h, 1}), xs = at::arange(w, opts).view({1, 1, w});
  const at::Tensor area = mask.sum({1, 2});
  return {((mask * ys).sum({1, 2}) / area.clamp_min(1)).where(area > 0, at::full_like(area, fallback_y)),
          ((mask * xs).sum({1, 2}) / area.clamp_min(1)).where(area > 0, at::full_like(area, fallback_x))};
}

}  // namespace

std::vector<at::Tensor> crop_latents_around_object(const std::vector<at::Tensor>& latents, const at::Tensor& mask,
                                                   std::int64_t crop) {
  if (mask.dim() != 5) throw InputError("crop around object: mask must be [B, 1, F', h, w]");
  const std::int64_t B = mask.size(0), h = mask.size(3), w = mask.size(4);
  if (crop < 1 || crop > h || crop > w) throw InputError("crop around object: crop must be in [1, min(h, w)]");
  // Per clip: the mean row and column of the object's cells over all latent frames.
  const auto [cy, cx] = mask_centres((mask > 0).to(at::kFloat).sum({1, 2}).cpu(), (h - 1) / 2.0, (w - 1) / 2.0);
  std::vector<std::vector<at::Tensor>> parts(latents.size());
  for (std::int64_t b = 0; b < B; ++b) {
    // The window's first cell so that its centre (crop - 1) / 2 lands on the object's centre.
    const std::int64_t y0 = std::clamp<std::int64_t>(std::lround(cy[b].item<float>() - (crop - 1) / 2.0), 0, h - crop);
    const std::int64_t x0 = std::clamp<std::int64_t>(std::lround(cx[b].item<float>() - (crop - 1) / 2.0), 0, w - crop);
    for (std::size_t k = 0; k < latents.size(); ++k)
      parts[k].push_back(latents[k].narrow(0, b, 1).narrow(3, y0, crop).narrow(4, x0, crop));
  }
  std::vector<at::Tensor> out;
  for (auto& p : parts) out.push_back(at::cat(p, 0));
  return out;
}

at::Tensor dit_pixel_loss(WanVAE& vae, const at::Tensor& x0_pred, const at::Tensor& x0) {
  at::Tensor target;
  {
    torch::NoGradGuard no_grad;
    target = vae->decode_unclamped(x0);
  }
  // Both unclamped: the loss is zero exactly when the latents are, and an overshoot past the
  // colour range still has a gradient back.
  const at::Tensor d = vae->decode_unclamped(x0_pred) - target;
  return (d.abs() + 2.0 * d.pow(2)).mean();
}

std::pair<at::Tensor, at::Tensor> sample_prediction_velocities(const at::Tensor& x0_pred, const at::Tensor& x0,
                                                               const at::Tensor& noisy, const at::Tensor& sigma) {
  // The floor keeps the lowest-noise samples from dominating: an x0 error weighs 1 / s^2.
  const at::Tensor s = sigma.clamp_min(kSamplePredictionLossMinSigma);
  return {(noisy - x0_pred) / s, (noisy - x0) / s};
}

at::Tensor vae_training_window(const at::Tensor& video, const DemoTrainConfig& config, std::mt19937_64& rng) {
  at::Tensor out = config.vae_frames > 0 ? video.narrow(2, 0, config.vae_frames) : video;
  const std::int64_t crop = config.vae_crop;
  const std::int64_t h = out.size(3), w = out.size(4);
  if (crop == 0 || (crop >= h && crop >= w)) return out.contiguous();
  // The object's centre in the middle kept frame (the frame centre if it has none).
  const at::Tensor mask = object_mask(out.narrow(2, out.size(2) / 2, 1)).squeeze(2).squeeze(1);  // [B, H, W]
  const auto [cy, cx] = mask_centres(mask, h / 2.0, w / 2.0);
  std::uniform_int_distribution<std::int64_t> jitter(-crop / 4, crop / 4);
  std::vector<at::Tensor> windows;
  for (std::int64_t b = 0; b < out.size(0); ++b) {
    const std::int64_t y0 = std::clamp<std::int64_t>(std::lround(cy[b].item<float>()) - crop / 2 + jitter(rng), 0, h - crop);
    const std::int64_t x0 = std::clamp<std::int64_t>(std::lround(cx[b].item<float>()) - crop / 2 + jitter(rng), 0, w - crop);
    windows.push_back(out[b].narrow(2, y0, crop).narrow(3, x0, crop));
  }
  return at::stack(windows).contiguous();
}

at::Tensor vae_reconstruction_loss(const at::Tensor& recon, const at::Tensor& video, const DemoTrainConfig& config) {
  // The object covers ~2 % of the frame: plain L1 is dominated by the flat background and
  // settles on a dim, smeared object (measured: a fixed 8x foreground weight plateaued at a
  // reconstruction that lost most colours). The object's region and the background's are
  // therefore averaged separately, and the object's mean counts vae_foreground_weight times.
  // The object's region is its mask dilated by vae_edge_margin pixels: with the bare mask, a
  // blurred halo around the object lands in the background's mean, where each pixel weighs ~50x
  // less, and the VAE learned round blobs (measured: shape judged at chance after 1200 steps).
  const at::Tensor object = object_mask(video);
  at::Tensor fg = object;
  if (config.vae_edge_margin > 0) {
    const std::int64_t k = 2 * config.vae_edge_margin + 1;
    fg = at::max_pool3d(fg, {1, k, k}, {1, 1, 1}, {0, config.vae_edge_margin, config.vae_edge_margin});
  }
  const at::Tensor region = fg;  // [B, 1, F, H, W]
  fg = fg.expand_as(video);
  const at::Tensor diff = recon - video;
  const at::Tensor err = diff.abs() + config.vae_object_mse_weight * diff.pow(2);
  const at::Tensor fg_loss = (err * fg).sum() / fg.sum().clamp_min(1.0);
  const at::Tensor bg_loss = (err * (1.0 - fg)).sum() / (1.0 - fg).sum().clamp_min(1.0);
  at::Tensor loss = bg_loss + config.vae_foreground_weight * fg_loss;
  if (config.vae_colour_weight > 0) {
    // Mean colour of the object per clip and frame [B, 3, F]; frames where it is absent count 0.
    const at::Tensor area = object.sum({3, 4});
    const at::Tensor present = (area > 0).to(at::kFloat);
    const at::Tensor mean_error = (diff * object).sum({3, 4}) / area.clamp_min(1.0);
    const at::Tensor colour_loss = (mean_error.abs() * present).sum() / (3.0 * present.sum().clamp_min(1.0));
    loss = loss + config.vae_colour_weight * colour_loss;
  }
  if (config.vae_gradient_weight > 0) {
    // Error of the horizontal and vertical pixel differences inside the object's region. A
    // rounded corner costs only a few pixels of |d|, but it changes the differences along both
    // edges next to it, so this term pulls the decoder towards the square's sharp outline
    // (measured: the round trip of 100 clips judged 14 of 29 squares circle with |d| + 2 d^2 alone).
    // diff(recon - video) along an axis is the difference of the two images' gradients there.
    at::Tensor error_sum = at::zeros({}, diff.options()), count = at::zeros({}, diff.options());
    for (std::int64_t dim : {3, 4}) {
      const std::int64_t n = diff.size(dim);
      if (n < 2) continue;
      const at::Tensor grad_error = diff.narrow(dim, 1, n - 1) - diff.narrow(dim, 0, n - 1);
      const at::Tensor inside = at::maximum(region.narrow(dim, 1, n - 1), region.narrow(dim, 0, n - 1)).expand_as(grad_error);
      error_sum = error_sum + (grad_error.abs() * inside).sum();
      count = count + inside.sum();
    }
    loss = loss + config.vae_gradient_weight * error_sum / count.clamp_min(1.0);
  }
  return loss;
}

VAETrainer::VAETrainer(const DemoTrainConfig& config, std::uint64_t seed, at::Device device)
    : config_(config), device_(device), data_rng_(seed), noise_gen_(at::make_generator<at::CPUGeneratorImpl>(seed + 1)) {
  torch::manual_seed(seed);
  vae_ = WanVAE(unnormalised(config.vae));
  vae_->train();
  {
    torch::NoGradGuard no_grad;
    const std::int64_t z = config.vae.z_dim;
    vae_->named_parameters()["conv1.bias"].narrow(0, z, z).fill_(config.vae_logvar_init);
  }
  vae_->to(device_);
  trained_ = vae_->parameters();
  if (config.vae_shape_probe_weight > 0) {
    // Drawn after the VAE's own initialisation, so the VAE starts as it does without a probe.
    probe_weight_ = (0.01 * torch::randn({shapes::kShapes, config.vae.z_dim})).to(device_).set_requires_grad(true);
    probe_bias_ = torch::zeros({shapes::kShapes}, at::device(device_)).set_requires_grad(true);
    trained_.push_back(probe_weight_);
    trained_.push_back(probe_bias_);
  }
  optimizer_ = std::make_unique<torch::optim::AdamW>(
      trained_, torch::optim::AdamWOptions(config.vae_lr).betas({0.9, 0.99}).weight_decay(0.0));
}

void VAETrainer::start_decoder_phase() {
  if (decoder_phase_) return;
  decoder_phase_ = true;
  trained_.clear();
  for (auto& item : vae_->named_parameters()) {
    const bool frozen = item.key().rfind("encoder.", 0) == 0 || item.key().rfind("conv1.", 0) == 0;
    item.value().set_requires_grad(!frozen);
    if (!frozen) trained_.push_back(item.value());
  }
  optimizer_ = std::make_unique<torch::optim::AdamW>(
      trained_, torch::optim::AdamWOptions(config_.vae_decoder_lr).betas({0.9, 0.99}).weight_decay(0.0));
  step_ = 0;
}

VAEStepResult VAETrainer::step(double lr_scale) {
  set_lr(*optimizer_, (decoder_phase_ ? config_.vae_decoder_lr : config_.vae_lr) * lr_scale);
  auto batch = shapes::random_batch(config_.vae_batch, config_.frames, config_.width, config_.height, data_rng_);
  DemoTrainConfig window = config_;
  if (decoder_phase_) window.vae_frames = config_.vae_decoder_frames;
  const at::Tensor video = vae_training_window(batch.video, window, data_rng_).to(device_);
  at::Tensor mu, logvar;
  {
    // The frozen encoder needs no graph: the decoder phase's backward stops at the latent.
    c10::AutoGradMode encoder_grad(!decoder_phase_);
    std::tie(mu, logvar) = vae_->encode_moments(video);
  }
  logvar = logvar.clamp(-30.0, 20.0);
  // Drawn on the CPU generator and copied: the same draws on every device.
  const at::Tensor eps = at::randn(mu.sizes(), noise_gen_, at::kFloat).to(device_);
  at::Tensor z = mu + at::exp(0.5 * logvar) * eps;
  if (config_.vae_latent_noise > 0) {
    const at::Tensor spread = mu.detach().std({0, 2, 3, 4}, /*unbiased=*/false, /*keepdim=*/true);
    z = z + config_.vae_latent_noise * spread * at::randn(mu.sizes(), noise_gen_, at::kFloat).to(device_);
  }
  const at::Tensor recon = vae_->decode_unclamped(z);
  at::Tensor recon_loss = vae_reconstruction_loss(recon, video, config_);
  if (decoder_phase_ && generated_latents_.defined() && config_.decoder_generated_batch > 0) {
    // The DiT's own latents, decoded towards the clips their captions ask for.
    std::uniform_int_distribution<std::int64_t> pick(0, generated_latents_.size(0) - 1);
    std::vector<std::int64_t> chosen;
    for (std::int64_t k = 0; k < config_.decoder_generated_batch; ++k) chosen.push_back(pick(data_rng_));
    // The same vae_crop window as the rendered clips (around the object in the middle frame, at a
    // random offset), cut on the latent grid: the decoder is convolutional, and whole 64x64 clips
    // made a step four times slower.
    const std::int64_t stride = vae_->config().spatial_stride();
    const std::int64_t lh = generated_latents_.size(3), lw = generated_latents_.size(4);
    const std::int64_t crop = config_.vae_crop / stride;
    std::vector<at::Tensor> latents, targets;
    for (const std::int64_t i : chosen) {
      at::Tensor latent = generated_latents_[i], target = generated_targets_[i];
      if (crop > 0 && (crop < lh || crop < lw)) {
        const auto [cy, cx] = generated_centres_[static_cast<std::size_t>(i)];
        std::uniform_int_distribution<std::int64_t> jitter(-crop / 4, crop / 4);
        const std::int64_t y0 = std::clamp<std::int64_t>(std::lround(cy / stride) - crop / 2 + jitter(data_rng_), 0, std::max<std::int64_t>(0, lh - crop));
        const std::int64_t x0 = std::clamp<std::int64_t>(std::lround(cx / stride) - crop / 2 + jitter(data_rng_), 0, std::max<std::int64_t>(0, lw - crop));
        const std::int64_t ch = std::min(crop, lh), cw = std::min(crop, lw);
        latent = latent.narrow(2, y0, ch).narrow(3, x0, cw);
        target = target.narrow(2, y0 * stride, ch * stride).narrow(3, x0 * stride, cw * stride);
      }
      latents.push_back(latent);
      targets.push_back(target);
    }
    const at::Tensor generated = vae_->decode_unclamped(at::stack(latents).contiguous());
    recon_loss = recon_loss + config_.decoder_generated_weight *
                                  vae_reconstruction_loss(generated, at::stack(targets).contiguous(), config_);
  }
  const at::Tensor kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean();
  // The KL term has no gradient in the decoder phase (the encoder is frozen); it is still reported.
  at::Tensor loss = decoder_phase_ ? recon_loss : recon_loss + config_.vae_kl_weight * kl;
  double probe_accuracy = -1;
  if (!decoder_phase_ && probe_weight_.defined()) {
    // Cross-entropy of the clip's shape, read linearly from every cell that holds the object.
    const at::Tensor cells = latent_object_cells(video, vae_->config().temporal_stride(), vae_->config().spatial_stride())
                                 .squeeze(1);  // [B, F', h, w]
    std::vector<std::int64_t> shape_ids;
    for (const auto& c : batch.captions) shape_ids.push_back(static_cast<std::int64_t>(c.shape));
    const at::Tensor labels = at::tensor(shape_ids, at::kLong).to(device_).view({-1, 1, 1, 1}).expand_as(cells);
    const std::int64_t z = mu.size(1);
    const at::Tensor logits =
        at::conv3d(mu, probe_weight_.view({shapes::kShapes, z, 1, 1, 1}), probe_bias_);  // [B, 3, F', h, w]
    const at::Tensor nll = -at::log_softmax(logits, 1).gather(1, labels.unsqueeze(1)).squeeze(1);
    const at::Tensor count = cells.sum().clamp_min(1.0);
    loss = loss + config_.vae_shape_probe_weight * (nll * cells).sum() / count;
    probe_accuracy = ((logits.argmax(1) == labels).to(at::kFloat) * cells).sum().item<double>() / count.item<double>();
  }
  optimizer_->zero_grad();
  loss.backward();
  if (config_.grad_clip > 0) torch::nn::utils::clip_grad_norm_(trained_, config_.grad_clip);
  optimizer_->step();
  ++step_;
  VAEStepResult r;
  r.loss = loss.item<double>();
  r.recon = (recon.detach() - video).abs().mean().item<double>();
  r.kl = kl.item<double>();
  r.probe_accuracy = probe_accuracy;
  return r;
}

void VAETrainer::save_state(const std::string& path) const {
  torch::serialize::OutputArchive ar, model, optim;
  vae_->save(model);
  optimizer_->save(optim);
  ar.write("model", model);
  ar.write("optim", optim);
  ar.write("step", at::tensor(step_));
  ar.write("decoder_phase", at::tensor(static_cast<std::int64_t>(decoder_phase_)));
  if (probe_weight_.defined()) {
    ar.write("probe_weight", probe_weight_.detach());
    ar.write("probe_bias", probe_bias_.detach());
  }
  write_rng(ar, data_rng_, noise_gen_);
  save_archive(ar, path);
}

void VAETrainer::load_state(const std::string& path) {
  torch::serialize::InputArchive ar, model, optim;
  ar.load_from(path);
  // States written before the decoder phase existed have no flag: they are first-phase states.
  at::Tensor flag;
  const bool saved_decoder_phase = ar.try_read("decoder_phase", flag) && flag.item<std::int64_t>() != 0;
  if (saved_decoder_phase != decoder_phase_)
    throw InputError(path + ": a " + (saved_decoder_phase ? "decoder-phase" : "first-phase") +
                     " VAE training state cannot resume the " + (decoder_phase_ ? "decoder phase" : "first phase"));
  ar.read("model", model);
  ar.read("optim", optim);
  vae_->load(model);
  vae_->to(device_);
  if (probe_weight_.defined() && !decoder_phase_) {
    at::Tensor w, b;
    if (!ar.try_read("probe_weight", w) || !ar.try_read("probe_bias", b))
      throw InputError(path + ": the state has no shape probe, but vae_shape_probe_weight is set");
    torch::NoGradGuard no_grad;
    probe_weight_.copy_(w);
    probe_bias_.copy_(b);
  }
  optimizer_->load(optim);
  move_adamw_state(*optimizer_, device_);
  step_ = read_int(ar, "step");
  read_rng(ar, data_rng_, noise_gen_);
}

void VAETrainer::load_weights(const std::string& path) {
  torch::serialize::InputArchive ar, model;
  ar.load_from(path);
  ar.read("model", model);
  vae_->load(model);
  vae_->to(device_);
}

void VAETrainer::load_finished_vae(WanVAE& finished, const std::string& source) {
  const WanVAEConfig& found = finished->config();
  const WanVAEConfig& want = config_.vae;
  if (found.dim != want.dim || found.z_dim != want.z_dim || found.dim_mult != want.dim_mult ||
      found.num_res_blocks != want.num_res_blocks || found.temporal_downsample != want.temporal_downsample)
    throw InputError(source + ": its VAE architecture differs from the training config's vae section");
  copy_parameters(*finished, *vae_);
}

std::optional<shapes::ClipLayout> layout_from_pixels(const at::Tensor& video, const shapes::Caption& caption) {
  if (video.dim() != 4 || video.size(0) != 3) throw InputError("layout_from_pixels: a clip must be [3, F, H, W]");
  const std::int64_t frames = video.size(1), height = video.size(2), width = video.size(3);
  // The judge's foreground (farther than 0.25 from the background in [0, 1] units, 0.5 in [-1, 1])
  // finds the object's box; inside it (grown by a pixel) each pixel's coverage is its colour's
  // share of the way from the background to the caption's colour. Every shape's widest row or
  // column spans its size, so the column profile (most coverage per column) sums to the size and
  // the profiles' weighted means give the centre: anti-aliased edges count by their coverage,
  // where a bounding box of thresholded pixels was measured up to 1.3 px too wide on rendered clips.
  const at::Tensor clip = video.to(at::kFloat).to(at::kCPU);
  const at::Tensor background = background_pixels().view({3, 1, 1, 1});
  const shapes::RGB& rgb = shapes::kPalette[static_cast<int>(caption.colour)];
  const at::Tensor colour =
      at::tensor({2 * rgb[0] - 1, 2 * rgb[1] - 1, 2 * rgb[2] - 1}).view({3, 1, 1, 1}) - background;
  const at::Tensor offset = clip - background;
  const at::Tensor mask = offset.pow(2).sum(0).gt(0.25);                                       // [F, H, W]
  const at::Tensor coverage = ((offset * colour).sum(0) / colour.pow(2).sum()).clamp(0.0, 1.0);  // [F, H, W]
  std::vector<double> cx(frames), cy(frames), side(frames);
  for (std::int64_t f = 0; f < frames; ++f) {
    const at::Tensor ys = mask[f].any(1).nonzero(), xs = mask[f].any(0).nonzero();
    if (ys.numel() == 0) return std::nullopt;
    const std::int64_t y0 = std::max<std::int64_t>(0, ys.min().item<std::int64_t>() - 1);
    const std::int64_t y1 = std::min<std::int64_t>(height, ys.max().item<std::int64_t>() + 2);
    const std::int64_t x0 = std::max<std::int64_t>(0, xs.min().item<std::int64_t>() - 1);
    const std::int64_t x1 = std::min<std::int64_t>(width, xs.max().item<std::int64_t>() + 2);
    const at::Tensor box = coverage[f].narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0);
    const at::Tensor columns = box.amax(0), rows = box.amax(1);
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    const double column_sum = columns.sum().item<double>(), row_sum = rows.sum().item<double>();
    if (!(column_sum > 0) || !(row_sum > 0)) return std::nullopt;
    cx[f] = ((at::arange(x1 - x0, opts) + (x0 + 0.5)) * columns).sum().item<double>() / column_sum;
    cy[f] = ((at::arange(y1 - y0, opts) + (y0 + 0.5)) * rows).sum().item<double>() / row_sum;
    // A triangle's base corners are too sharp for any column to be covered fully near them: its
    // size comes from its area (size^2 / 2) instead.
    side[f] = caption.shape == shapes::Shape::Triangle ? std::sqrt(2.0 * box.sum().item<double>()) : column_sum;
  }
  std::vector<double> sorted = side;
  std::nth_element(sorted.begin(), sorted.begin() + frames / 2, sorted.end());
  const double nominal = shapes::nominal_object_size(width, height);
  shapes::ClipLayout layout;
  layout.size = static_cast<float>(std::clamp(sorted[frames / 2], 0.85 * nominal, 1.15 * nominal));
  // Least squares c(t) = c0 + d t over t = f / (F - 1); a still caption keeps its mean place.
  const bool still = caption.motion == shapes::Motion::Still || frames < 2;
  auto fit = [&](const std::vector<double>& c, float& start, float& delta) {
    double mean_t = 0, mean_c = 0;
    for (std::int64_t f = 0; f < frames; ++f) {
      mean_t += frames > 1 ? static_cast<double>(f) / (frames - 1) : 0.0;
      mean_c += c[f];
    }
    mean_t /= frames;
    mean_c /= frames;
    double cov = 0, var = 0;
    for (std::int64_t f = 0; f < frames && !still; ++f) {
      const double t = static_cast<double>(f) / (frames - 1) - mean_t;
      cov += t * (c[f] - mean_c);
      var += t * t;
    }
    const double d = still || var == 0 ? 0.0 : cov / var;
    delta = static_cast<float>(d);
    start = static_cast<float>(mean_c - d * mean_t);
  };
  fit(cx, layout.x0, layout.dx);
  fit(cy, layout.y0, layout.dy);
  return layout;
}

GeneratedDecoderPairs generate_decoder_pairs(const std::string& model_dir, const DemoTrainConfig& config,
                                             std::int64_t clips, std::uint64_t seed,
                                             const std::function<void(std::int64_t, std::int64_t)>& on_clip) {
  torch::NoGradGuard no_grad;
  WanT2VOptions options;  // CPU, f32: what `vdit generate` and `vdit eval shapes` run here
  WanT2VPipeline pipeline(locate_wan_model(model_dir), options);
  T2VSettings settings;
  settings.width = config.width;
  settings.height = config.height;
  settings.frames = config.frames;
  settings.steps = static_cast<int>(config.sample_steps);
  settings.guidance = config.sample_guidance;
  settings.shift = config.sample_shift;
  pipeline.validate(settings);
  // Every caption once, and "" (the unconditional caption the DiT was trained with).
  std::vector<std::string> prompts;
  for (const auto& c : shapes::Caption::all()) prompts.push_back(c.text());
  prompts.push_back("");
  const std::vector<at::Tensor> encoded = pipeline.encode_prompts(prompts);
  std::map<std::string, at::Tensor> contexts;
  for (std::size_t k = 0; k + 1 < prompts.size(); ++k) contexts[prompts[k]] = encoded[k];
  const at::Tensor null_context = encoded.back();
  const bool guided = settings.guidance != 1.0;

  std::mt19937_64 caption_rng(seed);
  std::vector<at::Tensor> latents, targets;
  GeneratedDecoderPairs pairs;
  const auto shape = t2v_latent_shape(settings, pipeline.latent_geometry());
  for (std::int64_t i = 0; i < clips; ++i) {
    const shapes::Caption caption = shapes::random_caption(caption_rng);
    const at::Tensor& context = contexts.at(caption.text());
    const at::Tensor latent = pipeline.denoise(seeded_noise(shape, seed + static_cast<std::uint64_t>(i)), context,
                                               guided ? null_context : context, settings);
    const at::Tensor video = pipeline.decode(latent);
    const shapes::Judgement judged = shapes::judge_clip(video);
    const std::optional<shapes::ClipLayout> layout =
        judged.ok && judged.objects == 1 ? layout_from_pixels(video, caption) : std::nullopt;
    if (layout) {
      latents.push_back(latent.to(at::kFloat).contiguous());
      targets.push_back(shapes::render_clip(caption, *layout, config.frames, config.width, config.height));
    } else {
      ++pairs.skipped;
    }
    if (on_clip) on_clip(i + 1, clips);
  }
  if (latents.empty()) throw RuntimeError("decoder pairs: none of the " + std::to_string(clips) + " generated clips showed one object");
  pairs.latents = at::stack(latents);
  pairs.targets = at::stack(targets);
  return pairs;
}

void VAETrainer::set_generated_pairs(const GeneratedDecoderPairs& pairs) {
  if (!pairs.latents.defined() || pairs.latents.size(0) != pairs.targets.size(0) || pairs.latents.size(0) == 0)
    throw InputError("decoder pairs: latents and targets must be non-empty and of the same count");
  generated_latents_ = pairs.latents.to(device_);
  generated_targets_ = pairs.targets.to(device_);
  // The crop centres, once: bounding-box centre of the object in each target's middle frame (the
  // frame centre where it has none).
  generated_centres_.clear();
  const at::Tensor middle =
      object_mask(pairs.targets.narrow(2, pairs.targets.size(2) / 2, 1)).squeeze(2).squeeze(1);  // [N, H, W]
  for (std::int64_t i = 0; i < middle.size(0); ++i) {
    const at::Tensor ys = middle[i].any(1).nonzero(), xs = middle[i].any(0).nonzero();
    const double cy = ys.numel() ? 0.5 * (ys.min().item<std::int64_t>() + ys.max().item<std::int64_t>() + 1) : 0.5 * middle.size(1);
    const double cx = xs.numel() ? 0.5 * (xs.min().item<std::int64_t>() + xs.max().item<std::int64_t>() + 1) : 0.5 * middle.size(2);
    generated_centres_.emplace_back(cy, cx);
  }
}

shapes::JudgeSummary judge_round_trip(WanVAE& vae, const DemoTrainConfig& config, std::int64_t clips, std::uint64_t seed) {
  torch::NoGradGuard no_grad;
  std::mt19937_64 rng(seed);
  const at::Device device = module_device(*vae);
  shapes::JudgeSummary summary;
  for (std::int64_t done = 0; done < clips;) {
    const std::int64_t n = std::min<std::int64_t>(8, clips - done);
    // Stratified by colour (clip i has palette colour i mod 6): every check shows every colour,
    // which a 30-clip random draw does not.
    auto batch = shapes::random_batch(n, config.frames, config.width, config.height, rng,
                                      static_cast<int>(done % shapes::kColours));
    const at::Tensor mu = vae->encode_moments(batch.video.to(device)).first;
    const at::Tensor decoded = vae->decode_unclamped(mu).clamp(-1.0, 1.0).to(at::kCPU);
    for (std::int64_t i = 0; i < n; ++i) summary.add(batch.captions[i], shapes::judge_clip(decoded[i]));
    done += n;
  }
  return summary;
}

std::pair<std::vector<float>, std::vector<float>> measure_latent_stats(WanVAE& vae, const DemoTrainConfig& config,
                                                                      std::int64_t clips, std::uint64_t seed) {
  torch::NoGradGuard no_grad;
  std::mt19937_64 rng(seed);
  const std::int64_t z = vae->config().z_dim;
  const at::Device device = module_device(*vae);
  at::Tensor sum = at::zeros({z}, at::kDouble), sumsq = at::zeros({z}, at::kDouble);
  std::int64_t count = 0;
  for (std::int64_t done = 0; done < clips;) {
    const std::int64_t n = std::min<std::int64_t>(16, clips - done);
    auto batch = shapes::random_batch(n, config.frames, config.width, config.height, rng);
    const at::Tensor mu = vae->encode_moments(batch.video.to(device)).first.to(at::kCPU, at::kDouble);
    sum += mu.sum({0, 2, 3, 4});
    sumsq += mu.pow(2).sum({0, 2, 3, 4});
    count += mu.numel() / z;
    done += n;
  }
  const at::Tensor mean = sum / static_cast<double>(count);
  const at::Tensor var = (sumsq / static_cast<double>(count) - mean.pow(2)).clamp_min(1e-12);
  const at::Tensor mf = mean.to(at::kFloat).contiguous(), sf = var.sqrt().to(at::kFloat).contiguous();
  return {std::vector<float>(mf.data_ptr<float>(), mf.data_ptr<float>() + z),
          std::vector<float>(sf.data_ptr<float>(), sf.data_ptr<float>() + z)};
}

void fold_latent_stats(WanVAE& vae, const std::vector<float>& mean, const std::vector<float>& std) {
  const auto& cfg = vae->config();
  const std::int64_t z = cfg.z_dim;
  if (static_cast<std::int64_t>(mean.size()) != z || static_cast<std::int64_t>(std.size()) != z)
    throw InputError("fold_latent_stats: statistics need z_dim entries");
  torch::NoGradGuard no_grad;
  auto params = vae->named_parameters();
  at::Tensor w1 = params["conv1.weight"], b1 = params["conv1.bias"];  // [2z, 2z, 1,1,1], [2z]
  at::Tensor w2 = params["conv2.weight"], b2 = params["conv2.bias"];  // [z, z, 1,1,1], [z]
  const at::Tensor m = at::tensor(mean).to(at::kDouble), s = at::tensor(std).to(at::kDouble);
  const at::Tensor M = at::tensor(cfg.latent_mean).to(at::kDouble), S = at::tensor(cfg.latent_std).to(at::kDouble);
  const at::Tensor ratio = S / s;  // new raw mu = M + (S/s) (mu - m)
  // Encoder side: scale and shift the mu rows; the log-variance rows move by 2 log(S/s) so the
  // posterior keeps its width relative to the mean.
  at::Tensor w1d = w1.to(at::kDouble), b1d = b1.to(at::kDouble);
  w1d.narrow(0, 0, z).mul_(ratio.view({z, 1, 1, 1, 1}));
  b1d.narrow(0, 0, z).sub_(m).mul_(ratio).add_(M);
  b1d.narrow(0, z, z).add_(2.0 * ratio.log());
  // Decoder side: conv2 receives the new raw mu; mu = m + (s/S)(mu' - M).
  at::Tensor w2d = w2.to(at::kDouble), b2d = b2.to(at::kDouble);
  const at::Tensor w2flat = w2d.view({z, z});
  const at::Tensor shift = at::mv(w2flat, m - M / ratio);
  b2d.add_(shift);
  w2d.mul_((1.0 / ratio).view({1, z, 1, 1, 1}));
  w1.copy_(w1d);
  b1.copy_(b1d);
  w2.copy_(w2d);
  b2.copy_(b2d);
}

// ---- text encoder -------------------------------------------------------------------------------

UMT5Encoder make_text_encoder(const DemoTrainConfig& config, std::int64_t vocab) {
  UMT5Config c = config.text_encoder;
  c.vocab = vocab;
  torch::manual_seed(config.text_encoder_seed);
  UMT5Encoder model(c, at::TensorOptions().dtype(at::kFloat), /*random_init=*/true);
  model->eval();
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  return model;
}

// ---- DiT ----------------------------------------------------------------------------------------

double cosine_decay(double done, double final_fraction) {
  return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + std::cos(M_PI * std::clamp(done, 0.0, 1.0)));
}

bool cpu_bf16_gemm_is_faster() {
  static const bool faster = [] {
    // The FFN's first GEMM at a 1024-token slice: [1024, 128] x [128, 512]. Best of 3 after a
    // warm-up, so one-off costs (oneDNN's kernel generation) do not count.
    auto best_seconds = [](at::ScalarType dtype) {
      const at::Tensor a = at::randn({1024, 128}).to(dtype), b = at::randn({128, 512}).to(dtype);
      at::mm(a, b);
      double best = 1e30;
      for (int r = 0; r < 3; ++r) {
        const auto t0 = Clock::now();
        at::mm(a, b);
        best = std::min(best, seconds_since(t0));
      }
      return best;
    };
    const double f32 = best_seconds(at::kFloat), bf16 = best_seconds(at::kBFloat16);
    const double gflop = 2.0 * 1024 * 128 * 512 / 1e9;
    log_info("bf16 autocast " + std::string(bf16 < f32 ? "on" : "off") + ": bf16 GEMM " + fmt(gflop / bf16) +
             " GFLOP/s, f32 " + fmt(gflop / f32) + " GFLOP/s on this CPU");
    return bf16 < f32;
  }();
  return faster;
}

DiTTrainer::DiTTrainer(const DemoTrainConfig& config, WanVAE vae, std::vector<at::Tensor> contexts,
                       at::Tensor null_context, std::uint64_t seed, at::Device device)
    : config_(config),
      device_(device),
      vae_(std::move(vae)),
      contexts_(std::move(contexts)),
      null_context_(std::move(null_context)),
      data_rng_(seed),
      noise_gen_(at::make_generator<at::CPUGeneratorImpl>(seed + 1)) {
  if (contexts_.size() != shapes::Caption::all().size())
    throw InputError("DiT trainer: need one text context per caption");
  for (const auto& c : contexts_)
    if (c.size(0) > config_.dit.text_len)
      throw InputError("DiT trainer: a caption has " + std::to_string(c.size(0)) + " tokens, more than text_len " +
                       std::to_string(config_.dit.text_len));
  vae_->eval();
  for (auto& p : vae_->parameters()) p.set_requires_grad(false);
  vae_->to(device_);
  for (auto& c : contexts_) c = c.to(device_);
  null_context_ = null_context_.to(device_);
  // Autocast calls LibTorch's bf16 GEMMs directly, so "auto" also refuses a CPU where they would
  // sum in bf16 (common.h: cpu_gemm_needs_widening); "on" is obeyed with a warning there.
  const bool bf16_sums_in_f32 = !cpu_gemm_needs_widening(at::kBFloat16);
  // CPU autocast only: on a GPU the DiT trains in f32 (CUDA autocast is not wired up; at the
  // demo's sizes an H200 already ran 16.6 f32 steps/s at batch 128).
  bf16_autocast_ = device_.is_cpu() &&
                   (config_.bf16_autocast == DemoTrainConfig::Bf16Autocast::On ||
                    (config_.bf16_autocast == DemoTrainConfig::Bf16Autocast::Auto && bf16_sums_in_f32 &&
                     cpu_bf16_gemm_is_faster()));
  if (bf16_autocast_ && !bf16_sums_in_f32)
    log_warning("dit: bf16 autocast on a CPU where LibTorch's bf16 GEMM sums in bf16: gradients lose most digits");
  torch::manual_seed(seed);
  dit_ = WanDiT(config_.dit);
  dit_->reset_parameters();
  dit_->train();
  // f32 RoPE while training (see WanDiTImpl::rope_dtype); the exported weights are dtype-free.
  dit_->rope_dtype = at::kFloat;
  ema_ = WanDiT(config_.dit);
  copy_parameters(*dit_, *ema_);
  dit_->to(device_);
  ema_->to(device_);
  ema_->eval();
  for (auto& p : ema_->parameters()) p.set_requires_grad(false);
  optimizer_ = std::make_unique<torch::optim::AdamW>(
      dit_->parameters(),
      torch::optim::AdamWOptions(config_.dit_lr).betas({0.9, 0.99}).weight_decay(config_.dit_weight_decay));
}

void DiTTrainer::refresh(std::int64_t count) {
  torch::NoGradGuard no_grad;
  const std::int64_t n = pool_.size(0);
  for (std::int64_t done = 0; done < count;) {
    const std::int64_t k = std::min<std::int64_t>({16, count - done, n - pool_cursor_});
    auto batch = shapes::random_batch(k, config_.frames, config_.width, config_.height, data_rng_);
    const at::Tensor video = batch.video.to(device_);
    pool_.narrow(0, pool_cursor_, k).copy_(vae_->encode(video));
    pool_mask_.narrow(0, pool_cursor_, k)
        .copy_(latent_object_mask(video, vae_->config().temporal_stride(), vae_->config().spatial_stride()));
    for (std::int64_t i = 0; i < k; ++i) pool_caption_[pool_cursor_ + i] = caption_index(batch.captions[i]);
    pool_cursor_ = (pool_cursor_ + k) % n;
    done += k;
  }
}

void DiTTrainer::fill_pool(const std::function<void(std::int64_t, std::int64_t)>& progress) {
  if (pool_.defined()) return;
  const std::int64_t n = config_.pool_size;
  const std::int64_t f = (config_.frames - 1) / vae_->config().temporal_stride() + 1;
  const std::int64_t s = vae_->config().spatial_stride();
  pool_ = at::zeros({n, vae_->config().z_dim, f, config_.height / s, config_.width / s}, at::device(device_));
  pool_mask_ = at::zeros({n, 1, f, config_.height / s, config_.width / s}, at::device(device_).dtype(at::kByte));
  pool_caption_.assign(static_cast<std::size_t>(n), 0);
  pool_cursor_ = 0;
  for (std::int64_t done = 0; done < n;) {
    const std::int64_t k = std::min<std::int64_t>(64, n - done);
    refresh(k);
    done += k;
    if (progress) progress(done, n);
  }
}

at::Tensor DiTTrainer::contexts_for(const std::vector<std::int64_t>& caption_index, const std::vector<bool>& dropped) const {
  std::vector<at::Tensor> rows;
  for (std::size_t i = 0; i < caption_index.size(); ++i) {
    const at::Tensor& c = dropped[i] ? null_context_ : contexts_[static_cast<std::size_t>(caption_index[i])];
    // Zero rows up to text_len, exactly what WanDiT::encode_text does to the pipeline's context.
    rows.push_back(at::constant_pad_nd(c, {0, 0, 0, config_.dit.text_len - c.size(0)}, 0.0));
  }
  return at::stack(rows);
}

DiTStepResult DiTTrainer::step(double lr_scale) {
  if (!pool_.defined()) fill_pool();
  const std::int64_t B = config_.dit_batch, n = pool_.size(0);
  std::uniform_int_distribution<std::int64_t> pick(0, n - 1);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  std::vector<std::int64_t> idx(B), cap(B);
  std::vector<bool> dropped(B);
  for (std::int64_t i = 0; i < B; ++i) {
    idx[i] = pick(data_rng_);
    cap[i] = pool_caption_[idx[i]];
    dropped[i] = coin(data_rng_) < config_.caption_dropout;
  }
  const at::Tensor index = at::tensor(idx).to(device_);
  const at::Tensor x0 = pool_.index_select(0, index);
  // Drawn on the CPU generator and copied: the same draws on every device.
  const at::Tensor eps = at::randn(x0.sizes(), noise_gen_, at::kFloat).to(device_);
  // sigma = shift*u / (1 + (shift-1) u), u uniform: the density of the sampler's shifted schedule
  // at inference, so training effort goes where sampling spends its steps (high noise).
  const at::Tensor u = at::rand({B}, noise_gen_, at::kFloat).to(device_);
  const at::Tensor sigma = config_.flow_shift * u / (1.0 + (config_.flow_shift - 1.0) * u);
  const at::Tensor sv = sigma.view({B, 1, 1, 1, 1});
  const at::Tensor xt = (1.0 - sv) * x0 + sv * eps;
  const at::Tensor target = eps - x0;
  const at::Tensor t = sigma * 1000.0;
  const at::Tensor ctx = contexts_for(cap, dropped);

  // Linear warm-up, then the stage's schedule (constant in the shipped recipe: the EMA does the
  // late-training smoothing).
  const double lr = config_.dit_lr * lr_scale *
                    std::min(1.0, static_cast<double>(step_ + 1) / std::max<std::int64_t>(1, config_.dit_warmup));
  set_lr(*optimizer_, lr);
  at::Tensor pred;
  {
    AutocastScope autocast(bf16_autocast_);
    WanTextCondition cond = dit_->encode_text(ctx);
    pred = dit_->forward(xt, t, cond);
  }
  at::Tensor velocity = pred.to(at::kFloat), velocity_target = target;
  if (config_.dit_prediction == "sample") std::tie(velocity, velocity_target) = sample_prediction_velocities(velocity, x0, xt, sv);
  const at::Tensor mask = pool_mask_.index_select(0, index);
  at::Tensor loss = dit_flow_loss(velocity, velocity_target, mask.to(at::kFloat), config_.dit_object_weight);
  double pixel_loss = 0;
  if (config_.dit_pixel_weight > 0 && config_.dit_pixel_samples > 0) {
    // The first dit_pixel_samples clips below the sigma bound (the batch is already random).
    const at::Tensor sigma_cpu = sigma.cpu();
    std::vector<std::int64_t> chosen;
    for (std::int64_t i = 0; i < B && static_cast<std::int64_t>(chosen.size()) < config_.dit_pixel_samples; ++i)
      if (sigma_cpu[i].item<float>() < config_.dit_pixel_max_sigma) chosen.push_back(i);
    if (!chosen.empty()) {
      const at::Tensor sel = at::tensor(chosen).to(device_);
      // x0^ = x_sigma - sigma v^ (for a sample-predicting DiT, its output).
      const at::Tensor x0_pred = config_.dit_prediction == "sample"
                                     ? pred.to(at::kFloat).index_select(0, sel)
                                     : xt.index_select(0, sel) - sv.index_select(0, sel) * velocity.index_select(0, sel);
      const auto crops = crop_latents_around_object({x0_pred, x0.index_select(0, sel)}, mask.index_select(0, sel),
                                                    config_.dit_pixel_crop);
      const at::Tensor pixel = dit_pixel_loss(vae_, crops[0], crops[1]);
      loss = loss + config_.dit_pixel_weight * pixel;
      pixel_loss = pixel.item<double>();
    }
  }
  optimizer_->zero_grad();
  loss.backward();
  if (config_.grad_clip > 0) torch::nn::utils::clip_grad_norm_(dit_->parameters(), config_.grad_clip);
  optimizer_->step();
  ++step_;
  {
    // EMA with the usual warm-up (short runs are not dominated by the random initialisation).
    torch::NoGradGuard no_grad;
    const double d = std::min(config_.ema_decay, (1.0 + step_) / (10.0 + step_));
    auto live = dit_->named_parameters();
    for (auto& p : ema_->named_parameters()) p.value().mul_(d).add_(live[p.key()].detach(), 1.0 - d);
  }
  if (config_.pool_refresh > 0) refresh(config_.pool_refresh);
  return {loss.item<double>(), pixel_loss};
}

void DiTTrainer::load_finished_dit(WanDiT& finished, const std::string& source) {
  if (finished->config != config_.dit)
    throw InputError(source + ": its DiT architecture differs from the training config's dit section");
  copy_parameters(*finished, *dit_);
  copy_parameters(*finished, *ema_);
}

void DiTTrainer::save_state(const std::string& path) const {
  torch::serialize::OutputArchive ar, model, ema, optim;
  dit_->save(model);
  ema_->save(ema);
  optimizer_->save(optim);
  ar.write("model", model);
  ar.write("ema", ema);
  ar.write("optim", optim);
  ar.write("step", at::tensor(step_));
  if (pool_.defined()) {
    ar.write("pool", pool_);
    ar.write("pool_caption", at::tensor(pool_caption_));
    ar.write("pool_cursor", at::tensor(pool_cursor_));
    ar.write("pool_mask", pool_mask_);
  }
  write_rng(ar, data_rng_, noise_gen_);
  save_archive(ar, path);
}

void DiTTrainer::load_state(const std::string& path) {
  torch::serialize::InputArchive ar, model, ema, optim;
  ar.load_from(path);
  ar.read("model", model);
  ar.read("ema", ema);
  ar.read("optim", optim);
  dit_->load(model);
  ema_->load(ema);
  // The archive keeps the device each tensor was saved from; a state resumes on any device.
  dit_->to(device_);
  ema_->to(device_);
  optimizer_->load(optim);
  move_adamw_state(*optimizer_, device_);
  step_ = read_int(ar, "step");
  at::Tensor pool;
  if (ar.try_read("pool", pool)) {
    pool_ = pool.to(device_);
    at::Tensor caps;
    ar.read("pool_caption", caps);
    caps = caps.contiguous();
    pool_caption_.assign(caps.data_ptr<std::int64_t>(), caps.data_ptr<std::int64_t>() + caps.numel());
    pool_cursor_ = read_int(ar, "pool_cursor");
    if (ar.try_read("pool_mask", pool_mask_)) {
      pool_mask_ = pool_mask_.to(device_);
    } else {
      // A state from before the object weighting: its clips count as all background until refreshed.
      pool_mask_ = at::zeros({pool_.size(0), 1, pool_.size(2), pool_.size(3), pool_.size(4)}, at::device(device_).dtype(at::kByte));
      if (config_.dit_object_weight > 0) log_warning("dit: resumed pool has no object masks; weighting starts as pool clips are refreshed");
    }
  }
  read_rng(ar, data_rng_, noise_gen_);
}

// ---- export -------------------------------------------------------------------------------------

namespace {

void write_vae(const fs::path& dir, WanVAE& vae) {
  fs::create_directories(dir / "vae");
  write_safetensors((dir / "vae" / "diffusion_pytorch_model.safetensors").string(), parameter_entries(*vae, [&](const std::string& k) {
                      return diffusers_wan_vae_key(k, vae->config().num_res_blocks);
                    }));
  write_text(dir / "vae" / "config.json", vae_config_json(vae->config()).dump(2) + "\n");
}

void write_text_encoder(const fs::path& dir, UMT5Encoder& t5, const std::string& tokenizer_path) {
  fs::create_directories(dir / "text_encoder");
  write_safetensors((dir / "text_encoder" / "model.safetensors").string(), parameter_entries(*t5, hf_umt5_key));
  write_text(dir / "text_encoder" / "config.json", t5_config_json(t5->config()).dump(2) + "\n");
  const fs::path target = dir / "tokenizer" / "spiece.model";
  fs::create_directories(target.parent_path());
  std::error_code ec;
  if (!fs::equivalent(tokenizer_path, target, ec)) fs::copy_file(tokenizer_path, target, fs::copy_options::overwrite_existing);
}

void write_pipeline_files(const fs::path& dir, const DemoTrainConfig& config) {
  const nlohmann::json index = {{"_class_name", "WanPipeline"},
                                {"_diffusers_version", "0.33.0"},
                                {"scheduler", {"diffusers", "UniPCMultistepScheduler"}},
                                {"text_encoder", {"transformers", "UMT5EncoderModel"}},
                                {"tokenizer", {"transformers", "T5TokenizerFast"}},
                                {"transformer", {"diffusers", "WanTransformer3DModel"}},
                                {"vae", {"diffusers", "AutoencoderKLWan"}}};
  write_text(dir / "model_index.json", index.dump(2) + "\n");
  const nlohmann::json scheduler = {{"_class_name", "UniPCMultistepScheduler"},
                                    {"num_train_timesteps", 1000},
                                    {"prediction_type", config.dit_prediction},
                                    {"use_flow_sigmas", true},
                                    {"flow_shift", config.flow_shift},
                                    {"solver_order", 2},
                                    {"predict_x0", true},
                                    {"solver_type", "bh2"},
                                    {"lower_order_final", true}};
  write_text(dir / "scheduler" / "scheduler_config.json", scheduler.dump(2) + "\n");
  // Keys as `vdit generate` reads them; "_training" is bookkeeping it skips.
  const nlohmann::json demo = {{"size", std::to_string(config.width) + "x" + std::to_string(config.height)},
                               {"frames", config.frames},
                               {"fps", config.fps},
                               {"steps", config.sample_steps},
                               {"guidance", config.sample_guidance},
                               {"shift", config.sample_shift},
                               {"sampler", "unipc"},
                               {"negative_prompt", ""},
                               {"_training", config.to_json()}};
  write_text(dir / "vdit-demo.json", demo.dump(2) + "\n");
}

void write_transformer(const fs::path& dir, WanDiT& dit) {
  fs::create_directories(dir / "transformer");
  write_safetensors((dir / "transformer" / "diffusion_pytorch_model.safetensors").string(),
                    parameter_entries(*dit, wan_dit_diffusers_key));
  write_text(dir / "transformer" / "config.json", dit->config.to_diffusers_json().dump(2) + "\n");
}

// The frozen contexts of the 90 captions and of "" (the demo's negative prompt), computed with
// the same TextEncoder the pipeline uses.
std::pair<std::vector<at::Tensor>, at::Tensor> caption_contexts(UMT5Encoder t5, const WanTokenizer& tokenizer) {
  TextEncoder encoder(std::move(t5), tokenizer);
  std::vector<std::string> prompts = caption_corpus();
  prompts.push_back("");
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> out = encoder.encode(prompts);
  for (auto& t : out) t = t.detach().clone();
  at::Tensor null = out.back();
  out.pop_back();
  return {out, null};
}

// A finished model's DiT from DIR/transformer (diffusers config.json and weights), which the DiT
// stage writes; the counterpart of load_trained_vae.
WanDiT load_trained_dit(const fs::path& dir) {
  const fs::path config_path = dir / "transformer" / "config.json";
  const std::string path = (dir / "transformer" / "diffusion_pytorch_model.safetensors").string();
  if (!fs::exists(config_path) || !fs::exists(path))
    throw InputError((dir / "transformer").string() + " has no config.json and diffusion_pytorch_model.safetensors");
  WanDiT dit(WanDiTConfig::from_json(read_json(config_path.string())));
  load_wan_dit_weights(dit, {WeightFile::open(path)}, at::kFloat);
  return dit;
}

WanVAE load_trained_vae(const fs::path& dir) {
  const std::string path = (dir / "vae" / "diffusion_pytorch_model.safetensors").string();
  if (!fs::exists(path)) throw InputError(path + " is missing: run the vae stage first");
  auto file = WeightFile::open(path);
  // The same construction as the pipeline (architecture from the weights, published latent
  // statistics), so the DiT trains on exactly the latents generation will decode.
  WanVAE vae(WanVAEConfig::infer_from_weights(*file));
  load_wan_vae_weights(vae, *file, at::kFloat);
  vae->eval();
  return vae;
}

}  // namespace

void save_diffusers_model(const std::string& dir, const DemoTrainConfig& config, WanDiT& dit, UMT5Encoder& text_encoder,
                          const std::string& tokenizer_path, WanVAE& vae) {
  const fs::path root(dir);
  write_pipeline_files(root, config);
  write_transformer(root, dit);
  write_text_encoder(root, text_encoder, tokenizer_path);
  write_vae(root, vae);
}

// ---- the stages ---------------------------------------------------------------------------------

namespace {

std::string round_trip_line(WanVAE& vae, const DemoTrainConfig& config) {
  // Fixed seed: every check scores the same clips, so the numbers are comparable across steps.
  const shapes::JudgeSummary s = judge_round_trip(vae, config, config.vae_validate_clips, config.seed * 1000 + 9);
  auto pct = [&](int right) {
    std::ostringstream o;
    o << std::fixed << std::setprecision(0) << 100.0 * s.accuracy(right) << "%";
    return o.str();
  };
  return "colour " + pct(s.colour_right) + " shape " + pct(s.shape_right) + " motion " + pct(s.motion_right) + " all " +
         pct(s.all_right) + " (" + std::to_string(s.clips) + " clips, " + std::to_string(s.no_object) + " without object)";
}

// Warm-up over warmup steps, then a cosine from 1 to 0.1 over the budget (steps or minutes): the
// last steps refine instead of jittering.
double warmup_cosine(const Budget& budget, std::int64_t step, double elapsed, std::int64_t warmup) {
  const double warm = std::min(1.0, (step + 1) / static_cast<double>(warmup));
  return warm * cosine_decay(budget.fraction(step, elapsed), 0.1);
}

// The first phase (windowed, whole VAE) and the decoder phase (frozen encoder, whole clips); the
// "vae-decoder" stage runs only the latter, from the first phase's final state.
void run_vae_stage(const DemoTrainConfig& config, const DemoTrainOptions& options, bool decoder_only) {
  const fs::path root(options.out_dir), state_dir = root / "train-state";
  const std::string state = (state_dir / "vae.pt").string(), decoder_state = (state_dir / "vae-decoder.pt").string();
  const bool decoder_phase = config.vae_decoder_steps > 0 || config.vae_decoder_minutes > 0;
  if (decoder_only && !decoder_phase)
    throw InputError("train-demo: the vae-decoder stage needs vae_decoder_steps or vae_decoder_minutes above 0");
  const bool resume_decoder = options.resume && decoder_phase && fs::exists(decoder_state);
  VAETrainer trainer(config, config.seed * 1000 + 1, options.device);
  if (!options.device.is_cpu()) log_info("vae: training on " + options.device.str() + " (f32)");
  // One phase: resume from its state file when asked, train to its budget (the elapsed time rides
  // along so a minutes budget counts over resumed runs), log the result.
  auto train_phase = [&](const std::string& name, const std::string& state_path, const Budget& budget,
                         std::int64_t warmup, bool resume) {
    const fs::path elapsed_path = fs::path(state_path).replace_extension(".elapsed");
    double elapsed = 0;
    if (resume) {
      trainer.load_state(state_path);
      std::ifstream in(elapsed_path);
      if (in) in >> elapsed;
      log_info(name + ": resuming at step " + std::to_string(trainer.steps_done()));
    }
    auto save = [&] {
      trainer.save_state(state_path);
      std::ofstream(elapsed_path) << std::setprecision(17) << elapsed;
    };
    const double avg = run_budget(name, "L1", budget, trainer, elapsed, config.checkpoint_minutes, options.quiet_progress,
                                  [&] {
                                    const VAEStepResult r =
                                        trainer.step(warmup_cosine(budget, trainer.steps_done(), elapsed, warmup));
                                    if (config.vae_validate_every > 0 && trainer.steps_done() % config.vae_validate_every == 0)
                                      log_info(name + ": step " + std::to_string(trainer.steps_done()) + " round trip " +
                                               round_trip_line(trainer.vae(), config));
                                    return std::make_pair(r.recon, " kl " + fmt(r.kl, 3) +
                                                                       (r.probe_accuracy >= 0 ? " probe " + fmt(r.probe_accuracy, 2) : std::string()));
                                  },
                                  save);
    log_info(name + ": " + std::to_string(trainer.steps_done()) + " steps, " + format_duration(elapsed) + ", L1 " + fmt(avg));
    log_info(name + ": round trip " + round_trip_line(trainer.vae(), config));
  };

  const bool from_model = !options.decoder_from.empty();
  if (from_model && !resume_decoder) {
    WanVAE finished = load_trained_vae(options.decoder_from);
    trainer.load_finished_vae(finished, options.decoder_from);
    log_info("vae decoder: starting from " + options.decoder_from + "/vae, round trip " +
             round_trip_line(trainer.vae(), config));
  } else if (!decoder_only && !resume_decoder) {
    train_phase("vae", state, Budget{config.vae_steps, config.vae_minutes}, 100, options.resume && fs::exists(state));
  } else if (!resume_decoder) {
    if (!fs::exists(state)) throw InputError(state + " is missing: run the vae stage first");
    trainer.load_weights(state);
  }

  if (config.decoder_generated_clips > 0) {
    if (!from_model && !resume_decoder)
      throw InputError("train-demo: decoder_generated_clips needs --decoder-from MODEL, a finished model with its DiT");
    // Saved with the train-state, so a resumed decoder phase trains on the same pairs.
    const std::string pairs_path = (state_dir / "decoder-generated.pt").string();
    GeneratedDecoderPairs pairs;
    if (resume_decoder && fs::exists(pairs_path)) {
      torch::serialize::InputArchive ar;
      ar.load_from(pairs_path);
      ar.read("latents", pairs.latents);
      ar.read("targets", pairs.targets);
    } else {
      if (!from_model) throw InputError(pairs_path + " is missing: start the decoder phase again with --decoder-from");
      const auto t0 = Clock::now();
      ProgressBar bar("generate decoder pairs", config.decoder_generated_clips);
      pairs = generate_decoder_pairs(options.decoder_from, config, config.decoder_generated_clips, config.seed * 1000 + 50000,
                                     [&](std::int64_t done, std::int64_t) {
                                       if (!options.quiet_progress) bar.update(done);
                                     });
      bar.finish();
      torch::serialize::OutputArchive ar;
      ar.write("latents", pairs.latents);
      ar.write("targets", pairs.targets);
      save_archive(ar, pairs_path);
      log_info("vae decoder: " + std::to_string(pairs.latents.size(0)) + " generated pairs (" +
               std::to_string(pairs.skipped) + " clips without exactly one object skipped) in " +
               format_duration(seconds_since(t0)));
    }
    trainer.set_generated_pairs(pairs);
  }
  if (decoder_phase) {
    trainer.start_decoder_phase();
    train_phase("vae decoder", decoder_state, Budget{config.vae_decoder_steps, config.vae_decoder_minutes}, 20,
                resume_decoder);
  }

  // Normalise the latent: measure, fold into the 1x1x1 convolutions, write the final VAE. The
  // decoder phase leaves the encoder as it was, so the statistics (same clips) and with them the
  // latents a DiT was trained on stay the same.
  WanVAEConfig final_config = config.vae;  // published latent statistics
  WanVAE final_vae(final_config);
  copy_parameters(*trainer.vae(), *final_vae);
  if (!from_model) {  // a finished model's VAE has its statistics folded in already
    auto [mean, std] = measure_latent_stats(trainer.vae(), config, config.vae_stats_clips, config.seed * 1000 + 7);
    fold_latent_stats(final_vae, mean, std);
  }
  final_vae->eval();
  write_vae(root, final_vae);
  log_info("vae: written to " + (root / "vae").string());
}

// OUT/snapshots/step-NNNNNN: a complete model directory with the EMA DiT of that step and OUT's
// other parts (written before the DiT stage starts), for judging a run's progress afterwards.
void write_dit_snapshot(const fs::path& root, const DemoTrainConfig& config, WanDiT& ema, std::int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%06lld", static_cast<long long>(step));
  const fs::path dir = root / "snapshots" / name;
  fs::create_directories(dir);
  for (const char* part : {"text_encoder", "tokenizer", "vae"})
    fs::copy(root / part, dir / part, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  write_transformer(dir, ema);
  write_pipeline_files(dir, config);
  log_info("dit: step " + std::to_string(step) + " snapshot written to " + dir.string());
}

void run_dit_stage(const DemoTrainConfig& config, const DemoTrainOptions& options) {
  const fs::path root(options.out_dir), state_dir = root / "train-state";
  const std::string tokenizer_path = (root / "tokenizer" / "spiece.model").string();
  if (!fs::exists(tokenizer_path)) throw InputError(tokenizer_path + " is missing: run the tokenizer stage first");
  WanTokenizer tokenizer = WanTokenizer::from_file(tokenizer_path);
  UMT5Encoder t5 = make_text_encoder(config, tokenizer.vocab_size());
  write_text_encoder(root, t5, tokenizer_path);
  auto [contexts, null_context] = caption_contexts(t5, tokenizer);
  WanVAE vae = load_trained_vae(root);

  DiTTrainer trainer(config, vae, contexts, null_context, config.seed * 1000 + 2, options.device);
  if (!options.device.is_cpu()) log_info("dit: training on " + options.device.str() + " (f32)");
  const std::string state = (state_dir / "dit.pt").string();
  double elapsed = 0;
  if (options.resume && fs::exists(state)) {
    trainer.load_state(state);
    std::ifstream in(state_dir / "dit.elapsed");
    if (in) in >> elapsed;
    log_info("dit: resuming at step " + std::to_string(trainer.steps_done()));
  } else if (!options.dit_from.empty()) {
    WanDiT finished = load_trained_dit(options.dit_from);
    trainer.load_finished_dit(finished, options.dit_from);
    log_info("dit: starting from " + options.dit_from + "/transformer");
  }
  {
    const auto t0 = Clock::now();
    ProgressBar pool_bar("encode latent pool", config.pool_size);
    trainer.fill_pool([&](std::int64_t done, std::int64_t) {
      if (!options.quiet_progress) pool_bar.update(done);
    });
    pool_bar.finish();
    log_info("dit: latent pool of " + std::to_string(config.pool_size) + " clips encoded in " +
             format_duration(seconds_since(t0)) + " (not counted in the training budget)");
  }
  const Budget budget{config.dit_steps, config.dit_minutes};
  auto save = [&] {
    trainer.save_state(state);
    std::ofstream(state_dir / "dit.elapsed") << std::setprecision(17) << elapsed;
  };
  const double avg = run_budget("dit", "loss", budget, trainer, elapsed, config.checkpoint_minutes, options.quiet_progress,
                                [&] {
                                  // dit_lr_final 1 (the shipped recipe) makes this exactly 1.
                                  const double scale = cosine_decay(budget.fraction(trainer.steps_done(), elapsed), config.dit_lr_final);
                                  const DiTStepResult r = trainer.step(scale);
                                  if (config.dit_snapshot_every > 0 && trainer.steps_done() % config.dit_snapshot_every == 0)
                                    write_dit_snapshot(root, config, trainer.ema(), trainer.steps_done());
                                  return std::make_pair(r.loss, config.dit_pixel_weight > 0 ? " pixel " + fmt(r.pixel_loss) : std::string());
                                },
                                save);
  log_info("dit: " + std::to_string(trainer.steps_done()) + " steps, " + format_duration(elapsed) + ", loss " + fmt(avg));
  write_transformer(root, trainer.ema());
  write_pipeline_files(root, config);
  log_info("dit: model written to " + root.string());
}

}  // namespace

void tune_process_for_training() {
  // Flush denormals to zero: measured on this project's CPU, a VAE training step takes 0.8 s with
  // it and 22 s without (tiny gradients in the convolution backward hit the slow denormal path).
  at::globalContext().setFlushDenormal(true);
#if defined(__GLIBC__)
  // Keep freed tensor buffers in the heap instead of returning them to the kernel: glibc maps every
  // block above its (adaptive) threshold afresh and trims the heap on free, so each training step
  // re-faults its activations. Measured on this project's 2-core CPU (trainer timings, not bench/):
  // 100 VAE steps took 40.8 s with glibc's defaults and 37.0 s with these calls (system time
  // 4.8 -> 1.5 s), with the same losses; a 1x1x1-patch DiT at batch 8 ran 2.0 s/step by default and
  // 1.0 s/step with the same two thresholds set to 4 GiB through MALLOC_MMAP_THRESHOLD_ and
  // MALLOC_TRIM_THRESHOLD_ (system time per 10 steps 15.7 -> 3.2 s); the same DiT at batch 16,
  // 60 steps back to back on another machine of the kind: 2.8 s/step without these calls, 1.6 with
  // them (loss 4.047 at step 60 either way). Training holds a steady working set, so the heap
  // does not grow without bound.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

void train_demo(const DemoTrainConfig& config, const DemoTrainOptions& options) {
  if (options.out_dir.empty()) throw InputError("train-demo: --out is required");
  const std::string& s = options.stage;
  if (s != "tokenizer" && s != "vae" && s != "vae-decoder" && s != "dit" && s != "all")
    throw InputError("train-demo: unknown stage '" + s + "' (expected tokenizer, vae, vae-decoder, dit or all)");
  // Checked before any stage runs: a stage that does not read one of these would ignore it.
  if (!options.decoder_from.empty() && s != "vae-decoder")
    throw InputError("train-demo: --decoder-from needs --stage vae-decoder");
  if (!options.dit_from.empty() && s != "dit") throw InputError("train-demo: --dit-from needs --stage dit");
  if (config.decoder_generated_clips > 0 && s != "vae-decoder")
    throw InputError("train-demo: decoder_generated_clips needs --stage vae-decoder --decoder-from MODEL");
  const fs::path root(options.out_dir);
  fs::create_directories(root / "train-state");
  write_text(root / "train-state" / "config.json", config.to_json().dump(2) + "\n");
  if (s == "tokenizer" || s == "all") {
    const std::string path = train_caption_tokenizer((root / "tokenizer").string(), config.vocab_size);
    const auto tok = WanTokenizer::from_file(path);
    log_info("tokenizer: " + std::to_string(tok.vocab_size()) + " pieces -> " + path);
  }
  if (s == "vae" || s == "all") run_vae_stage(config, options, /*decoder_only=*/false);
  if (s == "vae-decoder") run_vae_stage(config, options, /*decoder_only=*/true);
  if (s == "dit" || s == "all") run_dit_stage(config, options);
}

}  // namespace vdit::demo
