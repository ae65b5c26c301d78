#include "coordinator/run_token.h"

#include <sys/stat.h>

#include <cstdlib>
#include <fstream>

#include "gtest/gtest.h"

namespace gyre::coordinator {
namespace {

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

TEST(RunTokenTest, CreatedWithMode0600AndReloaded) {
  const std::string path = TempPath("token-a");
  std::remove(path.c_str());
  auto token = LoadOrCreateRunToken(path);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(token->size(), 128u);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto again = LoadOrCreateRunToken(path);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *token);
  const std::string other = TempPath("token-b");
  std::remove(other.c_str());
  auto fresh = LoadOrCreateRunToken(other);
  ASSERT_TRUE(fresh.ok());
  EXPECT_NE(*fresh, *token);
}

TEST(RunTokenTest, RefusesAWorldReadableToken) {
  const std::string path = TempPath("token-c");
  std::remove(path.c_str());
  std::ofstream(path) << "0123456789abcdef0123\n";
  ::chmod(path.c_str(), 0644);
  EXPECT_EQ(LoadOrCreateRunToken(path).status().code(), absl::StatusCode::kFailedPrecondition);
  ::chmod(path.c_str(), 0600);
  auto token = LoadOrCreateRunToken(path);
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(*token, "0123456789abcdef0123");
}

}  // namespace
}  // namespace gyre::coordinator
