#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "vdit/common.h"

int main(int argc, char* argv[]) {
  vdit::configure_blas(argv);
  vdit::set_threads(0);
  return Catch::Session().run(argc, argv);
}
