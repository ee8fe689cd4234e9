// Wan2.1 t2v DiT against the reference's golden tensors (tests/fixtures/wan-tiny/dit).
#include <catch2/catch.hpp>

#include "vdit/common.h"
#include "vdit/io/checkpoint.h"
#include "vdit/io/safetensors.h"
#include "vdit/models/wan_dit.h"
#include "vdit/attention/processors.h"
#include "test_helpers.h"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>

namespace fs = std::filesystem;
using namespace vdit;

namespace {

const std::string kDir = std::string(VDIT_FIXTURES_DIR) + "/wan-tiny/dit/";

const nlohmann::json& manifest() {
  static const nlohmann::json m = [] {
    std::ifstream in(kDir + "manifest.json");
    return nlohmann::json::parse(in);
  }();
  return m;
}

WanDiTConfig tiny_config() { return WanDiTConfig::from_json(manifest()["config"]); }

fs::path temp_path(const std::string& name) {
  return fs::temp_directory_path() / ("vdit-test-dit-" + std::to_string(::getpid()) + "-" + name);
}

WanDiT load_model(const std::vector<std::string>& paths, at::ScalarType dtype) {
  WanDiT model(tiny_config());
  std::vector<std::shared_ptr<WeightFile>> files;
  for (const auto& p : paths) files.push_back(WeightFile::open(p));
  load_wan_dit_weights(model, files, dtype);
  return model;
}

WanDiT load_model(const std::string& path, at::ScalarType dtype) {
  return load_model(std::vector<std::string>{path}, dtype);
}

struct Case {
  std::string name;
  std::map<std::string, at::Tensor> tensors;
  const nlohmann::json* info = nullptr;
  at::Tensor x() const { return tensors.at("x").unsqueeze(0); }           // [1, C, F, H, W]
  at::Tensor t() const { return tensors.at("t"); }                        // [1]
  at::Tensor context() const { return tensors.at("context").unsqueeze(0); }  // [1, L, text_dim]
};

Case load_case(const std::string& name) {
  Case c;
  c.name = name;
  c.info = &manifest()["cases"][name];
  auto file = SafetensorsFile::open(kDir + (*c.info)["file"].get<std::string>());
  for (const auto& e : file->entries()) c.tensors[e.name] = file->tensor(e).clone();
  return c;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// |a - b| <= atol + rtol * |b| everywhere (numpy.allclose).
bool numpy_allclose(const at::Tensor& a, const at::Tensor& b, double atol, double rtol) {
  REQUIRE(a.sizes() == b.sizes());
  const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  return (ad - bd).abs().le(atol + rtol * bd.abs()).all().item<bool>();
}

at::Tensor run(WanDiT& model, const Case& c, std::map<std::string, at::Tensor>* capture = nullptr,
               DiTCall call = DiTCall{}) {
  torch::NoGradGuard no_grad;
  const WanTextCondition cond = model->encode_text(c.context(), capture);
  call.capture = capture;
  return model->forward(c.x(), c.t(), cond, call);
}

void report(const std::string& what, double err) { std::printf("[dit] %-52s max abs err %.3g\n", what.c_str(), err); }

// The message of the InputError `fn` throws, or "" when it throws nothing (other exception
// types propagate and fail the test).
std::string input_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

std::map<std::string, at::Tensor> read_all(const std::string& path) {
  std::map<std::string, at::Tensor> out;
  auto file = SafetensorsFile::open(path);
  for (const auto& e : file->entries()) out[e.name] = file->tensor(e).clone();
  return out;
}

void write_all(const fs::path& path, const std::map<std::string, at::Tensor>& tensors) {
  std::vector<WriteEntry> entries;
  for (const auto& [name, t] : tensors) entries.push_back({name, t, std::nullopt});
  write_safetensors(path.string(), entries);
}

}  // namespace

TEST_CASE("Wan DiT matches the reference (f32 weights, every intermediate)", "[dit]") {
  WanDiT model = load_model(kDir + "weights.safetensors", at::kFloat);
  const auto& tol_out = manifest()["tolerance"]["out"];
  const auto& tol_inter = manifest()["tolerance"]["intermediates"];
  const double atol = tol_out["atol"], rtol = tol_out["rtol"];
  const double iatol = tol_inter["atol"], irtol = tol_inter["rtol"];

  for (const std::string name : {"video", "image"}) {
    DYNAMIC_SECTION(name) {
      const Case c = load_case(name);
      std::map<std::string, at::Tensor> cap;
      const at::Tensor out = run(model, c, &cap);
      const at::Tensor& ref = c.tensors.at("out");
      REQUIRE(out.scalar_type() == at::kFloat);
      REQUIRE(out.sizes() == ref.unsqueeze(0).sizes());
      report(name + " out", max_abs_diff(out[0], ref));
      CHECK(numpy_allclose(out[0], ref, atol, rtol));

      const std::int64_t L = c.tensors.at("context").size(0);
      const std::map<std::string, at::Tensor> ours = {
          {"inter.patch_embedding", cap.at("patch_embedding")[0]},
          {"inter.time_embedding_e", cap.at("time_embedding_e")},
          {"inter.time_projection_e0", cap.at("time_projection_e0")},
          {"inter.text_embedding_first_rows", cap.at("text_embedding")[0].narrow(0, 0, L + 2)},
          {"inter.block0_out", cap.at("block0_out")[0]},
          {"inter.block1_out", cap.at("block1_out")[0]},
          {"inter.head_out", cap.at("head_out")[0]},
      };
      std::size_t compared = 0;
      for (const auto& [key, ref_tensor] : c.tensors) {
        if (key.rfind("inter.", 0) != 0) continue;
        INFO(key);
        REQUIRE(ours.count(key));
        report(name + " " + key, max_abs_diff(ours.at(key), ref_tensor));
        CHECK(numpy_allclose(ours.at(key), ref_tensor, iatol, irtol));
        ++compared;
      }
      CHECK(compared == ours.size());
      // The text embedding holds exactly text_len rows (zero padding before the embedding).
      CHECK(cap.at("text_embedding").size(1) == manifest()["config"]["text_len"].get<std::int64_t>());

      // RoPE table rows (reference float64, stored rounded to f32).
      const auto table = wan_rope_table(manifest()["head_dim"].get<std::int64_t>(), 8);
      const double cos_err = max_abs_diff(table.first, c.tensors.at("rope.freqs_cos_first8"));
      const double sin_err = max_abs_diff(table.second, c.tensors.at("rope.freqs_sin_first8"));
      report(name + " rope cos/sin", std::max(cos_err, sin_err));
      CHECK(cos_err < 1e-6);
      CHECK(sin_err < 1e-6);
    }
  }
}

TEST_CASE("Wan DiT reduced-precision weight files match the reference", "[dit]") {
  const double atol = manifest()["tolerance"]["out"]["atol"], rtol = manifest()["tolerance"]["out"]["rtol"];
  WanDiT f16_weights = load_model(kDir + "weights_f16.safetensors", at::kFloat);
  WanDiT bf16_diffusers = load_model(kDir + "weights_diffusers_bf16.safetensors", at::kFloat);
  for (const std::string name : {"video", "image"}) {
    DYNAMIC_SECTION(name) {
      const Case c = load_case(name);
      const at::Tensor out16 = run(f16_weights, c);
      report(name + " out_f16_weights (F16 file, f32 compute)", max_abs_diff(out16[0], c.tensors.at("out_f16_weights")));
      CHECK(numpy_allclose(out16[0], c.tensors.at("out_f16_weights"), atol, rtol));
      const at::Tensor outbf = run(bf16_diffusers, c);
      report(name + " out_bf16_weights (diffusers BF16, f32 compute)",
             max_abs_diff(outbf[0], c.tensors.at("out_bf16_weights")));
      CHECK(numpy_allclose(outbf[0], c.tensors.at("out_bf16_weights"), atol, rtol));
    }
  }
}

TEST_CASE("Wan DiT bf16 / f16 compute stays within the reference's reduced-precision deviation", "[dit]") {
  // The manifest records how far bf16 (f16) weights move the f32 output; computing in bf16 (f16)
  // adds activation rounding on top, allowed here as a 1.5x margin over that deviation.
  WanDiT bf16 = load_model(kDir + "weights.safetensors", at::kBFloat16);
  WanDiT f16 = load_model(kDir + "weights.safetensors", at::kHalf);
  CHECK(bf16->blocks[0]->as<wan::BlockImpl>()->self_attn->q->weight.scalar_type() == at::kBFloat16);
  CHECK(bf16->blocks[0]->as<wan::BlockImpl>()->modulation.scalar_type() == at::kFloat);
  CHECK(bf16->head->head->weight.scalar_type() == at::kFloat);
  for (const std::string name : {"video", "image"}) {
    DYNAMIC_SECTION(name) {
      const Case c = load_case(name);
      const auto& checks = (*c.info)["checks"];
      const at::Tensor& ref = c.tensors.at("out");
      const at::Tensor out_bf16 = run(bf16, c);
      REQUIRE(out_bf16.scalar_type() == at::kFloat);
      const double err_bf16 = max_abs_diff(out_bf16[0], ref);
      report(name + " bf16 compute vs f32 reference", err_bf16);
      CHECK(err_bf16 <= 1.5 * checks["bf16_weights_vs_f32_maxabs"].get<double>());
      const at::Tensor out_f16 = run(f16, c);
      const double err_f16 = max_abs_diff(out_f16[0], ref);
      report(name + " f16 compute vs f32 reference", err_f16);
      CHECK(err_f16 <= 1.5 * checks["f16_weights_vs_f32_maxabs"].get<double>());
    }
  }
}

TEST_CASE("Wan DiT batches cond and uncond together", "[dit]") {
  WanDiT model = load_model(kDir + "weights.safetensors", at::kFloat);
  const Case video = load_case("video"), image = load_case("image");
  torch::NoGradGuard no_grad;
  // Two prompts of different lengths in one [2, L, text_dim] batch: zero rows up to the longer one
  // are exactly what the model's own padding adds.
  const at::Tensor ctx_a = video.tensors.at("context"), ctx_b = image.tensors.at("context");
  const std::int64_t L = std::max(ctx_a.size(0), ctx_b.size(0));
  const at::Tensor contexts = at::stack({at::constant_pad_nd(ctx_a, {0, 0, 0, L - ctx_a.size(0)}),
                                         at::constant_pad_nd(ctx_b, {0, 0, 0, L - ctx_b.size(0)})});
  const WanTextCondition both = model->encode_text(contexts);
  const WanTextCondition a = model->encode_text(ctx_a), b = model->encode_text(ctx_b);
  const WanTextCondition joined = WanTextCondition::cat({a, b});
  REQUIRE(joined.batch() == 2);
  CHECK(max_abs_diff(joined.keys[1], both.keys[1]) < 1e-5);

  const at::Tensor x2 = at::cat({video.x(), video.x()});
  const at::Tensor t2 = at::cat({video.t(), video.t()});
  const at::Tensor out = model->forward(x2, t2, both);
  const at::Tensor out_a = model->forward(video.x(), video.t(), a);
  const at::Tensor out_b = model->forward(video.x(), video.t(), b);
  CHECK(max_abs_diff(out[0], out_a[0]) < 1e-5);
  CHECK(max_abs_diff(out[1], out_b[0]) < 1e-5);
  CHECK(max_abs_diff(out[1], out_a[0]) > 1e-2);  // the prompts do matter
  // A batch-1 condition is shared by every latent; one timestep is shared too.
  const at::Tensor shared = model->forward(x2, video.t(), a);
  CHECK(max_abs_diff(shared[1], out_a[0]) < 1e-5);
  CHECK(max_abs_diff(joined.select(1).keys[0], b.keys[0]) == 0.0);
}

namespace {

using vdit_test::bitwise_equal;

// The reference for windowed self-attention: the whole score matrix with the explicit
// inward-clamped neighbourhood mask, in float64.
struct MaterializedWindow : AttentionProcessor {
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn&) override {
    return attention_materialized(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), call).to(q.scalar_type());
  }
};

struct RecordingProcessor : AttentionProcessor {
  struct Seen {
    AttentionSite site;
    std::vector<RowRole> rows;
    AttentionCall call;
    std::vector<std::int64_t> q_shape, k_shape;
  };
  std::vector<Seen> seen;
  bool zero_cross = false;
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override {
    seen.push_back({site, site.rows ? *site.rows : std::vector<RowRole>{}, call, q.sizes().vec(), k.sizes().vec()});
    if (zero_cross && site.kind == AttentionKind::Cross) return at::zeros_like(q);
    AttentionCall plain = call;
    plain.window.reset();  // the windowed engine is not this test's subject
    return inner(site, q, k, v, plain);
  }
};

}  // namespace

TEST_CASE("Wan DiT routes every attention through the processors of its call", "[dit]") {
  WanDiT model = load_model(kDir + "weights.safetensors", at::kFloat);
  const Case c = load_case("video");
  const at::Tensor plain = run(model, c);

  auto hooks = std::make_shared<RecordingProcessor>();
  AttentionProcessors processors;
  processors.set(hooks);
  StepInfo step;
  step.index = 7;
  DiTCall call;
  call.processors = &processors;
  call.step = &step;
  call.row_roles = {RowRole::Uncond};
  const at::Tensor hooked = run(model, c, nullptr, call);
  CHECK(max_abs_diff(hooked, plain) == 0.0);
  const auto layers = tiny_config().num_layers;
  REQUIRE(hooks->seen.size() == static_cast<std::size_t>(2 * layers));
  const double head_dim = static_cast<double>(tiny_config().head_dim());
  int self_calls = 0;
  for (const auto& s : hooks->seen) {
    CHECK(s.call.grid.t == 3);
    CHECK(s.call.grid.h == 3);
    CHECK(s.call.grid.w == 5);
    CHECK(s.rows == std::vector<RowRole>{RowRole::Uncond});
    REQUIRE(s.site.step != nullptr);
    CHECK(s.site.step->index == 7);
    CHECK(s.site.grid.numel() == 45);
    CHECK(s.site.head_offset == 0);
    CHECK(s.call.valid_keys == -1);
    CHECK(s.call.scale == Approx(1.0 / std::sqrt(head_dim)));
    CHECK(s.q_shape == std::vector<std::int64_t>{1, 2, 45, 32});
    if (s.site.kind == AttentionKind::Self) {
      CHECK(s.k_shape == std::vector<std::int64_t>{1, 2, 45, 32});
      CHECK(s.site.layer == self_calls);
      ++self_calls;
    } else {
      CHECK(s.k_shape == std::vector<std::int64_t>{1, 2, 512, 32});  // no mask, all 512 rows
    }
  }
  CHECK(self_calls == layers);

  // Temperature and window reach self-attention only.
  hooks->seen.clear();
  DiTCall tempered_call = call;
  tempered_call.self_attn_scale_factor = 0.5;
  Window3 window;
  window.size = {3, 3, 3};
  tempered_call.self_attn_window = window;
  const at::Tensor tempered = run(model, c, nullptr, tempered_call);
  for (const auto& s : hooks->seen) {
    if (s.site.kind == AttentionKind::Self) {
      CHECK(s.call.scale == Approx(0.5 / std::sqrt(head_dim)));
      REQUIRE(s.call.window.has_value());
      CHECK(s.call.window->size == window.size);
    } else {
      CHECK(s.call.scale == Approx(1.0 / std::sqrt(head_dim)));
      CHECK_FALSE(s.call.window.has_value());
    }
  }
  CHECK(max_abs_diff(tempered, plain) > 1e-3);

  // What a hook returns is what the model uses.
  hooks->zero_cross = true;
  CHECK(max_abs_diff(run(model, c, nullptr, call), plain) > 1e-3);

  // A processor registered for one (layer, kind) sees only that site.
  auto only = std::make_shared<RecordingProcessor>();
  AttentionProcessors one_site;
  one_site.set(1, AttentionKind::Cross, only);
  DiTCall one_call;
  one_call.processors = &one_site;
  CHECK(max_abs_diff(run(model, c, nullptr, one_call), plain) == 0.0);
  REQUIRE(only->seen.size() == 1);
  CHECK(only->seen[0].site.layer == 1);
  CHECK(only->seen[0].site.kind == AttentionKind::Cross);
}

TEST_CASE("Wan DiT forwards with different windows and processors interleave with no state left behind", "[dit]") {
  WanDiT model = load_model(kDir + "weights.safetensors", at::kFloat);
  const Case c = load_case("video");
  const at::Tensor plain = run(model, c);
  DiTCall windowed;
  windowed.self_attn_window = Window3{{1, 3, 3}, {1, 1, 1}};
  windowed.self_attn_scale_factor = 1.04608;
  const at::Tensor win = run(model, c, nullptr, windowed);
  CHECK(max_abs_diff(win, plain) > 1e-4);
  auto pag = std::make_shared<HeadPerturbation>(std::map<HeadPerturbation::HeadKey, double>{{{0, 1}, 1.0}});
  AttentionProcessors processors;
  processors.set(AttentionKind::Self, pag);
  DiTCall perturbed;
  perturbed.processors = &processors;
  const at::Tensor pert = run(model, c, nullptr, perturbed);
  CHECK(max_abs_diff(pert, plain) > 1e-4);
  // Back to back in any order, each call gives its own answer bitwise.
  CHECK(bitwise_equal(run(model, c), plain));
  CHECK(bitwise_equal(run(model, c, nullptr, perturbed), pert));
  CHECK(bitwise_equal(run(model, c, nullptr, windowed), win));
  CHECK(bitwise_equal(run(model, c), plain));
  CHECK(bitwise_equal(run(model, c, nullptr, windowed), win));
  // The window equals the reference computed with the explicit inward-clamped mask.
  const WanTextCondition cond = model->encode_text(c.context());
  DiTCall generic = windowed;
  auto materialized = std::make_shared<MaterializedWindow>();
  AttentionProcessors reference;
  reference.set(AttentionKind::Self, materialized);
  generic.processors = &reference;
  torch::NoGradGuard no_grad;
  CHECK(max_abs_diff(model->forward(c.x(), c.t(), cond, generic), win) < 1e-5);
}

TEST_CASE("Wan DiT position offsets shift RoPE like a crop of a larger grid", "[dit]") {
  const std::int64_t head_dim = 32;
  const Grid3 big{4, 6, 8}, crop{2, 3, 4};
  const auto whole = wan_rope_for_grid(head_dim, big);
  const auto part = wan_rope_for_grid(head_dim, crop, at::kCPU, {1, 2, 3});
  // Token (t, h, w) of the crop is token (t + 1, h + 2, w + 3) of the big grid.
  const at::Tensor big_cos = whole.first.view({big.t, big.h, big.w, head_dim / 2});
  const at::Tensor expected = big_cos.slice(0, 1, 3).slice(1, 2, 5).slice(2, 3, 7).reshape({crop.numel(), head_dim / 2});
  CHECK(bitwise_equal(part.first, expected));
  CHECK(bitwise_equal(wan_rope_for_grid(head_dim, crop, at::kCPU, {0, 0, 0}).first, wan_rope_for_grid(head_dim, crop).first));
}

TEST_CASE("Wan DiT key names: original, diffusers, ComfyUI", "[dit]") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"patch_embedding.weight", "patch_embedding.weight"},
      {"condition_embedder.text_embedder.linear_1.weight", "text_embedding.0.weight"},
      {"condition_embedder.text_embedder.linear_2.bias", "text_embedding.2.bias"},
      {"condition_embedder.time_embedder.linear_1.weight", "time_embedding.0.weight"},
      {"condition_embedder.time_embedder.linear_2.bias", "time_embedding.2.bias"},
      {"condition_embedder.time_proj.weight", "time_projection.1.weight"},
      {"blocks.7.scale_shift_table", "blocks.7.modulation"},
      {"blocks.0.attn1.to_q.weight", "blocks.0.self_attn.q.weight"},
      {"blocks.12.attn1.to_out.0.bias", "blocks.12.self_attn.o.bias"},
      {"blocks.0.attn1.norm_k.weight", "blocks.0.self_attn.norm_k.weight"},
      {"blocks.29.attn2.to_v.weight", "blocks.29.cross_attn.v.weight"},
      {"blocks.3.attn2.norm_q.weight", "blocks.3.cross_attn.norm_q.weight"},
      {"blocks.3.attn2.to_out.0.weight", "blocks.3.cross_attn.o.weight"},
      {"blocks.5.norm2.weight", "blocks.5.norm3.weight"},  // diffusers' swap
      {"blocks.5.norm3.bias", "blocks.5.norm3.bias"},      // already original
      {"blocks.1.ffn.net.0.proj.weight", "blocks.1.ffn.0.weight"},
      {"blocks.1.ffn.net.2.bias", "blocks.1.ffn.2.bias"},
      {"scale_shift_table", "head.modulation"},
      {"proj_out.weight", "head.head.weight"},
      {"head.modulation", "head.modulation"},
      {"model.diffusion_model.blocks.0.self_attn.q.weight", "blocks.0.self_attn.q.weight"},
      {"diffusion_model.head.head.bias", "head.head.bias"},
      {"model.diffusion_model.blocks.2.cross_attn.k.weight", "blocks.2.cross_attn.k.weight"},
  };
  for (const auto& [from, to] : cases) {
    INFO(from);
    CHECK(wan_dit_canonical_key(from) == to);
  }
  // Every original name maps to itself, and the model's parameter names are exactly the
  // original checkpoint's keys.
  WanDiT model(tiny_config());
  std::set<std::string> names;
  for (const auto& item : model->named_parameters()) names.insert(item.key());
  std::set<std::string> keys;
  auto file = WeightFile::open(kDir + "weights.safetensors");
  for (const auto& k : file->keys()) {
    CHECK(wan_dit_canonical_key(k) == k);
    keys.insert(k);
  }
  CHECK(names == keys);
  // The diffusers file names the same set.
  std::set<std::string> mapped;
  auto diffusers_file = WeightFile::open(kDir + "weights_diffusers_bf16.safetensors");  // keep alive over the loop
  for (const auto& k : diffusers_file->keys()) mapped.insert(wan_dit_canonical_key(k));
  CHECK(mapped == keys);
  // The inverse names every original key exactly as the reference converter did.
  std::set<std::string> written, reference(diffusers_file->keys().begin(), diffusers_file->keys().end());
  for (const auto& k : keys) {
    written.insert(wan_dit_diffusers_key(k));
    CHECK(wan_dit_canonical_key(wan_dit_diffusers_key(k)) == k);
  }
  CHECK(written == reference);
  // The diffusers config spelling reads back to the same config (text_len kept when not 512).
  WanDiTConfig small = tiny_config();
  CHECK(WanDiTConfig::from_json(small.to_diffusers_json()) == small);
  small.text_len = 16;
  const nlohmann::json j = small.to_diffusers_json();
  CHECK(j["_class_name"] == "WanTransformer3DModel");
  CHECK(j["attention_head_dim"] == small.dim / small.num_heads);
  CHECK(WanDiTConfig::from_json(j) == small);
}

namespace {

// Nearest finite e4m3fn code of each value (brute force over the 254 finite codes).
at::Tensor encode_e4m3(const at::Tensor& values) {
  std::vector<float> decoded;
  std::vector<std::int64_t> codes;
  for (int b = 0; b < 256; ++b) {
    const float f = fp8_e4m3_to_float(static_cast<std::uint8_t>(b));
    if (std::isfinite(f)) {
      decoded.push_back(f);
      codes.push_back(b);
    }
  }
  const at::Tensor table = at::tensor(decoded);
  const at::Tensor idx = (values.reshape({-1, 1}) - table.reshape({1, -1})).abs().argmin(1);
  return at::tensor(codes).index_select(0, idx).to(at::kByte).reshape(values.sizes());
}

at::Tensor decode_e4m3(const at::Tensor& codes) {
  std::vector<float> table(256);
  for (int b = 0; b < 256; ++b) table[b] = fp8_e4m3_to_float(static_cast<std::uint8_t>(b));
  return at::tensor(table).index_select(0, codes.reshape({-1}).to(at::kLong)).reshape(codes.sizes());
}

}  // namespace

TEST_CASE("Wan DiT loads a ComfyUI fp8 scaled file", "[dit]") {
  const auto weights = read_all(kDir + "weights.safetensors");
  std::vector<WriteEntry> entries;
  std::map<std::string, at::Tensor> expected;  // dequantised value per original name
  entries.push_back({"scaled_fp8", at::zeros({0}, at::kByte), StDType::F8_E4M3});
  for (const auto& [name, t] : weights) {
    const std::string stored = "model.diffusion_model." + name;
    const bool quantise = name.rfind("blocks.", 0) == 0 && t.dim() == 2;
    if (!quantise) {
      entries.push_back({stored, t, std::nullopt});
      expected[name] = t;
      continue;
    }
    const at::Tensor scale = (t.abs().max() / 448.0).reshape({});
    const at::Tensor codes = encode_e4m3(t / scale);
    const std::string layer = stored.substr(0, stored.size() - std::string(".weight").size());
    entries.push_back({stored, codes, StDType::F8_E4M3});
    entries.push_back({layer + ".scale_weight", scale, std::nullopt});
    entries.push_back({layer + ".scale_input", at::ones({}), std::nullopt});
    expected[name] = decode_e4m3(codes) * scale;
  }
  // A full checkpoint's other components are not the DiT's.
  entries.push_back({"first_stage_model.decoder.conv1.weight", at::zeros({2, 2}), std::nullopt});
  const fs::path path = temp_path("fp8.safetensors");
  write_safetensors(path.string(), entries);

  WanDiT model = load_model(path.string(), at::kFloat);
  fs::remove(path);
  for (const auto& item : model->named_parameters()) {
    INFO(item.key());
    CHECK(max_abs_diff(item.value(), expected.at(item.key())) == 0.0);
  }
  // The quantised model still computes roughly the same function.
  const Case c = load_case("video");
  const at::Tensor out = run(model, c);
  const double err = max_abs_diff(out[0], c.tensors.at("out"));
  report("video fp8-scaled weights vs f32 reference", err);
  CHECK(std::isfinite(err));
  CHECK(err < 0.25 * (*c.info)["checks"]["out_absmax"].get<double>());
}

TEST_CASE("Wan DiT weight loading is strict", "[dit]") {
  const auto weights = read_all(kDir + "weights.safetensors");
  const fs::path path = temp_path("strict.safetensors");

  SECTION("missing key") {
    auto w = weights;
    w.erase("blocks.1.ffn.2.bias");
    write_all(path, w);
    const std::string msg = input_error_of([&] { load_model(path.string(), at::kFloat); });
    CHECK_THAT(msg, Catch::Contains("missing") && Catch::Contains("blocks.1.ffn.2.bias"));
  }
  SECTION("unexpected key") {
    auto w = weights;
    w["blocks.0.img_proj.weight"] = at::zeros({2});
    write_all(path, w);
    const std::string msg = input_error_of([&] { load_model(path.string(), at::kFloat); });
    CHECK_THAT(msg, Catch::Contains("unexpected") && Catch::Contains("blocks.0.img_proj.weight"));
  }
  SECTION("shape mismatch") {
    auto w = weights;
    w["head.modulation"] = at::zeros({1, 3, 64});
    write_all(path, w);
    const std::string msg = input_error_of([&] { load_model(path.string(), at::kFloat); });
    CHECK_THAT(msg, Catch::Contains("head.modulation") && Catch::Contains("[1,3,64]"));
  }
  SECTION("duplicate under two names") {
    auto w = weights;
    w["proj_out.weight"] = w.at("head.head.weight");
    write_all(path, w);
    const std::string msg = input_error_of([&] { load_model(path.string(), at::kFloat); });
    CHECK_THAT(msg, Catch::Contains("head.head.weight") && Catch::Contains("twice"));
  }
  SECTION("split over two files") {
    std::map<std::string, at::Tensor> first, second;
    for (const auto& [k, v] : weights) (k.rfind("blocks.", 0) == 0 ? first : second)[k] = v;
    const fs::path path2 = temp_path("strict2.safetensors");
    write_all(path, first);
    write_all(path2, second);
    WanDiT model = load_model({path.string(), path2.string()}, at::kFloat);
    fs::remove(path2);
    CHECK(max_abs_diff(model->head->head->weight, weights.at("head.head.weight")) == 0.0);
  }
  fs::remove(path);
}

TEST_CASE("Wan DiT config: JSON in both spellings, presets, inference from weights", "[dit]") {
  const WanDiTConfig tiny = tiny_config();
  CHECK(tiny.dim == 64);
  CHECK(tiny.num_heads == 2);
  CHECK(tiny.head_dim() == 32);
  CHECK(tiny.text_len == 512);

  // Inference from the tiny weights (original and diffusers names); the head count cannot be
  // read from shapes, and dim 64 matches no preset.
  CHECK(WanDiTConfig::infer_from_weights(*WeightFile::open(kDir + "weights.safetensors"), 2) == tiny);
  CHECK(WanDiTConfig::infer_from_weights(*WeightFile::open(kDir + "weights_diffusers_bf16.safetensors"), 2) == tiny);
  CHECK_THAT(input_error_of([&] { WanDiTConfig::infer_from_weights(*WeightFile::open(kDir + "weights.safetensors")); }),
             Catch::Contains("--dit-config"));
  CHECK_THAT(input_error_of([&] { WanDiTConfig::infer_from_weights(*WeightFile::open(kDir + "case_video.safetensors")); }),
             Catch::Contains("patch_embedding.weight"));

  // The real models' shapes give the real configs, heads from the dim presets.
  auto shapes_of = [](const WanDiTConfig& c) {
    std::map<std::string, std::vector<std::int64_t>> s;
    s["patch_embedding.weight"] = {c.dim, c.in_dim, 1, 2, 2};
    s["time_embedding.0.weight"] = {c.dim, c.freq_dim};
    s["text_embedding.0.weight"] = {c.dim, c.text_dim};
    s["head.head.weight"] = {4 * c.out_dim, c.dim};
    for (std::int64_t i = 0; i < c.num_layers; ++i) {
      const std::string b = "blocks." + std::to_string(i) + ".";
      s[b + "ffn.0.weight"] = {c.ffn_dim, c.dim};
      s[b + "self_attn.norm_q.weight"] = {c.dim};
      s[b + "norm3.weight"] = {c.dim};
    }
    return s;
  };
  CHECK(WanDiTConfig::infer_from_shapes(shapes_of(WanDiTConfig::t2v_1_3b())) == WanDiTConfig::t2v_1_3b());
  CHECK(WanDiTConfig::infer_from_shapes(shapes_of(WanDiTConfig::t2v_14b())) == WanDiTConfig::t2v_14b());

  // Shipped config files (original keys) equal the presets and the reference facts.
  const std::string configs = std::string(VDIT_SOURCE_DIR) + "/configs/";
  CHECK(WanDiTConfig::from_file(configs + "wan2.1-t2v-1.3b.json") == WanDiTConfig::t2v_1_3b());
  CHECK(WanDiTConfig::from_file(configs + "wan2.1-t2v-14b.json") == WanDiTConfig::t2v_14b());
  const WanDiTConfig big = WanDiTConfig::t2v_14b();
  CHECK(big.dim == 5120);
  CHECK(big.ffn_dim == 13824);
  CHECK(big.num_heads == 40);
  CHECK(big.num_layers == 40);
  CHECK(big.head_dim() == 128);

  // The original config.json of the 1.3B release omits the keys that keep WanModel's defaults.
  const auto original = nlohmann::json::parse(R"({"_class_name": "WanModel", "_diffusers_version": "0.30.0",
      "dim": 1536, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v",
      "num_heads": 12, "num_layers": 30, "out_dim": 16, "text_len": 512})");
  CHECK(WanDiTConfig::from_json(original) == WanDiTConfig::t2v_1_3b());
  // diffusers transformer/config.json of Wan-T2V-14B.
  const auto diffusers = nlohmann::json::parse(R"({"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": null,
      "attention_head_dim": 128, "cross_attn_norm": true, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
      "image_dim": null, "in_channels": 16, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
      "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096})");
  CHECK(WanDiTConfig::from_json(diffusers) == WanDiTConfig::t2v_14b());
  CHECK(WanDiTConfig::from_json(WanDiTConfig::t2v_14b().to_json()) == WanDiTConfig::t2v_14b());

  auto without = [](nlohmann::json j, const std::string& key) {
    j.erase(key);
    return j;
  };
  CHECK_THAT(input_error_of([&] { WanDiTConfig::from_json(without(original, "ffn_dim")); }), Catch::Contains("'ffn_dim'"));
  CHECK_THAT(input_error_of([&] { WanDiTConfig::from_json(without(original, "num_heads")); }), Catch::Contains("'num_heads'"));
  CHECK_THAT(input_error_of([&] { WanDiTConfig::from_json(without(diffusers, "num_attention_heads")); }),
             Catch::Contains("'num_attention_heads'"));
  auto bad = original;
  bad["num_heads"] = 7;
  CHECK_THAT(input_error_of([&] { WanDiTConfig::from_json(bad); }), Catch::Contains("num_heads"));
  bad = original;
  bad["patch_size"] = "1,2,2";
  CHECK_THAT(input_error_of([&] { WanDiTConfig::from_json(bad); }), Catch::Contains("patch_size"));
  auto i2v = original;
  i2v["model_type"] = "i2v";
  CHECK_THAT(input_error_of([&] { WanDiT m(WanDiTConfig::from_json(i2v)); }), Catch::Contains("i2v"));
  // Unknown keys are tolerated (with a warning).
  auto extra = original;
  extra["some_future_key"] = 1;
  CHECK(WanDiTConfig::from_json(extra) == WanDiTConfig::t2v_1_3b());
}

// Found by tests/fuzz/fuzz_json_configs (issue 39): converting 1e300 to int64 and
// heads x head_dim past 2^63 were undefined behaviour (UBSan aborts); now one-line InputErrors.
TEST_CASE("Wan DiT config: huge numbers are InputErrors, not undefined conversions", "[dit]") {
  const auto parse = [](const char* text) { return WanDiTConfig::from_json(nlohmann::json::parse(text)); };
  CHECK_THAT(input_error_of([&] { parse(R"({"dim": 1e300, "num_heads": 1, "ffn_dim": 1, "num_layers": 1})"); }),
             Catch::Contains("'dim' is out of range"));
  CHECK_THAT(input_error_of([&] { parse(R"({"dim": 18446744073709551615, "num_heads": 1, "ffn_dim": 1, "num_layers": 1})"); }),
             Catch::Contains("'dim' is out of range"));
  CHECK_THAT(input_error_of([&] {
               parse(R"({"num_attention_heads": 4611686018427387904, "attention_head_dim": 4, "ffn_dim": 1, "num_layers": 1})");
             }),
             Catch::Contains("out of range"));
  CHECK_THAT(input_error_of([&] {
               parse(R"({"dim": 64, "num_heads": 4611686018427387904, "attention_head_dim": 4, "ffn_dim": 1, "num_layers": 1})");
             }),
             Catch::Contains("num_attention_heads x attention_head_dim is out of range"));
}

TEST_CASE("Wan DiT rejects bad inputs with InputError", "[dit]") {
  WanDiT model = load_model(kDir + "weights.safetensors", at::kFloat);
  const Case c = load_case("video");
  torch::NoGradGuard no_grad;
  const WanTextCondition cond = model->encode_text(c.context());
  CHECK_FALSE(input_error_of([&] { model->encode_text(at::zeros({1, 513, 32})); }).empty());
  CHECK_FALSE(input_error_of([&] { model->encode_text(at::zeros({1, 5, 31})); }).empty());
  CHECK_FALSE(input_error_of([&] { model->forward(at::zeros({1, 16, 3, 5, 10}), c.t(), cond); }).empty());
  CHECK_FALSE(input_error_of([&] { model->forward(at::zeros({1, 15, 3, 6, 10}), c.t(), cond); }).empty());
  CHECK_FALSE(input_error_of([&] { model->forward(c.x(), at::zeros({3}), cond); }).empty());
  CHECK_FALSE(input_error_of([&] { model->forward(at::cat({c.x(), c.x(), c.x()}), c.t(), WanTextCondition::cat({cond, cond})); }).empty());
}

TEST_CASE("Wan DiT is trainable: autograd reaches every parameter", "[dit]") {
  torch::manual_seed(7);
  WanDiT model(tiny_config());
  model->reset_parameters();
  CHECK(model->head->head->weight.abs().max().item<double>() == 0.0);  // reference init: zero head
  // Zero head weights leave nothing for the other weights' gradients to flow through.
  {
    torch::NoGradGuard no_grad;
    model->head->head->weight.normal_(0.0, 0.02);
  }
  const Case c = load_case("image");
  const WanTextCondition cond = model->encode_text(c.context());
  const at::Tensor out = model->forward(c.x(), c.t(), cond);
  out.pow(2).mean().backward();
  for (const auto& item : model->named_parameters()) {
    INFO(item.key());
    REQUIRE(item.value().grad().defined());
    CHECK(item.value().grad().abs().sum().item<double>() > 0.0);
  }
}

TEST_CASE("Wan DiT f32 RoPE (the demo trainer's) stays at f32 rounding from the float64 rotation", "[dit]") {
  torch::NoGradGuard no_grad;
  WanDiT model = load_model(kDir + "weights.safetensors", at::kFloat);
  const auto& tol_out = manifest()["tolerance"]["out"];
  const double atol = tol_out["atol"], rtol = tol_out["rtol"];
  for (const std::string name : {"video", "image"}) {
    DYNAMIC_SECTION(name) {
      const Case c = load_case(name);
      const WanTextCondition cond = model->encode_text(c.context());
      model->rope_dtype = at::kDouble;
      const at::Tensor reference_rope = model->forward(c.x(), c.t(), cond);
      model->rope_dtype = at::kFloat;
      const at::Tensor f32_rope = model->forward(c.x(), c.t(), cond);
      model->rope_dtype = at::kDouble;
      REQUIRE(f32_rope.scalar_type() == at::kFloat);
      // Not bit-equal (the rotation really ran in f32) ...
      CHECK(max_abs_diff(f32_rope, reference_rope) > 0.0);
      // ... yet within the tolerance the f32 model keeps against the reference itself.
      CHECK(numpy_allclose(f32_rope[0], c.tensors.at("out"), atol, rtol));
      CHECK(max_abs_diff(f32_rope, reference_rope) <= 1e-4 * reference_rope.abs().max().item<double>());
    }
  }
}
