// Wan2.1 t2v DiT: configuration, key normalisation, weight loading and the forward pass.
// See include/vdit/models/wan_dit.h for the precision contract and docs/CHECKPOINTS.md (sections
// 1, 4, 6) for the conventions reproduced here.
#include "vdit/models/wan_dit.h"

#include "vdit/common.h"
#include "vdit/distributed.h"
#include "vdit/io/checkpoint.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

namespace vdit {

namespace {

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string shape_string(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? "," : "") << shape[i];
  out << "]";
  return out.str();
}

// LibTorch 1.13 has no CPU kernels for f16 matmul/GELU/softmax. On the CPU an f16 compute dtype
// is emulated: operands rounded to f16, arithmetic in f32, result rounded to f16 (which is also
// what f16 GPU kernels do, accumulating in f32).
bool cpu_half(const at::Tensor& t) { return t.scalar_type() == at::kHalf && t.device().is_cpu(); }

// The f16 (and, on CPUs without AVX-512, bf16) emulation is linear_f32_accumulate's widening.
at::Tensor linear_in_weight_dtype(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return linear_f32_accumulate(x.to(weight.scalar_type()), weight, bias);
}

at::Tensor gelu_tanh(const at::Tensor& x) {
  if (cpu_half(x)) return at::gelu(x.to(at::kFloat), "tanh").to(at::kHalf);
  return at::gelu(x, "tanh");
}

at::Tensor silu_act(const at::Tensor& x) {
  if (cpu_half(x)) return at::silu(x.to(at::kFloat)).to(at::kHalf);
  return at::silu(x);
}

// WanLayerNorm without affine parameters: computed in f32, cast back to the input's dtype.
at::Tensor plain_layer_norm(const at::Tensor& x, std::int64_t dim, double eps) {
  return at::layer_norm(x.to(at::kFloat), {dim}, {}, {}, eps).to(x.scalar_type());
}

// q/k/v handed to attention: rounded to the compute dtype, then carried in the attention dtype
// (which differs only for the CPU f16 emulation).
at::Tensor to_attention(const at::Tensor& x, at::ScalarType compute, at::ScalarType attention) {
  return x.to(compute).to(attention);
}

// Rotates element pairs (2j, 2j+1) of x [B, N, H, D] by the per-token angles, in the angles' dtype
// (float64 like the reference's rope_apply unless the model was switched to f32 RoPE), and returns f32.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const auto sizes = x.sizes();
  at::Tensor pairs = x.to(cos.scalar_type()).reshape({sizes[0], sizes[1], sizes[2], sizes[3] / 2, 2});
  at::Tensor re = pairs.select(-1, 0), im = pairs.select(-1, 1);
  at::Tensor rotated = at::stack({re * cos - im * sin, re * sin + im * cos}, -1);
  return rotated.reshape(sizes).to(at::kFloat);
}

// Frequencies of one RoPE axis with D_axis = 2 * pairs: theta^(-2j / D_axis), j < pairs.
at::Tensor rope_axis_frequencies(std::int64_t pairs, at::Device device) {
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor exponents = at::arange(0, 2 * pairs, 2, opts).div(static_cast<double>(2 * pairs));
  return at::pow(10000.0, exponents).reciprocal();
}

// (t, h, w) complex-pair counts of a head: [c - 2*(c/3), c/3, c/3] with c = head_dim / 2.
std::array<std::int64_t, 3> rope_axis_pairs(std::int64_t head_dim) {
  const std::int64_t c = head_dim / 2;
  return {c - 2 * (c / 3), c / 3, c / 3};
}

// ---------------------------------------------------------------------------------------------
// Locating the DiT tensors of one or more weight files.

struct DitSource {
  const WeightFile* file = nullptr;
  std::string key;                       // name in the file
  const WeightFile* scale_file = nullptr;
  std::string scale_key;                 // ComfyUI fp8: <layer>.scale_weight / .weight_scale
};

const char* const kFullCheckpointPrefix = "model.diffusion_model.";

std::map<std::string, DitSource> collect_dit_sources(const std::vector<std::shared_ptr<WeightFile>>& files) {
  std::map<std::string, DitSource> sources;
  std::map<std::string, std::pair<const WeightFile*, std::string>> scales;
  for (const auto& file : files) {
    if (!file) throw InputError("DiT weights: null weight file");
    // A full ComfyUI checkpoint also holds the VAE and text encoder under other prefixes; only
    // its model.diffusion_model.* tensors belong to the DiT.
    bool full_checkpoint = false;
    for (const auto& key : file->keys()) {
      if (starts_with(key, kFullCheckpointPrefix)) {
        full_checkpoint = true;
        break;
      }
    }
    for (const auto& key : file->keys()) {
      if (full_checkpoint && !starts_with(key, kFullCheckpointPrefix)) continue;
      const std::string canonical = wan_dit_canonical_key(key);
      // fp8 bookkeeping that carries no weight: the file-level marker and activation scales.
      if (canonical == "scaled_fp8" || ends_with(canonical, ".scale_input") || ends_with(canonical, ".input_scale") ||
          ends_with(canonical, ".comfy_quant")) {
        continue;
      }
      std::string scaled_weight;  // the weight this tensor scales, if it is an fp8 scale
      for (const std::string suffix : {".scale_weight", ".weight_scale"}) {
        if (ends_with(key, suffix)) scaled_weight = wan_dit_canonical_key(key.substr(0, key.size() - suffix.size()) + ".weight");
      }
      if (!scaled_weight.empty()) {
        if (scales.count(scaled_weight)) throw InputError(file->path() + ": two scales for DiT weight '" + scaled_weight + "'");
        scales[scaled_weight] = {file.get(), key};
        continue;
      }
      auto it = sources.find(canonical);
      if (it != sources.end()) {
        throw InputError(file->path() + ": DiT tensor '" + canonical + "' appears twice (as '" + it->second.key + "' in " +
                         it->second.file->path() + " and as '" + key + "')");
      }
      sources[canonical] = DitSource{file.get(), key, nullptr, {}};
    }
  }
  for (const auto& [weight_key, scale] : scales) {
    auto it = sources.find(weight_key);
    if (it == sources.end()) throw InputError(scale.first->path() + ": scale '" + scale.second + "' has no weight to scale");
    it->second.scale_file = scale.first;
    it->second.scale_key = scale.second;
  }
  return sources;
}

std::string files_label(const std::vector<std::shared_ptr<WeightFile>>& files) {
  if (files.empty() || !files[0]) return "DiT weights";
  if (files.size() == 1) return files[0]->path();
  return files[0]->path() + " (+" + std::to_string(files.size() - 1) + " more)";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Key names

namespace {

// diffusers name <-> original name (convert_wan_to_diffusers.py, read backwards): one table serves
// both directions.
struct KeyRename {
  const char* diffusers;
  const char* original;
};
constexpr KeyRename kTopLevelRenames[] = {
    {"condition_embedder.time_embedder.linear_1.", "time_embedding.0."},
    {"condition_embedder.time_embedder.linear_2.", "time_embedding.2."},
    {"condition_embedder.text_embedder.linear_1.", "text_embedding.0."},
    {"condition_embedder.text_embedder.linear_2.", "text_embedding.2."},
    {"condition_embedder.time_proj.", "time_projection.1."},
    {"proj_out.", "head.head."},
};
constexpr KeyRename kBlockRenames[] = {
    {"attn1.to_q.", "self_attn.q."},     {"attn1.to_k.", "self_attn.k."},
    {"attn1.to_v.", "self_attn.v."},     {"attn1.to_out.0.", "self_attn.o."},
    {"attn1.norm_q.", "self_attn.norm_q."}, {"attn1.norm_k.", "self_attn.norm_k."},
    {"attn2.to_q.", "cross_attn.q."},    {"attn2.to_k.", "cross_attn.k."},
    {"attn2.to_v.", "cross_attn.v."},    {"attn2.to_out.0.", "cross_attn.o."},
    {"attn2.norm_q.", "cross_attn.norm_q."}, {"attn2.norm_k.", "cross_attn.norm_k."},
    // diffusers numbers the block's norms in call order: its affine norm2 is the original
    // norm3 (the parameter-free original norm2 has no tensors).
    {"norm2.", "norm3."},
    {"ffn.net.0.proj.", "ffn.0."},       {"ffn.net.2.", "ffn.2."},
};

// Renames an (unprefixed) key from diffusers to original spelling, or back.
std::string rename_dit_key(const std::string& k, bool to_original) {
  auto from = [&](const KeyRename& r) { return std::string(to_original ? r.diffusers : r.original); };
  auto to = [&](const KeyRename& r) { return std::string(to_original ? r.original : r.diffusers); };
  const KeyRename head_modulation{"scale_shift_table", "head.modulation"};
  if (k == from(head_modulation)) return to(head_modulation);
  for (const auto& r : kTopLevelRenames) {
    if (starts_with(k, from(r))) return to(r) + k.substr(from(r).size());
  }
  if (starts_with(k, "blocks.")) {
    const std::size_t dot = k.find('.', 7);
    if (dot == std::string::npos) return k;
    const std::string head = k.substr(0, dot + 1);  // "blocks.N."
    const std::string rest = k.substr(dot + 1);
    const KeyRename block_modulation{"scale_shift_table", "modulation"};
    if (rest == from(block_modulation)) return head + to(block_modulation);
    for (const auto& r : kBlockRenames) {
      if (starts_with(rest, from(r))) return head + to(r) + rest.substr(from(r).size());
    }
  }
  return k;
}

}  // namespace

std::string wan_dit_canonical_key(const std::string& key) {
  for (const char* prefix : {"model.diffusion_model.", "diffusion_model."}) {
    if (starts_with(key, prefix)) return rename_dit_key(key.substr(std::string(prefix).size()), true);
  }
  return rename_dit_key(key, true);
}

std::string wan_dit_diffusers_key(const std::string& key) { return rename_dit_key(key, false); }

// ---------------------------------------------------------------------------------------------
// Configuration

WanDiTConfig WanDiTConfig::t2v_1_3b() { return WanDiTConfig{}; }

WanDiTConfig WanDiTConfig::t2v_14b() {
  WanDiTConfig c;
  c.dim = 5120;
  c.ffn_dim = 13824;
  c.num_heads = 40;
  c.num_layers = 40;
  return c;
}

bool WanDiTConfig::operator==(const WanDiTConfig& o) const {
  return model_type == o.model_type && dim == o.dim && ffn_dim == o.ffn_dim && freq_dim == o.freq_dim &&
         in_dim == o.in_dim && out_dim == o.out_dim && num_heads == o.num_heads && num_layers == o.num_layers &&
         patch_size == o.patch_size && text_dim == o.text_dim && text_len == o.text_len && eps == o.eps &&
         qk_norm == o.qk_norm && cross_attn_norm == o.cross_attn_norm && window_size == o.window_size;
}

void WanDiTConfig::validate() const {
  auto positive = [](const char* name, std::int64_t v) {
    if (v <= 0) throw InputError(std::string("DiT config: '") + name + "' must be positive, got " + std::to_string(v));
  };
  positive("dim", dim);
  positive("ffn_dim", ffn_dim);
  positive("freq_dim", freq_dim);
  positive("in_dim", in_dim);
  positive("out_dim", out_dim);
  positive("num_heads", num_heads);
  positive("num_layers", num_layers);
  positive("text_dim", text_dim);
  positive("text_len", text_len);
  for (auto p : patch_size) positive("patch_size", p);
  if (freq_dim % 2 != 0) throw InputError("DiT config: 'freq_dim' must be even, got " + std::to_string(freq_dim));
  if (dim % num_heads != 0) {
    throw InputError("DiT config: 'dim' " + std::to_string(dim) + " is not divisible by 'num_heads' " + std::to_string(num_heads));
  }
  if (head_dim() % 2 != 0 || head_dim() < 6) {
    throw InputError("DiT config: head dim " + std::to_string(head_dim()) + " must be even and >= 6 for the 3D RoPE");
  }
  if (!(eps > 0)) throw InputError("DiT config: 'eps' must be positive");
}

namespace {

// Values past 2^62 are refused rather than converted: a double that large (1e300) would be
// undefined to convert, an unsigned one past 2^63-1 would wrap negative, and the products the
// config takes (heads x head dim) must stay in range.
std::int64_t json_int(const nlohmann::json& v, const std::string& key) {
  constexpr std::int64_t kLimit = std::int64_t{1} << 62;
  auto out_of_range = [&] { return InputError("DiT config: '" + key + "' is out of range, got " + v.dump()); };
  if (!v.is_number_integer()) {
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()) {
      const double d = v.get<double>();
      if (!(std::fabs(d) <= static_cast<double>(kLimit))) throw out_of_range();
      return static_cast<std::int64_t>(d);
    }
    throw InputError("DiT config: '" + key + "' must be an integer, got " + v.dump());
  }
  if (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(kLimit)) throw out_of_range();
  const std::int64_t i = v.get<std::int64_t>();
  if (i > kLimit || i < -kLimit) throw out_of_range();
  return i;
}

double json_double(const nlohmann::json& v, const std::string& key) {
  if (!v.is_number()) throw InputError("DiT config: '" + key + "' must be a number, got " + v.dump());
  return v.get<double>();
}

bool json_bool(const nlohmann::json& v, const std::string& key) {
  if (!v.is_boolean()) throw InputError("DiT config: '" + key + "' must be true or false, got " + v.dump());
  return v.get<bool>();
}

template <std::size_t N>
std::array<std::int64_t, N> json_int_array(const nlohmann::json& v, const std::string& key) {
  if (!v.is_array() || v.size() != N) {
    throw InputError("DiT config: '" + key + "' must be a list of " + std::to_string(N) + " integers, got " + v.dump());
  }
  std::array<std::int64_t, N> out{};
  for (std::size_t i = 0; i < N; ++i) out[i] = json_int(v[i], key);
  return out;
}

}  // namespace

WanDiTConfig WanDiTConfig::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw InputError("DiT config: expected a JSON object");
  const bool diffusers = j.contains("num_attention_heads") || j.contains("attention_head_dim") ||
                         j.contains("in_channels") || j.contains("out_channels");
  WanDiTConfig c;
  std::optional<std::int64_t> dim, heads, head_dim, ffn, layers;

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const nlohmann::json& v = it.value();
    if (!key.empty() && key[0] == '_') continue;  // _class_name, _diffusers_version, __name__
    if (key == "dim") dim = json_int(v, key);
    else if (key == "num_heads" || key == "num_attention_heads") heads = json_int(v, key);
    else if (key == "attention_head_dim") head_dim = json_int(v, key);
    else if (key == "ffn_dim") ffn = json_int(v, key);
    else if (key == "num_layers") layers = json_int(v, key);
    else if (key == "freq_dim") c.freq_dim = json_int(v, key);
    else if (key == "in_dim" || key == "in_channels") c.in_dim = json_int(v, key);
    else if (key == "out_dim" || key == "out_channels") c.out_dim = json_int(v, key);
    else if (key == "text_dim") c.text_dim = json_int(v, key);
    else if (key == "text_len") c.text_len = json_int(v, key);
    else if (key == "eps") c.eps = json_double(v, key);
    else if (key == "patch_size") c.patch_size = json_int_array<3>(v, key);
    else if (key == "window_size") c.window_size = json_int_array<2>(v, key);
    else if (key == "cross_attn_norm") c.cross_attn_norm = json_bool(v, key);
    else if (key == "qk_norm") {
      // Original: a bool. diffusers: "rms_norm_across_heads" (the same full-dim RMS) or null.
      if (v.is_boolean()) c.qk_norm = v.get<bool>();
      else if (v.is_null()) c.qk_norm = false;
      else if (v.is_string() && v.get<std::string>() == "rms_norm_across_heads") c.qk_norm = true;
      else throw InputError("DiT config: unsupported 'qk_norm' " + v.dump() + " (expected true/false or \"rms_norm_across_heads\")");
    } else if (key == "model_type") {
      if (!v.is_string()) throw InputError("DiT config: 'model_type' must be a string");
      c.model_type = v.get<std::string>();
    } else if (key == "added_kv_proj_dim" || key == "image_dim" || key == "pos_embed_seq_len") {
      // diffusers' image-conditioning fields: null for t2v.
      if (!v.is_null()) c.model_type = "i2v";
    } else if (key == "rope_max_seq_len") {
      // The RoPE angles are computed for any position; the table length is irrelevant here.
      json_int(v, key);
    } else {
      log_warning("DiT config: ignoring unknown key '" + key + "'");
    }
  }

  if (diffusers) {
    if (!heads) throw InputError("DiT config: missing required key 'num_attention_heads'");
    if (!head_dim && !dim) throw InputError("DiT config: missing required key 'attention_head_dim'");
    if (head_dim) {
      std::int64_t product = 0;
      if (__builtin_mul_overflow(*heads, *head_dim, &product)) {
        throw InputError("DiT config: num_attention_heads x attention_head_dim is out of range");
      }
      if (dim && *dim != product) {
        throw InputError("DiT config: 'dim' " + std::to_string(*dim) + " != num_attention_heads x attention_head_dim = " +
                         std::to_string(product));
      }
      dim = product;
    }
  } else {
    if (!dim) throw InputError("DiT config: missing required key 'dim'");
    if (!heads) throw InputError("DiT config: missing required key 'num_heads'");
    std::int64_t product = 0;
    if (head_dim && (__builtin_mul_overflow(*head_dim, *heads, &product) || product != *dim)) {
      throw InputError("DiT config: 'attention_head_dim' disagrees with dim/num_heads");
    }
  }
  if (!ffn) throw InputError("DiT config: missing required key 'ffn_dim'");
  if (!layers) throw InputError("DiT config: missing required key 'num_layers'");
  c.dim = *dim;
  c.num_heads = *heads;
  c.ffn_dim = *ffn;
  c.num_layers = *layers;
  c.validate();
  return c;
}

WanDiTConfig WanDiTConfig::from_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError(path + ": cannot open DiT config");
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded()) throw InputError(path + ": DiT config is not valid JSON");
  try {
    return from_json(j);
  } catch (const InputError& e) {
    throw InputError(path + ": " + e.what());
  }
}

nlohmann::json WanDiTConfig::to_diffusers_json() const {
  nlohmann::json j;
  j["_class_name"] = "WanTransformer3DModel";
  j["patch_size"] = patch_size;
  j["num_attention_heads"] = num_heads;
  j["attention_head_dim"] = dim / num_heads;
  j["in_channels"] = in_dim;
  j["out_channels"] = out_dim;
  j["text_dim"] = text_dim;
  j["freq_dim"] = freq_dim;
  j["ffn_dim"] = ffn_dim;
  j["num_layers"] = num_layers;
  j["cross_attn_norm"] = cross_attn_norm;
  j["qk_norm"] = qk_norm ? nlohmann::json("rms_norm_across_heads") : nlohmann::json(nullptr);
  j["eps"] = eps;
  j["image_dim"] = nullptr;
  j["added_kv_proj_dim"] = nullptr;
  j["rope_max_seq_len"] = 1024;
  // Not a WanTransformer3DModel field (diffusers keeps the text length in the pipeline and would
  // ignore it): written only when it differs from Wan's 512, so a small model's files say it.
  if (text_len != 512) j["text_len"] = text_len;
  return j;
}

nlohmann::json WanDiTConfig::to_json() const {
  nlohmann::json j;
  j["model_type"] = model_type;
  j["dim"] = dim;
  j["ffn_dim"] = ffn_dim;
  j["freq_dim"] = freq_dim;
  j["in_dim"] = in_dim;
  j["out_dim"] = out_dim;
  j["num_heads"] = num_heads;
  j["num_layers"] = num_layers;
  j["patch_size"] = patch_size;
  j["text_dim"] = text_dim;
  j["text_len"] = text_len;
  j["eps"] = eps;
  j["qk_norm"] = qk_norm;
  j["cross_attn_norm"] = cross_attn_norm;
  j["window_size"] = window_size;
  return j;
}

WanDiTConfig WanDiTConfig::infer_from_shapes(const std::map<std::string, std::vector<std::int64_t>>& shapes,
                                             std::optional<std::int64_t> num_heads, const std::string& label) {
  auto need = [&](const std::string& key, std::size_t rank) -> const std::vector<std::int64_t>& {
    auto it = shapes.find(key);
    if (it == shapes.end()) throw InputError(label + ": not a Wan2.1 DiT checkpoint (no '" + key + "' tensor)");
    if (it->second.size() != rank) {
      throw InputError(label + ": DiT tensor '" + key + "' has rank " + std::to_string(it->second.size()) + ", expected " +
                       std::to_string(rank));
    }
    return it->second;
  };
  WanDiTConfig c;
  const auto& patch = need("patch_embedding.weight", 5);
  c.dim = patch[0];
  c.in_dim = patch[1];
  c.patch_size = {patch[2], patch[3], patch[4]};
  c.freq_dim = need("time_embedding.0.weight", 2)[1];
  c.text_dim = need("text_embedding.0.weight", 2)[1];
  c.ffn_dim = need("blocks.0.ffn.0.weight", 2)[0];
  const std::int64_t head_out = need("head.head.weight", 2)[0];
  if (head_out % c.patch_volume() != 0) {
    throw InputError(label + ": 'head.head.weight' rows " + std::to_string(head_out) + " are not a multiple of the patch volume");
  }
  c.out_dim = head_out / c.patch_volume();
  std::int64_t layers = 0;
  bool image_conditioning = false;
  for (const auto& [key, shape] : shapes) {
    if (starts_with(key, "blocks.")) {
      const std::size_t dot = key.find('.', 7);
      try {
        layers = std::max<std::int64_t>(layers, std::stoll(key.substr(7, dot - 7)) + 1);
      } catch (const std::exception&) {
        throw InputError(label + ": malformed block key '" + key + "'");
      }
    }
    if (starts_with(key, "img_emb.")) image_conditioning = true;
  }
  c.num_layers = layers;
  c.qk_norm = shapes.count("blocks.0.self_attn.norm_q.weight") != 0;
  c.cross_attn_norm = shapes.count("blocks.0.norm3.weight") != 0;
  if (image_conditioning) c.model_type = "i2v";
  if (num_heads) {
    c.num_heads = *num_heads;
  } else if (c.dim == 1536) {
    c.num_heads = 12;
  } else if (c.dim == 5120) {
    c.num_heads = 40;
  } else if (c.dim % 128 == 0) {
    c.num_heads = c.dim / 128;
  } else {
    throw InputError(label + ": cannot infer the DiT head count for dim " + std::to_string(c.dim) +
                     "; pass a config with --dit-config");
  }
  c.validate();
  return c;
}

WanDiTConfig WanDiTConfig::infer_from_weights(const std::vector<std::shared_ptr<WeightFile>>& files,
                                              std::optional<std::int64_t> num_heads) {
  const auto sources = collect_dit_sources(files);
  std::map<std::string, std::vector<std::int64_t>> shapes;
  for (const auto& [key, src] : sources) shapes[key] = src.file->meta(src.key).shape;
  return infer_from_shapes(shapes, num_heads, files_label(files));
}

WanDiTConfig WanDiTConfig::infer_from_weights(const WeightFile& file, std::optional<std::int64_t> num_heads) {
  // Non-owning shared_ptr: the file outlives this call.
  std::shared_ptr<WeightFile> view(std::shared_ptr<WeightFile>(), const_cast<WeightFile*>(&file));
  return infer_from_weights(std::vector<std::shared_ptr<WeightFile>>{view}, num_heads);
}

// ---------------------------------------------------------------------------------------------
// Positional tables

std::pair<at::Tensor, at::Tensor> wan_rope_table(std::int64_t head_dim, std::int64_t positions) {
  const auto pairs = rope_axis_pairs(head_dim);
  const at::Tensor pos = at::arange(positions, at::TensorOptions().dtype(at::kDouble));
  std::vector<at::Tensor> angles;
  for (auto n : pairs) angles.push_back(at::outer(pos, rope_axis_frequencies(n, at::kCPU)));
  const at::Tensor all = at::cat(angles, 1);
  return {all.cos(), all.sin()};
}

std::pair<at::Tensor, at::Tensor> wan_rope_for_grid(std::int64_t head_dim, const Grid3& grid, at::Device device,
                                                    std::array<std::int64_t, 3> offset) {
  const auto pairs = rope_axis_pairs(head_dim);
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  const std::array<std::int64_t, 3> extent{grid.t, grid.h, grid.w};
  std::vector<at::Tensor> per_axis;
  for (int a = 0; a < 3; ++a) {
    const at::Tensor positions = at::arange(offset[a], offset[a] + extent[a], opts);
    at::Tensor angle = at::outer(positions, rope_axis_frequencies(pairs[a], device));  // [n_a, c_a]
    std::vector<std::int64_t> view_shape{1, 1, 1, pairs[a]};
    view_shape[a] = extent[a];
    per_axis.push_back(angle.view(view_shape).expand({grid.t, grid.h, grid.w, pairs[a]}));
  }
  const at::Tensor angles = at::cat(per_axis, -1).reshape({grid.numel(), head_dim / 2});
  return {angles.cos(), angles.sin()};
}

at::Tensor wan_timestep_sinusoid(const at::Tensor& t, std::int64_t dim) {
  const std::int64_t half = dim / 2;
  const at::Tensor position = t.reshape({-1}).to(at::kDouble);
  const at::Tensor exponents = at::arange(half, position.options()).div(static_cast<double>(half)).neg();
  const at::Tensor sinusoid = at::outer(position, at::pow(10000.0, exponents));
  return at::cat({sinusoid.cos(), sinusoid.sin()}, 1);
}

// ---------------------------------------------------------------------------------------------
// Text conditioning

WanTextCondition WanTextCondition::cat(const std::vector<WanTextCondition>& parts) {
  if (parts.empty()) throw InputError("WanTextCondition::cat: nothing to concatenate");
  WanTextCondition out;
  std::vector<at::Tensor> contexts;
  for (const auto& p : parts) {
    if (p.keys.size() != parts[0].keys.size()) throw InputError("WanTextCondition::cat: conditions from different models");
    contexts.push_back(p.context);
  }
  out.context = at::cat(contexts, 0);
  for (std::size_t layer = 0; layer < parts[0].keys.size(); ++layer) {
    std::vector<at::Tensor> ks, vs;
    for (const auto& p : parts) {
      ks.push_back(p.keys[layer]);
      vs.push_back(p.values[layer]);
    }
    out.keys.push_back(at::cat(ks, 0));
    out.values.push_back(at::cat(vs, 0));
  }
  return out;
}

WanTextCondition WanTextCondition::select(std::int64_t index) const {
  if (index < 0 || index >= batch()) throw InputError("WanTextCondition::select: index out of range");
  WanTextCondition out;
  out.context = context.narrow(0, index, 1);
  for (const auto& k : keys) out.keys.push_back(k.narrow(0, index, 1));
  for (const auto& v : values) out.values.push_back(v.narrow(0, index, 1));
  return out;
}

WanTextCondition WanTextCondition::to(at::Device device) const {
  WanTextCondition out;
  out.context = context.to(device);
  for (const auto& k : keys) out.keys.push_back(k.to(device));
  for (const auto& v : values) out.values.push_back(v.to(device));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Submodules

namespace wan {

LinearImpl::LinearImpl(std::int64_t in_features, std::int64_t out_features) {
  weight = register_parameter("weight", at::empty({out_features, in_features}));
  bias = register_parameter("bias", at::empty({out_features}));
}

at::Tensor LinearImpl::forward(const at::Tensor& x) const { return linear_in_weight_dtype(x, weight, bias); }

PatchEmbeddingImpl::PatchEmbeddingImpl(std::int64_t in_dim, std::int64_t dim, std::array<std::int64_t, 3> patch_)
    : patch(patch_) {
  weight = register_parameter("weight", at::empty({dim, in_dim, patch[0], patch[1], patch[2]}));
  bias = register_parameter("bias", at::empty({dim}));
}

at::Tensor PatchEmbeddingImpl::forward(const at::Tensor& x) const {
  const auto B = x.size(0), C = x.size(1), F = x.size(2), H = x.size(3), W = x.size(4);
  const auto p = patch[0], q = patch[1], r = patch[2];
  // Non-overlapping patches: the conv is a Linear over each patch's (c, p, q, r) values.
  at::Tensor patches = x.reshape({B, C, F / p, p, H / q, q, W / r, r})
                           .permute({0, 2, 4, 6, 1, 3, 5, 7})
                           .reshape({B, (F / p) * (H / q) * (W / r), C * p * q * r});
  return linear_in_weight_dtype(patches, weight.reshape({weight.size(0), -1}), bias);
}

RMSNormImpl::RMSNormImpl(std::int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", at::empty({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) const {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean({-1}, /*keepdim=*/true) + eps);
  return normed.to(x.scalar_type()) * weight;
}

AffineLayerNormImpl::AffineLayerNormImpl(std::int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", at::empty({dim}));
  bias = register_parameter("bias", at::empty({dim}));
}

at::Tensor AffineLayerNormImpl::forward(const at::Tensor& x) const {
  return at::layer_norm(x.to(at::kFloat), {weight.size(0)}, weight.to(at::kFloat), bias.to(at::kFloat), eps)
      .to(x.scalar_type());
}

MLPImpl::MLPImpl(std::int64_t in, std::int64_t hidden, std::int64_t out, Activation act_) : act(act_) {
  fc0 = register_module("0", Linear(in, hidden));
  fc2 = register_module("2", Linear(hidden, out));
}

at::Tensor MLPImpl::forward(const at::Tensor& x) const {
  at::Tensor h = fc0->forward(x);
  h = act == Activation::GeluTanh ? gelu_tanh(h) : silu_act(h);
  return fc2->forward(h);
}

TimeProjectionImpl::TimeProjectionImpl(std::int64_t dim, std::int64_t out) {
  fc1 = register_module("1", Linear(dim, out));
}

at::Tensor TimeProjectionImpl::forward(const at::Tensor& e) const { return fc1->forward(silu_act(e)); }

AttentionImpl::AttentionImpl(std::int64_t dim_, std::int64_t num_heads_, bool qk_norm, double eps)
    : dim(dim_), num_heads(num_heads_), head_dim(dim_ / num_heads_) {
  q = register_module("q", Linear(dim, dim));
  k = register_module("k", Linear(dim, dim));
  v = register_module("v", Linear(dim, dim));
  o = register_module("o", Linear(dim, dim));
  if (qk_norm) {
    norm_q = register_module("norm_q", RMSNorm(dim, eps));
    norm_k = register_module("norm_k", RMSNorm(dim, eps));
  }
}

at::Tensor AttentionImpl::attend(const AttentionSite& site, const at::Tensor& q_, const at::Tensor& k_,
                                 const at::Tensor& v_, const AttentionCall& call, const BlockContext& ctx) const {
  AttentionProcessor* processor = ctx.call->processors ? ctx.call->processors->find(site.layer, site.kind) : nullptr;
  return processor ? processor->attend(site, q_, k_, v_, call) : attention(q_, k_, v_, call);
}

at::Tensor AttentionImpl::self_attention(const at::Tensor& x, int layer, const BlockContext& ctx) {
  const auto B = x.size(0), N = x.size(1);
  at::Tensor qp = q->forward(x), kp = k->forward(x), vp = v->forward(x);
  // RMS norm over the full dim, then the head split.
  if (norm_q) qp = norm_q->forward(qp);
  if (norm_k) kp = norm_k->forward(kp);
  const at::Tensor qr = apply_rope(qp.reshape({B, N, num_heads, head_dim}), ctx.rope_cos, ctx.rope_sin);
  const at::Tensor kr = apply_rope(kp.reshape({B, N, num_heads, head_dim}), ctx.rope_cos, ctx.rope_sin);
  const at::Tensor qa = to_attention(qr, ctx.compute_dtype, ctx.attention_dtype).transpose(1, 2);
  const at::Tensor ka = to_attention(kr, ctx.compute_dtype, ctx.attention_dtype).transpose(1, 2);
  const at::Tensor va =
      to_attention(vp.reshape({B, N, num_heads, head_dim}), ctx.compute_dtype, ctx.attention_dtype).transpose(1, 2);
  AttentionCall call;
  call.scale = ctx.self_attn_scale;
  call.grid = ctx.grid;
  call.window = ctx.call->self_attn_window;
  AttentionSite site = ctx.site(layer, AttentionKind::Self);
  const SequenceParallel* sp = ctx.call->sequence_parallel;
  if (sp && sp->world_size() > 1) {
    // Ulysses: x holds this rank's N tokens (a shard); attention runs on all tokens of this
    // rank's heads, over the global grid, and the output goes back to the token shard.
    const std::int64_t tokens = ctx.grid.numel();
    site.head_offset = sp->rank() * (num_heads / sp->world_size());
    const at::Tensor out = attend(site, sp->tokens_to_heads(qa, tokens), sp->tokens_to_heads(ka, tokens),
                                  sp->tokens_to_heads(va, tokens), call, ctx);  // [B, heads/W, tokens, D]
    return o->forward(sp->heads_to_tokens(out, tokens).transpose(1, 2).reshape({B, N, dim}));
  }
  const at::Tensor out = attend(site, qa, ka, va, call, ctx);  // [B, heads, N, D]
  return o->forward(out.transpose(1, 2).reshape({B, N, dim}));
}

std::pair<at::Tensor, at::Tensor> AttentionImpl::context_keys_values(const at::Tensor& context,
                                                                     at::ScalarType attention_dtype) {
  const auto B = context.size(0), L = context.size(1);
  const at::ScalarType compute = k->weight.scalar_type();
  at::Tensor kp = k->forward(context);
  if (norm_k) kp = norm_k->forward(kp);
  const at::Tensor vp = v->forward(context);
  at::Tensor ka = to_attention(kp, compute, attention_dtype).reshape({B, L, num_heads, head_dim}).transpose(1, 2).contiguous();
  at::Tensor va = to_attention(vp, compute, attention_dtype).reshape({B, L, num_heads, head_dim}).transpose(1, 2).contiguous();
  return {ka, va};
}

at::Tensor AttentionImpl::cross_attention(const at::Tensor& x, int layer, const BlockContext& ctx) {
  const auto B = x.size(0), N = x.size(1);
  at::Tensor qp = q->forward(x);
  if (norm_q) qp = norm_q->forward(qp);
  const at::Tensor qa =
      to_attention(qp, ctx.compute_dtype, ctx.attention_dtype).reshape({B, N, num_heads, head_dim}).transpose(1, 2);
  AttentionCall call;
  call.scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  call.grid = ctx.grid;
  const AttentionSite site = ctx.site(layer, AttentionKind::Cross);
  // All text_len rows, zero-padding included, are attended: no key mask (as the reference).
  const at::Tensor out = attend(site, qa, ctx.cond->keys[layer], ctx.cond->values[layer], call, ctx);
  return o->forward(out.transpose(1, 2).reshape({B, N, dim}));
}

BlockImpl::BlockImpl(const WanDiTConfig& c) : dim(c.dim), eps(c.eps) {
  modulation = register_parameter("modulation", at::empty({1, 6, c.dim}));
  self_attn = register_module("self_attn", Attention(c.dim, c.num_heads, c.qk_norm, c.eps));
  if (c.cross_attn_norm) norm3 = register_module("norm3", AffineLayerNorm(c.dim, c.eps));
  cross_attn = register_module("cross_attn", Attention(c.dim, c.num_heads, c.qk_norm, c.eps));
  ffn = register_module("ffn", MLP(c.dim, c.ffn_dim, c.dim, MLPImpl::Activation::GeluTanh));
}

at::Tensor BlockImpl::forward(const at::Tensor& x, const at::Tensor& e0, int layer, const BlockContext& ctx) {
  // (shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff), each [B, 1, dim], f32.
  const auto m = (modulation.to(at::kFloat) + e0).chunk(6, 1);
  // Type promotion reproduces the reference: the modulated inputs and every residual update are
  // f32 even when the Linear outputs are bf16/f16.
  const at::Tensor sa_in = plain_layer_norm(x, dim, eps).to(at::kFloat) * (1 + m[1]) + m[0];
  at::Tensor h = x + self_attn->self_attention(sa_in, layer, ctx) * m[2];
  const at::Tensor ca_in = norm3 ? norm3->forward(h) : h;
  h = h + cross_attn->cross_attention(ca_in, layer, ctx);
  const at::Tensor ff_in = plain_layer_norm(h, dim, eps).to(at::kFloat) * (1 + m[4]) + m[3];
  return h + ffn->forward(ff_in) * m[5];
}

HeadImpl::HeadImpl(std::int64_t dim_, std::int64_t out_features, double eps_) : dim(dim_), eps(eps_) {
  modulation = register_parameter("modulation", at::empty({1, 2, dim}));
  head = register_module("head", Linear(dim, out_features));
}

at::Tensor HeadImpl::forward(const at::Tensor& x, const at::Tensor& e) const {
  // The head modulation uses the time embedding e itself, not the projected e0.
  const auto m = (modulation.to(at::kFloat) + e.unsqueeze(1)).chunk(2, 1);
  const at::Tensor normed = plain_layer_norm(x, dim, eps).to(at::kFloat);
  return head->forward(normed * (1 + m[1]) + m[0]).to(at::kFloat);
}

}  // namespace wan

// ---------------------------------------------------------------------------------------------
// WanDiT

namespace {

WanDiTConfig checked_config(const WanDiTConfig& c) {
  c.validate();
  if (c.model_type != "t2v") {
    throw InputError("DiT config: model_type '" + c.model_type + "' is not supported (only Wan2.1 t2v)");
  }
  if (c.window_size[0] != -1 || c.window_size[1] != -1) {
    throw InputError("DiT config: 'window_size' other than [-1, -1] is not supported");
  }
  return c;
}

}  // namespace

WanDiTImpl::WanDiTImpl(const WanDiTConfig& c) : config(checked_config(c)) {
  patch_embedding = register_module("patch_embedding", wan::PatchEmbedding(c.in_dim, c.dim, c.patch_size));
  text_embedding = register_module("text_embedding", wan::MLP(c.text_dim, c.dim, c.dim, wan::MLPImpl::Activation::GeluTanh));
  time_embedding = register_module("time_embedding", wan::MLP(c.freq_dim, c.dim, c.dim, wan::MLPImpl::Activation::SiLU));
  time_projection = register_module("time_projection", wan::TimeProjection(c.dim, 6 * c.dim));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (std::int64_t i = 0; i < c.num_layers; ++i) blocks->push_back(wan::Block(c));
  head = register_module("head", wan::Head(c.dim, c.patch_volume() * c.out_dim, c.eps));
}

bool WanDiTImpl::is_f32_parameter(const std::string& name) {
  return ends_with(name, "modulation") || name.find("norm_q.") != std::string::npos ||
         name.find("norm_k.") != std::string::npos || name.find(".norm3.") != std::string::npos ||
         starts_with(name, "time_embedding.") || starts_with(name, "time_projection.") || starts_with(name, "head.");
}

void WanDiTImpl::set_compute_dtype(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
    throw InputError("DiT compute dtype must be f32, bf16 or f16, got " + dtype_name(dtype));
  }
  torch::NoGradGuard no_grad;
  for (auto& item : named_parameters(/*recurse=*/true)) {
    const at::ScalarType target = is_f32_parameter(item.key()) ? at::kFloat : dtype;
    if (item.value().scalar_type() != target) item.value().set_data(item.value().to(target));
  }
  compute_dtype_ = dtype;
}

void WanDiTImpl::reset_parameters() {
  set_compute_dtype(at::kFloat);
  torch::NoGradGuard no_grad;
  const double dim = static_cast<double>(config.dim);
  for (auto& item : named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    at::Tensor p = item.value();
    if (ends_with(name, "modulation")) {
      p.normal_().div_(std::sqrt(dim));
    } else if (name.find("norm") != std::string::npos) {
      if (ends_with(name, ".weight")) p.fill_(1.0);
      else p.zero_();
    } else if (name == "patch_embedding.weight") {
      at::Tensor flat = p.view({p.size(0), -1});
      torch::nn::init::xavier_uniform_(flat);
    } else if (name == "patch_embedding.bias") {
      // nn.Conv3d's own bias init, which the reference's init_weights leaves in place.
      const double bound = 1.0 / std::sqrt(static_cast<double>(patch_embedding->weight[0].numel()));
      p.uniform_(-bound, bound);
    } else if (ends_with(name, ".bias")) {
      p.zero_();
    } else if (name == "head.head.weight") {
      p.zero_();
    } else if (starts_with(name, "text_embedding.") || starts_with(name, "time_embedding.")) {
      p.normal_(0.0, 0.02);
    } else {
      torch::nn::init::xavier_uniform_(p);
    }
  }
}

at::ScalarType WanDiTImpl::attention_dtype(const at::Device& device) const {
  return compute_dtype_ == at::kHalf && device.is_cpu() ? at::kFloat : compute_dtype_;
}

WanTextCondition WanDiTImpl::encode_text(const at::Tensor& context, std::map<std::string, at::Tensor>* capture) {
  at::Tensor ctx = context.dim() == 2 ? context.unsqueeze(0) : context;
  if (ctx.dim() != 3 || ctx.size(2) != config.text_dim) {
    throw InputError("DiT text context must be [B, L, " + std::to_string(config.text_dim) + "], got " +
                     shape_string(context.sizes()));
  }
  const std::int64_t L = ctx.size(1);
  if (L > config.text_len) {
    throw InputError("DiT text context has " + std::to_string(L) + " tokens; at most text_len = " +
                     std::to_string(config.text_len));
  }
  const at::Device device = patch_embedding->weight.device();
  // Zero rows up to text_len BEFORE the embedding, as the reference: the padding rows become a
  // constant embedded vector that cross-attention (unmasked) sees.
  const at::Tensor padded = at::constant_pad_nd(ctx.to(device), {0, 0, 0, config.text_len - L}, 0.0);
  WanTextCondition cond;
  cond.context = text_embedding->forward(padded);
  if (capture) (*capture)["text_embedding"] = cond.context.detach().to(at::kFloat).clone();
  const at::ScalarType adt = attention_dtype(device);
  for (const auto& module : *blocks) {
    auto kv = module->as<wan::BlockImpl>()->cross_attn->context_keys_values(cond.context, adt);
    cond.keys.push_back(kv.first);
    cond.values.push_back(kv.second);
  }
  return cond;
}

at::Tensor WanDiTImpl::forward(const at::Tensor& x, const at::Tensor& t, const WanTextCondition& cond,
                               const DiTCall& call) {
  const auto& c = config;
  std::map<std::string, at::Tensor>* capture = call.capture;
  if (x.dim() != 5 || x.size(1) != c.in_dim) {
    throw InputError("DiT input must be [B, " + std::to_string(c.in_dim) + ", F, H, W], got " + shape_string(x.sizes()));
  }
  const std::int64_t B = x.size(0);
  for (int a = 0; a < 3; ++a) {
    if (x.size(2 + a) % c.patch_size[a] != 0 || x.size(2 + a) == 0) {
      throw InputError("DiT input " + shape_string(x.sizes()) + ": F, H, W must be positive multiples of the patch size " +
                       shape_string(c.patch_size));
    }
  }
  if (t.numel() != B && t.numel() != 1) {
    throw InputError("DiT timesteps: expected " + std::to_string(B) + " values, got " + std::to_string(t.numel()));
  }
  if (!call.row_roles.empty() && static_cast<std::int64_t>(call.row_roles.size()) != B) {
    throw InputError("DiT call labels " + std::to_string(call.row_roles.size()) + " rows but the batch has " +
                     std::to_string(B));
  }
  if (static_cast<std::int64_t>(cond.keys.size()) != c.num_layers || static_cast<std::int64_t>(cond.values.size()) != c.num_layers) {
    throw InputError("DiT text condition has " + std::to_string(cond.keys.size()) + " layers; the model has " +
                     std::to_string(c.num_layers) + " (encode it with this model's encode_text)");
  }
  if (cond.batch() != B && cond.batch() != 1) {
    throw InputError("DiT text condition batch " + std::to_string(cond.batch()) + " does not match latent batch " +
                     std::to_string(B));
  }
  const at::Device device = patch_embedding->weight.device();
  if (x.device() != device || cond.context.device() != device) {
    throw InputError("DiT inputs must be on the model's device (" + device.str() + ")");
  }

  const Grid3 grid{x.size(2) / c.patch_size[0], x.size(3) / c.patch_size[1], x.size(4) / c.patch_size[2]};
  const std::int64_t tokens = grid.numel();

  // Patch embedding in the compute dtype (the residual stream becomes f32 at the first update).
  at::Tensor h = patch_embedding->forward(x);  // [B, tokens, dim]
  if (capture) {
    (*capture)["patch_embedding"] =
        h.detach().to(at::kFloat).transpose(1, 2).reshape({B, c.dim, grid.t, grid.h, grid.w}).clone();
  }
  // Sequence parallel: from here to the head this rank holds N = ceil(tokens / W) tokens.
  const SequenceParallel* sp =
      call.sequence_parallel && call.sequence_parallel->world_size() > 1 ? call.sequence_parallel : nullptr;
  if (sp) {
    check_ulysses_heads(c.num_heads, sp->world_size());
    h = sp->shard_tokens(h);
  }
  const std::int64_t N = h.size(1);
  // The residual stream of every real token, for a capture.
  const auto whole = [&](const at::Tensor& part) { return sp ? sp->gather_tokens(part, tokens) : part; };

  // Timestep embedding: float64 sinusoid, f32 MLP.
  at::Tensor t_batch = t.reshape({-1}).to(device);
  if (t_batch.numel() == 1 && B > 1) t_batch = t_batch.expand({B});
  const at::Tensor e = time_embedding->forward(wan_timestep_sinusoid(t_batch, c.freq_dim).to(at::kFloat)).to(at::kFloat);
  const at::Tensor e0 = time_projection->forward(e).to(at::kFloat).reshape({B, 6, c.dim});
  if (capture) {
    (*capture)["time_embedding_e"] = e.detach().clone();
    (*capture)["time_projection_e0"] = e0.detach().clone();
  }

  WanTextCondition expanded;
  const WanTextCondition* text = &cond;
  if (cond.batch() == 1 && B > 1) {
    expanded.context = cond.context.expand({B, -1, -1});
    for (const auto& k : cond.keys) expanded.keys.push_back(k.expand({B, -1, -1, -1}));
    for (const auto& v : cond.values) expanded.values.push_back(v.expand({B, -1, -1, -1}));
    text = &expanded;
  }

  wan::BlockContext ctx;
  ctx.grid = grid;
  auto rope = wan_rope_for_grid(c.head_dim(), grid, device, call.position_offset);
  if (sp) rope = {sp->shard_tokens(rope.first.unsqueeze(0)).squeeze(0), sp->shard_tokens(rope.second.unsqueeze(0)).squeeze(0)};
  ctx.rope_cos = rope.first.view({1, N, 1, c.head_dim() / 2}).to(rope_dtype);
  ctx.rope_sin = rope.second.view({1, N, 1, c.head_dim() / 2}).to(rope_dtype);
  ctx.cond = text;
  ctx.call = &call;
  ctx.self_attn_scale = call.self_attn_scale_factor / std::sqrt(static_cast<double>(c.head_dim()));
  ctx.compute_dtype = compute_dtype_;
  ctx.attention_dtype = attention_dtype(device);

  // Skip-layer guidance: per block, the rows that bypass it (empty when no row's role skips it).
  std::vector<std::vector<std::int64_t>> skipped_rows(static_cast<std::size_t>(c.num_layers));
  if (!call.skip_blocks.empty()) {
    if (call.row_roles.empty()) throw InputError("DiT call: skip_blocks needs labelled rows (row_roles)");
    for (std::int64_t row = 0; row < B; ++row) {
      auto it = call.skip_blocks.find(call.row_roles[static_cast<std::size_t>(row)]);
      if (it == call.skip_blocks.end()) continue;
      for (int block : it->second) {
        if (block < 0 || block >= c.num_layers) {
          throw InputError("DiT call: skipped block " + std::to_string(block) + " out of range 0.." +
                           std::to_string(c.num_layers - 1));
        }
        skipped_rows[static_cast<std::size_t>(block)].push_back(row);
      }
    }
  }

  int layer = 0;
  for (const auto& module : *blocks) {
    const auto& skip = skipped_rows[static_cast<std::size_t>(layer)];
    if (skip.empty()) {
      h = module->as<wan::BlockImpl>()->forward(h, e0, layer, ctx);
    } else if (static_cast<std::int64_t>(skip.size()) == B) {
      h = h.to(at::kFloat);  // every row skips this block (a block's output is f32)
    } else {
      // The block runs on every row (batched attention processors see the usual layout), then the
      // skipping rows take their input back: out = in on those rows, bitwise.
      const at::Tensor in = h;
      at::Tensor out = module->as<wan::BlockImpl>()->forward(h, e0, layer, ctx);
      const at::Tensor index = at::tensor(skip, at::TensorOptions().dtype(at::kLong).device(device));
      h = out.index_copy(0, index, in.index_select(0, index).to(out.scalar_type()));
    }
    if (capture) (*capture)["block" + std::to_string(layer) + "_out"] = whole(h.detach().to(at::kFloat)).clone();
    ++layer;
  }

  // The head is per token: on a shard it runs on the shard and its (smaller) output is gathered.
  const at::Tensor out = whole(head->forward(h, e));  // [B, tokens, p*q*r*out_dim]
  if (capture) (*capture)["head_out"] = out.detach().clone();

  // Unpatchify: each token's features are ordered (p, q, r, c) with c fastest.
  const auto p = c.patch_size[0], q = c.patch_size[1], r = c.patch_size[2];
  return out.reshape({B, grid.t, grid.h, grid.w, p, q, r, c.out_dim})
      .permute({0, 7, 1, 4, 2, 5, 3, 6})
      .reshape({B, c.out_dim, grid.t * p, grid.h * q, grid.w * r});
}

// ---------------------------------------------------------------------------------------------
// Loading

void load_wan_dit_weights(WanDiT& model, const std::vector<std::shared_ptr<WeightFile>>& files,
                          at::ScalarType compute_dtype) {
  if (!model) throw RuntimeError("load_wan_dit_weights: empty model");
  if (files.empty()) throw InputError("DiT weights: no files given");
  if (compute_dtype != at::kFloat && compute_dtype != at::kBFloat16 && compute_dtype != at::kHalf) {
    throw InputError("DiT compute dtype must be f32, bf16 or f16, got " + dtype_name(compute_dtype));
  }
  const std::string label = files_label(files);
  const auto sources = collect_dit_sources(files);
  auto params = model->named_parameters(/*recurse=*/true);

  // Validate everything before touching the model, so a bad file leaves it as it was.
  std::set<std::string> used;
  for (const auto& item : params) {
    const std::string& name = item.key();
    auto it = sources.find(name);
    if (it == sources.end()) throw InputError(label + ": missing DiT weight '" + name + "'");
    const DitSource& src = it->second;
    const TensorMeta& meta = src.file->meta(src.key);
    if (meta.dtype != "F32" && meta.dtype != "F16" && meta.dtype != "BF16" && meta.dtype != "F64" &&
        meta.dtype != "F8_E4M3" && meta.dtype != "F8_E5M2") {
      throw InputError(src.file->path() + ": DiT weight '" + src.key + "' has non-float dtype " + meta.dtype);
    }
    if (at::IntArrayRef(meta.shape) != item.value().sizes()) {
      throw InputError(src.file->path() + ": DiT weight '" + src.key + "' has shape " + shape_string(meta.shape) +
                       ", expected " + shape_string(item.value().sizes()));
    }
    if (src.scale_file) {
      const auto& scale_shape = src.scale_file->meta(src.scale_key).shape;
      std::int64_t n = 1;
      for (auto d : scale_shape) n *= d;
      if (n != 1 && n != meta.shape[0]) {
        throw InputError(src.scale_file->path() + ": scale '" + src.scale_key + "' has shape " + shape_string(scale_shape) +
                         "; only per-tensor or per-output-channel scales are supported");
      }
    }
    used.insert(name);
  }
  for (const auto& [name, src] : sources) {
    if (!used.count(name)) {
      throw InputError(src.file->path() + ": unexpected tensor '" + src.key + "' (not a parameter of this Wan2.1 t2v DiT)");
    }
  }

  torch::NoGradGuard no_grad;
  for (auto& item : params) {
    const DitSource& src = sources.at(item.key());
    at::Tensor value = src.file->load(src.key);
    if (src.scale_file) {
      // ComfyUI "scaled" fp8: the real weight is the stored one times its scale.
      at::Tensor scale = src.scale_file->load(src.scale_key).to(at::kFloat);
      if (scale.numel() != 1) {
        std::vector<std::int64_t> shape(value.dim(), 1);
        shape[0] = value.size(0);
        scale = scale.reshape(shape);
      } else {
        scale = scale.reshape({});
      }
      value = value.to(at::kFloat) * scale;
    }
    const at::ScalarType target = WanDiTImpl::is_f32_parameter(item.key()) ? at::kFloat : compute_dtype;
    // Always a copy: the loaded tensor may be a read-only view of the mapped file.
    item.value().set_data(value.to(item.value().device(), target, /*non_blocking=*/false, /*copy=*/true));
  }
  model->set_compute_dtype(compute_dtype);
}

}  // namespace vdit
