// The demo-model trainer on micro configs: the losses fall, resumed training is bit-exact, the
// latent-statistics fold leaves the decoder's view unchanged, and the saved directory loads and
// generates through the normal pipeline.
#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/demo/train_demo.h"
#include "vdit/io/checkpoint.h"
#include "vdit/models/tokenizer.h"
#include "vdit/models/wan_checkpoint.h"
#include "vdit/pipelines/wan_t2v.h"

#include <torch/torch.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>

#include <unistd.h>  // getpid: LibTorch 1.13 brought it in, 2.x does not

namespace fs = std::filesystem;
using namespace vdit;
using namespace vdit::demo;

namespace {

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("vdit_train_demo_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// Small enough for a unit test: 32x32x5 clips, a 4-wide VAE, a 2-layer 32-wide DiT.
DemoTrainConfig micro_config() {
  DemoTrainConfig c = DemoTrainConfig::from_json(nlohmann::json::object());
  c.width = 32;
  c.height = 32;
  c.frames = 5;
  c.vae.dim = 4;
  c.vae_batch = 2;
  c.vae_lr = 3e-3;
  c.text_encoder.dim = 16;
  c.text_encoder.dim_attn = 16;
  c.text_encoder.dim_ffn = 32;
  c.text_encoder.num_heads = 2;
  c.dit.dim = 32;
  c.dit.ffn_dim = 64;
  c.dit.freq_dim = 16;
  c.dit.num_heads = 2;
  c.dit.num_layers = 2;
  c.dit.text_dim = 16;
  c.dit_batch = 8;
  c.dit_lr = 2e-3;
  c.dit_warmup = 1;
  c.pool_size = 32;
  c.pool_refresh = 1;
  c.vae_stats_clips = 8;
  c.vae_decoder_steps = 0;  // no decoder phase unless a test asks for one
  c.vae_decoder_minutes = 0;
  c.vae_latent_noise = 0;  // on only where a test asks for it
  return c;
}

// Random frozen contexts standing in for the text encoder's output.
std::pair<std::vector<at::Tensor>, at::Tensor> random_contexts(const DemoTrainConfig& c) {
  torch::manual_seed(5);
  std::vector<at::Tensor> out;
  for (std::size_t i = 0; i < shapes::Caption::all().size(); ++i) out.push_back(torch::randn({6, c.dit.text_dim}));
  return {out, torch::randn({1, c.dit.text_dim})};
}

double mean_of(const std::vector<double>& v, std::size_t from, std::size_t n) {
  return std::accumulate(v.begin() + from, v.begin() + from + n, 0.0) / n;
}

bool same_parameters(torch::nn::Module& a, torch::nn::Module& b) {
  auto pb = b.named_parameters();
  for (const auto& p : a.named_parameters())
    if (!at::equal(p.value(), pb[p.key()])) return false;
  return true;
}

// Options that train into `dir` without a progress bar.
DemoTrainOptions quiet_options(const fs::path& dir) {
  DemoTrainOptions o;
  o.out_dir = dir.string();
  o.quiet_progress = true;
  return o;
}

// Generates one 2-step clip with `prompt` from a trained directory through the pipeline, as a
// user's `vdit generate --model DIR` would, and checks its size and that it is finite.
void check_directory_generates(const fs::path& dir, const DemoTrainConfig& c, const std::string& prompt) {
  WanT2VPipeline pipeline(locate_wan_model(dir.string()), WanT2VOptions{});
  T2VSettings s;
  s.prompt = prompt;
  s.negative_prompt = "";
  s.width = c.width;
  s.height = c.height;
  s.frames = c.frames;
  s.steps = 2;
  s.guidance = 3.0;
  const T2VResult r = pipeline.generate(s);
  CHECK(r.video.sizes() == at::IntArrayRef({3, c.frames, c.height, c.width}));
  CHECK(at::isfinite(r.video).all().item<bool>());
}

}  // namespace

TEST_CASE("train-demo: configs/demo/shapes-demo.json is the built-in default", "[train]") {
  const auto file = DemoTrainConfig::from_file(std::string(VDIT_SOURCE_DIR) + "/configs/demo/shapes-demo.json");
  CHECK(file.to_json() == DemoTrainConfig::from_json(nlohmann::json::object()).to_json());
  // Clips of 64x64x9 make [16, 3, 16, 16] latents (4x spatial VAE) and 192 DiT tokens with
  // Wan's 1x2x2 patches.
  CHECK(file.width == 64);
  CHECK(file.frames == 9);
  CHECK(file.vae.spatial_stride() == 4);
  CHECK(file.vae.temporal_stride() == 4);
  CHECK(file.dit.patch_size == std::array<std::int64_t, 3>{1, 2, 2});
  CHECK(file.dit.text_dim == file.text_encoder.dim);
}

TEST_CASE("train-demo: every recipe in configs/demo reads and survives a write and a read", "[train]") {
  std::size_t seen = 0;
  for (const auto& e : fs::directory_iterator(fs::path(VDIT_SOURCE_DIR) / "configs" / "demo")) {
    const std::string name = e.path().filename().string();
    if (e.path().extension() != ".json") continue;
    INFO(name);
    ++seen;
    DemoTrainConfig c;
    REQUIRE_NOTHROW(c = DemoTrainConfig::from_file(e.path().string()));
    CHECK(c.dit.in_dim == c.vae.z_dim);
    CHECK(DemoTrainConfig::from_json(c.to_json()).to_json() == c.to_json());
  }
  CHECK(seen == 11);
}

TEST_CASE("train-demo: every recipe in configs/demo resolves to the settings its full file had", "[train]") {
  // The recipes were full files in configs/ until they became a base (shapes-demo.json) and
  // overlays of it. tests/fixtures/demo-recipes holds what the loader of that time made of each
  // full file (DemoTrainConfig::from_file(...).to_json(), as train-state/config.json records it);
  // each overlay must give exactly that.
  const fs::path recipes = fs::path(VDIT_SOURCE_DIR) / "configs" / "demo";
  const fs::path resolved = fs::path(VDIT_FIXTURES_DIR) / "demo-recipes";
  std::size_t seen = 0;
  for (const auto& e : fs::directory_iterator(resolved)) {
    const std::string name = e.path().filename().string();
    INFO(name);
    ++seen;
    std::ifstream in(e.path());
    const nlohmann::json expected = nlohmann::json::parse(in);
    REQUIRE(fs::exists(recipes / name));
    CHECK(DemoTrainConfig::from_file((recipes / name).string()).to_json() == expected);
  }
  CHECK(seen == 11);
  for (const auto& e : fs::directory_iterator(recipes)) {
    INFO(e.path().filename().string());
    CHECK(fs::exists(resolved / e.path().filename()));
  }
}

TEST_CASE("train-demo: a recipe's keys are merged over its _base, sections key by key", "[train]") {
  const fs::path dir = temp_dir("recipes");
  const std::string base = (fs::path(VDIT_SOURCE_DIR) / "configs" / "demo" / "shapes-demo.json").string();
  auto write = [&](const std::string& name, const nlohmann::json& j) { std::ofstream(dir / name) << j.dump(2); };
  write("a.json", {{"_base", base}, {"dit_steps", 5}, {"vae", {{"temperal_downsample", {false, true}}}}});
  fs::create_directories(dir / "sub");
  write("sub/b.json", {{"_base", "../a.json"}, {"dit_steps", 7}, {"dit_lr", nullptr}});
  const DemoTrainConfig shipped = DemoTrainConfig::from_file(base);
  const DemoTrainConfig b = DemoTrainConfig::from_file((dir / "sub" / "b.json").string());
  CHECK(b.dit_steps == 7);                                                        // b over a
  CHECK(b.vae.temporal_downsample == std::vector<bool>{false, true});             // a over the base
  CHECK(b.vae.dim == shipped.vae.dim);                                            // the rest of the base's section
  CHECK(b.vae.dim_mult == shipped.vae.dim_mult);
  CHECK(b.vae_steps == shipped.vae_steps);
  CHECK(b.dit_lr == DemoTrainConfig::from_json(nlohmann::json::object()).dit_lr);  // null: the default
  // A chain that comes back, a base that is missing or not a file name, and a "_base" outside a file.
  write("loop1.json", {{"_base", "loop2.json"}});
  write("loop2.json", {{"_base", "loop1.json"}});
  CHECK_THROWS_WITH(DemoTrainConfig::from_file((dir / "loop1.json").string()), Catch::Contains("leads back"));
  write("missing.json", {{"_base", "nowhere.json"}});
  CHECK_THROWS_WITH(DemoTrainConfig::from_file((dir / "missing.json").string()), Catch::Contains("nowhere.json"));
  write("number.json", {{"_base", 3}});
  CHECK_THROWS_AS(DemoTrainConfig::from_file((dir / "number.json").string()), vdit::InputError);
  CHECK_THROWS_WITH(DemoTrainConfig::from_json({{"_base", "a.json"}}), Catch::Contains("from_file"));
  fs::remove_all(dir);
}

TEST_CASE("train-demo: the DiT's learning-rate decay is a cosine from 1 to dit_lr_final", "[train]") {
  for (double f : {0.05, 0.1, 0.5, 1.0}) {
    INFO("final " << f);
    CHECK(cosine_decay(0.0, f) == Approx(1.0).margin(1e-15));
    CHECK(cosine_decay(0.5, f) == Approx((1.0 + f) / 2).margin(1e-15));
    CHECK(cosine_decay(1.0, f) == Approx(f).margin(1e-15));
    CHECK(cosine_decay(3.0, f) == Approx(f).margin(1e-15));   // past the budget: stays at the floor
    CHECK(cosine_decay(-1.0, f) == Approx(1.0).margin(1e-15));
    for (double d = 0; d < 1; d += 0.125) CHECK(cosine_decay(d + 0.125, f) <= cosine_decay(d, f));
  }
  CHECK(DemoTrainConfig::from_json({{"dit_lr_final", 0.1}}).dit_lr_final == 0.1);
  CHECK(DemoTrainConfig::from_json(nlohmann::json::object()).dit_lr_final == 1.0);
  for (double bad : {0.0, -0.5, 1.5})
    CHECK_THROWS_WITH(DemoTrainConfig::from_json({{"dit_lr_final", bad}}), Catch::Contains("dit_lr_final"));
}

TEST_CASE("train-demo: bf16_autocast reads true, false and \"auto\", and nothing else", "[train]") {
  using Mode = DemoTrainConfig::Bf16Autocast;
  CHECK(DemoTrainConfig::from_json(nlohmann::json::object()).bf16_autocast == Mode::Auto);
  CHECK(DemoTrainConfig::from_json({{"bf16_autocast", true}}).bf16_autocast == Mode::On);
  CHECK(DemoTrainConfig::from_json({{"bf16_autocast", false}}).bf16_autocast == Mode::Off);
  CHECK(DemoTrainConfig::from_json({{"bf16_autocast", "auto"}}).bf16_autocast == Mode::Auto);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"bf16_autocast", "yes"}}), vdit::InputError);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"bf16_autocast", 1}}), vdit::InputError);
  // The JSON round trip keeps each mode.
  for (Mode m : {Mode::On, Mode::Off, Mode::Auto}) {
    DemoTrainConfig c;
    c.bf16_autocast = m;
    CHECK(DemoTrainConfig::from_json(c.to_json()).bf16_autocast == m);
  }
}

TEST_CASE("train-demo: the caption tokenizer gives every caption distinct short ids", "[train]") {
  const fs::path dir = temp_dir("tok");
  const std::string path = train_caption_tokenizer(dir.string(), 64);
  const auto tok = WanTokenizer::from_file(path);
  CHECK(tok.pad_id() == 0);
  CHECK(tok.eos_id() == 1);
  std::set<std::vector<std::int64_t>> seen;
  for (const auto& text : caption_corpus()) {
    auto t = tok.encode(text);
    CHECK(t.length <= DemoTrainConfig::default_dit().text_len);
    std::vector<std::int64_t> ids(t.ids.data_ptr<std::int64_t>(), t.ids.data_ptr<std::int64_t>() + t.length);
    CHECK(std::find(ids.begin(), ids.end(), 2) == ids.end());  // no <unk>
    seen.insert(ids);
  }
  CHECK(seen.size() == caption_corpus().size());
  CHECK(tok.encode("").length == 1);  // just </s>: the demo's negative prompt
  CHECK(tok.piece_ids("a red circle moving right") == tok.piece_ids("A RED Circle moving right"));
  fs::remove_all(dir);
}

TEST_CASE("train-demo: VAE training lowers the reconstruction error and resumes bit-exactly", "[train]") {
  const DemoTrainConfig c = micro_config();
  const fs::path dir = temp_dir("vae");
  VAETrainer a(c, 3);
  std::vector<double> recon;
  for (int i = 0; i < 24; ++i) recon.push_back(a.step().recon);
  INFO("first " << mean_of(recon, 0, 4) << " last " << mean_of(recon, 20, 4));
  CHECK(mean_of(recon, 20, 4) < 0.7 * mean_of(recon, 0, 4));

  VAETrainer b(c, 3), resumed(c, 3);
  VAETrainer straight(c, 3);
  for (int i = 0; i < 2; ++i) b.step();
  b.save_state((dir / "vae.pt").string());
  resumed.load_state((dir / "vae.pt").string());
  for (int i = 0; i < 4; ++i) straight.step();
  for (int i = 0; i < 2; ++i) resumed.step();
  CHECK(resumed.steps_done() == 4);
  CHECK(same_parameters(*straight.vae(), *resumed.vae()));
  fs::remove_all(dir);
}

TEST_CASE("train-demo: latent noise in VAE training is seeded and changes the update", "[train]") {
  DemoTrainConfig quiet = micro_config(), noisy = micro_config();
  noisy.vae_latent_noise = 0.5;
  VAETrainer a(noisy, 3), b(noisy, 3), c(quiet, 3);
  a.step();
  b.step();
  c.step();
  CHECK(same_parameters(*a.vae(), *b.vae()));
  CHECK_FALSE(same_parameters(*a.vae(), *c.vae()));
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"vae_latent_noise", -0.1}}), vdit::InputError);
}

TEST_CASE("train-demo: the VAE decoder phase trains only the decoder and resumes bit-exactly", "[train]") {
  const DemoTrainConfig c = micro_config();
  const fs::path dir = temp_dir("vaedec");
  VAETrainer a(c, 3);
  for (int i = 0; i < 2; ++i) a.step();
  a.save_state((dir / "first.pt").string());
  std::map<std::string, at::Tensor> before;
  for (const auto& p : a.vae()->named_parameters()) before[p.key()] = p.value().detach().clone();
  a.start_decoder_phase();
  CHECK(a.decoder_phase());
  CHECK(a.steps_done() == 0);
  for (int i = 0; i < 3; ++i) a.step();
  int frozen_same = 0, frozen = 0, trained_moved = 0, trained = 0;
  for (const auto& p : a.vae()->named_parameters()) {
    const bool is_frozen = p.key().rfind("encoder.", 0) == 0 || p.key().rfind("conv1.", 0) == 0;
    const bool same = at::equal(p.value(), before[p.key()]);
    if (is_frozen) {
      ++frozen;
      frozen_same += same;
    } else {
      ++trained;
      trained_moved += !same;
    }
  }
  CHECK(frozen > 0);
  CHECK(frozen_same == frozen);  // the encoder, and so the latent space, is untouched
  CHECK(trained > 0);
  CHECK(trained_moved > trained / 2);  // (a few parameters, e.g. unused biases, may get no gradient)

  // Resume: a decoder-phase state continues exactly; a state of the other phase is refused.
  a.save_state((dir / "decoder.pt").string());
  VAETrainer resumed(c, 3), wrong_phase(c, 3);
  CHECK_THROWS_AS(wrong_phase.load_state((dir / "decoder.pt").string()), vdit::InputError);
  resumed.start_decoder_phase();
  CHECK_THROWS_AS(resumed.load_state((dir / "first.pt").string()), vdit::InputError);
  resumed.load_state((dir / "decoder.pt").string());
  CHECK(resumed.steps_done() == 3);
  for (int i = 0; i < 2; ++i) {
    a.step();
    resumed.step();
  }
  CHECK(same_parameters(*a.vae(), *resumed.vae()));

  // load_weights takes only the weights: a fresh trainer starts the decoder phase from them.
  VAETrainer from_weights(c, 3);
  from_weights.load_weights((dir / "first.pt").string());
  for (const auto& p : from_weights.vae()->named_parameters()) CHECK(at::equal(p.value(), before[p.key()]));
  fs::remove_all(dir);
}

TEST_CASE("train-demo: the VAE round-trip judge scores the requested clips and starts the log-variance low", "[train]") {
  DemoTrainConfig c = micro_config();
  c.vae_logvar_init = -6.0;
  VAETrainer trainer(c, 3);
  {
    torch::NoGradGuard no_grad;
    const at::Tensor bias = trainer.vae()->named_parameters()["conv1.bias"];
    CHECK(at::equal(bias.narrow(0, c.vae.z_dim, c.vae.z_dim), at::full({c.vae.z_dim}, -6.0)));
  }
  const shapes::JudgeSummary a = judge_round_trip(trainer.vae(), c, 5, 11);
  const shapes::JudgeSummary b = judge_round_trip(trainer.vae(), c, 5, 11);
  CHECK(a.clips == 5);
  // Same seed, same clips, same verdicts.
  CHECK(a.colour_right == b.colour_right);
  CHECK(a.confusion == b.confusion);
  CHECK(a.all_right <= a.colour_right);
}

TEST_CASE("train-demo: folding the latent statistics normalises the latent and keeps decoding", "[train]") {
  DemoTrainConfig c = micro_config();
  VAETrainer trainer(c, 4);
  for (int i = 0; i < 2; ++i) trainer.step();
  WanVAE raw = trainer.vae();
  raw->eval();
  auto [mean, std] = measure_latent_stats(raw, c, 8, 9);
  WanVAE folded(c.vae);  // published statistics
  {
    torch::NoGradGuard g;
    auto src = raw->named_parameters();
    for (auto& p : folded->named_parameters()) p.value().copy_(src[p.key()]);
  }
  fold_latent_stats(folded, mean, std);
  torch::NoGradGuard g;
  std::mt19937_64 rng(1);
  auto batch = shapes::random_batch(2, c.frames, c.width, c.height, rng);
  const at::Tensor mu = raw->encode_moments(batch.video).first;
  const at::Tensor expect = (mu - at::tensor(mean).view({1, -1, 1, 1, 1})) / at::tensor(std).view({1, -1, 1, 1, 1});
  const at::Tensor z = folded->encode(batch.video);
  CHECK(at::allclose(z, expect, 1e-3, 1e-3));
  // The decoder sees the same input: decode(folded latent) == raw decode of mu.
  CHECK(at::allclose(folded->decode_unclamped(z), raw->decode_unclamped(mu), 1e-3, 1e-3));
  // The statistics are not the published ones, so the fold had to change something.
  CHECK_FALSE(at::allclose(folded->encode_raw_mu(batch.video), mu, 1e-3, 1e-3));
}

TEST_CASE("train-demo: DiT flow-matching loss falls and training resumes bit-exactly", "[train]") {
  const DemoTrainConfig c = micro_config();
  const fs::path dir = temp_dir("dit");
  torch::manual_seed(0);
  WanVAE vae(c.vae);
  auto [ctx, null_ctx] = random_contexts(c);

  DiTTrainer a(c, vae, ctx, null_ctx, 11);  // micro_config: bf16 autocast as "auto" decides here
  a.fill_pool();
  std::vector<double> loss;
  for (int i = 0; i < 40; ++i) loss.push_back(a.step().loss);
  INFO("first " << mean_of(loss, 0, 5) << " last " << mean_of(loss, 35, 5));
  CHECK(mean_of(loss, 35, 5) < 0.9 * mean_of(loss, 0, 5));
  // Gradients reached the attention projections through the differentiable attention path.
  CHECK_FALSE(same_parameters(*a.dit(), *a.ema()));

  // The same under bf16 autocast forced on and in f32, whatever "auto" picks on this CPU.
  for (bool bf16 : {true, false}) {
    DemoTrainConfig cb = c;
    cb.bf16_autocast = bf16 ? DemoTrainConfig::Bf16Autocast::On : DemoTrainConfig::Bf16Autocast::Off;
    DiTTrainer t(cb, vae, ctx, null_ctx, 11);
    std::vector<double> l;
    for (int i = 0; i < 40; ++i) l.push_back(t.step().loss);
    INFO("bf16 " << bf16 << " first " << mean_of(l, 0, 5) << " last " << mean_of(l, 35, 5));
    CHECK(mean_of(l, 35, 5) < 0.9 * mean_of(l, 0, 5));
  }

  // Resuming restores the pool's object masks too (the object-weighted loss needs them).
  DemoTrainConfig cw = c;
  cw.dit_object_weight = 8;
  DiTTrainer straight(cw, vae, ctx, null_ctx, 12), b(cw, vae, ctx, null_ctx, 12), resumed(cw, vae, ctx, null_ctx, 12);
  for (int i = 0; i < 4; ++i) straight.step();
  for (int i = 0; i < 2; ++i) b.step();
  b.save_state((dir / "dit.pt").string());
  resumed.load_state((dir / "dit.pt").string());
  for (int i = 0; i < 2; ++i) resumed.step();
  CHECK(same_parameters(*straight.dit(), *resumed.dit()));
  CHECK(same_parameters(*straight.ema(), *resumed.ema()));
  fs::remove_all(dir);
}

// Relative L2 distance between two modules' parameters (any devices).
static double parameter_distance(torch::nn::Module& a, torch::nn::Module& b) {
  auto pb = b.named_parameters();
  double num = 0, den = 0;
  for (const auto& p : a.named_parameters()) {
    const at::Tensor x = p.value().detach().cpu().to(at::kDouble), y = pb[p.key()].detach().cpu().to(at::kDouble);
    num += (x - y).pow(2).sum().item<double>();
    den += y.pow(2).sum().item<double>();
  }
  return std::sqrt(num / den);
}

// Steps both trainers `steps` times and checks each pair of losses agrees within 1e-3 relative
// to the reference's (the cross-device tolerance: the draws are the same, the rounding is not).
template <typename Trainer, typename Other>
static void check_losses_agree(Trainer& reference, Other& other, int steps, const std::string& what) {
  for (int i = 0; i < steps; ++i) {
    const double expected = reference.step().loss, got = other.step().loss;
    INFO(what << " step " << i << ": reference " << expected << ", other " << got);
    CHECK(std::abs(expected - got) <= 1e-3 * std::abs(expected));
  }
}

TEST_CASE("train-demo: the DiT trains on a GPU like on the CPU, and its state resumes on the CPU", "[train]") {
  if (!at::hasCUDA()) {
    WARN("no CUDA device: the GPU DiT training check did not run");
    return;
  }
  DemoTrainConfig c = micro_config();
  c.bf16_autocast = DemoTrainConfig::Bf16Autocast::Off;  // the GPU trains in f32; compare like with like
  c.dit_object_weight = 8;
  const fs::path dir = temp_dir("dit-cuda");
  // One VAE per trainer: a trainer moves the VAE module it is given to its device.
  torch::manual_seed(0);
  WanVAE vae(c.vae);
  torch::manual_seed(0);
  WanVAE vae_gpu(c.vae);
  auto [ctx, null_ctx] = random_contexts(c);
  DiTTrainer cpu(c, vae, ctx, null_ctx, 13, at::kCPU);
  DiTTrainer gpu(c, vae_gpu, ctx, null_ctx, 13, at::Device(at::kCUDA));
  // Same data and noise draws (both from CPU generators); the results differ by the devices'
  // rounding only. Tolerance: 1e-3 relative over 6 steps of Adam at the micro config's rate
  // (passed on an H200; the differences themselves were not recorded).
  check_losses_agree(cpu, gpu, 6, "cpu vs gpu");
  CHECK(parameter_distance(*gpu.dit(), *cpu.dit()) < 1e-3);
  CHECK(parameter_distance(*gpu.ema(), *cpu.ema()) < 1e-3);
  // A GPU train-state continues on the CPU (weights, optimizer moments and pool move over).
  gpu.save_state((dir / "dit.pt").string());
  DiTTrainer resumed(c, vae, ctx, null_ctx, 13, at::kCPU);
  resumed.load_state((dir / "dit.pt").string());
  CHECK(resumed.steps_done() == 6);
  check_losses_agree(cpu, resumed, 2, "cpu vs resumed");
  CHECK(parameter_distance(*resumed.dit(), *cpu.dit()) < 1e-3);
  fs::remove_all(dir);
}

TEST_CASE("train-demo: the VAE trains on a GPU like on the CPU, both phases, and its state resumes on the CPU", "[train]") {
  if (!at::hasCUDA()) {
    WARN("no CUDA device: the GPU VAE training check did not run");
    return;
  }
  DemoTrainConfig c = micro_config();
  c.vae_shape_probe_weight = 0.1;  // the probe's tensors move with the VAE
  const fs::path dir = temp_dir("vae-cuda");
  VAETrainer cpu(c, 5, at::kCPU), gpu(c, 5, at::Device(at::kCUDA));
  // Same initial weights, data and noise (all drawn on the CPU); the results differ by the
  // devices' rounding only. Tolerance as for the DiT: 1e-3 relative over a few Adam steps.
  CHECK(parameter_distance(*gpu.vae(), *cpu.vae()) == 0.0);
  check_losses_agree(cpu, gpu, 4, "first phase, cpu vs gpu");
  cpu.start_decoder_phase();
  gpu.start_decoder_phase();
  check_losses_agree(cpu, gpu, 2, "decoder phase, cpu vs gpu");
  CHECK(parameter_distance(*gpu.vae(), *cpu.vae()) < 1e-3);
  // The round-trip judge and the latent statistics run where the VAE is.
  CHECK(judge_round_trip(gpu.vae(), c, 4, 9).clips == 4);
  const auto stats_cpu = measure_latent_stats(cpu.vae(), c, 8, 7), stats_gpu = measure_latent_stats(gpu.vae(), c, 8, 7);
  for (std::size_t k = 0; k < stats_cpu.first.size(); ++k) CHECK(std::abs(stats_cpu.first[k] - stats_gpu.first[k]) < 1e-3);
  // A GPU decoder-phase state continues on the CPU (weights and optimizer moments move over).
  gpu.save_state((dir / "vae.pt").string());
  VAETrainer resumed(c, 5, at::kCPU);
  resumed.start_decoder_phase();
  resumed.load_state((dir / "vae.pt").string());
  CHECK(resumed.steps_done() == 2);
  check_losses_agree(cpu, resumed, 2, "decoder phase, cpu vs resumed");
  fs::remove_all(dir);
}

TEST_CASE("train-demo: a trained directory loads and generates through the pipeline", "[train]") {
  const fs::path dir = temp_dir("e2e");
  DemoTrainConfig c = micro_config();
  c.vae_steps = 2;
  c.vae_decoder_steps = 2;
  c.dit_steps = 2;
  c.pool_size = 16;
  DemoTrainOptions o = quiet_options(dir);
  train_demo(c, o);

  const WanModelFiles files = locate_wan_model(dir.string());
  CHECK(files.layout == "diffusers");
  CHECK(classify_weights(*WeightFile::open(files.dit.front())).component == WanComponent::DiT);
  CHECK(classify_weights(*WeightFile::open(files.text_encoder)).component == WanComponent::TextEncoder);
  CHECK(classify_weights(*WeightFile::open(files.vae)).component == WanComponent::VAE);
  // Written in diffusers / HF spelling, like a diffusers Wan checkpoint.
  CHECK(classify_weights(*WeightFile::open(files.dit.front())).key_layout == "diffusers");
  CHECK(classify_weights(*WeightFile::open(files.vae)).key_layout == "diffusers");
  CHECK(WeightFile::open(files.text_encoder)->has("shared.weight"));
  CHECK(WeightFile::open(files.dit.front())->has("blocks.0.attn1.to_q.weight"));
  {
    std::ifstream in(dir / "transformer" / "config.json");
    CHECK(nlohmann::json::parse(in)["_class_name"] == "WanTransformer3DModel");
  }
  {
    // Sampling defaults: the sampling shift, not the training one.
    std::ifstream in(dir / "vdit-demo.json");
    const auto demo = nlohmann::json::parse(in);
    CHECK(demo["shift"].get<double>() == Approx(c.sample_shift));
    CHECK(demo["steps"] == c.sample_steps);
    CHECK(c.sample_shift != Approx(c.flow_shift));
  }
  {
    std::ifstream in(dir / "scheduler" / "scheduler_config.json");
    const auto scheduler = nlohmann::json::parse(in);
    CHECK(scheduler["flow_shift"].get<double>() == Approx(c.flow_shift));
    CHECK(scheduler["prediction_type"] == c.dit_prediction);
  }
  CHECK(fs::exists(dir / "train-state" / "dit.pt"));
  CHECK(fs::exists(dir / "train-state" / "vae.pt"));
  CHECK(fs::exists(dir / "train-state" / "vae-decoder.pt"));

  check_directory_generates(dir, c, "a red circle moving right");

  // Resuming with a larger budget continues from the saved step.
  c.dit_steps = 3;
  o.stage = "dit";
  o.resume = true;
  train_demo(c, o);
  torch::serialize::InputArchive ar;
  ar.load_from((dir / "train-state" / "dit.pt").string());
  at::Tensor step;
  ar.read("step", step);
  CHECK(step.item<std::int64_t>() == 3);
  fs::remove_all(dir);
}

TEST_CASE("train-demo: a VAE of another z_dim trains with neutral statistics and generates, the DiT must match it",
          "[train]") {
  // The DiT's in_dim and out_dim must be the VAE's z_dim: refused when the config is read, not
  // after the VAE stage.
  nlohmann::json j = micro_config().to_json();
  j["vae"]["z_dim"] = 4;
  CHECK_THROWS_WITH(DemoTrainConfig::from_json(j), Catch::Contains("must equal the VAE's z_dim"));
  j["dit"]["in_dim"] = 4;
  j["dit"]["out_dim"] = 4;
  DemoTrainConfig c = DemoTrainConfig::from_json(j);
  // Wan's published statistics are for 16 channels; a 4-channel latent starts from neutral ones.
  CHECK(c.vae.latent_mean == std::vector<float>(4, 0.f));
  CHECK(c.vae.latent_std == std::vector<float>(4, 1.f));
  CHECK(DemoTrainConfig::from_json(c.to_json()).vae.z_dim == 4);

  const fs::path dir = temp_dir("z4");
  c.vae_steps = 2;
  c.dit_steps = 2;
  c.pool_size = 16;
  DemoTrainOptions o = quiet_options(dir);
  train_demo(c, o);
  check_directory_generates(dir, c, "a green square standing still");
  fs::remove_all(dir);
}

TEST_CASE("train-demo: --decoder-from fine-tunes a finished VAE's decoder and leaves its encoder bit-exact", "[train]") {
  const fs::path first = temp_dir("decoder_from_a"), second = temp_dir("decoder_from_b");
  DemoTrainConfig c = micro_config();
  c.vae_steps = 2;
  DemoTrainOptions o = quiet_options(first);
  o.stage = "vae";
  train_demo(c, o);

  // Fine-tune into another directory, which has no first-phase state of its own.
  c.vae_decoder_steps = 3;
  c.vae_gradient_weight = 1.0;
  o.out_dir = second.string();
  o.stage = "vae-decoder";
  o.decoder_from = first.string();
  train_demo(c, o);
  CHECK_FALSE(fs::exists(second / "train-state" / "vae.pt"));
  CHECK(fs::exists(second / "train-state" / "vae-decoder.pt"));

  auto load = [](const fs::path& dir) {
    auto file = WeightFile::open((dir / "vae" / "diffusion_pytorch_model.safetensors").string());
    WanVAE vae(WanVAEConfig::infer_from_weights(*file));
    load_wan_vae_weights(vae, *file, at::kFloat);
    return vae;
  };
  WanVAE before = load(first), after = load(second);
  auto after_params = after->named_parameters();
  int encoder_params = 0, decoder_changed = 0;
  for (const auto& p : before->named_parameters()) {
    const bool frozen = p.key().rfind("encoder.", 0) == 0 || p.key().rfind("conv1.", 0) == 0;
    if (frozen) {
      ++encoder_params;
      CHECK(at::equal(p.value(), after_params[p.key()]));  // not re-folded: the same latents
    } else if (!at::equal(p.value(), after_params[p.key()])) {
      ++decoder_changed;
    }
  }
  CHECK(encoder_params > 0);
  CHECK(decoder_changed > 0);

  // Only with the vae-decoder stage, only from a VAE of the configured architecture.
  o.stage = "vae";
  CHECK_THROWS_AS(train_demo(c, o), InputError);
  o.stage = "vae-decoder";
  DemoTrainConfig wider = c;
  wider.vae.dim = 8;
  CHECK_THROWS_AS(train_demo(wider, o), InputError);
  o.decoder_from = (first / "missing").string();
  CHECK_THROWS_AS(train_demo(c, o), InputError);
  fs::remove_all(first);
  fs::remove_all(second);
}

TEST_CASE("train-demo: --dit-from starts the DiT stage from a finished model's transformer", "[train]") {
  const fs::path first = temp_dir("dit_from_a"), second = temp_dir("dit_from_b");
  DemoTrainConfig c = micro_config();
  c.vae_steps = 1;
  c.dit_steps = 2;
  DemoTrainOptions o = quiet_options(first);
  train_demo(c, o);

  // A second directory with the first one's tokenizer and VAE but no DiT state; at learning rate
  // 0 the written EMA can only be the loaded weights (the EMA mixes two equal copies, so up to
  // rounding), whereas a random initialisation would differ everywhere.
  for (const char* part : {"tokenizer", "vae"})
    fs::copy(first / part, second / part, fs::copy_options::recursive);
  c.dit_lr = 0;
  c.dit_steps = 1;
  o.out_dir = second.string();
  o.stage = "dit";
  o.dit_from = first.string();
  train_demo(c, o);
  auto load = [](const fs::path& dir) {
    return WeightFile::open((dir / "transformer" / "diffusion_pytorch_model.safetensors").string());
  };
  auto before = load(first), after = load(second);
  REQUIRE(before->keys() == after->keys());
  for (const auto& key : before->keys()) {
    INFO(key);
    CHECK(at::allclose(before->load(key), after->load(key), 1e-6, 1e-7));
  }

  // Only with the dit stage, only from a DiT of the configured architecture, only from a model.
  o.stage = "all";
  CHECK_THROWS_AS(train_demo(c, o), InputError);
  o.stage = "dit";
  DemoTrainConfig deeper = c;
  deeper.dit.num_layers = 3;
  CHECK_THROWS_AS(train_demo(deeper, o), InputError);
  o.dit_from = (first / "missing").string();
  CHECK_THROWS_AS(train_demo(c, o), InputError);
  fs::remove_all(first);
  fs::remove_all(second);
}

TEST_CASE("train-demo: dit_snapshot_every writes complete model directories of the EMA DiT along the run", "[train]") {
  const fs::path dir = temp_dir("dit_snapshots");
  DemoTrainConfig c = micro_config();
  c.vae_steps = 1;
  c.dit_steps = 4;
  c.dit_snapshot_every = 2;
  DemoTrainOptions o = quiet_options(dir);
  train_demo(c, o);
  const fs::path two = dir / "snapshots" / "step-000002", four = dir / "snapshots" / "step-000004";
  REQUIRE(fs::is_directory(two));
  REQUIRE(fs::is_directory(four));
  CHECK(!fs::exists(dir / "snapshots" / "step-000001"));
  CHECK(!fs::exists(dir / "snapshots" / "step-000003"));
  // Each snapshot is a whole model (every part found) ...
  const WanModelFiles files = locate_wan_model(two.string());
  CHECK(files.layout == "diffusers");
  CHECK(fs::exists(two / "vdit-demo.json"));
  // ... whose DiT is the EMA of that step: the last one is the model's own DiT, the earlier one differs.
  auto load = [](const fs::path& d) {
    return WeightFile::open((d / "transformer" / "diffusion_pytorch_model.safetensors").string());
  };
  auto final_dit = load(dir), last = load(four), earlier = load(two);
  REQUIRE(final_dit->keys() == last->keys());
  bool any_differs = false;
  for (const auto& key : final_dit->keys()) {
    INFO(key);
    CHECK(at::equal(final_dit->load(key), last->load(key)));
    any_differs = any_differs || !at::equal(final_dit->load(key), earlier->load(key));
  }
  CHECK(any_differs);
  c.dit_snapshot_every = -1;
  CHECK_THROWS_AS(DemoTrainConfig::from_json(c.to_json()), InputError);
  fs::remove_all(dir);
}

// Timing of the real demo config (hidden: run with `vdit_tests "[.train-bench]"`): seconds per
// VAE and DiT step, DiT in f32 and under bf16 autocast, to choose the defaults.
TEST_CASE("train-demo: step timings of the shipped config", "[.train-bench]") {
  DemoTrainConfig c = DemoTrainConfig::from_json(nlohmann::json::object());
  const bool ftz = std::getenv("VDIT_BENCH_NO_FTZ") == nullptr;
  at::globalContext().setFlushDenormal(ftz);
  WARN("flush denormals: " << ftz);
  auto time_steps = [](auto&& step, int warm, int n) {
    for (int i = 0; i < warm; ++i) step();
    const auto t0 = std::chrono::steady_clock::now();
    double last = 0;
    for (int i = 0; i < n; ++i) last = step();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / n;
    return std::make_pair(s, last);
  };
  const char* part_env = std::getenv("VDIT_BENCH_PART");
  const std::string part = part_env ? part_env : "all";
  if (part == "all" || part == "vae") {
    VAETrainer vae(c, 1);
    auto [s, l] = time_steps([&] { return vae.step().recon; }, 1, 3);
    WARN("vae step batch " << c.vae_batch << ": " << s << " s (" << s / c.vae_batch << " s/clip), L1 " << l);
  }
  torch::manual_seed(0);
  WanVAE vae(c.vae);
  c.pool_size = 256;
  c.pool_refresh = 0;
  auto [ctx, null_ctx] = random_contexts(c);
  for (bool bf16 : {false, true}) {
    if (part != "all" && part != (bf16 ? "dit-bf16" : "dit")) continue;
    c.bf16_autocast = bf16 ? DemoTrainConfig::Bf16Autocast::On : DemoTrainConfig::Bf16Autocast::Off;
    DiTTrainer dit(c, vae, ctx, null_ctx, 1);
    dit.fill_pool();
    auto [s, l] = time_steps([&] { return dit.step().loss; }, 1, 3);
    WARN("dit step batch " << c.dit_batch << (bf16 ? " bf16 autocast: " : " f32: ") << s << " s, loss " << l);
  }
  if (part == "all") {
    const auto t0 = std::chrono::steady_clock::now();
    c.pool_refresh = 16;
    c.bf16_autocast = DemoTrainConfig::Bf16Autocast::Off;
    DiTTrainer dit(c, vae, ctx, null_ctx, 1);
    dit.fill_pool();
    const double fill = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    WARN("pool of 256 clips encoded in " << fill << " s");
  }
}

TEST_CASE("train-demo: the VAE reconstruction loss is zero on a perfect round trip and weighs each term as documented",
          "[train]") {
  DemoTrainConfig c = micro_config();
  c.vae_edge_margin = 0;
  c.vae_foreground_weight = 1.0;
  c.vae_object_mse_weight = 2.0;
  c.vae_colour_weight = 4.0;
  std::mt19937_64 rng(21);
  const shapes::ClipBatch batch = shapes::random_batch(2, 5, 32, 32, rng);
  CHECK(vae_reconstruction_loss(batch.video, batch.video, c).item<double>() == 0.0);
  // Shift the red channel by d on the object's pixels only: the object-region term is
  // (d + 2 d^2) / 3 (one channel of three), the background's 0, the mean-colour term d / 3.
  const double d = 0.1;
  const at::Tensor object =
      ((batch.video - at::tensor({0.08f, 0.08f, 0.10f}).view({1, 3, 1, 1, 1}) * 2 + 1).abs().amax(1, true) > 0.1)
          .to(at::kFloat);
  at::Tensor shifted = batch.video.clone();
  shifted.narrow(1, 0, 1).add_(object * d);
  const double expected = (d + 2 * d * d) / 3 + 4 * d / 3;
  CHECK(vae_reconstruction_loss(shifted, batch.video, c).item<double>() == Approx(expected).epsilon(1e-5));
  c.vae_colour_weight = 0;
  c.vae_object_mse_weight = 0;
  CHECK(vae_reconstruction_loss(shifted, batch.video, c).item<double>() == Approx(d / 3).epsilon(1e-5));
}

TEST_CASE("train-demo: the VAE's edge term counts the error of pixel differences inside the object's region",
          "[train]") {
  DemoTrainConfig c = micro_config();
  c.vae_edge_margin = 0;
  c.vae_object_mse_weight = 0;
  c.vae_colour_weight = 0;
  c.vae_foreground_weight = 0;  // leaves the background term, which is 0 below
  c.vae_gradient_weight = 3.0;
  // One frame of background with a red 2x2 object at rows and columns 3-4 (values in [-1, 1]).
  at::Tensor video = (at::tensor({0.08f, 0.08f, 0.10f}).view({1, 3, 1, 1, 1}) * 2 - 1).expand({1, 3, 1, 8, 8}).clone();
  video.narrow(3, 3, 2).narrow(4, 3, 2).copy_((at::tensor({0.90f, 0.15f, 0.15f}) * 2 - 1).view({1, 3, 1, 1, 1}).expand({1, 3, 1, 2, 2}));
  CHECK(vae_reconstruction_loss(video, video, c).item<double>() == 0.0);
  // The red channel raised by d on the object only: along each axis, 2 rows x 3 differences touch
  // the object (two across its edges, one inside), so 12 differences x 3 channels; the 8 edge
  // differences of the red channel are off by d. Edge term: 3 * 8 d / 36.
  const double d = 0.1;
  at::Tensor shifted = video.clone();
  shifted.narrow(1, 0, 1).narrow(3, 3, 2).narrow(4, 3, 2).add_(d);
  CHECK(vae_reconstruction_loss(shifted, video, c).item<double>() == Approx(3 * 8 * d / 36).epsilon(1e-5));
  // A uniform offset of the whole frame leaves every difference unchanged.
  c.vae_gradient_weight = 1.0;
  const double uniform = vae_reconstruction_loss(video + 0.2, video, c).item<double>();
  c.vae_gradient_weight = 0.0;
  CHECK(uniform == Approx(vae_reconstruction_loss(video + 0.2, video, c).item<double>()).epsilon(1e-6));
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"vae_gradient_weight", -1.0}}), vdit::InputError);
}

TEST_CASE("train-demo: the VAE training window keeps the first frames and the whole object", "[train]") {
  DemoTrainConfig c = DemoTrainConfig::from_json(nlohmann::json::object());
  REQUIRE(c.vae_frames == 5);
  REQUIRE(c.vae_crop == 32);
  std::mt19937_64 data(4), jitter(5);
  const shapes::ClipBatch batch = shapes::random_batch(16, 9, 64, 64, data);
  const at::Tensor window = vae_training_window(batch.video, c, jitter);
  REQUIRE(window.sizes() == at::IntArrayRef({16, 3, 5, 32, 32}));
  auto object_pixels = [](const at::Tensor& frame) {  // [3, H, W] -> pixels off the background
    const at::Tensor bg = at::tensor({0.08f, 0.08f, 0.10f}).view({3, 1, 1}) * 2 - 1;
    return ((frame - bg).abs().amax(0) > 0.1).sum().item<std::int64_t>();
  };
  for (std::int64_t b = 0; b < 16; ++b) {
    const std::int64_t full = object_pixels(batch.video[b].select(1, 2));
    CHECK(full > 0);
    CHECK(object_pixels(window[b].select(1, 2)) == full);  // the middle kept frame holds all of it
  }
  // The window is a crop: its frame 0 appears verbatim in the clip's frame 0.
  const at::Tensor f0 = window[0].select(1, 0);
  bool found = false;
  for (std::int64_t y = 0; y <= 32 && !found; ++y)
    for (std::int64_t x = 0; x <= 32 && !found; ++x)
      found = at::equal(batch.video[0].select(1, 0).narrow(1, y, 32).narrow(2, x, 32), f0);
  CHECK(found);
  // 0 and 0: the clip unchanged.
  c.vae_frames = 0;
  c.vae_crop = 0;
  CHECK(at::equal(vae_training_window(batch.video, c, jitter), batch.video));
  // Bad values are refused when the config is read.
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"vae_frames", 4}}), vdit::InputError);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"vae_crop", 40}}), vdit::InputError);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"vae_decoder_frames", 4}}), vdit::InputError);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"vae_decoder_frames", 13}}), vdit::InputError);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"vae_decoder_minutes", -1.0}}), vdit::InputError);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"vae_decoder_lr", 0.0}}), vdit::InputError);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"sample_shift", 0.0}}), vdit::InputError);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"flow_shift", -1.0}}), vdit::InputError);
}

TEST_CASE("train-demo: the object-weighted flow loss is MSE at weight 0 and a weighted mean otherwise", "[train]") {
  torch::manual_seed(3);
  const at::Tensor pred = torch::randn({2, 4, 3, 8, 8}), target = torch::randn({2, 4, 3, 8, 8});
  const at::Tensor mask = (torch::rand({2, 1, 3, 8, 8}) > 0.8).to(at::kFloat);
  CHECK(dit_flow_loss(pred, target, mask, 0).item<double>() == Approx(at::mse_loss(pred, target).item<double>()).epsilon(1e-6));
  // A uniform error e gives e^2 whatever the mask and weight.
  CHECK(dit_flow_loss(target + 0.5, target, mask, 8).item<double>() == Approx(0.25).epsilon(1e-6));
  // Error 1 on the masked positions only: sum(w e^2) / sum(w) = 9 m / (9 m + (N - m)) per channel.
  const at::Tensor off = target + mask.expand_as(target);
  const double m = mask.sum().item<double>(), n = static_cast<double>(mask.numel());
  CHECK(dit_flow_loss(off, target, mask, 8).item<double>() == Approx(9 * m / (9 * m + (n - m))).epsilon(1e-6));
}

TEST_CASE("train-demo: a sample-predicting DiT's loss is the velocity loss above sigma 0.05 and capped below", "[train]") {
  at::manual_seed(3);
  const at::Tensor x0 = at::randn({2, 4, 3, 4, 4}), eps = at::randn({2, 4, 3, 4, 4});
  const at::Tensor x0_pred = x0 + 0.1 * at::randn({2, 4, 3, 4, 4});
  for (double sigma : {1.0, 0.5, 0.05}) {
    INFO("sigma " << sigma);
    const at::Tensor sv = at::full({2, 1, 1, 1, 1}, sigma);
    const at::Tensor xt = (1.0 - sv) * x0 + sv * eps;
    const auto [velocity, target] = sample_prediction_velocities(x0_pred, x0, xt, sv);
    CHECK(at::allclose(target, eps - x0, 1e-4, 1e-4));
    // The velocity error is the x0 error over sigma.
    CHECK(at::allclose(velocity - target, (x0 - x0_pred) / sigma, 1e-4, 1e-4));
    // The true x0 has zero loss.
    const auto [exact, same_target] = sample_prediction_velocities(x0, x0, xt, sv);
    CHECK(at::allclose(exact, same_target, 1e-6, 1e-6));
  }
  // Below the floor the x0 error weighs 1 / 0.05^2, not 1 / sigma^2.
  const at::Tensor sv = at::full({2, 1, 1, 1, 1}, 0.01);
  const at::Tensor xt = (1.0 - sv) * x0 + sv * eps;
  const auto [velocity, target] = sample_prediction_velocities(x0_pred, x0, xt, sv);
  CHECK(at::allclose(velocity - target, (x0 - x0_pred) / 0.05, 1e-4, 1e-4));
  CHECK(at::allclose(target, (eps - x0) * (0.01 / 0.05), 1e-4, 1e-4));

  // The config takes the two diffusers names and nothing else; a sample-predicting DiT trains.
  CHECK(DemoTrainConfig::from_json({{"dit_prediction", "sample"}}).dit_prediction == "sample");
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"dit_prediction", "epsilon"}}), vdit::InputError);
  DemoTrainConfig c = micro_config();
  c.dit_prediction = "sample";
  torch::manual_seed(0);
  WanVAE vae(c.vae);
  auto [ctx, null_ctx] = random_contexts(c);
  DiTTrainer trainer(c, vae, ctx, null_ctx, 11);
  std::vector<double> loss;
  for (int i = 0; i < 40; ++i) loss.push_back(trainer.step().loss);
  INFO("first " << mean_of(loss, 0, 5) << " last " << mean_of(loss, 35, 5));
  CHECK(mean_of(loss, 35, 5) < 0.9 * mean_of(loss, 0, 5));
}

TEST_CASE("train-demo: the pixel term's window centres on the object, moves inwards at borders and cuts every latent alike",
          "[train]") {
  const at::Tensor latent = at::arange(3 * 4 * 2 * 10 * 12, at::kFloat).view({3, 4, 2, 10, 12});
  const at::Tensor other = -latent;
  at::Tensor mask = at::zeros({3, 1, 2, 10, 12});
  mask[0].narrow(2, 5, 1).narrow(3, 6, 1).fill_(1);   // clip 0: one cell at row 5, column 6, both frames
  mask[1][0][1][0][11].fill_(1);                      // clip 1: the top-right corner, frame 1 only
  // clip 2: no object -> the frame centre
  const auto crops = crop_latents_around_object({latent, other}, mask, 3);
  REQUIRE(crops.size() == 2);
  REQUIRE(crops[0].sizes() == at::IntArrayRef({3, 4, 2, 3, 3}));
  // Expected first cells: centred (row 5 - 1, column 6 - 1); clamped to (0, 12 - 3); the centre
  // (4.5 - 1, 5.5 - 1) rounded half away from zero.
  const std::int64_t y0[] = {4, 0, 4}, x0[] = {5, 9, 5};
  for (std::int64_t b = 0; b < 3; ++b) {
    INFO("clip " << b);
    CHECK(at::equal(crops[0][b], latent[b].narrow(2, y0[b], 3).narrow(3, x0[b], 3)));
    CHECK(at::equal(crops[1][b], -crops[0][b]));
  }
  CHECK_THROWS_AS(crop_latents_around_object({latent}, mask, 11), vdit::InputError);
}

TEST_CASE("train-demo: the DiT's pixel term is zero on the true latent and sends its gradient to the estimate only",
          "[train]") {
  DemoTrainConfig c = micro_config();
  torch::manual_seed(0);
  WanVAE vae(c.vae);
  vae->eval();
  at::manual_seed(4);
  const at::Tensor x0 = at::randn({2, c.vae.z_dim, 2, 4, 4});
  // Zero up to rounding: the graph-building decode and the no-grad one may take different
  // convolution paths (measured 1.3e-7 here), against > 1e-2 for the error below.
  CHECK(dit_pixel_loss(vae, x0, x0).item<double>() < 1e-6);
  const at::Tensor x0_pred = (x0 + 0.3 * at::randn_like(x0)).requires_grad_(true);
  const at::Tensor loss = dit_pixel_loss(vae, x0_pred, x0);
  CHECK(loss.item<double>() > 0);
  // The mean of |d| + 2 d^2 over the decoded pixels, as documented.
  at::Tensor d;
  {
    torch::NoGradGuard g;
    d = vae->decode_unclamped(x0_pred) - vae->decode_unclamped(x0);
  }
  CHECK(loss.item<double>() == Approx((d.abs() + 2 * d.pow(2)).mean().item<double>()).epsilon(1e-5));
  loss.backward();
  REQUIRE(x0_pred.grad().defined());
  CHECK(x0_pred.grad().abs().sum().item<double>() > 0);
}

TEST_CASE("train-demo: the pixel term adds exactly its weighted value to the DiT's loss and is off by default", "[train]") {
  DemoTrainConfig plain = micro_config();
  plain.bf16_autocast = DemoTrainConfig::Bf16Autocast::Off;
  CHECK(plain.dit_pixel_weight == 0);
  DemoTrainConfig pixel = plain;
  pixel.dit_pixel_weight = 3;
  pixel.dit_pixel_max_sigma = 1;  // every clip qualifies
  pixel.dit_pixel_samples = 2;
  pixel.dit_pixel_crop = 4;       // of the 8x8 latent of a 32x32 clip
  torch::manual_seed(0);
  WanVAE vae(plain.vae);
  auto [ctx, null_ctx] = random_contexts(plain);
  DiTTrainer a(plain, vae, ctx, null_ctx, 21), b(pixel, vae, ctx, null_ctx, 21);
  // Same initial weights, batch and noise: the first forward is the same, so the losses differ by
  // exactly the weighted pixel term.
  const DiTStepResult ra = a.step(), rb = b.step();
  CHECK(ra.pixel_loss == 0);
  CHECK(rb.pixel_loss > 0);
  CHECK(rb.loss == Approx(ra.loss + 3 * rb.pixel_loss).epsilon(1e-5));
  // ... and the term's gradient changed the update.
  CHECK_FALSE(same_parameters(*a.dit(), *b.dit()));

  // Read, written and checked like the other settings.
  const DemoTrainConfig read = DemoTrainConfig::from_json(pixel.to_json());
  CHECK(read.dit_pixel_weight == 3);
  CHECK(read.dit_pixel_max_sigma == 1);
  CHECK(read.dit_pixel_samples == 2);
  CHECK(read.dit_pixel_crop == 4);
  nlohmann::json bad = pixel.to_json();
  bad["dit_pixel_crop"] = 9;  // 9 cells x stride 4 > 32 pixels
  CHECK_THROWS_AS(DemoTrainConfig::from_json(bad), vdit::InputError);
  bad = pixel.to_json();
  bad["dit_pixel_max_sigma"] = 0;
  CHECK_THROWS_AS(DemoTrainConfig::from_json(bad), vdit::InputError);
  bad = pixel.to_json();
  bad["dit_pixel_weight"] = -1;
  CHECK_THROWS_AS(DemoTrainConfig::from_json(bad), vdit::InputError);
}

TEST_CASE("train-demo: the latent object mask covers exactly the latent cells of the object, grown by one", "[train]") {
  std::mt19937_64 rng(8);
  const shapes::ClipBatch batch = shapes::random_batch(3, 9, 64, 64, rng);
  const std::int64_t ts = 4, ss = 4;
  const at::Tensor mask = latent_object_mask(batch.video, ts, ss);
  REQUIRE(mask.sizes() == at::IntArrayRef({3, 1, 3, 16, 16}));
  const at::Tensor bg = at::tensor({0.08f, 0.08f, 0.10f}).view({1, 3, 1, 1, 1}) * 2 - 1;
  const at::Tensor pixels = ((batch.video - bg).abs().amax(1) > 0.1);  // [B, F, H, W]
  // Brute force: cell (f, y, x) is set when a pixel of the object lies in the frames latent frame
  // f covers and within one latent cell of (y, x).
  auto covered_frames = [&](std::int64_t f) {
    return f == 0 ? std::make_pair<std::int64_t, std::int64_t>(0, 1) : std::make_pair(ts * (f - 1) + 1, ts * f + 1);
  };
  for (std::int64_t b = 0; b < 3; ++b) {
    CHECK(mask[b].sum().item<double>() > 0);
    for (std::int64_t f = 0; f < 3; ++f) {
      const auto [f0, f1] = covered_frames(f);
      const at::Tensor any = pixels[b].narrow(0, f0, f1 - f0).any(0);  // [H, W]
      for (std::int64_t y = 0; y < 16; ++y) {
        for (std::int64_t x = 0; x < 16; ++x) {
          const std::int64_t y0 = std::max<std::int64_t>(0, (y - 1) * ss), y1 = std::min<std::int64_t>(64, (y + 2) * ss);
          const std::int64_t x0 = std::max<std::int64_t>(0, (x - 1) * ss), x1 = std::min<std::int64_t>(64, (x + 2) * ss);
          const bool expected = any.narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0).any().item<bool>();
          if ((mask[b][0][f][y][x].item<float>() > 0.5) != expected) {
            FAIL("clip " << b << " latent (" << f << ", " << y << ", " << x << ") expected " << expected);
          }
        }
      }
    }
  }
  CHECK_THROWS_AS(latent_object_mask(at::zeros({1, 4, 5, 8, 8}), 4, 4), vdit::InputError);
}

TEST_CASE("train-demo: layout_from_pixels recovers the layout of rendered clips", "[train]") {
  std::mt19937_64 rng(21);
  int checked = 0;
  for (const shapes::Caption& caption : shapes::Caption::all()) {
    const shapes::ClipLayout truth = shapes::random_layout(caption, 64, 64, rng);
    const at::Tensor clip = shapes::render_clip(caption, truth, 9, 64, 64);
    const std::optional<shapes::ClipLayout> fitted = layout_from_pixels(clip, caption);
    REQUIRE(fitted.has_value());
    INFO(caption.text());
    // Coverage-weighted profiles: sub-pixel placement; the line fit averages nine frames.
    CHECK(std::abs(fitted->x0 - truth.x0) < 0.75);
    CHECK(std::abs(fitted->y0 - truth.y0) < 0.75);
    CHECK(std::abs(fitted->dx - truth.dx) < 0.75);
    CHECK(std::abs(fitted->dy - truth.dy) < 0.75);
    CHECK(std::abs(fitted->size - truth.size) < 0.5);
    if (caption.motion == shapes::Motion::Still) CHECK((fitted->dx == 0 && fitted->dy == 0));
    ++checked;
  }
  CHECK(checked == 90);
  // An empty frame: no layout. A clip of the wrong rank: an input error.
  const shapes::Caption red_square = shapes::Caption::parse("a red square moving up");
  at::Tensor clip = shapes::render_clip(red_square, shapes::random_layout(red_square, 64, 64, rng), 9, 64, 64);
  clip.select(1, 4).copy_(shapes::render_clip(red_square, shapes::ClipLayout{9, -50, -50, 0, 0}, 1, 64, 64).select(1, 0));
  CHECK_FALSE(layout_from_pixels(clip, red_square).has_value());
  CHECK_THROWS_AS(layout_from_pixels(clip.unsqueeze(0), red_square), InputError);
}

TEST_CASE("train-demo: generated decoder pairs add their loss to the decoder phase's", "[train]") {
  DemoTrainConfig c = micro_config();
  c.decoder_generated_batch = 2;
  std::mt19937_64 rng(4);
  const shapes::ClipBatch batch = shapes::random_batch(3, c.frames, c.width, c.height, rng);
  VAETrainer plain(c, 3), with_pairs(c, 3);
  GeneratedDecoderPairs pairs;
  {
    torch::NoGradGuard no_grad;
    pairs.latents = plain.vae()->encode_moments(batch.video).first;
  }
  pairs.targets = batch.video.flip(4).contiguous();  // anything the decoder does not already draw
  CHECK_THROWS_AS(with_pairs.set_generated_pairs(GeneratedDecoderPairs{pairs.latents, pairs.targets.narrow(0, 0, 2)}),
                  InputError);
  with_pairs.set_generated_pairs(pairs);
  DemoTrainConfig zero = c;
  zero.decoder_generated_weight = 0;
  VAETrainer zero_trainer(zero, 3);
  zero_trainer.set_generated_pairs(pairs);
  for (VAETrainer* t : {&plain, &with_pairs, &zero_trainer}) t->start_decoder_phase();
  // Same seed, same rendered batch: the pairs' term is >= 0 and vanishes at weight 0.
  const double base = plain.step().loss, added = with_pairs.step().loss, zero_added = zero_trainer.step().loss;
  CHECK(added > base);
  CHECK(zero_added == Approx(base).epsilon(1e-6));
  // The first phase ignores them.
  VAETrainer first_a(c, 8), first_b(c, 8);
  first_b.set_generated_pairs(pairs);
  CHECK(first_a.step().loss == first_b.step().loss);
}

TEST_CASE("train-demo: decoder_generated_* settings are read, written and checked", "[train]") {
  DemoTrainConfig c = DemoTrainConfig::from_json(
      {{"decoder_generated_clips", 12}, {"decoder_generated_batch", 3}, {"decoder_generated_weight", 0.5}});
  CHECK(c.decoder_generated_clips == 12);
  CHECK(c.decoder_generated_batch == 3);
  CHECK(c.decoder_generated_weight == 0.5);
  const DemoTrainConfig again = DemoTrainConfig::from_json(c.to_json());
  CHECK(again.decoder_generated_clips == 12);
  CHECK(again.decoder_generated_batch == 3);
  CHECK(again.decoder_generated_weight == 0.5);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"decoder_generated_clips", -1}}), InputError);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"decoder_generated_weight", -0.5}}), InputError);
  // Generated pairs need a finished model to generate with.
  const fs::path dir = temp_dir("generated_pairs");
  DemoTrainConfig m = micro_config();
  m.vae_steps = 1;
  m.vae_decoder_steps = 1;
  m.decoder_generated_clips = 2;
  DemoTrainOptions o = quiet_options(dir);
  o.stage = "vae";
  CHECK_THROWS_AS(train_demo(m, o), InputError);
  fs::remove_all(dir);
}

TEST_CASE("train-demo: the VAE's shape probe adds a cross-entropy, reports its accuracy and resumes bit-exactly", "[train]") {
  DemoTrainConfig c = micro_config();
  DemoTrainConfig probed = c;
  probed.vae_shape_probe_weight = 0.5;
  VAETrainer plain(c, 6), with_probe(probed, 6);
  // The probe is drawn after the VAE: both start from the same VAE and the same batch, and the
  // cross-entropy (> 0) is added to the same loss.
  CHECK(same_parameters(*plain.vae(), *with_probe.vae()));
  const VAEStepResult a = plain.step(), b = with_probe.step();
  CHECK(a.probe_accuracy == -1);
  CHECK(b.probe_accuracy >= 0);
  CHECK(b.probe_accuracy <= 1);
  CHECK(b.recon == Approx(a.recon).epsilon(1e-6));
  CHECK(b.loss > a.loss);

  const fs::path dir = temp_dir("probe");
  with_probe.save_state((dir / "probe.pt").string());
  VAETrainer resumed(probed, 99), refused(probed, 99);
  resumed.load_state((dir / "probe.pt").string());
  for (int i = 0; i < 2; ++i) CHECK(with_probe.step().loss == resumed.step().loss);
  CHECK(same_parameters(*with_probe.vae(), *resumed.vae()));
  // A state without a probe cannot resume a probed run.
  plain.save_state((dir / "plain.pt").string());
  CHECK_THROWS_AS(refused.load_state((dir / "plain.pt").string()), InputError);
  // The decoder phase trains without it.
  with_probe.start_decoder_phase();
  CHECK(with_probe.step().probe_accuracy == -1);
  CHECK_THROWS_AS(DemoTrainConfig::from_json({{"vae_shape_probe_weight", -1}}), InputError);
  CHECK(DemoTrainConfig::from_json(probed.to_json()).vae_shape_probe_weight == 0.5);
  fs::remove_all(dir);
}
