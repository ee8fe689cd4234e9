// Hi-res refinement at a size the DiT was not trained at (FreeSwim, ALGORITHMS.md section 1).
//
// A denoiser with two paths over the same latent at the target size:
//  - the window path: self-attention restricted to inward-clamped sliding windows the size of the
//    training grid (local detail at the scale the model knows), every frame visible;
//  - the full path: plain full self-attention. Its cross-attention output replaces the window
//    path's in every block, which carries the global layout.
// The full path's hidden states never depend on the window path's (in the reference's batch of
// two, row b1 only reads itself), so it is run as a forward of its own that records every layer's
// cross-attention output (CrossAttentionOutputCache, Record), and the window path's forward reuses
// them (Reuse): the same numbers as the reference's batched dual path. The recorded outputs are
// kept for `cross_cache_every` steps (the reference's cache mode): the full path's forward runs
// only on refresh steps, and the uncond pass never runs it.
#pragma once

#include "vdit/attention/processors.h"
#include "vdit/pipelines/guidance.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace vdit {

// freeswim: window path with the full path's cross-attention; window: the window path alone;
// direct: plain full attention at the target size (the two ablations).
enum class HiresMethod { FreeSwim, Window, Direct };
const char* hires_method_name(HiresMethod method);
// "freeswim" | "window" | "direct"; anything else is an InputError naming `option`.
HiresMethod parse_hires_method(const std::string& text, const std::string& option = "--method");

// FreeSwim's temperature: sqrt(log(2*1560) / log(1560)), 1560 being Wan2.1 1.3B's 30x52 grid.
constexpr double kFreeSwimScaleFactor = 1.04608;

struct HiresOptions {
  HiresMethod method = HiresMethod::FreeSwim;
  // The window path's self-attention window in tokens (t, h, w); a size <= 0 or >= the axis is
  // the whole axis. FreeSwim: every frame, 2*floor(base tokens / 2) + 1 per spatial axis.
  Window3 window{{0, 9, 9}, {1, 1, 1}};
  // Multiplies 1/sqrt(head_dim) in every self-attention of the run (all methods).
  double attn_scale_factor = kFreeSwimScaleFactor;
  // The full path's cross-attention outputs are recomputed on steps first, first + N, ...; 0: on
  // every step and dropped after it (no cache). 1 gives the same numbers as 0.
  int cross_cache_every = 2;
  // Keep the recorded outputs on the CPU (between steps they are only read once per block).
  bool cache_on_cpu = false;
  // The reference's no-cache pipeline also gives the uncond pass a full path of its own (with the
  // negative prompt) whose cross-attention overrides the uncond window path. Off: the uncond pass
  // runs the window path with its own cross-attention, as the reference's cache mode does.
  bool override_uncond = false;
};

// FreeSwim's window for a model trained at base_width x base_height pixels with `px_h` x `px_w`
// pixels per token (VAE stride times patch: 16 for Wan2.1): every frame, and per spatial axis
// 2 * floor(base tokens / 2) + 1 tokens (31 x 53 for 480x832).
Window3 freeswim_window(std::int64_t base_width, std::int64_t base_height, std::int64_t px_h, std::int64_t px_w);

// One line per spatial axis on which `window` covers the whole grid axis (there the window path
// is full attention), empty when the window is smaller than the grid on both.
std::vector<std::string> window_clamp_notes(const Window3& window, const Grid3& grid);

// The dual-path denoiser. `guidance` and `options` are those of a DiTDenoiser (options.call's
// window and scale factor are replaced by the hires ones; options.processors, if any, also see
// every attention call of both paths, after the cache).
class FreeSwimDenoiser : public Denoiser {
 public:
  FreeSwimDenoiser(WanDiTImpl& dit, Guidance guidance, DiTDenoiser::Options options, HiresOptions hires);
  // The window path points at this object's processors: not copied or moved.
  FreeSwimDenoiser(const FreeSwimDenoiser&) = delete;
  FreeSwimDenoiser& operator=(const FreeSwimDenoiser&) = delete;
  void set_condition(RowRole role, WanTextCondition condition);

  at::Tensor velocity(const at::Tensor& x, const StepInfo& step) override;

  // Whether `step` recomputes the full path (always true without a cache).
  bool refresh_step(const StepInfo& step) const;
  // Full-path forwards run so far (each is one DiT forward of one row).
  std::int64_t full_path_forwards() const { return full_forwards_; }
  // Bytes of recorded cross-attention outputs held now, and the most held at once.
  std::int64_t cache_bytes() const;
  std::int64_t peak_cache_bytes() const { return peak_cache_bytes_; }
  const HiresOptions& hires() const { return hires_; }
  const DiTDenoiser& window_path() const { return *window_; }

 private:
  void run_full_path(const at::Tensor& x, const StepInfo& step, RowRole role);

  WanDiTImpl& dit_;
  HiresOptions hires_;
  DiTDenoiser::Options options_;
  std::shared_ptr<CrossAttentionOutputCache> cache_;
  AttentionProcessors processors_;
  std::unique_ptr<DiTDenoiser> window_;
  std::map<RowRole, WanTextCondition> conditions_;
  std::int64_t full_forwards_ = 0;
  std::int64_t peak_cache_bytes_ = 0;
};

}  // namespace vdit
