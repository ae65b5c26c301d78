// The Slurm launch files: directives, the coordinator address workers get, the supervised worker
// tasks, option errors naming the flag, and launch.json round trips. The scripts also run end to
// end under fake sbatch/srun/scontrol in tests/e2e/slurm_run_test.cc.
#include "deploy/slurm.h"

#include "gtest/gtest.h"

namespace gyre::deploy {
namespace {

SlurmOptions GpuOptions() {
  SlurmOptions o;
  o.run_name = "big";
  o.gyre_bin = "/opt/gyre/bin/gyre";
  o.runs_dir = "/shared/runs";
  o.run_dir = "/shared/runs/big";
  o.config_path = "/shared/runs/big/config.json";
  o.nodes = 4;
  o.gpus_per_node = 8;
  o.workers_per_node = 8;
  o.partition = "gpu";
  o.account = "lm";
  o.time_limit = "24:00:00";
  o.sbatch_args = {"--qos=high"};
  o.worker_args = {"--grad-bucket-mb", "50"};
  return o;
}

bool Has(const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; }

TEST(SlurmBatchScriptTest, HasTheDirectivesOfTheAllocation) {
  const std::string s = SlurmBatchScript(GpuOptions());
  EXPECT_EQ(s.rfind("#!/bin/bash\n", 0), 0u);
  for (const char* line : {"#SBATCH --job-name=gyre-big\n", "#SBATCH --nodes=4\n", "#SBATCH --ntasks-per-node=8\n",
                           "#SBATCH --gpus-per-node=8\n", "#SBATCH --partition=gpu\n", "#SBATCH --account=lm\n",
                           "#SBATCH --time=24:00:00\n", "#SBATCH --qos=high\n",
                           "#SBATCH --output=/shared/runs/big/slurm/job-%j.out\n"}) {
    EXPECT_TRUE(Has(s, line)) << line << "\n" << s;
  }
  // Every #SBATCH line comes before the first command (sbatch stops reading at it).
  const size_t first_command = s.find("\nset -u\n");
  ASSERT_NE(first_command, std::string::npos);
  EXPECT_EQ(s.find("#SBATCH", first_command), std::string::npos);
}

TEST(SlurmBatchScriptTest, CoordinatorOnAllInterfacesAndWorkersGetTheFirstNodesName) {
  const std::string s = SlurmBatchScript(GpuOptions());
  EXPECT_TRUE(Has(s, "GYRE=/opt/gyre/bin/gyre\n"));
  EXPECT_TRUE(Has(s, R"x("$GYRE" coordinator --runs-dir "$RUNS_DIR" --config "$CONFIG" --listen "$listen")x"));
  EXPECT_TRUE(Has(s, R"x(listen="0.0.0.0:$PORT")x"));
  EXPECT_TRUE(Has(s, R"x(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)x"));
  EXPECT_TRUE(Has(s, R"x(ENDPOINT="$HEAD_HOST:$PORT")x"));
  EXPECT_FALSE(Has(s, "ENDPOINT=\"127.0.0.1")) << "workers on other nodes cannot reach 127.0.0.1";
  EXPECT_TRUE(Has(s, R"x(echo "$ENDPOINT" >"$STATE/coordinator.endpoint.tmp")x"));
  EXPECT_TRUE(Has(s, R"x(srun --ntasks-per-node="$WORKERS_PER_NODE" --kill-on-bad-exit=0)x"));
  EXPECT_TRUE(Has(s, R"x("$GYRE" provision --slurm --run-dir "$RUN_DIR")x"));
  EXPECT_TRUE(Has(s, "shared") || Has(s, "every node mounts"));
}

TEST(SlurmWorkerTaskScriptTest, SupervisesOneWorkerPerGpuAtTheEndpoint) {
  const std::string s = SlurmWorkerTaskScript(GpuOptions());
  EXPECT_TRUE(Has(s, R"x(ENDPOINT="$(cat "$ENDPOINT_FILE")")x"));
  EXPECT_TRUE(Has(s, R"x(DEVICE="cuda:${SLURM_LOCALID:-0}")x"));
  EXPECT_TRUE(Has(s, R"x(exec "$GYRE" provision --supervise-worker --run-dir "$RUN_DIR" --coordinator "$ENDPOINT" --)x"));
  EXPECT_TRUE(Has(s, R"x(--device "$DEVICE" --hostname "$WORKER_HOST" --grad-bucket-mb 50)x")) << s;
  EXPECT_TRUE(Has(s, "SLURMD_NODENAME"));

  SlurmOptions cpu = GpuOptions();
  cpu.gpus_per_node = 0;
  cpu.workers_per_node = 2;
  const std::string c = SlurmWorkerTaskScript(cpu);
  EXPECT_TRUE(Has(c, "DEVICE=cpu\n"));
  EXPECT_FALSE(Has(c, "cuda:"));
  EXPECT_FALSE(Has(SlurmBatchScript(cpu), "--gpus-per-node"));
}

TEST(SlurmWorkersBatchScriptTest, AWorkerOnlyJobOfKTasks) {
  const std::string s = SlurmWorkersBatchScript(GpuOptions(), 12);
  EXPECT_TRUE(Has(s, "#SBATCH --nodes=2\n")) << s;  // 12 workers at 8 per node
  EXPECT_TRUE(Has(s, "#SBATCH --ntasks=12\n"));
  EXPECT_TRUE(Has(s, "#SBATCH --gpus-per-node=8\n"));
  EXPECT_TRUE(Has(s, "#SBATCH --job-name=gyre-big-workers\n"));
  EXPECT_TRUE(Has(s, R"x(exec srun --kill-on-bad-exit=0 --output="$RUN_DIR/logs/worker-%j-%t.log" "$RUN_DIR/slurm/worker-task.sh")x"));
  EXPECT_FALSE(Has(s, " coordinator --"));  // no second coordinator
  const std::string one = SlurmWorkersBatchScript(GpuOptions(), 3);
  EXPECT_TRUE(Has(one, "#SBATCH --nodes=1\n"));
  EXPECT_TRUE(Has(one, "#SBATCH --ntasks-per-node=3\n"));
}

TEST(SlurmOptionsTest, ErrorsNameTheFlag) {
  auto error_of = [](auto mutate) {
    SlurmOptions o = GpuOptions();
    mutate(o);
    return std::string(ValidateSlurmOptions(o).message());
  };
  EXPECT_TRUE(ValidateSlurmOptions(GpuOptions()).ok());
  EXPECT_TRUE(Has(error_of([](SlurmOptions& o) { o.nodes = 0; }), "--nodes 0"));
  EXPECT_TRUE(Has(error_of([](SlurmOptions& o) { o.gpus_per_node = -1; }), "--gpus-per-node"));
  EXPECT_TRUE(Has(error_of([](SlurmOptions& o) { o.workers_per_node = 3; }), "--workers-per-node 3"));
  EXPECT_TRUE(Has(error_of([](SlurmOptions& o) { o.run_dir = "runs/big"; }), "--run-dir 'runs/big'"));
  EXPECT_TRUE(Has(error_of([](SlurmOptions& o) { o.gyre_bin = "gyre"; }), "--gyre-bin"));
  EXPECT_TRUE(Has(error_of([](SlurmOptions& o) { o.partition = "gpu; rm -rf"; }), "--partition"));
  EXPECT_TRUE(Has(error_of([](SlurmOptions& o) { o.sbatch_args = {"qos=high"}; }), "--sbatch-arg 'qos=high'"));
  EXPECT_TRUE(Has(error_of([](SlurmOptions& o) { o.port = 70000; }), "--port 70000"));
}

TEST(SlurmOptionsTest, JsonRoundTripsAndBadJsonNamesTheFile) {
  const SlurmOptions o = GpuOptions();
  absl::StatusOr<SlurmOptions> back = SlurmOptionsFromJson(SlurmOptionsToJson(o), "launch.json");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(SlurmBatchScript(*back), SlurmBatchScript(o));
  EXPECT_EQ(SlurmWorkerTaskScript(*back), SlurmWorkerTaskScript(o));
  absl::StatusOr<SlurmOptions> bad = SlurmOptionsFromJson("{\"run_name\": 3}", "/x/launch.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(Has(std::string(bad.status().message()), "/x/launch.json"));
  EXPECT_TRUE(Has(std::string(bad.status().message()), "run_name"));
  EXPECT_FALSE(SlurmOptionsFromJson("not json", "l.json").ok());
}

TEST(ParseSbatchJobIdTest, ReadsBothOutputForms) {
  EXPECT_EQ(*ParseSbatchJobId("Submitted batch job 4242\n"), "4242");
  EXPECT_EQ(*ParseSbatchJobId("sbatch: warning: x\nSubmitted batch job 17\n"), "17");
  EXPECT_EQ(*ParseSbatchJobId("981;cluster-a\n"), "981");
  EXPECT_FALSE(ParseSbatchJobId("sbatch: error: invalid partition").ok());
}

}  // namespace
}  // namespace gyre::deploy
