// The one-loop refactor changed how `vdit generate` is put together, not what it computes: these
// runs give bitwise the latents the code before it gave (tests/fixtures/loop-golden/, written by
// that code's binary with the same arguments through the hidden [.loop-golden-write] case).
// The exceptions are the runs issue 38 item 8 corrects on purpose: a sampler other than the one a
// diffusers scheduler config names no longer inherits that config's sigma grid, so from a
// diffusers directory it now gives the latents the same model gives from single files.
#include <catch2/catch.hpp>

#include "cli_runner.h"
#include "test_helpers.h"
#include "tiny_models.h"
#include "vdit/io/safetensors.h"

#include <unistd.h>

#include <cstdlib>
#include <map>
#include <filesystem>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using vdit_test::bitwise_equal;
using vdit_test::run_vdit;

namespace {

struct GoldenRun {
  std::string name;   // file name under loop-golden/
  std::string model;  // "demo" | "tiny-original" | "tiny-diffusers"
  std::string args;   // after the model's common arguments
};

// Every sampler, batched and separate CFG, no CFG, and autoguidance (the model as its own guide, so
// the guide pass runs on a second loaded copy of the DiT).
const std::vector<GoldenRun>& golden_runs() {
  static const std::vector<GoldenRun> runs = [] {
    std::vector<GoldenRun> out;
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"unipc-cfg", ""},
        {"unipc-sep", "--no-batch-cfg"},
        {"nocfg", "-g 1"},
        {"dpm", "--sampler dpm++"},
        {"euler", "--sampler euler"},
        {"eulera", "--sampler euler-a"},
        {"auto", "--autoguidance 2 --guide-dit {model}"},
        {"auto-sep", "--autoguidance 2 --guide-dit {model} --no-batch-cfg"},
    };
    for (const std::string model : {"demo", "tiny-original", "tiny-diffusers"})
      for (const auto& [name, args] : cases) out.push_back({model + "-" + name, model, args});
    return out;
  }();
  return runs;
}

// Item 8: from a diffusers directory whose scheduler config names UniPC, these samplers now run
// with their own defaults.
bool corrected_on_purpose(const GoldenRun& run) {
  return run.model != "tiny-original" &&
         (run.args.find("dpm++") != std::string::npos || run.args.find("euler") != std::string::npos);
}

std::string golden_dir() { return std::string(VDIT_FIXTURES_DIR) + "/loop-golden"; }

// Model directories and the common arguments of each model.
struct Models {
  fs::path root;
  std::string dir(const std::string& model) const {
    return model == "demo" ? std::string(VDIT_SOURCE_DIR) + "/models/shapes" : (root / model).string();
  }
  std::string common(const std::string& model) const {
    if (model == "demo") return "generate -m " + dir(model) + " -p 'a red circle moving right' --steps 3 --seed 5";
    return "generate -m " + dir(model) + " -p 'a red circle moving right' --size 32x32 --frames 5 --steps 3 --shift 3 --seed 7";
  }
};

Models make_models(const std::string& tag) {
  Models m;
  m.root = fs::temp_directory_path() / ("vdit-loop-golden-" + tag + "-" + std::to_string(::getpid()));
  fs::remove_all(m.root);
  vdit_test::make_tiny_model(m.root / "tiny-original", "original");
  vdit_test::make_tiny_model(m.root / "tiny-diffusers", "diffusers");
  return m;
}

std::string arguments(const Models& m, const GoldenRun& run, const fs::path& latents) {
  std::string args = run.args;
  const auto at = args.find("{model}");
  if (at != std::string::npos) args.replace(at, 7, m.dir(run.model));
  return m.common(run.model) + " " + args + " --save-latents " + latents.string() + " -o " +
         (latents.parent_path() / (latents.stem().string() + ".png")).string() + " --format png --overwrite";
}

at::Tensor latents_of(const fs::path& file) { return vdit::SafetensorsFile::open(file.string())->tensor("latents").clone(); }

}  // namespace

// Writes the golden files with whatever binary this build has: run once on the code before a
// refactor (VDIT_GOLDEN_OUT=dir vdit_tests "[.loop-golden-write]"), never in CI.
TEST_CASE("write the loop golden latents", "[.loop-golden-write]") {
  const char* out = std::getenv("VDIT_GOLDEN_OUT");
  REQUIRE(out != nullptr);
  fs::create_directories(out);
  const Models m = make_models("write");
  for (const auto& run : golden_runs()) {
    INFO(run.name);
    std::string log;
    REQUIRE(run_vdit(arguments(m, run, fs::path(out) / (run.name + ".safetensors")), &log) == 0);
    fs::remove_all(fs::path(out) / (run.name + ".png"));
  }
  fs::remove_all(m.root);
}

TEST_CASE("vdit generate gives bitwise the latents of the code before the one-loop refactor", "[loop][cli]") {
  const Models m = make_models("check");
  const fs::path work = m.root / "out";
  fs::create_directories(work);
  std::map<std::string, at::Tensor> results;
  for (const auto& run : golden_runs()) {
    INFO(run.name);
    const fs::path latents = work / (run.name + ".safetensors");
    std::string log;
    REQUIRE(run_vdit(arguments(m, run, latents), &log) == 0);
    const at::Tensor now = latents_of(latents);
    results[run.name] = now;
    if (!corrected_on_purpose(run)) {
      CHECK(bitwise_equal(now, latents_of(fs::path(golden_dir()) / (run.name + ".safetensors"))));
    } else {
      // The old code gave something else (the diffusers grid carried over)...
      CHECK_FALSE(bitwise_equal(now, latents_of(fs::path(golden_dir()) / (run.name + ".safetensors"))));
    }
  }
  // ...and now every sampler gives from the diffusers directory what it gives from the single
  // files, up to what the two layouts store differently (the fixture's diffusers DiT is bf16 and
  // its umT5 f32, the single files the other way round): UniPC, the solver the scheduler config
  // names, differs by 0.018 for that reason alone; the old code put dpm++, euler and euler-a
  // 0.58-0.68 apart (latents of magnitude up to ~6).
  const auto apart = [&](const std::string& name) {
    return (results.at("tiny-original-" + name) - results.at("tiny-diffusers-" + name)).abs().max().item<double>();
  };
  for (const std::string name : {"unipc-cfg", "dpm", "euler", "eulera"}) {
    INFO(name << ": " << apart(name));
    CHECK(apart(name) < 0.03);
  }
  fs::remove_all(m.root);
}
