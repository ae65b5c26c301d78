// Token files bypass Env on purpose: they need POSIX permission bits (0600), which Env does not
// model; tests use a temporary directory.
#include "base/run_dir.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace gyre {

absl::StatusOr<std::string> ReadToken(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    std::string msg = absl::StrCat("token file ", path, ": ", std::strerror(errno));
    return errno == ENOENT ? absl::NotFoundError(msg) : absl::PermissionDeniedError(msg);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    ::close(fd);
    return absl::PermissionDeniedError(absl::StrCat("token file ", path,
                                                    " is readable by group or others; chmod 600 it"));
  }
  char buf[256];
  ssize_t n = ::read(fd, buf, sizeof(buf));
  ::close(fd);
  if (n <= 0) return absl::DataLossError(absl::StrCat("token file ", path, " is empty"));
  std::string token(buf, static_cast<size_t>(n));
  absl::StripAsciiWhitespace(&token);
  if (token.empty()) return absl::DataLossError(absl::StrCat("token file ", path, " is empty"));
  return token;
}

absl::StatusOr<std::string> CreateOrReadToken(const std::string& path) {
  if (::access(path.c_str(), F_OK) == 0) return ReadToken(path);
  unsigned char random[32];
  int rnd = ::open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (rnd < 0 || ::read(rnd, random, sizeof(random)) != static_cast<ssize_t>(sizeof(random))) {
    if (rnd >= 0) ::close(rnd);
    return absl::UnavailableError("cannot read /dev/urandom for the control token");
  }
  ::close(rnd);
  std::string token;
  for (unsigned char b : random) absl::StrAppend(&token, absl::Hex(b, absl::kZeroPad2));
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return absl::PermissionDeniedError(absl::StrCat("create token file ", tmp, ": ", std::strerror(errno)));
  std::string line = token + "\n";
  bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("write token file ", path, ": ", std::strerror(errno)));
  }
  return token;
}

}  // namespace gyre
