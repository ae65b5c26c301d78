// Optional TLS for the coordinator's gRPC services (DESIGN.md section 5: "TLS when certificates
// are configured"). A self-signed certificate for 127.0.0.1 is made at test time with the openssl
// CLI; `gyre launch --local --tls-cert --tls-key` runs a short 2-worker run over TLS (the workers,
// the launcher and gyrectl find the CA in <run-dir>/tls-ca.pem), and while it runs:
//   * a TLS client trusting the CA with the run's token is served;
//   * a plaintext client with the right token is refused (the handshake never completes);
//   * a TLS client trusting another CA is refused;
//   * a TLS client with a wrong bearer token gets UNAUTHENTICATED (TLS does not replace the token).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "base/run_dir.h"
#include "cli/control_client.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

namespace gyre::e2e {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Self-signed certificate + key for 127.0.0.1 / localhost in `dir` (prefix.crt, prefix.key).
bool MakeSelfSigned(const std::string& dir, const std::string& prefix) {
  const std::string cmd = "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=gyre-test-" + prefix +
                          " -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout '" + dir + "/" + prefix +
                          ".key' -out '" + dir + "/" + prefix + ".crt' 2>/dev/null";
  return std::system(cmd.c_str()) == 0;
}

TEST(TlsTest, TlsClientsAreServedPlaintextAndUntrustedClientsAreRefused) {
  const std::string root = TestTmp() + "/tls";
  ASSERT_TRUE(PrepareGoldenIndex(root + "/index"));
  ASSERT_TRUE(MakeSelfSigned(root, "server")) << "openssl req failed (tools/setup.sh installs openssl)";
  ASSERT_TRUE(MakeSelfSigned(root, "other"));
  LocalRun run(root, "tls",
               "seed: 2\n"
               "model { preset: \"llama-tiny\" vocab_size: 50257 }\n"
               "data { index_dir: \"@INDEX@\" seq_len: 32 global_batch: 4 }\n"
               "optimizer { lr: 0.003 }\n"
               "schedule { warmup_steps: 2 total_steps: 100000 }\n"
               "train { max_steps: 100000 }\n"
               "cluster { desired_workers: 2 heartbeat_interval_ms: 200 heartbeat_timeout_ms: 5000 }\n");
  ASSERT_TRUE(run.Launch(2, {"--tls-cert", root + "/server.crt", "--tls-key", root + "/server.key"}));
  // gyrectl (TLS via the run directory's tls-ca.pem) sees workers commit steps over TLS.
  ASSERT_TRUE(WaitFor([&] { return run.Committed() >= 3; }, 180)) << (run.DumpLogs(), "no progress over TLS");
  EXPECT_EQ(ReadAll(RunDir(run.run_dir()).tls_ca_path()), ReadAll(root + "/server.crt"));

  absl::StatusOr<cli::ControlTarget> target = cli::ResolveControlTarget(run.run_dir(), "", "");
  ASSERT_TRUE(target.ok()) << target.status();
  ASSERT_FALSE(target->tls_ca_pem.empty());
  {
    absl::StatusOr<gyre::v1::RunStatus> s = cli::ControlClient(*target, 5000).GetStatus();
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_GE(s->committed_steps(), 3u);
  }
  {
    cli::ControlTarget plaintext = *target;
    plaintext.tls_ca_pem.clear();
    absl::StatusOr<gyre::v1::RunStatus> s = cli::ControlClient(plaintext, 3000).GetStatus();
    EXPECT_FALSE(s.ok()) << "a plaintext client was served";
    std::fprintf(stderr, "plaintext client: %s\n", s.status().ToString().c_str());
  }
  {
    cli::ControlTarget untrusted = *target;
    untrusted.tls_ca_pem = ReadAll(root + "/other.crt");
    absl::StatusOr<gyre::v1::RunStatus> s = cli::ControlClient(untrusted, 3000).GetStatus();
    EXPECT_FALSE(s.ok()) << "a client trusting another CA was served";
    std::fprintf(stderr, "client trusting another CA: %s\n", s.status().ToString().c_str());
  }
  {
    cli::ControlTarget bad_token = *target;
    bad_token.token = "0000000000000000000000000000000000000000000000000000000000000000";
    absl::StatusOr<gyre::v1::RunStatus> s = cli::ControlClient(bad_token, 5000).GetStatus();
    EXPECT_TRUE(absl::IsUnauthenticated(s.status())) << s.status();
  }
  // gyrectl with an explicit CA flag: the wrong CA fails with exit code 3 (cannot reach).
  CommandResult wrong = RunCommand({Bin("gyrectl"), "--run-dir", run.run_dir(), "--tls-ca", root + "/other.crt",
                                    "--timeout-ms", "3000", "status"});
  EXPECT_EQ(wrong.code, 3);

  ASSERT_FALSE(run.Ctl({"stop"}).is_null());
  int code = -1;
  const bool clean = run.WaitForExit(180, &code);
  if (!clean) run.DumpLogs();
  ASSERT_TRUE(clean) << "launcher exit code " << code;
  Ledger ledger = run.ReadLedger();
  EXPECT_EQ(ledger.code, 0) << ledger.summary;
  EXPECT_GE(ledger.steps.size(), 3u);
}

}  // namespace
}  // namespace gyre::e2e
