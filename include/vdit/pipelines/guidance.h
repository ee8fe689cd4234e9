// Guidance as composable pieces, and the denoiser that runs a DiT under them.
//
// A guidance term names the passes it reads (RowRole: cond, uncond, guide, perturbed, ...) and
// folds their outputs into the guided output; Guidance is an ordered list of terms. DiTDenoiser
// runs the passes the active terms need (the main model's passes batched into one forward when
// allowed, every row labelled with its role for the attention processors), combines them and
// turns the result into a velocity. Adding a guidance method is adding a term: the loop and the
// denoiser stay as they are.
#pragma once

#include "vdit/models/wan_dit.h"
#include "vdit/pipelines/flow_loop.h"
#include "vdit/samplers/sampler.h"

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace vdit {

// The outputs of one step's passes, by role.
using PassOutputs = std::map<RowRole, at::Tensor>;

class GuidanceTerm {
 public:
  virtual ~GuidanceTerm() = default;
  virtual std::string name() const = 0;
  // The passes this term reads at `step` (RowRole::Cond is always run).
  virtual std::vector<RowRole> passes(const StepInfo& step) const = 0;
  // The guided output with this term applied; `guided` is the output so far (the cond pass's
  // output before the first term).
  virtual at::Tensor apply(const at::Tensor& guided, const PassOutputs& out, const StepInfo& step) const = 0;
};

// Classifier-free guidance: uncond + scale * (cond - uncond). Must come first (it replaces the
// output so far).
class ClassifierFreeGuidance : public GuidanceTerm {
 public:
  explicit ClassifierFreeGuidance(double scale) : scale_(scale) {}
  std::string name() const override { return "cfg"; }
  std::vector<RowRole> passes(const StepInfo&) const override { return {RowRole::Cond, RowRole::Uncond}; }
  at::Tensor apply(const at::Tensor& guided, const PassOutputs& out, const StepInfo& step) const override;
  double scale() const { return scale_; }

 private:
  double scale_;
};

// Autoguidance (Karras et al. 2024): guided + (weight - 1) * (cond - guide), the guide pass being
// a weaker model of the same latent space on the prompt.
class Autoguidance : public GuidanceTerm {
 public:
  explicit Autoguidance(double weight) : weight_(weight) {}
  std::string name() const override { return "autoguidance"; }
  std::vector<RowRole> passes(const StepInfo&) const override { return {RowRole::Cond, RowRole::Guide}; }
  at::Tensor apply(const at::Tensor& guided, const PassOutputs& out, const StepInfo& step) const override;

 private:
  double weight_;
};

// The part of a run a term acts on: steps whose schedule position index / count lies in
// [start, end) (fractions of the whole schedule, so an SDEdit run that starts part-way keeps the
// same absolute range).
struct StepRange {
  double start = 0.0, end = 1.0;
  bool contains(const StepInfo& step) const;
};

// Perturbed-attention guidance (Ahn et al. 2024; SoftPAG and head sets after HeadHunter): on the
// steps of `range`, guided + scale * (cond - perturbed). After CFG this is
// v_u + w (v_c - v_u) + s (v_c - v_p); alone, v_c + s (v_c - v_p). The perturbed pass is the
// prompt; what perturbs it is the pipeline's business (HeadPerturbation on RowRole::Perturbed
// rows). Outside the range the term asks for no pass and changes nothing.
class PerturbedAttentionGuidance : public GuidanceTerm {
 public:
  explicit PerturbedAttentionGuidance(double scale, StepRange range = {}, RowRole role = RowRole::Perturbed)
      : scale_(scale), range_(range), role_(role) {}
  std::string name() const override { return "pag"; }
  std::vector<RowRole> passes(const StepInfo& step) const override;
  at::Tensor apply(const at::Tensor& guided, const PassOutputs& out, const StepInfo& step) const override;
  double scale() const { return scale_; }
  const StepRange& range() const { return range_; }
  RowRole role() const { return role_; }

 private:
  double scale_;
  StepRange range_;
  RowRole role_;
};

// Skip-layer guidance (SD3.5, ComfyUI's SkipLayerGuidanceDiT): the same formula on the
// RowRole::SkipLayer pass, the prompt with some blocks bypassed (DiTCall::skip_blocks).
class SkipLayerGuidance : public PerturbedAttentionGuidance {
 public:
  explicit SkipLayerGuidance(double scale, StepRange range = {0.01, 0.2})
      : PerturbedAttentionGuidance(scale, range, RowRole::SkipLayer) {}
  std::string name() const override { return "slg"; }
};

// CFG-Zero* (Fan et al. 2025, "Improved Classifier-Free Guidance for Flow Matching Models"), in
// place of CFG and first like it: with the optimised scale s* = <v_c, v_u> / (|v_u|^2 + 1e-8) per
// batch row, v = s* v_u + w (v_c - s* v_u); on steps with index < zero_init_steps the output is
// zero (zero-init). Defined on velocities: for flow (velocity-predicting) models only.
class CFGZeroStar : public GuidanceTerm {
 public:
  CFGZeroStar(double scale, int zero_init_steps) : scale_(scale), zero_init_steps_(zero_init_steps) {}
  std::string name() const override { return "cfg-zero*"; }
  std::vector<RowRole> passes(const StepInfo&) const override { return {RowRole::Cond, RowRole::Uncond}; }
  at::Tensor apply(const at::Tensor& guided, const PassOutputs& out, const StepInfo& step) const override;
  // The authors' default number of zeroed steps: ceil(4 % of the steps).
  static int default_zero_init_steps(int steps);

 private:
  double scale_;
  int zero_init_steps_;
};

class Guidance {
 public:
  Guidance& add(std::shared_ptr<const GuidanceTerm> term);
  const std::vector<std::shared_ptr<const GuidanceTerm>>& terms() const { return terms_; }
  // Cond first, then every other role the terms read at `step`, each once, in RowRole order.
  std::vector<RowRole> passes(const StepInfo& step) const;
  at::Tensor combine(const PassOutputs& out, const StepInfo& step) const;

 private:
  std::vector<std::shared_ptr<const GuidanceTerm>> terms_;
};

// Runs a WanDiT (and, for RowRole::Guide, a guide DiT) under a Guidance.
class DiTDenoiser : public Denoiser {
 public:
  struct Options {
    bool batch_passes = true;  // the main model's passes in one forward (more memory, one pass)
    ModelPrediction prediction = ModelPrediction::Velocity;
    // Applied to every forward of the main model; rows are labelled, so a processor can act on
    // some roles only.
    const AttentionProcessors* processors = nullptr;
    // The main model's per-call settings (window, scale factor, position offset).
    DiTCall call;
  };
  DiTDenoiser(WanDiTImpl& dit, Guidance guidance, Options options);
  // The text condition of a role's pass (encoded by the model that runs it).
  void set_condition(RowRole role, WanTextCondition condition);
  // Runs `role`'s pass on another model (the guide DiT of autoguidance).
  void set_model(RowRole role, WanDiTImpl& model);

  at::Tensor velocity(const at::Tensor& x, const StepInfo& step) override;
  // The passes' raw outputs of the last step (for inspection and tests).
  const PassOutputs& last_outputs() const { return last_; }

 private:
  at::Tensor forward(WanDiTImpl& model, const at::Tensor& x, const at::Tensor& t, const std::vector<RowRole>& roles,
                     const StepInfo& step);
  const WanTextCondition& condition(const std::vector<RowRole>& roles);

  WanDiTImpl& dit_;
  Guidance guidance_;
  Options options_;
  std::map<RowRole, WanTextCondition> conditions_;
  std::map<RowRole, WanDiTImpl*> models_;
  std::map<std::vector<RowRole>, WanTextCondition> batched_;  // concatenated conditions, built once
  PassOutputs last_;
};

}  // namespace vdit
