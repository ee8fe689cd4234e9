// libFuzzer target for WeightFile::open, the reader behind every weights file a user names: the
// bytes are written to a file (the readers take paths) and opened by content, so a torch.save zip
// (.pth: LibTorch's zip reader and unpickler, then vdit's dict flattening), a safetensors file and
// a sharded-checkpoint index all come through here. Any input must open or raise InputError.
#include "vdit/common.h"
#include "vdit/io/checkpoint.h"

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace {
std::string scratch_path() {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir && *dir ? dir : "/tmp") + "/vdit-fuzz-weights-" + std::to_string(::getpid());
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string path = scratch_path();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  try {
    auto file = vdit::WeightFile::open(path);
    (void)file->parameter_count();
    int loaded = 0;
    for (const auto& key : file->keys()) {
      (void)file->meta(key);
      if (++loaded <= 8) (void)file->load(key);
    }
  } catch (const vdit::InputError&) {
  }
  return 0;
}
