// Perturbed-attention guidance (PAG, SoftPAG on heads), skip-layer guidance and CFG-Zero*: the
// terms against their formulas, and the perturbed pass on the wan-tiny DiT (2 layers x 2 heads).
#include <catch2/catch.hpp>

#include "test_helpers.h"
#include "tiny_models.h"
#include "vdit/attention/processors.h"
#include "vdit/common.h"
#include "vdit/io/safetensors.h"
#include "vdit/pipelines/guidance.h"
#include "vdit/pipelines/head_search.h"
#include "vdit/pipelines/perturbed_guidance.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <unistd.h>

using namespace vdit;
using vdit_test::bitwise_equal;

namespace {

using vdit_test::fixture;

struct TinyCase {
  WanDiT dit = vdit_test::load_tiny_dit();
  std::shared_ptr<SafetensorsFile> file = SafetensorsFile::open(fixture("wan-tiny/e2e/case_generate.safetensors"));
  WanTextCondition cond = dit->encode_text(file->tensor("context_positive"));
  WanTextCondition uncond = dit->encode_text(file->tensor("context_negative"));
  at::Tensor x = file->tensor("noise").unsqueeze(0).narrow(2, 0, 2);
  at::Tensor t = at::full({1}, 700.0);
  StepInfo step;
  TinyCase() {
    step.index = 3;
    step.count = 10;
    step.sigma = 0.7;
    step.timestep = 700;
  }
  // One plain forward of `roles` rows (x repeated), with `processors` and skipped blocks.
  at::Tensor forward(const std::vector<RowRole>& roles, const AttentionProcessors* processors = nullptr,
                     std::map<RowRole, std::set<int>> skip = {}) {
    DiTCall call;
    call.processors = processors;
    call.row_roles = roles;
    call.step = &step;
    call.skip_blocks = std::move(skip);
    const auto rows = static_cast<std::int64_t>(roles.size());
    std::vector<WanTextCondition> texts;
    for (RowRole r : roles) texts.push_back(r == RowRole::Uncond ? uncond : cond);
    std::vector<at::Tensor> xs(static_cast<std::size_t>(rows), x);
    return dit->forward(at::cat(xs), t.expand({rows}), WanTextCondition::cat(texts), call);
  }
};

// Records q, k, v and the output of the processor after it (the rest of a chain).
struct Recorder : AttentionProcessor {
  int layer;
  at::Tensor q, k, v, out;
  AttentionCall call;
  explicit Recorder(int l) : layer(l) {}
  at::Tensor process(const AttentionSite& site, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                     const AttentionCall& call_, const AttentionFn& inner) override {
    at::Tensor o = inner(site, q_, k_, v_, call_);
    if (site.layer == layer && site.kind == AttentionKind::Self) {
      q = q_.clone();
      k = k_.clone();
      v = v_.clone();
      out = o.clone();
      call = call_;
    }
    return o;
  }
};

}  // namespace

TEST_CASE("PAG, SLG and CFG-Zero* terms: passes and formulas", "[pag]") {
  StepInfo step;
  step.index = 1;  // 0.1 of the run: inside SLG's default range [0.01, 0.2)
  step.count = 10;
  const at::Tensor c = at::randn({1, 4, 1, 2, 2}), u = at::randn({1, 4, 1, 2, 2}), p = at::randn({1, 4, 1, 2, 2}),
                   sk = at::randn({1, 4, 1, 2, 2});
  const PassOutputs out{{RowRole::Cond, c}, {RowRole::Uncond, u}, {RowRole::Perturbed, p}, {RowRole::SkipLayer, sk}};

  Guidance with_cfg;
  with_cfg.add(std::make_shared<ClassifierFreeGuidance>(5.0)).add(std::make_shared<PerturbedAttentionGuidance>(2.0));
  CHECK(with_cfg.passes(step) == std::vector<RowRole>{RowRole::Cond, RowRole::Uncond, RowRole::Perturbed});
  CHECK(at::allclose(with_cfg.combine(out, step), u + 5.0 * (c - u) + 2.0 * (c - p), 1e-6, 1e-6));

  Guidance alone;
  alone.add(std::make_shared<PerturbedAttentionGuidance>(3.0));
  CHECK(alone.passes(step) == std::vector<RowRole>{RowRole::Cond, RowRole::Perturbed});
  CHECK(at::allclose(alone.combine(out, step), c + 3.0 * (c - p), 1e-6, 1e-6));

  // Outside its step range the term asks for no perturbed pass and leaves the output bitwise.
  Guidance late;
  late.add(std::make_shared<ClassifierFreeGuidance>(5.0))
      .add(std::make_shared<PerturbedAttentionGuidance>(2.0, StepRange{0.5, 1.0}));
  CHECK(late.passes(step) == std::vector<RowRole>{RowRole::Cond, RowRole::Uncond});
  CHECK(bitwise_equal(late.combine({{RowRole::Cond, c}, {RowRole::Uncond, u}}, step), u + 5.0 * (c - u)));
  StepInfo later = step;
  later.index = 5;  // 5 / 10 = 0.5: in [0.5, 1)
  CHECK(late.passes(later) == std::vector<RowRole>{RowRole::Cond, RowRole::Uncond, RowRole::Perturbed});

  // SLG: the same formula on its own pass; default range [0.01, 0.2).
  Guidance slg;
  slg.add(std::make_shared<ClassifierFreeGuidance>(5.0)).add(std::make_shared<SkipLayerGuidance>(3.0));
  CHECK(slg.passes(step) == std::vector<RowRole>{RowRole::Cond, RowRole::Uncond, RowRole::SkipLayer});
  CHECK(at::allclose(slg.combine(out, step), u + 5.0 * (c - u) + 3.0 * (c - sk), 1e-6, 1e-6));
  StepInfo first = step;
  first.index = 0;
  CHECK(slg.passes(first) == std::vector<RowRole>{RowRole::Cond, RowRole::Uncond});

  // PAG and SLG together: two extra passes, both terms added.
  Guidance both;
  both.add(std::make_shared<ClassifierFreeGuidance>(5.0))
      .add(std::make_shared<PerturbedAttentionGuidance>(2.0))
      .add(std::make_shared<SkipLayerGuidance>(3.0));
  CHECK(both.passes(step) == std::vector<RowRole>{RowRole::Cond, RowRole::Uncond, RowRole::Perturbed, RowRole::SkipLayer});
  CHECK(at::allclose(both.combine(out, step), u + 5.0 * (c - u) + 2.0 * (c - p) + 3.0 * (c - sk), 1e-6, 1e-6));
}

TEST_CASE("CFG-Zero*: optimised scale per row and zero-init steps", "[pag]") {
  const at::Tensor c = at::randn({2, 4, 1, 3, 3}, at::kDouble).to(at::kFloat);
  const at::Tensor u = at::randn({2, 4, 1, 3, 3}, at::kDouble).to(at::kFloat);
  const PassOutputs out{{RowRole::Cond, c}, {RowRole::Uncond, u}};
  CFGZeroStar term(4.0, 2);
  StepInfo step;
  step.count = 50;
  for (int index : {0, 1}) {
    step.index = index;
    CHECK(bitwise_equal(term.apply(c, out, step), at::zeros_like(c)));
  }
  step.index = 2;
  const at::Tensor v = term.apply(c, out, step);
  for (std::int64_t r = 0; r < 2; ++r) {
    // By hand in double: s* = <c, u> / |u|^2; v = s* u + w (c - s* u).
    const at::Tensor cr = c[r].to(at::kDouble), ur = u[r].to(at::kDouble);
    const double st = (cr * ur).sum().item<double>() / ((ur * ur).sum().item<double>() + 1e-8);
    const at::Tensor expect = st * ur + 4.0 * (cr - st * ur);
    CHECK(at::allclose(v[r].to(at::kDouble), expect, 1e-5, 1e-5));
  }
  // When cond is a multiple of uncond, s* is that multiple and the guided output is cond.
  const PassOutputs parallel{{RowRole::Cond, 0.5 * u}, {RowRole::Uncond, u}};
  CHECK(at::allclose(term.apply(c, parallel, step), 0.5 * u, 1e-5, 1e-5));
  CHECK(CFGZeroStar::default_zero_init_steps(50) == 2);
  CHECK(CFGZeroStar::default_zero_init_steps(30) == 2);
  CHECK(CFGZeroStar::default_zero_init_steps(25) == 1);
  CHECK(CFGZeroStar::default_zero_init_steps(10) == 1);
}

TEST_CASE("PAG on the wan-tiny DiT: u = 0 is no perturbation, bitwise", "[pag]") {
  c10::InferenceMode guard;
  TinyCase tc;
  AttentionProcessors processors;
  add_head_perturbation(processors, {{0, {0, 1}}, {1, {0, 1}}}, 0.0);
  const at::Tensor plain = tc.forward({RowRole::Cond});
  CHECK(bitwise_equal(tc.forward({RowRole::Perturbed}, &processors), plain));
  // u = 1 on the same heads does change the perturbed row, and only it.
  AttentionProcessors full;
  add_head_perturbation(full, {{0, {0, 1}}, {1, {0, 1}}}, 1.0);
  CHECK_FALSE(at::allclose(tc.forward({RowRole::Perturbed}, &full), plain, 1e-3, 1e-3));
  CHECK(bitwise_equal(tc.forward({RowRole::Cond}, &full), plain));
}

TEST_CASE("PAG on the wan-tiny DiT: u = 1 on a head gives that head's V through the output projection", "[pag]") {
  c10::InferenceMode guard;
  TinyCase tc;
  for (int layer : {0, 1}) {
    for (int head : {0, 1}) {
      // The recorder sits outside the perturbation: it sees the perturbed attention output.
      auto recorder = std::make_shared<Recorder>(layer);
      auto chain = std::make_shared<ProcessorChain>();
      chain->add(recorder).add(make_head_perturbation({{layer, {head}}}, 1.0));
      AttentionProcessors processors;
      processors.set(AttentionKind::Self, chain);
      tc.forward({RowRole::Cond, RowRole::Perturbed}, &processors);
      REQUIRE(recorder->out.defined());
      const at::Tensor plain = attention(recorder->q, recorder->k, recorder->v, recorder->call);
      const int other = 1 - head;
      // The perturbed row: head `head` returns its V exactly, the other head is untouched.
      CHECK(bitwise_equal(recorder->out[1][head], recorder->v[1][head]));
      CHECK(bitwise_equal(recorder->out[1][other], plain[1][other]));
      // The cond row is untouched.
      CHECK(bitwise_equal(recorder->out[0], plain[0]));
    }
  }
  // Every head of a layer at u = 1: the self-attention output is o(v(x)), the identity map.
  auto& block = *tc.dit->blocks->ptr<wan::BlockImpl>(1);
  const std::int64_t N = 1 * 4 * 4;
  const at::Tensor h = at::randn({1, N, 64});
  DiTCall call;
  AttentionProcessors all;
  add_head_perturbation(all, {{1, {0, 1}}}, 1.0);
  call.processors = &all;
  call.row_roles = {RowRole::Perturbed};
  wan::BlockContext ctx;
  ctx.grid = Grid3{1, 4, 4};
  const auto rope = wan_rope_for_grid(32, ctx.grid);
  ctx.rope_cos = rope.first.view({1, N, 1, 16});
  ctx.rope_sin = rope.second.view({1, N, 1, 16});
  ctx.call = &call;
  ctx.self_attn_scale = 1.0 / std::sqrt(32.0);
  const at::Tensor perturbed = block.self_attn->self_attention(h, 1, ctx);
  const at::Tensor identity = block.self_attn->o->forward(block.self_attn->v->forward(h));
  CHECK(at::allclose(perturbed, identity, 1e-5, 1e-5));
}

TEST_CASE("PAG on the wan-tiny DiT: an empty head set equals CFG alone, the formula by hand", "[pag]") {
  c10::InferenceMode guard;
  TinyCase tc;
  const auto velocity = [&](const Guidance& guidance, const AttentionProcessors* processors, bool batch) {
    DiTDenoiser::Options options;
    options.batch_passes = batch;
    options.processors = processors;
    DiTDenoiser d(*tc.dit, guidance, options);
    d.set_condition(RowRole::Cond, tc.cond);
    d.set_condition(RowRole::Uncond, tc.uncond);
    d.set_condition(RowRole::Perturbed, tc.cond);
    return d.velocity(tc.x, tc.step);
  };
  Guidance cfg;
  cfg.add(std::make_shared<ClassifierFreeGuidance>(5.0));
  Guidance cfg_pag = cfg;
  cfg_pag.add(std::make_shared<PerturbedAttentionGuidance>(2.0));

  // Empty head set: the perturbed pass is the cond pass, so the term adds exactly zero.
  AttentionProcessors none;
  add_head_perturbation(none, {}, 1.0);
  CHECK(bitwise_equal(velocity(cfg_pag, &none, false), velocity(cfg, nullptr, false)));
  CHECK(at::allclose(velocity(cfg_pag, &none, true), velocity(cfg, nullptr, true), 1e-5, 1e-5));

  // Heads (0, 1) and (1, 0) at u = 0.5: v = v_u + w (v_c - v_u) + s (v_c - v_p) from three plain forwards.
  AttentionProcessors soft;
  add_head_perturbation(soft, {{0, {1}}, {1, {0}}}, 0.5);
  const at::Tensor oc = tc.forward({RowRole::Cond}), ou = tc.forward({RowRole::Uncond});
  const at::Tensor op = tc.forward({RowRole::Perturbed}, &soft);
  CHECK_FALSE(at::allclose(op, oc, 1e-4, 1e-4));
  const at::Tensor by_hand = ou + 5.0 * (oc - ou) + 2.0 * (oc - op);
  CHECK(at::allclose(velocity(cfg_pag, &soft, true), by_hand, 1e-5, 1e-5));
  CHECK(bitwise_equal(velocity(cfg_pag, &soft, false), by_hand));
  // Without CFG: v_c + s (v_c - v_p).
  Guidance pag_only;
  pag_only.add(std::make_shared<PerturbedAttentionGuidance>(2.0));
  CHECK(at::allclose(velocity(pag_only, &soft, true), oc + 2.0 * (oc - op), 1e-5, 1e-5));
}

TEST_CASE("PAG heads are indexed per (layer, global head)", "[pag]") {
  c10::InferenceMode guard;
  TinyCase tc;
  // Each (layer, head) perturbs a different output; the same head index on another layer differs.
  std::vector<at::Tensor> outs;
  for (int layer : {0, 1})
    for (int head : {0, 1}) {
      AttentionProcessors p;
      add_head_perturbation(p, {{layer, {head}}}, 1.0);
      outs.push_back(tc.forward({RowRole::Perturbed}, &p));
    }
  for (std::size_t a = 0; a < outs.size(); ++a)
    for (std::size_t b = a + 1; b < outs.size(); ++b) CHECK_FALSE(at::allclose(outs[a], outs[b], 1e-4, 1e-4));
  // A layer-1 head leaves layer 0's output as it was: compare the captured block outputs.
  AttentionProcessors p;
  add_head_perturbation(p, {{1, {1}}}, 1.0);
  std::map<std::string, at::Tensor> plain_capture, pert_capture;
  DiTCall call;
  call.row_roles = {RowRole::Perturbed};
  call.capture = &plain_capture;
  tc.dit->forward(tc.x, tc.t, tc.cond, call);
  call.processors = &p;
  call.capture = &pert_capture;
  tc.dit->forward(tc.x, tc.t, tc.cond, call);
  CHECK(bitwise_equal(plain_capture.at("block0_out"), pert_capture.at("block0_out")));
  CHECK_FALSE(bitwise_equal(plain_capture.at("block1_out"), pert_capture.at("block1_out")));
  // A processor holding a slice of the heads (head_offset 1) maps global head 1 to its local head 0.
  auto hp = make_head_perturbation({{1, {1}}}, 1.0);
  const at::Tensor q = at::randn({1, 1, 16, 32}), k = at::randn({1, 1, 16, 32}), v = at::randn({1, 1, 16, 32});
  AttentionSite site;
  site.layer = 1;
  site.head_offset = 1;
  const std::vector<RowRole> rows{RowRole::Perturbed};
  site.rows = &rows;
  CHECK(bitwise_equal(hp->attend(site, q, k, v, AttentionCall{}), v));
  // Global head 0 is not in that slice: the call passes through.
  CHECK(bitwise_equal(make_head_perturbation({{1, {0}}}, 1.0)->attend(site, q, k, v, AttentionCall{}),
                      attention(q, k, v, AttentionCall{})));
}

TEST_CASE("skip-layer guidance: rows of the skipping role bypass the chosen blocks", "[pag]") {
  c10::InferenceMode guard;
  TinyCase tc;
  std::map<std::string, at::Tensor> cap;
  DiTCall call;
  call.row_roles = {RowRole::Cond, RowRole::SkipLayer};
  call.skip_blocks[RowRole::SkipLayer] = {1};
  call.capture = &cap;
  const at::Tensor out = tc.dit->forward(at::cat({tc.x, tc.x}), tc.t.expand({2}), WanTextCondition::cat({tc.cond, tc.cond}), call);
  // Row 1 leaves block 1 with what it came in with; row 0 runs it.
  CHECK(bitwise_equal(cap.at("block1_out")[1], cap.at("block0_out")[1]));
  CHECK_FALSE(bitwise_equal(cap.at("block1_out")[0], cap.at("block0_out")[0]));
  const at::Tensor plain = tc.forward({RowRole::Cond});
  CHECK(at::allclose(out[0], plain[0], 1e-5, 1e-5));
  // Alone, the skipping row equals a single-row forward that skips the block (every row skips).
  const at::Tensor alone = tc.forward({RowRole::SkipLayer}, nullptr, {{RowRole::SkipLayer, {1}}});
  CHECK(at::allclose(out[1], alone[0], 1e-5, 1e-5));
  // The denoiser: CFG + SLG equals the formula from plain forwards.
  Guidance guidance;
  guidance.add(std::make_shared<ClassifierFreeGuidance>(5.0)).add(std::make_shared<SkipLayerGuidance>(3.0, StepRange{0, 1}));
  DiTDenoiser::Options options;
  options.call.skip_blocks[RowRole::SkipLayer] = {1};
  DiTDenoiser d(*tc.dit, guidance, options);
  d.set_condition(RowRole::Cond, tc.cond);
  d.set_condition(RowRole::Uncond, tc.uncond);
  d.set_condition(RowRole::SkipLayer, tc.cond);
  const at::Tensor oc = tc.forward({RowRole::Cond}), ou = tc.forward({RowRole::Uncond});
  CHECK(at::allclose(d.velocity(tc.x, tc.step), ou + 5.0 * (oc - ou) + 3.0 * (oc - alone), 1e-5, 1e-5));
  // Out of range, or unlabelled rows, are errors.
  DiTCall bad;
  bad.row_roles = {RowRole::SkipLayer};
  bad.skip_blocks[RowRole::SkipLayer] = {2};
  CHECK_THROWS_AS(tc.dit->forward(tc.x, tc.t, tc.cond, bad), InputError);
  bad.row_roles.clear();
  bad.skip_blocks[RowRole::SkipLayer] = {0};
  CHECK_THROWS_AS(tc.dit->forward(tc.x, tc.t, tc.cond, bad), InputError);
}

TEST_CASE("head sets: spec text, JSON files, range checks", "[pag]") {
  const HeadSet heads = parse_head_spec("3:2,0; 5:1");
  CHECK(heads == HeadSet{{3, {0, 2}}, {5, {1}}});
  CHECK(head_set_text(heads) == "3:0,2;5:1");
  CHECK(head_count(heads) == 3);
  CHECK(parse_head_spec("1:*", 4) == HeadSet{{1, {0, 1, 2, 3}}});
  for (const char* bad : {"", "3", "3:", "x:1", "3:-1", "3:1,,2", "3:a"}) CHECK_THROWS_AS(parse_head_spec(bad), InputError);
  CHECK_NOTHROW(check_head_set(heads, 6, 3, "--pag-heads"));
  CHECK_THROWS_AS(check_head_set(heads, 5, 3, "--pag-heads"), InputError);  // layer 5 of 0..4
  CHECK_THROWS_AS(check_head_set(heads, 6, 2, "--pag-heads"), InputError);  // head 2 of 0..1
  CHECK(layer_heads({2}, 3) == HeadSet{{2, {0, 1, 2}}});

  const auto dir = std::filesystem::temp_directory_path() / ("vdit-pag-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string good = (dir / "heads.json").string(), broken = (dir / "broken.json").string();
  std::ofstream(good) << R"({"heads": {"3": [0, 2]}, "soft_pag": 0.5, "pag_scale": 2, "ranking": []})";
  std::ofstream(broken) << R"({"heads": {"3": [0, 2]})";
  const HeadSetFile file = read_head_set_file(good);
  CHECK(file.heads == HeadSet{{3, {0, 2}}});
  CHECK(file.soft_pag == 0.5);
  CHECK(file.pag_scale == 2.0);
  CHECK_THROWS_AS(read_head_set_file(broken), InputError);
  CHECK_THROWS_AS(read_head_set_file((dir / "missing.json").string()), InputError);
  CHECK(head_set_json(heads).dump() == R"({"3":[0,2],"5":[1]})");
  std::filesystem::remove_all(dir);

  T2VSettings s;
  s.soft_pag = 1.5;
  CHECK_THROWS_AS(check_guidance_terms(s), InputError);
  s.soft_pag = 0.5;
  s.pag_start = 0.6;
  s.pag_end = 0.4;
  CHECK_THROWS_AS(check_guidance_terms(s), InputError);
  s.pag_start = 0.0;
  s.pag_end = 1.0;
  s.guidance = 1.0;
  s.cfg_zero_star = true;
  CHECK_THROWS_AS(check_guidance_terms(s), InputError);
  s.guidance = 5.0;
  CHECK_NOTHROW(check_guidance_terms(s));
  s.pag_scale = 2.0;
  s.pag_layers = {1};
  CHECK(pag_enabled(s));
  CHECK(pag_head_set(s, 2) == HeadSet{{1, {0, 1}}});
  WanDiTConfig config = WanDiTConfig::from_file(fixture("wan-tiny/e2e/dit_config.json"));
  CHECK_NOTHROW(check_guidance_terms(s, config));
  s.pag_layers = {2};
  CHECK_THROWS_AS(check_guidance_terms(s, config), InputError);
  s.pag_layers.clear();
  s.pag_heads = {{1, {2}}};
  CHECK_THROWS_AS(check_guidance_terms(s, config), InputError);
  s.pag_heads.clear();
  s.slg_layers = {2};
  CHECK_THROWS_AS(check_guidance_terms(s, config), InputError);
}

namespace {
// A synthetic objective: each head has a value, a set scores the sum, (1, 2) is worth the most,
// and (0, 3) + (2, 0) together earn a bonus (a pair that only helps as a pair).
double synthetic(const HeadSet& heads) {
  double sum = 0;
  bool a = false, b = false;
  for (const auto& [layer, list] : heads)
    for (int h : list) {
      sum += (layer == 1 && h == 2) ? 1.0 : 0.01 * (layer * 4 + h) / 12.0;
      a = a || (layer == 0 && h == 3);
      b = b || (layer == 2 && h == 0);
    }
  return sum + (a && b ? 0.5 : 0.0);
}
}  // namespace

TEST_CASE("head search finds a rewarded head first, a resumed search gives the same ranking", "[pag]") {
  HeadSearchConfig config;
  config.num_layers = 3;
  config.num_heads = 4;
  config.top_k = 2;
  config.rounds = 3;
  config.fingerprint = {{"test", 1}};
  CHECK(head_search_total(config) == 12 + 10 + 8);
  int calls = 0;
  const HeadSearchState full = head_search(config, [&](const HeadSet& s) { ++calls; return synthetic(s); });
  CHECK(calls == 1 + 30);  // the baseline and every scored head
  const auto round0 = round_ranking(full, 0);
  REQUIRE(round0.size() == 12);
  CHECK(round0[0].layer == 1);
  CHECK(round0[0].head == 2);
  CHECK(round_ranking(full, 1).size() == 10);
  CHECK(full.round == 3);
  CHECK(head_count(full.chosen) == 6);
  CHECK(*full.baseline == 0.0);

  // Interrupted after every possible number of scored heads, saved, reloaded through JSON, resumed.
  for (int stop : {1, 5, 12, 13, 29}) {
    nlohmann::json saved;
    int n = 0;
    const auto save = [&](const HeadSearchState& s) { saved = s.to_json(config); };
    CHECK_THROWS_AS(head_search(config,
                                [&](const HeadSet& s) {
                                  if (n++ == stop) throw std::runtime_error("interrupted");
                                  return synthetic(s);
                                },
                                {}, save),
                    std::runtime_error);
    const HeadSearchState loaded = HeadSearchState::from_json(saved, config, "state");
    const HeadSearchState resumed = head_search(config, synthetic, loaded);
    CHECK(resumed.chosen == full.chosen);
    for (int r = 0; r < 3; ++r) {
      const auto a = round_ranking(full, r), b = round_ranking(resumed, r);
      REQUIRE(a.size() == b.size());
      for (std::size_t i = 0; i < a.size(); ++i) {
        CHECK(a[i].layer == b[i].layer);
        CHECK(a[i].head == b[i].head);
        CHECK(a[i].score == b[i].score);
      }
    }
  }
  // A state of another search is refused.
  HeadSearchConfig other = config;
  other.top_k = 3;
  CHECK_THROWS_AS(HeadSearchState::from_json(full.to_json(config), other, "state"), InputError);
}
