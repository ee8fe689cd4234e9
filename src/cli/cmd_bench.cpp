// `vdit bench attention`: one JSON line from vdit::run_attention_bench (the same function the
// bench/bench_attention suite runs).
#include "commands.h"

#include "vdit/attention/attention_bench.h"
#include "vdit/common.h"
#include "vdit/pipelines/memory_estimate.h"

#include <iostream>
#include <memory>

namespace vdit::cli {

void register_bench_command(CLI::App& app, GlobalOptions& global) {
  CLI::App* bench = app.add_subcommand("bench", "Micro-benchmarks (one JSON line each)");
  bench->require_subcommand(1);
  register_bench_hires_command(*bench, global);

  struct Args {
    std::string grid = "8,32,32";
    std::string window = "full";
    std::string dilation = "1,1,1";
    std::string dtype;
    std::int64_t heads = 12, head_dim = 128, batch = 1;
    int repeats = 3;
    double scale_factor = 1.0;
    bool no_naive = false, no_full = false, force = false;
    std::uint64_t seed = 0;
    AttentionTuning tuning;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = bench->add_subcommand("attention", "Time vdit attention against a plain GEMM and naive attention");
  cmd->add_option("--grid", args->grid, "Token grid T,H,W")->capture_default_str();
  cmd->add_option("--heads", args->heads, "Attention heads")->capture_default_str();
  cmd->add_option("--head-dim", args->head_dim, "Head dimension")->capture_default_str();
  cmd->add_option("--batch", args->batch, "Batch size")->capture_default_str();
  cmd->add_option("--window", args->window, "Window sizes t,h,w (0: whole axis) or 'full'")->capture_default_str();
  cmd->add_option("--dilation", args->dilation, "Window dilation per axis a,b,c")->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "bf16 or f32 (default: the global --dtype, else bf16)");
  cmd->add_option("--repeats", args->repeats, "Timed runs (median reported)")->capture_default_str();
  cmd->add_option("--scale-factor", args->scale_factor, "Softmax temperature factor (FreeSwim: 1.04608)")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Random seed of q, k, v")->capture_default_str();
  cmd->add_option("--query-block", args->tuning.query_block, "Full attention: query rows per block (0: built-in choice)");
  cmd->add_option("--key-block", args->tuning.key_block, "Full attention: keys per block (0: built-in choice)");
  cmd->add_option("--window-queries", args->tuning.window_queries, "Windowed: largest query box (0: built-in choice)");
  cmd->add_option("--window-keys", args->tuning.window_keys, "Windowed: largest key chunk (0: built-in choice)");
  cmd->add_flag("--no-naive", args->no_naive, "Skip the materialised attention");
  cmd->add_flag("--no-full", args->no_full, "Windowed: skip the full-attention comparison");
  cmd->add_flag("--force", args->force, "Run even when q, k, v, the output and the kernel's workspace exceed the free memory");
  cmd->callback([args, &global] {
    AttentionBenchOptions o;
    o.grid = parse_grid(args->grid);
    o.window = parse_window(args->window, args->dilation);
    o.heads = args->heads;
    o.head_dim = args->head_dim;
    o.batch = args->batch;
    const std::string dtype = !args->dtype.empty() ? args->dtype : !global.dtype.empty() ? global.dtype : "bf16";
    o.dtype = parse_dtype(dtype);
    o.device = parse_device(global.device);
    o.repeats = args->repeats;
    o.scale_factor = args->scale_factor;
    o.naive = !args->no_naive;
    o.compare_full = !args->no_full;
    o.seed = args->seed;
    // Block sizes are process-wide settings of the engine; the JSON line reports the ones used.
    const AttentionTuning& t = args->tuning;
    if (t.query_block < 0 || t.key_block < 0 || t.window_queries < 0 || t.window_keys < 0)
      throw InputError("bench attention: block sizes must be >= 0 (0: built-in choice)");
    set_attention_tuning(t);
    if (o.batch < 1 || o.heads < 1 || o.head_dim < 1) throw InputError("bench attention: --batch, --heads and --head-dim must be >= 1");
    // The inputs and output (each drawn in f32 first), before anything is allocated; the kernel's
    // workspace too when the sizes are sane enough to plan it.
    const double elt = static_cast<double>(c10::elementSize(o.dtype));
    const double tokens = static_cast<double>(o.grid.t) * static_cast<double>(o.grid.h) * static_cast<double>(o.grid.w);
    const double one = static_cast<double>(o.batch) * static_cast<double>(o.heads) * tokens * static_cast<double>(o.head_dim);
    double bytes = one * (4.0 * elt + 4.0) + 3.0 * 2048.0 * 2048.0 * 4.0;  // + the GEMM reference
    const double available = available_memory_bytes();
    if (available > 0 && bytes <= available && tokens < 1e12) {
      AttentionCall call;
      call.grid = o.grid;
      call.window = o.window;
      bytes += attention_cost(o.batch, o.heads, o.grid.numel(), o.grid.numel(), o.head_dim, o.head_dim, o.dtype, call)
                   .workspace_bytes;
    }
    if (!args->force && available > 0 && bytes > available)
      throw InputError("bench attention: grid " + args->grid + " (" + std::to_string(static_cast<long long>(tokens)) +
                       " tokens) x " + std::to_string(o.heads) + " heads x head dim " + std::to_string(o.head_dim) +
                       " needs about " + format_bytes(bytes) + " but only " + format_bytes(available) +
                       " of memory is free; use a smaller grid, or pass --force to try anyway");
    std::cout << run_attention_bench(o).dump() << std::endl;
  });
}

}  // namespace vdit::cli
