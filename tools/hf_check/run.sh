#!/usr/bin/env bash
# The device command: transformers (torch's Python there) loads every export under $1 and
# compares with our logits saved beside it (CPU: no TF32; offline: nothing to fetch there):
# Llama, Mamba-2 and xLSTM Large exports.
# Log and table into $OUT when set.
#   bash tools/hf_check/run.sh EXPORTS_DIR
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exports="${1:?usage: run.sh EXPORTS_DIR}"
py=/opt/torch/.venv/bin/python3
[ -x "$py" ] || py=python3
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/^/gpu: /'
# The xLSTM sources that run there, into $OUT: the map was written from the indexed source, and
# 5.17's differed (q/k/v names); read the copy when a name or a number disagrees.
"$py" - "$out" <<'PY' 2>&1 | tee "$out/xlstm_source.log"
import importlib, inspect, shutil, sys
for name in ("modeling_xlstm", "configuration_xlstm"):
    m = importlib.import_module(f"transformers.models.xlstm.{name}")
    shutil.copy(inspect.getsourcefile(m), f"{sys.argv[1]}/{name}.py")
print("external xlstm package:", getattr(importlib.import_module("transformers.models.xlstm.modeling_xlstm"), "external_xlstm", None))
PY
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES="" "$py" "$here/check_export.py" "$exports"/*/ 2>&1 | tee "$out/check_export.log"
exit "${PIPESTATUS[0]}"
