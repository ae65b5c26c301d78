// `gyre`: the multi-call front-end. `gyre <command> [flags]`; `gyre help` lists commands.
#include <cstdio>
#include <cstring>
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

int main(int argc, char** argv) {
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
