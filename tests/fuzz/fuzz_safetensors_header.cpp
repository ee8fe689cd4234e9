// libFuzzer target for the safetensors header parser (built when clang is the compiler):
// any byte string must either parse or raise InputError, never crash or read out of bounds.
#include "vdit/common.h"
#include "vdit/io/safetensors.h"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    auto header = vdit::parse_safetensors(data, size, "fuzz");
    (void)header;
  } catch (const vdit::InputError&) {
  }
  return 0;
}
