// Checks on the files a user names as input (weights, configs, noise, init frames), made before
// anything opens them: opening a FIFO blocks until a writer appears, a device never ends, and a
// symlink loop surfaces as a raw filesystem error deep inside a reader. Header-only, so the
// small sanitizer and fuzzer builds of the parsers need no further source file.
#pragma once

#include "vdit/common.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace vdit {

enum class InputKind {
  File,             // a regular file (symlinks followed)
  Directory,        // a directory
  FileOrDirectory,  // either (a video file or a PNG frame directory; a DiT file or folder)
};

namespace detail {
inline const char* file_type_name(mode_t mode) {
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISDIR(mode)) return "a directory";
  return "a special file";
}
}  // namespace detail

// Throws InputError, one line starting with `what` (an option such as "--noise", or empty) and the
// path, unless `path` names an existing input of `kind`: missing, a symlink loop, a permission
// error, a FIFO, a device or a socket are each named as such.
inline void check_input_path(const std::string& path, const std::string& what, InputKind kind = InputKind::File) {
  const std::string name = (what.empty() ? std::string() : what + " ") + "'" + path + "'";
  if (path.empty()) throw InputError((what.empty() ? std::string("input") : what) + ": empty path");
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT) throw InputError(name + ": no such file or directory");
    if (err == ELOOP) throw InputError(name + ": too many levels of symbolic links (a symlink loop?)");
    throw InputError(name + ": " + std::strerror(err));
  }
  const bool regular = S_ISREG(st.st_mode), directory = S_ISDIR(st.st_mode);
  if (kind == InputKind::File && directory) throw InputError(name + ": is a directory, expected a file");
  if (kind == InputKind::File && !regular)
    throw InputError(name + ": is " + detail::file_type_name(st.st_mode) + ", expected a regular file");
  if (kind == InputKind::Directory && !directory) throw InputError(name + ": not a directory");
  if (kind == InputKind::FileOrDirectory && !regular && !directory)
    throw InputError(name + ": is " + detail::file_type_name(st.st_mode) + ", expected a regular file or a directory");
}

}  // namespace vdit
