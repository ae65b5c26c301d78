#include "cli/status_text.h"

#include "gtest/gtest.h"

namespace gyre::cli {
namespace {

gyre::v1::RunStatus Running() {
  gyre::v1::RunStatus s;
  s.set_run_name("unit");
  s.set_state(gyre::v1::RUN_STATE_RUNNING);
  s.set_committed_steps(61);
  s.set_max_steps(100);
  s.set_last_checkpoint("checkpoints/step-40");
  s.set_last_checkpoint_step(40);
  return s;
}

TEST(StatusTextTest, NoFailureLineWhileCheckpointsSucceed) {
  const std::string text = RunStatusText(Running());
  EXPECT_NE(text.find("steps        61 / 100 committed\n"), std::string::npos) << text;
  EXPECT_NE(text.find("checkpoint   step 40 at checkpoints/step-40\n"), std::string::npos) << text;
  EXPECT_EQ(text.find("CKPT FAILED"), std::string::npos) << text;
}

TEST(StatusTextTest, FailedCheckpointWritesAreCountedAndTheLastOneNamed) {
  gyre::v1::RunStatus s = Running();
  s.set_checkpoint_failures(1);
  s.set_last_checkpoint_error("step 60: write /runs/x/checkpoints/step-60.tmp/state-3.bin: No space left on device");
  std::string text = RunStatusText(s);
  EXPECT_NE(text.find("CKPT FAILED  1 write since the coordinator started; last: step 60: write "
                      "/runs/x/checkpoints/step-60.tmp/state-3.bin: No space left on device\n"),
            std::string::npos)
      << text;
  // After the older checkpoint it still runs from.
  EXPECT_LT(text.find("checkpoint   step 40"), text.find("CKPT FAILED"));
  s.set_checkpoint_failures(3);
  text = RunStatusText(s);
  EXPECT_NE(text.find("CKPT FAILED  3 writes since"), std::string::npos) << text;
}

}  // namespace
}  // namespace gyre::cli
