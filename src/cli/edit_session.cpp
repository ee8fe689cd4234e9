// See edit_session.h.
#include "edit_session.h"

#include "vdit/common.h"
#include "vdit/io/checkpoint.h"
#include "vdit/models/tokenizer.h"
#include "vdit/models/wan_dit.h"
#include "vdit/samplers/stepper.h"

namespace vdit::cli {

WanTokenizer load_model_tokenizer(const WanModelFiles& files) {
  if (!files.tokenizer.empty()) return WanTokenizer::from_file(files.tokenizer);
  const auto file = WeightFile::open(files.text_encoder);
  for (const std::string& key : file->keys())
    if (key == "spiece_model" || (key.size() > 13 && key.compare(key.size() - 13, 13, ".spiece_model") == 0))
      return WanTokenizer::from_tensor(file->load(key), WanTokenizer::kDefaultMaxLen, files.text_encoder + ": '" + key + "'");
  throw InputError(files.text_encoder + ": no spiece_model tensor in the file; give the tokenizer model (--tokenizer)");
}

EditSession::EditSession(WanT2VPipeline& pipeline, T2VSettings settings)
    : pipeline_(pipeline), settings_(std::move(settings)) {
  tokenizer_ = std::make_shared<WanTokenizer>(load_model_tokenizer(pipeline_.files()));
  text_len_ = pipeline_.dit_config().text_len;
}

EditPlan EditSession::plan(const std::string& source_prompt, const std::string& target_prompt,
                           const EditControls& controls) const {
  for (int layer : controls.layers)
    if (layer >= pipeline_.dit_config().num_layers)
      throw InputError("--edit-layers: layer " + std::to_string(layer) + " does not exist (the model has " +
                       std::to_string(pipeline_.dit_config().num_layers) + " layers)");
  return plan_edit(tokenize_prompt(*tokenizer_, source_prompt), tokenize_prompt(*tokenizer_, target_prompt), controls,
                   text_len_);
}

void EditSession::encode(const std::vector<std::string>& prompts) {
  std::vector<std::string> missing;
  for (const auto& p : prompts)
    if (!contexts_.count(p) && std::find(missing.begin(), missing.end(), p) == missing.end()) missing.push_back(p);
  if (missing.empty()) return;
  const std::vector<at::Tensor> encoded = pipeline_.encode_prompts(missing);
  for (std::size_t i = 0; i < missing.size(); ++i) contexts_[missing[i]] = encoded[i];
}

const WanTextCondition& EditSession::condition(const std::string& prompt) {
  auto it = conditions_.find(prompt);
  if (it != conditions_.end()) return it->second;
  encode({prompt});
  WanDiTImpl& dit = pipeline_.loaded_dit();
  at::Tensor context = contexts_.at(prompt);
  // Cut to the DiT's text_len as the pipeline does (the demo model's is 16).
  if (context.size(0) > text_len_) context = context.narrow(0, 0, text_len_);
  c10::InferenceMode guard;
  return conditions_.emplace(prompt, dit.encode_text(context.unsqueeze(0))).first->second;
}

EditOutcome EditSession::run(const EditRequest& request, const StepCallback& on_step, const StepCallback& on_invert) {
  EditOutcome outcome;
  outcome.plan = plan(request.source_prompt, request.target_prompt, request.controls);
  const std::string negative = settings_.negative_prompt.value_or(kWanDefaultNegativePrompt);
  const bool guided = settings_.guidance != 1.0;
  encode(guided ? std::vector<std::string>{request.source_prompt, request.target_prompt, negative}
                : std::vector<std::string>{request.source_prompt, request.target_prompt});
  const WanTextCondition& source = condition(request.source_prompt);
  const WanTextCondition& target = condition(request.target_prompt);
  const WanTextCondition uncond = guided ? condition(negative) : WanTextCondition{};
  WanDiTImpl& dit = pipeline_.loaded_dit();
  std::unique_ptr<FlowSampler> sampler = pipeline_.make_sampler_for(settings_);
  const ModelPrediction prediction = sampler->config().prediction;
  const at::Device device = dit.patch_embedding->weight.device();

  at::Tensor start;
  if (request.input_video.defined()) {
    outcome.input_latent = pipeline_.encode(request.input_video);
    const int steps = sampler->num_steps();
    const int inverted = request.inversion_steps > 0 ? request.inversion_steps : steps;
    if (inverted > steps)
      throw InputError("--inversion-steps " + std::to_string(inverted) + " exceeds the run's " + std::to_string(steps) + " steps");
    sampler->set_begin_index(steps - inverted);
    c10::InferenceMode guard;
    DiTDenoiser::Options options;
    options.prediction = prediction;
    DiTDenoiser inversion_model(dit, Guidance{}, options);  // the source prompt alone: guidance 1
    inversion_model.set_condition(RowRole::Cond, source);
    ProgressHook progress(on_invert);
    start = invert_latent(inversion_model, *sampler, outcome.input_latent.to(device).unsqueeze(0), request.inversion,
                          request.inversion_iterations, {&progress});
  } else {
    start = request.noise.to(device, at::kFloat).unsqueeze(0);
  }
  c10::InferenceMode guard;
  SamplerStepper stepper(std::move(sampler));
  EditRunOptions options;
  options.guidance = settings_.guidance;
  options.prediction = prediction;
  ProgressHook progress(on_step);
  const at::Tensor x = sample_edit(dit, source, target, uncond, outcome.plan, stepper, start, options, {&progress});
  outcome.source_latent = x.select(0, 0).to(at::kCPU);
  outcome.target_latent = x.select(0, 1).to(at::kCPU);
  return outcome;
}

}  // namespace vdit::cli
