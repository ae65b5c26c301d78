// gyre.v1.Control: operator calls (gyrectl, dashboard), translated into core control events.
#include <deque>
#include <mutex>

#include "coordinator/service_dispatch.h"
#include "coordinator/services.h"

namespace gyre::coordinator {
namespace {

// One WatchMetrics stream. The loop thread pushes updates (CoreLoop::Subscribe); gRPC threads
// run OnWriteDone / OnCancel / OnDone. At most kMaxQueued updates wait for a slow reader; more
// are dropped (metrics, not data). The reactor deletes itself in OnDone after unsubscribing.
class MetricsStream final : public grpc::ServerWriteReactor<gyre::v1::MetricsUpdate> {
 public:
  static constexpr size_t kMaxQueued = 1024;

  explicit MetricsStream(CoreLoop* loop) : loop_(loop) {}
  void Subscribe(uint64_t since_step) {
    id_ = loop_->Subscribe(since_step,
                           [this](const gyre::v1::MetricsUpdate& update) { Push(update); });
  }
  void Refuse(const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
    Finish(status);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.pop_front();
    if (!ok || finished_) {
      writing_ = false;
      if (!finished_) {
        finished_ = true;
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "stream broken"));
      }
      return;
    }
    if (!queue_.empty()) {
      StartWrite(&queue_.front());  // deque references survive push_back
    } else {
      writing_ = false;
    }
  }
  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!finished_) {
      finished_ = true;
      Finish(grpc::Status::CANCELLED);
    }
  }
  void OnDone() override {
    if (id_ != 0) loop_->Unsubscribe(id_);  // waits for a Push in progress
    delete this;
  }

 private:
  void Push(const gyre::v1::MetricsUpdate& update) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_ || queue_.size() >= kMaxQueued) return;
    queue_.push_back(update);
    if (!writing_) {
      writing_ = true;
      StartWrite(&queue_.front());
    }
  }

  CoreLoop* loop_;
  uint64_t id_ = 0;
  std::mutex mu_;
  std::deque<gyre::v1::MetricsUpdate> queue_;
  bool writing_ = false;
  bool finished_ = false;
};

template <typename Request, typename Response>
grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx, CoreLoop* loop,
                                  const std::string& token, const absl::Status& validation,
                                  const Request& request, Response* response) {
  ControlEvent event;
  event.request = request;
  return internal::Dispatch(ctx, loop, token, validation, event, response);
}

}  // namespace

grpc::ServerUnaryReactor* ControlService::GetStatus(grpc::CallbackServerContext* ctx,
                                                    const gyre::v1::GetStatusRequest* request,
                                                    gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::ListWorkers(grpc::CallbackServerContext* ctx,
                                                      const gyre::v1::ListWorkersRequest* request,
                                                      gyre::v1::ListWorkersResponse* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::Pause(grpc::CallbackServerContext* ctx,
                                                const gyre::v1::PauseRequest* request,
                                                gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::Resume(grpc::CallbackServerContext* ctx,
                                                 const gyre::v1::ResumeRequest* request,
                                                 gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::Scale(grpc::CallbackServerContext* ctx,
                                                const gyre::v1::ScaleRequest* request,
                                                gyre::v1::RunStatus* response) {
  const absl::Status validation =
      request->target() == 0
          ? absl::InvalidArgumentError("ScaleRequest.target must be at least 1")
          : absl::OkStatus();
  return Forward(ctx, loop_, token_, validation, *request, response);
}

grpc::ServerUnaryReactor* ControlService::Drain(grpc::CallbackServerContext* ctx,
                                                const gyre::v1::DrainRequest* request,
                                                gyre::v1::RunStatus* response) {
  const absl::Status validation =
      request->session() == 0 ? absl::InvalidArgumentError("DrainRequest.session is required")
                              : absl::OkStatus();
  return Forward(ctx, loop_, token_, validation, *request, response);
}

grpc::ServerUnaryReactor* ControlService::Checkpoint(grpc::CallbackServerContext* ctx,
                                                     const gyre::v1::CheckpointRequest* request,
                                                     gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerUnaryReactor* ControlService::Stop(grpc::CallbackServerContext* ctx,
                                               const gyre::v1::StopRequest* request,
                                               gyre::v1::RunStatus* response) {
  return Forward(ctx, loop_, token_, absl::OkStatus(), *request, response);
}

grpc::ServerWriteReactor<gyre::v1::MetricsUpdate>* ControlService::WatchMetrics(
    grpc::CallbackServerContext* ctx, const gyre::v1::WatchMetricsRequest* request) {
  auto* stream = new MetricsStream(loop_);  // deletes itself in OnDone
  if (absl::Status s = CheckBearerToken(token_, internal::Authorization(*ctx)); !s.ok()) {
    stream->Refuse(ToGrpcStatus(s));
    return stream;
  }
  stream->Subscribe(request->since_step());
  return stream;
}

}  // namespace gyre::coordinator
