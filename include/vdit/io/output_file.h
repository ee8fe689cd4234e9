// Safe output files: nothing appears at the target path until the output is complete.
//
// Every output of vdit is first written to a temporary sibling of the target
// (".<base>.vdit-XXXXXX.tmp", same directory, so the final rename is atomic) and renamed into
// place by commit(). A temporary that is never committed (an exception, an early return) is
// removed by the destructor; one that is alive when SIGINT/SIGTERM arrives is removed by the
// handler that install_interrupt_cleanup() sets up. Ctrl-C therefore never leaves a partial
// video behind, and an existing file is only replaced when the caller asked for it.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace vdit {

// Validates an output path before any heavy work: the parent directory exists and a file can be
// created in it (a probe file is created and removed), and the target does not exist unless
// `overwrite`. An existing target is never replaced unless it is a regular file, or with
// `directory` (the output is a directory of PNG frames) a directory whose every entry is a
// regular file `replaceable_entry` accepts (none by default: only an empty directory); a FIFO, a
// device node or a socket is refused even with `overwrite`. Throws InputError (one line).
void check_output_path(const std::string& path, bool overwrite, bool directory = false,
                       const std::function<bool(const std::string& name)>& replaceable_entry = {});

class AtomicOutput {
 public:
  enum class Kind { File, Directory };

  // For Kind::Directory with overwrite=true, an existing target directory is only replaced when
  // every entry in it is a regular file accepted by `replaceable_entry` (a file name); the
  // default accepts nothing, so only an empty directory can be replaced. This keeps
  // "--overwrite -o ~/" from deleting a home directory.
  struct Options {
    bool overwrite = false;
    Kind kind = Kind::File;
    std::function<bool(const std::string& name)> replaceable_entry;
  };

  // Checks the target (as check_output_path) and creates the temporary file or directory.
  AtomicOutput(const std::string& target, const Options& options);
  explicit AtomicOutput(const std::string& target, bool overwrite = false)
      : AtomicOutput(target, Options{overwrite, Kind::File, {}}) {}
  ~AtomicOutput();

  AtomicOutput(const AtomicOutput&) = delete;
  AtomicOutput& operator=(const AtomicOutput&) = delete;

  const std::string& target_path() const { return target_; }
  // Path of the temporary file/directory; third-party writers (FFmpeg) open it by name.
  const std::string& temp_path() const { return temp_; }

  // Kind::File: appends bytes to the temporary file.
  void write(const void* data, std::size_t size);
  void write(const std::vector<unsigned char>& bytes) { write(bytes.data(), bytes.size()); }

  // Kind::Directory: writes a whole file `name` inside the temporary directory (registered for
  // interrupt cleanup like the directory itself).
  void write_file(const std::string& name, const void* data, std::size_t size);

  // Flushes and renames the temporary into place. Throws RuntimeError if that fails (the
  // temporary is then removed), InputError if the target appeared meanwhile and !overwrite.
  void commit();
  bool committed() const { return committed_; }

  // Removes the temporary now (also done by the destructor when not committed).
  void discard() noexcept;

 private:
  std::string target_;
  std::string temp_;
  Options options_;
  int fd_ = -1;
  bool committed_ = false;
  int temp_slot_ = -1;               // slot in the interrupt-cleanup registry
  std::vector<int> child_slots_;     // Kind::Directory: files written inside
  std::vector<std::string> children_;
};

// Installs SIGINT/SIGTERM handlers that unlink every live temporary output and exit with
// status 128 + the signal (130 for SIGINT, 143 for SIGTERM). Idempotent; the CLI calls it first
// thing in main().
void install_interrupt_cleanup();

// Number of temporaries currently registered for interrupt cleanup (for tests).
int live_temp_output_count();

}  // namespace vdit
