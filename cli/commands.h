// The table of `gyre` subcommands. Add one line here (and a cc_library dep in cli/BUILD.bazel)
// per new subcommand.
#pragma once

#include <span>

#include "cli/command.h"

namespace gyre::cli {

int RunVersion(int argc, char** argv);
int RunLedger(int argc, char** argv);
int RunTrain(int argc, char** argv);
int RunWorker(int argc, char** argv);
int RunLaunch(int argc, char** argv);
int RunTokenize(int argc, char** argv);
int RunPrepare(int argc, char** argv);
int RunIndex(int argc, char** argv);
int RunSample(int argc, char** argv);
int RunCoordinator(int argc, char** argv);
int RunEval(int argc, char** argv);
int RunExport(int argc, char** argv);
int RunProvision(int argc, char** argv);

inline std::span<const Command> AllCommands() {
  static const Command kCommands[] = {
      {"version", "print the build's version and what it was built with", RunVersion},
      {"train", "train a model preset on this CPU (one process; synthetic or uint16 token file)", RunTrain},
      {"ledger", "the committed steps of a run, checked for gaps, duplicates and ranges", RunLedger},
      {"launch", "start a run: coordinator + workers (--local on this machine, --slurm, --k8s)", RunLaunch},
      {"provision", "keep a cluster's workers at the desired count (Slurm, Kubernetes, one supervised worker)", RunProvision},
      {"worker", "run one training worker of a run (usually started by `gyre launch`)", RunWorker},
      {"tokenize", "print the token ids of each JSON line's text", RunTokenize},
      {"prepare", "jsonl / jsonl.zst corpus -> token shards + RocksDB index", RunPrepare},
      {"index", "inspect a token index: `gyre index stats --index DIR [--json]`", RunIndex},
      {"sample", "print the samples each step and rank read (mix and determinism check)", RunSample},
      {"coordinator", "run the coordinator of one run (gRPC control + worker service)",
       RunCoordinator},
      {"eval", "evaluate a run's checkpoint: perplexity, passkey, generate, spectrum", RunEval},
      {"export", "a run's checkpoint -> safetensors + config.json for transformers (Llama, Mamba-2, xLSTM Large)", RunExport},
  };
  return kCommands;
}

}  // namespace gyre::cli
