#!/usr/bin/env bash
# GPU workers end to end (device machine, 2 GPUs): `gyre launch --local` with NCCL workers on
# llama-125m over a prepared index.
#
#   bash tests/e2e/gpu_run_test.sh <gyre binary> <index dir> <out dir> [config]
#
# Phases (each a fresh run; per-worker batch x seq as stated in the summary):
#   1w     1 worker,  global batch B        tokens/s at one GPU
#   2w-weak  2 workers, global batch 2B     same per-worker batch (weak scaling)
#   2w-strong 2 workers, global batch B     global batch constant (what the issue asks)
#   (1 GPU: only 1w, and the kill phase runs 1 worker: it restores from the latest checkpoint)
#   eval   1 worker, micro-batches of B/4 (gradient accumulation) and the in-run evaluation every
#          10 steps (rank 0 scores the index's "validation" sources and the LM-head spectrum):
#          eval loss journaled at steps 10, 20; the step breakdown counts every pass's backward.
#   kill   2 workers; kill -9 of the worker on GPU 1 at step >= KILL_AT: the survivor aborts its
#          collective and moves to a failure generation (at world 1, or at world 2 when the
#          launcher's replacement registered before that generation formed: seen on 2xH100),
#          the restarted worker rejoins (state by NCCL broadcast) and the run ends at world 2; the ledger has no gap or
#          duplicate, the loss falls, checkpoints (device state copied to the host) are written.
# Prints PASS/FAIL lines and exits non-zero on any failure. Tokens/s = committed tokens between
# step 5 and the last step over the wall time between their log lines (coordinator round trips,
# optimizer and data included); exposed communication share = median exposed-comm ms (CUDA
# events: backward end -> last bucket reduced) over the median wall time per step.
set -uo pipefail
gyre="$1"; index="$2"; out="$3"
config="${4:-$(dirname "${BASH_SOURCE[0]}")/../../deploy/configs/gpu-llama125m.textproto}"
B="${B:-16}"; SEQ="${SEQ:-1024}"; STEPS="${STEPS:-25}"
KILL_STEPS="${KILL_STEPS:-400}"; KILL_AT="${KILL_AT:-100}"; KILL_SEQ="${KILL_SEQ:-1024}"
export NCCL_NVLS_ENABLE=0
runs="$(mktemp -d)/runs"
summary="$out/summary.txt"
fail=0
say() { echo "$*" | tee -a "$summary"; }
check() { if eval "$2"; then say "[PASS] $1"; else say "[FAIL] $1"; fail=1; fi; }

# Step lines of every worker log of a run, one per step (the last writer wins), as TSV:
# step loss world exposed_ms at_s
steps_of() {
  cat "$runs/$1"/logs/worker-*.log 2>/dev/null | python3 -c '
import re, sys
rows = {}
pat = re.compile(r"^step\s+(\d+)\s+loss ([0-9.naif]+).*world (\d+).*comm ([0-9.]+) ms exposed.*at ([0-9.]+) s")
for line in sys.stdin:
    m = pat.search(line)
    if m: rows[int(m.group(1))] = m.groups()[1:]
for s in sorted(rows): print(s, *rows[s], sep="\t")'
}

throughput() {  # run tokens_per_step -> "tok/s exposed_ms wall_ms_per_step share"
  steps_of "$1" | python3 -c '
import statistics, sys
tok = float(sys.argv[1])
rows = [l.split("\t") for l in sys.stdin if l.strip()]
rows = [r for r in rows if int(r[0]) >= 5]
if len(rows) < 3: print("nan nan nan nan"); sys.exit()
t0, t1 = float(rows[0][4]), float(rows[-1][4])
n = int(rows[-1][0]) - int(rows[0][0])
wall = (t1 - t0) / n * 1e3
exp = statistics.median(float(r[3]) for r in rows)
print(f"{n * tok / (t1 - t0):.0f} {exp:.2f} {wall:.2f} {exp / wall:.3f}")' "$2"
}

launch() {  # name workers batch seq steps
  timeout "${LAUNCH_TIMEOUT:-50}" "$gyre" launch --local --workers "$2" --config "$config" --index "$index" \
    --run "$1" --runs-dir "$runs" --batch "$3" --seq-len "$4" --steps "$5" > "$runs/$1.launch.log" 2>&1
}

mkdir -p "$runs"
ngpu=$(nvidia-smi -L | grep -c '^GPU')
kw=$([ "$ngpu" -ge 2 ] && echo 2 || echo 1)  # workers of the kill phase; the last GPU's worker dies
say "== gpu_run_test $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"

phases=("1w 1 $B")
[ "$ngpu" -ge 2 ] && phases+=("2w-weak 2 $((2 * B))" "2w-strong 2 $B")
for phase in "${phases[@]}"; do
  set -- $phase
  name=$1 workers=$2 batch=$3
  launch "$name" "$workers" "$batch" "$SEQ" "$STEPS"; rc=$?
  read -r tps exp wall share <<< "$(throughput "$name" $((batch * SEQ)))"
  say "$name: workers $workers global batch $batch x $SEQ (per worker $((batch / workers))): $tps tok/s, wall $wall ms/step, exposed comm $exp ms = share $share (launch rc $rc)"
  check "$name: all $STEPS steps committed, ledger exact" "'$gyre' ledger --run-dir $runs/$name --quiet 2>&1 | grep -q '$STEPS committed steps.*0 problem'"
  printf -v "tps_${name//-/_}" '%s' "$tps"
  { echo "### $name"; cat "$runs/$name.launch.log"; for f in "$runs/$name"/logs/*.log; do echo "--- $f"; tail -n 60 "$f"; done; } > "$out/$name.log"
done
[ "$ngpu" -ge 2 ] && python3 - "$tps_1w" "$tps_2w_weak" "$tps_2w_strong" <<'PY' | tee -a "$summary"
import sys
one, weak, strong = (float(x) for x in sys.argv[1:])
print(f"data-parallel efficiency: weak (per-worker batch constant) {weak / (2 * one):.3f}, "
      f"strong (global batch constant) {strong / (2 * one):.3f}; speed-up weak {weak / one:.2f}x, strong {strong / one:.2f}x")
PY

# In-run evaluation and gradient accumulation on a GPU worker.
name=eval
sed 's/^train {.*/train { max_steps: 200 eval_every_steps: 10 eval_samples_per_source: 4 micro_batch: '$((B / 4))' }/' "$config" > "$runs/eval.textproto"
config_saved="$config"; config="$runs/eval.textproto"
launch "$name" 1 "$B" "$SEQ" "$STEPS"; rc=$?
config="$config_saved"
"$gyre" ledger --run-dir "$runs/$name" --json > "$runs/$name.ledger.json" 2>&1
python3 - "$runs/$name.ledger.json" "$STEPS" <<'PY' | tee -a "$summary"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ev = {r["step"]: r for r in rows if "eval_loss" in r}
print("eval: steps", len(rows), "evaluated at", sorted(ev),
      " ".join(f"step {s}: eval loss {r['eval_loss']:.3f} head eff. rank {r['head_effective_rank']:.1f}" for s, r in sorted(ev.items())))
ok = len(rows) == int(sys.argv[2]) and sorted(ev) == [s for s in (10, 20) if s < int(sys.argv[2])] and \
     all(0 < r["eval_loss"] < 12 and r["head_effective_rank"] > 1 for r in ev.values())
print("EVAL_OK" if ok else "EVAL_BAD")
PY
check "eval: in-run evaluation journaled at steps 10 and 20 on a GPU worker (launch rc $rc)" "grep -q EVAL_OK $summary"
cat "$runs/$name"/logs/worker-*.log | python3 -c '
import re, statistics, sys
r = [tuple(map(float, m.groups())) for m in (re.search(r"fwd ([0-9.]+) ms, bwd ([0-9.]+) ms", l) for l in sys.stdin) if m]
f, b = statistics.median(x[0] for x in r[5:]), statistics.median(x[1] for x in r[5:])
print(f"eval: {len(r)} step lines, 4 micro-batches per step: median fwd {f:.1f} ms, bwd {b:.1f} ms")
print("SPLIT_OK" if b > f else "SPLIT_BAD")' | tee -a "$summary"
check "eval: with micro-batches the device breakdown puts backward above forward" "grep -q SPLIT_OK $summary"
{ cat "$runs/$name.launch.log"; cat "$runs/$name.ledger.json"; for f in "$runs/$name"/logs/*.log; do echo "--- $f"; tail -n 40 "$f"; done; } > "$out/eval.log"

# Kill -9 of the worker on the last GPU mid-run (2 GPUs: a survivor goes on; 1 GPU: nobody
# survives, the restarted worker restores the latest checkpoint from its host copy).
name=kill
LAUNCH_TIMEOUT=90 launch "$name" "$kw" "$B" "$KILL_SEQ" "$KILL_STEPS" &
launcher=$!
killed=""
for _ in $(seq 600); do
  last=$(steps_of "$name" | tail -n 1 | cut -f1)
  if [ -n "$last" ] && [ "$last" -ge "$KILL_AT" ]; then
    pid=$(ps -eo pid,args | awk -v r="$runs/$name" -v k=$((kw - 1)) '$0 ~ ("worker --run-dir " r " --device cuda:" k) && !/awk/ {print $1}' | head -n 1)
    if [ -n "$pid" ]; then kill -9 "$pid"; killed="$pid at step $last"; fi
    break
  fi
  sleep 0.2
done
wait "$launcher"; rc=$?
say "kill: killed worker pid $killed (launch rc $rc)"
"$gyre" ledger --run-dir "$runs/$name" > "$runs/$name.ledger" 2>&1
tail -n 1 "$runs/$name.ledger" | tee -a "$summary"
check "kill: a worker was killed" "[ -n \"$killed\" ]"
check "kill: ledger exact ($KILL_STEPS steps, no gap, no duplicate)" "tail -n 1 $runs/$name.ledger | grep -q '$KILL_STEPS committed steps.*0 problem'"
if [ "$kw" = 2 ]; then
  check "kill: the survivor moved to a failure generation and went on (world 1, or world 2 with the replacement)" "grep -q '(failure)' $runs/$name/logs/coordinator.log && grep -q 'nccl: aborted' $runs/$name/logs/worker-0.log"
  check "kill: the restarted worker rejoined (world 2 at the end)" "[ \"\$(grep '^step' $runs/$name.ledger | tail -n 1 | awk '{print \$6}')\" = 2 ]"
else
  # The restore starts from the newest checkpoint committed before the kill (rank 0 writes them
  # asynchronously: one still being written does not count), from step 0 only if none was.
  last_ckpt=$(awk -v k="${killed##* }" '/checkpoint of step [0-9]+ committed/ {if ($5 + 0 <= k + 0) s = $5} END {print s + 0}' "$runs/$name"/logs/worker-0.log)
  restored_from=$(awk '/\(restore\)/ {s=$NF} END {print s + 0}' "$runs/$name/logs/coordinator.log")
  say "kill: newest checkpoint committed before the kill: step $last_ckpt; restore generation from step $restored_from"
  check "kill: the restarted worker restored the newest committed checkpoint" "[ '$restored_from' = '$last_ckpt' ] && grep -q '(restore)' $runs/$name/logs/coordinator.log"
fi
first_failure=$(awk '/\(failure\)/ {print $NF; exit}' "$runs/$name/logs/coordinator.log")
check "kill: no failure generation before the kill (heartbeats during replica set-up; first at step ${first_failure:-none})" "[ -z '$first_failure' ] || [ '$first_failure' -ge $KILL_AT ]"
check "kill: the launcher restarted the worker" "grep -q 'starting one' $runs/$name.launch.log"
python3 - "$runs/$name.ledger" <<'PY' | tee -a "$summary"
import sys
loss = [float(l.split()[-1]) for l in open(sys.argv[1]) if l.startswith("step")]
worlds = [int(l.split()[5]) for l in open(sys.argv[1]) if l.startswith("step")]
a, b = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
print(f"kill: mean loss first 10 steps {a:.3f}, last 10 {b:.3f}; steps at world 1: {worlds.count(1)}, world 2: {worlds.count(2)}")
print("LOSS_FELL" if b < a - 0.5 else "LOSS_FLAT")
PY
check "kill: loss falling" "grep -q LOSS_FELL $summary"
check "kill: a checkpoint was committed" "grep -q '^checkpoint' $runs/$name.ledger"
{ cat "$runs/$name.launch.log"; cat "$runs/$name.ledger"; for f in "$runs/$name"/logs/*.log; do echo "--- $f"; grep -v '^step' "$f" | tail -n 40; grep '^step' "$f" | awk 'NR<=3 || NR%10==0'; done; } > "$out/kill.log"
say "gpu_run_test: $([ $fail = 0 ] && echo PASS || echo FAIL)"
exit $fail
