// `vdit upscale` and `vdit generate --hires` end to end on the tiny Wan model: the outputs have
// the size, frames and metadata asked for; bad input exits 2 with one line and writes nothing.
#include <catch2/catch.hpp>

#include "cli_runner.h"
#include "test_helpers.h"
#include "tiny_models.h"

#include "vdit/io/image_io.h"
#include "vdit/io/video_io.h"

#include <filesystem>
#include <fstream>
#include <map>

namespace fs = std::filesystem;
using vdit_test::run_vdit;

namespace {

std::string all_metadata(const std::map<std::string, std::string>& meta) {
  std::string all;
  for (const auto& [k, v] : meta) all += k + "=" + v + "\n";
  return all;
}

// Whether the metadata holds key = value, in a container tag (key=value) or in the PNG frames'
// JSON "parameters" ("key":"value").
bool has_entry(const std::string& all, const std::string& key, const std::string& value) {
  return all.find(key + "=" + value) != std::string::npos || all.find("\"" + key + "\":\"" + value + "\"") != std::string::npos;
}

// The input clip: 6 frames of 32x32 (cut to 5 = 4n+1) as a directory of PNG frames.
fs::path write_input(const vdit_test::ScopedTempDir& dir) {
  at::manual_seed(3);
  const at::Tensor frames = at::rand({3, 6, 32, 32}) * 2 - 1;
  const fs::path path = dir.path / "input";
  vdit::VideoWriteOptions options;
  options.format = "png";
  vdit::write_video(path.string(), frames, options);
  return path;
}

}  // namespace

TEST_CASE("vdit upscale writes the size, frames and metadata asked for", "[upscale][cli]") {
  vdit_test::ScopedTempDir dir("upscale");
  const fs::path model = vdit_test::make_tiny_model(dir.path / "model", "diffusers");
  const fs::path input = write_input(dir);
  const std::string common = "upscale -m " + model.string() + " -i " + input.string() +
                             " -p 'a red circle' --steps 4 --seed 5 --base-size 32x32 --format png ";
  std::string out;
  const fs::path result = dir.path / "up";
  REQUIRE(run_vdit(common + "--size 64x48 -o " + result.string(), out) == 0);
  INFO(out);
  const vdit::VideoData video = vdit::read_video(result.string());
  CHECK(video.frames.size(1) == 5);
  CHECK(video.frames.size(2) == 48);
  CHECK(video.frames.size(3) == 64);
  const std::string meta = all_metadata(vdit::read_video_metadata(result.string()));
  CHECK(has_entry(meta, "hires_method", "freeswim"));
  CHECK(has_entry(meta, "base_size", "32x32"));
  CHECK(has_entry(meta, "cache_device", "same"));
  CHECK(meta.find("cross_cache_every") != std::string::npos);
  CHECK(meta.find("attn_scale_factor") != std::string::npos);
  CHECK(meta.find("base_size") != std::string::npos);
  CHECK(meta.find("strength") != std::string::npos);
  CHECK(meta.find("a red circle") != std::string::npos);
  // The window of a 32x32 base is 3x3 tokens on the 3x4 grid of 64x48: smaller in width only, so
  // the log says the window covers the height.
  CHECK(out.find("full attention along height") != std::string::npos);

  // Same seed, same output; the ablation is another output with its method recorded.
  const fs::path again = dir.path / "again";
  REQUIRE(run_vdit(common + "--size 64x48 -o " + again.string(), out) == 0);
  CHECK(vdit_test::bitwise_equal(vdit::read_video(again.string()).frames, video.frames));
  const fs::path direct = dir.path / "direct";
  REQUIRE(run_vdit(common + "--size 64x48 --method direct -o " + direct.string(), out) == 0);
  CHECK(has_entry(all_metadata(vdit::read_video_metadata(direct.string())), "hires_method", "direct"));
  CHECK_FALSE(vdit_test::bitwise_equal(vdit::read_video(direct.string()).frames, video.frames));
  // Head-level PAG on the refinement (issue 41): another output, its head set in the metadata.
  const fs::path pag = dir.path / "pag";
  REQUIRE(run_vdit(common + "--size 64x48 --pag-heads 0:0 --pag-scale 2 -o " + pag.string(), out) == 0);
  INFO(out);
  CHECK(all_metadata(vdit::read_video_metadata(pag.string())).find("pag scale 2") != std::string::npos);
  CHECK_FALSE(vdit_test::bitwise_equal(vdit::read_video(pag.string()).frames, video.frames));

  // An image in, one frame out (as a PNG image).
  const fs::path image = dir.path / "in.png";
  vdit::write_image(image.string(), video.frames.select(1, 0));
  const fs::path still = dir.path / "still.png";
  REQUIRE(run_vdit("upscale -m " + model.string() + " -i " + image.string() +
                       " -p x --steps 2 --base-size 32x32 --size 96x64 -o " + still.string(),
                   out) == 0);
  CHECK(vdit::read_image(still.string()).sizes() == at::IntArrayRef({3, 64, 96}));
}

TEST_CASE("vdit generate --hires writes the refined video, and the native one with --save-base", "[upscale][cli]") {
  vdit_test::ScopedTempDir dir("hires");
  const fs::path model = vdit_test::make_tiny_model(dir.path / "model", "diffusers");
  const fs::path hi = dir.path / "hi", base = dir.path / "base";
  std::string out;
  INFO("see the output below");
  REQUIRE(run_vdit("generate -m " + model.string() + " -p 'a blue square' --size 32x32 --frames 5 --steps 2 --seed 1 "
                   "--hires 64x64 --hires-steps 4 --base-size 32x32 --format png --save-base " + base.string() +
                   " -o " + hi.string(),
                   out) == 0);
  INFO(out);
  const vdit::VideoData h = vdit::read_video(hi.string()), b = vdit::read_video(base.string());
  CHECK(h.frames.sizes() == at::IntArrayRef({3, 5, 64, 64}));
  CHECK(b.frames.sizes() == at::IntArrayRef({3, 5, 32, 32}));
  const std::string meta = all_metadata(vdit::read_video_metadata(hi.string()));
  CHECK(has_entry(meta, "hires_from", "32x32"));
  CHECK(has_entry(meta, "hires_method", "freeswim"));
  // The text encoder ran once for both stages.
  CHECK(out.find("refining 32x32 at 64x64") != std::string::npos);
}

TEST_CASE("vdit upscale and generate --hires refuse bad input with exit 2 and write nothing", "[upscale][cli]") {
  vdit_test::ScopedTempDir dir("upscale-bad");
  const fs::path model = vdit_test::make_tiny_model(dir.path / "model", "diffusers");
  const fs::path input = write_input(dir);
  const fs::path not_video = dir.path / "broken.mp4";
  std::ofstream(not_video) << "not a video";
  const fs::path target = dir.path / "out.mp4";
  const std::string m = "-m " + model.string() + " ";
  const std::string ok = m + "-p x --base-size 32x32 --size 64x64 -o " + target.string() + " ";
  struct Row {
    std::string args, says;
  };
  const std::vector<Row> rows{
      {"upscale " + ok + "-i " + (dir.path / "missing.mp4").string(), "missing.mp4"},
      {"upscale " + ok + "-i " + not_video.string(), "broken.mp4"},
      {"upscale " + m + "-p x --base-size 32x32 --size 72x64 -o " + target.string() + " -i " + input.string(), "72"},
      {"upscale " + ok + "-i " + input.string() + " --strength 0", "--strength"},
      {"upscale " + ok + "-i " + input.string() + " --strength 1.5", "--strength"},
      {"upscale " + ok + "-i " + input.string() + " --method bicubic", "--method"},
      {"upscale " + ok + "-i " + input.string() + " --cache-device gpu", "--cache-device"},
      {"upscale " + ok + "-i " + input.string() + " --window 3,3", "--window"},
      {"upscale " + ok + "-i " + input.string() + " --cross-cache-every -1", "--cross-cache-every"},
      {"upscale " + ok + "-i " + input.string() + " --attn-scale-factor 0", "--attn-scale-factor"},
      {"upscale " + ok + "-i " + input.string() + " --frames 9", "frames"},
      {"upscale " + m + "-p x --size 64x64 -o " + target.string() + " -i " + input.string(), "--base-size"},
      {"upscale " + m + "-p x --base-size 32x32 -o " + target.string() + " -i " + input.string(), "--size"},
      {"generate " + m + "-p x --size 32x32 --frames 5 --save-base " + (dir.path / "b.mp4").string() + " -o " +
           target.string(),
       "--hires"},
      {"generate " + m + "-p x --size 32x32 --frames 5 --hires 72x64 --base-size 32x32 -o " + target.string(), "72"},
      {"generate " + m + "-p x --size 32x32 --frames 5 --hires 64x64 --base-size 32x32 --hires-strength 2 -o " +
           target.string(),
       "--strength"},
  };
  for (const Row& row : rows) {
    INFO(row.args);
    std::string err;
    CHECK(run_vdit(row.args, err) == 2);
    CHECK(err.find("error") != std::string::npos);
    CHECK(err.find(row.says) != std::string::npos);
    CHECK_FALSE(fs::exists(target));
    CHECK_FALSE(fs::exists(dir.path / "b.mp4"));
  }
}
