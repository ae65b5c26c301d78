#!/usr/bin/env bash
# `gyre launch --slurm / --k8s` and `gyre provision` from the command line: flag errors name the
# flag and exit 2; the written scripts are valid bash (bash -n); --add-workers writes a worker job;
# a failing sbatch is reported with its output.
set -uo pipefail
gyre="$TEST_SRCDIR/$TEST_WORKSPACE/cli/gyre"
tmp="$TEST_TMPDIR"
fail=0
check() {  # check NAME CONDITION...
  local name="$1"; shift
  if "$@"; then echo "ok: $name"; else echo "FAIL: $name"; fail=1; fi
}
# expect_error NAME EXIT NEEDLE ARGS...: gyre ARGS exits with EXIT and says NEEDLE on stderr.
expect_error() {
  local name="$1" want="$2" needle="$3"; shift 3
  "$gyre" "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ "$rc" -eq "$want" ] && grep -qF -- "$needle" "$tmp/err"; then
    echo "ok: $name"
  else
    echo "FAIL: $name: exit $rc (want $want), stderr:"; cat "$tmp/err"; fail=1
  fi
}
base=(--preset llama-tiny --index "$tmp/index" --batch 4 --lr 0.001 --steps 10 --runs-dir "$tmp/runs")

expect_error "no launcher" 2 "pick one of --local, --slurm or --k8s" launch "${base[@]}"
expect_error "two launchers" 2 "pick one of --local, --slurm or --k8s" launch --slurm --k8s "${base[@]}"
expect_error "nodes" 2 "--nodes 0" launch --slurm --nodes 0 "${base[@]}" --run a
expect_error "cuda needs gpus" 2 "--gpus-per-node" launch --slurm --device cuda "${base[@]}" --run a
expect_error "gpus with cpu" 2 "--gpus-per-node 2 with --device cpu" launch --slurm --gpus-per-node 2 --device cpu "${base[@]}" --run a
expect_error "workers per gpu" 2 "--workers-per-node 3" launch --slurm --gpus-per-node 2 --workers-per-node 3 "${base[@]}" --run a
expect_error "bad device" 2 "--device tpu" launch --slurm --device tpu "${base[@]}" --run a
expect_error "slurm flag on k8s" 2 "--partition belongs to --slurm" launch --k8s --image x --partition p "${base[@]}" --run a
expect_error "k8s flag on local" 2 "--image belongs to --k8s" launch --local --image x "${base[@]}" --run a
expect_error "k8s image" 2 "--image" launch --k8s "${base[@]}" --run a
expect_error "k8s gpus" 2 "--gpus-per-worker 2" launch --k8s --image x --gpus-per-worker 2 "${base[@]}" --run a
expect_error "k8s run name" 2 "--run 'Big_Run'" launch --k8s --image x "${base[@]}" --run Big_Run
expect_error "add-workers run dir" 2 "--add-workers needs --run-dir" launch --slurm --add-workers 2
expect_error "add-workers unknown run" 2 "slurm/launch.json" launch --slurm --add-workers 2 --run-dir "$tmp/nowhere"
expect_error "provision mode" 2 "pick one of --k8s, --slurm or --supervise-worker" provision --run-dir "$tmp/runs/a"
expect_error "provision statefulset" 2 "--statefulset" provision --k8s --run-dir "$tmp/runs/a"
expect_error "provision allocation" 2 "--allocation-workers" provision --slurm --run-dir "$tmp/runs/a"

# A GPU Slurm launch, written but not submitted.
"$gyre" launch --slurm --nodes 2 --gpus-per-node 4 --partition gpu --time 1:00:00 "${base[@]}" --run big \
    >"$tmp/out" 2>"$tmp/err"
check "slurm launch exit 0" [ $? -eq 0 ]
run_dir="$(cd "$tmp/runs/big" && pwd)"
check "prints the sbatch line" grep -qxF "sbatch $run_dir/slurm/run.sbatch" "$tmp/out"
check "run.sbatch is bash" bash -n "$run_dir/slurm/run.sbatch"
check "worker-task.sh is bash" bash -n "$run_dir/slurm/worker-task.sh"
check "worker-task.sh executable" [ -x "$run_dir/slurm/worker-task.sh" ]
check "8 desired workers" grep -q '"desired_workers": 8' "$run_dir/config.json"
check "index made absolute" grep -qF "\"index_dir\": \"$tmp/index\"" "$run_dir/config.json"
check "gpu directive" grep -qxF "#SBATCH --gpus-per-node=4" "$run_dir/slurm/run.sbatch"
check "gyre path" grep -qxF "GYRE=$(readlink -f "$gyre")" "$run_dir/slurm/run.sbatch"

"$gyre" launch --slurm --add-workers 3 --run-dir "$run_dir" >"$tmp/out" 2>"$tmp/err"
check "add-workers exit 0" [ $? -eq 0 ]
check "add-workers sbatch line" grep -qxF "sbatch $run_dir/slurm/workers-1.sbatch" "$tmp/out"
check "workers job is bash" bash -n "$run_dir/slurm/workers-1.sbatch"
check "workers job tasks" grep -qxF "#SBATCH --ntasks=3" "$run_dir/slurm/workers-1.sbatch"

expect_error "sbatch fails" 1 "failed (exit 1)" launch --slurm --submit --sbatch false --device cpu "${base[@]}" --run c
expect_error "sbatch missing" 1 "cannot run \`gyre-no-sbatch\`" launch --slurm --submit --sbatch gyre-no-sbatch --device cpu "${base[@]}" --run c

"$gyre" launch --k8s --image reg/gyre:1 --workers 3 "${base[@]}" --run kube >"$tmp/out" 2>"$tmp/err"
check "k8s launch exit 0" [ $? -eq 0 ]
check "k8s apply line" grep -qxF "kubectl apply -f $tmp/runs/kube/k8s/manifests.json" "$tmp/out"
check "k8s replicas" grep -q '"replicas": 3' "$tmp/runs/kube/k8s/manifests.json"
exit $fail
