#include "vdit/models/umt5.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "vdit/common.h"
#include "vdit/io/checkpoint.h"

namespace vdit {

namespace {

std::string shape_string(at::IntArrayRef shape) {
  std::ostringstream s;
  s << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// torch.finfo(dtype).min: what the reference adds for a masked key. It must be the dtype's own
// lowest value (f32's lowest rounds to -inf in bf16).
double lowest_value(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return std::numeric_limits<float>::lowest();
    case at::kDouble: return std::numeric_limits<double>::lowest();
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::lowest());
    default: throw InputError("umT5: unsupported compute dtype " + dtype_name(dtype));
  }
}

// The reference's GELU module, written out op by op so 16-bit runs round the same way.
at::Tensor gelu_tanh(const at::Tensor& x) {
  return 0.5 * x * (1.0 + at::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * at::pow(x, 3.0))));
}

// fp16 residual streams overflow in the XXL model; the reference clamps only when an inf appeared.
at::Tensor fp16_clamp(const at::Tensor& x) {
  if (x.scalar_type() == at::kHalf && at::isinf(x).any().item<bool>()) {
    const double limit = static_cast<double>(std::numeric_limits<c10::Half>::max()) - 1000.0;
    return at::clamp(x, -limit, limit);
  }
  return x;
}

}  // namespace

// ---- config --------------------------------------------------------------------------------------

void UMT5Config::validate() const {
  const auto positive = [](std::int64_t v, const char* name) {
    if (v <= 0) throw InputError(std::string("umT5 config: ") + name + " must be positive (got " + std::to_string(v) + ")");
  };
  positive(vocab, "vocab");
  positive(dim, "dim");
  positive(dim_attn, "dim_attn");
  positive(dim_ffn, "dim_ffn");
  positive(num_heads, "num_heads");
  positive(num_layers, "num_layers");
  positive(num_buckets, "num_buckets");
  if (dim_attn % num_heads != 0)
    throw InputError("umT5 config: dim_attn " + std::to_string(dim_attn) + " is not a multiple of num_heads " +
                     std::to_string(num_heads));
  if (num_buckets < 4 || num_buckets % 2 != 0)
    throw InputError("umT5 config: num_buckets must be even and >= 4 (got " + std::to_string(num_buckets) + ")");
  if (max_distance <= num_buckets / 4)
    throw InputError("umT5 config: max_distance must exceed num_buckets/4 (got " + std::to_string(max_distance) + ")");
  if (!(eps > 0)) throw InputError("umT5 config: eps must be positive");
}

UMT5Config UMT5Config::preset(const std::string& name) {
  if (name == "umt5-xxl" || name == "umt5_xxl") {
    UMT5Config c;
    c.vocab = 256384;
    c.dim = 4096;
    c.dim_attn = 4096;
    c.dim_ffn = 10240;
    c.num_heads = 64;
    c.num_layers = 24;
    c.num_buckets = 32;
    c.max_distance = 128;
    c.eps = 1e-6;
    return c;
  }
  throw InputError("unknown umT5 preset '" + name + "' (expected umt5-xxl)");
}

namespace {
// HF UMT5EncoderModel block leaf <-> original Wan block leaf; one table for both directions.
constexpr std::pair<const char*, const char*> kUMT5BlockNames[] = {
    {"layer.0.layer_norm.weight", "norm1.weight"},
    {"layer.0.SelfAttention.q.weight", "attn.q.weight"},
    {"layer.0.SelfAttention.k.weight", "attn.k.weight"},
    {"layer.0.SelfAttention.v.weight", "attn.v.weight"},
    {"layer.0.SelfAttention.o.weight", "attn.o.weight"},
    {"layer.0.SelfAttention.relative_attention_bias.weight", "pos_embedding.embedding.weight"},
    {"layer.1.layer_norm.weight", "norm2.weight"},
    {"layer.1.DenseReluDense.wi_0.weight", "ffn.gate.0.weight"},
    {"layer.1.DenseReluDense.wi_1.weight", "ffn.fc1.weight"},
    {"layer.1.DenseReluDense.wo.weight", "ffn.fc2.weight"},
};
}  // namespace

std::string canonical_umt5_key(const std::string& raw_key) {
  std::string key = raw_key;
  for (const char* prefix : {"text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "text_encoder."}) {
    if (starts_with(key, prefix)) {
      key = key.substr(std::string(prefix).size());
      break;
    }
  }
  if (key == "spiece_model" || key == "scaled_fp8" || key == "encoder.embed_tokens.weight" ||
      starts_with(key, "decoder.") || starts_with(key, "lm_head.") || ends_with(key, ".scale_input"))
    return "";
  // fp8 "_scaled" files: the per-weight scale follows its weight's name.
  if (ends_with(key, ".scale_weight")) {
    const std::string stem = key.substr(0, key.size() - std::string(".scale_weight").size());
    const std::string weight = canonical_umt5_key(stem + ".weight");
    if (weight.empty() || !ends_with(weight, ".weight")) return weight;
    return weight.substr(0, weight.size() - std::string(".weight").size()) + ".scale_weight";
  }
  if (key == "shared.weight") return "token_embedding.weight";
  if (key == "encoder.final_layer_norm.weight") return "norm.weight";
  const std::string block_prefix = "encoder.block.";
  if (starts_with(key, block_prefix)) {
    std::size_t pos = block_prefix.size();
    std::size_t end = pos;
    while (end < key.size() && std::isdigit(static_cast<unsigned char>(key[end]))) ++end;
    if (end == pos || end >= key.size() || key[end] != '.') return key;
    const std::string index = key.substr(pos, end - pos);
    const std::string rest = key.substr(end + 1);
    for (const auto& [hf, wan] : kUMT5BlockNames)
      if (rest == hf) return "blocks." + index + "." + wan;
  }
  return key;
}

std::string hf_umt5_key(const std::string& key) {
  // The inverse of canonical_umt5_key on UMT5EncoderModel names.
  if (key == "token_embedding.weight") return "shared.weight";
  if (key == "norm.weight") return "encoder.final_layer_norm.weight";
  if (starts_with(key, "blocks.")) {
    const std::size_t end = key.find('.', 7);
    if (end == std::string::npos) return key;
    const std::string index = key.substr(7, end - 7), rest = key.substr(end + 1);
    for (const auto& [hf, wan] : kUMT5BlockNames)
      if (rest == wan) return "encoder.block." + index + "." + hf;
  }
  return key;
}

namespace {

struct SourceMap {
  std::map<std::string, std::string> file_key;  // canonical name -> key in the file
  std::vector<std::string> ignored;             // keys canonicalised to ""
};

SourceMap map_sources(const WeightFile& file) {
  SourceMap map;
  std::string tied_embedding;  // encoder.embed_tokens.weight, used only when shared.weight is absent
  for (const std::string& key : file.keys()) {
    const std::string canonical = canonical_umt5_key(key);
    if (canonical.empty()) {
      if (ends_with(key, "encoder.embed_tokens.weight")) tied_embedding = key;
      map.ignored.push_back(key);
      continue;
    }
    auto [it, inserted] = map.file_key.emplace(canonical, key);
    if (!inserted)
      throw InputError(file.path() + ": keys '" + it->second + "' and '" + key + "' both hold umT5 weight '" +
                       canonical + "'");
  }
  if (!tied_embedding.empty() && map.file_key.count("token_embedding.weight") == 0)
    map.file_key["token_embedding.weight"] = tied_embedding;
  return map;
}

const std::vector<std::int64_t>& required_shape(const WeightFile& file, const SourceMap& map,
                                                const std::string& canonical, std::size_t rank) {
  auto it = map.file_key.find(canonical);
  if (it == map.file_key.end())
    throw InputError(file.path() + ": no umT5 weight '" + canonical + "' (nor its HF name) in the file");
  const auto& shape = file.meta(it->second).shape;
  if (shape.size() != rank)
    throw InputError(file.path() + ": '" + it->second + "' has shape " + shape_string(shape) + ", expected " +
                     std::to_string(rank) + " dimensions");
  return shape;
}

}  // namespace

UMT5Config UMT5Config::infer_from_weights(const WeightFile& file) {
  const SourceMap map = map_sources(file);
  if (map.file_key.count("pos_embedding.embedding.weight"))
    throw InputError(file.path() + ": a T5 encoder with one shared position table (shared_pos=True) is not umT5");
  UMT5Config c;
  const auto& embedding = required_shape(file, map, "token_embedding.weight", 2);
  c.vocab = embedding[0];
  c.dim = embedding[1];
  c.dim_attn = required_shape(file, map, "blocks.0.attn.q.weight", 2)[0];
  c.dim_ffn = required_shape(file, map, "blocks.0.ffn.fc1.weight", 2)[0];
  const auto& table = required_shape(file, map, "blocks.0.pos_embedding.embedding.weight", 2);
  c.num_buckets = table[0];
  c.num_heads = table[1];
  std::int64_t layers = 0;
  while (map.file_key.count("blocks." + std::to_string(layers) + ".norm1.weight")) ++layers;
  c.num_layers = layers;
  if (layers > 1 && map.file_key.count("blocks.1.pos_embedding.embedding.weight") == 0)
    throw InputError(file.path() + ": only block 0 has a relative position table: a T5 with shared positions, "
                     "not umT5 (which has one per layer)");
  c.validate();
  return c;
}

// ---- bucket table ------------------------------------------------------------------------------

at::Tensor t5_relative_position_bucket(const at::Tensor& rel_pos, std::int64_t num_buckets, std::int64_t max_distance,
                                       bool bidirectional) {
  const at::Tensor rel = rel_pos.to(at::kLong);
  at::Tensor buckets;
  at::Tensor distance;
  std::int64_t buckets_per_side = num_buckets;
  if (bidirectional) {
    buckets_per_side = num_buckets / 2;
    buckets = (rel > 0).to(at::kLong) * buckets_per_side;
    distance = rel.abs();
  } else {
    buckets = at::zeros_like(rel);
    distance = (-rel).clamp_min(0);
  }
  const std::int64_t max_exact = buckets_per_side / 2;
  // Same f32 op sequence as the reference, so the boundaries (distances 16, 32, 64, 128 for the
  // umT5 numbers) land in the same bucket. Distance 0 is clamped to 1 only to keep log() finite;
  // it takes the exact branch anyway.
  const at::Tensor log_ratio = at::log(distance.clamp_min(1).to(at::kFloat) / max_exact) /
                               std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact));
  const at::Tensor large = (max_exact + (log_ratio * (buckets_per_side - max_exact)).to(at::kLong))
                               .clamp_max(buckets_per_side - 1);
  return buckets + at::where(distance < max_exact, distance, large);
}

// ---- modules -----------------------------------------------------------------------------------

T5LinearImpl::T5LinearImpl(std::int64_t in, std::int64_t out, const at::TensorOptions& options) {
  weight = register_parameter("weight", at::empty({out, in}, options));
}

at::Tensor T5LinearImpl::forward(const at::Tensor& x) { return linear_f32_accumulate(x, weight); }

T5EmbeddingImpl::T5EmbeddingImpl(std::int64_t rows, std::int64_t cols, const at::TensorOptions& options) {
  weight = register_parameter("weight", at::empty({rows, cols}, options));
}

at::Tensor T5EmbeddingImpl::forward(const at::Tensor& indices) { return at::embedding(weight, indices); }

T5RMSNormImpl::T5RMSNormImpl(std::int64_t dim, double eps_, const at::TensorOptions& options) : eps(eps_) {
  weight = register_parameter("weight", at::ones({dim}, options));
}

at::Tensor T5RMSNormImpl::forward(const at::Tensor& x) {
  // x * rsqrt(mean(x^2) + eps) with the statistic in f32; the product promotes to f32 and is only
  // brought back to the weight's dtype when that is 16-bit (an f32 weight keeps f32).
  at::Tensor y = x * at::rsqrt(x.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true) + eps);
  const auto wt = weight.scalar_type();
  if (wt == at::kHalf || wt == at::kBFloat16) y = y.to(wt);
  return weight * y;
}

T5RelativeEmbeddingImpl::T5RelativeEmbeddingImpl(std::int64_t num_buckets, std::int64_t num_heads,
                                                 const at::TensorOptions& options) {
  embedding = register_module("embedding", T5Embedding(num_buckets, num_heads, options));
}

at::Tensor T5RelativeEmbeddingImpl::forward(const at::Tensor& buckets) {
  return embedding(buckets).permute({2, 0, 1}).unsqueeze(0);  // [1, heads, Lq, Lk]
}

T5AttentionImpl::T5AttentionImpl(const UMT5Config& c, const at::TensorOptions& options) : num_heads(c.num_heads) {
  q = register_module("q", T5Linear(c.dim, c.dim_attn, options));
  k = register_module("k", T5Linear(c.dim, c.dim_attn, options));
  v = register_module("v", T5Linear(c.dim, c.dim_attn, options));
  o = register_module("o", T5Linear(c.dim_attn, c.dim, options));
}

at::Tensor T5AttentionImpl::forward(const at::Tensor& x, const at::Tensor& bias) {
  const std::int64_t batch = x.size(0), length = x.size(1);
  const auto heads_first = [&](const at::Tensor& t) { return t.view({batch, length, num_heads, -1}).transpose(1, 2); };
  const at::Tensor qh = heads_first(q(x));
  const at::Tensor kh = heads_first(k(x));
  const at::Tensor vh = heads_first(v(x));
  // T5 folds the scale into its weights: no 1/sqrt(head_dim) here.
  const at::Tensor logits = matmul_f32_accumulate(qh, kh.transpose(-1, -2)) + bias;
  const at::Tensor probs = at::softmax(logits.to(at::kFloat), -1).to(logits.scalar_type());
  const at::Tensor mixed = matmul_f32_accumulate(probs, vh).transpose(1, 2).reshape({batch, length, -1});
  return o(mixed);
}

T5FeedForwardImpl::T5FeedForwardImpl(const UMT5Config& c, const at::TensorOptions& options) {
  gate_proj = T5Linear(c.dim, c.dim_ffn, options);
  gate = register_module("gate", torch::nn::ModuleList(gate_proj));
  fc1 = register_module("fc1", T5Linear(c.dim, c.dim_ffn, options));
  fc2 = register_module("fc2", T5Linear(c.dim_ffn, c.dim, options));
}

at::Tensor T5FeedForwardImpl::forward(const at::Tensor& x) { return fc2(fc1(x) * gelu_tanh(gate_proj(x))); }

T5BlockImpl::T5BlockImpl(const UMT5Config& c, const at::TensorOptions& options) {
  norm1 = register_module("norm1", T5RMSNorm(c.dim, c.eps, options));
  attn = register_module("attn", T5Attention(c, options));
  norm2 = register_module("norm2", T5RMSNorm(c.dim, c.eps, options));
  ffn = register_module("ffn", T5FeedForward(c, options));
  pos_embedding = register_module("pos_embedding", T5RelativeEmbedding(c.num_buckets, c.num_heads, options));
}

at::Tensor T5BlockImpl::forward(const at::Tensor& x, const at::Tensor& key_masked, const at::Tensor& buckets) {
  at::Tensor bias = pos_embedding(buckets).to(x.scalar_type());
  if (key_masked.defined()) bias = bias.masked_fill(key_masked, lowest_value(x.scalar_type()));
  at::Tensor h = fp16_clamp(x + attn(norm1(x), bias));
  return fp16_clamp(h + ffn(norm2(h)));
}

UMT5EncoderImpl::UMT5EncoderImpl(const UMT5Config& config, const at::TensorOptions& options, bool random_init)
    : config_(config) {
  config_.validate();
  token_embedding = register_module("token_embedding", T5Embedding(config_.vocab, config_.dim, options));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (std::int64_t i = 0; i < config_.num_layers; ++i) blocks->push_back(T5Block(config_, options));
  norm = register_module("norm", T5RMSNorm(config_.dim, config_.eps, options));
  if (random_init) reset_parameters();
}

void UMT5EncoderImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  const UMT5Config& c = config_;
  const auto inv_sqrt = [](double v) { return 1.0 / std::sqrt(v); };
  token_embedding->weight.normal_(0.0, 1.0);
  norm->weight.fill_(1.0);
  for (const auto& module : *blocks) {
    auto block = module->as<T5BlockImpl>();
    block->norm1->weight.fill_(1.0);
    block->norm2->weight.fill_(1.0);
    block->attn->q->weight.normal_(0.0, inv_sqrt(static_cast<double>(c.dim * c.dim_attn)));
    block->attn->k->weight.normal_(0.0, inv_sqrt(static_cast<double>(c.dim)));
    block->attn->v->weight.normal_(0.0, inv_sqrt(static_cast<double>(c.dim)));
    block->attn->o->weight.normal_(0.0, inv_sqrt(static_cast<double>(c.num_heads * c.dim_attn)));
    block->ffn->gate_proj->weight.normal_(0.0, inv_sqrt(static_cast<double>(c.dim)));
    block->ffn->fc1->weight.normal_(0.0, inv_sqrt(static_cast<double>(c.dim)));
    block->ffn->fc2->weight.normal_(0.0, inv_sqrt(static_cast<double>(c.dim_ffn)));
    block->pos_embedding->embedding->weight.normal_(0.0, inv_sqrt(static_cast<double>(2 * c.num_buckets * c.num_heads)));
  }
}

at::Tensor UMT5EncoderImpl::forward(const at::Tensor& ids_in, const at::Tensor& mask_in) {
  if (!ids_in.defined() || ids_in.dim() != 2)
    throw InputError("umT5: token ids must be a [batch, length] tensor");
  if (at::isFloatingType(ids_in.scalar_type()) || ids_in.scalar_type() == at::kBool)
    throw InputError("umT5: token ids must be an integer tensor (got " + dtype_name(ids_in.scalar_type()) + ")");
  const std::int64_t batch = ids_in.size(0), length = ids_in.size(1);
  if (batch == 0 || length == 0) throw InputError("umT5: empty token id tensor " + shape_string(ids_in.sizes()));
  if (mask_in.defined() && mask_in.sizes() != ids_in.sizes())
    throw InputError("umT5: mask shape " + shape_string(mask_in.sizes()) + " differs from ids shape " +
                     shape_string(ids_in.sizes()));
  const at::Device dev = device();
  const at::Tensor ids = ids_in.to(dev, at::kLong);
  const auto range = at::aminmax(ids);
  const std::int64_t lo = std::get<0>(range).item<std::int64_t>(), hi = std::get<1>(range).item<std::int64_t>();
  if (lo < 0 || hi >= config_.vocab)
    throw InputError("umT5: token id " + std::to_string(lo < 0 ? lo : hi) + " outside the vocab [0, " +
                     std::to_string(config_.vocab) + ")");

  at::Tensor key_masked;  // [B, 1, 1, L], true where the key is padding
  if (mask_in.defined()) key_masked = (mask_in.to(dev) == 0).view({batch, 1, 1, length});

  const auto positions = at::arange(length, at::TensorOptions().dtype(at::kLong).device(dev));
  const at::Tensor buckets = t5_relative_position_bucket(positions.unsqueeze(0) - positions.unsqueeze(1),
                                                         config_.num_buckets, config_.max_distance, true);
  at::Tensor x = token_embedding(ids);
  for (const auto& module : *blocks) x = module->as<T5BlockImpl>()->forward(x, key_masked, buckets);
  return norm(x).to(at::kFloat);
}

// ---- loading -----------------------------------------------------------------------------------

void load_umt5_weights(UMT5Encoder& model, const WeightFile& file, at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    throw InputError("umT5: unsupported weight dtype " + dtype_name(dtype) + " (expected f32, bf16 or f16)");
  const SourceMap map = map_sources(file);
  if (model->dtype() != dtype) model->to(dtype);

  torch::NoGradGuard no_grad;
  std::set<std::string> used;
  for (auto& item : model->named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    at::Tensor& param = item.value();
    auto it = map.file_key.find(name);
    if (it == map.file_key.end())
      throw InputError(file.path() + ": missing umT5 weight '" + name + "'");
    const std::string& key = it->second;
    const auto& stored_shape = file.meta(key).shape;
    if (at::IntArrayRef(stored_shape) != param.sizes())
      throw InputError(file.path() + ": '" + key + "' has shape " + shape_string(stored_shape) + " but the model expects " +
                       shape_string(param.sizes()));
    at::Tensor value = file.load(key);
    used.insert(name);
    const std::string scale_name = name.substr(0, name.size() - std::string(".weight").size()) + ".scale_weight";
    auto scale = map.file_key.find(scale_name);
    if (ends_with(name, ".weight") && scale != map.file_key.end()) {
      const at::Tensor factor = file.load(scale->second).to(at::kFloat);
      if (factor.numel() != 1)
        throw InputError(file.path() + ": '" + scale->second + "' should hold one scale, has " +
                         std::to_string(factor.numel()) + " values");
      value = value.to(at::kFloat) * factor.reshape({});
      used.insert(scale_name);
    }
    if (!at::isFloatingType(value.scalar_type()))
      throw InputError(file.path() + ": '" + key + "' is stored as " + dtype_name(value.scalar_type()) +
                       ", not a floating-point type");
    param.copy_(value);
  }
  std::vector<std::string> unexpected;
  for (const auto& entry : map.file_key)
    if (!used.count(entry.first)) unexpected.push_back(entry.second);
  if (!unexpected.empty()) {
    std::string list;
    for (std::size_t i = 0; i < unexpected.size() && i < 5; ++i) list += (i ? ", " : "") + unexpected[i];
    if (unexpected.size() > 5) list += ", ...";
    log_warning(file.path() + ": " + std::to_string(unexpected.size()) + " key(s) not used by the umT5 encoder: " + list);
  }
}

std::vector<at::Tensor> take_real_rows(const at::Tensor& out, const std::vector<std::int64_t>& lengths) {
  if (!out.defined() || out.dim() != 3 || out.size(0) != static_cast<std::int64_t>(lengths.size()))
    throw InputError("take_real_rows: expected [" + std::to_string(lengths.size()) + ", L, dim] encoder output");
  std::vector<at::Tensor> rows;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] < 0 || lengths[i] > out.size(1))
      throw InputError("take_real_rows: length " + std::to_string(lengths[i]) + " outside [0, " +
                       std::to_string(out.size(1)) + "]");
    rows.push_back(out[static_cast<std::int64_t>(i)].narrow(0, 0, lengths[i]));
  }
  return rows;
}

// ---- TextEncoder -------------------------------------------------------------------------------

TextEncoder::TextEncoder(UMT5Encoder model, WanTokenizer tokenizer, TextEncoderOptions options)
    : model_(std::move(model)), tokenizer_(std::move(tokenizer)), options_(options) {
  if (tokenizer_.vocab_size() > model_->config().vocab)
    throw InputError("tokenizer has " + std::to_string(tokenizer_.vocab_size()) + " pieces but the umT5 embedding only " +
                     std::to_string(model_->config().vocab) + " rows");
  model_->eval();
}

TextEncoder TextEncoder::from_files(const std::string& weights_path, const std::string& tokenizer_path,
                                    at::ScalarType dtype, at::Device device, TextEncoderOptions options) {
  const auto file = WeightFile::open(weights_path);
  const UMT5Config config = UMT5Config::infer_from_weights(*file);
  std::optional<WanTokenizer> tokenizer;
  if (!tokenizer_path.empty()) {
    tokenizer = WanTokenizer::from_file(tokenizer_path);
  } else {
    for (const std::string& key : file->keys())
      if (key == "spiece_model" || ends_with(key, ".spiece_model")) {
        tokenizer = WanTokenizer::from_tensor(file->load(key), WanTokenizer::kDefaultMaxLen,
                                              weights_path + ": '" + key + "'");
        break;
      }
    if (!tokenizer)
      throw InputError(weights_path + ": no spiece_model tensor in the file; give the tokenizer model (spiece.model)");
  }
  UMT5Encoder model(config, at::TensorOptions().dtype(dtype).device(device), /*random_init=*/false);
  load_umt5_weights(model, *file, dtype);
  return TextEncoder(std::move(model), std::move(*tokenizer), options);
}

std::vector<at::Tensor> TextEncoder::encode(const std::vector<std::string>& prompts) {
  if (prompts.empty()) return {};
  const TokenizedBatch batch = tokenizer_.encode_batch(prompts);
  const std::int64_t length =
      options_.pad_to_max_len ? tokenizer_.max_len() : *std::max_element(batch.lengths.begin(), batch.lengths.end());
  torch::NoGradGuard no_grad;
  const at::Tensor out =
      model_->forward(batch.ids.narrow(1, 0, length), batch.mask.narrow(1, 0, length));
  std::vector<at::Tensor> rows = take_real_rows(out, batch.lengths);
  for (auto& r : rows) r = r.clone();  // detach from the padded batch buffer
  return rows;
}

}  // namespace vdit
