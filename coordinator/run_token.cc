#include "coordinator/run_token.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace gyre::coordinator {
namespace {

absl::Status Errno(const std::string& what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

}  // namespace

// POSIX directly, not gyre::Env: the Env seam has no permission bits, and the 0600 mode must be
// set at creation (O_EXCL), not after the secret is already on disk.
absl::StatusOr<std::string> LoadOrCreateRunToken(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      return Errno("stat", path);
    }
    if ((st.st_mode & 077) != 0) {
      ::close(fd);
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s is accessible by group or others (mode %o); chmod 600 it", path, st.st_mode & 0777));
    }
    char buffer[256];
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    ::close(fd);
    if (n < 0) return Errno("read", path);
    std::string token(buffer, static_cast<size_t>(n));
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
    if (token.size() < 16 || token.find_first_of(" \t\n") != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(path, " does not hold a bearer token"));
    }
    return token;
  }
  if (errno != ENOENT) return Errno("open", path);
  std::random_device source;  // the OS entropy source (getrandom / /dev/urandom)
  std::string token;
  for (int i = 0; i < 8; ++i) {
    const uint64_t word = (static_cast<uint64_t>(source()) << 32) | source();
    absl::StrAppend(&token, absl::Hex(word, absl::kZeroPad16));
  }
  fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Errno("create", path);
  const std::string line = token + "\n";
  const bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) &&
                  ::fsync(fd) == 0;
  ::close(fd);
  if (!ok) return Errno("write", path);
  return token;
}

}  // namespace gyre::coordinator
