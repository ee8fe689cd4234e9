// Subcommand registration for the thin `vdit` CLI. Each src/cli/cmd_<name>.cpp defines one
// register function; main.cpp owns the global options and error-to-exit-code mapping.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace vdit::cli {

struct GlobalOptions {
  std::string device = "cpu";
  std::string dtype = "";   // empty: per-command default (f32 on CPU, bf16 on CUDA)
  int threads = 0;          // 0: all cores
  bool verbose = false;
  bool quiet = false;
  double dist_timeout = -1;  // seconds; negative: VDIT_DIST_TIMEOUT or 300 (vdit/distributed.h)
};

// Every register function adds its subcommand to `app` and sets its callback; the callback runs
// after global options are applied (threads, log level) and may throw vdit::InputError (exit 2)
// or anything else (exit 1).
// Thrown by a callback that ran to its end but must exit with `code` (vdit launch: the failing
// rank's); main returns it without a message.
struct ExitStatus {
  int code;
};

void register_info_command(CLI::App& app, GlobalOptions& global);
void register_generate_command(CLI::App& app, GlobalOptions& global);
void register_bench_command(CLI::App& app, GlobalOptions& global);
void register_eval_command(CLI::App& app, GlobalOptions& global);
void register_train_demo_command(CLI::App& app, GlobalOptions& global);
void register_heads_command(CLI::App& app, GlobalOptions& global);
void register_edit_command(CLI::App& app, GlobalOptions& global);
void register_launch_command(CLI::App& app, GlobalOptions& global);
void register_upscale_command(CLI::App& app, GlobalOptions& global);
// `vdit eval upscale` under the eval command (cmd_eval_upscale.cpp).
void register_eval_upscale_command(CLI::App& eval, GlobalOptions& global);
// `vdit bench hires` under the bench command (cmd_bench_hires.cpp).
void register_bench_hires_command(CLI::App& bench, GlobalOptions& global);

}  // namespace vdit::cli
