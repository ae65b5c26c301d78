#include "coordinator/core_loop.h"

#include <future>

#include "gtest/gtest.h"

namespace gyre::coordinator {
namespace {

// A MemJournal whose writes fail while `fail` is set (the fail-stop path of the loop).
class FlakyJournal final : public Journal {
 public:
  absl::Status Write(const JournalBatch& batch) override {
    if (fail) return absl::InternalError("injected journal failure");
    ++writes;
    return inner_->Write(batch);
  }
  absl::StatusOr<JournalContents> Load() override { return inner_->Load(); }
  std::atomic<bool> fail{false};
  std::atomic<int> writes{0};

 private:
  std::unique_ptr<Journal> inner_ = NewMemJournal();
};

Reply Call(CoreLoop& loop, Event event) {
  auto promise = std::make_shared<std::promise<Reply>>();
  auto future = promise->get_future();
  loop.Post(std::move(event), [promise](const Reply& r) { promise->set_value(r); });
  return future.get();
}

CoreLoop::Options LoopOptions(Journal* journal, RendezvousProvider* rendezvous, uint64_t max_steps) {
  CoreLoop::Options options;
  options.config.set_name("loop-test");
  options.config.mutable_data()->set_global_batch(4);
  options.config.mutable_train()->set_max_steps(max_steps);
  options.journal = journal;
  options.rendezvous = rendezvous;
  return options;
}

TEST(CoreLoopTest, JournalFailureAnswersUnavailableAndReloads) {
  FlakyJournal journal;
  GlooRendezvous rendezvous("", "loop-test");
  const CoreLoop::Options options = LoopOptions(&journal, &rendezvous, 5);
  auto loop = CoreLoop::Start(options);
  ASSERT_TRUE(loop.ok()) << loop.status();
  EXPECT_EQ(journal.writes.load(), 1);  // config + control

  RegisterEvent reg;
  reg.request.mutable_worker()->set_host("h");
  reg.request.mutable_worker()->set_pid(1);
  const Reply first = Call(**loop, reg);
  ASSERT_TRUE(first.status.ok());
  const uint64_t session = std::get<gyre::v1::RegisterResponse>(first.body).session();
  EXPECT_EQ((*loop)->Status().generation(), 1u);

  AcquireStepEvent acquire;
  acquire.request.set_session(session);
  acquire.request.set_generation(1);
  acquire.request.set_step(0);
  ASSERT_EQ(std::get<gyre::v1::StepLease>(Call(**loop, acquire).body).decision(),
            gyre::v1::STEP_DECISION_RUN);

  // The commit's journal write fails: no COMMIT may be answered; the core reloads.
  journal.fail = true;
  CompleteStepEvent complete;
  complete.request.set_session(session);
  complete.request.set_generation(1);
  complete.request.set_step(0);
  EXPECT_EQ(Call(**loop, complete).status.code(), absl::StatusCode::kUnavailable);
  journal.fail = false;
  EXPECT_EQ((*loop)->Status().committed_steps(), 0u);
  // The worker retries; the reloaded core accepts the step leased before the failure.
  const Reply retried = Call(**loop, complete);
  ASSERT_TRUE(retried.status.ok()) << retried.status;
  EXPECT_EQ(std::get<gyre::v1::CompleteStepResponse>(retried.body).verdict(),
            gyre::v1::COMMIT_VERDICT_COMMIT);
  EXPECT_EQ((*loop)->Status().committed_steps(), 1u);
  (*loop)->Stop();
  EXPECT_EQ(Call(**loop, acquire).status.code(), absl::StatusCode::kUnavailable);
}

// A coordinator started on an existing run with another config fails and names the field;
// one that only moves the control address (a restart) resumes.
TEST(CoreLoopTest, AResumedRunKeepsItsConfig) {
  FlakyJournal journal;
  GlooRendezvous rendezvous("", "loop-test");
  const CoreLoop::Options options = LoopOptions(&journal, &rendezvous, 30);
  {
    auto loop = CoreLoop::Start(options);
    ASSERT_TRUE(loop.ok()) << loop.status();
    (*loop)->Stop();
  }
  CoreLoop::Options longer = options;
  longer.config.mutable_train()->set_max_steps(40);
  auto refused = CoreLoop::Start(longer);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("max_steps"), absl::string_view::npos) << refused.status();
  CoreLoop::Options moved = options;
  moved.config.mutable_control()->set_listen("127.0.0.1:4000");
  auto resumed = CoreLoop::Start(moved);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->Status().max_steps(), 30u);
  (*resumed)->Stop();
}

}  // namespace
}  // namespace gyre::coordinator
