// vdit command-line entry: global options, JSON config files, and the mapping of errors to exit
// codes (2: bad input, 1: runtime failure). Subcommands live in cmd_*.cpp.
#include "cli_common.h"
#include "commands.h"
#include "json_config.h"
#include "option_groups.h"

#include "vdit/common.h"
#include "vdit/io/input_file.h"
#include "vdit/io/output_file.h"
#include "vdit/version.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <iostream>
#include <memory>

namespace {

// Every long option and subcommand name under `app`, for "did you mean" suggestions.
void collect_names(const CLI::App& app, std::vector<std::string>& names) {
  for (const CLI::Option* opt : app.get_options({}))
    for (const std::string& name : opt->get_lnames()) names.push_back(name);
  for (const CLI::App* sub : app.get_subcommands({})) {
    names.push_back(sub->get_name());
    collect_names(*sub, names);
  }
}

// --config FILE's unknown key `item` ("generate.stepz"), with the known name nearest to its last part.
std::string unknown_config_key_message(const CLI::App& app, const std::string& item) {
  std::vector<std::string> names;
  collect_names(app, names);
  const std::string key = item.substr(item.rfind('.') == std::string::npos ? 0 : item.rfind('.') + 1);
  std::string file;
  if (const CLI::Option* config = app.get_config_ptr(); config && !config->results().empty()) file = config->results().front();
  std::string message = "--config '" + file + "': unknown key '" + item + "'";
  const std::string nearest = vdit::cli::nearest_name(key, names);
  if (!nearest.empty()) message += " (did you mean '" + nearest + "'?)";
  return message;
}

}  // namespace

int main(int argc, char** argv) {
  // First thing: a SIGINT or SIGTERM from here on removes every temporary output and exits 130 or
  // 143 (configure_blas may re-execute the program, which installs it again at once).
  vdit::install_interrupt_cleanup();
  vdit::configure_blas(argv);
  CLI::App app{"vdit: diffusion-transformer video and image generation (Wan2.1) on LibTorch", "vdit"};
  app.set_version_flag("--version", std::string("vdit ") + VDIT_VERSION_STRING);
  app.require_subcommand(1);
  app.fallthrough();
  // Unknown keys in a --config file are errors, as unknown flags are (set before the subcommands,
  // which inherit it).
  app.allow_config_extras(CLI::config_extras_mode::error);
  app.config_formatter(std::make_shared<vdit::cli::JsonConfig>());
  app.set_config("--config", "", "Read any option from a JSON file ({\"option\": value, \"subcommand\": {...}}); command-line wins")
      // Checked as soon as it is parsed, before CLI11 opens it: a FIFO would block the read.
      ->check(CLI::Validator(
          [](std::string& path) {
            try {
              vdit::check_input_path(path, "", vdit::InputKind::File);
            } catch (const vdit::InputError& e) {
              return std::string(e.what());
            }
            return std::string();
          },
          "FILE"))
      ->trigger_on_parse();
  app.get_formatter()->column_width(34);

  vdit::cli::GlobalOptions global;
  app.add_option("--device", global.device, "Compute device: cpu, cuda or cuda:N")->capture_default_str();
  app.add_option("--dtype", global.dtype, "Compute dtype: f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda)");
  app.add_option("--threads", global.threads,
                 "Intra-op CPU threads: 0 (all cores) up to " + std::to_string(vdit::cli::max_threads()) + " (4 per core)")
      ->capture_default_str();
  app.add_flag("-v,--verbose", global.verbose, "Verbose logging");
  app.add_flag("--quiet", global.quiet, "Only errors");
  app.add_option("--dist-timeout", global.dist_timeout,
                 "Seconds a rank of a multi-process job (torchrun, vdit launch) waits for its peers before failing "
                 "(default: VDIT_DIST_TIMEOUT or 300)");

  app.parse_complete_callback([&] {
    vdit::set_log_level(global.quiet ? vdit::LogLevel::Quiet : global.verbose ? vdit::LogLevel::Verbose : vdit::LogLevel::Info);
    vdit::cli::check_global_options(global);
    vdit::set_threads(global.threads);
    // Denormal floats take a slow microcode path on x86; small trained models produce them in
    // their VAE (measured: a demo-VAE training step 22 s with, 0.8 s without). Flushing them to
    // zero changes results by less than 1e-38.
    at::globalContext().setFlushDenormal(true);
  });

  vdit::cli::register_generate_command(app, global);
  vdit::cli::register_info_command(app, global);
  vdit::cli::register_bench_command(app, global);
  vdit::cli::register_eval_command(app, global);
  vdit::cli::register_train_demo_command(app, global);
  vdit::cli::register_heads_command(app, global);
  vdit::cli::register_edit_command(app, global);
  vdit::cli::register_launch_command(app, global);
  vdit::cli::register_upscale_command(app, global);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ConfigError& e) {
    std::string what = e.what();
    const std::string prefix = "INI was not able to parse ";
    if (what.rfind(prefix, 0) == 0) what = unknown_config_key_message(app, what.substr(prefix.size()));
    std::cerr << "vdit: error: " << what.substr(0, what.find('\n')) << std::endl;
    return 2;
  } catch (const CLI::ParseError& e) {
    std::string what = e.what();
    std::cerr << "vdit: error: " << what.substr(0, what.find('\n')) << " (see vdit --help)" << std::endl;
    return 2;
  } catch (const vdit::cli::ExitStatus& e) {
    return e.code;
  } catch (const vdit::InputError& e) {
    std::cerr << "vdit: error: " << e.what() << std::endl;
    return 2;
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    std::cerr << "vdit: error: " << what.substr(0, what.find('\n')) << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::string what = e.what();
    std::cerr << "vdit: error: " << what.substr(0, what.find('\n')) << std::endl;
    return 1;
  }
  return 0;
}
