#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "vdit/common.h"
#include "vdit/demo/process_tuning.h"

#include <cstdlib>
#include <cstring>

int main(int argc, char* argv[]) {
  vdit::configure_blas(argv);
  vdit::set_threads(0);
  // The trainer tests run VAE and DiT steps; without these settings a VAE step is ~25x slower.
  vdit::demo::tune_process_for_training();
  // VDIT_TEST_WITHOUT_ONEDNN=1 runs the suite on LibTorch's own CPU kernels, the bf16 path of CPUs
  // without AVX-512, so their numerics can be checked on any machine.
  if (const char* v = std::getenv("VDIT_TEST_WITHOUT_ONEDNN"); v && std::strcmp(v, "1") == 0)
    at::globalContext().setUserEnabledMkldnn(false);
  return Catch::Session().run(argc, argv);
}
