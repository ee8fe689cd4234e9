// `vdit edit` on the command line (issue 42): bad input is one line, exit 2, nothing written,
// before any model loads; a small edit run on the demo model writes both rows with metadata
// naming both prompts and every control.
#include <catch2/catch.hpp>

#include "cli_runner.h"
#include "test_helpers.h"

#include "vdit/io/image_io.h"
#include "vdit/io/safetensors.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <string>

namespace fs = std::filesystem;
using vdit_test::run_vdit;

namespace {

bool demo_model_present() { return fs::exists(fs::path(VDIT_SOURCE_DIR) / "models" / "shapes" / "model_index.json"); }

std::set<std::string> listing(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) out.insert(e.path().string());
  return out;
}

int lines(const std::string& text) {
  int n = 0;
  for (char c : text) n += c == '\n';
  return n;
}

}  // namespace

TEST_CASE("vdit edit: bad input is one line, exit 2, and nothing written", "[cli][edit]") {
  if (!demo_model_present()) {
    WARN("the built-in demo model (models/shapes) is not in this checkout; skipped");
    return;
  }
  vdit_test::ScopedTempDir root("edit-cli");
  const std::string R = root.path.string();
  std::ofstream(root / "not_an_image.png") << "not really a png";
  fs::create_directories(root.path / "three_frames");
  for (int i = 1; i <= 3; ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "frame_%05d.png", i);
    vdit::write_image((root.path / "three_frames" / name).string(), at::zeros({3, 64, 64}));
  }
  const std::string base = "edit -p 'a red circle moving left' --target-prompt 'a blue circle moving left' --steps 2 -o " + R + "/out.mp4 ";
  struct Row {
    std::string args, message;
  };
  const std::vector<Row> rows = {
      {base + "--reweight square=2", "no word 'square' in the target prompt"},
      {base + "--reweight red=2", "no word 'red' in the target prompt"},
      {base + "--reweight blue", "--reweight must be WORD=FACTOR"},
      {base + "--reweight blue=lots", "is not a finite number"},
      {base + "--blend square", "no word 'square' in the source or the target prompt"},
      {base + "--cross-replace 1.5", "--cross-replace must be in [0, 1]"},
      {base + "--self-replace -0.1", "--self-replace must be in [0, 1]"},
      {base + "--edit-layers 9", "layer 9 does not exist (the model has 4 layers)"},
      {base + "--edit-layers 1,x", "--edit-layers must list layer indices"},
      {base + "--input " + R + "/missing.png", "missing.png"},
      {base + "--input " + R + "/not_an_image.png", "not_an_image.png"},
      {base + "--input " + R + "/three_frames", "three_frames"},
      {base + "--input " + R + "/three_frames --sampler unipc", "--sampler must be euler"},
      {base + "--inversion newton --input " + R + "/not_an_image.png", "--inversion must be euler or fixed-point"},
      {base + "--inversion-steps 3", "--inversion-steps needs --input"},
      {base + "--source-out " + R + "/out.mp4", "--source-out and -o name the same file"},
  };
  const auto before = listing(root.path);
  for (const Row& row : rows) {
    std::string output;
    const int code = run_vdit(row.args, output);
    INFO("vdit " << row.args);
    INFO("output: " << output);
    CHECK(code == 2);
    CHECK(lines(output) == 1);
    CHECK(output.find(row.message) != std::string::npos);
    CHECK(listing(root.path) == before);
  }
}

TEST_CASE("vdit edit: identical prompts write the source twice, metadata names both prompts and every control", "[cli][edit]") {
  if (!demo_model_present()) {
    WARN("the built-in demo model (models/shapes) is not in this checkout; skipped");
    return;
  }
  vdit_test::ScopedTempDir root("edit-run");
  const std::string R = root.path.string();
  const std::string common = "--steps 3 --seed 7 --cross-replace 0.5 --self-replace 0.3 --blend red --reweight red=1 ";
  std::string output;
  REQUIRE(run_vdit("--quiet edit -p 'a red circle moving left' --target-prompt 'a red circle moving left' " + common + "-o " + R +
                       "/edit.mp4 --save-latents " + R + "/edit.safetensors --source-out " + R + "/source.mp4",
                   output) == 0);
  REQUIRE(fs::exists(root.path / "edit.mp4"));
  REQUIRE(fs::exists(root.path / "source.mp4"));
  auto file = vdit::SafetensorsFile::open(R + "/edit.safetensors");
  const auto& m = file->metadata();
  CHECK(m.at("source_prompt") == "a red circle moving left");
  CHECK(m.at("target_prompt") == "a red circle moving left");
  CHECK(m.at("edit_kind") == "identity");
  CHECK(m.at("edit_controls") ==
        "cross_replace 0.5, self_replace 0.3, edit_layers all, reweight red=1, blend red (threshold 0.3)");
  CHECK(m.at("seed") == "7");

  // A swap, the same seed: a different latent; --save-latents holds the edit (the target row).
  REQUIRE(run_vdit("--quiet edit -p 'a red circle moving left' --target-prompt 'a blue circle moving left' " + common +
                       "--reweight blue=1 -o " + R + "/swap.mp4 --save-latents " + R + "/swap.safetensors",
                   output) == 2);  // red is not in the target prompt: refused
  REQUIRE(run_vdit("--quiet edit -p 'a red circle moving left' --target-prompt 'a blue circle moving left' --steps 3 --seed 7 -o " +
                       R + "/swap.mp4 --save-latents " + R + "/swap.safetensors",
                   output) == 0);
  auto swap = vdit::SafetensorsFile::open(R + "/swap.safetensors");
  CHECK(swap->metadata().at("edit_kind") == "swap red->blue");
  CHECK(!vdit_test::bitwise_equal(swap->tensor("latents"), file->tensor("latents")));
}
