// libFuzzer target for the JSON configs a user hands vdit: the model configs (WanDiTConfig and
// WanVAEConfig::from_json, as read from a model directory's config.json; the demo trainer's
// --train-config hands its "vae" and "dit" objects to the same two), a scheduler_config.json
// (from_scheduler_config) and the CLI's --config files (src/cli/json_config.h). The rest of
// DemoTrainConfig::from_json is not here: src/demo/train_config.cpp links the whole trainer.
// Every input goes to all of them; each must accept it or raise InputError (the CLI reader:
// CLI::ConversionError).
#include "vdit/common.h"
#include "vdit/models/wan_dit.h"
#include "vdit/models/wan_vae.h"
#include "vdit/samplers/sampler.h"
#include "cli/json_config.h"

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  vdit::set_log_level(vdit::LogLevel::Quiet);  // the readers warn about unknown keys
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    (void)vdit::from_scheduler_config(text, "fuzz");
  } catch (const vdit::InputError&) {
  }
  try {
    std::istringstream in(text);
    (void)vdit::cli::JsonConfig().from_config(in);
  } catch (const CLI::ConversionError&) {
  }
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    (void)vdit::WanDiTConfig::from_json(j);
  } catch (const vdit::InputError&) {
  }
  try {
    (void)vdit::WanVAEConfig::from_json(j);
  } catch (const vdit::InputError&) {
  }
  return 0;
}
