// `vdit train-demo`: trains the built-in shapes demo model (vdit::demo::train_demo) and writes it
// in the diffusers layout. Hyper-parameters come from the built-in defaults (identical to
// configs/demo/shapes-demo.json) or --train-config; the budget options override them.
#include "commands.h"

#include "vdit/common.h"
#include "vdit/demo/train_demo.h"

#include <memory>

namespace vdit::cli {

void register_train_demo_command(CLI::App& app, GlobalOptions& global) {
  struct Args {
    demo::DemoTrainOptions options;
    std::string train_config;
    double vae_minutes = -1, dit_minutes = -1, vae_decoder_minutes = -1;
    std::int64_t vae_steps = -1, dit_steps = -1, vae_decoder_steps = -1, batch = -1, vae_batch = -1, pool_size = -1;
    std::int64_t seed = -1, decoder_generated_clips = -1;
    std::string bf16;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("train-demo", "Train the built-in shapes demo model from scratch (tokenizer, VAE, DiT)");
  cmd->add_option("--out", args->options.out_dir, "Model directory to write (diffusers layout; training state in OUT/train-state)")->required();
  cmd->add_option("--stage", args->options.stage, "tokenizer, vae, vae-decoder (only the VAE's decoder phase), dit or all")->capture_default_str();
  cmd->add_option("--train-config", args->train_config, "Hyper-parameter JSON (default: built in, = configs/demo/shapes-demo.json)");
  cmd->add_option("--vae-minutes", args->vae_minutes, "VAE training budget in minutes (counted over resumed runs)");
  cmd->add_option("--dit-minutes", args->dit_minutes, "DiT training budget in minutes (counted over resumed runs)");
  cmd->add_option("--vae-steps", args->vae_steps, "VAE training budget in steps (overrides minutes)");
  cmd->add_option("--vae-decoder-minutes", args->vae_decoder_minutes,
                  "Budget of the VAE's decoder phase (frozen encoder, whole clips) in minutes; 0: skip it");
  cmd->add_option("--vae-decoder-steps", args->vae_decoder_steps, "Budget of the VAE's decoder phase in steps (overrides minutes)");
  cmd->add_option("--dit-steps", args->dit_steps, "DiT training budget in steps (overrides minutes)");
  cmd->add_option("--batch", args->batch, "DiT batch size");
  cmd->add_option("--vae-batch", args->vae_batch, "VAE batch size");
  cmd->add_option("--pool-size", args->pool_size, "Pre-encoded latent clips the DiT batches are drawn from");
  cmd->add_option("--seed", args->seed, "Training seed");
  cmd->add_option("--bf16", args->bf16,
                  "DiT under CPU bf16 autocast: on, off, or auto (when a bf16 GEMM is faster here; default: from the config)");
  cmd->add_option("--decoder-from", args->options.decoder_from,
                  "With --stage vae-decoder: fine-tune the decoder of this finished model's VAE (DIR/vae); its encoder, "
                  "and so any DiT trained on it, stay as they are");
  cmd->add_option("--dit-from", args->options.dit_from,
                  "With --stage dit: start the DiT from this finished model's transformer (DIR/transformer) instead "
                  "of a random initialisation (a fresh optimizer; --resume takes precedence)");
  cmd->add_option("--decoder-generated-clips", args->decoder_generated_clips,
                  "With --stage vae-decoder --decoder-from DIR: clips DIR's DiT generates whose latents the decoder "
                  "also learns to draw as their captions ask (config decoder_generated_clips; 0: off)");
  cmd->add_flag("--resume", args->options.resume, "Continue from OUT/train-state");
  cmd->callback([args, &global] {
    // The global --device: where the VAE and DiT stages train (the tokenizer's runs on the CPU).
    args->options.device = parse_device(global.device);
    demo::DemoTrainConfig config = args->train_config.empty() ? demo::DemoTrainConfig::from_json(nlohmann::json::object())
                                                              : demo::DemoTrainConfig::from_file(args->train_config);
    // A steps budget replaces a minutes budget and vice versa.
    if (args->vae_minutes >= 0) { config.vae_minutes = args->vae_minutes; config.vae_steps = 0; }
    if (args->dit_minutes >= 0) { config.dit_minutes = args->dit_minutes; config.dit_steps = 0; }
    if (args->vae_decoder_minutes >= 0) { config.vae_decoder_minutes = args->vae_decoder_minutes; config.vae_decoder_steps = 0; }
    if (args->vae_steps >= 0) config.vae_steps = args->vae_steps;
    if (args->vae_decoder_steps >= 0) config.vae_decoder_steps = args->vae_decoder_steps;
    if (args->dit_steps >= 0) config.dit_steps = args->dit_steps;
    if (args->batch > 0) config.dit_batch = args->batch;
    if (args->vae_batch > 0) config.vae_batch = args->vae_batch;
    if (args->pool_size > 0) config.pool_size = args->pool_size;
    if (args->decoder_generated_clips >= 0) config.decoder_generated_clips = args->decoder_generated_clips;
    if (args->seed >= 0) config.seed = static_cast<std::uint64_t>(args->seed);
    if (!args->bf16.empty()) {
      using Mode = demo::DemoTrainConfig::Bf16Autocast;
      if (args->bf16 != "on" && args->bf16 != "off" && args->bf16 != "auto") throw InputError("--bf16 must be on, off or auto");
      config.bf16_autocast = args->bf16 == "on" ? Mode::On : args->bf16 == "off" ? Mode::Off : Mode::Auto;
    }
    demo::tune_process_for_training();
    demo::train_demo(config, args->options);
  });
}

}  // namespace vdit::cli
