#!/usr/bin/env bash
# GPU check of ssah on a real-size random-weight model (see benchmarks/gpu_check.py), under 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options...]
#   bash benchmarks/gpu_check.sh /tmp/check --config tiny --device cpu     # the same code on a CPU, in seconds
#
# Needs torch, transformers, accelerate, peft, safetensors; ssah comes from this tree (PYTHONPATH=src).
# No network and no model files. Writes OUT_DIR/gpu_check.json (and nvidia-smi.txt where there is one).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-runs/gpu_check}}"
shift || true
mkdir -p "$out"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
fi
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 470 "${PYTHON:-python3}" "$here/benchmarks/gpu_check.py" --out "$out" "$@"
