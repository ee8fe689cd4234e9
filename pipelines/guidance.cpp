// Guidance terms and the DiT denoiser: see include/vdit/pipelines/guidance.h.
#include "vdit/pipelines/guidance.h"

#include "vdit/common.h"

#include <algorithm>
#include <cmath>

namespace vdit {

namespace {
const at::Tensor& output_of(const PassOutputs& out, RowRole role) {
  auto it = out.find(role);
  if (it == out.end()) throw RuntimeError(std::string("guidance: no output of the ") + role_name(role) + " pass");
  return it->second;
}
}  // namespace

at::Tensor ClassifierFreeGuidance::apply(const at::Tensor&, const PassOutputs& out, const StepInfo&) const {
  const at::Tensor& cond = output_of(out, RowRole::Cond);
  const at::Tensor& uncond = output_of(out, RowRole::Uncond);
  return uncond + scale_ * (cond - uncond);
}

at::Tensor Autoguidance::apply(const at::Tensor& guided, const PassOutputs& out, const StepInfo&) const {
  return guided + (weight_ - 1.0) * (output_of(out, RowRole::Cond) - output_of(out, RowRole::Guide));
}

bool StepRange::contains(const StepInfo& step) const {
  if (step.count <= 0) return start <= 0.0 && end > 0.0;
  const double at = static_cast<double>(step.index) / static_cast<double>(step.count);
  return at >= start && at < end;
}

std::vector<RowRole> PerturbedAttentionGuidance::passes(const StepInfo& step) const {
  if (!range_.contains(step)) return {};
  return {RowRole::Cond, role_};
}

at::Tensor PerturbedAttentionGuidance::apply(const at::Tensor& guided, const PassOutputs& out, const StepInfo& step) const {
  if (!range_.contains(step)) return guided;
  return guided + scale_ * (output_of(out, RowRole::Cond) - output_of(out, role_));
}

at::Tensor CFGZeroStar::apply(const at::Tensor&, const PassOutputs& out, const StepInfo& step) const {
  const at::Tensor& cond = output_of(out, RowRole::Cond);
  if (step.index < zero_init_steps_) return at::zeros_like(cond);
  const at::Tensor& uncond = output_of(out, RowRole::Uncond);
  const std::int64_t rows = cond.size(0);
  const at::Tensor c = cond.to(at::kFloat).reshape({rows, -1});
  const at::Tensor u = uncond.to(at::kFloat).reshape({rows, -1});
  std::vector<std::int64_t> shape(static_cast<std::size_t>(cond.dim()), 1);
  shape[0] = rows;
  const at::Tensor st = ((c * u).sum(1) / ((u * u).sum(1) + 1e-8)).reshape(shape);
  const at::Tensor scaled = uncond.to(at::kFloat) * st;
  return (scaled + scale_ * (cond.to(at::kFloat) - scaled)).to(cond.scalar_type());
}

int CFGZeroStar::default_zero_init_steps(int steps) {
  return steps <= 0 ? 0 : static_cast<int>(std::ceil(0.04 * steps - 1e-9));
}

Guidance& Guidance::add(std::shared_ptr<const GuidanceTerm> term) {
  if (!term) throw RuntimeError("Guidance: null term");
  terms_.push_back(std::move(term));
  return *this;
}

std::vector<RowRole> Guidance::passes(const StepInfo& step) const {
  std::vector<RowRole> roles{RowRole::Cond};
  for (const auto& term : terms_)
    for (RowRole role : term->passes(step))
      if (std::find(roles.begin(), roles.end(), role) == roles.end()) roles.push_back(role);
  std::stable_sort(roles.begin() + 1, roles.end());
  return roles;
}

at::Tensor Guidance::combine(const PassOutputs& out, const StepInfo& step) const {
  at::Tensor guided = output_of(out, RowRole::Cond);
  for (const auto& term : terms_) guided = term->apply(guided, out, step);
  return guided;
}

DiTDenoiser::DiTDenoiser(WanDiTImpl& dit, Guidance guidance, Options options)
    : dit_(dit), guidance_(std::move(guidance)), options_(std::move(options)) {}

void DiTDenoiser::set_condition(RowRole role, WanTextCondition condition) {
  conditions_[role] = std::move(condition);
  batched_.clear();
}

void DiTDenoiser::set_model(RowRole role, WanDiTImpl& model) { models_[role] = &model; }

const WanTextCondition& DiTDenoiser::condition(const std::vector<RowRole>& roles) {
  for (RowRole role : roles)
    if (!conditions_.count(role))
      throw RuntimeError(std::string("DiTDenoiser: no text condition for the ") + role_name(role) + " pass");
  if (roles.size() == 1) return conditions_.at(roles.front());
  auto it = batched_.find(roles);
  if (it == batched_.end()) {
    std::vector<WanTextCondition> parts;
    for (RowRole role : roles) parts.push_back(conditions_.at(role));
    it = batched_.emplace(roles, WanTextCondition::cat(parts)).first;
  }
  return it->second;
}

at::Tensor DiTDenoiser::forward(WanDiTImpl& model, const at::Tensor& x, const at::Tensor& t,
                                const std::vector<RowRole>& roles, const StepInfo& step) {
  const bool main = &model == &dit_;
  DiTCall call = main ? options_.call : DiTCall{};
  call.sequence_parallel = options_.call.sequence_parallel;  // the guide DiT runs sharded too
  if (main) call.processors = options_.processors;
  call.step = &step;
  call.row_roles = roles;
  const auto rows = static_cast<std::int64_t>(roles.size());
  if (rows == 1) return model.forward(x, t, condition(roles), call);
  std::vector<at::Tensor> copies(static_cast<std::size_t>(rows), x);
  return model.forward(at::cat(copies), t.expand({rows}), condition(roles), call);
}

at::Tensor DiTDenoiser::velocity(const at::Tensor& x, const StepInfo& step) {
  const at::Tensor t = at::full({1}, step.timestep, x.options());
  // Each pass runs on its model; the main model's passes share one forward when batching is on.
  std::vector<RowRole> main_roles;
  std::vector<std::pair<RowRole, WanDiTImpl*>> other;
  for (RowRole role : guidance_.passes(step)) {
    auto it = models_.find(role);
    if (it != models_.end() && it->second != &dit_) other.emplace_back(role, it->second);
    else main_roles.push_back(role);
  }
  last_.clear();
  if (options_.batch_passes && main_roles.size() > 1) {
    const at::Tensor out = forward(dit_, x, t, main_roles, step);
    for (std::size_t r = 0; r < main_roles.size(); ++r)
      last_[main_roles[r]] = out.narrow(0, static_cast<std::int64_t>(r), 1);
  } else {
    for (RowRole role : main_roles) last_[role] = forward(dit_, x, t, {role}, step);
  }
  for (const auto& [role, model] : other) last_[role] = forward(*model, x, t, {role}, step);
  // Guidance is affine in the outputs and (x - x0) / sigma is affine in x0 with x fixed, so
  // guiding a predicted x0 and then converting equals converting each output first.
  const at::Tensor output = guidance_.combine(last_, step);
  return options_.prediction == ModelPrediction::Sample ? velocity_from_sample(output, x, step.sigma) : output;
}

}  // namespace vdit
