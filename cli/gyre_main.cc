// `gyre`: the multi-call front-end. `gyre <command> [flags]`; `gyre help` lists commands.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>
#include <string>

#include "cli/commands.h"

namespace gyre::cli {

int RunVersion(int, char**) {
  std::printf("gyre 0.1 (C++%ld)\n", __cplusplus / 100 % 100);
  return 0;
}

namespace {

int PrintHelp(FILE* out) {
  std::fprintf(out, "usage: gyre <command> [flags]   (gyre <command> --help for its flags)\n\n");
  for (const Command& c : AllCommands()) std::fprintf(out, "  %-12s %s\n", c.name, c.summary);
  return 0;
}

}  // namespace
}  // namespace gyre::cli

// Debian's OpenBLAS 0.3.21 does not recognise recent Xeons and falls back to its slowest
// ("Prescott") kernels: 5x slower sgemm on the development machines. It reads
// OPENBLAS_CORETYPE when the library loads, before main, so pick the right kernels and re-exec
// once. An explicit OPENBLAS_CORETYPE in the environment is respected.
void SelectOpenBlasKernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  __builtin_cpu_init();
  const char* core = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : nullptr;
  if (core == nullptr) return;
  ::setenv("OPENBLAS_CORETYPE", core, 1);
  ::execv("/proc/self/exe", argv);  // on failure: carry on with the default kernels
}

int main(int argc, char** argv) {
  SelectOpenBlasKernels(argv);
  using gyre::cli::AllCommands;
  if (argc < 2 || std::strcmp(argv[1], "help") == 0 || std::strcmp(argv[1], "--help") == 0 ||
      std::strcmp(argv[1], "-h") == 0) {
    return gyre::cli::PrintHelp(argc < 2 ? stderr : stdout) + (argc < 2 ? 2 : 0);
  }
  for (const gyre::cli::Command& c : AllCommands()) {
    if (std::strcmp(argv[1], c.name) == 0) {
      std::string name = std::string("gyre ") + c.name;
      argv[1] = name.data();
      return c.run(argc - 1, argv + 1);
    }
  }
  std::fprintf(stderr, "gyre: unknown command '%s'\n\n", argv[1]);
  gyre::cli::PrintHelp(stderr);
  return 2;
}
