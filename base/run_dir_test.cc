#include "base/run_dir.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "gtest/gtest.h"

namespace gyre {
namespace {

std::string TempDir() {
  const char* t = std::getenv("TEST_TMPDIR");
  return std::string(t ? t : "/tmp");
}

TEST(RunDirTest, TokenIsCreatedOnceWithMode0600) {
  std::string path = TempDir() + "/token_a";
  ::unlink(path.c_str());
  auto t1 = CreateOrReadToken(path);
  ASSERT_TRUE(t1.ok()) << t1.status();
  EXPECT_EQ(t1->size(), 64u);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600);
  auto t2 = CreateOrReadToken(path);  // a restarted coordinator keeps the token
  ASSERT_TRUE(t2.ok());
  EXPECT_EQ(*t1, *t2);
  EXPECT_EQ(*ReadToken(path), *t1);
}

TEST(RunDirTest, WorldReadableOrMissingTokenIsRefused) {
  std::string path = TempDir() + "/token_b";
  { std::ofstream(path) << "secret\n"; }
  ::chmod(path.c_str(), 0644);
  auto t = ReadToken(path);
  EXPECT_TRUE(absl::IsPermissionDenied(t.status())) << t.status();
  EXPECT_NE(t.status().message().find("chmod 600"), std::string_view::npos);
  ::chmod(path.c_str(), 0600);
  EXPECT_EQ(*ReadToken(path), "secret");
  EXPECT_TRUE(absl::IsNotFound(ReadToken(TempDir() + "/nope").status()));
}

TEST(RunDirTest, Paths) {
  EXPECT_EQ(RunDir("runs/x").token_path(), "runs/x/token");
  EXPECT_EQ(RunDir("runs/x").control_address_path(), "runs/x/coordinator.addr");
}

}  // namespace
}  // namespace gyre
