// vdit command-line entry: global options, JSON config files, and the mapping of errors to exit
// codes (2: bad input, 1: runtime failure). Subcommands live in cmd_*.cpp.
#include "commands.h"
#include "json_config.h"

#include "vdit/common.h"
#include "vdit/version.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <iostream>
#include <memory>

int main(int argc, char** argv) {
  vdit::configure_blas(argv);
  CLI::App app{"vdit: diffusion-transformer video and image generation (Wan2.1) on LibTorch", "vdit"};
  app.set_version_flag("--version", std::string("vdit ") + VDIT_VERSION_STRING);
  app.require_subcommand(1);
  app.fallthrough();
  app.config_formatter(std::make_shared<vdit::cli::JsonConfig>());
  app.set_config("--config", "", "Read any option from a JSON file ({\"option\": value, \"subcommand\": {...}}); command-line wins");
  app.get_formatter()->column_width(34);

  vdit::cli::GlobalOptions global;
  app.add_option("--device", global.device, "Compute device: cpu, cuda or cuda:N")->capture_default_str();
  app.add_option("--dtype", global.dtype, "Compute dtype: f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda)");
  app.add_option("--threads", global.threads, "Intra-op CPU threads (0: all cores)")->capture_default_str();
  app.add_flag("-v,--verbose", global.verbose, "Verbose logging");
  app.add_flag("--quiet", global.quiet, "Only errors");

  app.parse_complete_callback([&] {
    vdit::set_log_level(global.quiet ? vdit::LogLevel::Quiet : global.verbose ? vdit::LogLevel::Verbose : vdit::LogLevel::Info);
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

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string what = e.what();
    std::cerr << "vdit: error: " << what.substr(0, what.find('\n')) << " (see vdit --help)" << std::endl;
    return 2;
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
