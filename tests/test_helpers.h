// Small checks several test files share.
#pragma once

#include <ATen/ATen.h>

#include <unistd.h>

#include <filesystem>
#include <string>

namespace vdit_test {

// Same shape, dtype and every bit of every element.
inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::equal(a.contiguous(), b.contiguous());
}

// A fresh directory under the system's temporary directory, removed with everything in it when
// the object goes. Names carry the process id and a counter, so parallel tests never share one.
struct ScopedTempDir {
  std::filesystem::path path;
  explicit ScopedTempDir(const std::string& tag = "test") {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("vdit-" + tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~ScopedTempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  ScopedTempDir(const ScopedTempDir&) = delete;
  ScopedTempDir& operator=(const ScopedTempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

}  // namespace vdit_test
