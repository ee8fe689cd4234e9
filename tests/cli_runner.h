// Runs the built vdit binary for CLI tests. One definition for every test file that drives the
// command line.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace vdit_test {

// The binary under test: VDIT_TEST_BINARY when set (make test-asan points it at the sanitizer
// build of the CLI, so the same table runs with ASan + UBSan watching), else this build's vdit.
inline std::string vdit_binary() {
  const char* override_binary = std::getenv("VDIT_TEST_BINARY");
  return override_binary && *override_binary ? std::string(override_binary) : std::string(VDIT_BINARY);
}

// Runs `vdit --threads 2 ARGS` through the shell (two threads: what CI machines have, whatever
// this one has). Fills `output` with stdout and stderr (stdout only when merge_stderr is false)
// and returns the exit code, -1 when the process did not exit normally.
inline int run_vdit(const std::string& args, std::string* output = nullptr, bool merge_stderr = true) {
  namespace fs = std::filesystem;
  const std::string log = (fs::temp_directory_path() / ("vdit-cli-" + std::to_string(::getpid()) + ".log")).string();
  const std::string command =
      vdit_binary() + " --threads 2 " + args + " > " + log + (merge_stderr ? " 2>&1" : " 2>/dev/null");
  const int status = std::system(command.c_str());
  if (output) {
    std::ifstream in(log);
    output->assign(std::istreambuf_iterator<char>(in), {});
  }
  fs::remove(log);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline int run_vdit(const std::string& args, std::string& output, bool merge_stderr = true) {
  return run_vdit(args, &output, merge_stderr);
}

}  // namespace vdit_test
