// Atomic outputs (temp sibling + rename) and the SIGINT/SIGTERM cleanup of live temporaries.
#include "vdit/io/output_file.h"

#include "vdit/common.h"
#include "vdit/io/input_file.h"

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <random>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace vdit {
namespace {

// ---------------------------------------------------------------------------------------------
// Registry of live temporaries. The signal handler may only use async-signal-safe calls, so the
// registry is a fixed array of atomic pointers to heap copies of the paths: registering and
// unregistering never lock, and the handler only loads pointers and calls unlink/rmdir/_exit.
constexpr int kMaxLiveTemps = 4096;
std::atomic<char*> g_live_temps[kMaxLiveTemps];

int register_temp(const std::string& path) {
  char* copy = strdup(path.c_str());
  if (!copy) return -1;
  for (int i = 0; i < kMaxLiveTemps; ++i) {
    char* expected = nullptr;
    if (g_live_temps[i].compare_exchange_strong(expected, copy)) return i;
  }
  std::free(copy);
  log_warning("too many temporary outputs; '" + path + "' will not be removed on Ctrl-C");
  return -1;
}

void unregister_temp(int slot) {
  if (slot < 0) return;
  std::free(g_live_temps[slot].exchange(nullptr));
}

extern "C" void remove_live_temps_and_exit(int signal_number) {
  // Files first (directories fail with EISDIR here), then the now-empty directories.
  for (int i = 0; i < kMaxLiveTemps; ++i) {
    if (const char* p = g_live_temps[i].load()) unlink(p);
  }
  for (int i = 0; i < kMaxLiveTemps; ++i) {
    if (const char* p = g_live_temps[i].load()) rmdir(p);
  }
  _exit(128 + signal_number);  // what a shell reports for a process the signal killed: 130, 143
}

// ---------------------------------------------------------------------------------------------
// Path helpers.

// "frames/" names the directory "frames"; keep "/" itself.
std::string strip_trailing_slashes(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

fs::path parent_dir_of(const fs::path& target) {
  fs::path parent = target.parent_path();
  return parent.empty() ? fs::path(".") : parent;
}

std::string random_suffix() {
  static constexpr char kAlphabet[] =
      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  thread_local std::mt19937_64 rng{std::random_device{}() ^
                                   (static_cast<std::uint64_t>(getpid()) << 32)};
  std::string s(6, 'x');
  for (char& c : s) c = kAlphabet[rng() % (sizeof(kAlphabet) - 1)];
  return s;
}

// ".<base>.vdit-XXXXXX<ext>" next to the target.
std::string sibling_name(const fs::path& target, const char* ext) {
  return (parent_dir_of(target) / ("." + target.filename().string() + ".vdit-" + random_suffix() + ext))
      .string();
}

bool path_exists_no_follow(const fs::path& p) {
  std::error_code ec;
  return fs::exists(fs::symlink_status(p, ec));
}

std::string errno_text() { return std::strerror(errno); }

// rename() that fails with EEXIST instead of replacing the target. Uses renameat2's
// RENAME_NOREPLACE where the kernel and file system support it; otherwise link()+unlink() for
// files (also atomic) and a check-then-rename for directories (a small race, but only then).
int rename_no_replace(const std::string& from, const std::string& to, bool is_directory) {
#if defined(SYS_renameat2)
  constexpr unsigned kRenameNoReplace = 1;  // RENAME_NOREPLACE
  if (syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), kRenameNoReplace) == 0)
    return 0;
  if (errno != ENOSYS && errno != EINVAL) return -1;
#endif
  if (!is_directory) {
    if (link(from.c_str(), to.c_str()) != 0) return -1;
    unlink(from.c_str());
    return 0;
  }
  if (path_exists_no_follow(to)) {
    errno = EEXIST;
    return -1;
  }
  return rename(from.c_str(), to.c_str());
}

std::string exists_message(const std::string& target) {
  return "output '" + target + "' already exists (pass --overwrite to replace it)";
}

// Only a directory holding nothing but files accepted by `accept` may be replaced.
void check_directory_replaceable(const std::string& target,
                                 const std::function<bool(const std::string&)>& accept) {
  std::error_code ec;
  for (fs::directory_iterator it(target, ec), end; !ec && it != end; it.increment(ec)) {
    const bool regular = it->is_regular_file(ec) && !it->is_symlink(ec);
    const std::string name = it->path().filename().string();
    if (!regular || !accept || !accept(name))
      throw InputError("refusing to replace directory '" + target + "': it contains '" + name +
                       "', which vdit did not write");
  }
  if (ec) throw InputError("cannot list directory '" + target + "': " + ec.message());
}

}  // namespace

// -----------------------------------------------------------------------------------------------

void check_output_path(const std::string& path_in, bool overwrite, bool directory,
                       const std::function<bool(const std::string&)>& replaceable_entry) {
  if (path_in.empty()) throw InputError("output path is empty");
  const fs::path target(strip_trailing_slashes(path_in));
  const fs::path parent = parent_dir_of(target);
  std::error_code ec;
  const fs::file_status parent_status = fs::status(parent, ec);
  if (!fs::exists(parent_status))
    throw InputError("output directory '" + parent.string() + "' does not exist (for '" + path_in + "')");
  if (!fs::is_directory(parent_status))
    throw InputError("'" + parent.string() + "' is not a directory (for output '" + path_in + "')");
  if (access(parent.c_str(), W_OK) != 0)
    throw InputError("output directory '" + parent.string() + "' is not writable");

  if (path_exists_no_follow(target)) {
    // Only what vdit could have written is ever replaced: a regular file, or for PNG frames a
    // directory of them. A FIFO, a device node or a socket is refused with or without
    // --overwrite (renaming over /dev/full as root would replace the system's device).
    struct stat st {};
    if (::stat(target.c_str(), &st) != 0)
      throw InputError("output '" + target.string() + "' exists but cannot be examined: " + errno_text());
    const bool is_dir = S_ISDIR(st.st_mode);
    if (!is_dir && !S_ISREG(st.st_mode))
      throw InputError("output '" + target.string() + "' is " + detail::file_type_name(st.st_mode) +
                       ", not a regular file; vdit only replaces regular files");
    if (is_dir && !directory) throw InputError("output '" + target.string() + "' is a directory; give a file name");
    if (!is_dir && directory) throw InputError("output '" + target.string() + "' exists and is not a directory");
    if (!overwrite) throw InputError(exists_message(target.string()));
    if (is_dir) check_directory_replaceable(target.string(), replaceable_entry);
  }

  // Write permission bits do not tell everything (root passes access() on /proc; a read-only
  // mount; a full quota): create and remove a probe file where the output's temporary will go.
  const std::string probe = sibling_name(target, ".probe");
  const int slot = register_temp(probe);
  const int fd = open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  const int err = errno;
  if (fd >= 0) {
    close(fd);
    unlink(probe.c_str());
  }
  unregister_temp(slot);
  if (fd < 0 && err != EEXIST)
    throw InputError("cannot create files in '" + parent.string() + "' (for output '" + path_in + "'): " +
                     std::strerror(err));
}

AtomicOutput::AtomicOutput(const std::string& target, const Options& options)
    : target_(strip_trailing_slashes(target)), options_(options) {
  const bool is_dir = options_.kind == Kind::Directory;
  check_output_path(target_, options_.overwrite, is_dir, options_.replaceable_entry);

  // Register the candidate name before creating it, so no instant exists in which a signal
  // could leave an unregistered temporary behind.
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::string candidate = sibling_name(target_, ".tmp");
    const int slot = register_temp(candidate);
    int rc;
    if (is_dir) {
      rc = mkdir(candidate.c_str(), 0777);
    } else {
      // 0666 & ~umask: the committed file gets the permissions any new file would get.
      fd_ = open(candidate.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      rc = fd_ >= 0 ? 0 : -1;
    }
    if (rc == 0) {
      temp_ = std::move(candidate);
      temp_slot_ = slot;
      return;
    }
    const int err = errno;
    unregister_temp(slot);
    if (err != EEXIST)
      throw InputError("cannot create a temporary file next to '" + target_ + "': " + std::strerror(err));
  }
  throw RuntimeError("cannot create a unique temporary file next to '" + target_ + "'");
}

AtomicOutput::~AtomicOutput() {
  if (!committed_) discard();
}

void AtomicOutput::write(const void* data, std::size_t size) {
  if (options_.kind != Kind::File || fd_ < 0)
    throw RuntimeError("AtomicOutput::write: '" + target_ + "' is not an open file output");
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd_, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw RuntimeError("cannot write '" + target_ + "': " + errno_text());
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

void AtomicOutput::write_file(const std::string& name, const void* data, std::size_t size) {
  if (options_.kind != Kind::Directory || committed_ || temp_.empty())
    throw RuntimeError("AtomicOutput::write_file: '" + target_ + "' is not an open directory output");
  if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
    throw RuntimeError("AtomicOutput::write_file: bad file name '" + name + "'");
  const std::string path = temp_ + "/" + name;
  const int slot = register_temp(path);
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) {
    const int err = errno;
    unregister_temp(slot);
    throw RuntimeError("cannot create '" + path + "': " + std::strerror(err));
  }
  child_slots_.push_back(slot);
  children_.push_back(path);
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      close(fd);
      throw RuntimeError("cannot write '" + target_ + "/" + name + "': " + std::strerror(err));
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
  if (close(fd) != 0) throw RuntimeError("cannot write '" + target_ + "/" + name + "': " + errno_text());
}

void AtomicOutput::commit() {
  if (committed_) return;
  if (temp_.empty()) throw RuntimeError("AtomicOutput::commit: '" + target_ + "' was discarded");
  const bool is_dir = options_.kind == Kind::Directory;
  if (fd_ >= 0) {
    // Data must be on disk before the rename makes it visible, or a crash could leave an
    // empty file under the final name. fsync covers writes made through other descriptors too.
    const bool ok = fsync(fd_) == 0;
    const int err = errno;
    close(fd_);
    fd_ = -1;
    if (!ok && err != EINVAL) {
      discard();
      throw RuntimeError("cannot write '" + target_ + "': " + std::strerror(err));
    }
  }

  if (options_.overwrite && !is_dir && path_exists_no_follow(target_)) {
    // Something may have taken the target's place since the start (a FIFO, a device node).
    struct stat st {};
    if (::stat(target_.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
      discard();
      throw InputError("output '" + target_ + "' is " + detail::file_type_name(st.st_mode) +
                       ", not a regular file; vdit only replaces regular files");
    }
  }
  if (!options_.overwrite) {
    if (rename_no_replace(temp_, target_, is_dir) != 0) {
      const int err = errno;
      discard();
      if (err == EEXIST || err == ENOTEMPTY) throw InputError(exists_message(target_));
      throw RuntimeError("cannot rename output into '" + target_ + "': " + std::strerror(err));
    }
  } else if (is_dir && path_exists_no_follow(target_)) {
    // rename() cannot replace a non-empty directory: move the old one aside, move the new one
    // in, then delete the old one.
    try {
      check_directory_replaceable(target_, options_.replaceable_entry);
    } catch (...) {
      discard();
      throw;
    }
    const std::string aside = sibling_name(target_, ".old");
    if (rename(target_.c_str(), aside.c_str()) != 0) {
      const int err = errno;
      discard();
      throw RuntimeError("cannot move old '" + target_ + "' aside: " + std::strerror(err));
    }
    if (rename(temp_.c_str(), target_.c_str()) != 0) {
      const int err = errno;
      rename(aside.c_str(), target_.c_str());
      discard();
      throw RuntimeError("cannot rename output into '" + target_ + "': " + std::strerror(err));
    }
    std::error_code ec;
    fs::remove_all(aside, ec);
    if (ec) log_warning("could not remove old output '" + aside + "': " + ec.message());
  } else if (rename(temp_.c_str(), target_.c_str()) != 0) {
    const int err = errno;
    discard();
    throw RuntimeError("cannot rename output into '" + target_ + "': " + std::strerror(err));
  }

  committed_ = true;
  for (int slot : child_slots_) unregister_temp(slot);
  child_slots_.clear();
  children_.clear();
  unregister_temp(temp_slot_);
  temp_slot_ = -1;
}

void AtomicOutput::discard() noexcept {
  if (fd_ >= 0) {
    close(fd_);
    fd_ = -1;
  }
  for (const std::string& child : children_) unlink(child.c_str());
  if (!temp_.empty()) {
    if (options_.kind == Kind::Directory) {
      std::error_code ec;
      fs::remove_all(temp_, ec);  // also anything a third-party writer put there
    } else {
      unlink(temp_.c_str());
    }
  }
  for (int slot : child_slots_) unregister_temp(slot);
  child_slots_.clear();
  children_.clear();
  unregister_temp(temp_slot_);
  temp_slot_ = -1;
  temp_.clear();
}

void install_interrupt_cleanup() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action;
    std::memset(&action, 0, sizeof(action));
    action.sa_handler = remove_live_temps_and_exit;
    sigemptyset(&action.sa_mask);
    sigaddset(&action.sa_mask, SIGINT);
    sigaddset(&action.sa_mask, SIGTERM);
    sigaction(SIGINT, &action, nullptr);
    sigaction(SIGTERM, &action, nullptr);
  });
}

int live_temp_output_count() {
  int n = 0;
  for (int i = 0; i < kMaxLiveTemps; ++i) n += g_live_temps[i].load() != nullptr;
  return n;
}

}  // namespace vdit
