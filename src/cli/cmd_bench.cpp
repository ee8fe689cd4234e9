// Placeholder until the attention benchmark lands (owned by the attention engine work).
#include "commands.h"

#include "vdit/common.h"

namespace vdit::cli {
void register_bench_command(CLI::App& app, GlobalOptions& global) {
  CLI::App* cmd = app.add_subcommand("bench", "Benchmarks");
  cmd->callback([] { throw RuntimeError("no benchmark in this build yet"); });
}
}  // namespace vdit::cli
