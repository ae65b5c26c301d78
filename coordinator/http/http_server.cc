#include "coordinator/http/http_server.h"

#include <httplib.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "dashboard/assets.h"
#include "google/protobuf/util/json_util.h"

namespace gyre::coordinator {
namespace {

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

void Gauge(std::string* out, const char* name, const char* help, double value, const std::string& labels = "") {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " gauge\n", name, labels, " ", value, "\n");
}

// A monotonic count (Prometheus counters end in _total).
void Counter(std::string* out, const char* name, const char* help, double value, const std::string& labels = "") {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " counter\n", name, labels, " ", value, "\n");
}

}  // namespace

std::string PrometheusText(const gyre::v1::RunStatus& s) {
  std::string out;
  const std::string run = absl::StrCat("{run=\"", s.run_name(), "\"}");
  Gauge(&out, "gyre_committed_steps", "Steps committed to the journal (the data ledger).", s.committed_steps(), run);
  Gauge(&out, "gyre_generation", "Current generation id.", s.generation(), run);
  Gauge(&out, "gyre_workers_active", "Members of the current generation.", s.workers_active(), run);
  Gauge(&out, "gyre_workers_standby", "Registered workers waiting as standbys.", s.workers_standby(), run);
  Gauge(&out, "gyre_workers_desired", "Desired worker count (Scale).", s.desired_workers(), run);
  Gauge(&out, "gyre_tokens_per_second", "Training throughput over recent steps.", s.tokens_per_s(), run);
  Gauge(&out, "gyre_run_state", "RunState enum value (2 running, 3 paused, 7 finished).", s.state(), run);
  if (s.has_last_eval()) {
    const auto& e = s.last_eval();
    absl::StrAppend(&out, "# HELP gyre_validation_loss Held-out loss (nats/token) per source, newest in-run evaluation.\n"
                          "# TYPE gyre_validation_loss gauge\n");
    for (const auto& src : e.sources()) {
      absl::StrAppend(&out, "gyre_validation_loss{run=\"", s.run_name(), "\",source=\"", src.source(), "\"} ",
                      src.loss(), "\n");
    }
    if (e.has_head()) {
      Gauge(&out, "gyre_head_effective_rank", "LM head effective rank exp(-sum p ln p), newest evaluation.",
            e.head().effective_rank(), run);
      Gauge(&out, "gyre_head_stable_rank", "LM head stable rank sum(s^2)/s_1^2, newest evaluation.",
            e.head().stable_rank(), run);
    }
  }
  Gauge(&out, "gyre_saturation_alarms", "Sources whose held-out loss stays above its minimum (saturation).",
        s.alarms_size(), run);
  Counter(&out, "gyre_checkpoint_failures_total",
          "Checkpoint writes that failed since the coordinator started (the newest is in /api/status).",
          s.checkpoint_failures(), run);
  if (s.has_last_metrics()) {
    const auto& m = s.last_metrics();
    Gauge(&out, "gyre_loss", "Training loss of the last committed step.", m.loss(), run);
    Gauge(&out, "gyre_grad_norm", "Global gradient norm of the last committed step.", m.grad_norm(), run);
    Gauge(&out, "gyre_learning_rate", "Learning rate of the last committed step.", m.lr(), run);
    Gauge(&out, "gyre_model_flops_per_second",
          "Training FLOP/s of the last committed step over all workers (6N + sequence mixing + LM head).",
          m.model_flops_per_s(), run);
    if (m.peak_flops_per_s() > 0) {
      Gauge(&out, "gyre_mfu", "Model FLOPs utilisation of the last step (model FLOP/s over the devices' peak).",
            m.model_flops_per_s() / m.peak_flops_per_s(), run);
    }
    const auto& t = m.times();
    absl::StrAppend(&out, "# HELP gyre_step_phase_ms Time of each step phase, last step.\n# TYPE gyre_step_phase_ms gauge\n");
    for (auto [phase, ms] : {std::pair<const char*, double>{"data_wait", t.data_wait_ms()},
                             {"forward", t.forward_ms()},
                             {"backward", t.backward_ms()},
                             {"exposed_comm", t.exposed_comm_ms()},
                             {"optimizer", t.optimizer_ms()}}) {
      absl::StrAppend(&out, "gyre_step_phase_ms{run=\"", s.run_name(), "\",phase=\"", phase, "\"} ", ms, "\n");
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& listen, DashboardSource* source) {
  size_t colon = listen.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port)) {
    return absl::InvalidArgumentError(absl::StrCat("control.http_listen '", listen, "' is not host:port"));
  }
  const std::string host = listen.substr(0, colon);
  auto server = std::unique_ptr<HttpServer>(new HttpServer());
  server->server_ = std::make_unique<httplib::Server>();
  httplib::Server& http = *server->server_;
  http.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(dashboard::kIndexHtml, "text/html; charset=utf-8");
  });
  http.Get("/api/status", [source](const httplib::Request&, httplib::Response& res) {
    res.set_content(ToJson(source->Status()), "application/json");
  });
  http.Get("/api/metrics", [source](const httplib::Request& req, httplib::Response& res) {
    uint64_t since = 0;
    if (req.has_param("since") && !absl::SimpleAtoi(req.get_param_value("since"), &since)) {
      res.status = 400;
      res.set_content("{\"error\":\"since must be a step number\"}", "application/json");
      return;
    }
    std::string body = "{\"metrics\":[";
    bool first = true;
    for (const gyre::v1::StepMetrics& m : source->MetricsSince(since, 10000)) {
      absl::StrAppend(&body, first ? "" : ",", ToJson(m));
      first = false;
    }
    body += "]}";
    res.set_content(body, "application/json");
  });
  http.Get("/metrics", [source](const httplib::Request&, httplib::Response& res) {
    res.set_content(PrometheusText(source->Status()), "text/plain; version=0.0.4");
  });
  if (port == 0) {
    port = http.bind_to_any_port(host);
    if (port < 0) return absl::UnavailableError(absl::StrCat("http: cannot bind ", host));
  } else if (!http.bind_to_port(host, port)) {
    return absl::UnavailableError(absl::StrCat("http: cannot bind ", listen));
  }
  server->address_ = absl::StrCat(host, ":", port);
  server->thread_ = std::thread([&http] { http.listen_after_bind(); });
  return server;
}

HttpServer::~HttpServer() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace gyre::coordinator
