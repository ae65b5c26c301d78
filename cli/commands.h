// The table of `gyre` subcommands. Add one line here (and a cc_library dep in cli/BUILD.bazel)
// per new subcommand.
#pragma once

#include <span>

#include "cli/command.h"

namespace gyre::cli {

int RunVersion(int argc, char** argv);
int RunCoordinator(int argc, char** argv);

inline std::span<const Command> AllCommands() {
  static const Command kCommands[] = {
      {"version", "print the build's version and what it was built with", RunVersion},
      {"coordinator", "run the coordinator of one run (gRPC control + worker service)",
       RunCoordinator},
  };
  return kCommands;
}

}  // namespace gyre::cli
