// umT5 encoder against the reference's golden tensors (tests/fixtures/wan-tiny/t5), the loader's
// key mapping and error reporting, and the prompt -> context wrapper.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include <unistd.h>

#include "vdit/common.h"
#include "vdit/io/checkpoint.h"
#include "vdit/io/safetensors.h"
#include "vdit/models/tokenizer.h"
#include "vdit/models/umt5.h"

using namespace vdit;

namespace {

const std::string kT5Dir = std::string(VDIT_FIXTURES_DIR) + "/wan-tiny/t5/";
const std::string kTokenizerModel = std::string(VDIT_FIXTURES_DIR) + "/tokenizer/tiny_unigram.model";

const nlohmann::json& manifest() {
  static const nlohmann::json m = [] {
    std::ifstream in(kT5Dir + "manifest.json");
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
  }();
  return m;
}

const nlohmann::json& encoder_case() { return manifest()["cases"]["encoder"]; }

struct EncoderCase {
  at::Tensor ids, mask;
  std::vector<std::int64_t> lengths;
  std::shared_ptr<SafetensorsFile> file;
  at::Tensor tensor(const std::string& name) const { return file->tensor(name).to(at::kFloat); }
};

const EncoderCase& encoder_fixture() {
  static const EncoderCase c = [] {
    EncoderCase e;
    e.file = SafetensorsFile::open(kT5Dir + encoder_case()["file"].get<std::string>());
    e.ids = e.file->tensor("ids").to(at::kLong);
    e.mask = e.file->tensor("mask").to(at::kLong);
    for (const auto& n : encoder_case()["seq_lens"]) e.lengths.push_back(n.get<std::int64_t>());
    return e;
  }();
  return c;
}

UMT5Encoder load_encoder(const std::string& weights, at::ScalarType dtype) {
  auto file = WeightFile::open(kT5Dir + weights);
  UMT5Encoder model(UMT5Config::infer_from_weights(*file), at::TensorOptions().dtype(dtype), /*random_init=*/false);
  load_umt5_weights(model, *file, dtype);
  model->eval();
  return model;
}

at::Tensor run(UMT5Encoder& model, const at::Tensor& ids, const at::Tensor& mask) {
  torch::NoGradGuard no_grad;
  return model->forward(ids, mask);
}

struct Errors {
  double max_abs = 0.0;
  double worst_excess = -1e30;  // max over elements of |a-b| - (atol + rtol |b|); <= 0 means allclose
};

// Compares the real rows (mask == 1) of two [B, L, dim] outputs.
Errors compare_real_rows(const at::Tensor& got, const at::Tensor& want, const std::vector<std::int64_t>& lengths,
                         double atol, double rtol) {
  Errors e;
  for (std::size_t b = 0; b < lengths.size(); ++b) {
    const auto i = static_cast<std::int64_t>(b);
    const at::Tensor g = got[i].narrow(0, 0, lengths[b]).to(at::kDouble);
    const at::Tensor w = want[i].narrow(0, 0, lengths[b]).to(at::kDouble);
    const at::Tensor diff = (g - w).abs();
    e.max_abs = std::max(e.max_abs, diff.max().item<double>());
    e.worst_excess = std::max(e.worst_excess, (diff - (atol + rtol * w.abs())).max().item<double>());
  }
  return e;
}

double out_atol() { return manifest()["tolerance"]["out"]["atol"].get<double>(); }
double out_rtol() { return manifest()["tolerance"]["out"]["rtol"].get<double>(); }

void check_against(const std::string& weights, at::ScalarType dtype, const std::string& golden) {
  const EncoderCase& c = encoder_fixture();
  UMT5Encoder model = load_encoder(weights, dtype);
  const at::Tensor out = run(model, c.ids, c.mask);
  REQUIRE(out.scalar_type() == at::kFloat);
  REQUIRE(out.sizes() == c.tensor(golden).sizes());
  const Errors e = compare_real_rows(out, c.tensor(golden), c.lengths, out_atol(), out_rtol());
  INFO(weights << " as " << dtype_name(dtype) << " vs " << golden);
  CAPTURE(e.max_abs);
  CHECK(e.worst_excess <= 0.0);
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("vdit_t5_" + std::to_string(::getpid()) + "_" + name)).string();
}

// Every tensor of weights.safetensors, optionally renamed / replaced / dropped.
std::vector<WriteEntry> fixture_entries() {
  auto file = SafetensorsFile::open(kT5Dir + "weights.safetensors");
  std::vector<WriteEntry> entries;
  for (const auto& e : file->entries()) entries.push_back({e.name, file->tensor(e).clone(), std::nullopt});
  return entries;
}

}  // namespace

TEST_CASE("umT5 relative position buckets equal the reference table", "[t5]") {
  const at::Tensor want = encoder_fixture().tensor("rel_pos_bucket_minus200_to_200").to(at::kLong);
  const auto& cfg = manifest()["config"];
  const at::Tensor rel = at::arange(-200, 201, at::kLong);
  const at::Tensor got = t5_relative_position_bucket(rel, cfg["num_buckets"].get<std::int64_t>(), 128, true);
  REQUIRE(got.sizes() == want.sizes());
  CHECK(at::equal(got, want));
  // The table is not trivial: both directions and the saturated end are present.
  CHECK(got.max().item<std::int64_t>() == cfg["num_buckets"].get<std::int64_t>() - 1);
}

TEST_CASE("umT5 config is inferred from original and HF-named weights", "[t5]") {
  const auto& cfg = manifest()["config"];
  for (const std::string name : {"weights.safetensors", "weights_hf_f16.safetensors", "weights_bf16.pth"}) {
    INFO(name);
    const UMT5Config c = UMT5Config::infer_from_weights(*WeightFile::open(kT5Dir + name));
    CHECK(c.vocab == cfg["vocab"].get<std::int64_t>());
    CHECK(c.dim == cfg["dim"].get<std::int64_t>());
    CHECK(c.dim_attn == cfg["dim_attn"].get<std::int64_t>());
    CHECK(c.dim_ffn == cfg["dim_ffn"].get<std::int64_t>());
    CHECK(c.num_heads == cfg["num_heads"].get<std::int64_t>());
    CHECK(c.num_layers == cfg["num_layers"].get<std::int64_t>());
    CHECK(c.num_buckets == cfg["num_buckets"].get<std::int64_t>());
  }
  const UMT5Config xxl = UMT5Config::preset("umt5-xxl");
  CHECK(xxl.head_dim() == 64);
  CHECK_THROWS_AS(UMT5Config::preset("t5-small"), InputError);
  // The real umt5_xxl config, when the lead's copy of the reference facts is present.
  const std::string facts_path = std::string(VDIT_FIXTURES_DIR) + "/wan-tiny/reference_facts.json";
  if (std::filesystem::exists(facts_path)) {
    std::ifstream in(facts_path);
    const auto facts = nlohmann::json::parse(in)["umt5_xxl"];
    CHECK(xxl.vocab == facts["vocab_size"].get<std::int64_t>());
    CHECK(xxl.dim == facts["dim"].get<std::int64_t>());
    CHECK(xxl.dim_attn == facts["dim_attn"].get<std::int64_t>());
    CHECK(xxl.dim_ffn == facts["dim_ffn"].get<std::int64_t>());
    CHECK(xxl.num_heads == facts["num_heads"].get<std::int64_t>());
    CHECK(xxl.num_layers == facts["encoder_layers"].get<std::int64_t>());
    CHECK(xxl.num_buckets == facts["num_buckets"].get<std::int64_t>());
  }
}

TEST_CASE("umT5 parameter names are the original Wan names", "[t5]") {
  auto file = WeightFile::open(kT5Dir + "weights.safetensors");
  UMT5Encoder model(UMT5Config::infer_from_weights(*file));
  std::set<std::string> params, keys(file->keys().begin(), file->keys().end());
  for (const auto& p : model->named_parameters()) params.insert(p.key());
  CHECK(params == keys);
  // HF names map one to one onto them.
  auto hf = WeightFile::open(kT5Dir + "weights_hf_f16.safetensors");
  std::set<std::string> mapped;
  for (const auto& k : hf->keys()) mapped.insert(canonical_umt5_key(k));
  CHECK(mapped == keys);
  // The inverse gives the HF names (all but the tied embed_tokens copy, which the writer omits).
  std::set<std::string> written, reference;
  for (const auto& k : keys) {
    written.insert(hf_umt5_key(k));
    CHECK(canonical_umt5_key(hf_umt5_key(k)) == k);
  }
  for (const auto& k : hf->keys())
    if (k != "encoder.embed_tokens.weight") reference.insert(k);
  CHECK(written == reference);
  CHECK(canonical_umt5_key("encoder.embed_tokens.weight").empty());
  CHECK(canonical_umt5_key("spiece_model").empty());
  CHECK(canonical_umt5_key("text_encoder.shared.weight") == "token_embedding.weight");
}

TEST_CASE("umT5 encoder with f32 weights matches the reference", "[t5]") {
  check_against("weights.safetensors", at::kFloat, "out");
}

TEST_CASE("umT5 encoder with bf16 weights (safetensors and .pth) matches the reference", "[t5]") {
  check_against("weights_bf16.safetensors", at::kFloat, "out_bf16_weights");
  check_against("weights_bf16.pth", at::kFloat, "out_bf16_weights");
}

TEST_CASE("umT5 encoder with HF-named f16 weights matches the reference", "[t5]") {
  check_against("weights_hf_f16.safetensors", at::kFloat, "out_f16_weights");
}

TEST_CASE("umT5 encoder run natively in bf16 agrees with the reference's bf16 run", "[t5]") {
  const EncoderCase& c = encoder_fixture();
  UMT5Encoder model = load_encoder("weights_bf16.safetensors", at::kBFloat16);
  REQUIRE(model->dtype() == at::kBFloat16);
  const at::Tensor out = run(model, c.ids, c.mask);
  REQUIRE(out.scalar_type() == at::kFloat);
  // The manifest states how far the reference's own bf16 run lies from f32.
  const double stated = encoder_case()["checks"]["native_bf16_vs_f32_maxabs_real_rows"].get<double>();
  const Errors vs_native = compare_real_rows(out, c.tensor("out_native_bf16"), c.lengths, 0, 0);
  const Errors vs_f32 = compare_real_rows(out, c.tensor("out"), c.lengths, 0, 0);
  INFO("native bf16: max abs err vs reference bf16 " << vs_native.max_abs << ", vs f32 " << vs_f32.max_abs
                                                     << ", stated bf16-vs-f32 " << stated);
  CHECK(vs_native.max_abs <= stated);
  CHECK(vs_f32.max_abs <= 2 * stated);
}

TEST_CASE("umT5 encoder run natively in f16 stays close to f32", "[t5]") {
  if (!matmul_supported(at::kHalf, at::kCPU)) {
    WARN("skipped: this LibTorch has no f16 matmul on the CPU (f16 weights are tested upcast to f32 above)");
    return;
  }
  const EncoderCase& c = encoder_fixture();
  UMT5Encoder model = load_encoder("weights_hf_f16.safetensors", at::kHalf);
  const at::Tensor out = run(model, c.ids, c.mask);
  REQUIRE(out.scalar_type() == at::kFloat);
  // f16 keeps 3 more mantissa bits than bf16, so the reference's bf16 deviation bounds it.
  const double stated = encoder_case()["checks"]["native_bf16_vs_f32_maxabs_real_rows"].get<double>();
  const Errors e = compare_real_rows(out, c.tensor("out_f16_weights"), c.lengths, 0, 0);
  INFO("native f16: max abs err vs f32 compute with the same weights " << e.max_abs);
  CHECK(e.max_abs <= stated);
}

TEST_CASE("umT5 real rows equal the reference's trimmed outputs and ignore extra padding", "[t5]") {
  const EncoderCase& c = encoder_fixture();
  UMT5Encoder model = load_encoder("weights.safetensors", at::kFloat);
  const at::Tensor out = run(model, c.ids, c.mask);
  const std::vector<at::Tensor> rows = take_real_rows(out, c.lengths);
  REQUIRE(rows.size() == 2);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const at::Tensor want = c.tensor("out_real_rows_seq" + std::to_string(i));
    REQUIRE(rows[i].sizes() == want.sizes());
    CHECK(at::allclose(rows[i], want, out_rtol(), out_atol()));
  }
  // 16 more padding positions: real rows move only by rounding (the manifest measured ~1e-6).
  const std::int64_t extra = 16;
  const at::Tensor ids = at::cat({c.ids, at::zeros({c.ids.size(0), extra}, at::kLong)}, 1);
  const at::Tensor mask = at::cat({c.mask, at::zeros({c.mask.size(0), extra}, at::kLong)}, 1);
  const at::Tensor padded = run(model, ids, mask);
  const Errors e = compare_real_rows(padded, out, c.lengths, 0, 0);
  INFO("extra padding: max abs change of real rows " << e.max_abs);
  CHECK(e.max_abs <= 10 * encoder_case()["checks"]["extra_padding_16_maxabs_real_rows"].get<double>());
  // Without a mask the padding is attended to and the rows change: the mask matters.
  const at::Tensor unmasked = run(model, c.ids, at::Tensor());
  CHECK(compare_real_rows(unmasked, out, c.lengths, 0, 0).max_abs > 1e-3);
}

TEST_CASE("umT5 loader reports missing keys, bad shapes and duplicates by name", "[t5]") {
  auto config = UMT5Config::infer_from_weights(*WeightFile::open(kT5Dir + "weights.safetensors"));
  const std::string path = temp_path("broken.safetensors");

  SECTION("missing key") {
    auto entries = fixture_entries();
    entries.erase(std::remove_if(entries.begin(), entries.end(),
                                 [](const WriteEntry& e) { return e.name == "blocks.1.ffn.fc2.weight"; }),
                  entries.end());
    write_safetensors(path, entries);
    UMT5Encoder model(config);
    try {
      load_umt5_weights(model, *WeightFile::open(path), at::kFloat);
      FAIL("no error for a missing key");
    } catch (const InputError& e) {
      CHECK_THAT(e.what(), Catch::Contains("blocks.1.ffn.fc2.weight"));
    }
  }
  SECTION("wrong shape") {
    auto entries = fixture_entries();
    for (auto& e : entries)
      if (e.name == "blocks.0.attn.k.weight") e.tensor = at::zeros({32, 16});
    write_safetensors(path, entries);
    UMT5Encoder model(config);
    try {
      load_umt5_weights(model, *WeightFile::open(path), at::kFloat);
      FAIL("no error for a wrong shape");
    } catch (const InputError& e) {
      CHECK_THAT(e.what(), Catch::Contains("blocks.0.attn.k.weight"));
      CHECK_THAT(e.what(), Catch::Contains("[32, 16]"));
    }
  }
  SECTION("the same weight under two names") {
    auto entries = fixture_entries();
    entries.push_back({"shared.weight", at::zeros({config.vocab, config.dim}), std::nullopt});
    write_safetensors(path, entries);
    UMT5Encoder model(config);
    CHECK_THROWS_AS(load_umt5_weights(model, *WeightFile::open(path), at::kFloat), InputError);
  }
  SECTION("shared position table (plain T5) is refused") {
    auto entries = fixture_entries();
    entries.erase(std::remove_if(entries.begin(), entries.end(),
                                 [](const WriteEntry& e) { return e.name == "blocks.1.pos_embedding.embedding.weight"; }),
                  entries.end());
    write_safetensors(path, entries);
    CHECK_THROWS_AS(UMT5Config::infer_from_weights(*WeightFile::open(path)), InputError);
  }
  std::remove(path.c_str());
}

TEST_CASE("umT5 loader applies fp8-style scale_weight factors", "[t5]") {
  const EncoderCase& c = encoder_fixture();
  // HF names with every projection stored divided by 4 and its scale beside it, as ComfyUI's
  // *_fp8_scaled files store them (here in f32, so only the scaling is under test).
  std::vector<WriteEntry> entries;
  auto hf = SafetensorsFile::open(kT5Dir + "weights_hf_f16.safetensors");
  for (const auto& e : hf->entries()) {
    at::Tensor t = hf->tensor(e).to(at::kFloat);
    if (e.name.find("SelfAttention.q.weight") != std::string::npos ||
        e.name.find("DenseReluDense.wo.weight") != std::string::npos) {
      const std::string stem = e.name.substr(0, e.name.size() - std::string(".weight").size());
      entries.push_back({stem + ".scale_weight", at::full({}, 4.0f), std::nullopt});
      t = t / 4;
    }
    entries.push_back({e.name, t, std::nullopt});
  }
  entries.push_back({"scaled_fp8", at::zeros({0}, at::kFloat), std::nullopt});
  const std::string path = temp_path("scaled.safetensors");
  write_safetensors(path, entries);
  auto file = WeightFile::open(path);
  UMT5Encoder model(UMT5Config::infer_from_weights(*file), at::TensorOptions(), false);
  load_umt5_weights(model, *file, at::kFloat);
  const Errors e = compare_real_rows(run(model, c.ids, c.mask), c.tensor("out_f16_weights"), c.lengths, out_atol(), out_rtol());
  INFO("scaled weights: max abs err " << e.max_abs);
  CHECK(e.worst_excess <= 0.0);
  std::remove(path.c_str());
}

TEST_CASE("umT5 forward rejects bad inputs with InputError", "[t5]") {
  UMT5Encoder model(UMT5Config::infer_from_weights(*WeightFile::open(kT5Dir + "weights.safetensors")));
  torch::NoGradGuard no_grad;
  CHECK_THROWS_AS(model->forward(at::zeros({4}, at::kLong)), InputError);
  CHECK_THROWS_AS(model->forward(at::zeros({1, 4}, at::kFloat)), InputError);
  CHECK_THROWS_AS(model->forward(at::full({1, 4}, 100, at::kLong)), InputError);  // vocab is 100
  CHECK_THROWS_AS(model->forward(at::zeros({1, 4}, at::kLong), at::ones({1, 5}, at::kLong)), InputError);
}

TEST_CASE("TextEncoder returns the real rows of each prompt", "[t5][tokenizer]") {
  WanTokenizer tokenizer = WanTokenizer::from_file(kTokenizerModel);
  UMT5Config config = UMT5Config::infer_from_weights(*WeightFile::open(kT5Dir + "weights.safetensors"));
  config.vocab = tokenizer.vocab_size();
  torch::manual_seed(7);
  UMT5Encoder model(config);
  const std::vector<std::string> prompts = {"A red fox jumps over the old bridge, cinematic lighting.",
                                            "  An owl &amp; a panda\tsleep under a bamboo grove  ", ""};

  // Reference path: the full 512-token batch through the model, real rows kept.
  const TokenizedBatch batch = tokenizer.encode_batch(prompts);
  const std::vector<at::Tensor> want = take_real_rows(run(model, batch.ids, batch.mask), batch.lengths);

  TextEncoder trimmed(model, tokenizer);
  TextEncoder full(model, tokenizer, TextEncoderOptions{true});
  const std::vector<at::Tensor> got = trimmed.encode(prompts);
  const std::vector<at::Tensor> got_full = full.encode(prompts);
  REQUIRE(got.size() == prompts.size());
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    INFO("prompt " << i);
    CHECK(got[i].size(0) == batch.lengths[i]);
    CHECK(got[i].size(1) == config.dim);
    CHECK(got[i].scalar_type() == at::kFloat);
    CHECK(at::allclose(got_full[i], want[i], 0, 1e-6));
    CHECK(at::allclose(got[i], want[i], 1e-5, 1e-5));
  }
  CHECK(got[2].size(0) == 1);  // empty prompt: only </s>

  // The same model saved with the tokenizer inside (ComfyUI's spiece_model), loaded by path.
  std::vector<WriteEntry> entries;
  for (const auto& p : model->named_parameters()) entries.push_back({p.key(), p.value().detach(), std::nullopt});
  const std::string bytes = tokenizer.serialized_model();
  entries.push_back({"spiece_model",
                     at::from_blob(const_cast<char*>(bytes.data()), {static_cast<std::int64_t>(bytes.size())}, at::kByte).clone(),
                     std::nullopt});
  const std::string path = temp_path("with_spiece.safetensors");
  write_safetensors(path, entries);
  TextEncoder loaded = TextEncoder::from_files(path, "", at::kFloat, at::kCPU);
  const std::vector<at::Tensor> got_loaded = loaded.encode(prompts);
  for (std::size_t i = 0; i < prompts.size(); ++i) CHECK(at::equal(got_loaded[i], got[i]));
  std::remove(path.c_str());

  // A tokenizer with more pieces than the embedding has rows cannot drive the model.
  UMT5Config small = config;
  small.vocab = 100;
  CHECK_THROWS_AS(TextEncoder(UMT5Encoder(small), tokenizer), InputError);
}
