// Prompt-to-Prompt editing and inversion: see include/vdit/pipelines/prompt_edit.h.
#include "vdit/pipelines/prompt_edit.h"

#include "vdit/common.h"
#include "vdit/models/tokenizer.h"
#include "vdit/samplers/stepper.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <sstream>

namespace vdit {

namespace {

const std::string kSpaceMarker = "\xe2\x96\x81";  // U+2581, sentencepiece's word-start marker

bool starts_with_marker(const std::string& piece) { return piece.compare(0, kSpaceMarker.size(), kSpaceMarker) == 0; }

std::string number_text(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

// Steps with index < floor(f * count) are inside a window of share f (the small epsilon keeps
// 0.29 * 100 = 28.999... from losing a step).
bool in_window(const StepInfo& step, double share) {
  return step.index < static_cast<int>(std::floor(share * step.count + 1e-9));
}

}  // namespace

// ------------------------------------------------------------------------------ token alignment

std::string word_key(const std::string& word) {
  std::size_t begin = 0, end = word.size();
  while (begin < end && std::ispunct(static_cast<unsigned char>(word[begin]))) ++begin;
  while (end > begin && std::ispunct(static_cast<unsigned char>(word[end - 1]))) --end;
  std::string key = word.substr(begin, end - begin);
  std::transform(key.begin(), key.end(), key.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return key;
}

std::vector<std::int64_t> PromptTokens::positions_of(const std::string& word) const {
  const std::string key = word_key(word);
  std::vector<std::int64_t> out;
  for (const PromptWord& w : words)
    if (w.key == key)
      for (std::int64_t i = 0; i < w.count; ++i) out.push_back(w.first + i);
  return out;
}

PromptTokens prompt_tokens_from_pieces(const std::vector<std::int64_t>& ids, const std::vector<std::string>& pieces,
                                       std::int64_t eos_id) {
  if (ids.size() != pieces.size()) throw RuntimeError("prompt_tokens_from_pieces: ids and pieces differ in length");
  PromptTokens out;
  out.ids = ids;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const std::string& piece = pieces[i];
    const bool starts = starts_with_marker(piece) || out.words.empty();
    const std::string text = starts_with_marker(piece) ? piece.substr(kSpaceMarker.size()) : piece;
    if (starts) {
      PromptWord w;
      w.first = static_cast<std::int64_t>(i);
      out.words.push_back(w);
    }
    out.words.back().text += text;
    out.words.back().count += 1;
  }
  // A lone marker piece followed by the word's pieces gives a word whose text is all in later
  // pieces; an empty word (a marker before punctuation-only text) keeps its tokens.
  for (PromptWord& w : out.words) w.key = word_key(w.text);
  out.ids.push_back(eos_id);
  return out;
}

PromptTokens tokenize_prompt(const WanTokenizer& tokenizer, const std::string& prompt) {
  const std::vector<std::int64_t> ids = tokenizer.piece_ids(clean_prompt(prompt));
  std::vector<std::string> pieces;
  pieces.reserve(ids.size());
  for (std::int64_t id : ids) pieces.push_back(tokenizer.id_to_piece(id));
  PromptTokens out = prompt_tokens_from_pieces(ids, pieces, tokenizer.eos_id());
  // Pieces of characters the vocabulary lacks read back as <unk>: take the words' text from the
  // cleaned prompt itself when its words line up with the pieces' words.
  std::vector<std::string> written;
  std::istringstream in(clean_prompt(prompt));
  for (std::string w; in >> w;) written.push_back(w);
  if (written.size() == out.words.size())
    for (std::size_t i = 0; i < written.size(); ++i) {
      out.words[i].text = written[i];
      out.words[i].key = word_key(written[i]);
    }
  return out;
}

const char* edit_kind_name(EditKind kind) {
  switch (kind) {
    case EditKind::Identity: return "identity";
    case EditKind::Swap: return "swap";
    case EditKind::Refine: return "refine";
  }
  return "?";
}

std::vector<std::int64_t> align_token_ids(const std::vector<std::int64_t>& source, const std::vector<std::int64_t>& target) {
  const std::size_t n = source.size(), m = target.size();
  // score[i][j]: best alignment of source[0, i) with target[0, j); gaps cost 0, so a mismatch
  // (-1) is never better than two gaps and only equal tokens are ever aligned.
  std::vector<std::vector<int>> score(n + 1, std::vector<int>(m + 1, 0));
  for (std::size_t i = 1; i <= n; ++i)
    for (std::size_t j = 1; j <= m; ++j) {
      const int diagonal = score[i - 1][j - 1] + (source[i - 1] == target[j - 1] ? 1 : -1);
      score[i][j] = std::max({diagonal, score[i - 1][j], score[i][j - 1]});
    }
  std::vector<std::int64_t> mapper(m, -1);
  std::size_t i = n, j = m;
  while (i > 0 && j > 0) {
    if (source[i - 1] == target[j - 1] && score[i][j] == score[i - 1][j - 1] + 1) {
      mapper[j - 1] = static_cast<std::int64_t>(i - 1);
      --i;
      --j;
    } else if (score[i][j] == score[i - 1][j]) {
      --i;
    } else {
      --j;
    }
  }
  return mapper;
}

TokenAlignment align_prompts(const PromptTokens& source, const PromptTokens& target, std::int64_t text_len) {
  if (text_len < 1) throw RuntimeError("align_prompts: text_len must be >= 1");
  TokenAlignment out;
  const std::int64_t L = text_len;
  const auto ns = static_cast<std::int64_t>(source.ids.size()), nt = static_cast<std::int64_t>(target.ids.size());
  out.mapper = at::zeros({L, L}, at::kFloat);
  out.alpha = at::zeros({L}, at::kFloat);
  auto M = out.mapper.accessor<float, 2>();
  auto alpha = out.alpha.accessor<float, 1>();
  const auto link = [&](std::int64_t s, std::int64_t t, float weight) {
    if (s < L && t < L) {
      M[s][t] += weight;
      alpha[t] = 1.0f;
    }
  };
  if (source.ids == target.ids) {
    out.kind = EditKind::Identity;
    for (std::int64_t k = 0; k < L; ++k) link(k, k, 1.0f);
    return out;
  }
  if (source.words.size() == target.words.size()) {
    out.kind = EditKind::Swap;
    for (std::size_t w = 0; w < source.words.size(); ++w) {
      const PromptWord& a = source.words[w];
      const PromptWord& b = target.words[w];
      const bool same = std::equal(source.ids.begin() + a.first, source.ids.begin() + a.first + a.count,
                                   target.ids.begin() + b.first, target.ids.begin() + b.first + b.count);
      if (!same) out.changed.emplace_back(a.text, b.text);
      if (a.count == b.count) {
        for (std::int64_t i = 0; i < a.count; ++i) link(a.first + i, b.first + i, 1.0f);
      } else {
        for (std::int64_t i = 0; i < a.count; ++i)
          for (std::int64_t j = 0; j < b.count; ++j) link(a.first + i, b.first + j, 1.0f / static_cast<float>(b.count));
      }
    }
    link(ns - 1, nt - 1, 1.0f);  // </s>
  } else {
    out.kind = EditKind::Refine;
    const std::vector<std::int64_t> mapper = align_token_ids(source.ids, target.ids);
    for (std::int64_t k = 0; k < nt; ++k)
      if (mapper[static_cast<std::size_t>(k)] >= 0) link(mapper[static_cast<std::size_t>(k)], k, 1.0f);
  }
  // Padding slots in order; target slots left without a source slot keep their own map (alpha 0).
  for (std::int64_t k = nt; k < L; ++k) {
    const std::int64_t s = ns + (k - nt);
    if (s < L) link(s, k, 1.0f);
  }
  return out;
}

// ------------------------------------------------------------------------------ edit controls

EditPlan plan_edit(const PromptTokens& source, const PromptTokens& target, const EditControls& controls,
                   std::int64_t text_len) {
  const auto check_share = [](double f, const char* option) {
    if (!(f >= 0.0 && f <= 1.0)) throw InputError(std::string(option) + " must be in [0, 1], got " + number_text(f));
  };
  check_share(controls.cross_replace, "--cross-replace");
  check_share(controls.self_replace, "--self-replace");
  if (!(controls.blend_threshold > 0.0 && controls.blend_threshold < 1.0))
    throw InputError("--blend-threshold must be in (0, 1), got " + number_text(controls.blend_threshold));
  for (int layer : controls.layers)
    if (layer < 0) throw InputError("--edit-layers: layer indices must be >= 0, got " + std::to_string(layer));
  EditPlan plan;
  plan.controls = controls;
  plan.alignment = align_prompts(source, target, text_len);
  const auto kept = [&](std::vector<std::int64_t> positions) {
    positions.erase(std::remove_if(positions.begin(), positions.end(), [&](std::int64_t p) { return p >= text_len; }),
                    positions.end());
    return positions;
  };
  if (!controls.reweight.empty()) {
    plan.reweight = at::ones({text_len}, at::kFloat);
    for (const auto& [word, factor] : controls.reweight) {
      if (!std::isfinite(factor)) throw InputError("--reweight " + word + ": the factor must be a finite number");
      const std::vector<std::int64_t> all = target.positions_of(word);
      if (all.empty()) throw InputError("--reweight: no word '" + word + "' in the target prompt");
      const std::vector<std::int64_t> positions = kept(all);
      if (positions.empty())
        throw InputError("--reweight: the word '" + word + "' lies past the model's " + std::to_string(text_len) +
                         " text tokens");
      for (std::int64_t p : positions) plan.reweight[p] = factor;
    }
  }
  for (const std::string& word : controls.blend) {
    const std::vector<std::int64_t> in_source = source.positions_of(word), in_target = target.positions_of(word);
    if (in_source.empty() && in_target.empty())
      throw InputError("--blend: no word '" + word + "' in the source or the target prompt");
    const std::vector<std::int64_t> s = kept(in_source), t = kept(in_target);
    if (s.empty() && t.empty())
      throw InputError("--blend: the word '" + word + "' lies past the model's " + std::to_string(text_len) + " text tokens");
    plan.blend_source.insert(plan.blend_source.end(), s.begin(), s.end());
    plan.blend_target.insert(plan.blend_target.end(), t.begin(), t.end());
  }
  return plan;
}

// ------------------------------------------------------------------------------ the edit run

EditDenoiser::EditDenoiser(WanDiTImpl& dit, const WanTextCondition& source, const WanTextCondition& target,
                           const WanTextCondition& uncond, double guidance, ModelPrediction prediction,
                           const AttentionProcessors* processors)
    : dit_(dit), guidance_(guidance), prediction_(prediction), processors_(processors) {
  if (guidance != 1.0 && uncond.batch() == 0) throw RuntimeError("EditDenoiser: guidance needs the negative prompt's condition");
  batched_ = guidance != 1.0 ? WanTextCondition::cat({source, target, uncond, uncond}) : WanTextCondition::cat({source, target});
}

at::Tensor EditDenoiser::velocity(const at::Tensor& x, const StepInfo& step) {
  if (x.size(0) != 2) throw RuntimeError("EditDenoiser: the latent must hold the source and target rows");
  const bool guided = guidance_ != 1.0;
  DiTCall call;
  call.processors = processors_;
  call.step = &step;
  call.row_roles = {RowRole::Source, RowRole::Target};
  if (guided) call.row_roles.insert(call.row_roles.end(), {RowRole::Uncond, RowRole::Uncond});
  const at::Tensor rows = guided ? at::cat({x, x}) : x;
  const std::int64_t n = rows.size(0);
  const at::Tensor out = dit_.forward(rows, at::full({n}, step.timestep, x.options()), batched_, call);
  at::Tensor guided_out = out;
  if (guided) {
    const at::Tensor cond = out.narrow(0, 0, 2), uncond = out.narrow(0, 2, 2);
    guided_out = uncond + guidance_ * (cond - uncond);
  }
  return prediction_ == ModelPrediction::Sample ? velocity_from_sample(guided_out, x, step.sigma) : guided_out;
}

EditScheduleHook::EditScheduleHook(std::shared_ptr<CrossAttentionEdit> cross, std::shared_ptr<CrossAttentionEdit> self,
                                   double cross_replace, double self_replace, bool reweight)
    : cross_(std::move(cross)), self_(std::move(self)), cross_replace_(cross_replace), self_replace_(self_replace),
      reweight_(reweight) {}

void EditScheduleHook::before_step(const StepInfo& step, const at::Tensor&) {
  if (in_window(step, cross_replace_)) {
    cross_->options().use_source = true;
    cross_->set_mode(CrossAttentionEdit::Mode::Edit);
  } else if (reweight_) {
    cross_->options().use_source = false;
    cross_->set_mode(CrossAttentionEdit::Mode::Edit);
  } else {
    cross_->set_mode(CrossAttentionEdit::Mode::Off);
  }
  self_->set_mode(in_window(step, self_replace_) ? CrossAttentionEdit::Mode::Edit : CrossAttentionEdit::Mode::Off);
}

LocalBlendHook::LocalBlendHook(std::shared_ptr<CrossAttentionMapCapture> capture, std::vector<std::int64_t> source_tokens,
                               std::vector<std::int64_t> target_tokens, std::array<std::int64_t, 3> patch, double threshold)
    : capture_(std::move(capture)), source_tokens_(std::move(source_tokens)), target_tokens_(std::move(target_tokens)),
      patch_(patch), threshold_(threshold) {}

void LocalBlendHook::after_step(const StepInfo&, at::Tensor& x) {
  const at::Tensor maps = capture_->maps();  // [2, text, T', H', W']
  if (!maps.defined()) return;
  const auto word_mask = [&](std::int64_t row, const std::vector<std::int64_t>& tokens) {
    const at::Tensor index = at::tensor(tokens, at::TensorOptions().dtype(at::kLong)).to(maps.device());
    at::Tensor m = maps.select(0, row).index_select(0, index).sum(0);  // [T', H', W']
    m = at::max_pool2d(m.unsqueeze(1), {3, 3}, {1, 1}, {1, 1}).squeeze(1);
    m = m.repeat_interleave(patch_[0], 0).repeat_interleave(patch_[1], 1).repeat_interleave(patch_[2], 2);
    const at::Tensor peak = m.max();
    return peak.item<float>() > 0 ? (m / peak).gt(threshold_) : at::zeros_like(m, at::kBool);
  };
  at::Tensor mask;
  if (!source_tokens_.empty()) mask = word_mask(0, source_tokens_);
  if (!target_tokens_.empty()) mask = mask.defined() ? mask.logical_or(word_mask(1, target_tokens_)) : word_mask(1, target_tokens_);
  if (!mask.defined()) return;
  if (mask.size(0) != x.size(2) || mask.size(1) != x.size(3) || mask.size(2) != x.size(4))
    throw RuntimeError("local blend: the mask's grid does not match the latent");
  mask_ = mask;
  const at::Tensor src = x.narrow(0, 0, 1), tgt = x.narrow(0, 1, 1);
  const at::Tensor m = mask.to(x.scalar_type()).unsqueeze(0).unsqueeze(0);  // [1, 1, F', H, W]
  x = at::cat({src, src + m * (tgt - src)});
}

at::Tensor sample_edit(WanDiTImpl& dit, const WanTextCondition& source, const WanTextCondition& target,
                       const WanTextCondition& uncond, const EditPlan& plan, Stepper& stepper, const at::Tensor& start,
                       const EditRunOptions& options, const std::vector<StepHook*>& hooks) {
  const EditControls& c = plan.controls;
  for (int layer : c.layers)
    if (layer >= dit.config.num_layers)
      throw InputError("--edit-layers: layer " + std::to_string(layer) + " does not exist (the model has " +
                       std::to_string(dit.config.num_layers) + " layers)");
  CrossAttentionEdit::Options cross_options;
  if (plan.alignment.kind != EditKind::Identity) {
    cross_options.mapper = plan.alignment.mapper;
    if (!plan.alignment.alpha.eq(1).all().item<bool>()) cross_options.alpha = plan.alignment.alpha;
  }
  cross_options.reweight = plan.reweight;
  cross_options.layers = c.layers;
  cross_options.source = CrossAttentionEdit::Source::Batch;
  auto cross = std::make_shared<CrossAttentionEdit>(cross_options);
  // Self-attention injection in a processor of its own, so its window is independent of the
  // cross window: no cross layer is selected (layer -1 does not exist).
  CrossAttentionEdit::Options self_options;
  self_options.layers = {-1};
  self_options.self_inject = true;
  self_options.self_layers = c.layers;
  auto self = std::make_shared<CrossAttentionEdit>(self_options);

  auto chain = std::make_shared<ProcessorChain>();
  if (options.observer) chain->add(options.observer);
  std::shared_ptr<CrossAttentionMapCapture> capture;
  if (!plan.blend_source.empty() || !plan.blend_target.empty()) {
    CrossAttentionMapCapture::Options capture_options;
    capture_options.layers = c.layers;
    capture_options.roles = {RowRole::Source, RowRole::Target};
    capture = std::make_shared<CrossAttentionMapCapture>(capture_options);
    chain->add(capture);  // outside the edit: it sees each row's own maps, as the reference stores them
  }
  chain->add(cross).add(self);
  AttentionProcessors processors;
  processors.set(chain);

  EditDenoiser denoiser(dit, source, target, uncond, options.guidance, options.prediction, &processors);
  EditScheduleHook schedule(cross, self, c.cross_replace, c.self_replace, plan.reweight.defined());
  std::vector<StepHook*> all_hooks{&schedule};
  std::unique_ptr<LocalBlendHook> blend;
  if (capture) {
    const auto& patch = dit.config.patch_size;
    blend = std::make_unique<LocalBlendHook>(capture, plan.blend_source, plan.blend_target,
                                             std::array<std::int64_t, 3>{patch[0], patch[1], patch[2]}, c.blend_threshold);
    all_hooks.push_back(blend.get());
  }
  all_hooks.insert(all_hooks.end(), hooks.begin(), hooks.end());
  if (start.dim() != 5 || start.size(0) != 1) throw RuntimeError("sample_edit: the start latent must be [1, C, F, H, W]");
  return run_flow(at::cat({start, start}), stepper, denoiser, all_hooks);
}

// ------------------------------------------------------------------------------ inversion

const char* inversion_method_name(InversionMethod method) {
  return method == InversionMethod::Euler ? "euler" : "fixed-point";
}

InversionMethod parse_inversion_method(const std::string& text) {
  if (text == "euler") return InversionMethod::Euler;
  if (text == "fixed-point") return InversionMethod::FixedPoint;
  throw InputError("--inversion must be euler or fixed-point, got '" + text + "'");
}

FixedPointInversionDenoiser::FixedPointInversionDenoiser(Denoiser& inner, std::vector<std::int64_t> timesteps, int iterations)
    : inner_(inner), timesteps_(std::move(timesteps)), iterations_(iterations) {
  if (iterations_ < 0) throw InputError("fixed-point inversion: iterations must be >= 0");
}

at::Tensor FixedPointInversionDenoiser::velocity(const at::Tensor& x, const StepInfo& step) {
  at::Tensor v = inner_.velocity(x, step);
  if (iterations_ == 0) return v;
  // The step's target sigma and its timestep, indexed as EulerInversionStepper::info does.
  const std::int64_t from = static_cast<std::int64_t>(timesteps_.size()) - step.index;
  if (from < 1 || from > static_cast<std::int64_t>(timesteps_.size()))
    throw RuntimeError("fixed-point inversion: step " + std::to_string(step.index) + " outside the grid");
  StepInfo at_next = step;
  at_next.sigma = step.sigma_next;
  at_next.timestep = static_cast<double>(timesteps_[static_cast<std::size_t>(from - 1)]);
  const double delta = step.sigma_next - step.sigma;
  for (int i = 0; i < iterations_; ++i) v = inner_.velocity(x + delta * v, at_next);
  return v;
}

at::Tensor invert_latent(Denoiser& denoiser, const FlowSampler& sampler, const at::Tensor& clean, InversionMethod method,
                         int iterations, const std::vector<StepHook*>& hooks) {
  EulerInversionStepper stepper(sampler);
  if (method == InversionMethod::Euler) return run_flow(clean, stepper, denoiser, hooks);
  FixedPointInversionDenoiser corrected(denoiser, sampler.timesteps(), iterations);
  return run_flow(clean, stepper, corrected, hooks);
}

}  // namespace vdit
