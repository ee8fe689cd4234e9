// Wan2.1 VAE against the golden tensors of the original Python code (fixtures/wan-tiny/vae: a
// dim-4 model with random weights; video 3x9x32x48, latent 16x3x4x6).
#include <catch2/catch.hpp>

#include "vdit/common.h"
#include "vdit/io/checkpoint.h"
#include "vdit/io/safetensors.h"
#include "vdit/models/wan_vae.h"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;
using namespace vdit;

namespace {

const std::string kDir = std::string(VDIT_FIXTURES_DIR) + "/wan-tiny/vae/";

nlohmann::json manifest() {
  std::ifstream in(kDir + "manifest.json");
  return nlohmann::json::parse(in);
}

at::Tensor golden(const std::string& name) {
  static auto file = SafetensorsFile::open(kDir + "case_codec.safetensors");
  return file->tensor(name).to(at::kFloat).clone();
}

WanVAE load_vae(const std::string& weights, at::ScalarType dtype = at::kFloat) {
  WanVAE vae(WanVAEConfig::from_json(manifest()["config"]));
  load_wan_vae_weights(vae, *WeightFile::open(kDir + weights), dtype);
  return vae;
}

struct Tol {
  double atol, rtol;
};
Tol tolerance(const std::string& name) {
  const auto t = manifest()["tolerance"][name];
  return {t["atol"].get<double>(), t["rtol"].get<double>()};
}

// Largest |actual - expected|, and whether every element is within atol + rtol * |expected|.
struct Compare {
  double max_abs;
  bool close;
};
Compare compare(const at::Tensor& actual, const at::Tensor& expected, Tol tol) {
  REQUIRE(actual.sizes() == expected.sizes());
  at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  at::Tensor diff = (a - e).abs();
  const bool close = diff.le(tol.atol + tol.rtol * e.abs()).all().item<bool>();
  return {diff.max().item<double>(), close};
}

// PSNR of a video in [-1,1] (peak-to-peak 2) against a reference.
double psnr(const at::Tensor& x, const at::Tensor& ref) {
  const double mse = (x.to(at::kDouble) - ref.to(at::kDouble)).pow(2).mean().item<double>();
  return 10.0 * std::log10(4.0 / mse);
}

fs::path temp_path(const std::string& name) {
  return fs::temp_directory_path() / ("vdit-test-vae-" + std::to_string(::getpid()) + "-" + name);
}

}  // namespace

TEST_CASE("wan vae: config from json, from weights, strides", "[vae]") {
  const WanVAEConfig from_json = WanVAEConfig::from_json(manifest()["config"]);
  CHECK(from_json.dim == 4);
  CHECK(from_json.z_dim == 16);
  CHECK(from_json.dim_mult == std::vector<std::int64_t>{1, 2, 4, 4});
  CHECK(from_json.num_res_blocks == 2);
  CHECK(from_json.temporal_downsample == std::vector<bool>{false, true, true});
  CHECK(from_json.attn_scales.empty());
  CHECK(from_json.spatial_stride() == 8);
  CHECK(from_json.temporal_stride() == 4);

  // Defaults are the real model, and the published statistics match the reference object's.
  const WanVAEConfig real;
  CHECK(real.dim == 96);
  CHECK(at::equal(at::tensor(real.latent_mean), golden("latent_mean")));
  CHECK(at::equal(at::tensor(real.latent_std), golden("latent_std")));

  for (const char* file : {"weights.safetensors", "weights_diffusers_f16.safetensors", "weights.pth"}) {
    INFO(file);
    const WanVAEConfig inferred = WanVAEConfig::infer_from_weights(*WeightFile::open(kDir + file));
    CHECK(inferred.dim == from_json.dim);
    CHECK(inferred.z_dim == from_json.z_dim);
    CHECK(inferred.dim_mult == from_json.dim_mult);
    CHECK(inferred.num_res_blocks == from_json.num_res_blocks);
    CHECK(inferred.temporal_downsample == from_json.temporal_downsample);
    CHECK(inferred.attn_scales.empty());
  }

  nlohmann::json bad = manifest()["config"];
  bad["temperal_downsample"] = {true};
  CHECK_THROWS_AS(WanVAEConfig::from_json(bad), InputError);
  bad = manifest()["config"];
  bad["dim"] = "four";
  CHECK_THROWS_WITH(WanVAEConfig::from_json(bad), Catch::Contains("'dim'"));
}

TEST_CASE("wan vae: parameter names are the original checkpoint keys", "[vae]") {
  WanVAE vae(WanVAEConfig::from_json(manifest()["config"]));
  auto file = WeightFile::open(kDir + "weights.safetensors");
  const auto params = vae->named_parameters();
  CHECK(params.size() == file->keys().size());
  for (const auto& p : params) {
    INFO(p.key());
    REQUIRE(file->has(p.key()));
    CHECK(at::IntArrayRef(file->meta(p.key()).shape).equals(p.value().sizes()));
  }
  // The real 96-dim model has the published size, 126.9 M parameters.
  WanVAE real;
  std::int64_t count = 0;
  for (const auto& p : real->parameters()) count += p.numel();
  CHECK(std::llround(count / 1e5) == 1269);
}

TEST_CASE("wan vae: diffusers names map onto the original ones", "[vae]") {
  CHECK(canonical_wan_vae_key("encoder.conv_in.weight") == "encoder.conv1.weight");
  CHECK(canonical_wan_vae_key("encoder.down_blocks.3.conv_shortcut.bias") == "encoder.downsamples.3.shortcut.bias");
  CHECK(canonical_wan_vae_key("encoder.down_blocks.5.time_conv.weight") == "encoder.downsamples.5.time_conv.weight");
  CHECK(canonical_wan_vae_key("encoder.mid_block.resnets.1.norm2.gamma") == "encoder.middle.2.residual.3.gamma");
  CHECK(canonical_wan_vae_key("decoder.mid_block.attentions.0.to_qkv.weight") == "decoder.middle.1.to_qkv.weight");
  CHECK(canonical_wan_vae_key("decoder.up_blocks.1.resnets.0.conv1.weight") == "decoder.upsamples.4.residual.2.weight");
  CHECK(canonical_wan_vae_key("decoder.up_blocks.2.upsamplers.0.resample.1.bias") == "decoder.upsamples.11.resample.1.bias");
  CHECK(canonical_wan_vae_key("decoder.norm_out.gamma") == "decoder.head.0.gamma");
  CHECK(canonical_wan_vae_key("post_quant_conv.weight") == "conv2.weight");
  CHECK(canonical_wan_vae_key("first_stage_model.decoder.head.2.bias") == "decoder.head.2.bias");
  CHECK(canonical_wan_vae_key("decoder.upsamples.7.time_conv.weight") == "decoder.upsamples.7.time_conv.weight");

  // Every diffusers tensor is the f16 rounding of the original tensor it is renamed to.
  auto original = WeightFile::open(kDir + "weights.safetensors");
  auto diffusers = WeightFile::open(kDir + "weights_diffusers_f16.safetensors");
  REQUIRE(original->keys().size() == diffusers->keys().size());
  for (const auto& key : diffusers->keys()) {
    const std::string canonical = canonical_wan_vae_key(key);
    INFO(key << " -> " << canonical);
    REQUIRE(original->has(canonical));
    CHECK(at::equal(original->load(canonical).to(at::kHalf), diffusers->load(key)));
  }
}

TEST_CASE("wan vae: codec matches the reference (case_codec)", "[vae]") {
  WanVAE vae = load_vae("weights.safetensors");
  CHECK(vae->dtype() == at::kFloat);
  const at::Tensor video = golden("video").unsqueeze(0);
  const at::Tensor z = golden("z").unsqueeze(0);

  const auto raw = compare(vae->encode_raw_mu(video).squeeze(0), golden("latent_raw_mu"), tolerance("latent_raw_mu"));
  const auto latent = compare(vae->encode(video).squeeze(0), golden("latent"), tolerance("latent"));
  const at::Tensor decoded_unclamped = vae->decode_unclamped(z);
  const auto dec_u = compare(decoded_unclamped.squeeze(0), golden("decoded_unclamped"), tolerance("decoded"));
  const at::Tensor decoded = vae->decode(z);
  const auto dec = compare(decoded.squeeze(0), golden("decoded"), tolerance("decoded"));
  WARN("wan vae max abs error: latent_raw_mu " << raw.max_abs << ", latent " << latent.max_abs
                                               << ", decoded_unclamped " << dec_u.max_abs << ", decoded "
                                               << dec.max_abs);
  CHECK(raw.close);
  CHECK(latent.close);
  CHECK(dec_u.close);
  CHECK(dec.close);
  CHECK(decoded.dtype() == at::kFloat);
  CHECK(decoded.abs().max().item<float>() <= 1.0f);
  CHECK(at::equal(decoded, decoded_unclamped.clamp(-1, 1)));

  // Causality: the first 5 frames encode to the first 2 latent frames, and 2 latent frames
  // decode to the first 5 frames, bit for bit (the reference records 0.0 for both).
  CHECK(at::equal(vae->encode(video.narrow(2, 0, 5)), vae->encode(video).narrow(2, 0, 2)));
  CHECK(at::equal(vae->decode(z.narrow(2, 0, 2)), decoded.narrow(2, 0, 5)));

  // Batches are independent.
  const at::Tensor pair = vae->decode(at::cat({z, z.flip(2)}, 0));
  CHECK(at::allclose(pair.narrow(0, 0, 1), decoded, 0, 1e-6));
}

TEST_CASE("wan vae: f16 diffusers weights (latent_f16_weights)", "[vae]") {
  WanVAE vae = load_vae("weights_diffusers_f16.safetensors");
  CHECK(vae->dtype() == at::kFloat);  // upcast on load
  const auto r = compare(vae->encode(golden("video").unsqueeze(0)).squeeze(0), golden("latent_f16_weights"),
                         tolerance("latent"));
  WARN("wan vae latent_f16_weights max abs error " << r.max_abs);
  CHECK(r.close);
}

TEST_CASE("wan vae: weights.pth loads bitwise like weights.safetensors", "[vae]") {
  WanVAE from_st = load_vae("weights.safetensors");
  WanVAE from_pth = load_vae("weights.pth");
  auto a = from_st->named_parameters(), b = from_pth->named_parameters();
  REQUIRE(a.size() == b.size());
  for (const auto& p : a) {
    INFO(p.key());
    CHECK(at::equal(p.value(), b[p.key()]));
  }
  const at::Tensor z = golden("z").unsqueeze(0);
  CHECK(at::equal(from_st->decode(z), from_pth->decode(z)));
}

TEST_CASE("wan vae: spatial tiling", "[vae]") {
  WanVAE vae = load_vae("weights.safetensors");
  const at::Tensor video = golden("video").unsqueeze(0);
  const at::Tensor z = golden("z").unsqueeze(0);
  const at::Tensor reference = vae->decode(z);

  // A tile that holds the whole input is the untiled computation, bit for bit.
  CHECK(at::equal(vae->decode(z, VAETiling{true, 64, 16}), reference));
  CHECK(at::equal(vae->encode(video, VAETiling{true, 64, 16}), vae->encode(video)));

  // Small tiles: the decoder's middle attention is global over the frame and every conv
  // reaches across tile borders, so tiles differ from the whole near seams; blending keeps
  // this within the stated PSNR (measured values in the WARN line).
  const at::Tensor tiled_w = vae->decode(z, VAETiling{true, 32, 16});    // 1 x 2 tiles of 4x4 latents
  const at::Tensor tiled_hw = vae->decode(z, VAETiling{true, 24, 16});   // 2 x 4 tiles of 3x3 latents
  const double psnr_w = psnr(tiled_w, reference), psnr_hw = psnr(tiled_hw, reference);

  // A larger, smooth input: a moving colour gradient at 64x96 (latent 8x12), tiles of 32 px.
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor t = at::arange(9, opts).view({1, 1, 9, 1, 1});
  const at::Tensor y = at::linspace(-1, 1, 64, opts).view({1, 1, 1, 64, 1});
  const at::Tensor x = at::linspace(-1, 1, 96, opts).view({1, 1, 1, 1, 96});
  const at::Tensor phase = at::tensor({0.0f, 2.0f, 4.0f}, opts).view({1, 3, 1, 1, 1});
  const at::Tensor smooth = at::sin(2.0 * x + 1.5 * y + 0.2 * t + phase) * 0.8;
  const at::Tensor big_latent = vae->encode(smooth);
  const at::Tensor big_latent_tiled = vae->encode(smooth, VAETiling{true, 32, 16});
  const double latent_err = (big_latent_tiled - big_latent).abs().max().item<double>();
  const double latent_scale = big_latent.abs().max().item<double>();
  const at::Tensor big_ref = vae->decode(big_latent);
  const at::Tensor big_tiled = vae->decode(big_latent, VAETiling{true, 32, 16});
  const double psnr_big = psnr(big_tiled, big_ref);
  WARN("wan vae tiling PSNR vs untiled: fixture 32/16 px " << psnr_w << " dB, 24/16 px " << psnr_hw
                                                           << " dB, 64x96 32/16 px " << psnr_big
                                                           << " dB; tiled encode max abs latent error "
                                                           << latent_err << " (latent absmax " << latent_scale << ")");
  CHECK(tiled_w.sizes() == reference.sizes());
  CHECK(tiled_hw.sizes() == reference.sizes());
  CHECK(big_tiled.sizes() == big_ref.sizes());
  CHECK(big_latent_tiled.sizes() == big_latent.sizes());
  CHECK(psnr_w >= 35.0);
  CHECK(psnr_hw >= 35.0);
  CHECK(psnr_big >= 35.0);
  CHECK(latent_err <= 0.05 * latent_scale);
  CHECK(tiled_hw.abs().max().item<float>() <= 1.0f);

  CHECK_THROWS_AS(vae->decode(z, VAETiling{true, 20, 8}), InputError);
  CHECK_THROWS_AS(vae->decode(z, VAETiling{true, 32, 32}), InputError);
}

TEST_CASE("wan vae: bad weights and inputs are InputErrors naming the problem", "[vae]") {
  auto source = WeightFile::open(kDir + "weights.safetensors");
  const fs::path path = temp_path("missing.safetensors");
  std::vector<WriteEntry> entries;
  for (const auto& key : source->keys())
    if (key != "decoder.upsamples.7.time_conv.weight") entries.push_back({key, source->load(key), std::nullopt});
  write_safetensors(path.string(), entries);
  {
    WanVAE vae(WanVAEConfig::from_json(manifest()["config"]));
    const at::Tensor before = vae->named_parameters()["encoder.conv1.weight"].clone();
    CHECK_THROWS_AS(load_wan_vae_weights(vae, *WeightFile::open(path.string())), InputError);
    CHECK_THROWS_WITH(load_wan_vae_weights(vae, *WeightFile::open(path.string())),
                      Catch::Contains("decoder.upsamples.7.time_conv.weight") && Catch::Contains("missing"));
    // Nothing was loaded.
    CHECK(at::equal(vae->named_parameters()["encoder.conv1.weight"], before));
  }

  // An extra tensor and a wrong shape are rejected too.
  entries.clear();
  for (const auto& key : source->keys()) {
    at::Tensor t = source->load(key);
    if (key == "conv2.bias") t = at::zeros({17});
    entries.push_back({key, t, std::nullopt});
  }
  write_safetensors(path.string(), entries);
  {
    WanVAE vae(WanVAEConfig::from_json(manifest()["config"]));
    CHECK_THROWS_WITH(load_wan_vae_weights(vae, *WeightFile::open(path.string())),
                      Catch::Contains("conv2.bias") && Catch::Contains("[17]"));
  }
  for (auto& e : entries)
    if (e.name == "conv2.bias") e.tensor = source->load("conv2.bias");
  entries.push_back({"decoder.extra.weight", at::zeros({2}), std::nullopt});
  write_safetensors(path.string(), entries);
  {
    WanVAE vae(WanVAEConfig::from_json(manifest()["config"]));
    CHECK_THROWS_WITH(load_wan_vae_weights(vae, *WeightFile::open(path.string())),
                      Catch::Contains("decoder.extra.weight"));
  }
  fs::remove(path);

  // The real config does not fit the tiny weights.
  WanVAE real;
  CHECK_THROWS_AS(load_wan_vae_weights(real, *source), InputError);

  WanVAE vae = load_vae("weights.safetensors");
  CHECK_THROWS_AS(vae->encode(at::zeros({1, 3, 8, 32, 48})), InputError);   // 8 frames: not 4n+1
  CHECK_THROWS_AS(vae->encode(at::zeros({1, 4, 9, 32, 48})), InputError);   // 4 channels
  CHECK_THROWS_AS(vae->decode(at::zeros({1, 8, 2, 4, 6})), InputError);     // 8 latent channels
  CHECK_THROWS_AS(vae->decode(at::zeros({16, 2, 4, 6})), InputError);       // no batch axis
}
