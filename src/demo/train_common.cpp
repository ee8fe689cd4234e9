// The demo trainer's shared pieces: the helpers of train_internal.h (timing, files, training
// archives, object masks, the model export's writers), the tokenizer stage (spm_train over the
// caption corpus), the frozen text encoder, save_diffusers_model and train_demo(), which runs
// the stages (see include/vdit/demo/train_demo.h for the stages and the
// choices behind them).
#include "train_internal.h"

#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/io/safetensors.h"
#include "vdit/models/tokenizer.h"
#include "vdit/models/wan_checkpoint.h"

#include <spawn.h>
#include <sys/wait.h>
#include <fcntl.h>

#include <cstring>
#include <fstream>
#include <iomanip>
#include <optional>
#include <sstream>

extern char** environ;

namespace vdit::demo {

using namespace detail;

namespace {

at::Tensor string_tensor(const std::string& s) {
  at::Tensor t = at::empty({static_cast<std::int64_t>(s.size())}, at::kByte);
  if (!s.empty()) std::memcpy(t.data_ptr(), s.data(), s.size());
  return t;
}

std::string tensor_string(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::string(reinterpret_cast<const char*>(c.data_ptr<std::uint8_t>()), static_cast<std::size_t>(c.numel()));
}

nlohmann::json t5_config_json(const UMT5Config& c) {
  // The Hugging Face UMT5EncoderModel spelling, for readers that want it; vdit infers the sizes
  // from the weights.
  return {{"architectures", {"UMT5EncoderModel"}},
          {"model_type", "umt5"},
          {"vocab_size", c.vocab},
          {"d_model", c.dim},
          {"d_kv", c.head_dim()},
          {"d_ff", c.dim_ffn},
          {"num_heads", c.num_heads},
          {"num_layers", c.num_layers},
          {"relative_attention_num_buckets", c.num_buckets},
          {"relative_attention_max_distance", c.max_distance},
          {"layer_norm_epsilon", c.eps},
          {"feed_forward_proj", "gated-gelu"},
          {"pad_token_id", 0},
          {"eos_token_id", 1}};
}

// The module's parameters as f32 entries, named by `rename` (the diffusers / HF spelling of each
// original name, so the files read like any diffusers Wan checkpoint).
std::vector<WriteEntry> parameter_entries(torch::nn::Module& m, const std::function<std::string(const std::string&)>& rename) {
  std::vector<WriteEntry> out;
  for (const auto& p : m.named_parameters())
    out.push_back({rename(p.key()), p.value().detach().to(at::kCPU, at::kFloat).contiguous(), std::nullopt});
  return out;
}

}  // namespace

namespace detail {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path);
  out << text;
  if (!out) throw RuntimeError("cannot write " + path.string());
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError("cannot open " + path);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path + ": invalid JSON (" + e.what() + ")");
  }
}

// ---- random-generator state in a training archive ---------------------------------------------
// Both generators go into the state so a resumed run draws the same data and noise as an
// uninterrupted one.
void write_rng(torch::serialize::OutputArchive& ar, const std::mt19937_64& data_rng, const at::Generator& gen) {
  std::ostringstream s;
  s << data_rng;
  ar.write("data_rng", string_tensor(s.str()));
  ar.write("noise_gen", gen.get_state());
}

void read_rng(torch::serialize::InputArchive& ar, std::mt19937_64& data_rng, at::Generator& gen) {
  at::Tensor t;
  ar.read("data_rng", t);
  std::istringstream s(tensor_string(t));
  s >> data_rng;
  at::Tensor g;
  ar.read("noise_gen", g);
  gen.set_state(g);
}

std::int64_t read_int(torch::serialize::InputArchive& ar, const std::string& key) {
  at::Tensor t;
  ar.read(key, t);
  return t.item<std::int64_t>();
}

// Saves to a temporary name and renames, so an interrupted save never leaves a torn state file.
void save_archive(torch::serialize::OutputArchive& ar, const std::string& path) {
  fs::create_directories(fs::path(path).parent_path());
  const std::string tmp = path + ".tmp";
  ar.save_to(tmp);
  fs::rename(tmp, path);
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& group : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

// The background colour in the [-1, 1] pixel range the renderer produces.
at::Tensor background_pixels() {
  return at::tensor({2 * shapes::kBackground[0] - 1, 2 * shapes::kBackground[1] - 1, 2 * shapes::kBackground[2] - 1})
      .view({1, 3, 1, 1, 1});
}

std::string fmt(double v, int precision) {
  std::ostringstream s;
  s << std::setprecision(precision) << v;
  return s.str();
}

nlohmann::json vae_config_json(const WanVAEConfig& c) {
  nlohmann::json j;
  j["_class_name"] = "AutoencoderKLWan";
  j["base_dim"] = c.dim;
  j["z_dim"] = c.z_dim;
  j["dim_mult"] = c.dim_mult;
  j["num_res_blocks"] = c.num_res_blocks;
  j["attn_scales"] = c.attn_scales;
  j["temperal_downsample"] = c.temporal_downsample;
  j["dropout"] = 0.0;
  j["latents_mean"] = c.latent_mean;
  j["latents_std"] = c.latent_std;
  return j;
}

void copy_parameters(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto src = from.named_parameters();
  for (auto& p : to.named_parameters()) p.value().copy_(src[p.key()]);
}

// A loaded optimizer keeps its moments on the device they were saved from; a state resumes on any.
void move_adamw_state(torch::optim::AdamW& optimizer, at::Device device) {
  for (auto& entry : optimizer.state()) {
    auto& st = static_cast<torch::optim::AdamWParamState&>(*entry.second);
    st.exp_avg(st.exp_avg().to(device));
    st.exp_avg_sq(st.exp_avg_sq().to(device));
    if (st.max_exp_avg_sq().defined()) st.max_exp_avg_sq(st.max_exp_avg_sq().to(device));
  }
}

// Pixels of clips [B, 3, F, H, W] that differ from the background: the object, [B, 1, F, H, W] f32.
at::Tensor object_mask(const at::Tensor& video) {
  return ((video - background_pixels().to(video.device())).abs().amax(1, true) > 0.1).to(at::kFloat);
}

// The weighted mean row and column of each mask [B, H, W] (f32 weights, e.g. 0/1 or counts), and
// (fallback_y, fallback_x) for a mask without weight: two [B] tensors on the mask's device.
std::pair<at::Tensor, at::Tensor> mask_centres(const at::Tensor& mask, double fallback_y, double fallback_x) {
  const std::int64_t h = mask.size(1), w = mask.size(2);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(mask.device());
  const at::Tensor ys = at::arange(h, opts).view({1, h, 1}), xs = at::arange(w, opts).view({1, 1, w});
  const at::Tensor area = mask.sum({1, 2});
  return {((mask * ys).sum({1, 2}) / area.clamp_min(1)).where(area > 0, at::full_like(area, fallback_y)),
          ((mask * xs).sum({1, 2}) / area.clamp_min(1)).where(area > 0, at::full_like(area, fallback_x))};
}

void write_vae(const fs::path& dir, WanVAE& vae) {
  fs::create_directories(dir / "vae");
  write_safetensors((dir / "vae" / "diffusion_pytorch_model.safetensors").string(), parameter_entries(*vae, [&](const std::string& k) {
                      return diffusers_wan_vae_key(k, vae->config().num_res_blocks);
                    }));
  write_text(dir / "vae" / "config.json", vae_config_json(vae->config()).dump(2) + "\n");
}

void write_text_encoder(const fs::path& dir, UMT5Encoder& t5, const std::string& tokenizer_path) {
  fs::create_directories(dir / "text_encoder");
  write_safetensors((dir / "text_encoder" / "model.safetensors").string(), parameter_entries(*t5, hf_umt5_key));
  write_text(dir / "text_encoder" / "config.json", t5_config_json(t5->config()).dump(2) + "\n");
  const fs::path target = dir / "tokenizer" / "spiece.model";
  fs::create_directories(target.parent_path());
  std::error_code ec;
  if (!fs::equivalent(tokenizer_path, target, ec)) fs::copy_file(tokenizer_path, target, fs::copy_options::overwrite_existing);
}

void write_pipeline_files(const fs::path& dir, const DemoTrainConfig& config) {
  const nlohmann::json index = {{"_class_name", "WanPipeline"},
                                {"_diffusers_version", "0.33.0"},
                                {"scheduler", {"diffusers", "UniPCMultistepScheduler"}},
                                {"text_encoder", {"transformers", "UMT5EncoderModel"}},
                                {"tokenizer", {"transformers", "T5TokenizerFast"}},
                                {"transformer", {"diffusers", "WanTransformer3DModel"}},
                                {"vae", {"diffusers", "AutoencoderKLWan"}}};
  write_text(dir / "model_index.json", index.dump(2) + "\n");
  const nlohmann::json scheduler = {{"_class_name", "UniPCMultistepScheduler"},
                                    {"num_train_timesteps", 1000},
                                    {"prediction_type", config.dit_prediction},
                                    {"use_flow_sigmas", true},
                                    {"flow_shift", config.flow_shift},
                                    {"solver_order", 2},
                                    {"predict_x0", true},
                                    {"solver_type", "bh2"},
                                    {"lower_order_final", true}};
  write_text(dir / "scheduler" / "scheduler_config.json", scheduler.dump(2) + "\n");
  // Keys as `vdit generate` reads them; "_training" is bookkeeping it skips.
  const nlohmann::json demo = {{"size", std::to_string(config.width) + "x" + std::to_string(config.height)},
                               {"frames", config.frames},
                               {"fps", config.fps},
                               {"steps", config.sample_steps},
                               {"guidance", config.sample_guidance},
                               {"shift", config.sample_shift},
                               {"sampler", "unipc"},
                               {"negative_prompt", ""},
                               {"_training", config.to_json()}};
  write_text(dir / "vdit-demo.json", demo.dump(2) + "\n");
}

void write_transformer(const fs::path& dir, WanDiT& dit) {
  fs::create_directories(dir / "transformer");
  write_safetensors((dir / "transformer" / "diffusion_pytorch_model.safetensors").string(),
                    parameter_entries(*dit, wan_dit_diffusers_key));
  write_text(dir / "transformer" / "config.json", dit->config.to_diffusers_json().dump(2) + "\n");
}


WanVAE load_trained_vae(const fs::path& dir) {
  const std::string path = (dir / "vae" / "diffusion_pytorch_model.safetensors").string();
  if (!fs::exists(path)) throw InputError(path + " is missing: run the vae stage first");
  auto file = WeightFile::open(path);
  // The same construction as the pipeline (architecture from the weights, published latent
  // statistics), so the DiT trains on exactly the latents generation will decode.
  WanVAE vae(WanVAEConfig::infer_from_weights(*file));
  load_wan_vae_weights(vae, *file, at::kFloat);
  vae->eval();
  return vae;
}

}  // namespace detail

// ---- tokenizer ----------------------------------------------------------------------------------

std::vector<std::string> caption_corpus() {
  std::vector<std::string> out;
  for (const auto& c : shapes::Caption::all()) out.push_back(c.text());
  return out;
}

std::string train_caption_tokenizer(const std::string& dir, std::int64_t vocab_size) {
  // spm_train (Debian package `sentencepiece`) runs as a child process: the sentencepiece
  // training library is not linked anywhere (the shim only loads models, and linking the trainer
  // beside LibTorch meets the same protobuf clash the shim exists for), and a separate process
  // cannot clash with anything.
  //
  // model_type=word: a unigram model trained on 90 short sentences keeps mostly single
  // characters (measured: "red" -> "re" "d"), which makes captions 25+ tokens; the grammar has 17
  // words, and one piece per word keeps a caption at 6-7 tokens. pad 0, eos 1, unk 2, no bos:
  // umT5's ids. nmt_nfkc_cf folds case so "A Red Circle" tokenizes like the captions.
  fs::create_directories(dir);
  const fs::path corpus = fs::path(dir) / "captions.txt";
  {
    std::ofstream out(corpus);
    for (const auto& line : caption_corpus()) out << line << "\n";
    if (!out) throw RuntimeError("cannot write " + corpus.string());
  }
  const fs::path prefix = fs::path(dir) / "spiece";
  const fs::path log = fs::path(dir) / "spm_train.log";
  std::vector<std::string> args = {"spm_train",
                                   "--input=" + corpus.string(),
                                   "--model_prefix=" + prefix.string(),
                                   "--vocab_size=" + std::to_string(vocab_size),
                                   "--model_type=word",
                                   "--hard_vocab_limit=false",
                                   "--normalization_rule_name=nmt_nfkc_cf",
                                   "--pad_id=0",
                                   "--eos_id=1",
                                   "--unk_id=2",
                                   "--bos_id=-1",
                                   "--num_threads=1"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, "spm_train", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0)
    throw RuntimeError("cannot run spm_train (" + std::string(std::strerror(rc)) +
                       "); install the Debian/Ubuntu package 'sentencepiece'");
  int status = 0;
  if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw RuntimeError("spm_train failed; see " + log.string());
  std::error_code ec;
  fs::remove(corpus, ec);
  fs::remove(fs::path(dir) / "spiece.vocab", ec);
  fs::remove(log, ec);
  return (fs::path(dir) / "spiece.model").string();
}

// ---- text encoder -------------------------------------------------------------------------------

UMT5Encoder make_text_encoder(const DemoTrainConfig& config, std::int64_t vocab) {
  UMT5Config c = config.text_encoder;
  c.vocab = vocab;
  torch::manual_seed(config.text_encoder_seed);
  UMT5Encoder model(c, at::TensorOptions().dtype(at::kFloat), /*random_init=*/true);
  model->eval();
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  return model;
}

// ---- export -------------------------------------------------------------------------------------

void save_diffusers_model(const std::string& dir, const DemoTrainConfig& config, WanDiT& dit, UMT5Encoder& text_encoder,
                          const std::string& tokenizer_path, WanVAE& vae) {
  const fs::path root(dir);
  write_pipeline_files(root, config);
  write_transformer(root, dit);
  write_text_encoder(root, text_encoder, tokenizer_path);
  write_vae(root, vae);
}

void train_demo(const DemoTrainConfig& config, const DemoTrainOptions& options) {
  if (options.out_dir.empty()) throw InputError("train-demo: --out is required");
  const std::string& s = options.stage;
  if (s != "tokenizer" && s != "vae" && s != "vae-decoder" && s != "dit" && s != "all")
    throw InputError("train-demo: unknown stage '" + s + "' (expected tokenizer, vae, vae-decoder, dit or all)");
  // Checked before any stage runs: a stage that does not read one of these would ignore it.
  if (!options.decoder_from.empty() && s != "vae-decoder")
    throw InputError("train-demo: --decoder-from needs --stage vae-decoder");
  if (!options.dit_from.empty() && s != "dit") throw InputError("train-demo: --dit-from needs --stage dit");
  if (config.decoder_generated_clips > 0 && s != "vae-decoder")
    throw InputError("train-demo: decoder_generated_clips needs --stage vae-decoder --decoder-from MODEL");
  const fs::path root(options.out_dir);
  fs::create_directories(root / "train-state");
  write_text(root / "train-state" / "config.json", config.to_json().dump(2) + "\n");
  if (s == "tokenizer" || s == "all") {
    const std::string path = train_caption_tokenizer((root / "tokenizer").string(), config.vocab_size);
    const auto tok = WanTokenizer::from_file(path);
    log_info("tokenizer: " + std::to_string(tok.vocab_size()) + " pieces -> " + path);
  }
  if (s == "vae" || s == "all") run_vae_stage(config, options, /*decoder_only=*/false);
  if (s == "vae-decoder") run_vae_stage(config, options, /*decoder_only=*/true);
  if (s == "dit" || s == "all") run_dit_stage(config, options);
}

}  // namespace vdit::demo
