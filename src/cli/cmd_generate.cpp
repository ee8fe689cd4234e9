#include "commands.h"

#include "vdit/common.h"

namespace vdit::cli {
void register_generate_command(CLI::App& app, GlobalOptions& global) {
  CLI::App* cmd = app.add_subcommand("generate", "Text-to-video / text-to-image (pipeline under construction)");
  cmd->callback([] { throw RuntimeError("generate is not available yet in this build"); });
}
}  // namespace vdit::cli
