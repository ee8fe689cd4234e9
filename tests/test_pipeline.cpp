#include <catch2/catch.hpp>

#include "cli_runner.h"
#include "tiny_models.h"
#include "vdit/common.h"
#include "vdit/io/image_io.h"
#include "vdit/io/safetensors.h"
#include "vdit/io/video_io.h"
#include "vdit/pipelines/wan_t2v.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>

namespace fs = std::filesystem;
using namespace vdit;
using vdit_test::fixture;

namespace {

fs::path temp_dir(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("vdit-test-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) { return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>(); }

using vdit_test::run_vdit;

// The tiny reference model's DiT and VAE (no text encoder: the tests pass the fixture's contexts).
WanModelFiles tiny_model_files() {
  WanModelFiles files;
  files.dit = {fixture("wan-tiny/dit/weights.safetensors")};
  files.dit_config = fixture("wan-tiny/e2e/dit_config.json");
  files.vae = fixture("wan-tiny/vae/weights.safetensors");
  return files;
}

// A short guided run at the tiny model's size (48x32, 9 frames).
T2VSettings tiny_settings(const std::string& sampler, int steps) {
  T2VSettings settings;
  settings.width = 48;
  settings.height = 32;
  settings.frames = 9;
  settings.steps = steps;
  settings.sampler = sampler;
  settings.guidance = 5.0;
  return settings;
}

}  // namespace

TEST_CASE("seeded noise equals torch.randn with a seeded CPU generator", "[pipeline]") {
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  at::Tensor noise = file->tensor("noise");
  CHECK(at::equal(seeded_noise({16, 3, 4, 6}, 5002), noise));
}

TEST_CASE("end-to-end generate reproduces the reference WanT2V.generate", "[pipeline][e2e]") {
  // Tolerances from e2e/manifest.json: x0 and video atol = rtol = 1e-3.
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  WanT2VPipeline pipeline(tiny_model_files(), WanT2VOptions{});

  T2VSettings settings = tiny_settings("unipc", 4);
  settings.shift = 5.0;
  for (const auto& [solver, name] : std::vector<std::pair<std::string, std::string>>{{"unipc", "unipc"}, {"dpm++", "dpmpp"}}) {
    for (bool batched : {true, false}) {
      INFO("solver " << solver << (batched ? " batched cond/uncond" : " separate passes"));
      settings.sampler = solver;
      settings.batch_guidance = batched;
      const std::vector<std::int64_t> expected_t = name == "unipc" ? std::vector<std::int64_t>{999, 937, 833, 624}
                                                                   : std::vector<std::int64_t>{1000, 937, 833, 625};
      CHECK(pipeline.make_sampler_for(settings)->timesteps() == expected_t);
      at::Tensor x0 = pipeline.denoise(file->tensor("noise"), file->tensor("context_positive"), file->tensor("context_negative"), settings);
      at::Tensor ref_x0 = file->tensor(name + ".x0");
      const double x0_err = max_abs_diff(x0, ref_x0);
      WARN(solver << (batched ? " batched" : " separate") << ": max |x0 - ref| = " << x0_err);
      CHECK(at::allclose(x0, ref_x0, 1e-3, 1e-3));
      if (batched) {
        at::Tensor video = pipeline.decode(x0);
        at::Tensor ref_video = file->tensor(name + ".video");
        REQUIRE(video.sizes() == ref_video.sizes());
        WARN(solver << ": max |video - ref| = " << max_abs_diff(video, ref_video));
        CHECK(at::allclose(video, ref_video, 1e-3, 1e-3));
      }
    }
  }
}

TEST_CASE("a sample-predicting model's guided output becomes the velocity before each step", "[pipeline]") {
  // One Euler step from sigma 1 to 0 ends a velocity model at noise - output and a sample model at
  // its output, so with the same weights the two runs satisfy x_sample = noise - x_velocity.
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  const fs::path dir = temp_dir("sample-prediction");
  vdit_test::write_text(dir / "velocity.json", R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0})");
  vdit_test::write_text(dir / "sample.json",
                        R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0, "prediction_type": "sample"})");
  WanModelFiles files = tiny_model_files();
  files.scheduler_config = (dir / "velocity.json").string();
  WanT2VPipeline velocity_model(files, WanT2VOptions{});
  files.scheduler_config = (dir / "sample.json").string();
  WanT2VPipeline sample_model(files, WanT2VOptions{});

  T2VSettings settings = tiny_settings("euler", 1);
  REQUIRE(sample_model.make_sampler_for(settings)->sigmas() == std::vector<float>{1.0f, 0.0f});
  const at::Tensor noise = file->tensor("noise");
  const at::Tensor x_velocity = velocity_model.denoise(noise, file->tensor("context_positive"), file->tensor("context_negative"), settings);
  const at::Tensor x_sample = sample_model.denoise(noise, file->tensor("context_positive"), file->tensor("context_negative"), settings);
  CHECK(max_abs_diff(x_velocity, noise) > 1e-2);  // the model did something
  CHECK(at::allclose(x_sample, noise - x_velocity, 1e-5, 1e-5));
  // Another solver than the scheduler config's keeps what the model predicts.
  settings.sampler = "unipc";
  CHECK(sample_model.make_sampler_for(settings)->config().prediction == ModelPrediction::Sample);
  CHECK(velocity_model.make_sampler_for(settings)->config().prediction == ModelPrediction::Velocity);
  fs::remove_all(dir);
}

TEST_CASE("autoguidance adds (w - 1) x (output - guide output), a guide equal to the model changes nothing", "[pipeline]") {
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  const fs::path dir = temp_dir("autoguidance");
  // A guide whose output head is zeroed predicts exactly 0, so the autoguided velocity is w x v.
  auto weights = SafetensorsFile::open(fixture("wan-tiny/dit/weights.safetensors"));
  std::vector<WriteEntry> zero_head;
  int zeroed = 0;
  for (const auto& entry : weights->entries()) {
    at::Tensor t = weights->tensor(entry).clone();
    if (entry.name.rfind("head.head.", 0) == 0) t.zero_(), ++zeroed;
    zero_head.push_back(WriteEntry{entry.name, t, std::nullopt});
  }
  REQUIRE(zeroed == 2);
  const fs::path zero_guide = dir / "zero-head.safetensors";
  write_safetensors(zero_guide.string(), zero_head);

  T2VSettings settings = tiny_settings("euler", 1);  // one Euler step, sigma 1 -> 0: x = noise - v
  settings.guidance = 1.0;                           // no CFG, so the output is the conditional one
  const at::Tensor noise = file->tensor("noise");
  const auto run = [&](const std::string& guide, double w) {
    WanT2VOptions options;
    options.guide_dit = guide;
    WanT2VPipeline pipeline(tiny_model_files(), options);
    settings.autoguidance = w;
    return pipeline.denoise(noise, file->tensor("context_positive"), file->tensor("context_negative"), settings);
  };
  const at::Tensor plain = run("", 1.0);
  const at::Tensor velocity = noise - plain;
  REQUIRE(velocity.abs().max().item<double>() > 1e-2);
  CHECK(at::allclose(run(zero_guide.string(), 2.5), noise - 2.5 * velocity, 1e-5, 1e-5));
  // The model as its own guide: output - guide output is exactly 0.
  CHECK(at::equal(run(fixture("wan-tiny/dit/weights.safetensors"), 3.0), plain));
  // With CFG on, the guide term adds to the CFG output (the conditional output comes from the
  // batched cond/uncond forward, the guide's from a batch of one: equal up to rounding).
  settings.guidance = 5.0;
  CHECK(at::allclose(run(fixture("wan-tiny/dit/weights.safetensors"), 3.0), run("", 1.0), 1e-5, 1e-5));
  // Bad guides: none given, a missing path, another latent width.
  CHECK_THROWS_WITH(run("", 2.0), Catch::Contains("--guide-dit"));
  CHECK_THROWS_WITH(run((dir / "missing.safetensors").string(), 2.0), Catch::Contains("no such guide DiT"));
  settings.autoguidance = std::nan("");
  CHECK_THROWS_WITH(validate_t2v_settings(settings), Catch::Contains("--autoguidance"));
  fs::remove_all(dir);
}

TEST_CASE("euler-a in the pipeline: the run's seed fixes its noise, eta 0 is Euler", "[pipeline]") {
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  WanT2VPipeline pipeline(tiny_model_files(), WanT2VOptions{});
  T2VSettings settings = tiny_settings("euler-a", 4);
  settings.seed = 7;
  const at::Tensor noise = file->tensor("noise");
  const auto run = [&] {
    return pipeline.denoise(noise, file->tensor("context_positive"), file->tensor("context_negative"), settings);
  };
  const at::Tensor first = run();
  CHECK(at::equal(run(), first));  // same seed, same inputs: the same latents
  settings.seed = 8;               // same starting noise, another stream of per-step noise
  CHECK(max_abs_diff(run(), first) > 1e-3);
  settings.eta = 0.0;
  const at::Tensor deterministic = run();
  settings.sampler = "euler";
  CHECK(at::allclose(run(), deterministic, 1e-4, 1e-4));
  CHECK(sampler_noise_seed(7) != sampler_noise_seed(8));
  CHECK(sampler_noise_seed(7) != 7);
  settings.sampler = "euler-a";
  settings.eta = 1.5;
  CHECK_THROWS_WITH(validate_t2v_settings(settings), Catch::Contains("--eta"));
}

TEST_CASE("strength below 1 noises the clean latent to the first kept sigma and runs the remaining steps (SDEdit)", "[pipeline]") {
  auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  WanT2VPipeline pipeline(tiny_model_files(), WanT2VOptions{});
  T2VSettings settings = tiny_settings("euler", 4);
  settings.strength = 0.5;
  const auto tail = pipeline.make_sampler_for(settings);
  REQUIRE(tail->begin_index() == 2);
  const at::Tensor noise = file->tensor("noise");
  const at::Tensor clean = 0.5 * at::tanh(file->tensor("noise").flip({1}));  // any latent of the right shape
  const at::Tensor from_tail =
      pipeline.denoise(noise, file->tensor("context_positive"), file->tensor("context_negative"), settings, {}, clean);
  // The definition: x = (1 - s) clean + s noise at the first kept sigma s, then the same two Euler
  // steps as a custom schedule of the tail's sigmas.
  T2VSettings custom = settings;
  custom.strength = 1.0;
  custom.sigmas = {tail->sigmas()[2], tail->sigmas()[3]};
  const at::Tensor start = add_noise(clean, noise, tail->sigmas()[2]);
  const at::Tensor from_custom =
      pipeline.denoise(start, file->tensor("context_positive"), file->tensor("context_negative"), custom);
  CHECK(max_abs_diff(from_tail, start) > 1e-2);
  CHECK(at::allclose(from_tail, from_custom, 1e-4, 1e-4));
  // Strength 1 starts from pure noise whatever clean latent is given.
  settings.strength = 1.0;
  CHECK(at::equal(pipeline.denoise(noise, file->tensor("context_positive"), file->tensor("context_negative"), settings, {}, clean),
                  pipeline.denoise(noise, file->tensor("context_positive"), file->tensor("context_negative"), settings)));
  // generate() needs an input for strength below 1, of the run's size.
  settings.strength = 0.5;
  settings.prompt = "x";
  CHECK_THROWS_WITH(pipeline.generate(settings), Catch::Contains("--init"));
  settings.init_video = at::zeros({3, 5, 32, 48});
  CHECK_THROWS_WITH(pipeline.generate(settings), Catch::Contains("init video"));
  settings.strength = 0.0;
  CHECK_THROWS_WITH(validate_t2v_settings(settings), Catch::Contains("--strength"));
}

TEST_CASE("invalid sizes, frame counts and samplers are rejected with suggestions", "[pipeline]") {
  T2VSettings s;
  s.width = 50;
  s.height = 32;
  s.frames = 9;
  CHECK_THROWS_WITH(validate_t2v_settings(s), Catch::Contains("nearest valid: 48x32"));
  s.width = 48;
  s.frames = 10;
  CHECK_THROWS_WITH(validate_t2v_settings(s), Catch::Contains("nearest valid: 9 or 13"));
  s.frames = 9;
  s.sampler = "ddim";
  CHECK_THROWS_AS(validate_t2v_settings(s), InputError);
  s.sampler = "euler";
  s.noise = at::zeros({16, 2, 4, 6});
  CHECK_THROWS_WITH(validate_t2v_settings(s), Catch::Contains("--noise"));
  s.noise = at::zeros({16, 3, 4, 6});
  CHECK_NOTHROW(validate_t2v_settings(s));
}

TEST_CASE("size rules and latent shape follow the model's latent geometry", "[pipeline]") {
  T2VSettings s;
  s.width = 72;
  s.height = 64;
  s.frames = 9;
  // Wan2.1: 8x VAE and 2x2 patches -> multiples of 16, latent H/8 x W/8.
  CHECK_THROWS_WITH(validate_t2v_settings(s), Catch::Contains("multiple of 16") && Catch::Contains("nearest valid: 80x64"));
  // The demo model's geometry: 4x VAE, 2x2 patches -> multiples of 8, latent H/4 x W/4.
  LatentGeometry demo;
  demo.spatial_stride = 4;
  CHECK_NOTHROW(validate_t2v_settings(s, demo));
  CHECK(t2v_latent_shape(s, demo) == std::vector<std::int64_t>{16, 3, 16, 18});
  CHECK(t2v_latent_shape(s) == std::vector<std::int64_t>{16, 3, 8, 9});
  s.width = 68;
  CHECK_THROWS_WITH(validate_t2v_settings(s, demo), Catch::Contains("multiple of 8") && Catch::Contains("72x64"));
  // Another temporal stride changes the frame rule and its suggestion.
  LatentGeometry t2;
  t2.temporal_stride = 2;
  s.width = 64;
  s.frames = 8;
  CHECK_THROWS_WITH(validate_t2v_settings(s, t2), Catch::Contains("2n+1") && Catch::Contains("7 or 9"));
  s.frames = 7;
  CHECK(t2v_latent_shape(s, t2) == std::vector<std::int64_t>{16, 4, 8, 8});
  s.noise = at::zeros({16, 4, 8, 8});
  CHECK_NOTHROW(validate_t2v_settings(s, t2));
  CHECK_THROWS_WITH(validate_t2v_settings(s), Catch::Contains("--noise") || Catch::Contains("4n+1"));
}

// This one and the vdit-demo.json one write MP4 files (and read their metadata back), which needs
// FFmpeg; a build with VDIT_WITH_FFMPEG=OFF has no MP4 output to test.
#if defined(VDIT_WITH_FFMPEG)
TEST_CASE("vdit generate runs a tiny checkpoint in each layout and writes MP4 and PNG with metadata", "[pipeline][cli]") {
  const fs::path root = temp_dir("layouts");
  for (const std::string layout : {"original", "diffusers", "comfyui"}) {
    INFO("layout " << layout);
    const fs::path model = vdit_test::make_tiny_model(root / layout, layout);
    std::string out;
    REQUIRE(run_vdit("info " + model.string(), &out) == 0);
    CHECK(out.find("(" + layout + " layout)") != std::string::npos);
    CHECK(out.find("dit: Wan2.1 T2V DiT") != std::string::npos);
    CHECK(out.find("text encoder: umT5") != std::string::npos);
    CHECK(out.find("vae: Wan2.1 causal 3D VAE") != std::string::npos);

    const fs::path mp4 = root / (layout + ".mp4");
    // A single-file ComfyUI DiT does not store its head count: the user names a config.
    const std::string config = layout == "comfyui" ? " --dit-config " + fixture("wan-tiny/e2e/dit_config.json") : std::string();
    const std::string common = "generate -m " + model.string() + config + " -p 'a red circle moving right' --size 48x32 --steps 3 --seed 7 ";
    if (layout == "comfyui") {
      REQUIRE(run_vdit("generate -m " + model.string() + " -p x --size 48x32 --frames 9 -o " + (root / "x.mp4").string(), &out) == 2);
      CHECK(out.find("--dit-config") != std::string::npos);
    }
    REQUIRE(run_vdit(common + "--frames 9 -o " + mp4.string(), &out) == 0);
    INFO(out);
    VideoData video = read_video(mp4.string());
    CHECK(video.frames.size(1) == 9);
    CHECK(video.frames.size(2) == 32);
    CHECK(video.frames.size(3) == 48);
    CHECK(video.fps == Approx(16.0));
    auto meta = read_video_metadata(mp4.string());
    std::string all;
    for (const auto& [k, v] : meta) all += k + "=" + v + "\n";
    CHECK(all.find("a red circle moving right") != std::string::npos);
    CHECK(all.find("seed") != std::string::npos);

    const fs::path png = root / (layout + ".png");
    REQUIRE(run_vdit(common + "--frames 1 -o " + png.string(), &out) == 0);
    at::Tensor image = read_image(png.string());
    CHECK(image.sizes() == at::IntArrayRef({3, 32, 48}));
    auto text = read_png_text(png.string());
    REQUIRE(!text.empty());
    CHECK(text[0].first == "parameters");
    CHECK(text[0].second.find("a red circle moving right") != std::string::npos);
    CHECK(text[0].second.find("Seed: 7") != std::string::npos);
    CHECK(text[0].second.find("Steps: 3") != std::string::npos);
  }
  fs::remove_all(root);
}

#endif  // VDIT_WITH_FFMPEG

// Output arguments for a clip called `name` under `root`: an MP4 file where vdit has FFmpeg, a
// directory of PNG frames otherwise. `path` is what -o names; `watched` the file the test checks
// for changes (the MP4 itself, or the first frame).
struct ClipOutput {
  std::string args;
  fs::path path, watched;
};
static ClipOutput clip_output(const fs::path& root, const std::string& name) {
#if defined(VDIT_WITH_FFMPEG)
  const fs::path path = root / (name + ".mp4");
  return {"-o " + path.string(), path, path};
#else
  const fs::path path = root / name;
  return {"--format png -o " + path.string(), path, path / "frame_00001.png"};
#endif
}

TEST_CASE("vdit generate: same seed gives the same latents, bad input exits 2 without touching outputs", "[pipeline][cli]") {
  const fs::path root = temp_dir("cli");
  const fs::path model = vdit_test::make_tiny_model(root / "model", "diffusers");
  const std::string common = "generate -m " + model.string() + " -p 'a blue square' --size 32x32 --frames 5 --steps 2 --seed 3 ";
  std::string out;
  const ClipOutput a_out = clip_output(root, "a"), d_out = clip_output(root, "d");
  REQUIRE(run_vdit(common + a_out.args + " --save-latents " + (root / "a.safetensors").string(), &out) == 0);
  REQUIRE(run_vdit(common + clip_output(root, "b").args + " --save-latents " + (root / "b.safetensors").string(), &out) == 0);
  at::Tensor a = SafetensorsFile::open((root / "a.safetensors").string())->tensor("latents");
  at::Tensor b = SafetensorsFile::open((root / "b.safetensors").string())->tensor("latents");
  CHECK(at::equal(a, b));
  CHECK(a.sizes() == at::IntArrayRef({16, 2, 4, 4}));

  // --noise replaces the seeded noise: the saved noise of seed 3 reproduces the same latents.
  write_safetensors((root / "noise.safetensors").string(), {{"noise", seeded_noise({16, 2, 4, 4}, 3), std::nullopt}});
  REQUIRE(run_vdit("generate -m " + model.string() + " -p 'a blue square' --size 32x32 --frames 5 --steps 2 --seed 99 --noise " +
                       (root / "noise.safetensors").string() + " " + clip_output(root, "c").args + " --save-latents " +
                       (root / "c.safetensors").string(), &out) == 0);
  CHECK(at::equal(SafetensorsFile::open((root / "c.safetensors").string())->tensor("latents"), a));

  REQUIRE(fs::exists(a_out.watched));
  const auto before = fs::file_size(a_out.watched);
  const auto mtime = fs::last_write_time(a_out.watched);
  struct Bad {
    std::string args, message;
  };
  const std::vector<Bad> bad = {
      {common + a_out.args, "exists"},
      {"generate -m " + model.string() + " -p x --size 30x32 --frames 5 " + d_out.args, "nearest valid: 32x32"},
      {"generate -m " + model.string() + " -p x --size 32x32 --frames 6 " + d_out.args, "4n+1"},
      {"generate -m " + model.string() + " -p x --size 32x32 --frames 5 --sampler ddim " + d_out.args, "unknown sampler"},
      {"generate -m " + (root / "missing").string() + " -p x --size 32x32 --frames 5 " + d_out.args, "no such model"},
      {"generate -m " + model.string() + " -p x --size 32x32 --frames 5 --noise " + (root / "nope.safetensors").string() +  " " + d_out.args,
       "nope.safetensors"},
      {"info " + std::string(VDIT_FIXTURES_DIR) + "/malformed/overlap.safetensors", "overlaps"},
      {"generate -p x --bogus-option", "bogus"},
  };
  for (const auto& c : bad) {
    INFO(c.args);
    REQUIRE(run_vdit(c.args, &out) == 2);
    INFO(out);
    CHECK(out.find(c.message) != std::string::npos);
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
  }
  CHECK(fs::file_size(a_out.watched) == before);
  CHECK(fs::last_write_time(a_out.watched) == mtime);
  CHECK(!fs::exists(d_out.path));
  fs::remove_all(root);
}

#if defined(VDIT_WITH_FFMPEG)
TEST_CASE("vdit generate takes defaults from the model's vdit-demo.json, the command line wins", "[pipeline][cli]") {
  const fs::path root = temp_dir("defaults");
  const fs::path model = vdit_test::make_tiny_model(root / "model", "diffusers");
  {
    std::ofstream(model / "vdit-demo.json") << R"({"size": "32x16", "frames": 5, "steps": 2, "fps": 8,
                                                   "guidance": 3.5, "negative_prompt": "",
                                                   "sampler": "euler-a", "eta": 0.5})";
  }
  std::string out;
  REQUIRE(run_vdit("generate -m " + model.string() + " -p 'a red circle' -o " + (root / "a.mp4").string(), &out) == 0);
  INFO(out);
  VideoData video = read_video((root / "a.mp4").string());
  CHECK(video.frames.size(1) == 5);
  CHECK(video.frames.size(2) == 16);
  CHECK(video.frames.size(3) == 32);
  CHECK(video.fps == Approx(8.0));
  auto meta = read_video_metadata((root / "a.mp4").string());
  std::string all;
  for (const auto& [k, v] : meta) all += k + "=" + v + "\n";
  INFO(all);
  CHECK(all.find("steps=2") != std::string::npos);
  CHECK(all.find("guidance=3.5") != std::string::npos);
  CHECK(all.find("negative_prompt=\n") != std::string::npos);  // "" given by the model, not Wan's default
  CHECK(all.find("sampler=euler-a (eta 0.5)") != std::string::npos);

  // Command-line options override the file.
  REQUIRE(run_vdit("generate -m " + model.string() + " -p 'a red circle' --size 48x32 --frames 1 -n 'blurry' -o " +
                       (root / "b.png").string(), &out) == 0);
  CHECK(read_image((root / "b.png").string()).sizes() == at::IntArrayRef({3, 32, 48}));
  const auto text = read_png_text((root / "b.png").string());
  REQUIRE(!text.empty());
  CHECK(text[0].second.find("Negative prompt: blurry") != std::string::npos);
  CHECK(text[0].second.find("Sampler: euler-a (eta 0.5)") != std::string::npos);

  // Autoguidance from the file: the guide path is taken relative to the model directory (the
  // model's own transformer folder as its guide), and the setting reaches the metadata.
  { std::ofstream(model / "vdit-demo.json") << R"({"size": "32x16", "frames": 5, "steps": 2, "autoguidance": 2, "guide_dit": "transformer"})"; }
  REQUIRE(run_vdit("generate -m " + model.string() + " -p 'a red circle' -o " + (root / "g.mp4").string(), &out) == 0);
  meta = read_video_metadata((root / "g.mp4").string());
  REQUIRE(meta.count("autoguidance") == 1);
  CHECK(meta.at("autoguidance").find("2 (guide " + (model / "transformer").string()) == 0);
  // A guide that does not exist is a one-line input error, and nothing is written.
  REQUIRE(run_vdit("generate -m " + model.string() + " -p x --guide-dit missing -o " + (root / "h.mp4").string(), &out) == 2);
  CHECK(out.find("'missing': no such guide DiT") != std::string::npos);
  CHECK(std::count(out.begin(), out.end(), '\n') == 1);
  CHECK(!fs::exists(root / "h.mp4"));

  // A broken defaults file is a one-line input error naming it.
  { std::ofstream(model / "vdit-demo.json") << "{\"frames\": \"nine\"}"; }
  REQUIRE(run_vdit("generate -m " + model.string() + " -p x -o " + (root / "c.mp4").string(), &out) == 2);
  CHECK(out.find("vdit-demo.json") != std::string::npos);
  CHECK(std::count(out.begin(), out.end(), '\n') == 1);
  fs::remove_all(root);
}
#endif  // VDIT_WITH_FFMPEG
