// The table of `gyre` subcommands. Add one line here (and a cc_library dep in cli/BUILD.bazel)
// per new subcommand.
#pragma once

#include <span>

#include "cli/command.h"

namespace gyre::cli {

int RunVersion(int argc, char** argv);
int RunTrain(int argc, char** argv);

inline std::span<const Command> AllCommands() {
  static const Command kCommands[] = {
      {"version", "print the build's version and what it was built with", RunVersion},
      {"train", "train a model preset on this CPU (one process; synthetic or uint16 token file)", RunTrain},
  };
  return kCommands;
}

}  // namespace gyre::cli
