// `generate --init FILE --strength S`: the input's frames fitted to the run (resize, frame pick,
// a still repeated), and the run itself against the SDEdit definition (the clean latent noised to
// the first kept sigma, the remaining steps run).
#include <catch2/catch.hpp>

#include "test_helpers.h"

#include "cli_runner.h"
#include "vdit/common.h"
#include "vdit/io/image_io.h"
#include "vdit/io/init_video.h"
#include "vdit/io/safetensors.h"
#include "vdit/io/video_io.h"
#include "vdit/pipelines/wan_t2v.h"
#include "vdit/samplers/sampler.h"

#include <unistd.h>

#include <filesystem>

namespace fs = std::filesystem;
using namespace vdit;

namespace {

// [3, F, H, W] whose frame f is the constant f / 20 - 0.5 in every channel, with a gradient across
// the width so a resize has something to interpolate.
at::Tensor ramp_clip(std::int64_t frames, std::int64_t height, std::int64_t width) {
  const at::Tensor level = at::arange(frames, at::kFloat).div(20).sub(0.5).view({1, frames, 1, 1});
  const at::Tensor across = at::linspace(-0.2, 0.2, width).view({1, 1, 1, width});
  return (level + across).expand({3, frames, height, width}).contiguous();
}

struct TempDir : vdit_test::ScopedTempDir {
  TempDir() : ScopedTempDir("init") {}
};

}  // namespace

TEST_CASE("fit_init_frames picks the first frames, resizes bilinearly and repeats a still", "[io][init]") {
  const at::Tensor clip = ramp_clip(12, 20, 30);
  // Same size: the first 9 frames exactly.
  at::Tensor fitted = fit_init_frames(clip, 9, 20, 30);
  REQUIRE(fitted.sizes() == at::IntArrayRef({3, 9, 20, 30}));
  CHECK(at::equal(fitted, clip.narrow(1, 0, 9)));

  // Another size: every frame resized; an upscale is plain bilinear interpolation.
  fitted = fit_init_frames(clip, 5, 40, 60);
  REQUIRE(fitted.sizes() == at::IntArrayRef({3, 5, 40, 60}));
  const at::Tensor bilinear =
      at::upsample_bilinear2d(clip.narrow(1, 0, 5).permute({1, 0, 2, 3}).contiguous(), {40, 60}, false).permute({1, 0, 2, 3});
  CHECK(at::allclose(fitted, bilinear, 1e-5, 1e-5));
  // A shrink keeps each frame's level (the frame order is kept) and stays in [-1, 1].
  fitted = fit_init_frames(clip, 9, 8, 12);
  REQUIRE(fitted.sizes() == at::IntArrayRef({3, 9, 8, 12}));
  for (std::int64_t f = 0; f < 9; ++f)
    CHECK(fitted.select(1, f).mean().item<double>() == Approx(f / 20.0 - 0.5).margin(1e-4));
  CHECK(fitted.abs().max().item<double>() <= 1.0);

  // One image ([3, H, W] or a single frame) is repeated over the frames.
  const at::Tensor image = clip.select(1, 3);
  fitted = fit_init_frames(image, 5, 20, 30);
  REQUIRE(fitted.sizes() == at::IntArrayRef({3, 5, 20, 30}));
  for (std::int64_t f = 0; f < 5; ++f) CHECK(at::equal(fitted.select(1, f), image));
  CHECK(at::equal(fit_init_frames(clip.narrow(1, 3, 1), 5, 20, 30), fitted));

  // A clip shorter than the run, or not RGB frames, is refused.
  CHECK_THROWS_WITH(fit_init_frames(clip.narrow(1, 0, 4), 9, 20, 30), Catch::Contains("has 4 frames but the run needs 9"));
  CHECK_THROWS_AS(fit_init_frames(at::zeros({4, 2, 8, 8}), 1, 8, 8), InputError);
  CHECK_THROWS_AS(fit_init_frames(at::Tensor(), 1, 8, 8), InputError);
}

TEST_CASE("read_init_frames reads an image, a PNG frame directory and a video", "[io][init]") {
  TempDir dir;
  const at::Tensor clip = ramp_clip(9, 16, 24);
  ImageWriteOptions png;
  write_image(dir / "still.png", clip.select(1, 2), png);
  VideoWriteOptions frames;
  frames.format = "png";
  write_video(dir / "frames", clip, frames);

  at::Tensor still = read_init_frames(dir / "still.png", 5, 16, 24);
  REQUIRE(still.sizes() == at::IntArrayRef({3, 5, 16, 24}));
  CHECK(at::allclose(still.select(1, 4), clip.select(1, 2), 0, 1.0 / 127.5));  // 8-bit rounding
  at::Tensor from_dir = read_init_frames(dir / "frames", 5, 8, 12);
  REQUIRE(from_dir.sizes() == at::IntArrayRef({3, 5, 8, 12}));
  CHECK(from_dir.select(1, 4).mean().item<double>() == Approx(4 / 20.0 - 0.5).margin(0.01));
  CHECK_THROWS_WITH(read_init_frames(dir / "frames", 13, 16, 24), Catch::Contains("has 9 frames"));
  CHECK_THROWS_WITH(read_init_frames(dir / "missing.png", 5, 16, 24), Catch::Contains("no such file"));
#if defined(VDIT_WITH_FFMPEG)
  VideoWriteOptions mp4;
  mp4.crf = 0;
  write_video(dir / "clip.mp4", clip, mp4);
  const at::Tensor from_mp4 = read_init_frames(dir / "clip.mp4", 9, 16, 24);
  REQUIRE(from_mp4.sizes() == at::IntArrayRef({3, 9, 16, 24}));
  CHECK((from_mp4 - clip).abs().mean().item<double>() < 0.05);
#endif
}

TEST_CASE("generate --init runs the SDEdit definition and equals the library's run", "[pipeline][cli][init]") {
  const fs::path demo = fs::path(VDIT_SOURCE_DIR) / "models" / "shapes";
  if (!fs::exists(demo / "model_index.json")) return;
  TempDir dir;
  // A still to start from, not of the run's size: the CLI resizes and repeats it.
  write_image(dir / "init.png", ramp_clip(1, 48, 40).select(1, 0));
  std::string out;
  REQUIRE(vdit_test::run_vdit("--quiet generate -p 'a red circle moving right' --size 32x32 --frames 5 --steps 4 --sampler "
                              "euler --seed 11 --init " + (dir / "init.png") + " --strength 0.5 --save-latents " +
                                  (dir / "cli.safetensors") + " -o " + (dir / "cli.png") + " --format png",
                              out) == 0);
  auto saved = SafetensorsFile::open(dir / "cli.safetensors");
  const at::Tensor cli = saved->tensor("latents").clone();
  CHECK(saved->metadata().at("strength") == "0.5");
  CHECK(saved->metadata().at("init") == dir / "init.png");

  WanT2VPipeline pipeline(locate_wan_model(demo.string()), WanT2VOptions{});
  T2VSettings settings;
  settings.prompt = "a red circle moving right";
  settings.negative_prompt = "";
  settings.width = settings.height = 32;
  settings.frames = 5;
  settings.steps = 4;
  settings.sampler = "euler";
  settings.seed = 11;
  settings.guidance = 2.5;
  settings.shift = 1.5;  // the demo model's vdit-demo.json, as the CLI applies it
  settings.strength = 0.5;
  settings.init_video = read_init_frames(dir / "init.png", 5, 32, 32);
  const T2VResult library = pipeline.generate(settings);
  CHECK(at::equal(library.latents, cli));  // the CLI is the library's run, bit for bit

  // The SDEdit definition: the clean latent noised to the first kept sigma, then the remaining
  // steps, here as a custom schedule of those sigmas from that start.
  const auto sampler = pipeline.make_sampler_for(settings);
  REQUIRE(sampler->begin_index() == 2);
  const at::Tensor clean = pipeline.encode(settings.init_video);
  const at::Tensor noise = seeded_noise(t2v_latent_shape(settings, pipeline.latent_geometry()), settings.seed);
  const double first = sampler->sigmas()[static_cast<std::size_t>(sampler->begin_index())];
  T2VSettings tail = settings;
  tail.strength = 1.0;
  tail.init_video = at::Tensor();
  tail.sigmas = {first, sampler->sigmas()[3]};
  const auto contexts = pipeline.encode_prompts({settings.prompt, ""});
  const at::Tensor by_hand = pipeline.denoise(add_noise(clean.unsqueeze(0), noise.unsqueeze(0), first).squeeze(0),
                                              contexts[0], contexts[1], tail);
  CHECK(at::allclose(by_hand, library.latents, 1e-4, 1e-4));
  CHECK((library.latents - noise).abs().max().item<double>() > 1e-2);
}
