#!/usr/bin/env bash
# benchmarks/scale.py on one GPU: step time and peak memory of a plain step, Edge Pruning and HAP on
# Qwen2.5-0.5B, Llama-3.2-1B and Llama-3.1-8B, random weights built from their configs (nothing downloaded),
# bfloat16 weights (the 8B's are 15 GiB; hap keeps its masked sums in float32), one IOI batch of 8, 3 timed
# steps after a warm-up. Expected well under ten minutes on one H100 (12 child processes, each building its
# model on the GPU); each child's rows are written as soon as it ends.
#
#   bash benchmarks/scale_gpu.sh [more scale.py options, e.g. --batch-size 16]
#
# From any directory of a checkout; hap needs no install (the checkout goes on PYTHONPATH). Python: $PYTHON,
# else the checkout's .venv if its torch sees a GPU, else python3 (a lent GPU machine's, which has torch,
# transformers and matplotlib). Results: results-cuda.json, results-cuda.md, scale-cuda.png/.svg,
# scale-cuda.log and device-agreement.log (benchmarks/device_agreement.py, run first) in $OUT when it is
# set (a lent machine returns only files written there), else in benchmarks/scale/. The table is printed
# at the end.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$root/benchmarks/scale}
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in "$root/.venv/bin/python" python3; do
        if "$candidate" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
            python=$candidate
            break
        fi
    done
fi
if [ -z "$python" ]; then
    echo "no Python here whose torch sees a GPU (tried $root/.venv/bin/python and python3); set PYTHON" >&2
    exit 2
fi
"$python" -c "import hap, transformers, matplotlib" || {
    echo "$python cannot import hap's needs (transformers, tokenizers, matplotlib, tqdm)" >&2
    exit 2
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# First, seconds: the masked run on the GPU against the CPU (logits, mask gradients, a second backward pass);
# a disagreement is reported in device-agreement.log and does not stop the scale curves.
"$python" "$root/benchmarks/device_agreement.py" --device cuda 2>&1 | tee "$out/device-agreement.log" || true

"$python" "$root/benchmarks/scale.py" --device cuda --dtype bfloat16 --batch-size 8 --steps 3 --out "$out" "$@" \
    2>&1 | tee "$out/scale-cuda.log"
