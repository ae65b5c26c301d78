#include "base/env.h"

#include <unistd.h>

#include <cstdlib>

#include "base/fault_injection_env.h"
#include "base/mem_env.h"
#include "gtest/gtest.h"

namespace gyre {
namespace {

// The same behavioural checks run against the POSIX Env (in a temp dir) and the in-memory Env.
class EnvContractTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) {
      mem_ = NewMemEnv();
      env_ = mem_.get();
      root_ = "/t";
    } else {
      env_ = Env::Default();
      const char* tmp = std::getenv("TEST_TMPDIR");
      root_ = JoinPath(tmp ? tmp : "/tmp", "env_contract_" + std::to_string(::getpid()));
      ASSERT_TRUE(env_->RemoveAll(root_).ok());
    }
    ASSERT_TRUE(env_->CreateDirs(root_).ok());
  }
  std::string P(const std::string& name) { return JoinPath(root_, name); }

  std::unique_ptr<Env> mem_;
  Env* env_ = nullptr;
  std::string root_;
};

TEST_P(EnvContractTest, WriteReadMapRenameList) {
  auto file = env_->NewWritableFile(P("a.bin"));
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_TRUE((*file)->Append("hello ").ok());
  ASSERT_TRUE((*file)->Append("world").ok());
  ASSERT_TRUE((*file)->Sync().ok());
  ASSERT_TRUE((*file)->Close().ok());
  EXPECT_EQ(*env_->ReadFile(P("a.bin")), "hello world");
  EXPECT_EQ(*env_->FileSize(P("a.bin")), 11u);
  auto region = env_->MapFile(P("a.bin"));
  ASSERT_TRUE(region.ok());
  EXPECT_EQ((*region)->data(), "hello world");

  ASSERT_TRUE(env_->CreateDirs(P("sub/deeper")).ok());
  ASSERT_TRUE(env_->Rename(P("a.bin"), P("sub/b.bin")).ok());
  EXPECT_FALSE(env_->Exists(P("a.bin")));
  auto names = env_->ListDir(root_);
  ASSERT_TRUE(names.ok());
  EXPECT_EQ(*names, std::vector<std::string>({"sub"}));
  names = env_->ListDir(P("sub"));
  EXPECT_EQ(*names, std::vector<std::string>({"b.bin", "deeper"}));

  ASSERT_TRUE(WriteFileAtomically(env_, P("sub/b.bin"), "replaced").ok());
  EXPECT_EQ(*env_->ReadFile(P("sub/b.bin")), "replaced");
  EXPECT_FALSE(env_->Exists(P("sub/b.bin.tmp")));
  ASSERT_TRUE(env_->RemoveAll(P("sub")).ok());
  EXPECT_FALSE(env_->Exists(P("sub/b.bin")));
}

TEST_P(EnvContractTest, RangedReadsStopAtTheEndOfTheFile) {
  std::string content;
  for (int i = 0; i < 1000; ++i) content.push_back(static_cast<char>('a' + i % 26));
  ASSERT_TRUE(WriteFileAtomically(env_, P("r.bin"), content).ok());
  auto file = env_->NewRandomAccessFile(P("r.bin"));
  ASSERT_TRUE(file.ok()) << file.status();
  std::string scratch(400, '\0');
  auto n = (*file)->Read(0, 400, scratch.data());
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, 400u);
  EXPECT_EQ(scratch, content.substr(0, 400));
  n = (*file)->Read(700, 400, scratch.data());  // the last 300 bytes
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 300u);
  EXPECT_EQ(scratch.substr(0, 300), content.substr(700));
  n = (*file)->Read(1000, 10, scratch.data());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);
  n = (*file)->Read(5000, 10, scratch.data());
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);
}

TEST_P(EnvContractTest, MissingFilesAreNotFound) {
  EXPECT_TRUE(absl::IsNotFound(env_->NewRandomAccessFile(P("nope")).status()));
  EXPECT_TRUE(absl::IsNotFound(env_->ReadFile(P("nope")).status()));
  EXPECT_TRUE(absl::IsNotFound(env_->MapFile(P("nope")).status()));
  EXPECT_TRUE(absl::IsNotFound(env_->ListDir(P("nodir")).status()));
  EXPECT_TRUE(absl::IsNotFound(env_->NewWritableFile(P("nodir/x")).status()));
  // The message names the file.
  EXPECT_NE(env_->ReadFile(P("nope")).status().message().find("nope"), std::string_view::npos);
}

INSTANTIATE_TEST_SUITE_P(PosixAndMem, EnvContractTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Mem" : "Posix"; });

TEST(FaultInjectionEnvTest, CrashDropsUnsyncedBytesAndUndurableFiles) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(env.CreateDirs("/d").ok());
  ASSERT_TRUE(env.SyncDir("/d").ok());
  auto f = env.NewWritableFile("/d/log");
  ASSERT_TRUE((*f)->Append("durable").ok());
  ASSERT_TRUE((*f)->Sync().ok());
  ASSERT_TRUE(env.SyncDir("/d").ok());
  ASSERT_TRUE((*f)->Append("-lost").ok());
  auto g = env.NewWritableFile("/d/new");  // created, never dir-synced
  ASSERT_TRUE((*g)->Append("x").ok());
  ASSERT_TRUE((*g)->Sync().ok());
  ASSERT_TRUE(env.SimulateCrash().ok());
  EXPECT_EQ(*env.ReadFile("/d/log"), "durable");
  EXPECT_FALSE(env.Exists("/d/new"));
}

TEST(FaultInjectionEnvTest, RenameWithoutDirSyncIsUndoneOnCrash) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(env.CreateDirs("/d").ok());
  ASSERT_TRUE(WriteFileAtomically(&env, "/d/manifest", "v1").ok());
  // A second atomic write that crashes right after the rename, before the directory sync.
  auto f = env.NewWritableFile("/d/manifest.tmp");
  ASSERT_TRUE((*f)->Append("v2").ok());
  ASSERT_TRUE((*f)->Sync().ok());
  ASSERT_TRUE(env.Rename("/d/manifest.tmp", "/d/manifest").ok());
  EXPECT_EQ(*env.ReadFile("/d/manifest"), "v2");
  ASSERT_TRUE(env.SimulateCrash().ok());
  EXPECT_EQ(*env.ReadFile("/d/manifest"), "v1");
}

TEST(FaultInjectionEnvTest, EveryCrashPointOfAnAtomicWriteLeavesOldOrNew) {
  // Sweep: fail the n-th mutation of WriteFileAtomically, crash, and check the reader sees
  // exactly the old or the new content.
  for (int n = 1; n <= 8; ++n) {
    auto mem = NewMemEnv();
    FaultInjectionEnv env(mem.get());
    ASSERT_TRUE(env.CreateDirs("/d").ok());
    ASSERT_TRUE(WriteFileAtomically(&env, "/d/f", "old").ok());
    env.FailNthMutation(n, /*sticky=*/true);
    absl::Status s = WriteFileAtomically(&env, "/d/f", "new");
    ASSERT_TRUE(env.SimulateCrash().ok());
    auto content = env.ReadFile("/d/f");
    ASSERT_TRUE(content.ok()) << "n=" << n;
    EXPECT_TRUE(*content == "old" || *content == "new") << "n=" << n << " got " << *content;
    if (s.ok()) {
      EXPECT_EQ(*content, "new") << "acknowledged write lost at n=" << n;
    }
  }
}

TEST(FaultInjectionEnvTest, FailNthMutationAndFlipByte) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(env.CreateDirs("/d").ok());
  env.FailNthMutation(2);
  auto f = env.NewWritableFile("/d/x");  // mutation 1
  ASSERT_TRUE(f.ok());
  absl::Status s = (*f)->Append("abc");  // mutation 2: fails
  EXPECT_TRUE(absl::IsUnavailable(s));
  EXPECT_NE(s.message().find("/d/x"), std::string_view::npos);
  EXPECT_TRUE((*f)->Append("abc").ok());  // not sticky
  ASSERT_TRUE(env.FlipByte("/d/x", 1, 0x20).ok());
  EXPECT_EQ(*env.ReadFile("/d/x"), "aBc");
  EXPECT_TRUE(absl::IsOutOfRange(env.FlipByte("/d/x", 3)));
}

TEST(FaultInjectionEnvTest, RangedReadsSeeFlippedBytesAndInjectedReadErrors) {
  auto mem = NewMemEnv();
  FaultInjectionEnv env(mem.get());
  ASSERT_TRUE(env.CreateDirs("/d").ok());
  ASSERT_TRUE(WriteFileAtomically(&env, "/d/x", "abcdef").ok());
  ASSERT_TRUE(env.FlipByte("/d/x", 4, 0x20).ok());
  auto file = env.NewRandomAccessFile("/d/x");
  ASSERT_TRUE(file.ok()) << file.status();
  char buf[8] = {0};
  auto n = (*file)->Read(3, 8, buf);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(std::string(buf, *n), "dEf");
  // The second read from now fails (naming the file), the ones around it do not.
  env.FailNthRead(2);
  EXPECT_TRUE((*file)->Read(0, 2, buf).ok());
  absl::StatusOr<size_t> failed = (*file)->Read(2, 2, buf);
  EXPECT_TRUE(absl::IsUnavailable(failed.status()));
  EXPECT_NE(failed.status().message().find("/d/x"), std::string_view::npos);
  EXPECT_TRUE((*file)->Read(2, 2, buf).ok());
  const int before = env.read_count();
  env.FailNthRead(1);
  EXPECT_TRUE(absl::IsUnavailable(env.ReadFile("/d/x").status()));
  EXPECT_EQ(env.read_count(), before + 1);
  EXPECT_TRUE(env.ReadFile("/d/x").ok());
}

}  // namespace
}  // namespace gyre
