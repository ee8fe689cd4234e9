#include <catch2/catch.hpp>

#include "cli_runner.h"

#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;

namespace {

using vdit_test::run_vdit;

}  // namespace

TEST_CASE("vdit info describes every fixture checkpoint", "[cli][info]") {
  struct Expect {
    std::string file, component, layout, format, dtype;
    std::int64_t tensors;
  };
  const std::string dir = std::string(VDIT_FIXTURES_DIR) + "/wan-tiny/";
  const std::vector<Expect> expected = {
      {"dit/weights.safetensors", "dit", "original", "safetensors", "F32", 69},
      {"dit/weights_f16.safetensors", "dit", "original", "safetensors", "F16", 69},
      {"dit/weights_diffusers_bf16.safetensors", "dit", "diffusers", "safetensors", "BF16", 69},
      {"t5/weights.safetensors", "text-encoder", "original", "safetensors", "F32", 22},
      {"t5/weights_bf16.safetensors", "text-encoder", "original", "safetensors", "BF16", 22},
      {"t5/weights_bf16.pth", "text-encoder", "original", "pth", "BF16", 22},
      {"t5/weights_hf_f16.safetensors", "text-encoder", "hf", "safetensors", "F16", 22},
      {"vae/weights.safetensors", "vae", "original", "safetensors", "F32", 194},
      {"vae/weights.pth", "vae", "original", "pth", "F32", 194},
      {"vae/weights_diffusers_f16.safetensors", "vae", "diffusers", "safetensors", "F16", 194},
  };
  for (const auto& e : expected) {
    INFO(e.file);
    std::string out;
    REQUIRE(run_vdit("info --json " + dir + e.file, out) == 0);
    const auto j = nlohmann::json::parse(out);
    CHECK(j["component"] == e.component);
    CHECK(j["key_layout"] == e.layout);
    CHECK(j["format"] == e.format);
    CHECK(j["tensors"] == e.tensors);
    CHECK(j["dtypes"].size() == 1);
    CHECK(j["dtypes"][e.dtype] == e.tensors);
    if (e.component == "dit") {
      CHECK(j["config"]["dim"] == 64);
      CHECK(j["config"]["num_layers"] == 2);
      CHECK(j["config"]["text_dim"] == 32);
      CHECK(j["parameters"] == 147200);
    } else if (e.component == "text-encoder") {
      CHECK(j["config"]["dim"] == 32);
      CHECK(j["config"]["num_heads"] == 4);
      CHECK(j["config"]["vocab"] == 100);
    } else {
      CHECK(j["config"]["dim"] == 4);
      CHECK(j["config"]["z_dim"] == 16);
    }
  }
  // With the config the head count is known too.
  std::string out;
  REQUIRE(run_vdit("info --json " + dir + "dit/weights.safetensors --dit-config " + dir + "e2e/dit_config.json", out) == 0);
  CHECK(nlohmann::json::parse(out)["config"]["num_heads"] == 2);
}
