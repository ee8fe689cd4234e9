// Builds tiny Wan2.1 model directories in the original, diffusers and ComfyUI layouts from the
// golden fixture weights (DiT, VAE) and a random-initialised umT5 sized to the test tokenizer,
// so every layout goes through the same loading code as a real checkpoint.
#pragma once

#include "vdit/io/checkpoint.h"
#include "vdit/io/safetensors.h"
#include "vdit/models/tokenizer.h"
#include "vdit/models/umt5.h"
#include "vdit/models/wan_dit.h"

#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <string>

namespace vdit_test {

namespace fs = std::filesystem;

inline std::string fixture(const std::string& rel) { return std::string(VDIT_FIXTURES_DIR) + "/" + rel; }

inline std::vector<vdit::WriteEntry> entries_of(const vdit::WeightFile& file, const std::function<std::string(const std::string&)>& rename) {
  std::vector<vdit::WriteEntry> out;
  for (const auto& key : file.keys()) out.push_back({rename(key), file.load(key), std::nullopt});
  return out;
}

// umT5 original key -> HF / ComfyUI key.
inline std::string t5_hf_name(const std::string& key) {
  static const std::vector<std::pair<std::regex, std::string>> rules = {
      {std::regex(R"(^token_embedding\.weight$)"), "shared.weight"},
      {std::regex(R"(^norm\.weight$)"), "encoder.final_layer_norm.weight"},
      {std::regex(R"(^blocks\.(\d+)\.norm1\.weight$)"), "encoder.block.$1.layer.0.layer_norm.weight"},
      {std::regex(R"(^blocks\.(\d+)\.attn\.([qkvo])\.weight$)"), "encoder.block.$1.layer.0.SelfAttention.$2.weight"},
      {std::regex(R"(^blocks\.(\d+)\.pos_embedding\.embedding\.weight$)"), "encoder.block.$1.layer.0.SelfAttention.relative_attention_bias.weight"},
      {std::regex(R"(^blocks\.(\d+)\.norm2\.weight$)"), "encoder.block.$1.layer.1.layer_norm.weight"},
      {std::regex(R"(^blocks\.(\d+)\.ffn\.gate\.0\.weight$)"), "encoder.block.$1.layer.1.DenseReluDense.wi_0.weight"},
      {std::regex(R"(^blocks\.(\d+)\.ffn\.fc1\.weight$)"), "encoder.block.$1.layer.1.DenseReluDense.wi_1.weight"},
      {std::regex(R"(^blocks\.(\d+)\.ffn\.fc2\.weight$)"), "encoder.block.$1.layer.1.DenseReluDense.wo.weight"},
  };
  for (const auto& [re, repl] : rules)
    if (std::regex_match(key, re)) return std::regex_replace(key, re, repl);
  return key;
}

// A random umT5 (dim 32 = the tiny DiT's text_dim) whose vocab covers the test tokenizer.
inline std::vector<vdit::WriteEntry> tiny_t5_entries(bool hf_names) {
  auto tokenizer = vdit::WanTokenizer::from_file(fixture("tokenizer/tiny_unigram.model"));
  vdit::UMT5Config config;
  config.vocab = tokenizer.vocab_size();
  config.dim = 32;
  config.dim_attn = 32;
  config.dim_ffn = 64;
  config.num_heads = 4;
  config.num_layers = 2;
  config.num_buckets = 32;
  torch::manual_seed(11);
  vdit::UMT5Encoder model(config);
  std::vector<vdit::WriteEntry> out;
  for (const auto& p : model->named_parameters())
    out.push_back({hf_names ? t5_hf_name(p.key()) : p.key(), p.value().detach().clone(), std::nullopt});
  return out;
}

// The wan-tiny golden DiT (2 layers, dim 64) in f32, ready for inference.
inline vdit::WanDiT load_tiny_dit() {
  auto weights = vdit::WeightFile::open(fixture("wan-tiny/dit/weights.safetensors"));
  vdit::WanDiT dit(vdit::WanDiTConfig::from_file(fixture("wan-tiny/e2e/dit_config.json")));
  vdit::load_wan_dit_weights(dit, {weights}, at::kFloat);
  dit->eval();
  return dit;
}

inline void write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << text;
}

// layout: "original" | "diffusers" | "comfyui". Returns the model directory.
inline fs::path make_tiny_model(const fs::path& dir, const std::string& layout) {
  fs::create_directories(dir);
  auto dit = vdit::WeightFile::open(fixture("wan-tiny/dit/weights.safetensors"));
  auto same = [](const std::string& k) { return k; };
  const std::string dit_config = R"({"model_type":"t2v","dim":64,"ffn_dim":128,"freq_dim":32,"in_dim":16,"out_dim":16,"num_heads":2,"num_layers":2,"patch_size":[1,2,2],"text_dim":32,"text_len":512,"eps":1e-6,"qk_norm":true,"cross_attn_norm":true,"window_size":[-1,-1]})";
  if (layout == "original") {
    vdit::write_safetensors((dir / "diffusion_pytorch_model.safetensors").string(), entries_of(*dit, same));
    write_text(dir / "config.json", dit_config);
    // The original release ships the text encoder as a torch.save zip (.pth): write one.
    c10::Dict<std::string, at::Tensor> state;
    for (const auto& e : tiny_t5_entries(false)) state.insert(e.name, e.tensor.to(at::kBFloat16));
    const std::vector<char> zip = torch::pickle_save(c10::IValue(state));
    std::ofstream(dir / "models_t5_umt5-xxl-enc-bf16.pth", std::ios::binary).write(zip.data(), static_cast<std::streamsize>(zip.size()));
    fs::copy_file(fixture("wan-tiny/vae/weights.pth"), dir / "Wan2.1_VAE.pth");
    fs::create_directories(dir / "google" / "umt5-xxl");
    fs::copy_file(fixture("tokenizer/tiny_unigram.model"), dir / "google" / "umt5-xxl" / "spiece.model");
  } else if (layout == "diffusers") {
    write_text(dir / "model_index.json", R"({"_class_name":"WanPipeline"})");
    fs::create_directories(dir / "transformer");
    fs::copy_file(fixture("wan-tiny/dit/weights_diffusers_bf16.safetensors"), dir / "transformer" / "diffusion_pytorch_model.safetensors");
    write_text(dir / "transformer" / "config.json",
               R"({"_class_name":"WanTransformer3DModel","num_attention_heads":2,"attention_head_dim":32,"in_channels":16,"out_channels":16,"ffn_dim":128,"freq_dim":32,"num_layers":2,"patch_size":[1,2,2],"text_dim":32,"eps":1e-6,"qk_norm":"rms_norm_across_heads","cross_attn_norm":true})");
    fs::create_directories(dir / "text_encoder");
    vdit::write_safetensors((dir / "text_encoder" / "model.safetensors").string(), tiny_t5_entries(true));
    fs::create_directories(dir / "tokenizer");
    fs::copy_file(fixture("tokenizer/tiny_unigram.model"), dir / "tokenizer" / "spiece.model");
    fs::create_directories(dir / "vae");
    fs::copy_file(fixture("wan-tiny/vae/weights_diffusers_f16.safetensors"), dir / "vae" / "diffusion_pytorch_model.safetensors");
    write_text(dir / "scheduler" / "scheduler_config.json",
               R"({"_class_name":"UniPCMultistepScheduler","num_train_timesteps":1000,"prediction_type":"flow_prediction","use_flow_sigmas":true,"flow_shift":3.0,"solver_order":2,"predict_x0":true,"solver_type":"bh2","lower_order_final":true})");
  } else {
    fs::create_directories(dir / "diffusion_models");
    vdit::write_safetensors((dir / "diffusion_models" / "wan2.1_t2v_tiny.safetensors").string(),
                            entries_of(*dit, [](const std::string& k) { return "model.diffusion_model." + k; }));
    fs::create_directories(dir / "text_encoders");
    auto t5 = tiny_t5_entries(true);
    std::ifstream spm(fixture("tokenizer/tiny_unigram.model"), std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(spm)), {});
    at::Tensor spiece = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
    std::memcpy(spiece.data_ptr(), bytes.data(), bytes.size());
    t5.push_back({"spiece_model", spiece, std::nullopt});
    vdit::write_safetensors((dir / "text_encoders" / "umt5_tiny.safetensors").string(), t5);
    fs::create_directories(dir / "vae");
    fs::copy_file(fixture("wan-tiny/vae/weights.safetensors"), dir / "vae" / "wan_2.1_vae.safetensors");
  }
  return dir;
}

}  // namespace vdit_test
