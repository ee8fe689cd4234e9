// umT5 text encoder (the encoder half of google/umt5-xxl as Wan2.1 builds it: T5Encoder with
// shared_pos=False), its checkpoint loader, and the prompt -> context wrapper the pipelines use.
//
// Parameter names are the original Wan names (token_embedding, blocks.N.{norm1, attn.{q,k,v,o},
// pos_embedding.embedding, norm2, ffn.{gate.0, fc1, fc2}}, norm) so a Wan .pth loads key for key;
// HF / diffusers / ComfyUI names are mapped onto them by canonical_umt5_key().
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "vdit/models/tokenizer.h"

namespace vdit {

class WeightFile;

struct UMT5Config {
  std::int64_t vocab = 256384;
  std::int64_t dim = 4096;
  std::int64_t dim_attn = 4096;  // num_heads * head_dim
  std::int64_t dim_ffn = 10240;
  std::int64_t num_heads = 64;
  std::int64_t num_layers = 24;
  std::int64_t num_buckets = 32;  // relative-position buckets, half per direction
  std::int64_t max_distance = 128;
  double eps = 1e-6;

  std::int64_t head_dim() const { return dim_attn / num_heads; }
  // Throws InputError naming the offending field when the numbers cannot build a model.
  void validate() const;

  // "umt5-xxl" (the only text encoder Wan2.1 uses). Throws InputError for other names.
  static UMT5Config preset(const std::string& name);
  // Reads every size from tensor shapes (original or HF names); heads come from the per-layer
  // relative-position table [buckets, heads]. Throws InputError when a needed key is missing or
  // the file is a T5 with one shared position table (not umT5).
  static UMT5Config infer_from_weights(const WeightFile& file);
};

// Bucket of each relative position (key index - query index), as T5 computes it: exact for small
// distances, log-spaced up to max_distance, then saturated. Bidirectional: buckets
// [0, num_buckets/2) for rel <= 0 and [num_buckets/2, num_buckets) for rel > 0.
// rel_pos: int64 tensor of any shape; returns int64 of the same shape and device.
at::Tensor t5_relative_position_bucket(const at::Tensor& rel_pos, std::int64_t num_buckets,
                                       std::int64_t max_distance, bool bidirectional = true);

// --- building blocks (public so the trainer and tests can reach them) ---------------------------

// y = x W^T, no bias; parameter "weight" [out, in].
class T5LinearImpl : public torch::nn::Module {
 public:
  T5LinearImpl(std::int64_t in, std::int64_t out, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
};
TORCH_MODULE(T5Linear);

// Lookup table; parameter "weight" [rows, cols].
class T5EmbeddingImpl : public torch::nn::Module {
 public:
  T5EmbeddingImpl(std::int64_t rows, std::int64_t cols, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& indices);
  at::Tensor weight;
};
TORCH_MODULE(T5Embedding);

// RMS norm without mean subtraction; variance in f32, result cast back to a 16-bit weight dtype.
class T5RMSNormImpl : public torch::nn::Module {
 public:
  T5RMSNormImpl(std::int64_t dim, double eps, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(T5RMSNorm);

// Per-layer relative-position bias: module "embedding" with weight [num_buckets, num_heads].
class T5RelativeEmbeddingImpl : public torch::nn::Module {
 public:
  T5RelativeEmbeddingImpl(std::int64_t num_buckets, std::int64_t num_heads, const at::TensorOptions& options);
  // buckets [Lq, Lk] int64 -> bias [1, heads, Lq, Lk] in the table's dtype.
  at::Tensor forward(const at::Tensor& buckets);
  T5Embedding embedding{nullptr};
};
TORCH_MODULE(T5RelativeEmbedding);

// Multi-head self-attention with an additive bias and NO 1/sqrt(head_dim) scaling.
class T5AttentionImpl : public torch::nn::Module {
 public:
  T5AttentionImpl(const UMT5Config& config, const at::TensorOptions& options);
  // x [B, L, dim]; bias [B or 1, heads, L, L] (position bias with masked keys at finfo.min).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& bias);
  T5Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  std::int64_t num_heads;
};
TORCH_MODULE(T5Attention);

// Gated GELU(tanh) feed-forward: fc2(fc1(x) * gelu(gate.0(x))).
class T5FeedForwardImpl : public torch::nn::Module {
 public:
  T5FeedForwardImpl(const UMT5Config& config, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::ModuleList gate{nullptr};  // holds one T5Linear, so its weight is "gate.0.weight"
  T5Linear gate_proj{nullptr}, fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(T5FeedForward);

class T5BlockImpl : public torch::nn::Module {
 public:
  T5BlockImpl(const UMT5Config& config, const at::TensorOptions& options);
  // key_masked: [B, 1, 1, L] bool (true = padded key) or undefined; buckets [L, L].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& key_masked, const at::Tensor& buckets);
  T5RMSNorm norm1{nullptr}, norm2{nullptr};
  T5Attention attn{nullptr};
  T5RelativeEmbedding pos_embedding{nullptr};
  T5FeedForward ffn{nullptr};
};
TORCH_MODULE(T5Block);

// --- the encoder --------------------------------------------------------------------------------

class UMT5EncoderImpl : public torch::nn::Module {
 public:
  // options: dtype and device of the parameters; the forward computes in the parameters' dtype
  // (f32, bf16 or f16), as the reference does after model.to(dtype). random_init=false leaves
  // the parameters uninitialised (at::empty: no page is touched until the loader fills them),
  // which is what a checkpoint load wants for the 5.7 B-parameter XXL.
  explicit UMT5EncoderImpl(const UMT5Config& config, const at::TensorOptions& options = {},
                           bool random_init = true);

  // ids [B, L] integer token ids, mask [B, L] (nonzero = real token; undefined = all real)
  // -> [B, L, dim] f32. Padded rows are computed too (as the reference does) but meaningless.
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& mask = {});

  // The reference's init_weights (normal with per-matrix std, ones for the norms).
  void reset_parameters();

  const UMT5Config& config() const { return config_; }
  at::ScalarType dtype() const { return token_embedding->weight.scalar_type(); }
  at::Device device() const { return token_embedding->weight.device(); }

  T5Embedding token_embedding{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  T5RMSNorm norm{nullptr};

 private:
  UMT5Config config_;
};
TORCH_MODULE(UMT5Encoder);

// --- checkpoints --------------------------------------------------------------------------------

// The original Wan name for a key of an original, HF (UMT5EncoderModel), diffusers or ComfyUI
// checkpoint; "" for keys that carry nothing the encoder needs (the tied
// encoder.embed_tokens.weight copy, spiece_model, fp8 "scaled_fp8" markers, decoder / lm_head
// weights of a full T5). Unknown keys come back unchanged. Also strips the "text_encoder." and
// "text_encoders.umt5xxl.transformer." prefixes some single-file checkpoints add.
std::string canonical_umt5_key(const std::string& key);
// The Hugging Face UMT5EncoderModel name of an original key (the inverse of canonical_umt5_key on
// those names); unknown keys come back unchanged.
std::string hf_umt5_key(const std::string& key);

// Fills every parameter of `model` from `file`, casting to `dtype` (the model is converted to
// `dtype` first, keeping its device). ComfyUI fp8 "_scaled" files are handled: a weight with a
// sibling "<prefix>.scale_weight" is multiplied by it (in f32) before the cast. Throws InputError
// naming the key for a missing tensor, a duplicate (two file keys mapping to one parameter) or a
// shape mismatch; unknown extra keys are reported with log_warning.
void load_umt5_weights(UMT5Encoder& model, const WeightFile& file, at::ScalarType dtype);

// Out rows of the real tokens: out [B, L, dim], lengths[i] = real tokens of prompt i (incl. </s>)
// -> B tensors [lengths[i], dim] (views of out).
std::vector<at::Tensor> take_real_rows(const at::Tensor& out, const std::vector<std::int64_t>& lengths);

// --- prompts -> DiT context ---------------------------------------------------------------------

struct TextEncoderOptions {
  // true: run the encoder on the reference's full max_len (512) positions. false (default): run
  // it on the longest prompt of the batch only. Padded keys are masked out, so the real rows only
  // change by float rounding (the fixture measures 1e-6 in f32); the work drops from 512 tokens
  // to the prompt length.
  bool pad_to_max_len = false;
};

class TextEncoder {
 public:
  // The tokenizer's pieces must fit in the model's vocab (umT5's embedding has 256384 rows for
  // 256300 pieces). Throws InputError otherwise.
  TextEncoder(UMT5Encoder model, WanTokenizer tokenizer, TextEncoderOptions options = {});

  // weights: any WeightFile path; tokenizer_path: a spiece.model, or "" to use the
  // `spiece_model` tensor of a ComfyUI checkpoint. The config is inferred from the shapes.
  static TextEncoder from_files(const std::string& weights_path, const std::string& tokenizer_path,
                                at::ScalarType dtype, at::Device device, TextEncoderOptions options = {});

  // One [L_i, dim] f32 tensor per prompt (real tokens incl. </s>, on the model's device), as the
  // reference T5EncoderModel returns them.
  std::vector<at::Tensor> encode(const std::vector<std::string>& prompts);

  UMT5Encoder& model() { return model_; }
  const WanTokenizer& tokenizer() const { return tokenizer_; }

 private:
  UMT5Encoder model_;
  WanTokenizer tokenizer_;
  TextEncoderOptions options_;
};

}  // namespace vdit
