// Prompt-to-Prompt editing and inversion (pipelines/prompt_edit.h): the token alignment on word
// lists, and the edit run and inversion on the wan-tiny DiT, against invariants and direct
// computations (ALGORITHMS.md §6 checks 12, 13, 15).
#include <catch2/catch.hpp>

#include "test_helpers.h"
#include "tiny_models.h"
#include "vdit/common.h"
#include "vdit/io/safetensors.h"
#include "vdit/models/tokenizer.h"
#include "vdit/pipelines/guidance.h"
#include "vdit/pipelines/prompt_edit.h"
#include "vdit/samplers/stepper.h"

#include <cmath>
#include <set>

using namespace vdit;
using vdit_test::bitwise_equal;
using vdit_test::fixture;

namespace {

const std::string kMark = "\xe2\x96\x81";

// A prompt of one-token words with the given ids (eos 1).
PromptTokens one_token_words(const std::vector<std::int64_t>& ids, const std::vector<std::string>& words) {
  std::vector<std::string> pieces;
  for (const auto& w : words) pieces.push_back(kMark + w);
  return prompt_tokens_from_pieces(ids, pieces, 1);
}

std::unique_ptr<FlowSampler> euler(int steps, double shift = 3.0) {
  auto sampler = make_sampler("euler");
  sampler->set_schedule(steps, shift);
  return sampler;
}

struct TinySetup {
  WanDiT dit = vdit_test::load_tiny_dit();
  at::Tensor context, context_negative, noise;
  TinySetup() {
    auto file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
    context = file->tensor("context_positive").to(at::kFloat);
    context_negative = file->tensor("context_negative").to(at::kFloat);
    noise = file->tensor("noise").to(at::kFloat).unsqueeze(0).narrow(2, 0, 2).contiguous();
  }
  // The prompt's context with the token at `position` replaced by the negative prompt's token
  // `from`: a "word swap" at the embedding level.
  at::Tensor swapped_context(std::int64_t position, std::int64_t from) const {
    at::Tensor c = context.clone();
    c.select(0, position).copy_(context_negative.select(0, from));
    return c;
  }
};

// Checks every cross-attention call of the target row against
// softmax(Q_src K_src^T / sqrt(d)) (M (alpha V_tgt)) + softmax(Q_tgt K_tgt^T / sqrt(d)) ((1 - alpha) V_tgt),
// computed here from the call's own q, k, v; records the steps where it held.
struct SourceMapCheck : AttentionProcessor {
  at::Tensor mapper, alpha;
  std::set<int> steps_checked;
  double max_error = 0;
  int calls = 0;
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override {
    const at::Tensor out = inner(site, q, k, v, call);
    if (site.kind != AttentionKind::Cross) return out;
    const std::int64_t s = site.rows_in({RowRole::Source}, q.size(0)).at(0);
    const std::int64_t t = site.rows_in({RowRole::Target}, q.size(0)).at(0);
    const auto map_of = [&](std::int64_t row) {
      at::Tensor logits = at::matmul(q.select(0, row).to(at::kDouble), k.select(0, row).to(at::kDouble).transpose(-2, -1)) /
                          std::sqrt(static_cast<double>(q.size(3)));
      if (call.valid_keys >= 0 && call.valid_keys < k.size(2))
        logits.narrow(-1, call.valid_keys, k.size(2) - call.valid_keys).fill_(-INFINITY);
      return at::softmax(logits, -1);  // [heads, N, text]
    };
    const at::Tensor vt = v.select(0, t).to(at::kDouble);
    const at::Tensor a = alpha.to(at::kDouble).view({1, -1, 1});
    const at::Tensor expected = at::matmul(map_of(s), at::matmul(mapper.to(at::kDouble), a * vt)) +
                                at::matmul(map_of(t), (1 - a) * vt);
    max_error = std::max(max_error, (out.select(0, t).to(at::kDouble) - expected).abs().max().item<double>());
    steps_checked.insert(site.step->index);
    ++calls;
    return out;
  }
};

}  // namespace

// ------------------------------------------------------------------------------ token alignment

TEST_CASE("prompt edit: words from sentencepiece pieces keep a word split into several pieces together", "[edit]") {
  const PromptTokens t = prompt_tokens_from_pieces({5, 7, 8, 9, 10}, {kMark + "a", kMark + "pur", "ple", kMark + "Circle", ","}, 1);
  REQUIRE(t.words.size() == 3);
  CHECK(t.words[1].text == "purple");
  CHECK(t.words[1].first == 1);
  CHECK(t.words[1].count == 2);
  CHECK(t.words[2].key == "circle");  // lower case, trailing punctuation dropped
  CHECK(t.words[2].count == 2);
  CHECK(t.ids == std::vector<std::int64_t>{5, 7, 8, 9, 10, 1});
  CHECK(t.positions_of("PURPLE") == std::vector<std::int64_t>{1, 2});
  CHECK(t.positions_of("circle,") == std::vector<std::int64_t>{3, 4});
  CHECK(t.positions_of("square").empty());
}

TEST_CASE("prompt edit: the model tokenizer's pieces give the prompt's words", "[edit]") {
  const WanTokenizer tokenizer = WanTokenizer::from_file(fixture("tokenizer/tiny_unigram.model"));
  const PromptTokens t = tokenize_prompt(tokenizer, "a  red circle moving redcirclemoving");
  REQUIRE(t.words.size() == 5);
  CHECK(t.words[0].key == "a");
  CHECK(t.words[2].key == "circle");
  CHECK(t.words[4].key == "redcirclemoving");
  CHECK(t.words[4].count > 1);  // a word the vocabulary lacks is split into several pieces
  std::int64_t pieces = 0;
  for (const auto& w : t.words) pieces += w.count;
  CHECK(pieces + 1 == static_cast<std::int64_t>(t.ids.size()));  // + </s>
  CHECK(t.ids.back() == tokenizer.eos_id());
  // The ids equal the text encoder's (its first length tokens).
  const TokenizedPrompt encoded = tokenizer.encode("a  red circle moving redcirclemoving");
  REQUIRE(encoded.length == static_cast<std::int64_t>(t.ids.size()));
  for (std::size_t i = 0; i < t.ids.size(); ++i) CHECK(encoded.ids[0][static_cast<std::int64_t>(i)].item<std::int64_t>() == t.ids[i]);
}

TEST_CASE("prompt edit: refine aligns a cat to a big cat as computed by hand", "[edit]") {
  // source: a cat </s>; target: a big cat </s>
  const PromptTokens source = one_token_words({5, 7}, {"a", "cat"});
  const PromptTokens target = one_token_words({5, 9, 7}, {"a", "big", "cat"});
  CHECK(align_token_ids(source.ids, target.ids) == std::vector<std::int64_t>{0, -1, 1, 2});
  const TokenAlignment a = align_prompts(source, target, 6);
  CHECK(a.kind == EditKind::Refine);
  at::Tensor mapper = at::zeros({6, 6});
  for (auto [s, t] : std::vector<std::pair<int, int>>{{0, 0}, {1, 2}, {2, 3}, {3, 4}, {4, 5}}) mapper[s][t] = 1.0;
  CHECK(bitwise_equal(a.mapper, mapper));
  CHECK(bitwise_equal(a.alpha, at::tensor({1.f, 0.f, 1.f, 1.f, 1.f, 1.f})));
}

TEST_CASE("prompt edit: token alignment aligns only equal tokens, in order", "[edit]") {
  // Mismatches are never aligned (a gap pair scores 0 > -1).
  CHECK(align_token_ids({1, 2, 3}, {1, 4, 3}) == std::vector<std::int64_t>{0, -1, 2});
  const auto m = align_token_ids({3, 2, 2, 4, 1}, {3, 2, 5, 2, 4, 6, 1});
  CHECK(m == std::vector<std::int64_t>{0, 1, -1, 2, 3, -1, 4});
  CHECK(align_token_ids({}, {1, 2}) == std::vector<std::int64_t>{-1, -1});
}

TEST_CASE("prompt edit: a swap maps a changed word split into pieces by 1/n_t and keeps later offsets", "[edit]") {
  // a red circle </s> -> a pur|ple circle </s>
  const PromptTokens source = one_token_words({5, 20, 30}, {"a", "red", "circle"});
  const PromptTokens target = prompt_tokens_from_pieces({5, 21, 22, 30}, {kMark + "a", kMark + "pur", "ple", kMark + "circle"}, 1);
  const TokenAlignment a = align_prompts(source, target, 8);
  CHECK(a.kind == EditKind::Swap);
  REQUIRE(a.changed.size() == 1);
  CHECK(a.changed[0] == std::make_pair(std::string("red"), std::string("purple")));
  at::Tensor mapper = at::zeros({8, 8});
  mapper[0][0] = 1.0;
  mapper[1][1] = 0.5;
  mapper[1][2] = 0.5;
  mapper[2][3] = 1.0;  // circle keeps its own offset after the longer word
  mapper[3][4] = 1.0;  // </s>
  mapper[4][5] = 1.0;  // pads in order
  mapper[5][6] = 1.0;
  mapper[6][7] = 1.0;
  CHECK(bitwise_equal(a.mapper, mapper));
  CHECK(a.alpha.eq(1).all().item<bool>());
  // The other way: the source word has two pieces, the target one: each source piece gives 1.
  const TokenAlignment back = align_prompts(target, source, 8);
  CHECK(back.kind == EditKind::Swap);
  CHECK(back.mapper[1][1].item<float>() == 1.0f);
  CHECK(back.mapper[2][1].item<float>() == 1.0f);
  CHECK(back.mapper[3][2].item<float>() == 1.0f);
  CHECK(back.mapper[4][3].item<float>() == 1.0f);
  // The last target pad has no source slot left: its own map (alpha 0).
  CHECK(back.alpha[7].item<float>() == 0.0f);
  CHECK(back.alpha.narrow(0, 0, 7).eq(1).all().item<bool>());
  // Equal prompts: identity.
  const TokenAlignment same = align_prompts(source, source, 8);
  CHECK(same.kind == EditKind::Identity);
  CHECK(bitwise_equal(same.mapper, at::eye(8)));
}

TEST_CASE("prompt edit: the plan reweights a word's pieces and refuses words not in the prompts", "[edit]") {
  const PromptTokens source = one_token_words({5, 20, 30}, {"a", "red", "circle"});
  const PromptTokens target = prompt_tokens_from_pieces({5, 21, 22, 30}, {kMark + "a", kMark + "pur", "ple", kMark + "circle"}, 1);
  EditControls c;
  c.reweight = {{"purple", 2.5}};
  c.blend = {"red", "purple"};
  const EditPlan plan = plan_edit(source, target, c, 8);
  CHECK(bitwise_equal(plan.reweight, at::tensor({1.f, 2.5f, 2.5f, 1.f, 1.f, 1.f, 1.f, 1.f})));
  CHECK(plan.blend_source == std::vector<std::int64_t>{1});
  CHECK(plan.blend_target == std::vector<std::int64_t>{1, 2});

  EditControls bad = c;
  bad.reweight = {{"red", 2.0}};  // only in the source
  CHECK_THROWS_WITH(plan_edit(source, target, bad, 8), Catch::Contains("no word 'red' in the target prompt"));
  bad = c;
  bad.blend = {"square"};
  CHECK_THROWS_AS(plan_edit(source, target, bad, 8), InputError);
  bad = c;
  bad.cross_replace = 1.5;
  CHECK_THROWS_WITH(plan_edit(source, target, bad, 8), Catch::Contains("--cross-replace"));
  // A word cut off by the model's text length.
  bad = c;
  bad.blend = {};
  bad.reweight = {{"circle", 2.0}};
  CHECK_THROWS_WITH(plan_edit(source, target, bad, 3), Catch::Contains("past the model's 3 text tokens"));
}

// ------------------------------------------------------------------------------ the edit run

TEST_CASE("prompt edit: identical prompts give the source bitwise, with every control on", "[edit][tiny]") {
  c10::InferenceMode guard;
  TinySetup s;
  const WanTextCondition cond = s.dit->encode_text(s.context), uncond = s.dit->encode_text(s.context_negative);
  const PromptTokens tokens = one_token_words({5, 20, 30, 40}, {"a", "red", "circle", "moving"});
  EditControls c;
  c.cross_replace = 0.6;
  c.self_replace = 0.4;
  c.blend = {"red"};
  const EditPlan plan = plan_edit(tokens, tokens, c, s.dit->config.text_len);
  for (double guidance : {1.0, 3.0}) {
    SamplerStepper stepper(euler(5));
    EditRunOptions options;
    options.guidance = guidance;
    const at::Tensor x = sample_edit(*s.dit, cond, cond, uncond, plan, stepper, s.noise, options);
    REQUIRE(x.size(0) == 2);
    CHECK(bitwise_equal(x.select(0, 0), x.select(0, 1)));
    CHECK(at::isfinite(x).all().item<bool>());
  }
}

TEST_CASE("prompt edit: reweight 1 changes nothing, and another factor does", "[edit][tiny]") {
  c10::InferenceMode guard;
  TinySetup s;
  const WanTextCondition cond = s.dit->encode_text(s.context);
  const WanTextCondition target = s.dit->encode_text(s.swapped_context(1, 2));
  const PromptTokens src = one_token_words({5, 20, 30, 40}, {"a", "red", "circle", "moving"});
  const PromptTokens tgt = one_token_words({5, 21, 30, 40}, {"a", "blue", "circle", "moving"});
  const auto run = [&](std::vector<std::pair<std::string, double>> reweight) {
    EditControls c;
    c.cross_replace = 0.6;
    c.reweight = std::move(reweight);
    const EditPlan plan = plan_edit(src, tgt, c, s.dit->config.text_len);
    SamplerStepper stepper(euler(4));
    return sample_edit(*s.dit, cond, target, WanTextCondition{}, plan, stepper, s.noise, EditRunOptions{});
  };
  const at::Tensor plain = run({});
  CHECK(bitwise_equal(plain, run({{"blue", 1.0}})));
  const at::Tensor heavier = run({{"blue", 4.0}});
  CHECK(bitwise_equal(plain.select(0, 0), heavier.select(0, 0)));  // the source row is never edited
  CHECK((plain.select(0, 1) - heavier.select(0, 1)).abs().max().item<double>() > 1e-4);
}

TEST_CASE("prompt edit: a swap with cross-replace 1 uses the source's maps on every step", "[edit][tiny]") {
  c10::InferenceMode guard;
  TinySetup s;
  const WanTextCondition cond = s.dit->encode_text(s.context), uncond = s.dit->encode_text(s.context_negative);
  const WanTextCondition target = s.dit->encode_text(s.swapped_context(1, 2));
  // A source whose changed word has two pieces: the mapper is not a permutation, and the last
  // target pad has no source slot left (alpha 0: its own map), so both terms are checked.
  const PromptTokens src = prompt_tokens_from_pieces({5, 21, 22, 30}, {kMark + "a", kMark + "pur", "ple", kMark + "circle"}, 1);
  const PromptTokens tgt = one_token_words({5, 20, 30}, {"a", "red", "circle"});
  EditControls c;
  c.cross_replace = 1.0;
  c.self_replace = 0.5;
  const std::int64_t L = s.dit->config.text_len;
  const EditPlan plan = plan_edit(src, tgt, c, L);
  REQUIRE(plan.alignment.kind == EditKind::Swap);
  CHECK(plan.alignment.alpha[L - 1].item<float>() == 0.0f);
  CHECK(plan.alignment.mapper[1][1].item<float>() == 1.0f);  // both pieces of "purple" give "red" all their map
  CHECK(plan.alignment.mapper[2][1].item<float>() == 1.0f);
  auto check = std::make_shared<SourceMapCheck>();
  check->mapper = plan.alignment.mapper;
  check->alpha = plan.alignment.alpha;
  EditPlan checked = plan;
  const int steps = 4;
  for (double guidance : {1.0, 2.5}) {
    check->steps_checked.clear();
    check->calls = 0;
    check->max_error = 0;
    SamplerStepper stepper(euler(steps));
    EditRunOptions options;
    options.guidance = guidance;
    options.observer = check;
    sample_edit(*s.dit, cond, target, uncond, checked, stepper, s.noise, options);
    CHECK(check->steps_checked.size() == static_cast<std::size_t>(steps));
    CHECK(check->calls == steps * s.dit->config.num_layers);
    CHECK(check->max_error < 1e-5);
  }
  // With cross-replace 0 the target's own maps are used: the check fails.
  checked.controls.cross_replace = 0.0;
  check->max_error = 0;
  SamplerStepper stepper(euler(steps));
  EditRunOptions options;
  options.observer = check;
  sample_edit(*s.dit, cond, target, uncond, checked, stepper, s.noise, options);
  CHECK(check->max_error > 1e-3);
}

// ------------------------------------------------------------------------------ inversion

TEST_CASE("prompt edit: Euler inversion then Euler sampling is exact for a constant velocity", "[edit]") {
  struct Constant : Denoiser {
    at::Tensor v;
    at::Tensor velocity(const at::Tensor&, const StepInfo&) override { return v; }
  } model;
  model.v = at::randn({1, 4, 2, 4, 4});
  const at::Tensor clean = at::randn({1, 4, 2, 4, 4});
  auto sampler = euler(6);
  for (InversionMethod method : {InversionMethod::Euler, InversionMethod::FixedPoint}) {
    const at::Tensor noise = invert_latent(model, *sampler, clean, method, 2);
    SamplerStepper stepper(euler(6));
    const at::Tensor back = run_flow(noise, stepper, model);
    CHECK((back - clean).abs().max().item<double>() < 1e-5);  // f32 rounding of the steps only
  }
}

TEST_CASE("prompt edit: inversion then sampling reproduces a sampled latent, closer with fixed-point iterations", "[edit][tiny]") {
  c10::InferenceMode guard;
  TinySetup s;
  DiTDenoiser::Options denoiser_options;
  DiTDenoiser denoiser(*s.dit, Guidance{}, denoiser_options);
  denoiser.set_condition(RowRole::Cond, s.dit->encode_text(s.context));
  const int steps = 10;
  SamplerStepper sample(euler(steps));
  const at::Tensor x0 = run_flow(s.noise, sample, denoiser);
  const auto reconstruction_error = [&](InversionMethod method, int iterations) {
    auto grid = euler(steps);
    const at::Tensor z = invert_latent(denoiser, *grid, x0, method, iterations);
    SamplerStepper back(euler(steps));
    const at::Tensor x = run_flow(z, back, denoiser);
    return (x - x0).abs().max().item<double>() / x0.abs().max().item<double>();
  };
  const double euler_error = reconstruction_error(InversionMethod::Euler, 0);
  const double fixed_error = reconstruction_error(InversionMethod::FixedPoint, 5);
  WARN("relative max error: euler " << euler_error << ", fixed-point x5 " << fixed_error);
  CHECK(euler_error < 0.2);
  CHECK(fixed_error < 1e-3);
  CHECK(fixed_error < euler_error / 10);
}
