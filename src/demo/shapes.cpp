// The "shapes" demo domain: captions, the renderer that makes the demo model's training clips,
// and the judge that scores generated clips from their pixels alone.
//
// The renderer writes straight into a float buffer with plain loops: the trainer renders
// thousands of small clips, and per-pixel ATen ops would cost far more than the arithmetic.
// The judge works on coverage estimates (how much of a pixel the object covers, projected on the
// object's own colour) rather than on a hard mask wherever it measures geometry, because blur,
// anti-aliasing and a generative model's soft edges move a hard mask's boundary by a pixel, which
// at 64x64 is ~10 % of the object.
#include "vdit/demo/shapes.h"

#include "vdit/common.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <iomanip>
#include <sstream>

namespace vdit::shapes {

namespace {

constexpr const char* kColourNames[kColours] = {"red", "green", "blue", "yellow", "purple", "white"};
constexpr const char* kShapeNames[kShapes] = {"circle", "square", "triangle"};
constexpr const char* kMotionNames[kMotions] = {"left", "right", "up", "down", "still"};

// Pixels kept free between the object and the frame border, so its anti-aliased edge never
// touches the border (a clipped object would change its fill ratio and centroid).
constexpr float kMargin = 1.0f;
// 4x4 supersampling per pixel.
constexpr int kSub = 4;

template <typename Enum, std::size_t N>
Enum lookup(const char* const (&names)[N], const std::string& word, bool& found) {
  for (std::size_t i = 0; i < N; ++i) {
    if (word == names[i]) {
      found = true;
      return static_cast<Enum>(i);
    }
  }
  found = false;
  return static_cast<Enum>(0);
}

float uniform(std::mt19937_64& rng, float lo, float hi) {
  return std::uniform_real_distribution<float>(lo, hi)(rng);
}

// Whether the point (px, py) lies inside the shape of size `s` centred at (cx, cy). All three
// shapes fill the same s x s box, so "centre" means the box centre for each.
inline bool inside(Shape shape, float px, float py, float cx, float cy, float half) {
  const float ux = px - cx, uy = py - cy;
  switch (shape) {
    case Shape::Circle:
      return ux * ux + uy * uy <= half * half;
    case Shape::Square:
      return std::fabs(ux) <= half && std::fabs(uy) <= half;
    case Shape::Triangle: {
      // Apex at the top centre, base along the bottom: the half-width grows from 0 at the apex
      // to `half` at the base, i.e. by 1/2 per unit of depth.
      const float depth = uy + half;
      return depth >= 0 && depth <= 2 * half && std::fabs(ux) <= 0.5f * depth;
    }
  }
  return false;
}

// Renders one clip into `out` ([3, F, H, W] contiguous floats).
void render_into(float* out, const Caption& caption, const ClipLayout& layout, std::int64_t frames,
                 std::int64_t width, std::int64_t height) {
  const std::int64_t plane = width * height, channel = frames * plane;
  const RGB& colour = kPalette[static_cast<int>(caption.colour)];
  for (int c = 0; c < 3; ++c) std::fill(out + c * channel, out + (c + 1) * channel, 2.0f * kBackground[c] - 1.0f);

  const float half = 0.5f * layout.size;
  for (std::int64_t f = 0; f < frames; ++f) {
    const float t = frames > 1 ? static_cast<float>(f) / static_cast<float>(frames - 1) : 0.0f;
    const float cx = layout.x0 + layout.dx * t, cy = layout.y0 + layout.dy * t;
    const std::int64_t j0 = std::max<std::int64_t>(0, static_cast<std::int64_t>(std::floor(cx - half)));
    const std::int64_t j1 = std::min<std::int64_t>(width - 1, static_cast<std::int64_t>(std::floor(cx + half)));
    const std::int64_t i0 = std::max<std::int64_t>(0, static_cast<std::int64_t>(std::floor(cy - half)));
    const std::int64_t i1 = std::min<std::int64_t>(height - 1, static_cast<std::int64_t>(std::floor(cy + half)));
    for (std::int64_t i = i0; i <= i1; ++i) {
      for (std::int64_t j = j0; j <= j1; ++j) {
        // All three shapes are convex, so a pixel whose four corners are inside is covered
        // entirely; that skips the supersampling for the interior.
        const float fi = static_cast<float>(i), fj = static_cast<float>(j);
        const bool full = inside(caption.shape, fj, fi, cx, cy, half) && inside(caption.shape, fj + 1, fi, cx, cy, half) &&
                          inside(caption.shape, fj, fi + 1, cx, cy, half) &&
                          inside(caption.shape, fj + 1, fi + 1, cx, cy, half);
        int hits = full ? kSub * kSub : 0;
        for (int a = 0; a < kSub && !full; ++a) {
          const float py = static_cast<float>(i) + (a + 0.5f) / kSub;
          for (int b = 0; b < kSub; ++b) {
            const float px = static_cast<float>(j) + (b + 0.5f) / kSub;
            hits += inside(caption.shape, px, py, cx, cy, half);
          }
        }
        if (hits == 0) continue;
        const std::int64_t at = f * plane + i * width + j;
        for (int c = 0; c < 3; ++c) {
          // Full coverage writes the palette value itself (not a blend that rounds near it), so
          // the object's interior is exactly its caption's colour.
          const float v = hits == kSub * kSub
                              ? colour[c]
                              : kBackground[c] + (colour[c] - kBackground[c]) * (static_cast<float>(hits) / (kSub * kSub));
          out[c * channel + at] = 2.0f * v - 1.0f;
        }
      }
    }
  }
}

void check_geometry(std::int64_t frames, std::int64_t width, std::int64_t height, const char* what) {
  if (frames < 1) throw InputError(std::string(what) + ": frames must be >= 1");
  if (width < 32 || height < 32)
    throw InputError(std::string(what) + ": the shapes domain needs frames of at least 32x32, got " +
                     std::to_string(width) + "x" + std::to_string(height));
}

// ------------------------------------------------------------------------------------ judging

// Foreground: Euclidean RGB distance (in [0,1] units) from the background above this. The palette
// colours lie 0.8-1.5 away from the background, so this keeps pixels with >~30 % coverage and is
// ~10 standard deviations above noise of std 0.025 per channel.
constexpr float kForegroundDistance = 0.25f;
// A component counts as an object when its area is at least this share of the smallest expected
// object (a triangle of the nominal size).
constexpr float kMinObjectShare = 0.25f;
// Motion: a centroid displacement under this share of the frame side is "still". Rendered
// motion is >= 25 %, still clips move 0 %.
constexpr float kStillThreshold = 0.10f;
// Shape thresholds (see frame_shape): the triangle's mass centre lies 1/6 of its height below
// the middle of its vertical extent, the others' on it; fill ratio of a square 1, circle pi/4.
// Measured per frame over 1000 rendered clips each, clean / noise 0.05 / 3x3 blur: triangle skew
// >= 0.093 at 64x64 (>= 0.059 at 32x32 with noise), circle and square |skew| <= 0.013 (0.030 at
// 32x32); circle fill <= 0.845, square fill >= 0.931 (0.909 at 32x32). Each threshold sits in
// the middle of its gap.
constexpr double kTriangleSkew = 0.045;
constexpr double kSquareFill = 0.89;
// Colour matching accepts an object core blended down to this share of its colour.
constexpr double kMinCoverage = 0.4;

struct Component {
  std::vector<std::int32_t> pixels;  // indices into the frame
};

struct FrameAnalysis {
  bool valid = false;     // a component of object size exists
  int objects = 0;        // components of object size
  Component main;         // the largest component
};

// Connected components (4-connectivity) of `mask` ([H*W]); returns them largest first.
std::vector<Component> components(const std::vector<std::uint8_t>& mask, std::int64_t width, std::int64_t height) {
  std::vector<std::int32_t> label(mask.size(), -1);
  std::vector<Component> out;
  std::vector<std::int32_t> stack;
  for (std::int64_t start = 0; start < static_cast<std::int64_t>(mask.size()); ++start) {
    if (!mask[start] || label[start] >= 0) continue;
    Component comp;
    const std::int32_t id = static_cast<std::int32_t>(out.size());
    stack.assign(1, static_cast<std::int32_t>(start));
    label[start] = id;
    while (!stack.empty()) {
      const std::int32_t p = stack.back();
      stack.pop_back();
      comp.pixels.push_back(p);
      const std::int64_t i = p / width, j = p % width;
      const std::int64_t neighbours[4][2] = {{i - 1, j}, {i + 1, j}, {i, j - 1}, {i, j + 1}};
      for (const auto& n : neighbours) {
        if (n[0] < 0 || n[0] >= height || n[1] < 0 || n[1] >= width) continue;
        const std::int64_t q = n[0] * width + n[1];
        if (mask[q] && label[q] < 0) {
          label[q] = id;
          stack.push_back(static_cast<std::int32_t>(q));
        }
      }
    }
    out.push_back(std::move(comp));
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const Component& a, const Component& b) { return a.pixels.size() > b.pixels.size(); });
  return out;
}

// Views one frame of a [3, F, H, W] contiguous [0,1] buffer.
struct FrameView {
  const float* r;
  const float* g;
  const float* b;
};

struct ShapeFeatures {
  double area = 0, fill = 0, skew = 0, cx = 0, cy = 0;
};

// Geometry of the main component from coverage estimates. Coverage of a pixel = its colour's
// projection on the object-minus-background direction, clamped to [0,1]; it is summed over the
// component grown by one pixel, so the faint anti-aliased or blurred rim outside the foreground
// mask still counts. From it:
//   area  = sum of coverage,
//   width = sum over columns of the column's largest coverage (exact for an axis-aligned edge at
//           any sub-pixel position, and unchanged by a box blur), height likewise over rows,
//   fill  = area / (width * height): square 1, circle pi/4 ~ 0.785, triangle ~0.5,
//   skew  = (mass centre y - centre of the row profile) / height: 1/6 for an apex-up triangle,
//           0 for the symmetric shapes.
ShapeFeatures frame_shape(const FrameView& v, const Component& comp, const RGB& object, std::int64_t width,
                          std::int64_t height) {
  const double dr = object[0] - kBackground[0], dg = object[1] - kBackground[1], db = object[2] - kBackground[2];
  const double d2 = std::max(dr * dr + dg * dg + db * db, 1e-6);
  std::int64_t i0 = height, i1 = -1, j0 = width, j1 = -1;
  for (std::int32_t p : comp.pixels) {
    const std::int64_t i = p / width, j = p % width;
    i0 = std::min(i0, i), i1 = std::max(i1, i), j0 = std::min(j0, j), j1 = std::max(j1, j);
  }
  // Grow the box by one pixel; inside it, use only pixels of the component or next to it, so a
  // second object that happens to share the box is not mixed in.
  i0 = std::max<std::int64_t>(0, i0 - 1), i1 = std::min(height - 1, i1 + 1);
  j0 = std::max<std::int64_t>(0, j0 - 1), j1 = std::min(width - 1, j1 + 1);
  const std::int64_t bw = j1 - j0 + 1, bh = i1 - i0 + 1;
  std::vector<std::uint8_t> near(static_cast<std::size_t>(bw * bh), 0);
  for (std::int32_t p : comp.pixels) {
    const std::int64_t i = p / width - i0, j = p % width - j0;
    for (std::int64_t a = std::max<std::int64_t>(0, i - 1); a <= std::min(bh - 1, i + 1); ++a)
      for (std::int64_t b = std::max<std::int64_t>(0, j - 1); b <= std::min(bw - 1, j + 1); ++b) near[a * bw + b] = 1;
  }
  std::vector<double> row_max(bh, 0.0), col_max(bw, 0.0);
  ShapeFeatures s;
  double mx = 0, my = 0;
  for (std::int64_t a = 0; a < bh; ++a) {
    for (std::int64_t b = 0; b < bw; ++b) {
      if (!near[a * bw + b]) continue;
      const std::int64_t p = (i0 + a) * width + (j0 + b);
      const double c = std::clamp(((v.r[p] - kBackground[0]) * dr + (v.g[p] - kBackground[1]) * dg +
                                   (v.b[p] - kBackground[2]) * db) / d2, 0.0, 1.0);
      s.area += c;
      mx += c * (j0 + b + 0.5);
      my += c * (i0 + a + 0.5);
      row_max[a] = std::max(row_max[a], c);
      col_max[b] = std::max(col_max[b], c);
    }
  }
  if (s.area <= 0) return s;
  s.cx = mx / s.area;
  s.cy = my / s.area;
  double w = 0, h = 0, row_centre = 0;
  for (double c : col_max) w += c;
  for (std::int64_t a = 0; a < bh; ++a) {
    h += row_max[a];
    row_centre += row_max[a] * (i0 + a + 0.5);
  }
  row_centre /= h;
  s.fill = s.area / (w * h);
  s.skew = (s.cy - row_centre) / h;
  return s;
}

Shape classify(const ShapeFeatures& s) {
  if (s.skew > kTriangleSkew) return Shape::Triangle;
  return s.fill >= kSquareFill ? Shape::Square : Shape::Circle;
}

float median(std::vector<float>& values) {
  const auto mid = values.begin() + static_cast<std::ptrdiff_t>(values.size() / 2);
  std::nth_element(values.begin(), mid, values.end());
  return *mid;
}

}  // namespace

const char* colour_name(Colour c) { return kColourNames[static_cast<int>(c)]; }
const char* shape_name(Shape s) { return kShapeNames[static_cast<int>(s)]; }
const char* motion_name(Motion m) { return kMotionNames[static_cast<int>(m)]; }

std::string Caption::text() const {
  std::string out = std::string("a ") + colour_name(colour) + " " + shape_name(shape);
  return out + (motion == Motion::Still ? std::string(" standing still") : std::string(" moving ") + motion_name(motion));
}

Caption Caption::parse(const std::string& text) {
  std::string lowered(text);
  std::transform(lowered.begin(), lowered.end(), lowered.begin(), [](unsigned char c) { return std::tolower(c); });
  std::istringstream in(lowered);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  const auto fail = [&]() -> Caption {
    throw InputError("'" + text + "' is not a shapes caption (expected 'a COLOUR SHAPE moving left|right|up|down' or "
                     "'a COLOUR SHAPE standing still')");
  };
  if (words.size() != 5 || words[0] != "a") return fail();
  Caption c;
  bool found = false;
  c.colour = lookup<Colour>(kColourNames, words[1], found);
  if (!found) return fail();
  c.shape = lookup<Shape>(kShapeNames, words[2], found);
  if (!found) return fail();
  if (words[3] == "standing" && words[4] == "still") {
    c.motion = Motion::Still;
    return c;
  }
  if (words[3] != "moving") return fail();
  c.motion = lookup<Motion>(kMotionNames, words[4], found);
  if (!found || c.motion == Motion::Still) return fail();
  return c;
}

std::vector<Caption> Caption::all() {
  std::vector<Caption> out;
  out.reserve(kColours * kShapes * kMotions);
  for (int c = 0; c < kColours; ++c)
    for (int s = 0; s < kShapes; ++s)
      for (int m = 0; m < kMotions; ++m)
        out.push_back(Caption{static_cast<Colour>(c), static_cast<Shape>(s), static_cast<Motion>(m)});
  return out;
}

Caption random_caption(std::mt19937_64& rng) {
  Caption c;
  c.colour = static_cast<Colour>(std::uniform_int_distribution<int>(0, kColours - 1)(rng));
  c.shape = static_cast<Shape>(std::uniform_int_distribution<int>(0, kShapes - 1)(rng));
  c.motion = static_cast<Motion>(std::uniform_int_distribution<int>(0, kMotions - 1)(rng));
  return c;
}

// Never so large that vertical motion of 45 % plus the object could leave a short frame.
float nominal_object_size(std::int64_t width, std::int64_t height) {
  return std::min(static_cast<float>(width) / 7.0f, 0.3f * static_cast<float>(std::min(width, height)) / 1.1f);
}

ClipLayout random_layout(const Caption& caption, std::int64_t width, std::int64_t height, std::mt19937_64& rng) {
  check_geometry(1, width, height, "random_layout");
  const float w = static_cast<float>(width), h = static_cast<float>(height);
  ClipLayout l;
  l.size = nominal_object_size(width, height) * uniform(rng, 0.9f, 1.1f);
  switch (caption.motion) {
    case Motion::Left: l.dx = -uniform(rng, 0.25f, 0.45f) * w; break;
    case Motion::Right: l.dx = uniform(rng, 0.25f, 0.45f) * w; break;
    case Motion::Up: l.dy = -uniform(rng, 0.25f, 0.45f) * h; break;
    case Motion::Down: l.dy = uniform(rng, 0.25f, 0.45f) * h; break;
    case Motion::Still: break;
  }
  // The centre's whole track must stay within [half + margin, side - half - margin].
  const float half = 0.5f * l.size;
  l.x0 = uniform(rng, half + kMargin - std::min(0.0f, l.dx), w - half - kMargin - std::max(0.0f, l.dx));
  l.y0 = uniform(rng, half + kMargin - std::min(0.0f, l.dy), h - half - kMargin - std::max(0.0f, l.dy));
  return l;
}

at::Tensor render_clip(const Caption& caption, const ClipLayout& layout, std::int64_t frames, std::int64_t width,
                       std::int64_t height) {
  check_geometry(frames, width, height, "render_clip");
  at::Tensor out = at::empty({3, frames, height, width}, at::TensorOptions().dtype(at::kFloat));
  render_into(out.data_ptr<float>(), caption, layout, frames, width, height);
  return out;
}

ClipBatch random_batch(std::int64_t batch, std::int64_t frames, std::int64_t width, std::int64_t height,
                       std::mt19937_64& rng, int first_colour) {
  check_geometry(frames, width, height, "random_batch");
  if (batch < 1) throw InputError("random_batch: batch must be >= 1");
  ClipBatch out;
  out.video = at::empty({batch, 3, frames, height, width}, at::TensorOptions().dtype(at::kFloat));
  out.captions.reserve(static_cast<std::size_t>(batch));
  float* data = out.video.data_ptr<float>();
  const std::int64_t clip = 3 * frames * height * width;
  for (std::int64_t b = 0; b < batch; ++b) {
    Caption caption = random_caption(rng);
    if (first_colour >= 0) caption.colour = static_cast<Colour>((first_colour + b) % kColours);
    const ClipLayout layout = random_layout(caption, width, height, rng);
    render_into(data + b * clip, caption, layout, frames, width, height);
    out.captions.push_back(caption);
  }
  return out;
}

// Nearest palette entry, where each entry stands for the segment from "partly covered" to
// "fully covered" (background blended with the colour at kMinCoverage..1): a small or blurred
// object's core is still mixed with the background, and plain nearest-colour would then take a
// dimmed white for purple (the palette's closest entry to mid-grey).
namespace {
Colour nearest_colour(const RGB& observed) {
  double best = 1e30;
  Colour nearest = Colour::Red;
  for (int c = 0; c < kColours; ++c) {
    double dot = 0, norm = 0;
    for (int k = 0; k < 3; ++k) {
      const double dir = kPalette[c][k] - kBackground[k];
      dot += (observed[k] - kBackground[k]) * dir;
      norm += dir * dir;
    }
    const double coverage = std::clamp(dot / norm, kMinCoverage, 1.0);
    double d = 0;
    for (int k = 0; k < 3; ++k) {
      const double e = observed[k] - (kBackground[k] + coverage * (kPalette[c][k] - kBackground[k]));
      d += e * e;
    }
    if (d < best) best = d, nearest = static_cast<Colour>(c);
  }
  return nearest;
}
}  // namespace

Judgement judge_clip(const at::Tensor& video) {
  if (video.dim() != 4 || video.size(0) != 3 || video.size(1) < 1 || video.size(2) < 1 || video.size(3) < 1) {
    std::ostringstream msg;
    msg << "judge_clip expects a video [3, F, H, W], got " << video.sizes();
    throw InputError(msg.str());
  }
  const std::int64_t frames = video.size(1), height = video.size(2), width = video.size(3);
  const std::int64_t plane = height * width, channel = frames * plane;
  // [0,1] units in one plain pass (a chain of small ATen ops costs more than the judging when
  // many clips are judged on a busy machine); NaN, from a diverged model, reads as background.
  const at::Tensor source = video.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* raw = source.data_ptr<float>();
  std::vector<float> pixels(static_cast<std::size_t>(3 * channel));
  for (std::size_t k = 0; k < pixels.size(); ++k) {
    const float x = raw[k];
    pixels[k] = std::isnan(x) ? kBackground[k / static_cast<std::size_t>(channel)] : 0.5f * (x + 1.0f);
  }
  const float* data = pixels.data();
  const auto view = [&](std::int64_t f) {
    return FrameView{data + f * plane, data + channel + f * plane, data + 2 * channel + f * plane};
  };

  const float nominal = nominal_object_size(width, height);
  const double min_area = std::max(4.0, kMinObjectShare * 0.5 * nominal * nominal);
  const float threshold2 = kForegroundDistance * kForegroundDistance;

  // Pass 1: per frame, the foreground's components; the largest is the object.
  std::vector<FrameAnalysis> analysis(static_cast<std::size_t>(frames));
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(plane));
  for (std::int64_t f = 0; f < frames; ++f) {
    const FrameView v = view(f);
    for (std::int64_t p = 0; p < plane; ++p) {
      const float r = v.r[p] - kBackground[0], g = v.g[p] - kBackground[1], b = v.b[p] - kBackground[2];
      mask[p] = r * r + g * g + b * b > threshold2;
    }
    std::vector<Component> comps = components(mask, width, height);
    FrameAnalysis& a = analysis[f];
    for (const auto& c : comps) a.objects += static_cast<double>(c.pixels.size()) >= min_area;
    if (!comps.empty() && static_cast<double>(comps.front().pixels.size()) >= min_area) {
      a.valid = true;
      a.main = std::move(comps.front());
    }
  }

  Judgement j;
  std::vector<int> counts;
  int valid = 0;
  for (const auto& a : analysis) {
    counts.push_back(a.objects);
    valid += a.valid;
  }
  std::sort(counts.begin(), counts.end());
  j.objects = counts[counts.size() / 2];
  // An object that is missing in most frames is not one the caption can be judged on.
  if (valid == 0 || 2 * valid < frames) return j;
  j.ok = true;

  // Colour: per-channel median over the components' cores (pixels whose 4 neighbours are all in
  // the component), so anti-aliased or blurred edges, which mix in the background, do not pull
  // the estimate; tiny components with no core use all their pixels. Per frame too: an object
  // whose colour changes within the clip does not have the caption's colour, whatever its median.
  std::vector<float> reds, greens, blues;
  std::vector<float> frame_r, frame_g, frame_b;
  std::vector<Colour> frame_colours;
  std::vector<std::uint8_t> in_comp(static_cast<std::size_t>(plane));
  for (std::int64_t f = 0; f < frames; ++f) {
    const FrameAnalysis& a = analysis[f];
    if (!a.valid) continue;
    std::fill(in_comp.begin(), in_comp.end(), 0);
    for (std::int32_t p : a.main.pixels) in_comp[p] = 1;
    const FrameView v = view(f);
    frame_r.clear(), frame_g.clear(), frame_b.clear();
    for (std::int32_t p : a.main.pixels) {
      const std::int64_t i = p / width, jx = p % width;
      const bool core = i > 0 && i + 1 < height && jx > 0 && jx + 1 < width && in_comp[p - width] && in_comp[p + width] &&
                        in_comp[p - 1] && in_comp[p + 1];
      if (!core) continue;
      frame_r.push_back(v.r[p]), frame_g.push_back(v.g[p]), frame_b.push_back(v.b[p]);
    }
    if (frame_r.empty()) {
      for (std::int32_t p : a.main.pixels) frame_r.push_back(v.r[p]), frame_g.push_back(v.g[p]), frame_b.push_back(v.b[p]);
    } else {
      reds.insert(reds.end(), frame_r.begin(), frame_r.end());
      greens.insert(greens.end(), frame_g.begin(), frame_g.end());
      blues.insert(blues.end(), frame_b.begin(), frame_b.end());
    }
    frame_colours.push_back(nearest_colour({median(frame_r), median(frame_g), median(frame_b)}));
  }
  if (reds.empty()) {
    for (std::int64_t f = 0; f < frames; ++f) {
      if (!analysis[f].valid) continue;
      const FrameView v = view(f);
      for (std::int32_t p : analysis[f].main.pixels) reds.push_back(v.r[p]), greens.push_back(v.g[p]), blues.push_back(v.b[p]);
    }
  }
  const RGB observed{median(reds), median(greens), median(blues)};
  j.colour = nearest_colour(observed);
  j.colour_steady = std::all_of(frame_colours.begin(), frame_colours.end(), [&](Colour c) { return c == j.colour; });
  // Geometry is measured against the colour actually seen, so a model whose colours drift still
  // gets coverage ~1 inside its objects.
  const RGB& object = observed;

  // Shape by majority over frames (ties: the earlier shape in enum order); motion from a
  // least-squares line through the centroids, which uses every frame, not only the two ends.
  int votes[kShapes] = {0, 0, 0};
  std::vector<double> ts, xs, ys;
  std::vector<float> fills, skews;
  for (std::int64_t f = 0; f < frames; ++f) {
    if (!analysis[f].valid) continue;
    const ShapeFeatures s = frame_shape(view(f), analysis[f].main, object, width, height);
    if (s.area <= 0) continue;
    ++votes[static_cast<int>(classify(s))];
    fills.push_back(static_cast<float>(s.fill));
    skews.push_back(static_cast<float>(s.skew));
    ts.push_back(frames > 1 ? static_cast<double>(f) / static_cast<double>(frames - 1) : 0.0);
    xs.push_back(s.cx);
    ys.push_back(s.cy);
  }
  j.shape = static_cast<Shape>(std::max_element(votes, votes + kShapes) - votes);
  if (!fills.empty()) j.fill = median(fills), j.skew = median(skews);

  double slope_x = 0, slope_y = 0;
  if (ts.size() >= 2) {
    const double n = static_cast<double>(ts.size());
    double mt = 0, mx = 0, my = 0;
    for (std::size_t k = 0; k < ts.size(); ++k) mt += ts[k], mx += xs[k], my += ys[k];
    mt /= n, mx /= n, my /= n;
    double stt = 0, stx = 0, sty = 0;
    for (std::size_t k = 0; k < ts.size(); ++k) {
      stt += (ts[k] - mt) * (ts[k] - mt);
      stx += (ts[k] - mt) * (xs[k] - mx);
      sty += (ts[k] - mt) * (ys[k] - my);
    }
    if (stt > 0) slope_x = stx / stt, slope_y = sty / stt;
  }
  // Slopes are per unit of t (= the whole clip), so they are the first-to-last displacement.
  j.displacement_x = static_cast<float>(slope_x / static_cast<double>(width));
  j.displacement_y = static_cast<float>(slope_y / static_cast<double>(height));
  const float ax = std::fabs(j.displacement_x), ay = std::fabs(j.displacement_y);
  if (std::max(ax, ay) < kStillThreshold) j.motion = Motion::Still;
  else if (ax >= ay) j.motion = j.displacement_x > 0 ? Motion::Right : Motion::Left;
  else j.motion = j.displacement_y > 0 ? Motion::Down : Motion::Up;
  return j;
}

JudgeSummary::JudgeSummary()
    : confusion{std::vector<std::vector<int>>(kColours, std::vector<int>(kColours, 0)),
                std::vector<std::vector<int>>(kShapes, std::vector<int>(kShapes, 0)),
                std::vector<std::vector<int>>(kMotions, std::vector<int>(kMotions, 0))} {}

void JudgeSummary::add(const Caption& truth, const Judgement& judged) {
  ++clips;
  if (judged.objects > 1) ++multi_object;
  // A clip without an object is wrong on every attribute and stays out of the confusion tables,
  // whose judged columns would otherwise show an arbitrary default.
  if (!judged.ok) {
    ++no_object;
    return;
  }
  colour_unsteady += !judged.colour_steady;
  const bool colour = judged.colour == truth.colour && judged.colour_steady, shape = judged.shape == truth.shape,
             motion = judged.motion == truth.motion;
  colour_right += colour, shape_right += shape, motion_right += motion, all_right += colour && shape && motion;
  ++confusion[0][static_cast<int>(truth.colour)][static_cast<int>(judged.colour)];
  ++confusion[1][static_cast<int>(truth.shape)][static_cast<int>(judged.shape)];
  ++confusion[2][static_cast<int>(truth.motion)][static_cast<int>(judged.motion)];
}

double JudgeSummary::accuracy(int right) const { return clips > 0 ? static_cast<double>(right) / clips : 0.0; }

const char* JudgeSummary::attribute_name(int attribute) {
  static constexpr const char* kNames[kAttributes] = {"colour", "shape", "motion"};
  if (attribute < 0 || attribute >= kAttributes) throw InputError("judge: no attribute " + std::to_string(attribute));
  return kNames[attribute];
}

std::vector<std::string> JudgeSummary::category_names(int attribute) {
  std::vector<std::string> names;
  switch (attribute) {
    case 0:
      for (int k = 0; k < kColours; ++k) names.emplace_back(colour_name(static_cast<Colour>(k)));
      break;
    case 1:
      for (int k = 0; k < kShapes; ++k) names.emplace_back(shape_name(static_cast<Shape>(k)));
      break;
    case 2:
      for (int k = 0; k < kMotions; ++k) names.emplace_back(motion_name(static_cast<Motion>(k)));
      break;
    default:
      throw InputError("judge: no attribute " + std::to_string(attribute));
  }
  return names;
}

std::string JudgeSummary::report() const {
  std::ostringstream out;
  const auto line = [&](const char* label, int right) {
    out << std::left << std::setw(18) << label << std::right << std::fixed << std::setprecision(1) << std::setw(6)
        << 100.0 * accuracy(right) << " %  (" << right << "/" << clips << ")\n";
  };
  out << "clips judged: " << clips << "\n";
  line("colour", colour_right);
  line("shape", shape_right);
  line("motion", motion_right);
  line("all three", all_right);
  out << "multi-object clips: " << multi_object << "\n";
  out << "clips with no object found: " << no_object << "\n";
  out << "clips whose object changes colour (colour counted wrong): " << colour_unsteady << "\n";

  for (int attribute = 0; attribute < kAttributes; ++attribute) {
    const std::vector<std::string> names = category_names(attribute);
    const int n = static_cast<int>(names.size());
    out << "\n" << attribute_name(attribute) << " (rows: caption, columns: judged)\n";
    int width = 6;
    for (const auto& name : names) width = std::max<int>(width, static_cast<int>(name.size()) + 1);
    out << std::setw(width) << "";
    for (const auto& name : names) out << std::setw(width) << name;
    out << "\n";
    for (int t = 0; t < n; ++t) {
      out << std::left << std::setw(width) << names[t] << std::right;
      for (int k = 0; k < n; ++k) out << std::setw(width) << confusion[attribute][t][k];
      out << "\n";
    }
  }
  return out.str();
}

}  // namespace vdit::shapes
