// The "shapes" domain of vdit's built-in demo model: one coloured object (circle, square or
// triangle) on a plain background, moving left/right/up/down or standing still. This header is
// the contract shared by the renderer (training data), the trainer and the judge that scores
// generated clips from their pixels. Values are fixed by the demo-model issue; the judge relies
// on them.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace vdit::shapes {

// RGB in [0, 1].
using RGB = std::array<float, 3>;
inline constexpr RGB kBackground{0.08f, 0.08f, 0.10f};

enum class Colour { Red, Green, Blue, Yellow, Purple, White };
enum class Shape { Circle, Square, Triangle };
enum class Motion { Left, Right, Up, Down, Still };

inline constexpr int kColours = 6, kShapes = 3, kMotions = 5;
inline constexpr std::array<RGB, kColours> kPalette{{{0.90f, 0.15f, 0.15f},
                                                     {0.15f, 0.75f, 0.20f},
                                                     {0.20f, 0.35f, 0.95f},
                                                     {0.95f, 0.85f, 0.15f},
                                                     {0.60f, 0.20f, 0.85f},
                                                     {0.95f, 0.95f, 0.95f}}};

const char* colour_name(Colour c);   // "red", ...
const char* shape_name(Shape s);     // "circle", "square", "triangle"
const char* motion_name(Motion m);   // "left", "right", "up", "down", "still"

struct Caption {
  Colour colour = Colour::Red;
  Shape shape = Shape::Circle;
  Motion motion = Motion::Still;
  // "a red circle moving right" / "a red circle standing still".
  std::string text() const;
  // Parses exactly that grammar (case and surrounding spaces tolerated); throws vdit::InputError
  // otherwise.
  static Caption parse(const std::string& text);
  // All 6 x 3 x 5 = 90 captions in a fixed order.
  static std::vector<Caption> all();
  bool operator==(const Caption& o) const { return colour == o.colour && shape == o.shape && motion == o.motion; }
};

// Random caption and motion parameters, drawn from `rng`.
Caption random_caption(std::mt19937_64& rng);

// One clip's geometry: object size (side / diameter / triangle base) in pixels, start centre,
// and total displacement over the clip (pixels), chosen so the object stays inside the frame.
struct ClipLayout {
  float size = 0;       // ~ width / 7
  float x0 = 0, y0 = 0; // centre at frame 0 (pixels, x right, y down)
  float dx = 0, dy = 0; // centre displacement from frame 0 to the last frame
};

// The object size a layout aims at before its +-10 % draw: width/7, smaller only where vertical
// motion of 45 % plus the object would not fit a short frame.
float nominal_object_size(std::int64_t width, std::int64_t height);

// Size about width/7 (±10 %), displacement 25-45 % of the frame side along the caption's
// direction (0 for still), start position uniform among those that keep the object inside.
ClipLayout random_layout(const Caption& caption, std::int64_t width, std::int64_t height, std::mt19937_64& rng);

// Renders [3, frames, height, width] f32 in [-1, 1] (pixel value v in [0,1] maps to 2v-1), with
// anti-aliased edges (coverage by 4x4 supersampling) and linear motion.
at::Tensor render_clip(const Caption& caption, const ClipLayout& layout, std::int64_t frames, std::int64_t width,
                       std::int64_t height);

// A batch of `batch` random clips [batch, 3, frames, height, width] with their captions.
struct ClipBatch {
  at::Tensor video;
  std::vector<Caption> captions;
};
// With first_colour >= 0 the colours are not drawn but cycle through the palette from that
// index (clip b gets (first_colour + b) mod 6): stratified validation sets.
ClipBatch random_batch(std::int64_t batch, std::int64_t frames, std::int64_t width, std::int64_t height,
                       std::mt19937_64& rng, int first_colour = -1);

// ------------------------------------------------------------------------------------ judging

struct Judgement {
  bool ok = false;            // an object was found
  int objects = 0;            // connected foreground components of meaningful size (median over frames)
  Colour colour = Colour::Red;
  bool colour_steady = false;  // every frame's object has `colour` (a colour change is judged wrong)
  Shape shape = Shape::Circle;
  Motion motion = Motion::Still;
  float displacement_x = 0, displacement_y = 0;  // centroid track, first to last frame, in frame sides
  // The shape features behind `shape`, median over the frames (0 without an object): fill ratio
  // (square 1, circle pi/4, triangle ~0.5; square from 0.89) and vertical skew (triangle ~1/6,
  // triangle from 0.045), to see how near a clip came to the other verdict.
  float fill = 0, skew = 0;
};

// Scores a clip [3, F, H, W] in [-1, 1] from its pixels: foreground = pixels far from the
// background colour; colour = nearest palette entry to the foreground's median colour, right only
// when every frame's own nearest entry agrees (colour_steady); shape from
// the foreground's fill ratio and vertical profile per frame (majority vote); motion from the
// centroid track (still when the displacement is under a threshold). One frame: motion is Still.
// Works for any frame size; sizes other than [3, F, H, W] -> InputError.
Judgement judge_clip(const at::Tensor& video);

struct JudgeSummary {
  int clips = 0;
  int colour_right = 0, shape_right = 0, motion_right = 0, all_right = 0, multi_object = 0;
  int no_object = 0;  // clips where judge_clip found no object (ok == false): wrong on every attribute
  int colour_unsteady = 0;  // clips whose object changes colour between frames (colour counted wrong)
  // confusion[attribute][truth][judged]; attribute 0 colour (6x6), 1 shape (3x3), 2 motion (5x5)
  std::vector<std::vector<std::vector<int>>> confusion;
  static constexpr int kAttributes = 3;
  static const char* attribute_name(int attribute);                 // "colour", "shape", "motion"
  static std::vector<std::string> category_names(int attribute);    // confusion's row/column order
  JudgeSummary();
  void add(const Caption& truth, const Judgement& judged);
  std::string report() const;  // per-attribute accuracy and the confusion tables, human-readable
  double accuracy(int right) const;  // right / clips (0 when no clips)
};

}  // namespace vdit::shapes
