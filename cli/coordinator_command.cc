// `gyre coordinator --config FILE`: runs the coordinator of one run (DESIGN.md sections 4, 5, 7).
// Creates runs/<name>/ with the resolved config, the bearer token (mode 0600), the RocksDB
// journal and coordinator.addr (the gRPC host:port actually bound); resumes the run when the
// journal already holds one. Stops cleanly on SIGINT/SIGTERM.
#include <csignal>
#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/env.h"
#include "base/run_dir.h"
#include "cli/commands.h"
#include "coordinator/core_loop.h"
#include "coordinator/http/http_server.h"
#include "coordinator/http/loop_source.h"
#include "coordinator/journal.h"
#include "coordinator/services.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"

namespace gyre::cli {
namespace {

absl::StatusOr<gyre::v1::RunConfig> ReadRunConfig(const std::string& path) {
  auto text = Env::Default()->ReadFile(path);
  if (!text.ok()) return text.status();
  gyre::v1::RunConfig config;
  const size_t first = text->find_first_not_of(" \t\r\n");
  if (first != std::string::npos && (*text)[first] == '{') {
    auto s = google::protobuf::util::JsonStringToMessage(*text, &config);
    if (!s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.ToString()));
    }
  } else if (!google::protobuf::TextFormat::ParseFromString(*text, &config)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a RunConfig in protobuf text format (or JSON)"));
  }
  return config;
}

}  // namespace

int RunCoordinator(int argc, char** argv) {
  CLI::App app("run the coordinator of one run", argv[0]);
  std::string config_path, runs_dir = "runs", listen, gloo_store = "coordinator";
  bool open_workers = false;
  app.add_option("--config", config_path, "RunConfig file (text proto or JSON)")->required();
  app.add_option("--runs-dir", runs_dir, "parent of the run directory (default: runs)");
  app.add_option("--listen", listen, "gRPC host:port (overrides control.listen)");
  app.add_option("--gloo-store", gloo_store,
                 "Gloo rendezvous store of CPU generations: \"coordinator\" (this coordinator's key-value "
                 "store; multi-host, no shared file system) or dir:<path> (a directory every worker reaches)")
      ->capture_default_str();
  std::string tls_cert, tls_key, tls_ca;
  app.add_option("--tls-cert", tls_cert, "PEM certificate chain: serve TLS (overrides control.tls_cert)");
  app.add_option("--tls-key", tls_key, "PEM private key of --tls-cert (overrides control.tls_key)");
  app.add_option("--tls-ca", tls_ca,
                 "PEM CA certificate(s) clients should trust, published as <run-dir>/tls-ca.pem "
                 "(default: the certificate itself, right for a self-signed one)");
  app.add_flag("--open-workers", open_workers,
               "do not require the bearer token on worker (Cluster) calls");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  auto fail = [](const absl::Status& st) {
    std::fprintf(stderr, "gyre coordinator: %s\n", st.ToString().c_str());
    return 1;
  };
  auto config = ReadRunConfig(config_path);
  if (!config.ok()) return fail(config.status());
  if (!listen.empty()) config->mutable_control()->set_listen(listen);
  if (!tls_cert.empty()) config->mutable_control()->set_tls_cert(tls_cert);
  if (!tls_key.empty()) config->mutable_control()->set_tls_key(tls_key);
  if (config->control().tls_cert().empty() != config->control().tls_key().empty()) {
    return fail(absl::InvalidArgumentError("control.tls_cert and control.tls_key: TLS needs both (or neither)"));
  }
  if (config->name().empty()) return fail(absl::InvalidArgumentError("name: the run needs a name"));
  if (absl::Status s = coordinator::ValidateCoordinatorConfig(*config); !s.ok()) return fail(s);

  Env* env = Env::Default();
  const std::string run_dir = JoinPath(runs_dir, config->name());
  if (absl::Status s = env->CreateDirs(run_dir); !s.ok()) return fail(s);
  auto token = CreateOrReadToken(RunDir(run_dir).token_path());
  if (!token.ok()) return fail(token.status());
  auto journal = coordinator::OpenRocksJournal(JoinPath(run_dir, "journal"), {});
  if (!journal.ok()) return fail(journal.status());

  coordinator::GlooRendezvous rendezvous(gloo_store, config->name());
  coordinator::CoreLoop::Options loop_options;
  loop_options.config = *config;
  loop_options.journal = journal->get();
  loop_options.rendezvous = &rendezvous;
  loop_options.on_generation = [](const gyre::v1::GenerationRecord& r) {
    std::fprintf(stderr, "gyre coordinator: generation %llu (%s): %d workers from step %llu\n",
                 static_cast<unsigned long long>(r.generation().id()), r.reason().c_str(),
                 r.generation().members_size(),
                 static_cast<unsigned long long>(r.generation().start_step()));
  };
  loop_options.on_delete_checkpoint = [env, run_dir](const coordinator::DeleteCheckpoint& d) {
    // Inline on the core's thread; checkpoints are few and deletion is quick on local disks.
    absl::Status s = env->RemoveAll(JoinPath(run_dir, d.path));
    if (!s.ok()) std::fprintf(stderr, "gyre coordinator: %s\n", s.ToString().c_str());
  };
  // Block the stop signals before any thread starts, so only sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto loop = coordinator::CoreLoop::Start(loop_options);
  if (!loop.ok()) return fail(loop.status());
  // Written once the journal accepted this config (a resumed run's must match what it started
  // with), so the file always shows the config the run runs by.
  std::string resolved;
  google::protobuf::TextFormat::PrintToString(*config, &resolved);
  if (absl::Status s = WriteFileAtomically(env, JoinPath(run_dir, "config.textproto"), resolved);
      !s.ok()) {
    return fail(s);
  }
  coordinator::ServerOptions server_options;
  server_options.listen =
      config->control().listen().empty() ? "127.0.0.1:0" : config->control().listen();
  server_options.token = *token;
  server_options.authenticate_workers = !open_workers;
  // TLS: the clients of this run (workers, gyrectl, the launcher) find the CA to trust in the run
  // directory; its absence means plaintext. Written before coordinator.addr, which clients wait for.
  RunDir run(run_dir);
  if (!config->control().tls_cert().empty()) {
    auto cert = env->ReadFile(config->control().tls_cert());
    if (!cert.ok()) return fail(cert.status());
    auto key = env->ReadFile(config->control().tls_key());
    if (!key.ok()) return fail(key.status());
    auto ca = tls_ca.empty() ? cert : env->ReadFile(tls_ca);
    if (!ca.ok()) return fail(ca.status());
    server_options.tls_cert_pem = *cert;
    server_options.tls_key_pem = *key;
    if (absl::Status s = WriteFileAtomically(env, run.tls_ca_path(), *ca); !s.ok()) return fail(s);
  } else if (env->Exists(run.tls_ca_path())) {
    if (absl::Status s = env->RemoveFile(run.tls_ca_path()); !s.ok()) return fail(s);
  }
  auto server = coordinator::CoordinatorServer::Start(loop->get(), server_options);
  if (!server.ok()) return fail(server.status());
  const std::string host = server_options.listen.substr(0, server_options.listen.rfind(':'));
  const std::string address = absl::StrCat(host, ":", (*server)->port());
  if (absl::Status s = WriteFileAtomically(env, JoinPath(run_dir, "coordinator.addr"), address);
      !s.ok()) {
    return fail(s);
  }
  // Dashboard, JSON API and Prometheus metrics (read-only; loopback unless configured).
  coordinator::LoopSource dashboard_source(loop->get());
  auto http = coordinator::HttpServer::Start(
      config->control().http_listen().empty() ? "127.0.0.1:0" : config->control().http_listen(), &dashboard_source);
  if (!http.ok()) return fail(http.status());
  if (absl::Status s = WriteFileAtomically(env, JoinPath(run_dir, "http.addr"), (*http)->address()); !s.ok()) {
    return fail(s);
  }
  const gyre::v1::RunStatus status = (*loop)->Status();
  std::fprintf(stderr,
               "gyre coordinator: run '%s' at %s, dashboard http://%s/ (run dir %s), %llu of %llu steps committed\n",
               config->name().c_str(), address.c_str(), (*http)->address().c_str(), run_dir.c_str(),
               static_cast<unsigned long long>(status.committed_steps()),
               static_cast<unsigned long long>(status.max_steps()));
  int signal = 0;
  sigwait(&stop_signals, &signal);
  std::fprintf(stderr, "gyre coordinator: signal %d, stopping\n", signal);
  http->reset();
  (*loop)->Stop();
  server->reset();
  return 0;
}

}  // namespace gyre::cli
