// The shapes demo domain: caption grammar, layouts, the renderer, the judge and contact sheets.
// LibTorch comes before Catch: glog's CHECK macro would otherwise replace Catch's.
#include <ATen/ATen.h>

#include "cli_runner.h"
#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/io/contact_sheet.h"
#include "vdit/io/image_io.h"

#include "tiny_models.h"

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

namespace fs = std::filesystem;
using namespace vdit;
using namespace vdit::shapes;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("vdit_shapes_test_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// 3x3 box blur of every frame (edges averaged over the pixels that exist).
at::Tensor box_blur(const at::Tensor& video) {
  const at::Tensor frames = video.permute({1, 0, 2, 3});  // [F,3,H,W]
  return at::avg_pool2d(frames, {3, 3}, {1, 1}, {1, 1}, false, /*count_include_pad=*/false).permute({1, 0, 2, 3}).contiguous();
}

float pixel(const at::Tensor& video, int c, std::int64_t f, std::int64_t y, std::int64_t x) {
  return video.index({c, f, y, x}).item<float>();
}

// Renders `count` random clips, applies `distort`, judges each, and returns the tally.
template <typename Distort>
JudgeSummary judge_random(int count, std::int64_t frames, std::int64_t width, std::int64_t height, std::uint64_t seed,
                          Distort distort) {
  std::mt19937_64 rng(seed);
  JudgeSummary summary;
  for (int i = 0; i < count; ++i) {
    const Caption caption = random_caption(rng);
    const ClipLayout layout = random_layout(caption, width, height, rng);
    const Judgement j = judge_clip(distort(render_clip(caption, layout, frames, width, height)));
    summary.add(caption, j);
    if (!(j.ok && j.colour == caption.colour && j.colour_steady && j.shape == caption.shape && j.motion == caption.motion && j.objects == 1)) {
      UNSCOPED_INFO("misjudged " << caption.text() << " (size " << layout.size << ", d " << layout.dx << "," << layout.dy
                                 << ") as ok=" << j.ok << " objects=" << j.objects << " " << colour_name(j.colour) << " "
                                 << shape_name(j.shape) << " " << motion_name(j.motion) << " disp " << j.displacement_x
                                 << "," << j.displacement_y);
    }
  }
  return summary;
}

void require_perfect(const JudgeSummary& s) {
  INFO(s.report());
  CHECK(s.colour_right == s.clips);
  CHECK(s.shape_right == s.clips);
  CHECK(s.motion_right == s.clips);
  CHECK(s.all_right == s.clips);
  CHECK(s.multi_object == 0);
  CHECK(s.no_object == 0);
}

using vdit_test::run_vdit;

}  // namespace

TEST_CASE("every shapes caption survives text and parse", "[shapes]") {
  const std::vector<Caption> all = Caption::all();
  REQUIRE(all.size() == 90);
  std::set<std::string> texts;
  for (const Caption& c : all) {
    const std::string text = c.text();
    texts.insert(text);
    CHECK(Caption::parse(text) == c);
    CHECK(text.rfind(std::string("a ") + colour_name(c.colour) + " " + shape_name(c.shape) + " ", 0) == 0);
    if (c.motion == Motion::Still) CHECK(text.substr(text.size() - 15) == " standing still");
    else CHECK(text.substr(text.size() - 8 - std::string(motion_name(c.motion)).size()) == std::string(" moving ") + motion_name(c.motion));
  }
  CHECK(texts.size() == 90);
  CHECK(Caption{Colour::Purple, Shape::Triangle, Motion::Up}.text() == "a purple triangle moving up");
  CHECK(Caption{Colour::White, Shape::Square, Motion::Still}.text() == "a white square standing still");
  CHECK(Caption::parse("  A Yellow SQUARE moving   Down \n") == Caption{Colour::Yellow, Shape::Square, Motion::Down});

  for (const char* bad : {"", "a red circle", "a red circle moving", "a red circle moving still", "a pink circle moving left",
                          "a red hexagon standing still", "a red circle standing", "a red circle standing up",
                          "the red circle moving left", "a red circle moving left now", "red circle moving left",
                          "a red circle walking left"}) {
    INFO(bad);
    CHECK_THROWS_AS(Caption::parse(bad), InputError);
  }
}

TEST_CASE("random layouts keep the object inside and move it 25-45 % of the side", "[shapes]") {
  std::mt19937_64 rng(7);
  const std::vector<std::pair<std::int64_t, std::int64_t>> sizes{{64, 64}, {32, 32}, {48, 80}, {160, 48}, {832, 480}};
  int moves[kMotions] = {0, 0, 0, 0, 0};
  for (const auto& [w, h] : sizes) {
    for (int i = 0; i < 400; ++i) {
      const Caption c = random_caption(rng);
      const ClipLayout l = random_layout(c, w, h, rng);
      INFO(c.text() << " in " << w << "x" << h << ": size " << l.size << " start " << l.x0 << "," << l.y0 << " d " << l.dx << "," << l.dy);
      ++moves[static_cast<int>(c.motion)];
      CHECK(l.size <= 1.1f * w / 7 + 1e-4f);
      CHECK(l.size <= 0.3f * std::min(w, h) + 1e-4f);
      if (std::min(w, h) * 0.3f / 1.1f >= w / 7.0f) CHECK(l.size >= 0.9f * w / 7 - 1e-4f);
      for (float t : {0.0f, 1.0f}) {
        const float x = l.x0 + t * l.dx, y = l.y0 + t * l.dy;
        CHECK(x - l.size / 2 >= 0);
        CHECK(x + l.size / 2 <= w);
        CHECK(y - l.size / 2 >= 0);
        CHECK(y + l.size / 2 <= h);
      }
      const float fx = l.dx / w, fy = l.dy / h;
      switch (c.motion) {
        case Motion::Left: CHECK((fy == 0 && fx <= -0.25f && fx >= -0.45f)); break;
        case Motion::Right: CHECK((fy == 0 && fx >= 0.25f && fx <= 0.45f)); break;
        case Motion::Up: CHECK((fx == 0 && fy <= -0.25f && fy >= -0.45f)); break;
        case Motion::Down: CHECK((fx == 0 && fy >= 0.25f && fy <= 0.45f)); break;
        case Motion::Still: CHECK((fx == 0 && fy == 0)); break;
      }
    }
  }
  for (int m = 0; m < kMotions; ++m) CHECK(moves[m] > 250);  // 2000 draws, ~400 each
}

TEST_CASE("render_clip: exact background, exact colour inside, anti-aliased edges, linear motion", "[shapes]") {
  const std::int64_t W = 64, H = 64, F = 9;
  for (const Caption& c : Caption::all()) {
    if (c.motion != Motion::Right && c.motion != Motion::Still && c.motion != Motion::Up) continue;
    std::mt19937_64 rng(static_cast<int>(c.colour) * 100 + static_cast<int>(c.shape) * 10 + static_cast<int>(c.motion));
    const ClipLayout l = random_layout(c, W, H, rng);
    const at::Tensor v = render_clip(c, l, F, W, H);
    INFO(c.text());
    REQUIRE(v.sizes() == at::IntArrayRef({3, F, H, W}));
    REQUIRE(v.scalar_type() == at::kFloat);
    CHECK(v.min().item<float>() >= -1.0f);
    CHECK(v.max().item<float>() <= 1.0f);
    const RGB& colour = kPalette[static_cast<int>(c.colour)];
    int partial = 0;
    for (std::int64_t f = 0; f < F; ++f) {
      const float t = static_cast<float>(f) / (F - 1);
      const float cx = l.x0 + t * l.dx, cy = l.y0 + t * l.dy, half = l.size / 2;
      for (int ch = 0; ch < 3; ++ch)
        CHECK(pixel(v, ch, f, static_cast<std::int64_t>(cy), static_cast<std::int64_t>(cx)) == 2.0f * colour[ch] - 1.0f);
      // Every pixel more than a pixel outside the object's box is exactly the background.
      const at::Tensor frame = v.select(1, f);  // [3,H,W]
      at::Tensor outside = at::ones({H, W}, at::kBool);
      const std::int64_t x0 = static_cast<std::int64_t>(std::floor(cx - half)) - 1, x1 = static_cast<std::int64_t>(std::ceil(cx + half)) + 1;
      const std::int64_t y0 = static_cast<std::int64_t>(std::floor(cy - half)) - 1, y1 = static_cast<std::int64_t>(std::ceil(cy + half)) + 1;
      outside.narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0).fill_(false);
      for (int ch = 0; ch < 3; ++ch) {
        const at::Tensor values = frame[ch].masked_select(outside);
        CHECK(at::all(values == 2.0f * kBackground[ch] - 1.0f).item<bool>());
      }
      // Edge pixels blend the two colours.
      const at::Tensor red = frame[0];
      const float lo = std::min(2 * kBackground[0] - 1, 2 * colour[0] - 1), hi = std::max(2 * kBackground[0] - 1, 2 * colour[0] - 1);
      partial += at::logical_and(red > lo + 1e-3, red < hi - 1e-3).sum().item<int>();
    }
    CHECK(partial > 0);
  }

  // Motion: the first and last frames are the same object moved by (dx, dy) exactly when the
  // displacement is a whole number of pixels.
  const Caption c{Colour::Green, Shape::Triangle, Motion::Right};
  const ClipLayout l{9.0f, 12.25f, 30.5f, 20.0f, 0.0f};
  const at::Tensor v = render_clip(c, l, 5, W, H);
  CHECK(at::equal(v.select(1, 0).narrow(2, 0, W - 20), v.select(1, 4).narrow(2, 20, W - 20)));
  CHECK(!at::equal(v.select(1, 0), v.select(1, 4)));

  // One frame is a still image; sizes below 32 are refused.
  CHECK(render_clip(c, l, 1, W, H).sizes() == at::IntArrayRef({3, 1, H, W}));
  CHECK_THROWS_AS(render_clip(c, l, 9, 16, 64), InputError);
  CHECK_THROWS_AS(render_clip(c, l, 0, 64, 64), InputError);
}

TEST_CASE("random_batch matches render_clip, and stratifies colours on request", "[shapes]") {
  std::mt19937_64 a(11), b(11);
  const ClipBatch batch = random_batch(6, 9, 64, 48, a);
  REQUIRE(batch.video.sizes() == at::IntArrayRef({6, 3, 9, 48, 64}));
  REQUIRE(batch.captions.size() == 6);
  for (int i = 0; i < 6; ++i) {
    const Caption expected = random_caption(b);
    const ClipLayout layout = random_layout(expected, 64, 48, b);
    CHECK(batch.captions[i] == expected);
    CHECK(at::equal(batch.video[i], render_clip(expected, layout, 9, 64, 48)));
  }

  // Stratified: colours cycle from first_colour, everything else is drawn as before.
  std::mt19937_64 c(12), d(12);
  const ClipBatch strat = random_batch(8, 9, 64, 64, c, 4);
  for (int i = 0; i < 8; ++i) {
    Caption expected = random_caption(d);
    expected.colour = static_cast<Colour>((4 + i) % kColours);
    const ClipLayout layout = random_layout(expected, 64, 64, d);
    CHECK(strat.captions[i] == expected);
    CHECK(at::equal(strat.video[i], render_clip(expected, layout, 9, 64, 64)));
  }
}

TEST_CASE("the judge is right on every rendered, noisy and blurred clip", "[shapes]") {
  at::manual_seed(5);
  SECTION("clean 64x64x9") { require_perfect(judge_random(400, 9, 64, 64, 1, [](at::Tensor v) { return v; })); }
  SECTION("noise of std 0.05") {
    require_perfect(judge_random(400, 9, 64, 64, 2, [](at::Tensor v) { return v + 0.05 * at::randn(v.sizes()); }));
  }
  SECTION("3x3 box blur") { require_perfect(judge_random(400, 9, 64, 64, 3, box_blur)); }
  SECTION("blur and noise") {
    require_perfect(judge_random(300, 9, 64, 64, 4, [](at::Tensor v) { return box_blur(v) + 0.05 * at::randn(v.sizes()); }));
  }
  SECTION("colour drift: the object at 70 % contrast, tinted") {
    const at::Tensor bg = at::tensor({kBackground[0], kBackground[1], kBackground[2]}).view({3, 1, 1, 1}) * 2 - 1;
    const at::Tensor tint = at::tensor({0.03f, -0.03f, 0.02f}).view({3, 1, 1, 1});
    require_perfect(judge_random(300, 9, 64, 64, 5, [&](at::Tensor v) { return bg + 0.7 * (v - bg) + tint; }));
  }
  SECTION("other sizes and frame counts") {
    require_perfect(judge_random(200, 9, 32, 32, 6, [](at::Tensor v) { return v + 0.05 * at::randn(v.sizes()); }));
    require_perfect(judge_random(200, 5, 48, 80, 7, box_blur));
    require_perfect(judge_random(200, 2, 96, 64, 8, [](at::Tensor v) { return v; }));
    require_perfect(judge_random(100, 17, 128, 128, 9, box_blur));
  }
}

TEST_CASE("the judge: one frame, displacements, two objects, nothing, bad input", "[shapes]") {
  std::mt19937_64 rng(21);
  SECTION("a single frame judges colour and shape; motion is still") {
    for (int i = 0; i < 60; ++i) {
      const Caption c = random_caption(rng);
      const Judgement j = judge_clip(render_clip(c, random_layout(c, 64, 64, rng), 1, 64, 64));
      CHECK(j.ok);
      CHECK(j.colour == c.colour);
      CHECK(j.shape == c.shape);
      CHECK(j.motion == Motion::Still);
      CHECK(j.displacement_x == 0);
      CHECK(j.displacement_y == 0);
    }
  }
  SECTION("the measured displacement is the layout's") {
    for (const Motion m : {Motion::Left, Motion::Right, Motion::Up, Motion::Down}) {
      const Caption c{Colour::Red, Shape::Square, m};
      const ClipLayout l = random_layout(c, 64, 64, rng);
      const Judgement j = judge_clip(render_clip(c, l, 9, 64, 64));
      CHECK(j.displacement_x == Approx(l.dx / 64).margin(0.01));
      CHECK(j.displacement_y == Approx(l.dy / 64).margin(0.01));
    }
  }
  SECTION("an object that changes colour between frames is judged wrong on colour") {
    const Caption red{Colour::Red, Shape::Circle, Motion::Right}, purple{Colour::Purple, Shape::Circle, Motion::Right};
    const ClipLayout l{9, 10, 12, 30, 0};
    const at::Tensor vr = render_clip(red, l, 9, 64, 64), vp = render_clip(purple, l, 9, 64, 64);
    const at::Tensor mixed = at::cat({vr.slice(1, 0, 6), vp.slice(1, 6, 9)}, 1);
    const Judgement steady = judge_clip(vr), changing = judge_clip(mixed);
    CHECK(steady.colour_steady);
    CHECK(changing.ok);
    CHECK(changing.colour == Colour::Red);  // the clip's median colour
    CHECK_FALSE(changing.colour_steady);
    CHECK(changing.shape == Shape::Circle);
    CHECK(changing.motion == Motion::Right);
    JudgeSummary s;
    s.add(red, changing);
    s.add(red, steady);
    CHECK(s.colour_right == 1);
    CHECK(s.colour_unsteady == 1);
    CHECK(s.all_right == 1);
    CHECK(s.shape_right == 2);
  }
  SECTION("two objects are counted") {
    const Caption a{Colour::Red, Shape::Circle, Motion::Right}, b{Colour::Blue, Shape::Square, Motion::Still};
    const at::Tensor va = render_clip(a, ClipLayout{9, 10, 12, 30, 0}, 9, 64, 64);
    const at::Tensor vb = render_clip(b, ClipLayout{9, 30, 48, 0, 0}, 9, 64, 64);
    const at::Tensor bg = at::tensor({kBackground[0], kBackground[1], kBackground[2]}).view({3, 1, 1, 1}) * 2 - 1;
    const at::Tensor both = at::where((vb != bg).any(0, true), vb, va);
    const Judgement j = judge_clip(both);
    CHECK(j.ok);
    CHECK(j.objects == 2);
    CHECK(judge_clip(va).objects == 1);
    JudgeSummary s;
    s.add(a, j);
    s.add(a, judge_clip(va));
    CHECK(s.multi_object == 1);
    CHECK(s.clips == 2);
  }
  SECTION("a blank or noise-only clip has no object") {
    const at::Tensor bg = at::tensor({kBackground[0], kBackground[1], kBackground[2]}).view({3, 1, 1, 1}) * 2 - 1;
    const at::Tensor blank = bg.expand({3, 9, 64, 64}).contiguous();
    CHECK_FALSE(judge_clip(blank).ok);
    CHECK(judge_clip(blank).objects == 0);
    at::manual_seed(1);
    CHECK_FALSE(judge_clip(blank + 0.05 * at::randn(blank.sizes())).ok);
    CHECK_FALSE(judge_clip(at::full({3, 9, 64, 64}, std::nan(""))).ok);  // a diverged model
    // An object in only 2 of 9 frames is not one the caption can be judged on.
    const at::Tensor clip = render_clip(Caption{}, ClipLayout{9, 30, 30, 0, 0}, 9, 64, 64);
    at::Tensor flicker = blank.clone();
    flicker.narrow(1, 0, 2).copy_(clip.narrow(1, 0, 2));
    CHECK_FALSE(judge_clip(flicker).ok);
    JudgeSummary s;
    s.add(Caption{}, judge_clip(blank));
    CHECK(s.no_object == 1);
    CHECK(s.all_right == 0);
    CHECK(s.colour_right == 0);
  }
  SECTION("wrong shapes of input are refused") {
    CHECK_THROWS_AS(judge_clip(at::zeros({3, 64, 64})), InputError);
    CHECK_THROWS_AS(judge_clip(at::zeros({4, 9, 64, 64})), InputError);
  }
}

TEST_CASE("JudgeSummary counts and reports with names", "[shapes]") {
  JudgeSummary s;
  Judgement right;
  right.ok = true;
  right.objects = 1;
  right.colour = Colour::Green;
  right.colour_steady = true;
  right.shape = Shape::Triangle;
  right.motion = Motion::Left;
  const Caption truth{Colour::Green, Shape::Triangle, Motion::Left};
  s.add(truth, right);
  Judgement wrong = right;
  wrong.colour = Colour::Yellow;
  wrong.motion = Motion::Still;
  s.add(truth, wrong);
  CHECK(s.clips == 2);
  CHECK(s.colour_right == 1);
  CHECK(s.shape_right == 2);
  CHECK(s.motion_right == 1);
  CHECK(s.all_right == 1);
  CHECK(s.accuracy(s.shape_right) == 1.0);
  CHECK(s.confusion[0][static_cast<int>(Colour::Green)][static_cast<int>(Colour::Yellow)] == 1);
  CHECK(s.confusion[2][static_cast<int>(Motion::Left)][static_cast<int>(Motion::Still)] == 1);
  CHECK(s.confusion[1][static_cast<int>(Shape::Triangle)][static_cast<int>(Shape::Triangle)] == 2);
  const std::string r = s.report();
  INFO(r);
  CHECK(r.find("colour") != std::string::npos);
  CHECK(r.find("50.0 %") != std::string::npos);
  CHECK(r.find("100.0 %") != std::string::npos);
  for (const char* name : {"red", "purple", "white", "circle", "triangle", "left", "still"}) CHECK(r.find(name) != std::string::npos);
}

TEST_CASE("contact sheet: a grid of every frame, metadata, no overwrite", "[shapes]") {
  TempDir dir;
  std::mt19937_64 rng(4);
  const Caption c{Colour::Yellow, Shape::Circle, Motion::Down};
  const at::Tensor video = render_clip(c, random_layout(c, 64, 48, rng), 9, 64, 48);
  const std::string path = (dir.path / "sheet.png").string();
  write_contact_sheet(video, path, {{"prompt", c.text()}, {"seed", "3"}});
  const at::Tensor sheet = read_image(path);
  REQUIRE(sheet.sizes() == at::IntArrayRef({3, 3 * 48 + 2 * 2, 3 * 64 + 2 * 2}));
  for (int f = 0; f < 9; ++f) {
    const at::Tensor cell = sheet.narrow(1, (f / 3) * 50, 48).narrow(2, (f % 3) * 66, 64);
    CHECK(at::allclose(cell, video.select(1, f), 0, 1.0 / 127.5 + 1e-6));
  }
  const TextChunks text = read_png_text(path);
  REQUIRE(text.size() == 1);
  CHECK(text[0].first == "parameters");
  CHECK(nlohmann::json::parse(text[0].second)["prompt"] == c.text());

  CHECK_THROWS_AS(write_contact_sheet(video, path), InputError);
  CHECK(read_image(path).sizes() == sheet.sizes());  // untouched
  write_contact_sheet(video, path, {{"parameters", "a yellow circle moving down"}}, 9, /*overwrite=*/true);
  CHECK(read_image(path).sizes() == at::IntArrayRef({3, 48, 9 * 64 + 8 * 2}));
  CHECK(read_png_text(path).at(0).second == "a yellow circle moving down");
  CHECK_THROWS_AS(write_contact_sheet(video, (dir.path / "x.png").string(), {}, -1), InputError);
}

TEST_CASE("vdit eval shapes --render-only judges rendered clips, a missing model is one clear error", "[shapes][cli]") {
  TempDir dir;
  std::string out;
  REQUIRE(run_vdit("--quiet eval shapes --render-only --clips 40 --seed 3 --json", out) == 0);
  INFO(out);
  const auto j = nlohmann::json::parse(out);
  CHECK(j["clips"] == 40);
  CHECK(j["all"] == 1.0);
  CHECK(j["colour"] == 1.0);
  CHECK(j["multi_object"] == 0);
  // Rendered clips judge right, so each confusion table is diagonal and its rows sum to the clips.
  for (const char* attribute : {"colour", "shape", "motion"}) {
    INFO(attribute);
    const auto& table = j["confusion"][attribute];
    const auto& rows = table["rows"];
    REQUIRE(rows.size() == table["labels"].size());
    int total = 0;
    for (std::size_t t = 0; t < rows.size(); ++t) {
      REQUIRE(rows[t].size() == rows.size());
      for (std::size_t k = 0; k < rows.size(); ++k) {
        total += rows[t][k].get<int>();
        if (t != k) CHECK(rows[t][k] == 0);
      }
    }
    CHECK(total == 40);
  }
  CHECK(j["confusion"]["shape"]["labels"] == nlohmann::json({"circle", "square", "triangle"}));
  CHECK_FALSE(j.contains("per_clip"));

  // --per-clip lists every clip with the features behind its shape verdict: rendered shapes sit on
  // their side of the judge's thresholds (square fill >= 0.89, triangle skew > 0.045).
  REQUIRE(run_vdit("--quiet eval shapes --render-only --clips 40 --seed 3 --json --per-clip", out) == 0);
  const auto detailed = nlohmann::json::parse(out);
  REQUIRE(detailed["per_clip"].size() == 40);
  for (const auto& clip : detailed["per_clip"]) {
    INFO(clip.dump());
    const std::string caption = clip["caption"];
    CHECK(clip["verdict"] == "ok");
    CHECK(clip["objects"] == 1);
    const double fill = clip["fill"], skew = clip["skew"];
    if (caption.find("square") != std::string::npos) CHECK(fill >= 0.89);
    if (caption.find("circle") != std::string::npos) CHECK((fill > 0.7 && fill < 0.89));
    if (caption.find("triangle") != std::string::npos) CHECK(skew > 0.045);
    else CHECK(std::abs(skew) < 0.045);
  }
  CHECK(run_vdit("--quiet eval shapes --render-only --clips 2 --per-clip", out) == 2);  // needs --json
  CHECK(out.find("--per-clip requires --json") != std::string::npos);

  REQUIRE(run_vdit("eval shapes --render-only --clips 3 --save-dir " + (dir.path / "sheets").string(), out) == 0);
  CHECK(out.find("all three") != std::string::npos);
  CHECK(out.find("[1/3]") != std::string::npos);
  CHECK(fs::exists(dir.path / "sheets" / "clip_0003.png"));
  CHECK(read_image((dir.path / "sheets" / "clip_0001.png").string()).sizes() == at::IntArrayRef({3, 196, 196}));
  CHECK(run_vdit("eval shapes --render-only --clips 3 --save-dir " + (dir.path / "sheets").string(), out) == 2);
  CHECK(run_vdit("eval shapes --render-only --clips 3 --overwrite --save-dir " + (dir.path / "sheets").string(), out) == 0);

  CHECK(run_vdit("eval shapes --model " + (dir.path / "no-such-model").string(), out) == 2);
  CHECK(out.find("no-such-model") != std::string::npos);
  CHECK(std::count(out.begin(), out.end(), '\n') == 1);
  CHECK(run_vdit("eval shapes --render-only --size 16x16", out) == 2);
  CHECK(run_vdit("eval shapes --render-only --clips 0", out) == 2);
}

TEST_CASE("vdit eval shapes generates, judges and saves clips with a model", "[shapes][cli]") {
  // The tiny fixture model draws noise, not shapes: this checks the generate-judge-report path
  // (prompt encoding, per-clip seeds, decoding, sheets, JSON), not the accuracy.
  TempDir dir;
  const fs::path model = vdit_test::make_tiny_model(dir.path / "model", "diffusers");
  const std::string common = "--quiet eval shapes --model " + model.string() + " --size 32x32 --frames 5 --steps 2 --clips 3 --seed 4 ";
  std::string out;
  REQUIRE(run_vdit(common + "--json --save-dir " + (dir.path / "sheets").string(), out) == 0);
  INFO(out);
  const auto j = nlohmann::json::parse(out);
  CHECK(j["clips"] == 3);
  CHECK(j["source"] == "generated");
  CHECK(j["steps"] == 2);
  for (const char* key : {"colour", "shape", "motion", "all"}) CHECK((j[key] >= 0.0 && j[key] <= 1.0));
  const std::string sheet = (dir.path / "sheets" / "clip_0002.png").string();
  REQUIRE(fs::exists(sheet));
  CHECK(read_image(sheet).sizes() == at::IntArrayRef({3, 32 * 2 + 2, 32 * 3 + 2 * 2}));
  const auto meta = nlohmann::json::parse(read_png_text(sheet).at(0).second);
  CHECK(meta["seed"] == "5");  // clip i uses seed + i
  std::mt19937_64 captions(4);
  random_caption(captions);
  CHECK(meta["prompt"] == random_caption(captions).text());

  // Sizes the model cannot take are refused before it is loaded.
  CHECK(run_vdit("eval shapes --model " + model.string() + " --size 40x40", out) == 2);
  CHECK(out.find("multiple of 16") != std::string::npos);
  // ... and leave no --save-dir behind.
  CHECK(run_vdit("eval shapes --model " + model.string() + " --size 40x40 --save-dir " + (dir.path / "refused").string(),
                 out) == 2);
  CHECK_FALSE(fs::exists(dir.path / "refused"));
}

TEST_CASE("vdit eval shapes --strength denoises the rendered clips from part of the schedule", "[shapes][cli]") {
  TempDir dir;
  const fs::path model = vdit_test::make_tiny_model(dir.path / "model", "diffusers");
  const std::string common = "--quiet eval shapes --model " + model.string() + " --size 32x32 --frames 5 --clips 2 --seed 4 --steps 10 ";
  std::string out;
  REQUIRE(run_vdit(common + "--round-trip --save-dir " + (dir.path / "trip").string(), out) == 0);
  // Shift 0.01 puts the one kept step at sigma ~0.001.
  REQUIRE(run_vdit(common + "--strength 0.1 --shift 0.01 --json --save-dir " + (dir.path / "low").string(), out) == 0);
  INFO(out);
  const auto j = nlohmann::json::parse(out);
  CHECK(j["strength"] == 0.1);
  CHECK(j["source"] == "generated");
  REQUIRE(run_vdit(common + "--save-dir " + (dir.path / "full").string(), out) == 0);
  // One kept step from sigma ~0.001 leaves the rendered clip's round trip nearly as it was (even
  // with this random DiT); a whole run from noise does not. The same layouts are drawn as for
  // --round-trip.
  const auto sheet = [&](const std::string& run) { return read_image((dir.path / run / "clip_0001.png").string()); };
  const double low = (sheet("low") - sheet("trip")).abs().mean().item<double>();
  const double full = (sheet("full") - sheet("trip")).abs().mean().item<double>();
  CHECK(low < 0.25 * full);
  const auto meta = nlohmann::json::parse(read_png_text((dir.path / "low" / "clip_0001.png").string()).at(0).second);
  CHECK(meta["strength"] == "0.1");

  for (const std::string bad : {"--strength 0.5 --round-trip", "--strength 0.5 --render-only", "--strength 0", "--strength 1.5"}) {
    INFO(bad);
    CHECK(run_vdit("eval shapes --model " + model.string() + " --size 32x32 --frames 5 " + bad, out) == 2);
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
  }
}

TEST_CASE("vdit eval shapes --round-trip judges rendered clips through the model's VAE only", "[shapes][cli]") {
  TempDir dir;
  const fs::path model = vdit_test::make_tiny_model(dir.path / "model", "diffusers");
  const std::string common = "--quiet eval shapes --model " + model.string() + " --size 32x32 --frames 5 --clips 2 --seed 4 --round-trip ";
  std::string out;
  REQUIRE(run_vdit(common + "--json --save-dir " + (dir.path / "clean").string(), out) == 0);
  INFO(out);
  const auto j = nlohmann::json::parse(out);
  CHECK(j["clips"] == 2);
  CHECK(j["source"] == "round-trip");
  CHECK(j["latent_noise"] == 0.0);
  const auto meta = nlohmann::json::parse(read_png_text((dir.path / "clean" / "clip_0001.png").string()).at(0).second);
  CHECK(meta["source"] == "VAE round trip");
  std::mt19937_64 captions(4);
  CHECK(meta["prompt"] == random_caption(captions).text());  // the same captions as --render-only

  // Latent noise is seeded per clip (seed + i): the same run twice gives the same pixels, and the
  // noise changes them.
  const auto sheet = [&](const std::string& run) { return read_image((dir.path / run / "clip_0002.png").string()); };
  REQUIRE(run_vdit(common + "--latent-noise 2 --save-dir " + (dir.path / "noisy1").string(), out) == 0);
  REQUIRE(run_vdit(common + "--latent-noise 2 --save-dir " + (dir.path / "noisy2").string(), out) == 0);
  CHECK(at::equal(sheet("noisy1"), sheet("noisy2")));
  CHECK_FALSE(at::equal(sheet("noisy1"), sheet("clean")));

  // Latent blur: deterministic, changes the pixels, recorded in the metadata.
  REQUIRE(run_vdit(common + "--latent-blur 1 --json --save-dir " + (dir.path / "blur1").string(), out) == 0);
  CHECK(nlohmann::json::parse(out)["latent_blur"] == 1.0);
  REQUIRE(run_vdit(common + "--latent-blur 1 --save-dir " + (dir.path / "blur2").string(), out) == 0);
  CHECK(at::equal(sheet("blur1"), sheet("blur2")));
  CHECK_FALSE(at::equal(sheet("blur1"), sheet("clean")));
  CHECK(nlohmann::json::parse(read_png_text((dir.path / "blur1" / "clip_0001.png").string()).at(0).second)["latent blur"] == "1");

  for (const std::string bad : {"--round-trip --render-only", "--round-trip --latent-noise -1", "--latent-noise 0.5",
                                "--round-trip --latent-blur -1", "--latent-blur 1"}) {
    CHECK(run_vdit("eval shapes --model " + model.string() + " " + bad, out) == 2);
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
  }
}
