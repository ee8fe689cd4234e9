// The demo trainer's hyper-parameters: DemoTrainConfig's architecture defaults, its JSON reader
// (with the checks of every value) and writer, and the recipe files' "_base" overlays.
#include "train_internal.h"

#include "vdit/common.h"

#include <algorithm>
#include <string>
#include <vector>

namespace vdit::demo {

using namespace detail;

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
  if (j.contains("_base"))
    throw InputError("demo training config: \"_base\" names a file, so only DemoTrainConfig::from_file resolves it");
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

namespace {

// A recipe file's JSON with its "_base" chain resolved (see DemoTrainConfig::from_file): the base,
// read the same way, with this file's other keys merged over it as a JSON merge patch.
nlohmann::json read_recipe(const fs::path& path, std::vector<fs::path>& chain) {
  const fs::path canonical = fs::weakly_canonical(path);
  if (std::find(chain.begin(), chain.end(), canonical) != chain.end())
    throw InputError(path.string() + ": the \"_base\" chain leads back to this file");
  chain.push_back(canonical);
  nlohmann::json j = read_json(path.string());
  if (!j.is_object()) throw InputError(path.string() + ": a demo training config must be a JSON object");
  const auto base = j.find("_base");
  if (base == j.end()) return j;
  if (!base->is_string() || base->get<std::string>().empty())
    throw InputError(path.string() + ": \"_base\" must name a config file (relative to this file's folder)");
  nlohmann::json merged = read_recipe(path.parent_path() / base->get<std::string>(), chain);
  j.erase(base);
  merged.merge_patch(j);
  return merged;
}

}  // namespace

DemoTrainConfig DemoTrainConfig::from_file(const std::string& path) {
  std::vector<fs::path> chain;
  return from_json(read_recipe(path, chain));
}

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
}  // namespace vdit::demo
