// One `gyre` subcommand. Each lives in its own file (cli/<name>_command.cc), parses its own
// flags with CLI11, folds them into the config, and returns the process exit code.
#pragma once

namespace gyre::cli {

struct Command {
  const char* name;      // "prepare"
  const char* summary;   // one line for `gyre help`
  int (*run)(int argc, char** argv);  // argv[0] is "gyre <name>"
};

}  // namespace gyre::cli
