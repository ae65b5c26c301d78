#!/usr/bin/env bash
# The device command: transformers (torch's Python there) loads every export under $1 and
# compares with our logits saved beside it (CPU: no TF32; offline: nothing to fetch there).
# Log and table into $OUT when set.
#   bash tools/hf_check/run.sh EXPORTS_DIR
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exports="${1:?usage: run.sh EXPORTS_DIR}"
py=/opt/torch/.venv/bin/python3
[ -x "$py" ] || py=python3
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/^/gpu: /'
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES="" "$py" "$here/check_export.py" "$exports"/*/ 2>&1 | tee "$out/check_export.log"
exit "${PIPESTATUS[0]}"
