// Finding the parts of a Wan2.1 T2V model on disk, in any of the three layouts vdit reads:
//   original  - diffusion_pytorch_model*.safetensors, config.json, models_t5_umt5-xxl-enc-bf16.pth,
//               Wan2.1_VAE.pth, google/umt5-xxl/spiece.model
//   diffusers - model_index.json with transformer/ text_encoder/ tokenizer/ vae/ scheduler/
//   comfyui   - diffusion_models/*.safetensors, text_encoders/umt5*.safetensors, vae/*.safetensors
// and classifying a single weights file by its keys.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace vdit {

class WeightFile;

enum class WanComponent { Unknown, DiT, TextEncoder, VAE };
const char* wan_component_name(WanComponent c);  // "dit", "text-encoder", "vae", "unknown"

// Which model a weights file holds, and in which key layout ("original", "diffusers", "hf",
// "comfyui", "comfyui-fp8-scaled").
struct WeightsKind {
  WanComponent component = WanComponent::Unknown;
  std::string key_layout;
};
WeightsKind classify_weights(const WeightFile& file);

struct WanModelFiles {
  std::string root;
  std::string layout;  // "original" | "diffusers" | "comfyui" | "files"
  std::vector<std::string> dit;       // one file, or a sharded index
  std::string dit_config;             // config.json (original or diffusers keys), may be empty
  std::string text_encoder;           // weights file (a sharded index for diffusers)
  std::string text_encoder_config;
  std::string tokenizer;              // spiece.model, or empty (use the `spiece_model` tensor)
  std::string vae;
  std::string vae_config;
  std::string scheduler_config;       // diffusers scheduler_config.json, may be empty
};

// Per-part overrides (--dit, --text-encoder, --vae, --tokenizer, --dit-config); empty: detect.
struct WanModelOverrides {
  std::string dit, dit_config, text_encoder, vae, tokenizer;
};

// Finds every part under `path` (a model directory, or empty when all parts are overridden).
// Throws InputError naming what is missing. Parts not needed by a command may stay empty when
// `require_all` is false.
WanModelFiles locate_wan_model(const std::string& path, const WanModelOverrides& overrides = {},
                               bool require_all = true);

}  // namespace vdit
