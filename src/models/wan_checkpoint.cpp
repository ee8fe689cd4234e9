#include "vdit/models/wan_checkpoint.h"

#include "vdit/common.h"
#include "vdit/io/checkpoint.h"

#include <algorithm>
#include <filesystem>

namespace vdit {

namespace fs = std::filesystem;

const char* wan_component_name(WanComponent c) {
  switch (c) {
    case WanComponent::DiT: return "dit";
    case WanComponent::TextEncoder: return "text-encoder";
    case WanComponent::VAE: return "vae";
    default: return "unknown";
  }
}

namespace {

bool any_key(const WeightFile& file, const std::string& suffix) {
  for (const auto& k : file.keys())
    if (k.size() >= suffix.size() && k.compare(k.size() - suffix.size(), suffix.size(), suffix) == 0) return true;
  return false;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

std::vector<fs::path> list(const fs::path& dir, const std::string& prefix, const std::string& extension) {
  std::vector<fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file()) continue;
    if (starts_with(name, prefix) && name.size() >= extension.size() &&
        name.compare(name.size() - extension.size(), extension.size(), extension) == 0)
      out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string existing(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec) ? p.string() : std::string();
}

// Weights of a diffusers / original component directory: a sharded index if there is one, else
// the single safetensors file.
std::string weights_in(const fs::path& dir, const std::string& stem) {
  auto index = list(dir, stem, ".safetensors.index.json");
  if (!index.empty()) return index.front().string();
  auto files = list(dir, stem, ".safetensors");
  if (files.size() == 1) return files.front().string();
  if (files.size() > 1)
    throw InputError(dir.string() + ": " + std::to_string(files.size()) + " " + stem + "*.safetensors shards but no index.json");
  return "";
}

}  // namespace

WeightsKind classify_weights(const WeightFile& file) {
  WeightsKind kind;
  const bool comfy_prefix = any_key(file, "") && std::any_of(file.keys().begin(), file.keys().end(), [](const std::string& k) {
                              return starts_with(k, "model.diffusion_model.") || starts_with(k, "diffusion_model.");
                            });
  if (any_key(file, "blocks.0.self_attn.q.weight")) {
    kind.component = WanComponent::DiT;
    kind.key_layout = file.has("scaled_fp8") || any_key(file, ".scale_weight") ? "comfyui-fp8-scaled"
                      : comfy_prefix                                           ? "comfyui"
                                                                               : "original";
  } else if (any_key(file, "blocks.0.attn1.to_q.weight")) {
    kind = {WanComponent::DiT, "diffusers"};
  } else if (file.has("token_embedding.weight") && any_key(file, "blocks.0.attn.q.weight")) {
    kind = {WanComponent::TextEncoder, "original"};
  } else if (any_key(file, "encoder.block.0.layer.0.SelfAttention.q.weight")) {
    kind = {WanComponent::TextEncoder, file.has("spiece_model") ? "comfyui" : "hf"};
  } else if (any_key(file, "decoder.conv1.weight") && any_key(file, "encoder.conv1.weight")) {
    kind = {WanComponent::VAE, "original"};
  } else if (any_key(file, "decoder.conv_in.weight") && any_key(file, "encoder.conv_in.weight")) {
    kind = {WanComponent::VAE, "diffusers"};
  }
  return kind;
}

WanModelFiles locate_wan_model(const std::string& path, const WanModelOverrides& overrides, bool require_all) {
  WanModelFiles files;
  files.root = path;
  std::error_code ec;
  if (!path.empty()) {
    if (!fs::exists(path, ec)) throw InputError(path + ": no such model directory or file");
    if (!fs::is_directory(path, ec)) throw InputError(path + ": expected a model directory (use --dit/--text-encoder/--vae for single files)");
    const fs::path root(path);
    if (fs::exists(root / "model_index.json")) {
      files.layout = "diffusers";
      files.dit = {weights_in(root / "transformer", "diffusion_pytorch_model")};
      files.dit_config = existing(root / "transformer" / "config.json");
      files.text_encoder = weights_in(root / "text_encoder", "model");
      files.text_encoder_config = existing(root / "text_encoder" / "config.json");
      files.tokenizer = existing(root / "tokenizer" / "spiece.model");
      files.vae = weights_in(root / "vae", "diffusion_pytorch_model");
      files.vae_config = existing(root / "vae" / "config.json");
      files.scheduler_config = existing(root / "scheduler" / "scheduler_config.json");
    } else if (fs::is_directory(root / "diffusion_models") || fs::is_directory(root / "text_encoders")) {
      files.layout = "comfyui";
      auto dits = list(root / "diffusion_models", "", ".safetensors");
      auto wan_dits = dits;
      wan_dits.erase(std::remove_if(wan_dits.begin(), wan_dits.end(), [](const fs::path& p) {
                       std::string n = p.filename().string();
                       std::transform(n.begin(), n.end(), n.begin(), ::tolower);
                       return n.find("wan") == std::string::npos;
                     }), wan_dits.end());
      if (!wan_dits.empty()) dits = wan_dits;
      if (dits.size() > 1) log_warning(path + ": several diffusion models found; using " + dits.front().filename().string() + " (choose with --dit)");
      if (!dits.empty()) files.dit = {dits.front().string()};
      auto encoders = list(root / "text_encoders", "umt5", ".safetensors");
      if (!encoders.empty()) files.text_encoder = encoders.front().string();
      auto vaes = list(root / "vae", "wan", ".safetensors");
      if (vaes.empty()) vaes = list(root / "vae", "", ".safetensors");
      if (!vaes.empty()) files.vae = vaes.front().string();
    } else {
      files.layout = "original";
      std::string dit = weights_in(root, "diffusion_pytorch_model");
      if (!dit.empty()) files.dit = {dit};
      files.dit_config = existing(root / "config.json");
      files.text_encoder = existing(root / "models_t5_umt5-xxl-enc-bf16.pth");
      if (files.text_encoder.empty()) {
        auto pths = list(root, "models_t5", ".pth");
        if (!pths.empty()) files.text_encoder = pths.front().string();
      }
      files.tokenizer = existing(root / "google" / "umt5-xxl" / "spiece.model");
      files.vae = existing(root / "Wan2.1_VAE.pth");
    }
  } else {
    files.layout = "files";
  }
  if (!overrides.dit.empty()) files.dit = {overrides.dit};
  if (!overrides.dit_config.empty()) files.dit_config = overrides.dit_config;
  if (!overrides.text_encoder.empty()) files.text_encoder = overrides.text_encoder;
  if (!overrides.vae.empty()) files.vae = overrides.vae;
  if (!overrides.tokenizer.empty()) files.tokenizer = overrides.tokenizer;
  files.dit.erase(std::remove(files.dit.begin(), files.dit.end(), std::string()), files.dit.end());

  if (require_all) {
    const std::string where = path.empty() ? std::string("no model directory given") : path;
    if (files.dit.empty()) throw InputError(where + ": no DiT weights found (" + files.layout + " layout; give --dit)");
    if (files.text_encoder.empty()) throw InputError(where + ": no text-encoder weights found (" + files.layout + " layout; give --text-encoder)");
    if (files.vae.empty()) throw InputError(where + ": no VAE weights found (" + files.layout + " layout; give --vae)");
  }
  return files;
}

}  // namespace vdit
