#!/usr/bin/env bash
# The GPU measurements in one run of about 8 minutes, for the first time a CUDA machine is at hand:
#   1. training throughput and MFU of the gpt2-124m shape against transformers (bf16 autocast, SDPA, torch.compile
#      for both), and the llama-tiny / qwen2.5-0.5b shapes without compile;
#   2. batched greedy decoding against transformers `generate` (bf16, batch 1 / 8 / 32).
# Every figure is printed with its ratio against transformers measured in the same run; the tables also land in
# $OUT (or benchmarks/gpu-results/) as markdown. Nothing here runs without a GPU.
#
#   bash benchmarks/gpu.sh            # uses .venv/bin/python (a CUDA build of torch must be installed there)
#   ONLY="decode train-llama-tiny" PYTHON=python3 bash benchmarks/gpu.sh   # a subset, another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/gpu-results}
mkdir -p "$OUT"

"$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: no CUDA device visible to torch (install a CUDA build of torch)")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
EOF

run() {  # run NAME TIMEOUT_SECONDS COMMAND...: one measurement, its output kept; a failure does not stop the rest
  local name=$1 limit=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "== $name"
  if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.md"; then
    echo "!! $name failed or ran past ${limit}s (see $OUT/$name.md)"
  fi
}

run train-gpt2-124m 180 "$PY" benchmarks/train_step.py --preset gpt2-124m --device cuda --dtype bfloat16 \
  --batch-size 16 --seq-len 1024 --steps 10 --warmup 5 --repeats 2 --compile
run train-llama-tiny 60 "$PY" benchmarks/train_step.py --preset llama-tiny --device cuda --dtype bfloat16 \
  --batch-size 32 --seq-len 512 --steps 20 --warmup 5 --repeats 2
run train-qwen2.5-0.5b 90 "$PY" benchmarks/train_step.py --preset qwen2.5-0.5b --device cuda --dtype bfloat16 \
  --batch-size 4 --seq-len 512 --steps 10 --warmup 3 --repeats 2
run decode 120 "$PY" benchmarks/decode.py --device cuda --dtypes bfloat16 --batch-sizes 1 8 32 --repeats 3
echo "tables in $OUT/"
