#include "vdit/pipelines/wan_t2v.h"

#include "vdit/common.h"
#include "vdit/distributed.h"
#include "vdit/io/checkpoint.h"
#include "vdit/models/umt5.h"
#include "vdit/models/wan_dit.h"
#include "vdit/pipelines/flow_loop.h"
#include "vdit/pipelines/perturbed_guidance.h"
#include "vdit/samplers/stepper.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <set>
#include <sstream>

namespace vdit {

const char* const kWanDefaultNegativePrompt =
    "\u8272\u8c03\u8273\u4e3d\uff0c\u8fc7\u66dd\uff0c\u9759\u6001\uff0c\u7ec6\u8282\u6a21\u7cca\u4e0d\u6e05\uff0c"
    "\u5b57\u5e55\uff0c\u98ce\u683c\uff0c\u4f5c\u54c1\uff0c\u753b\u4f5c\uff0c\u753b\u9762\uff0c\u9759\u6b62\uff0c"
    "\u6574\u4f53\u53d1\u7070\uff0c\u6700\u5dee\u8d28\u91cf\uff0c\u4f4e\u8d28\u91cf\uff0cJPEG\u538b\u7f29\u6b8b\u7559"
    "\uff0c\u4e11\u964b\u7684\uff0c\u6b8b\u7f3a\u7684\uff0c\u591a\u4f59\u7684\u624b\u6307\uff0c\u753b\u5f97\u4e0d\u597d"
    "\u7684\u624b\u90e8\uff0c\u753b\u5f97\u4e0d\u597d\u7684\u8138\u90e8\uff0c\u7578\u5f62\u7684\uff0c\u6bc1\u5bb9\u7684"
    "\uff0c\u5f62\u6001\u7578\u5f62\u7684\u80a2\u4f53\uff0c\u624b\u6307\u878d\u5408\uff0c\u9759\u6b62\u4e0d\u52a8\u7684"
    "\u753b\u9762\uff0c\u6742\u4e71\u7684\u80cc\u666f\uff0c\u4e09\u6761\u817f\uff0c\u80cc\u666f\u4eba\u5f88\u591a\uff0c"
    "\u5012\u7740\u8d70";

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::int64_t nearest_multiple(std::int64_t v, std::int64_t m) {
  std::int64_t r = (v + m / 2) / m * m;
  return r < m ? m : r;
}

std::vector<std::shared_ptr<WeightFile>> open_weights(const std::vector<std::string>& paths) {
  std::vector<std::shared_ptr<WeightFile>> out;
  for (const auto& path : paths) out.push_back(WeightFile::open(path));
  return out;
}

// The model's config.json when it has one, else inferred from the (opened) weights.
WanDiTConfig dit_config_for(const WanModelFiles& files, const std::vector<std::shared_ptr<WeightFile>>& weights) {
  return files.dit_config.empty() ? WanDiTConfig::infer_from_weights(weights) : WanDiTConfig::from_file(files.dit_config);
}

// A DiT of `config` holding `weights`, on `device` in `dtype`, ready for inference.
std::shared_ptr<WanDiTImpl> load_inference_dit(const WanDiTConfig& config,
                                               const std::vector<std::shared_ptr<WeightFile>>& weights, at::Device device,
                                               at::ScalarType dtype) {
  WanDiT model(config);
  model->to(device);
  load_wan_dit_weights(model, weights, dtype);
  model->eval();
  return model.ptr();
}

const char* const kNeedsGuideDit = "--autoguidance needs a guide DiT (--guide-dit, or guide_dit in the model's vdit-demo.json)";

}  // namespace

void validate_t2v_settings(const T2VSettings& s, const LatentGeometry& g) {
  const std::int64_t mw = g.size_multiple_w(), mh = g.size_multiple_h();
  const std::string size = std::to_string(s.width) + "x" + std::to_string(s.height);
  if (s.width <= 0 || s.height <= 0) throw InputError("size " + size + ": width and height must be positive");
  if (s.width % mw != 0 || s.height % mh != 0) {
    // What the model needs, and why: its VAE's spatial stride times its DiT's patch.
    const std::string multiple = mw == mh ? std::to_string(mw) : std::to_string(mw) + "x" + std::to_string(mh);
    const std::string patch = g.patch_h == g.patch_w ? std::to_string(g.patch_h)
                                                     : std::to_string(g.patch_w) + "x" + std::to_string(g.patch_h);
    throw InputError("size " + size + " is not a multiple of " + multiple + " on both sides, which this model needs (VAE stride " +
                     std::to_string(g.spatial_stride) + " x DiT patch " + patch + "); nearest valid: " +
                     std::to_string(nearest_multiple(s.width, mw)) + "x" + std::to_string(nearest_multiple(s.height, mh)));
  }
  const std::int64_t ts = g.temporal_stride;
  if (s.frames < 1 || (s.frames - 1) % ts != 0) {
    const std::int64_t below = s.frames < 1 ? 1 : (s.frames - 1) / ts * ts + 1;
    throw InputError("--frames " + std::to_string(s.frames) + " is not " + std::to_string(ts) + "n+1; nearest valid: " +
                     std::to_string(below) + (s.frames > 1 ? " or " + std::to_string(below + ts) : std::string()));
  }
  if (s.steps < 1 && s.sigmas.empty()) throw InputError("--steps must be at least 1");
  if (s.windows) s.windows->validate();
  if (s.shift && !(std::isfinite(*s.shift) && *s.shift > 0)) throw InputError("--shift must be a positive number");
  if (!std::isfinite(s.guidance)) throw InputError("--guidance must be a finite number");
  if (!std::isfinite(s.autoguidance)) throw InputError("--autoguidance must be a finite number");
  check_guidance_terms(s);
  check_sampler_name(s.sampler);
  if (!(s.eta >= 0.0 && s.eta <= 1.0)) throw InputError("--eta must be in [0, 1] (got " + std::to_string(s.eta) + ")");
  if (!(s.strength > 0.0 && s.strength <= 1.0))
    throw InputError("--strength must be in (0, 1] (got " + std::to_string(s.strength) + ")");
  if (s.noise.defined()) {
    auto expected = t2v_latent_shape(s, g);
    if (s.noise.sizes().vec() != expected) {
      std::ostringstream msg;
      msg << "--noise tensor has shape " << s.noise.sizes() << " but this size needs " << at::IntArrayRef(expected);
      throw InputError(msg.str());
    }
  }
}

std::vector<std::int64_t> t2v_latent_shape(const T2VSettings& s, const LatentGeometry& g) {
  return {g.channels, (s.frames - 1) / g.temporal_stride + 1, s.height / g.spatial_stride, s.width / g.spatial_stride};
}

const LatentGeometry& WanT2VPipeline::latent_geometry() {
  if (geometry_) return *geometry_;
  LatentGeometry g;
  {
    auto vae_weights = WeightFile::open(files_.vae);
    const WanVAEConfig vc = WanVAEConfig::infer_from_weights(*vae_weights);
    g.channels = vc.z_dim;
    g.temporal_stride = vc.temporal_stride();
    g.spatial_stride = vc.spatial_stride();
  }
  const WanDiTConfig dc = dit_config_for(files_, files_.dit_config.empty() ? open_weights(files_.dit)
                                                                           : std::vector<std::shared_ptr<WeightFile>>{});
  g.patch_h = dc.patch_size[1];
  g.patch_w = dc.patch_size[2];
  if (dc.in_dim != g.channels)
    throw InputError("the DiT takes " + std::to_string(dc.in_dim) + " latent channels but the VAE makes " +
                     std::to_string(g.channels));
  geometry_ = g;
  return *geometry_;
}

const WanDiTConfig& WanT2VPipeline::dit_config() {
  if (!dit_config_) {
    dit_config_ = dit_config_for(files_, files_.dit_config.empty() ? open_weights(files_.dit)
                                                                   : std::vector<std::shared_ptr<WeightFile>>{});
  }
  return *dit_config_;
}

at::Tensor seeded_noise(const std::vector<std::int64_t>& shape, std::uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
}

WanT2VPipeline::WanT2VPipeline(WanModelFiles files, WanT2VOptions options)
    : files_(std::move(files)), options_(options) {
  if (!files_.scheduler_config.empty()) scheduler_config_ = read_scheduler_config(files_.scheduler_config);
  std::error_code ec;
  if (!options_.guide_dit.empty() && !std::filesystem::exists(options_.guide_dit, ec))
    throw InputError(options_.guide_dit + ": no such guide DiT file or directory");
}

namespace {
// A setting as metadata text, in the shortest form a stream gives (5, 3.5, 0.5).
std::string number_text(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}
}  // namespace

// The guidance terms beyond CFG, for the metadata: CFG-Zero*, PAG's head set, SLG's blocks.
std::string guidance_terms_text(const T2VSettings& s) {
  std::string out;
  const auto add = [&](const std::string& part) { out += (out.empty() ? "" : "; ") + part; };
  if (s.cfg_zero_star && s.guidance != 1.0) add("cfg-zero* (zero-init " + (s.cfg_zero_init_steps < 0 ? std::string("4%") : std::to_string(s.cfg_zero_init_steps)) + ")");
  if (pag_enabled(s)) {
    std::string layers;
    for (int l : s.pag_layers) layers += (layers.empty() ? "" : ",") + std::to_string(l);
    add("pag scale " + number_text(s.pag_scale) + " soft_pag " + number_text(s.soft_pag) + " steps " + number_text(s.pag_start) +
        ":" + number_text(s.pag_end) + (s.pag_heads.empty() ? "" : " heads " + head_set_text(s.pag_heads)) +
        (layers.empty() ? "" : " layers " + layers));
  }
  if (slg_enabled(s)) {
    std::string layers;
    for (int l : s.slg_layers) layers += (layers.empty() ? "" : ",") + std::to_string(l);
    add("slg scale " + number_text(s.slg_scale) + " layers " + layers + " steps " + number_text(s.slg_start) + ":" + number_text(s.slg_end));
  }
  return out.empty() ? "none" : out;
}

std::uint64_t sampler_noise_seed(std::uint64_t seed) {
  // A stream apart from the initial noise's: clip i of an eval run uses seed + i, so seed + 1 here
  // would replay the next clip's starting noise. One splitmix64 round decorrelates the two.
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::unique_ptr<FlowSampler> WanT2VPipeline::make_sampler_for(const T2VSettings& settings) const {
  SamplerConfig config = scheduler_config_ ? *scheduler_config_ : SamplerConfig{};
  if (config.name != settings.sampler) {
    // The model's scheduler config names one solver and its settings (sigma grid, order,
    // corrector) are that solver's; a different --sampler runs with its own reference defaults.
    // What describes the model rather than the solver carries over: its shift, its training
    // steps and what it predicts.
    SamplerConfig fresh;
    fresh.name = settings.sampler;
    fresh.shift = config.shift;
    fresh.num_train_timesteps = config.num_train_timesteps;
    fresh.prediction = config.prediction;
    config = fresh;
  }
  if (settings.sampler == "euler" || settings.sampler == "euler-a") config.solver_order = 1;
  config.eta = settings.eta;
  config.noise_seed = sampler_noise_seed(settings.seed);
  auto sampler = make_sampler(config);
  if (!settings.sigmas.empty()) {
    sampler->set_sigmas(settings.sigmas);
  } else {
    sampler->set_schedule(settings.steps, settings.shift ? *settings.shift : config.shift);
  }
  if (settings.strength < 1.0) {
    const int begin = img2img_begin_index(sampler->num_steps(), settings.strength);
    if (begin >= sampler->num_steps())
      throw InputError("--strength " + std::to_string(settings.strength) + " keeps no step of " +
                       std::to_string(sampler->num_steps()));
    sampler->set_begin_index(begin);
  }
  return sampler;
}

std::vector<at::Tensor> WanT2VPipeline::encode_prompts(const std::vector<std::string>& prompts) {
  c10::InferenceMode guard;
  const auto t0 = std::chrono::steady_clock::now();
  const at::Device device = options_.text_encoder_device ? *options_.text_encoder_device : options_.device;
  // Sequence parallel: the text encoder runs once, on rank 0, and its outputs are broadcast (every
  // rank of a job calls this collectively, as every rank runs the same command).
  DistributedGroup* group = options_.distributed && options_.distributed->world_size() > 1 ? options_.distributed.get() : nullptr;
  std::vector<at::Tensor> out;
  if (!group || group->is_main()) {
    log_verbose("loading text encoder " + files_.text_encoder);
    TextEncoder encoder = TextEncoder::from_files(files_.text_encoder, files_.tokenizer, options_.dtype, device);
    out = encoder.encode(prompts);
    for (auto& t : out) t = t.to(options_.device, at::kFloat);
  }  // the encoder is released here, before the DiT is loaded
  if (group) broadcast_tensors(*group, out, options_.device);
  times_.text += seconds_since(t0);
  return out;
}

void WanT2VPipeline::load_dit() {
  if (dit_) return;
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<std::shared_ptr<WeightFile>> weights = open_weights(files_.dit);
  const WanDiTConfig config = dit_config_for(files_, weights);
  log_verbose("loading DiT " + files_.dit.front());
  dit_ = load_inference_dit(config, weights, options_.device, options_.dtype);
  times_.load += seconds_since(t0);
}

void WanT2VPipeline::load_guide_dit() {
  if (guide_dit_) return;
  const std::string& path = options_.guide_dit;
  if (path.empty()) throw InputError(kNeedsGuideDit);
  const auto t0 = std::chrono::steady_clock::now();
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<std::string> files;
  std::string config_file;
  if (fs::is_directory(path, ec)) {
    // A transformer folder of its own (config.json + diffusion_pytorch_model.safetensors), or a
    // whole model directory whose DiT is the guide.
    const fs::path dir(path);
    if (fs::exists(dir / "diffusion_pytorch_model.safetensors", ec)) {
      files = {(dir / "diffusion_pytorch_model.safetensors").string()};
      if (fs::exists(dir / "config.json", ec)) config_file = (dir / "config.json").string();
    } else {
      const WanModelFiles located = locate_wan_model(path, {}, false);
      files = located.dit;
      config_file = located.dit_config;
    }
    if (files.empty() || files.front().empty()) throw InputError(path + ": no DiT weights found for the guide DiT");
  } else {
    files = {path};  // the constructor checked that it exists
  }
  const std::vector<std::shared_ptr<WeightFile>> weights = open_weights(files);
  const WanDiTConfig& main = dit_->config;
  WanDiTConfig config = main;  // a bare file whose sizes cannot be inferred: the model's own architecture
  if (!config_file.empty()) {
    config = WanDiTConfig::from_file(config_file);
  } else {
    try {
      config = WanDiTConfig::infer_from_weights(weights);
    } catch (const InputError&) {
      log_verbose(path + ": guide DiT sizes not inferable from its weights; assuming the model's DiT config");
    }
  }
  if (config.in_dim != main.in_dim || config.out_dim != main.out_dim || config.patch_size != main.patch_size ||
      config.text_dim != main.text_dim)
    throw InputError(path + ": the guide DiT does not match the model's DiT (latent channels, patch and text width must agree)");
  log_verbose("loading guide DiT " + files.front());
  guide_dit_ = load_inference_dit(config, weights, options_.device, options_.dtype);
  times_.load += seconds_since(t0);
}

void WanT2VPipeline::load_vae() {
  if (vae_) return;
  const auto t0 = std::chrono::steady_clock::now();
  auto weights = WeightFile::open(files_.vae);
  WanVAEConfig config = WanVAEConfig::infer_from_weights(*weights);
  WanVAE vae(config);
  vae->to(options_.device);
  load_wan_vae_weights(vae, *weights, at::kFloat);  // the reference VAE runs in f32
  vae->eval();
  vae_ = vae;
  times_.load += seconds_since(t0);
}

void WanT2VPipeline::validate(const T2VSettings& settings) {
  validate_t2v_settings(settings, latent_geometry());
  if (settings.autoguidance != 1.0 && options_.guide_dit.empty()) throw InputError(kNeedsGuideDit);
  check_guidance_terms(settings, dit_config());
  if (options_.distributed) check_ulysses_heads(dit_config().num_heads, options_.distributed->world_size());
  if (settings.cfg_zero_star && make_sampler_for(settings)->config().prediction != ModelPrediction::Velocity)
    throw InputError("--cfg-zero-star is defined on velocities; this model predicts the clean sample");
  if (settings.hires) {
    // The dual path runs one DiT: a guide model (autoguidance) and temporal windows are not
    // combined with it. PAG and SLG are (their passes reuse the cond pass's full path).
    if (settings.windows) throw InputError("hi-res refinement does not combine with long-video context windows");
    if (settings.autoguidance != 1.0) throw InputError("hi-res refinement does not combine with autoguidance");
    if (settings.hires->cross_cache_every < 0)
      throw InputError("--cross-cache-every must be 0 (no cache) or more (got " +
                       std::to_string(settings.hires->cross_cache_every) + ")");
    if (!(std::isfinite(settings.hires->attn_scale_factor) && settings.hires->attn_scale_factor > 0))
      throw InputError("--attn-scale-factor must be a positive number");
  }
}

WanDiTImpl& WanT2VPipeline::loaded_dit() {
  load_dit();
  return *dit_;
}

void WanT2VPipeline::release_dit() {
  dit_.reset();
  guide_dit_.reset();
}
void WanT2VPipeline::release_vae() { vae_.reset(); }

Guidance WanT2VPipeline::guidance_for(const T2VSettings& settings) const {
  Guidance guidance;
  if (settings.guidance != 1.0 && settings.cfg_zero_star) {
    const int zero = settings.cfg_zero_init_steps >= 0 ? settings.cfg_zero_init_steps
                                                       : CFGZeroStar::default_zero_init_steps(make_sampler_for(settings)->num_steps());
    guidance.add(std::make_shared<CFGZeroStar>(settings.guidance, zero));
  } else if (settings.guidance != 1.0) {
    guidance.add(std::make_shared<ClassifierFreeGuidance>(settings.guidance));
  }
  if (settings.autoguidance != 1.0) guidance.add(std::make_shared<Autoguidance>(settings.autoguidance));
  if (pag_enabled(settings))
    guidance.add(std::make_shared<PerturbedAttentionGuidance>(settings.pag_scale, StepRange{settings.pag_start, settings.pag_end}));
  if (slg_enabled(settings))
    guidance.add(std::make_shared<SkipLayerGuidance>(settings.slg_scale, StepRange{settings.slg_start, settings.slg_end}));
  return guidance;
}

at::Tensor WanT2VPipeline::denoise(const at::Tensor& noise, const at::Tensor& context, const at::Tensor& context_null,
                                   const T2VSettings& settings, const StepCallback& on_step, const at::Tensor& clean,
                                   const std::vector<at::Tensor>& segment_contexts) {
  c10::InferenceMode guard;
  load_dit();
  const auto t0 = std::chrono::steady_clock::now();
  SamplerStepper stepper(make_sampler_for(settings));
  if (settings.strength < 1.0 && !clean.defined()) throw RuntimeError("denoise: strength below 1 needs the clean latent");

  // The reference's tokenizer cuts prompts at the DiT's text_len; models with a shorter text_len
  // than the encoder's 512 (the built-in demo model) are cut here the same way.
  const auto embed = [&](WanDiTImpl& model, const at::Tensor& c) {
    const std::int64_t text_len = model.config.text_len;
    at::Tensor fitted = c;
    if (c.size(0) > text_len) {
      log_verbose("prompt of " + std::to_string(c.size(0)) + " tokens cut to the model's text_len " + std::to_string(text_len));
      fitted = c.narrow(0, 0, text_len);
    }
    return model.encode_text(fitted.to(options_.device).unsqueeze(0));
  };
  DiTDenoiser::Options denoiser_options;
  std::optional<SequenceParallel> sequence_parallel;
  if (options_.distributed && options_.distributed->world_size() > 1) {
    sequence_parallel.emplace(options_.distributed);
    denoiser_options.call.sequence_parallel = &*sequence_parallel;
  }
  denoiser_options.batch_passes = settings.batch_guidance;
  denoiser_options.prediction = stepper.sampler().config().prediction;
  // PAG: the perturbed rows' heads interpolated towards the identity; SLG: its rows skip blocks.
  AttentionProcessors perturbation;
  if (pag_enabled(settings)) {
    add_head_perturbation(perturbation, pag_head_set(settings, dit_->config.num_heads), settings.soft_pag);
    denoiser_options.processors = &perturbation;
  }
  if (slg_enabled(settings))
    denoiser_options.call.skip_blocks[RowRole::SkipLayer] = std::set<int>(settings.slg_layers.begin(), settings.slg_layers.end());
  DiTDenoiser denoiser(*dit_, guidance_for(settings), denoiser_options);
  const WanTextCondition cond = embed(*dit_, context);
  denoiser.set_condition(RowRole::Cond, cond);
  if (pag_enabled(settings)) denoiser.set_condition(RowRole::Perturbed, cond);
  if (slg_enabled(settings)) denoiser.set_condition(RowRole::SkipLayer, cond);
  if (settings.guidance != 1.0) denoiser.set_condition(RowRole::Uncond, embed(*dit_, context_null));
  if (settings.autoguidance != 1.0) {
    load_guide_dit();
    denoiser.set_model(RowRole::Guide, *guide_dit_);
    denoiser.set_condition(RowRole::Guide, embed(*guide_dit_, context));
  }

  // Long video: the guided DiT on temporal windows, each window with its segment's prompt (one
  // DiTDenoiser per segment: the same DiT, guidance and other conditions, its own Cond).
  Denoiser* active = &denoiser;
  // Hi-res: the FreeSwim dual path (or an ablation) on the same DiT, guidance and prompts.
  std::unique_ptr<FreeSwimDenoiser> hires;
  if (settings.hires) {
    hires = std::make_unique<FreeSwimDenoiser>(*dit_, guidance_for(settings), denoiser_options, *settings.hires);
    hires->set_condition(RowRole::Cond, cond);
    if (pag_enabled(settings)) hires->set_condition(RowRole::Perturbed, cond);
    if (slg_enabled(settings)) hires->set_condition(RowRole::SkipLayer, cond);
    if (settings.guidance != 1.0) hires->set_condition(RowRole::Uncond, embed(*dit_, context_null));
    const Grid3 grid{noise.size(1), noise.size(2) / dit_->config.patch_size[1], noise.size(3) / dit_->config.patch_size[2]};
    if (settings.hires->method != HiresMethod::Direct)
      for (const auto& note : window_clamp_notes(settings.hires->window, grid)) log_verbose("hi-res: " + note);
    active = hires.get();
  }
  std::vector<std::unique_ptr<DiTDenoiser>> segments;
  std::unique_ptr<TemporalWindowDenoiser> windowed;
  if (settings.windows) {
    std::vector<Denoiser*> inner{&denoiser};
    for (std::size_t i = 1; i < segment_contexts.size(); ++i) {
      segments.push_back(std::make_unique<DiTDenoiser>(denoiser));
      const WanTextCondition segment_cond = embed(*dit_, segment_contexts[i]);
      segments.back()->set_condition(RowRole::Cond, segment_cond);
      // The perturbed and skip-layer passes read the prompt too: the segment's.
      if (pag_enabled(settings)) segments.back()->set_condition(RowRole::Perturbed, segment_cond);
      if (slg_enabled(settings)) segments.back()->set_condition(RowRole::SkipLayer, segment_cond);
      if (settings.autoguidance != 1.0) segments.back()->set_condition(RowRole::Guide, embed(*guide_dit_, segment_contexts[i]));
      inner.push_back(segments.back().get());
    }
    windowed = std::make_unique<TemporalWindowDenoiser>(inner, *settings.windows);
    active = windowed.get();
  }

  const at::Tensor start = flow_start(stepper, noise.to(options_.device, at::kFloat).unsqueeze(0),
                                      clean.defined() ? clean.to(options_.device, at::kFloat).unsqueeze(0) : at::Tensor());
  ProgressHook progress(on_step);
  const at::Tensor x = run_flow(start, stepper, *active, {&progress});
  times_.denoise += seconds_since(t0);
  if (hires && settings.hires->method == HiresMethod::FreeSwim)
    log_verbose("hi-res: " + std::to_string(hires->full_path_forwards()) + " full-path forwards, cross-attention cache peak " +
                std::to_string(hires->peak_cache_bytes()) + " bytes");
  return x.squeeze(0).to(at::kCPU);
}

at::Tensor WanT2VPipeline::encode(const at::Tensor& video) {
  c10::InferenceMode guard;
  load_vae();
  at::Tensor latent = (*vae_)->encode(video.to(options_.device, at::kFloat).unsqueeze(0), options_.vae_tiling);
  return latent.squeeze(0).to(at::kCPU);
}

at::Tensor WanT2VPipeline::decode(const at::Tensor& latent) {
  c10::InferenceMode guard;
  load_vae();
  const auto t0 = std::chrono::steady_clock::now();
  at::Tensor video = (*vae_)->decode(latent.to(options_.device, at::kFloat).unsqueeze(0), options_.vae_tiling);
  times_.decode += seconds_since(t0);
  return video.squeeze(0).to(at::kCPU);
}

namespace {

void check_init_video(const T2VSettings& settings) {
  if (settings.strength < 1.0 && !settings.init_video.defined())
    throw InputError("--strength below 1 needs an input (--init)");
  if (settings.init_video.defined()) {
    const std::vector<std::int64_t> want{3, settings.frames, settings.height, settings.width};
    if (settings.init_video.sizes().vec() != want) {
      std::ostringstream msg;
      msg << "the init video is " << settings.init_video.sizes() << " but the run needs " << at::IntArrayRef(want);
      throw InputError(msg.str());
    }
  }
}

}  // namespace

T2VResult WanT2VPipeline::generate(const T2VSettings& settings, const StepCallback& on_step) {
  validate(settings);
  check_init_video(settings);
  times_ = StageTimes{};
  return generate_encoded(settings, encode_prompts(prompts_of(settings)), on_step);
}

std::vector<std::string> WanT2VPipeline::prompts_of(const T2VSettings& settings) const {
  const bool segmented = settings.windows && settings.segment_prompts.size() > 1;
  std::vector<std::string> prompts = segmented ? settings.segment_prompts : std::vector<std::string>{settings.prompt};
  if (settings.guidance != 1.0) prompts.push_back(settings.negative_prompt.value_or(kWanDefaultNegativePrompt));
  return prompts;
}

T2VResult WanT2VPipeline::generate_encoded(const T2VSettings& settings, const std::vector<at::Tensor>& contexts,
                                           const StepCallback& on_step) {
  const LatentGeometry& geometry = latent_geometry();
  validate(settings);
  check_init_video(settings);
  const StageTimes text_times{times_.text, 0, 0, 0};
  times_ = text_times;
  const std::string negative = settings.negative_prompt.value_or(kWanDefaultNegativePrompt);
  const bool segmented = settings.windows && settings.segment_prompts.size() > 1;
  const bool guided = settings.guidance != 1.0;
  const std::size_t n_prompts = segmented ? settings.segment_prompts.size() : 1;
  if (contexts.size() != n_prompts + (guided ? 1 : 0))
    throw RuntimeError("generate_encoded: " + std::to_string(contexts.size()) + " contexts for " +
                       std::to_string(n_prompts + (guided ? 1 : 0)) + " prompts");
  std::vector<at::Tensor> segment_contexts;
  if (segmented) segment_contexts.assign(contexts.begin(), contexts.begin() + static_cast<std::ptrdiff_t>(n_prompts));

  at::Tensor noise = settings.noise.defined() ? settings.noise.to(at::kFloat) : seeded_noise(t2v_latent_shape(settings, geometry), settings.seed);
  if (settings.windows && settings.noise_reschedule == NoiseReschedule::Shuffle && !settings.noise.defined())
    noise = reschedule_noise(noise, settings.windows->context, settings.windows->overlap, sampler_noise_seed(settings.seed) + 1);
  if (settings.windows) {
    const std::int64_t latent_frames = noise.size(1);
    const auto windows = plan_windows(latent_frames, *settings.windows, 0);
    log_info("long video: " + std::to_string(latent_frames) + " latent frames denoised in " + std::to_string(windows.size()) +
             " windows of " + std::to_string(settings.windows->context) + " (overlap " + std::to_string(settings.windows->overlap) +
             ", " + name_of(settings.windows->schedule) + ", " + name_of(settings.windows->fuse) + " fusion, anchor " +
             name_of(settings.windows->anchor) + ", noise " + name_of(settings.noise_reschedule) + ") per step" +
             (segmented ? ", " + std::to_string(n_prompts) + " prompt segments" : std::string()));
  }
  at::Tensor clean;
  if (settings.strength < 1.0) clean = encode(settings.init_video);
  T2VResult result;
  result.latents = denoise(noise, contexts[0], guided ? contexts[n_prompts] : contexts[0], settings, on_step, clean, segment_contexts);
  release_dit();
  // Every rank holds the same latents (the DiT output is gathered each step); rank 0 decodes.
  // Sequence parallel: rank 0 decodes and writes; the other ranks stop at the latent.
  const bool main_rank = !options_.distributed || options_.distributed->is_main();
  if (main_rank) result.video = decode(result.latents);
  result.times = times_;

  auto sampler = make_sampler_for(settings);
  const double shift = settings.shift ? *settings.shift : (scheduler_config_ ? scheduler_config_->shift : 5.0);
  result.metadata = {
      {"prompt", settings.prompt},
      {"negative_prompt", negative},
      {"seed", settings.noise.defined() ? std::string("none (--noise file)") : std::to_string(settings.seed)},
      {"size", std::to_string(settings.width) + "x" + std::to_string(settings.height)},
      {"frames", std::to_string(settings.frames)},
      {"steps", std::to_string(sampler->num_steps())},
      {"sampler", settings.sampler == "euler-a" ? settings.sampler + " (eta " + number_text(settings.eta) + ")" : settings.sampler},
      {"shift", number_text(shift)},
      {"guidance", number_text(settings.guidance)},
      {"autoguidance", settings.autoguidance != 1.0 ? number_text(settings.autoguidance) + " (guide " + options_.guide_dit + ")" : "off"},
      {"guidance_terms", guidance_terms_text(settings)},
      {"model", files_.root.empty() ? files_.dit.front() : files_.root},
      {"software", "vdit"},
  };
  if (settings.hires) {
    const HiresOptions& h = *settings.hires;
    const auto& k = h.window.size;
    result.metadata["hires_method"] = hires_method_name(h.method);
    result.metadata["strength"] = number_text(settings.strength);
    result.metadata["attn_scale_factor"] = number_text(h.attn_scale_factor);
    if (h.method != HiresMethod::Direct)
      result.metadata["hires_window"] = (k[0] <= 0 ? std::string("all") : std::to_string(k[0])) + "," + std::to_string(k[1]) +
                                        "," + std::to_string(k[2]) + " tokens";
    if (h.method == HiresMethod::FreeSwim) {
      result.metadata["cross_cache_every"] = std::to_string(h.cross_cache_every);
      result.metadata["cache_device"] = h.cache_on_cpu ? "cpu" : "same";
      result.metadata["override_uncond"] = h.override_uncond ? "on" : "off";
    }
  }
  if (settings.windows) {
    const TemporalWindowOptions& w = *settings.windows;
    result.metadata["context_windows"] = "latent frames " + std::to_string(w.context) + ", overlap " + std::to_string(w.overlap) +
                                         ", schedule " + name_of(w.schedule) + ", fuse " + name_of(w.fuse) + ", anchor " +
                                         name_of(w.anchor) + ", noise reschedule " + name_of(settings.noise_reschedule);
    if (segmented) {
      std::string joined;
      for (const auto& p : settings.segment_prompts) joined += (joined.empty() ? "" : " | ") + p;
      result.metadata["prompts"] = joined;
    }
  }
  return result;
}

}  // namespace vdit
