// Long video by sliding-window denoising (ALGORITHMS.md section 5.4): every step, the inner
// denoiser (the DiT under its guidance) runs on overlapping windows of latent frames of the
// model's trained length, and the windows' guided velocities are fused with per-frame weights
// into one velocity of the whole latent; the sampler then steps the whole latent once, so
// multistep history (UniPC, DPM++) stays valid. Cost grows linearly with length and the DiT never
// sees more frames than it was trained on.
//
// The window plan and the weights are pure functions (frames, options, step) -> windows and
// (window, frames, options) -> weights, so schedules are testable without a model.
// All lengths here are latent frames; the CLI converts pixel frames ((px - 1) / 4 + 1 for Wan).
#pragma once

#include "vdit/pipelines/flow_loop.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

namespace vdit {

enum class WindowSchedule { Static, Shifted };
enum class WindowFuse { Flat, Linear, Pyramid };
enum class NoiseReschedule { None, Shuffle };
enum class WindowAnchor { None, First };

// Parse / name the option values ("static", "shifted", ...). Parsing throws InputError naming the
// option and the accepted values.
WindowSchedule parse_window_schedule(const std::string& text);
WindowFuse parse_window_fuse(const std::string& text);
NoiseReschedule parse_noise_reschedule(const std::string& text);
WindowAnchor parse_window_anchor(const std::string& text);
const char* name_of(WindowSchedule v);
const char* name_of(WindowFuse v);
const char* name_of(NoiseReschedule v);
const char* name_of(WindowAnchor v);

struct TemporalWindowOptions {
  std::int64_t context = 21;  // L: latent frames per window (21 = Wan2.1's 81 pixel frames)
  std::int64_t overlap = 4;   // O: latent frames shared by consecutive static windows, 0 <= O < L
  WindowSchedule schedule = WindowSchedule::Static;
  WindowFuse fuse = WindowFuse::Linear;
  // First: latent frame 0 is prepended to every window that does not hold it (the window then
  // has L + 1 frames); its prediction there is discarded and it keeps window-internal position 0,
  // so every window starts from the kind of latent (one pixel frame) the model's first slot was
  // trained on.
  WindowAnchor anchor = WindowAnchor::None;
  // Throws InputError (one line) for context < 1 or overlap outside [0, context).
  void validate() const;
};

// A window: latent frames [start, start + length).
struct TemporalWindow {
  std::int64_t start = 0;
  std::int64_t length = 0;
  std::int64_t end() const { return start + length; }
  bool operator==(const TemporalWindow& o) const { return start == o.start && length == o.length; }
};
std::ostream& operator<<(std::ostream& out, const TemporalWindow& w);  // "[start, end)"

// The van der Corput (bit-reversal) fraction of i in base 2: 0, 1/2, 1/4, 3/4, 1/8, ...
double van_der_corput(int i);

// The windows of step `step_index` over `frames` latent frames, sorted by start, every frame
// covered, consecutive windows overlapping by at least O (when there are several):
//  - L >= frames: one window [0, frames).
//  - static: starts 0, S, 2S, ... with S = L - O; the first window reaching the end is moved back
//    to [frames - L, frames) and is the last one (ComfyUI's static_standard).
//  - shifted: the static grid moved by d = floor(h(step) * S) frames, h the van der Corput
//    fraction of the step index: starts 0, d, d + S, d + 2S, ... (the same end rule), so the seams
//    move every step (step 0 is the static plan).
std::vector<TemporalWindow> plan_windows(std::int64_t frames, const TemporalWindowOptions& options, int step_index);

// The fusion weight of each frame of `window` (window.length values, in double):
//  - flat: 1.
//  - linear: 1, with a ramp r(i) = (i + 1) / (O + 1), i = 0..O-1, on the first O frames unless
//    the window starts at frame 0, and 1 - r(i) on the last O frames unless it ends at `frames`
//    (the smaller one where the two overlap). Ramps of consecutive static windows overlapping by
//    exactly O <= L / 2 sum to exactly 1, and no weight is 0 (ComfyUI's linspace(0, 1, O) gives its
//    first and last overlap frames weight 0 and 1; this spreads the ramp over all O frames).
//  - pyramid: triangular, peak 1 ([1..L/2, L/2..1] / (L/2) for L even, [1..(L+1)/2..1] /
//    ((L+1)/2) for L odd); a window touching the video start (end) keeps weight 1 on its first
//    (last) O frames.
std::vector<double> window_weights(const TemporalWindow& window, std::int64_t frames, const TemporalWindowOptions& options);

// FreeNoise noise rescheduling on the frame axis (dim -3 of [..., F, H, W]): for i = L, L+S, ...
// < F, frames [i, i + S) become a random permutation (seeded) of frames [i - L, i - L + S)
// (truncated at the end), in order, as diffusers' shuffle_context does. Frames [0, L) keep
// their noise. With F <= L or S < 1 the noise is returned unchanged. Returns a new tensor.
at::Tensor reschedule_noise(const at::Tensor& noise, std::int64_t context, std::int64_t overlap, std::uint64_t seed);

// The prompt segment of a window when `segments` prompts are spread evenly over `frames` latent
// frames: min(floor(last frame / (frames / segments)), segments - 1) (ComfyUI's rule).
std::int64_t window_segment(const TemporalWindow& window, std::int64_t frames, std::int64_t segments);

// Runs `inner` on windows of the latent and fuses the velocities. The inner denoiser of a window
// is chosen by its prompt segment: `segments` holds one denoiser per prompt (one denoiser: the
// same prompt everywhere); each is typically a DiTDenoiser with its own Cond condition sharing
// the DiT and the other conditions. The denoisers must outlive this one.
class TemporalWindowDenoiser : public Denoiser {
 public:
  TemporalWindowDenoiser(std::vector<Denoiser*> segments, TemporalWindowOptions options);
  TemporalWindowDenoiser(Denoiser& inner, TemporalWindowOptions options)
      : TemporalWindowDenoiser(std::vector<Denoiser*>{&inner}, options) {}

  // x [B, C, F, H, W]. With one window covering every frame (and no anchor) this is exactly the
  // inner denoiser's velocity.
  at::Tensor velocity(const at::Tensor& x, const StepInfo& step) override;

  const TemporalWindowOptions& options() const { return options_; }
  // The windows of the last step (for logs and tests).
  const std::vector<TemporalWindow>& last_windows() const { return last_windows_; }
  // Forwards of the inner denoisers made so far (one per window per step).
  std::int64_t window_calls() const { return window_calls_; }

 private:
  std::vector<Denoiser*> segments_;
  TemporalWindowOptions options_;
  std::vector<TemporalWindow> last_windows_;
  std::int64_t window_calls_ = 0;
};

}  // namespace vdit
