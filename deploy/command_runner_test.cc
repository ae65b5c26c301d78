#include "deploy/command_runner.h"

#include "gtest/gtest.h"

namespace gyre::deploy {
namespace {

TEST(SubprocessRunnerTest, CapturesOutputAndExitCode) {
  std::unique_ptr<CommandRunner> runner = NewSubprocessRunner();
  absl::StatusOr<CommandOutput> out = runner->Run({"sh", "-c", "echo hello; echo oops >&2; exit 3"}, 10000);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->exit_code, 3);
  EXPECT_EQ(out->output, "hello\noops\n");
}

TEST(SubprocessRunnerTest, MissingProgramIsNotFoundNamingIt) {
  std::unique_ptr<CommandRunner> runner = NewSubprocessRunner();
  absl::StatusOr<CommandOutput> out = runner->Run({"gyre-no-such-program-xyz", "a"}, 10000);
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(out.status().message().find("gyre-no-such-program-xyz"), absl::string_view::npos) << out.status();
}

TEST(SubprocessRunnerTest, TimeoutKillsTheProgram) {
  std::unique_ptr<CommandRunner> runner = NewSubprocessRunner();
  absl::StatusOr<CommandOutput> out = runner->Run({"sleep", "30"}, 300);
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST(ShellQuoteTest, QuotesOnlyWhatNeedsIt) {
  EXPECT_EQ(ShellQuote("--replicas=3"), "--replicas=3");
  EXPECT_EQ(ShellQuote("/runs/a b"), "'/runs/a b'");
  EXPECT_EQ(ShellQuote("it's"), "'it'\\''s'");
  EXPECT_EQ(ShellQuote(""), "''");
  EXPECT_EQ(ShellJoin({"kubectl", "scale", "a b"}), "kubectl scale 'a b'");
}

}  // namespace
}  // namespace gyre::deploy
