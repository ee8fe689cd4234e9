// Prompt-to-Prompt editing for the Wan DiT and inversion of real inputs (ALGORITHMS.md §4.1, §4.2).
//
// An edit runs the source and target prompts as two latent rows of one loop from the same start
// (shared noise, or the inverted input). CrossAttentionEdit gives the target row the source's
// cross-attention maps (through the token alignment) on the first share of the steps and, on
// another share, the source's self-attention maps; an optional local blend copies the source's
// latent outside the region the chosen words attend to. Everything here is built from the
// existing pieces: the one loop (run_flow), steppers, attention processors and step hooks.
#pragma once

#include "vdit/attention/processors.h"
#include "vdit/models/wan_dit.h"
#include "vdit/pipelines/flow_loop.h"
#include "vdit/samplers/sampler.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace vdit {

class WanTokenizer;

// ------------------------------------------------------------------------------ token alignment

// A word of a prompt (text between spaces) and the token positions its pieces occupy.
struct PromptWord {
  std::string text;          // as written
  std::string key;           // lower case, surrounding punctuation removed: what --reweight/--blend match
  std::int64_t first = 0;    // position of its first token
  std::int64_t count = 0;    // tokens (a word split into several pieces has count > 1)
};

struct PromptTokens {
  std::vector<std::int64_t> ids;  // the pieces then </s>, as the text encoder sees them (no padding)
  std::vector<PromptWord> words;
  // Token positions of `word` (matched on PromptWord::key, every occurrence); empty when absent.
  std::vector<std::int64_t> positions_of(const std::string& word) const;
};

// From sentencepiece pieces: a piece starting with U+2581 ('▁', the space marker) starts a word.
// `ids` and `pieces` are the prompt's pieces (no </s>); eos_id is appended.
PromptTokens prompt_tokens_from_pieces(const std::vector<std::int64_t>& ids, const std::vector<std::string>& pieces,
                                       std::int64_t eos_id);
// The prompt cleaned and tokenised as the text encoder does (clean_prompt, pieces, </s>).
PromptTokens tokenize_prompt(const WanTokenizer& tokenizer, const std::string& prompt);
// The key a word is matched on: lower case, leading and trailing ASCII punctuation removed.
std::string word_key(const std::string& word);

enum class EditKind { Identity, Swap, Refine };
const char* edit_kind_name(EditKind kind);  // "identity", "swap", "refine"

// The cross-attention edit a prompt pair asks for, over the DiT's text_len token slots:
// A*[:, k] = alpha_k (A_src M)[:, k] + (1 - alpha_k) A_tgt[:, k].
struct TokenAlignment {
  EditKind kind = EditKind::Identity;
  at::Tensor mapper;  // [text_len, text_len] f32 (source token, target token)
  at::Tensor alpha;   // [text_len] f32: 1 where the target token takes the source's map
  std::vector<std::pair<std::string, std::string>> changed;  // swap: (source word, target word) pairs
};

// Needleman-Wunsch global alignment of token ids (match 1, mismatch -1, gap 0): for every target
// token the aligned source position, or -1 for a token with no counterpart (inserted or changed).
std::vector<std::int64_t> align_token_ids(const std::vector<std::int64_t>& source, const std::vector<std::int64_t>& target);

// Identical token ids: identity. Same number of words: swap (unchanged words map one to one; a
// changed word of n_s tokens to one of n_t tokens maps one to one when n_s = n_t, else every
// source token gives 1/n_t to every target token; later tokens keep their own offsets, unlike the
// reference's tail quirk). Otherwise: refine (align_token_ids; new tokens get alpha 0). Padding
// slots after the prompts map in order (pads are identical vectors); a target slot with no source
// slot left gets alpha 0. Tokens past text_len are cut, as the DiT cuts the prompt.
TokenAlignment align_prompts(const PromptTokens& source, const PromptTokens& target, std::int64_t text_len);

// ------------------------------------------------------------------------------ edit controls

struct EditControls {
  // Defaults chosen on the demo model with dev seeds (docs/edit.md): longer cross windows lose the object.
  // The defaults were chosen on the demo model with dev seeds (docs/edit.md): there, longer cross
  // windows lose the object.
  double cross_replace = 0.3;  // steps with index < floor(f * steps) use the source's cross maps
  double self_replace = 0.4;   // steps with index < floor(f * steps) use the source's self maps
  std::set<int> layers;        // DiT blocks edited (cross and self); empty: all
  std::vector<std::pair<std::string, double>> reweight;  // target word -> factor on its attention
  std::vector<std::string> blend;  // local blend words (looked up in both prompts)
  double blend_threshold = 0.3;
};

// What a run needs: the alignment, the reweight vector and the blend words' token positions.
struct EditPlan {
  TokenAlignment alignment;
  at::Tensor reweight;  // [text_len] f32, undefined without --reweight
  std::vector<std::int64_t> blend_source, blend_target;  // token positions in each prompt
  EditControls controls;
};
// Throws InputError (one line) for a --reweight word not in the target prompt, a --blend word in
// neither prompt, a word cut off by text_len, or a control out of range.
EditPlan plan_edit(const PromptTokens& source, const PromptTokens& target, const EditControls& controls,
                   std::int64_t text_len);

// ------------------------------------------------------------------------------ the edit run

// Two latent rows (source, target) per step, with classifier-free guidance when guidance != 1:
// one forward of rows {Source, Target, Uncond, Uncond}. Only the conditional rows are edited.
class EditDenoiser : public Denoiser {
 public:
  EditDenoiser(WanDiTImpl& dit, const WanTextCondition& source, const WanTextCondition& target,
               const WanTextCondition& uncond, double guidance, ModelPrediction prediction,
               const AttentionProcessors* processors);
  at::Tensor velocity(const at::Tensor& x, const StepInfo& step) override;

 private:
  WanDiTImpl& dit_;
  WanTextCondition batched_;
  double guidance_;
  ModelPrediction prediction_;
  const AttentionProcessors* processors_;
};

// Switches the edit processors per step: the cross edit inside the cross window (outside it a
// reweight-only edit when a reweight is set, else off), self-attention injection inside its window.
class EditScheduleHook : public StepHook {
 public:
  EditScheduleHook(std::shared_ptr<CrossAttentionEdit> cross, std::shared_ptr<CrossAttentionEdit> self,
                   double cross_replace, double self_replace, bool reweight);
  void before_step(const StepInfo& step, const at::Tensor& x) override;

 private:
  std::shared_ptr<CrossAttentionEdit> cross_, self_;
  double cross_replace_, self_replace_;
  bool reweight_;
};

// Local blend after each step: the words' cross maps accumulated so far (the capture's mean over
// layers, heads and steps), summed over their tokens per prompt, 3x3 max-pooled per frame, scaled
// up nearest to the latent grid, divided by the video's maximum and thresholded; the mask is the
// union of the source's and the target's. x_tgt <- x_src + mask (x_tgt - x_src).
class LocalBlendHook : public StepHook {
 public:
  LocalBlendHook(std::shared_ptr<CrossAttentionMapCapture> capture, std::vector<std::int64_t> source_tokens,
                 std::vector<std::int64_t> target_tokens, std::array<std::int64_t, 3> patch, double threshold);
  void after_step(const StepInfo& step, at::Tensor& x) override;
  const at::Tensor& last_mask() const { return mask_; }  // [F', H, W] bool

 private:
  std::shared_ptr<CrossAttentionMapCapture> capture_;
  std::vector<std::int64_t> source_tokens_, target_tokens_;
  std::array<std::int64_t, 3> patch_;
  double threshold_;
  at::Tensor mask_;
};

struct EditRunOptions {
  double guidance = 1.0;
  ModelPrediction prediction = ModelPrediction::Velocity;
  // Outermost processor at every site (inspection, tests); null: none.
  std::shared_ptr<AttentionProcessor> observer;
};

// Runs the edit from `start` ([1, C, F, H, W], at the stepper's first sigma): both rows start
// there. Returns [2, C, F, H, W]: row 0 the source, row 1 the edit.
at::Tensor sample_edit(WanDiTImpl& dit, const WanTextCondition& source, const WanTextCondition& target,
                       const WanTextCondition& uncond, const EditPlan& plan, Stepper& stepper, const at::Tensor& start,
                       const EditRunOptions& options, const std::vector<StepHook*>& hooks = {});

// ------------------------------------------------------------------------------ inversion

enum class InversionMethod { Euler, FixedPoint };
const char* inversion_method_name(InversionMethod method);  // "euler", "fixed-point"
InversionMethod parse_inversion_method(const std::string& text);  // InputError otherwise

// Wraps the denoiser of an EulerInversionStepper run: from x_b at sigma_b the step to sigma_a
// uses v(x_a, sigma_a), with x_a found by `iterations` fixed-point iterations
// x_a <- x_b + (sigma_a - sigma_b) v(x_a, sigma_a), started from the plain Euler guess. At the
// fixed point the Euler sampling step from x_a lands exactly on x_b.
class FixedPointInversionDenoiser : public Denoiser {
 public:
  // `timesteps` is the grid's (FlowSampler::timesteps()), indexed as EulerInversionStepper does.
  FixedPointInversionDenoiser(Denoiser& inner, std::vector<std::int64_t> timesteps, int iterations);
  at::Tensor velocity(const at::Tensor& x, const StepInfo& step) override;

 private:
  Denoiser& inner_;
  std::vector<std::int64_t> timesteps_;
  int iterations_;
};

// Inverts `clean` ([1, C, F, H, W]) on the grid of `sampler` (schedule set; its begin index is
// where the inversion stops and where the regenerating run starts) with `denoiser` (the source
// prompt, guidance 1). Returns the latent at sigmas()[begin index].
at::Tensor invert_latent(Denoiser& denoiser, const FlowSampler& sampler, const at::Tensor& clean, InversionMethod method,
                         int iterations, const std::vector<StepHook*>& hooks = {});

}  // namespace vdit
