#include "vdit/pipelines/freeswim.h"

#include "vdit/common.h"

#include <algorithm>

namespace vdit {

namespace {

// Hands a call to whatever the caller's processor set registers at the call's site (the plain
// kernel when none), so the caller's processors see both paths behind FreeSwim's own.
class DelegateProcessor : public AttentionProcessor {
 public:
  explicit DelegateProcessor(const AttentionProcessors* target) : target_(target) {}
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override {
    AttentionProcessor* p = target_ ? target_->find(site.layer, site.kind) : nullptr;
    return p ? p->process(site, q, k, v, call, inner) : inner(site, q, k, v, call);
  }

 private:
  const AttentionProcessors* target_;
};

}  // namespace

const char* hires_method_name(HiresMethod method) {
  switch (method) {
    case HiresMethod::FreeSwim: return "freeswim";
    case HiresMethod::Window: return "window";
    case HiresMethod::Direct: return "direct";
  }
  return "?";
}

HiresMethod parse_hires_method(const std::string& text, const std::string& option) {
  if (text == "freeswim") return HiresMethod::FreeSwim;
  if (text == "window") return HiresMethod::Window;
  if (text == "direct") return HiresMethod::Direct;
  throw InputError(option + " must be freeswim, window or direct (got '" + text + "')");
}

Window3 freeswim_window(std::int64_t base_width, std::int64_t base_height, std::int64_t px_h, std::int64_t px_w) {
  if (base_width < 1 || base_height < 1 || px_h < 1 || px_w < 1)
    throw InputError("the base size and pixels per token must be positive");
  Window3 window;
  window.size = {0, 2 * ((base_height / px_h) / 2) + 1, 2 * ((base_width / px_w) / 2) + 1};
  return window;
}

std::vector<std::string> window_clamp_notes(const Window3& window, const Grid3& grid) {
  std::vector<std::string> notes;
  const std::int64_t axis[3] = {grid.t, grid.h, grid.w};
  const char* names[3] = {"frames", "height", "width"};
  for (int a = 1; a < 3; ++a) {
    const std::int64_t k = window.size[static_cast<std::size_t>(a)];
    if (k <= 0 || k >= axis[a])
      notes.push_back(std::string("window ") + names[a] + " " + (k <= 0 ? std::string("(whole axis)") : std::to_string(k)) +
                      " covers the grid's " + std::to_string(axis[a]) + " tokens: full attention along " + names[a]);
  }
  return notes;
}

FreeSwimDenoiser::FreeSwimDenoiser(WanDiTImpl& dit, Guidance guidance, DiTDenoiser::Options options, HiresOptions hires)
    : dit_(dit), hires_(hires), options_(std::move(options)) {
  if (hires_.cross_cache_every < 0) throw InputError("--cross-cache-every must be 0 or more");
  DiTDenoiser::Options window_options = options_;
  window_options.call.self_attn_scale_factor = hires_.attn_scale_factor;
  if (hires_.method == HiresMethod::Direct) window_options.call.self_attn_window.reset();
  else window_options.call.self_attn_window = hires_.window;
  if (hires_.method == HiresMethod::FreeSwim) {
    std::vector<RowRole> roles{RowRole::Cond};
    if (hires_.override_uncond) roles.push_back(RowRole::Uncond);
    std::optional<at::Device> storage;
    if (hires_.cache_on_cpu) storage = at::Device(at::kCPU);
    cache_ = std::make_shared<CrossAttentionOutputCache>(roles, storage);
    // PAG's perturbed pass and SLG's skip-layer pass are the cond pass with self-attention changed:
    // they take the cond pass's full-path cross-attention, so their difference to it is the
    // perturbation alone (and zero without one).
    cache_->reuse_for(RowRole::Perturbed, RowRole::Cond);
    cache_->reuse_for(RowRole::SkipLayer, RowRole::Cond);
    auto delegate = std::make_shared<DelegateProcessor>(options_.processors);
    processors_.set(AttentionKind::Self, delegate);
    processors_.set(AttentionKind::Cross, std::make_shared<ProcessorChain>(
                                              std::vector<std::shared_ptr<AttentionProcessor>>{cache_, delegate}));
    window_options.processors = &processors_;
    // The cache serves calls whose rows all share one role: cond and uncond in forwards of their own.
    window_options.batch_passes = false;
  }
  window_ = std::make_unique<DiTDenoiser>(dit_, std::move(guidance), window_options);
}

void FreeSwimDenoiser::set_condition(RowRole role, WanTextCondition condition) {
  conditions_[role] = condition;
  window_->set_condition(role, std::move(condition));
}

bool FreeSwimDenoiser::refresh_step(const StepInfo& step) const {
  const int every = hires_.cross_cache_every;
  return every <= 1 || (step.index - step.first) % every == 0;
}

std::int64_t FreeSwimDenoiser::cache_bytes() const { return cache_ ? cache_->stored_bytes() : 0; }

void FreeSwimDenoiser::run_full_path(const at::Tensor& x, const StepInfo& step, RowRole role) {
  auto it = conditions_.find(role);
  if (it == conditions_.end())
    throw RuntimeError(std::string("FreeSwim: no text condition for the ") + role_name(role) + " pass");
  DiTCall call = options_.call;
  call.self_attn_window.reset();
  call.self_attn_scale_factor = hires_.attn_scale_factor;
  call.processors = &processors_;
  call.step = &step;
  call.row_roles = {role};
  const at::Tensor t = at::full({1}, step.timestep, x.options());
  // Only the recorded cross-attention outputs are wanted; the full path's prediction is dropped
  // (the reference keeps only the window branch's latent).
  (void)dit_.forward(x, t, it->second, call);
  ++full_forwards_;
}

at::Tensor FreeSwimDenoiser::velocity(const at::Tensor& x, const StepInfo& step) {
  if (hires_.method != HiresMethod::FreeSwim) return window_->velocity(x, step);
  // A refresh step, or the first call of this denoiser whatever the step (nothing recorded yet).
  if (refresh_step(step) || !cache_->has(0, RowRole::Cond)) {
    // Free the stale outputs before recording, so at most one step's outputs are held.
    cache_->clear();
    cache_->set_mode(CrossAttentionOutputCache::Mode::Record);
    run_full_path(x, step, RowRole::Cond);
    if (hires_.override_uncond && conditions_.count(RowRole::Uncond)) run_full_path(x, step, RowRole::Uncond);
    peak_cache_bytes_ = std::max(peak_cache_bytes_, cache_->stored_bytes());
  }
  cache_->set_mode(CrossAttentionOutputCache::Mode::Reuse);
  at::Tensor v = window_->velocity(x, step);
  cache_->set_mode(CrossAttentionOutputCache::Mode::Off);
  if (hires_.cross_cache_every == 0) cache_->clear();
  return v;
}

}  // namespace vdit
