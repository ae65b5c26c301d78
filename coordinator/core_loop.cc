#include "coordinator/core_loop.h"

#include <chrono>
#include <future>
#include <utility>

#include "absl/strings/str_cat.h"

namespace gyre::coordinator {

CoreLoop::CoreLoop(Options options)
    : options_(std::move(options)),
      clock_(options_.clock != nullptr ? options_.clock : Clock::Real()),
      session_ids_(std::random_device{}() ^
                   (static_cast<uint64_t>(std::random_device{}()) << 32)) {}

absl::StatusOr<std::unique_ptr<CoreLoop>> CoreLoop::Start(Options options) {
  if (options.journal == nullptr || options.rendezvous == nullptr) {
    return absl::InvalidArgumentError("CoreLoop needs a journal and a rendezvous provider");
  }
  std::unique_ptr<CoreLoop> loop(new CoreLoop(std::move(options)));
  if (absl::Status s = loop->Boot(); !s.ok()) return s;
  loop->thread_ = std::thread([raw = loop.get()] { raw->Run(); });
  return loop;
}

absl::Status CoreLoop::Boot() {
  auto contents = options_.journal->Load();
  if (!contents.ok()) return contents.status();
  if (contents->config.has_value()) {
    if (absl::Status s = CheckResumedRunConfig(contents->config->config(), options_.config); !s.ok()) return s;
  }
  CoreOptions core_options;
  core_options.config = options_.config;
  core_options.rendezvous = options_.rendezvous;
  core_options.anchor_micros = clock_->NowMicros();
  core_options.anchor_unix_ms = clock_->UnixMillis();
  std::vector<Action> initial;
  absl::StatusOr<std::unique_ptr<CoordinatorCore>> core =
      contents->config.has_value()
          ? CoordinatorCore::Restore(core_options, *contents, core_options.anchor_micros, &initial)
          : CoordinatorCore::Create(core_options, &initial);
  if (!core.ok()) return core.status();
  core_ = std::move(*core);
  if (!Execute(std::move(initial))) {
    return absl::UnavailableError("journal write failed while starting the coordinator");
  }
  return absl::OkStatus();
}

CoreLoop::~CoreLoop() { Stop(); }

void CoreLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void CoreLoop::Post(Event event, Callback done) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_ && queue_.size() < options_.max_queued_events) {
      queue_.emplace_back(std::move(event), std::move(done));
      wake_.notify_one();
      return;
    }
  }
  Reply reply;
  reply.status = absl::UnavailableError("coordinator overloaded or stopping; retry");
  done(reply);
}

gyre::v1::RunStatus CoreLoop::Status() {
  auto promise = std::make_shared<std::promise<gyre::v1::RunStatus>>();
  auto future = promise->get_future();
  Post(ControlEvent{0, gyre::v1::GetStatusRequest()}, [promise](const Reply& r) {
    auto* status = std::get_if<gyre::v1::RunStatus>(&r.body);
    promise->set_value(status != nullptr ? *status : gyre::v1::RunStatus());
  });
  return future.get();
}

uint64_t CoreLoop::Subscribe(uint64_t since_step, MetricsCallback on_update) {
  std::lock_guard<std::mutex> lock(watchers_mu_);
  for (const auto& update : history_) {
    if (update.metrics().step() >= since_step) on_update(update);
  }
  const uint64_t id = ++next_watcher_;
  watchers_[id] = std::move(on_update);
  return id;
}

void CoreLoop::Unsubscribe(uint64_t id) {
  std::lock_guard<std::mutex> lock(watchers_mu_);
  watchers_.erase(id);
}

void CoreLoop::Run() {
  while (true) {
    std::optional<std::pair<Event, Callback>> item;
    bool tick = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      while (true) {
        if (stopping_) break;
        if (!queue_.empty()) break;
        if (timer_at_micros_.has_value() && clock_->NowMicros() >= *timer_at_micros_) break;
        if (timer_at_micros_.has_value()) {
          const int64_t wait = *timer_at_micros_ - clock_->NowMicros();
          wake_.wait_for(lock, std::chrono::microseconds(std::max<int64_t>(wait, 1)));
        } else {
          wake_.wait(lock);
        }
      }
      if (stopping_) break;
      if (!queue_.empty()) {
        item = std::move(queue_.front());
        queue_.pop_front();
      } else {
        tick = true;
        timer_at_micros_.reset();
      }
    }
    if (tick) {
      Handle(TickEvent{}, nullptr);
    } else {
      Handle(std::move(item->first), std::move(item->second));
    }
  }
  // Stopping: nobody will answer what is queued or waiting.
  std::deque<std::pair<Event, Callback>> rest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    rest.swap(queue_);
  }
  Reply reply;
  reply.status = absl::UnavailableError("coordinator stopping");
  for (auto& [event, done] : rest) {
    if (done) done(reply);
  }
  FailAllPending(reply.status);
}

void CoreLoop::Handle(Event event, Callback done) {
  const RequestId id = ++next_request_;
  std::visit(
      [&](auto& e) {
        using T = std::decay_t<decltype(e)>;
        if constexpr (!std::is_same_v<T, TickEvent>) e.id = id;
        if constexpr (std::is_same_v<T, RegisterEvent>) e.fresh_session = session_ids_() | 1;
      },
      event);
  if (done) pending_[id] = std::move(done);
  if (core_ == nullptr) {
    // The journal could not be reloaded; nothing can be decided.
    FailAllPending(absl::UnavailableError("coordinator journal unavailable"));
    return;
  }
  Execute(core_->Handle(event, clock_->NowMicros()));
}

bool CoreLoop::Execute(std::vector<Action> actions) {
  for (auto& action : actions) {
    if (auto* write = std::get_if<JournalWrite>(&action)) {
      absl::Status s = options_.journal->Write(write->batch);
      if (!s.ok()) {
        // Fail-stop: answer nothing more from this core; rebuild it from the journal.
        FailAllPending(absl::UnavailableError(
            absl::StrCat("coordinator restarting after a journal failure: ", s.message())));
        core_.reset();
        if (absl::Status boot = Boot(); !boot.ok()) core_.reset();
        return false;
      }
    } else if (auto* reply = std::get_if<Reply>(&action)) {
      auto it = pending_.find(reply->id);
      if (it == pending_.end()) continue;
      Callback done = std::move(it->second);
      pending_.erase(it);
      done(*reply);
    } else if (auto* timer = std::get_if<ArmTimer>(&action)) {
      std::lock_guard<std::mutex> lock(mu_);
      timer_at_micros_ = timer->at_micros;
    } else if (auto* created = std::get_if<GenerationCreated>(&action)) {
      if (options_.on_generation) options_.on_generation(created->record);
    } else if (auto* deletion = std::get_if<DeleteCheckpoint>(&action)) {
      if (options_.on_delete_checkpoint) options_.on_delete_checkpoint(*deletion);
    } else if (auto* committed = std::get_if<StepCommitted>(&action)) {
      gyre::v1::MetricsUpdate update;
      *update.mutable_metrics() = committed->record.metrics();
      if (core_ != nullptr) *update.mutable_status() = core_->Status();
      std::lock_guard<std::mutex> lock(watchers_mu_);
      history_.push_back(update);
      if (history_.size() > kMetricsHistory) history_.pop_front();
      for (auto& [id, watcher] : watchers_) watcher(update);
    }
  }
  return true;
}

void CoreLoop::FailAllPending(const absl::Status& status) {
  std::map<RequestId, Callback> pending;
  pending.swap(pending_);
  Reply reply;
  reply.status = status;
  for (auto& [id, done] : pending) done(reply);
}

}  // namespace gyre::coordinator
