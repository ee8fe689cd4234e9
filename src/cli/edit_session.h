// One loaded model driving prompt-to-prompt edits (pipelines/prompt_edit.h), shared by `vdit edit`
// and `vdit eval shapes --edit`: prompts tokenised with the model's tokenizer for the alignment,
// encoded once and cached, the DiT kept loaded between runs, real inputs encoded and inverted.
#pragma once

#include "vdit/pipelines/prompt_edit.h"
#include "vdit/pipelines/wan_t2v.h"

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace vdit {
class WanTokenizer;
}

namespace vdit::cli {

// The model's tokenizer: its spiece.model, else the text encoder file's spiece_model tensor.
WanTokenizer load_model_tokenizer(const WanModelFiles& files);

struct EditRequest {
  std::string source_prompt, target_prompt;
  EditControls controls;
  at::Tensor noise;  // [C, F', h, w]: the shared start noise (no input)
  // A real input [3, F, H, W] in [-1, 1]: encoded, inverted under the source prompt at guidance 1
  // on the run's grid (Euler sampler), and regenerated from there.
  at::Tensor input_video;
  InversionMethod inversion = InversionMethod::FixedPoint;
  int inversion_iterations = 3;
  int inversion_steps = 0;  // the last N steps of the schedule are inverted and regenerated; 0: all
};

struct EditOutcome {
  at::Tensor source_latent, target_latent;  // [C, F', h, w]
  at::Tensor input_latent;                  // the encoded input (with an input)
  EditPlan plan;
};

class EditSession {
 public:
  // `settings`: size, frames, steps, sampler, shift, guidance, negative prompt as checked.
  EditSession(WanT2VPipeline& pipeline, T2VSettings settings);
  // The plan of a prompt pair (model tokenizer, the DiT's text_len): InputError for bad controls.
  EditPlan plan(const std::string& source_prompt, const std::string& target_prompt, const EditControls& controls) const;
  // Encodes every prompt not yet encoded (one text-encoder load for all of them).
  void encode(const std::vector<std::string>& prompts);
  EditOutcome run(const EditRequest& request, const StepCallback& on_step = {}, const StepCallback& on_invert = {});
  const T2VSettings& settings() const { return settings_; }
  std::int64_t text_len() const { return text_len_; }

 private:
  const WanTextCondition& condition(const std::string& prompt);

  WanT2VPipeline& pipeline_;
  T2VSettings settings_;
  std::shared_ptr<WanTokenizer> tokenizer_;
  std::int64_t text_len_ = 0;
  std::map<std::string, at::Tensor> contexts_;
  std::map<std::string, WanTextCondition> conditions_;
};

}  // namespace vdit::cli
