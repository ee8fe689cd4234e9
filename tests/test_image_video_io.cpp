// Image/video input-output and atomic output files.
#include <catch2/catch.hpp>

#include "test_helpers.h"

#include "vdit/common.h"
#include "vdit/io/image_io.h"
#include "vdit/io/output_file.h"
#include "vdit/io/video_io.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;
using namespace vdit;

namespace {

// A fresh directory per test, removed afterwards.
struct TempDir : vdit_test::ScopedTempDir {
  TempDir() : ScopedTempDir("io") {}
  // Entries whose names mark them as our temporaries.
  int temp_entries() const {
    int n = 0;
    for (const auto& e : fs::directory_iterator(path)) n += e.path().filename().string().find(".vdit-") != std::string::npos;
    return n;
  }
};

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

// PSNR of two [-1,1] tensors (peak-to-peak 2).
double psnr(const at::Tensor& a, const at::Tensor& b) {
  const double mse = (a.to(at::kDouble) - b.to(at::kDouble)).pow(2).mean().item<double>();
  return mse == 0 ? 1e9 : 10.0 * std::log10(4.0 / mse);
}

// [3,F,H,W] in [-1,1]: a colour gradient with a soft-edged bright disc moving to the right and a
// global brightness drift, so motion compensation and colour both matter.
at::Tensor moving_pattern(int64_t frames, int64_t height, int64_t width) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor y = at::linspace(0, 1, height, opts).view({1, height, 1});
  const at::Tensor x = at::linspace(0, 1, width, opts).view({1, 1, width});
  std::vector<at::Tensor> out;
  for (int64_t f = 0; f < frames; ++f) {
    const double cx = 0.2 + 0.6 * f / std::max<int64_t>(frames - 1, 1), cy = 0.5;
    const at::Tensor d2 = (x - cx).pow(2) + (y - cy).pow(2) * 0.75;
    const at::Tensor disc = at::sigmoid((0.04 - d2) * 200.0);  // soft edge
    const at::Tensor r = (x * 0.8 + 0.1 + 0.02 * f).expand({1, height, width});
    const at::Tensor g = (y * 0.7 + 0.15).expand({1, height, width});
    const at::Tensor b = (0.6 - 0.4 * x * y).expand({1, height, width});
    at::Tensor rgb = at::cat({r, g, b}, 0);
    const at::Tensor disc_colour = at::tensor({0.95f, 0.85f, 0.3f}).view({3, 1, 1});
    rgb = rgb * (1 - disc) + disc_colour * disc;
    out.push_back(rgb.mul(2).sub(1).clamp(-1, 1));
  }
  return at::stack(out, 1);
}

// Quantised like any 8-bit source: exact round trips become possible.
at::Tensor quantise(const at::Tensor& x) { return from_rgb8(to_rgb8(x)); }

bool has_key_ci(const std::map<std::string, std::string>& m, const std::string& key, std::string* value = nullptr) {
  for (const auto& [k, v] : m) {
    std::string lk = k;
    std::transform(lk.begin(), lk.end(), lk.begin(), [](unsigned char c) { return std::tolower(c); });
    if (lk == key) {
      if (value) *value = v;
      return true;
    }
  }
  return false;
}

std::string run_command(const std::string& command) {
  std::string output;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buffer[4096];
    size_t n;
    while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) output.append(buffer, n);
    pclose(pipe);
  }
  return output;
}

bool encoder_exists(const std::string& format) { return !video_encoder_for(format).empty(); }

const std::map<std::string, std::string> kMetadata{
    {"prompt", "a red fox running through snow, cinematic"},
    {"seed", "42"},
    {"parameters", "a red fox running through snow, cinematic\nSteps: 30, Seed: 42, Sampler: unipc"}};

}  // namespace

TEST_CASE("png crc matches the CRCs stb writes", "[io]") {
  const unsigned char iend[] = {'I', 'E', 'N', 'D'};
  CHECK(png_crc32(iend, 4) == 0xAE426082u);  // the constant trailer of every PNG
  const at::Tensor img = at::randint(0, 256, {5, 7, 3}, at::kByte);
  const std::vector<unsigned char> png = encode_png(img);
  // IHDR: length at 8, type at 12, 13 data bytes, CRC at 29 (computed by stb, not by us).
  const uint32_t stored = (uint32_t(png[29]) << 24) | (uint32_t(png[30]) << 16) | (uint32_t(png[31]) << 8) | png[32];
  CHECK(png_crc32(png.data() + 12, 17) == stored);
}

TEST_CASE("PNG write/read round trip is exact and keeps the parameters text", "[io]") {
  TempDir dir;
  const at::Tensor image = from_rgb8(at::randint(0, 256, {37, 53, 3}, at::kByte));
  const std::string path = dir / "image.png";
  ImageWriteOptions options;
  options.text = {{"parameters", "a cat\nSteps: 20, Seed: 7"}, {"Title", "naïve café ☕"}};
  write_image(path, image, options);

  const at::Tensor back = read_image(path);
  REQUIRE(back.sizes() == image.sizes());
  CHECK(at::equal(back, image));

  const TextChunks text = read_png_text(path);
  REQUIRE(text.size() == 2);
  CHECK(text[0].first == "parameters");
  CHECK(text[0].second == "a cat\nSteps: 20, Seed: 7");
  CHECK(text[1].first == "Title");
  CHECK(text[1].second == "naïve café ☕");  // non-ASCII goes through iTXt as UTF-8

  // The ASCII text is a tEXt chunk placed right after IHDR.
  const std::string bytes = read_all(path);
  CHECK(bytes.substr(37, 4) == "tEXt");
  CHECK(bytes.find("iTXt") != std::string::npos);
  CHECK(read_image_text(path) == text);

  // Float inputs in other dtypes quantise the same way.
  const std::string path16 = dir / "half.png";
  write_image(path16, image.to(at::kHalf).to(at::kFloat));
  CHECK(at::equal(read_image(path16), image));
}

TEST_CASE("JPEG reads back close to what was written, with its comment", "[io]") {
  TempDir dir;
  const at::Tensor image = quantise(moving_pattern(1, 48, 64).select(1, 0));
  const std::string path = dir / "image.jpg";
  ImageWriteOptions options;
  options.jpeg_quality = 95;
  options.text = {{"parameters", "Steps: 30, Seed: 1"}};
  write_image(path, image, options);
  const at::Tensor back = read_image(path);
  REQUIRE(back.sizes() == image.sizes());
  const double p = psnr(back, image);
  std::printf("[io] JPEG q95 round trip PSNR = %.2f dB\n", p);
  CHECK(p >= 35.0);
  const TextChunks text = read_image_text(path);
  REQUIRE(text.size() == 1);
  CHECK(text[0] == std::make_pair(std::string("parameters"), std::string("Steps: 30, Seed: 1")));
}

TEST_CASE("corrupt or missing images raise InputError naming the file", "[io]") {
  TempDir dir;
  const std::string garbage = dir / "garbage.png";
  write_all(garbage, "this is not an image at all");
  auto names_file = [](const std::string& file) {
    return Catch::Matchers::Contains(file);
  };
  CHECK_THROWS_AS(read_image(garbage), InputError);
  CHECK_THROWS_WITH(read_image(garbage), names_file(garbage));

  // A real PNG cut short.
  const std::vector<unsigned char> png = encode_png(at::randint(0, 256, {32, 32, 3}, at::kByte));
  const std::string truncated = dir / "truncated.png";
  write_all(truncated, std::string(png.begin(), png.begin() + static_cast<std::ptrdiff_t>(png.size() / 2)));
  CHECK_THROWS_AS(read_image(truncated), InputError);
  CHECK_THROWS_WITH(read_image(truncated), names_file(truncated));
  CHECK_THROWS_AS(read_png_text(truncated), InputError);

  const std::string missing = dir / "missing.png";
  CHECK_THROWS_WITH(read_image(missing), names_file(missing));
  CHECK_THROWS_AS(read_image(missing), InputError);
  CHECK_THROWS_AS(read_image(dir.path.string()), InputError);
  const std::string empty = dir / "empty.jpg";
  write_all(empty, "");
  CHECK_THROWS_AS(read_image(empty), InputError);

  // A flipped byte in a text chunk is caught by its CRC.
  const at::Tensor img = at::randint(0, 256, {4, 4, 3}, at::kByte);
  std::vector<unsigned char> with_text = encode_png(img, {{"parameters", "hello"}});
  with_text[33 + 8 + 12] ^= 0x01;  // inside "parameters\0hello"
  const std::string bad_crc = dir / "bad_crc.png";
  write_all(bad_crc, std::string(with_text.begin(), with_text.end()));
  CHECK_THROWS_AS(read_png_text(bad_crc), InputError);
  CHECK_THROWS_AS(read_png_text(garbage), InputError);
}

TEST_CASE("AtomicOutput: nothing visible until commit, no leftovers without it", "[io]") {
  TempDir dir;
  const std::string target = dir / "out.bin";
  const int live_before = live_temp_output_count();
  {
    AtomicOutput out(target);
    out.write("partial", 7);
    CHECK(fs::exists(out.temp_path()));
    CHECK(fs::path(out.temp_path()).parent_path() == dir.path);
    CHECK(fs::path(out.temp_path()).filename().string().rfind(".out.bin.vdit-", 0) == 0);
    CHECK(!fs::exists(target));
    CHECK(live_temp_output_count() == live_before + 1);
  }
  CHECK(!fs::exists(target));
  CHECK(dir.temp_entries() == 0);
  CHECK(live_temp_output_count() == live_before);

  {
    AtomicOutput out(target);
    out.write("complete", 8);
    out.commit();
  }
  CHECK(read_all(target) == "complete");
  CHECK(dir.temp_entries() == 0);
  CHECK(live_temp_output_count() == live_before);

  // Existing file: refused without overwrite (untouched), replaced with it.
  CHECK_THROWS_AS(AtomicOutput(target), InputError);
  CHECK_THROWS_AS(check_output_path(target, false), InputError);
  CHECK_NOTHROW(check_output_path(target, true));
  CHECK(read_all(target) == "complete");
  {
    AtomicOutput out(target, /*overwrite=*/true);
    out.write("replaced", 8);
    out.commit();
  }
  CHECK(read_all(target) == "replaced");

  // A file that appears while we work is not clobbered at commit.
  const std::string racy = dir / "racy.bin";
  {
    AtomicOutput out(racy);
    out.write("ours", 4);
    write_all(racy, "theirs");
    CHECK_THROWS_AS(out.commit(), InputError);
  }
  CHECK(read_all(racy) == "theirs");
  CHECK(dir.temp_entries() == 0);

  CHECK_THROWS_AS(AtomicOutput(dir / "no/such/dir/out.bin"), InputError);
  CHECK_THROWS_AS(check_output_path(dir / "no_such_dir/out.bin", false), InputError);
  CHECK_THROWS_AS(check_output_path(dir.path.string(), true), InputError);  // a directory, not a file
  CHECK_THROWS_AS(check_output_path("", false), InputError);
}

TEST_CASE("SIGINT removes live temporaries and exits 130", "[io]") {
  TempDir dir;
  const std::string target = dir / "video.mp4";
  const std::string frames = dir / "frames";
  std::fflush(nullptr);
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    install_interrupt_cleanup();
    AtomicOutput file(target);
    file.write("half a video", 12);
    AtomicOutput::Options dir_options;
    dir_options.kind = AtomicOutput::Kind::Directory;
    AtomicOutput frame_dir(frames, dir_options);
    frame_dir.write_file("frame_00001.png", "x", 1);
    frame_dir.write_file("frame_00002.png", "y", 1);
    raise(SIGINT);
    _exit(0);  // not reached: the handler exits
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 130);
  CHECK(!fs::exists(target));
  CHECK(!fs::exists(frames));
  CHECK(fs::is_empty(dir.path));
}

TEST_CASE("video format resolution and early output checks", "[io]") {
  TempDir dir;
  CHECK(resolve_video_format("a.mp4") == "mp4");
  CHECK(resolve_video_format("a.M4V") == "mp4");
  CHECK(resolve_video_format("a.webm") == "webm");
  CHECK(resolve_video_format("a.gif") == "gif");
  CHECK(resolve_video_format("a.webp") == "webp");
  CHECK(resolve_video_format("frames/") == "png");
  CHECK(resolve_video_format("anything", "PNG") == "png");
  CHECK_THROWS_AS(resolve_video_format("a.avi2"), InputError);
  CHECK_THROWS_AS(resolve_video_format("noext"), InputError);
  CHECK_THROWS_AS(resolve_video_format("a.mp4", "flv9"), InputError);

  VideoWriteOptions options;
  options.fps = 0;
  CHECK_THROWS_AS(check_video_output(dir / "a.png", options), InputError);
  options.fps = 16;
  options.crf = 99;
  CHECK_THROWS_AS(check_video_output(dir / "a.png", options), InputError);
  options.crf = 18;
  CHECK_THROWS_AS(check_video_output(dir / "missing_dir/a.webp", options), InputError);
  CHECK_THROWS_AS(write_video(dir / "bad.png", at::zeros({4, 2, 8, 8}), options), InputError);  // not [3,F,H,W]
#if !defined(VDIT_WITH_FFMPEG)
  CHECK_THROWS_AS(check_video_output(dir / "a.mp4", options), InputError);
#endif
  CHECK(std::find(available_video_formats().begin(), available_video_formats().end(), "png") !=
        available_video_formats().end());
}

TEST_CASE("PNG frame directory output", "[io]") {
  TempDir dir;
  const at::Tensor frames = quantise(moving_pattern(4, 12, 10));
  const std::string out = dir / "frames";
  VideoWriteOptions options;
  options.format = "png";
  options.fps = 12;
  options.metadata = kMetadata;
  write_video(out, frames, options);
  REQUIRE(fs::is_directory(out));
  CHECK(dir.temp_entries() == 0);
  int count = 0;
  for (const auto& entry : fs::directory_iterator(out)) {
    ++count;
    const TextChunks text = read_png_text(entry.path().string());
    REQUIRE(!text.empty());
    CHECK(text[0].first == "parameters");
    CHECK(text[0].second == kMetadata.at("parameters"));
  }
  CHECK(count == 4);
  CHECK(fs::exists(out + "/frame_00001.png"));
  CHECK(fs::exists(out + "/frame_00004.png"));
  CHECK(at::equal(read_image(out + "/frame_00003.png"), frames.select(1, 2)));

  const VideoData back = read_video(out);
  CHECK(at::equal(back.frames, frames));
  CHECK(back.fps == Approx(12));
  CHECK(read_video_metadata(out).at("parameters") == kMetadata.at("parameters"));

  // Existing directory: refused, then replaced with overwrite (fewer frames: old ones gone).
  CHECK_THROWS_AS(write_video(out, frames, options), InputError);
  options.overwrite = true;
  write_video(out, frames.narrow(1, 0, 2), options);
  CHECK(!fs::exists(out + "/frame_00003.png"));
  CHECK(read_video(out).frames.size(1) == 2);
  // A directory holding anything we did not write is never replaced.
  write_all(out + "/notes.txt", "mine");
  CHECK_THROWS_AS(write_video(out, frames, options), InputError);
  CHECK(read_all(out + "/notes.txt") == "mine");
  CHECK(dir.temp_entries() == 0);
}

TEST_CASE("contact sheet lays frames out in a grid", "[io]") {
  TempDir dir;
  const at::Tensor frames = quantise(at::rand({3, 5, 6, 8}) * 2 - 1);
  const std::string path = dir / "sheet.png";
  write_contact_sheet(path, frames, 3, {{"parameters", "sheet"}}, false, 2);
  const at::Tensor sheet = read_image(path);
  REQUIRE(sheet.sizes() == at::IntArrayRef({3, 2 * 6 + 2, 3 * 8 + 2 * 2}));
  for (int64_t f = 0; f < 5; ++f) {
    const int64_t top = (f / 3) * 8, left = (f % 3) * 10;
    CHECK(at::equal(sheet.narrow(1, top, 6).narrow(2, left, 8), frames.select(1, f)));
  }
  CHECK(at::equal(sheet.narrow(1, 8, 6).narrow(2, 20, 8), at::full({3, 6, 8}, -1.0f)));  // empty cell
  CHECK(read_png_text(path).at(0).second == "sheet");
  CHECK_THROWS_AS(write_contact_sheet(path, frames, 3), InputError);  // exists
}

#if defined(VDIT_WITH_FFMPEG)

TEST_CASE("MP4 (H.264) write and read back", "[io]") {
  TempDir dir;
  const at::Tensor frames = quantise(moving_pattern(9, 48, 64));
  const std::string path = dir / "clip.mp4";
  VideoWriteOptions options;
  options.fps = 8;
  options.metadata = kMetadata;
  write_video(path, frames, options);
  CHECK(dir.temp_entries() == 0);

  const VideoData back = read_video(path);
  REQUIRE(back.frames.sizes() == frames.sizes());
  CHECK(back.fps == Approx(8.0).margin(1e-6));
  const double p = psnr(back.frames, frames);
  std::printf("[io] MP4 encoder %s crf 18, 9x64x48: PSNR = %.2f dB\n", video_encoder_for("mp4").c_str(), p);
  CHECK(p >= 35.0);
  // Frame order survives (B-frames reorder internally): each frame is closest to its source.
  for (int64_t f = 0; f < 9; ++f) {
    const double own = psnr(back.frames.select(1, f), frames.select(1, f));
    for (int64_t g : {f - 1, f + 1})
      if (g >= 0 && g < 9) CHECK(own > psnr(back.frames.select(1, f), frames.select(1, g)));
  }

  const auto metadata = read_video_metadata(path);
  std::string comment, prompt;
  REQUIRE(has_key_ci(metadata, "comment", &comment));
  CHECK(comment == metadata_comment(kMetadata));
  REQUIRE(has_key_ci(metadata, "prompt", &prompt));
  CHECK(prompt == kMetadata.at("prompt"));
  if (std::system("command -v ffprobe > /dev/null 2>&1") == 0) {
    const std::string probe =
        run_command("ffprobe -v error -show_entries format_tags -of default=noprint_wrappers=1 '" + path + "'");
    CHECK(probe.find("a red fox running through snow") != std::string::npos);
    CHECK(probe.find("TAG:seed=42") != std::string::npos);
  } else {
    WARN("ffprobe not found; metadata checked through libavformat only");
  }

  // Existing output: refused without overwrite and left untouched.
  const std::string before = read_all(path);
  options.metadata = {};
  CHECK_THROWS_AS(write_video(path, frames.narrow(1, 0, 2), options), InputError);
  CHECK(read_all(path) == before);
  options.overwrite = true;
  write_video(path, frames.narrow(1, 0, 3), options);
  CHECK(read_video(path).frames.size(1) == 3);
  CHECK(dir.temp_entries() == 0);
}

TEST_CASE("MP4 with odd frame size is padded to even", "[io]") {
  TempDir dir;
  const at::Tensor frames = quantise(moving_pattern(3, 47, 63));
  const std::string path = dir / "odd.mp4";
  write_video(path, frames);
  const VideoData back = read_video(path);
  REQUIRE(back.frames.sizes() == at::IntArrayRef({3, 3, 48, 64}));
  CHECK(psnr(back.frames.narrow(2, 0, 47).narrow(3, 0, 63), frames) >= 35.0);
}

TEST_CASE("WebM (VP9) write and read back", "[io]") {
  if (video_encoder_for("webm") != "libvpx-vp9") {
    WARN("libvpx-vp9 encoder not available in this FFmpeg; WebM test skipped");
    return;
  }
  TempDir dir;
  const at::Tensor frames = quantise(moving_pattern(9, 48, 64));
  const std::string path = dir / "clip.webm";
  VideoWriteOptions options;
  options.fps = 8;
  options.metadata = kMetadata;
  write_video(path, frames, options);
  const VideoData back = read_video(path);
  REQUIRE(back.frames.sizes() == frames.sizes());
  CHECK(back.fps == Approx(8.0).margin(1e-3));
  const double p = psnr(back.frames, frames);
  std::printf("[io] WebM encoder libvpx-vp9 crf 18, 9x64x48: PSNR = %.2f dB\n", p);
  CHECK(p >= 35.0);
  const auto metadata = read_video_metadata(path);
  std::string comment, seed;
  REQUIRE(has_key_ci(metadata, "comment", &comment));
  CHECK(comment == metadata_comment(kMetadata));
  REQUIRE(has_key_ci(metadata, "seed", &seed));
  CHECK(seed == "42");

  // VP9 keeps odd sizes as they are.
  const at::Tensor odd = quantise(moving_pattern(2, 15, 21));
  write_video(dir / "odd.webm", odd);
  const VideoData odd_back = read_video(dir / "odd.webm");
  REQUIRE(odd_back.frames.sizes() == odd.sizes());
  CHECK(psnr(odd_back.frames, odd) >= 30.0);
}

TEST_CASE("GIF and animated WebP outputs", "[io]") {
  TempDir dir;
  const at::Tensor frames = quantise(moving_pattern(5, 30, 41));
  if (encoder_exists("gif")) {
    VideoWriteOptions options;
    options.fps = 10;
    write_video(dir / "clip.gif", frames, options);
    const VideoData back = read_video(dir / "clip.gif");
    REQUIRE(back.frames.sizes() == frames.sizes());
    const double p = psnr(back.frames, frames);
    std::printf("[io] GIF (252-colour cube, ordered dither) PSNR = %.2f dB\n", p);
    CHECK(p >= 20.0);  // palette + dithering: a far lower bar than real video codecs
  } else {
    WARN("gif encoder not available; GIF test skipped");
  }
  if (encoder_exists("webp")) {
    write_video(dir / "clip.webp", frames);
    const std::string bytes = read_all(dir / "clip.webp");
    REQUIRE(bytes.size() > 12);
    CHECK(bytes.substr(0, 4) == "RIFF");
    CHECK(bytes.substr(8, 4) == "WEBP");
    CHECK(bytes.find("ANIM") != std::string::npos);
    CHECK(bytes.find("ANMF") != std::string::npos);
  } else {
    WARN("libwebp_anim encoder not available; WebP test skipped");
  }
  CHECK(dir.temp_entries() == 0);
}

TEST_CASE("corrupt or missing videos raise InputError", "[io]") {
  TempDir dir;
  const std::string garbage = dir / "garbage.mp4";
  write_all(garbage, std::string(4096, '\x42'));
  CHECK_THROWS_AS(read_video(garbage), InputError);
  CHECK_THROWS_WITH(read_video(garbage), Catch::Matchers::Contains(garbage));
  CHECK_THROWS_AS(read_video(dir / "missing.mp4"), InputError);
  CHECK_THROWS_AS(read_video_metadata(garbage), InputError);
}

#else

TEST_CASE("without FFmpeg, container formats are refused clearly", "[io]") {
  TempDir dir;
  CHECK_THROWS_WITH(write_video(dir / "a.mp4", at::zeros({3, 2, 8, 8})), Catch::Matchers::Contains("without FFmpeg"));
  CHECK(!fs::exists(dir / "a.mp4"));
}

#endif
