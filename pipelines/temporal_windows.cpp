// Sliding-window denoising for long video: see include/vdit/pipelines/temporal_windows.h.
#include "vdit/pipelines/temporal_windows.h"

#include "vdit/common.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <ostream>

namespace vdit {

namespace {

template <typename E>
E parse_choice(const std::string& text, const char* option, const std::vector<std::pair<const char*, E>>& choices) {
  std::string accepted;
  for (const auto& [name, value] : choices) {
    if (text == name) return value;
    accepted += (accepted.empty() ? "" : " | ") + std::string(name);
  }
  throw InputError(std::string(option) + " '" + text + "': give " + accepted);
}

}  // namespace

WindowSchedule parse_window_schedule(const std::string& t) {
  return parse_choice<WindowSchedule>(t, "--context-schedule", {{"static", WindowSchedule::Static}, {"shifted", WindowSchedule::Shifted}});
}
WindowFuse parse_window_fuse(const std::string& t) {
  return parse_choice<WindowFuse>(t, "--context-fuse",
                                  {{"flat", WindowFuse::Flat}, {"linear", WindowFuse::Linear}, {"pyramid", WindowFuse::Pyramid}});
}
NoiseReschedule parse_noise_reschedule(const std::string& t) {
  return parse_choice<NoiseReschedule>(t, "--noise-reschedule", {{"none", NoiseReschedule::None}, {"shuffle", NoiseReschedule::Shuffle}});
}
WindowAnchor parse_window_anchor(const std::string& t) {
  return parse_choice<WindowAnchor>(t, "--anchor", {{"none", WindowAnchor::None}, {"first", WindowAnchor::First}});
}
const char* name_of(WindowSchedule v) { return v == WindowSchedule::Static ? "static" : "shifted"; }
const char* name_of(WindowFuse v) {
  return v == WindowFuse::Flat ? "flat" : v == WindowFuse::Linear ? "linear" : "pyramid";
}
const char* name_of(NoiseReschedule v) { return v == NoiseReschedule::None ? "none" : "shuffle"; }
const char* name_of(WindowAnchor v) { return v == WindowAnchor::None ? "none" : "first"; }

void TemporalWindowOptions::validate() const {
  if (context < 1) throw InputError("context window must hold at least 1 latent frame (got " + std::to_string(context) + ")");
  if (overlap < 0 || overlap >= context)
    throw InputError("context overlap must be from 0 to below the context length: " + std::to_string(overlap) +
                     " latent frames overlap with a context of " + std::to_string(context));
}

std::ostream& operator<<(std::ostream& out, const TemporalWindow& w) {
  return out << "[" << w.start << ", " << w.end() << ")";
}

double van_der_corput(int i) {
  double h = 0, base = 0.5;
  for (unsigned n = static_cast<unsigned>(std::max(i, 0)); n; n >>= 1, base *= 0.5)
    if (n & 1u) h += base;
  return h;
}

std::vector<TemporalWindow> plan_windows(std::int64_t frames, const TemporalWindowOptions& o, int step_index) {
  o.validate();
  if (frames < 1) throw RuntimeError("plan_windows: no frames");
  const std::int64_t L = o.context;
  if (L >= frames) return {{0, frames}};
  const std::int64_t S = L - o.overlap;
  std::vector<TemporalWindow> out{{0, L}};
  std::int64_t start = S;
  if (o.schedule == WindowSchedule::Shifted) {
    const auto d = static_cast<std::int64_t>(std::floor(van_der_corput(step_index) * static_cast<double>(S)));
    if (d > 0) start = d;
  }
  for (; start + L < frames; start += S) out.push_back({start, L});
  out.push_back({frames - L, L});
  return out;
}

std::vector<double> window_weights(const TemporalWindow& w, std::int64_t frames, const TemporalWindowOptions& o) {
  const std::int64_t n = w.length;
  std::vector<double> weights(static_cast<std::size_t>(n), 1.0);
  if (w.start == 0 && w.end() >= frames) return weights;  // one window: plain denoising
  const bool at_start = w.start == 0, at_end = w.end() >= frames;
  const std::int64_t O = std::min(o.overlap, n);
  switch (o.fuse) {
    case WindowFuse::Flat:
      break;
    case WindowFuse::Linear:
      for (std::int64_t i = 0; i < O; ++i) {
        const double r = static_cast<double>(i + 1) / static_cast<double>(O + 1);
        auto& head = weights[static_cast<std::size_t>(i)];
        auto& tail = weights[static_cast<std::size_t>(n - O + i)];
        if (!at_start) head = std::min(head, r);
        if (!at_end) tail = std::min(tail, 1.0 - r);
      }
      break;
    case WindowFuse::Pyramid: {
      const std::int64_t peak = (n + 1) / 2;  // L even: L/2 twice; L odd: (L+1)/2 once
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t rise = std::min(i + 1, n - i);
        weights[static_cast<std::size_t>(i)] = static_cast<double>(std::min(rise, peak)) / static_cast<double>(peak);
      }
      for (std::int64_t i = 0; i < O; ++i) {
        if (at_start) weights[static_cast<std::size_t>(i)] = 1.0;
        if (at_end) weights[static_cast<std::size_t>(n - 1 - i)] = 1.0;
      }
      break;
    }
  }
  return weights;
}

at::Tensor reschedule_noise(const at::Tensor& noise, std::int64_t context, std::int64_t overlap, std::uint64_t seed) {
  if (noise.dim() < 3) throw RuntimeError("reschedule_noise: the noise needs a frame axis (dim -3)");
  const std::int64_t axis = noise.dim() - 3;
  const std::int64_t F = noise.size(axis), L = context, S = context - overlap;
  at::Tensor out = noise.clone();
  if (F <= L || S < 1) return out;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (std::int64_t i = L; i < F; i += S) {
    const std::int64_t n = std::min(S, F - i);
    // A permutation of the S source frames, truncated to the n frames left (diffusers draws the
    // permutation of the whole block and keeps its first n).
    const at::Tensor perm = at::randperm(S, gen, at::TensorOptions().dtype(at::kLong)).narrow(0, 0, n);
    const at::Tensor source = out.narrow(axis, i - L, S).index_select(axis, perm.to(out.device()));
    out.narrow(axis, i, n).copy_(source);
  }
  return out;
}

std::int64_t window_segment(const TemporalWindow& w, std::int64_t frames, std::int64_t segments) {
  if (segments <= 1) return 0;
  const double per = static_cast<double>(frames) / static_cast<double>(segments);
  const auto index = static_cast<std::int64_t>(std::floor(static_cast<double>(w.end() - 1) / per));
  return std::clamp<std::int64_t>(index, 0, segments - 1);
}

TemporalWindowDenoiser::TemporalWindowDenoiser(std::vector<Denoiser*> segments, TemporalWindowOptions options)
    : segments_(std::move(segments)), options_(options) {
  options_.validate();
  if (segments_.empty()) throw RuntimeError("TemporalWindowDenoiser: no inner denoiser");
  for (Denoiser* d : segments_)
    if (!d) throw RuntimeError("TemporalWindowDenoiser: null inner denoiser");
}

at::Tensor TemporalWindowDenoiser::velocity(const at::Tensor& x, const StepInfo& step) {
  if (x.dim() != 5) throw RuntimeError("TemporalWindowDenoiser: x must be [B, C, F, H, W]");
  const std::int64_t F = x.size(2);
  last_windows_ = plan_windows(F, options_, step.index);
  const auto segments = static_cast<std::int64_t>(segments_.size());
  const bool anchor = options_.anchor == WindowAnchor::First;
  if (last_windows_.size() == 1) {
    // One window holding every frame: exactly the inner denoiser (no weights, no copies).
    ++window_calls_;
    return segments_[static_cast<std::size_t>(window_segment(last_windows_.front(), F, segments))]->velocity(x, step);
  }
  at::Tensor fused;
  std::vector<double> total(static_cast<std::size_t>(F), 0.0);
  for (const TemporalWindow& w : last_windows_) {
    Denoiser& inner = *segments_[static_cast<std::size_t>(window_segment(w, F, segments))];
    const bool anchored = anchor && w.start > 0;
    at::Tensor xw = x.narrow(2, w.start, w.length);
    if (anchored) xw = at::cat({x.narrow(2, 0, 1), xw}, 2);
    at::Tensor v = inner.velocity(xw.contiguous(), step);
    ++window_calls_;
    if (anchored) v = v.narrow(2, 1, w.length);  // the anchor's own prediction is discarded
    if (!fused.defined()) fused = at::zeros(x.sizes(), v.options().dtype(at::kFloat));
    const std::vector<double> weights = window_weights(w, F, options_);
    for (std::int64_t i = 0; i < w.length; ++i) total[static_cast<std::size_t>(w.start + i)] += weights[static_cast<std::size_t>(i)];
    const at::Tensor wt = at::tensor(std::vector<double>(weights.begin(), weights.end()), at::TensorOptions().dtype(at::kDouble))
                              .to(fused.device(), at::kFloat)
                              .view({1, 1, w.length, 1, 1});
    fused.narrow(2, w.start, w.length).add_(v.to(at::kFloat) * wt);
  }
  for (std::int64_t f = 0; f < F; ++f)
    if (!(total[static_cast<std::size_t>(f)] > 0))
      throw RuntimeError("TemporalWindowDenoiser: latent frame " + std::to_string(f) + " has no window weight");
  const at::Tensor norm = at::tensor(total, at::TensorOptions().dtype(at::kDouble)).to(fused.device(), at::kFloat).view({1, 1, F, 1, 1});
  return (fused / norm).to(x.scalar_type());
}

}  // namespace vdit
