// `vdit info PATH`: what a weights file or model directory holds (layout, family, size, tensor
// count, dtypes, parameters, config), or a one-line error.
#include "commands.h"

#include "vdit/common.h"
#include "vdit/io/checkpoint.h"
#include "vdit/io/input_file.h"
#include "vdit/models/umt5.h"
#include "vdit/models/wan_checkpoint.h"
#include "vdit/models/wan_dit.h"
#include "vdit/models/wan_vae.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <iostream>
#include <map>
#include <sstream>

namespace vdit::cli {

namespace {

std::string human_count(std::int64_t n) {
  char buf[32];
  if (n >= 1000000000) std::snprintf(buf, sizeof buf, "%.2fB", n / 1e9);
  else if (n >= 1000000) std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else if (n >= 1000) std::snprintf(buf, sizeof buf, "%.1fK", n / 1e3);
  else std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n));
  return buf;
}

nlohmann::json describe_weights(const std::string& path, const std::string& config_path) {
  auto file = WeightFile::open(path);
  const WeightsKind kind = classify_weights(*file);
  nlohmann::json j;
  j["path"] = path;
  j["format"] = file->format();
  j["component"] = wan_component_name(kind.component);
  j["key_layout"] = kind.key_layout.empty() ? "unknown" : kind.key_layout;
  j["tensors"] = file->keys().size();
  std::map<std::string, std::int64_t> dtypes;
  for (const auto& key : file->keys()) dtypes[file->meta(key).dtype] += 1;
  j["dtypes"] = dtypes;
  j["parameters"] = file->parameter_count();
  if (!file->metadata().empty()) j["metadata"] = file->metadata();

  switch (kind.component) {
    case WanComponent::DiT: {
      bool heads_known = true;
      WanDiTConfig config;
      if (!config_path.empty()) {
        config = WanDiTConfig::from_file(config_path);
      } else {
        try {
          config = WanDiTConfig::infer_from_weights(*file);
        } catch (const InputError&) {
          // Shapes settle everything but the head count; describe the rest and say what is missing.
          config = WanDiTConfig::infer_from_weights(*file, /*num_heads=*/1);
          heads_known = false;
        }
      }
      j["config_source"] = config_path.empty() ? "inferred from tensor shapes" : config_path;
      j["config"] = config.to_json();
      if (!heads_known) j["config"]["num_heads"] = "unknown (give --dit-config)";
      std::string family = "Wan2.1 T2V DiT";
      if (config == WanDiTConfig::t2v_1_3b()) family += " 1.3B";
      else if (config == WanDiTConfig::t2v_14b()) family += " 14B";
      else family += " (custom size, " + human_count(file->parameter_count()) + " parameters)";
      j["family"] = family;
      break;
    }
    case WanComponent::TextEncoder: {
      UMT5Config c = UMT5Config::infer_from_weights(*file);
      j["config_source"] = "inferred from tensor shapes";
      j["config"] = {{"vocab", c.vocab}, {"dim", c.dim}, {"dim_attn", c.dim_attn}, {"dim_ffn", c.dim_ffn},
                     {"num_heads", c.num_heads}, {"num_layers", c.num_layers}, {"num_buckets", c.num_buckets}};
      j["family"] = c.dim == 4096 && c.num_layers == 24 ? "umT5-XXL encoder" : "umT5 encoder (custom size)";
      if (file->has("spiece_model")) j["tokenizer"] = "embedded spiece_model tensor";
      break;
    }
    case WanComponent::VAE: {
      WanVAEConfig c = WanVAEConfig::infer_from_weights(*file);
      j["config_source"] = "inferred from tensor shapes";
      std::vector<bool> td = c.temporal_downsample;
      j["config"] = {{"dim", c.dim}, {"z_dim", c.z_dim}, {"dim_mult", c.dim_mult}, {"num_res_blocks", c.num_res_blocks},
                     {"temperal_downsample", td}, {"stride", {c.temporal_stride(), c.spatial_stride(), c.spatial_stride()}}};
      j["family"] = c.dim == 96 ? "Wan2.1 causal 3D VAE" : "Wan2.1 causal 3D VAE (custom width)";
      break;
    }
    default:
      j["family"] = "not a Wan2.1 component";
  }
  return j;
}

void print_component(const std::string& title, const nlohmann::json& j) {
  std::cout << title << ": " << j.value("family", std::string("?")) << "\n";
  std::cout << "  file:        " << j["path"].get<std::string>() << " (" << j["format"].get<std::string>() << ", "
            << j["key_layout"].get<std::string>() << " key names)\n";
  std::cout << "  tensors:     " << j["tensors"].get<std::int64_t>() << "\n";
  std::cout << "  dtypes:     ";
  for (auto it = j["dtypes"].begin(); it != j["dtypes"].end(); ++it) std::cout << " " << it.key() << "=" << it.value().get<std::int64_t>();
  std::cout << "\n";
  std::cout << "  parameters:  " << j["parameters"].get<std::int64_t>() << " (" << human_count(j["parameters"].get<std::int64_t>()) << ")\n";
  if (j.contains("config")) std::cout << "  config (" << j["config_source"].get<std::string>() << "): " << j["config"].dump() << "\n";
  if (j.contains("tokenizer")) std::cout << "  tokenizer:   " << j["tokenizer"].get<std::string>() << "\n";
}

}  // namespace

void register_info_command(CLI::App& app, GlobalOptions& global) {
  struct Options {
    std::string path;
    bool json = false;
    WanModelOverrides overrides;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("info", "Describe a weights file or a model directory (layout, family, size, dtypes, config)");
  cmd->add_option("path", opts->path, "A .safetensors / .safetensors.index.json / .pth file, or a model directory")->required();
  cmd->add_flag("--json", opts->json, "Print one JSON object instead of text");
  cmd->add_option("--dit-config", opts->overrides.dit_config, "config.json for a single-file DiT (original or diffusers keys)");
  cmd->callback([opts] {
    namespace fs = std::filesystem;
    // Before anything opens it: a FIFO would block the read, a symlink loop is named as one.
    check_input_path(opts->path, "", InputKind::FileOrDirectory);
    if (!opts->overrides.dit_config.empty()) check_input_path(opts->overrides.dit_config, "--dit-config");
    nlohmann::json report;
    std::error_code ec;
    if (fs::is_directory(opts->path, ec)) {
      WanModelFiles files = locate_wan_model(opts->path, opts->overrides, /*require_all=*/false);
      report["model_dir"] = opts->path;
      report["layout"] = files.layout;
      if (!files.dit.empty()) report["dit"] = describe_weights(files.dit.front(), files.dit_config);
      if (!files.text_encoder.empty()) report["text_encoder"] = describe_weights(files.text_encoder, "");
      if (!files.vae.empty()) report["vae"] = describe_weights(files.vae, "");
      report["tokenizer"] = files.tokenizer.empty() ? "none found" : files.tokenizer;
      if (!files.scheduler_config.empty()) report["scheduler_config"] = files.scheduler_config;
      if (files.dit.empty() && files.text_encoder.empty() && files.vae.empty())
        throw InputError(opts->path + ": no Wan2.1 model files found in this directory");
    } else {
      report = describe_weights(opts->path, opts->overrides.dit_config);
    }
    if (opts->json) {
      std::cout << report.dump() << std::endl;
      return;
    }
    if (report.contains("model_dir")) {
      std::cout << "model directory: " << opts->path << " (" << report["layout"].get<std::string>() << " layout)\n";
      if (report.contains("dit")) print_component("dit", report["dit"]);
      if (report.contains("text_encoder")) print_component("text encoder", report["text_encoder"]);
      if (report.contains("vae")) print_component("vae", report["vae"]);
      std::cout << "tokenizer: " << report["tokenizer"].get<std::string>() << "\n";
    } else {
      print_component(report["component"].get<std::string>(), report);
    }
  });
}

}  // namespace vdit::cli
