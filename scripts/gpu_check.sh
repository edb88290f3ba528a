#!/usr/bin/env bash
# The prepared GPU check: CUDA-graph decode correctness (float16 vs eager, vs the float32 goldens), ONNX Runtime /
# TensorRT visual engines where installed, then decode tokens/s (eager vs CUDA graphs vs the memory-bandwidth
# floor) and vision ms on a real-shaped MobileVLM-1.7B with random weights. Budget: under 8 minutes.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # writes OUT_DIR/gpu_check.json (default: $OUT or .)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-.}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with a CUDA-enabled torch found (set PYTHON=...)" >&2
  exit 2
fi
missing=$("$PY" - <<'PY'
import importlib.util
print(" ".join(m for m in ("numpy", "PIL", "sentencepiece", "safetensors") if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing (pip install numpy pillow sentencepiece safetensors)" >&2
  exit 2
fi
"$PY" - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name())
for m in ("onnxruntime", "tensorrt"):
    print(m, "present" if importlib.util.find_spec(m) else "absent")
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 470 "$PY" -m mobilevlm_ros.bench.gpu_check --out "$OUT_DIR/gpu_check.json"
