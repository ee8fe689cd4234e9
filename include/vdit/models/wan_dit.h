// The Wan2.1 text-to-video diffusion transformer (the original `WanModel`, model_type t2v) as a
// LibTorch module. Parameter names are the original checkpoint's state-dict names, so loading is
// a name match and a trainer can run autograd through the same classes.
//
// Precision follows the reference under autocast: the sinusoidal timestep embedding and the 3D
// RoPE are computed in float64; layer norms, RMS norms, modulation arithmetic, the time
// embedding/projection, the output head and the residual stream are float32; the other Linear
// layers (patch embedding, text embedding, attention projections, FFN) run in the compute dtype
// (f32, bf16 or f16), and attention receives q, k, v in the compute dtype.
#pragma once

#include <torch/torch.h>

#include <nlohmann/json_fwd.hpp>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "vdit/attention/attention.h"

namespace vdit {

class WeightFile;
class SequenceParallel;  // vdit/distributed.h

// DiT hyper-parameters, spelled as in the original config.json (WanModel's constructor).
// The defaults are the 1.3B model's.
struct WanDiTConfig {
  std::string model_type = "t2v";
  std::int64_t dim = 1536;
  std::int64_t ffn_dim = 8960;
  std::int64_t freq_dim = 256;
  std::int64_t in_dim = 16;
  std::int64_t out_dim = 16;
  std::int64_t num_heads = 12;
  std::int64_t num_layers = 30;
  std::array<std::int64_t, 3> patch_size{1, 2, 2};
  std::int64_t text_dim = 4096;
  std::int64_t text_len = 512;
  double eps = 1e-6;
  bool qk_norm = true;
  bool cross_attn_norm = true;
  std::array<std::int64_t, 2> window_size{-1, -1};

  std::int64_t head_dim() const { return dim / num_heads; }
  std::int64_t patch_volume() const { return patch_size[0] * patch_size[1] * patch_size[2]; }

  // Accepts the original config.json keys (dim, num_heads, in_dim, ...) or the diffusers
  // WanTransformer3DModel keys (num_attention_heads, attention_head_dim, in_channels, ...).
  // Required: dim/ffn_dim/num_heads/num_layers (diffusers: num_attention_heads,
  // attention_head_dim, ffn_dim, num_layers); every other key defaults to WanModel's default.
  // A missing required key or a bad value throws InputError naming the key; an unknown key is
  // logged as a warning; keys starting with '_' are bookkeeping and ignored.
  static WanDiTConfig from_json(const nlohmann::json& j);
  static WanDiTConfig from_file(const std::string& path);
  nlohmann::json to_json() const;  // original key names
  // diffusers WanTransformer3DModel keys (plus "text_len" when it is not 512); from_json reads it
  // back to the same config. Only t2v configs (image fields are written as null).
  nlohmann::json to_diffusers_json() const;

  static WanDiTConfig t2v_1_3b();
  static WanDiTConfig t2v_14b();

  // Reads dim, ffn_dim, freq_dim, in/out dims, text_dim, num_layers, patch size, qk_norm and
  // cross_attn_norm from the tensor shapes (any supported key layout). The head count is not
  // stored: `num_heads` if given, else 12 for dim 1536, 40 for dim 5120, else dim/128; when none
  // applies, InputError asks for --dit-config.
  static WanDiTConfig infer_from_weights(const WeightFile& file,
                                         std::optional<std::int64_t> num_heads = std::nullopt);
  static WanDiTConfig infer_from_weights(const std::vector<std::shared_ptr<WeightFile>>& files,
                                         std::optional<std::int64_t> num_heads = std::nullopt);
  // The same, from canonical (original) key names and shapes.
  static WanDiTConfig infer_from_shapes(const std::map<std::string, std::vector<std::int64_t>>& shapes,
                                        std::optional<std::int64_t> num_heads = std::nullopt,
                                        const std::string& label = "weights");

  // InputError (one line) for inconsistent values (dim not divisible by heads, odd head_dim...).
  void validate() const;
  bool operator==(const WanDiTConfig& other) const;
  bool operator!=(const WanDiTConfig& other) const { return !(*this == other); }
};

// Maps a DiT tensor name from any supported layout to the original Wan name: strips ComfyUI's
// "model.diffusion_model." / "diffusion_model." prefix and undoes diffusers' renames (including
// its norm2 <-> norm3 swap). Original names map to themselves; unknown names pass through.
std::string wan_dit_canonical_key(const std::string& key);
// The diffusers (WanTransformer3DModel) name of an original key: the inverse of
// wan_dit_canonical_key on diffusers names. Names diffusers spells the same come back unchanged.
std::string wan_dit_diffusers_key(const std::string& key);

// The reference RoPE table for positions 0..positions-1: cos and sin, each
// [positions, head_dim/2] float64, columns = [t | h | w] frequency blocks.
std::pair<at::Tensor, at::Tensor> wan_rope_table(std::int64_t head_dim, std::int64_t positions);

// cos/sin per token of a (t, h, w) token grid flattened with w fastest: [grid.numel(), head_dim/2]
// float64 on `device`; `offset` is the position of the grid's first token on each axis.
std::pair<at::Tensor, at::Tensor> wan_rope_for_grid(std::int64_t head_dim, const Grid3& grid,
                                                    at::Device device = at::kCPU,
                                                    std::array<std::int64_t, 3> offset = {0, 0, 0});

// [cos(t f_j) | sin(t f_j)] with f_j = 10000^(-j/(dim/2)), float64: [B, dim].
at::Tensor wan_timestep_sinusoid(const at::Tensor& t, std::int64_t dim);

// A prompt's conditioning, computed once by WanDiT::encode_text and reused at every step: the
// embedded (zero-padded) context and every layer's cross-attention keys and values.
struct WanTextCondition {
  at::Tensor context;               // [B, text_len, dim], the text_embedding output
  std::vector<at::Tensor> keys;     // per layer: [B, heads, text_len, head_dim] (attention dtype)
  std::vector<at::Tensor> values;   // per layer: [B, heads, text_len, head_dim]

  std::int64_t batch() const { return context.defined() ? context.size(0) : 0; }
  // Concatenates along the batch (e.g. cond and uncond for one B=2 forward).
  static WanTextCondition cat(const std::vector<WanTextCondition>& parts);
  // Rows [index, index+1) of the batch.
  WanTextCondition select(std::int64_t index) const;
  WanTextCondition to(at::Device device) const;
};

namespace wan {

// nn.Linear with its weight/bias under the original names; runs in the weight's dtype.
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(std::int64_t in_features, std::int64_t out_features);
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor weight, bias;
};
TORCH_MODULE(Linear);

// Conv3d with kernel = stride = patch size, computed as a Linear over flattened patches.
class PatchEmbeddingImpl : public torch::nn::Module {
 public:
  PatchEmbeddingImpl(std::int64_t in_dim, std::int64_t dim, std::array<std::int64_t, 3> patch);
  // x [B, C, F, H, W] -> tokens [B, F/p * H/q * W/r, dim] in the weight's dtype.
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor weight, bias;  // [dim, C, p, q, r], [dim]
  std::array<std::int64_t, 3> patch;
};
TORCH_MODULE(PatchEmbedding);

// WanRMSNorm: x * rsqrt(mean(x^2) + eps) in f32, cast back to x's dtype, times the f32 weight.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(std::int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

// WanLayerNorm with elementwise affine (norm3): computed on x.float(), cast back to x's dtype.
class AffineLayerNormImpl : public torch::nn::Module {
 public:
  AffineLayerNormImpl(std::int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x) const;
  at::Tensor weight, bias;
  double eps;
};
TORCH_MODULE(AffineLayerNorm);

// Linear -> activation -> Linear, children named "0" and "2" like the reference nn.Sequential.
class MLPImpl : public torch::nn::Module {
 public:
  enum class Activation { GeluTanh, SiLU };
  MLPImpl(std::int64_t in, std::int64_t hidden, std::int64_t out, Activation act);
  at::Tensor forward(const at::Tensor& x) const;
  Linear fc0{nullptr}, fc2{nullptr};
  Activation act;
};
TORCH_MODULE(MLP);

// nn.Sequential(SiLU, Linear): the Linear is child "1".
class TimeProjectionImpl : public torch::nn::Module {
 public:
  TimeProjectionImpl(std::int64_t dim, std::int64_t out);
  at::Tensor forward(const at::Tensor& e) const;
  Linear fc1{nullptr};
};
TORCH_MODULE(TimeProjection);

}  // namespace wan

// What one DiT forward does besides its weights: everything that may differ between two forwards
// of the same model lives here, so forwards with different windows or processors can interleave.
struct DiTCall {
  // Attention processors per (layer, kind); null: the plain kernel everywhere.
  const AttentionProcessors* processors = nullptr;
  // Self-attention restricted to a 3D window of tokens (nullopt: full attention).
  std::optional<Window3> self_attn_window;
  // Temperature: multiplies 1/sqrt(head_dim) in self-attention only (FreeSwim: 1.04608).
  double self_attn_scale_factor = 1.0;
  // RoPE position of the first token on each axis (t, h, w), for a crop or window of a larger grid.
  std::array<std::int64_t, 3> position_offset{0, 0, 0};
  // Handed to the processors: the loop's step and the role of every batch row (empty: unlabelled).
  const StepInfo* step = nullptr;
  std::vector<RowRole> row_roles;
  // Skip-layer guidance: rows labelled with a role in this map bypass the listed blocks (their
  // residual stream passes through the block unchanged); other rows run every block.
  std::map<RowRole, std::set<int>> skip_blocks;
  // When set, filled with f32 copies of intermediates: "patch_embedding" [B,dim,F',H',W'],
  // "time_embedding_e" [B,dim], "time_projection_e0" [B,6,dim], "block<i>_out" [B,N,dim],
  // "head_out" [B,N,prod(patch)*out_dim].
  std::map<std::string, at::Tensor>* capture = nullptr;
  // Sequence parallelism (Ulysses, vdit/distributed.h): with a group of more than one process,
  // this process keeps its shard of the tokens after patch embedding, self-attention trades
  // tokens for heads by all-to-all, and the output is gathered. Null: the whole sequence here.
  const SequenceParallel* sequence_parallel = nullptr;
};

namespace wan {

// Everything one block's forward needs besides its own weights.
struct BlockContext {
  Grid3 grid;
  at::Tensor rope_cos, rope_sin;  // [1, N, 1, head_dim/2], float64 (or f32, see WanDiTImpl::rope_dtype)
  const WanTextCondition* cond = nullptr;
  const DiTCall* call = nullptr;
  double self_attn_scale = 0.0;
  at::ScalarType attention_dtype = at::kFloat;
  at::ScalarType compute_dtype = at::kFloat;
  // The processors' view of an attention call of this forward.
  AttentionSite site(int layer, AttentionKind kind) const {
    AttentionSite s;
    s.layer = layer;
    s.kind = kind;
    s.step = call->step;
    s.rows = call->row_roles.empty() ? nullptr : &call->row_roles;
    s.grid = grid;
    return s;
  }
};

// WanSelfAttention / WanT2VCrossAttention: q, k, v, o and the full-dim RMS norms norm_q, norm_k.
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(std::int64_t dim, std::int64_t num_heads, bool qk_norm, double eps);
  at::Tensor self_attention(const at::Tensor& x, int layer, const BlockContext& ctx);
  at::Tensor cross_attention(const at::Tensor& x, int layer, const BlockContext& ctx);
  // The cross-attention keys and values of an embedded context: [B, heads, L, head_dim] each.
  std::pair<at::Tensor, at::Tensor> context_keys_values(const at::Tensor& context,
                                                        at::ScalarType attention_dtype);
  Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  RMSNorm norm_q{nullptr}, norm_k{nullptr};  // null when qk_norm is off
  std::int64_t dim, num_heads, head_dim;

 private:
  at::Tensor attend(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const AttentionCall& call, const BlockContext& ctx) const;
};
TORCH_MODULE(Attention);

// WanAttentionBlock (t2v).
class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const WanDiTConfig& config);
  // x [B, N, dim] (residual stream), e0 [B, 6, dim] f32 -> [B, N, dim] f32.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& e0, int layer, const BlockContext& ctx);
  at::Tensor modulation;  // [1, 6, dim]
  Attention self_attn{nullptr}, cross_attn{nullptr};
  AffineLayerNorm norm3{nullptr};  // null when cross_attn_norm is off
  MLP ffn{nullptr};
  std::int64_t dim;
  double eps;
};
TORCH_MODULE(Block);

// Head: modulated LayerNorm and the output Linear (runs in f32 like the reference).
class HeadImpl : public torch::nn::Module {
 public:
  HeadImpl(std::int64_t dim, std::int64_t out_features, double eps);
  // x [B, N, dim], e [B, dim] f32 -> [B, N, out_features] f32.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& e) const;
  at::Tensor modulation;  // [1, 2, dim]
  Linear head{nullptr};
  std::int64_t dim;
  double eps;
};
TORCH_MODULE(Head);

}  // namespace wan

class WanDiTImpl : public torch::nn::Module {
 public:
  // Parameters are allocated but NOT initialised: load weights (load_wan_dit_weights) or call
  // reset_parameters() before use. Throws InputError for an invalid or non-t2v config.
  explicit WanDiTImpl(const WanDiTConfig& config);

  // The reference's init_weights() scheme (xavier-uniform Linear weights, zero biases, N(0, .02)
  // text/time embeddings, zero head weight, modulation ~ N(0,1)/sqrt(dim)), all f32, with the
  // global LibTorch generator.
  void reset_parameters();

  // Converts every compute-dtype parameter (not the f32 islands) to `dtype`.
  void set_compute_dtype(at::ScalarType dtype);
  at::ScalarType compute_dtype() const { return compute_dtype_; }
  // True for parameters kept in f32 whatever the compute dtype (norms, modulation, time
  // embedding and projection, the output head).
  static bool is_f32_parameter(const std::string& name);

  // context [B, L, text_dim] (or [L, text_dim]), L <= text_len: zero-padded to text_len rows,
  // embedded, and turned into every layer's cross-attention keys/values. `capture` (optional)
  // receives an f32 copy of "text_embedding" [B,text_len,dim].
  WanTextCondition encode_text(const at::Tensor& context, std::map<std::string, at::Tensor>* capture = nullptr);

  // x [B, in_dim, F, H, W] latents, t [B] (or [1]) timesteps, cond with batch B (or 1, shared)
  // -> [B, out_dim, F, H, W] f32. `call` says how (processors, window, ...); the model keeps no
  // state between forwards.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& t, const WanTextCondition& cond,
                     const DiTCall& call = DiTCall{});

  const WanDiTConfig config;
  wan::PatchEmbedding patch_embedding{nullptr};
  wan::MLP text_embedding{nullptr};
  wan::MLP time_embedding{nullptr};
  wan::TimeProjection time_projection{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  wan::Head head{nullptr};

  // RoPE rotation dtype: float64 as the reference (the default, for parity with real checkpoints)
  // or f32, which the demo trainer uses because the float64 rotation and its backward are a
  // measurable share of a small model's training step; angles differ by < 1e-7 relative.
  at::ScalarType rope_dtype = at::kDouble;

 private:
  at::ScalarType attention_dtype(const at::Device& device) const;
  at::ScalarType compute_dtype_ = at::kFloat;
};
TORCH_MODULE(WanDiT);

// Loads DiT weights from one or more files (original, diffusers or ComfyUI names, ComfyUI fp8
// "scaled" files) into `model`: every parameter must be found exactly once with its shape, and
// every tensor in the files must be used (missing / unexpected / duplicate / mis-shaped ->
// InputError naming the key). Each tensor is converted once, to f32 for the f32 islands and to
// `compute_dtype` otherwise, on the device the parameter lives on.
void load_wan_dit_weights(WanDiT& model, const std::vector<std::shared_ptr<WeightFile>>& files,
                          at::ScalarType compute_dtype);

}  // namespace vdit
