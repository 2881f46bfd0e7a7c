#!/usr/bin/env bash
# The CUDA measurements of benchmarks/README.md ("ACDC and PAHQ on CUDA"), in the order a lent GPU runs
# them, each alone on the GPU:
#   1. PAHQ's agreement on SmolLM2: float32 against float16 ACDC at tau 3e-4 (bfloat16 is refused there,
#      its answers being 7e-4 nats from float32);
#   2. the same on the tiny models (bfloat16).
# A whole SmolLM2 sweep is about 11 minutes on an H100 (extrapolated), two sweeps for step 1. (The SmolLM2
# search at 95% sparsity that step 1 used to resume finished on the CPU; see "ACDC on SmolLM2 IOI".)
# Run from the repository root with hap importable; logs go to $LOGS (default /tmp/hap-gpu).
set -u
LOGS=${LOGS:-/tmp/hap-gpu}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
step() {
    local name=$1
    shift
    echo "== $name start $(date +%T)" >> "$LOGS/driver.log"
    "$@" > "$LOGS/$name.log" 2>&1
    echo "== $name exit $? $(date +%T)" >> "$LOGS/driver.log"
}
step pahq-smollm2 python3 benchmarks/pahq_agreement.py --device cuda --precision float16 --models smollm2-135m \
    --ablations interchange --tau 3e-4 --n-train 16 --n-test 200 --batch-size 16 --memory-gib 40 \
    --progress --json "$LOGS/pahq-smollm2.json"
step pahq-tiny python3 benchmarks/pahq_agreement.py --device cuda --precision bfloat16 \
    --models tiny-llama tiny-gpt2 --json "$LOGS/pahq-tiny.json"
