#include "cli/run_config.h"

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"
#include "ops/model_config.h"
#include "worker/checkpoint.h"
#include "ops/train_step.h"

namespace gyre::cli {
namespace {

// Collects text-format parse errors with line and column.
class ErrorCollector final : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column, const std::string& message) override {
    if (first.empty()) first = absl::StrCat("line ", line + 1, ", column ", column + 1, ": ", message);
  }
  std::string first;
};

}  // namespace

absl::StatusOr<gyre::v1::RunConfig> LoadRunConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("config file ", path, " cannot be read"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  gyre::v1::RunConfig config;
  if (absl::EndsWith(path, ".json")) {
    auto status = google::protobuf::util::JsonStringToMessage(buffer.str(), &config);
    if (!status.ok()) return absl::InvalidArgumentError(absl::StrCat("config file ", path, ": ", status.ToString()));
  } else {
    google::protobuf::TextFormat::Parser parser;
    ErrorCollector errors;
    parser.RecordErrorsTo(&errors);
    if (!parser.ParseFromString(buffer.str(), &config)) {
      return absl::InvalidArgumentError(absl::StrCat("config file ", path, ": ", errors.first));
    }
  }
  return config;
}

void ApplyDefaults(gyre::v1::RunConfig* c) {
  if (c->name().empty()) c->set_name("default");
  if (c->data().seq_len() == 0) c->mutable_data()->set_seq_len(2048);
  if (c->data().mix_block() == 0) c->mutable_data()->set_mix_block(1024);
  if (c->cluster().desired_workers() == 0) c->mutable_cluster()->set_desired_workers(1);
  if (c->cluster().min_workers() == 0) c->mutable_cluster()->set_min_workers(1);
  if (c->cluster().heartbeat_interval_ms() == 0) c->mutable_cluster()->set_heartbeat_interval_ms(1000);
  if (c->cluster().heartbeat_timeout_ms() == 0) c->mutable_cluster()->set_heartbeat_timeout_ms(10000);
  if (c->cluster().collective_timeout_ms() == 0) c->mutable_cluster()->set_collective_timeout_ms(60000);
  if (c->checkpoint().keep_last() == 0) c->mutable_checkpoint()->set_keep_last(3);
  if (c->schedule().final_lr_fraction() == 0) c->mutable_schedule()->set_final_lr_fraction(0.1f);
  if (c->train().eval_samples_per_source() == 0) c->mutable_train()->set_eval_samples_per_source(8);
  if (c->train().saturation_delta() == 0) c->mutable_train()->set_saturation_delta(0.02);
  if (c->train().saturation_patience() == 0) c->mutable_train()->set_saturation_patience(3);
}

absl::Status ValidateRunConfig(const gyre::v1::RunConfig& c) {
  for (char ch : c.name()) {
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.')) {
      return absl::InvalidArgumentError(absl::StrCat("name: '", c.name(), "' may hold only letters, digits, '-', '_', '.'"));
    }
  }
  if (absl::StatusOr<ops::ModelSpec> spec = ops::ResolveModelConfig(c.model()); !spec.ok()) return spec.status();
  if (auto t = ops::TrainOptionsFromConfig(c.optimizer(), c.schedule()); !t.ok()) return t.status();
  if (auto r = StreamOptionsFromConfig(c.checkpoint()); !r.ok()) return r.status();
  if (c.data().index_dir().empty()) return absl::InvalidArgumentError("data.index_dir: required (an index written by `gyre prepare`)");
  if (c.data().global_batch() == 0) return absl::InvalidArgumentError("data.global_batch: must be >= 1");
  if (c.train().max_steps() == 0) return absl::InvalidArgumentError("train.max_steps: must be >= 1");
  if (c.train().saturation_delta() < 0) return absl::InvalidArgumentError("train.saturation_delta: must be >= 0");
  if (c.cluster().min_workers() > c.cluster().desired_workers()) {
    return absl::InvalidArgumentError("cluster.min_workers: must not exceed cluster.desired_workers");
  }
  if (c.cluster().heartbeat_timeout_ms() <= c.cluster().heartbeat_interval_ms()) {
    return absl::InvalidArgumentError("cluster.heartbeat_timeout_ms: must exceed cluster.heartbeat_interval_ms");
  }
  if (c.control().tls_cert().empty() != c.control().tls_key().empty()) {
    return absl::InvalidArgumentError("control.tls_cert / control.tls_key: give both or neither");
  }
  return absl::OkStatus();
}

std::string RunConfigToJson(const gyre::v1::RunConfig& config) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(config, &out, options);
  return out;
}

}  // namespace gyre::cli
