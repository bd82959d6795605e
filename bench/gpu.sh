#!/usr/bin/env bash
# Everything issue #4 needs from a GPU machine, in one command (e.g. one `device` call):
#   bash bench/gpu.sh            # results under $OUT (default outputs/gpu)
# Needs torch (CUDA), transformers, peft, accelerate, pyyaml and pytest, which the lent
# machines have; sstoken itself runs from src/ without installing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
# correctness on the GPU first: attention hook in bf16 vs fp32 eager, chunked loss vs full logits
python3 -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py -q -rA 2>&1 | tee "$OUT/pytest-gpu.txt"
# the 3B shape, batch 4 x 2048, every method side by side; attention score at 2k and 8k;
# one profiled step of the anchor, full and sstoken (cached / online) to explain any miss
python3 bench/bench.py --shape 3b --attn-lengths 2048,8192 --steps 5 --warmup 2 \
    --profile "$OUT/profile-3b.txt" \
    --out "$OUT/BENCHMARKS-gpu.md" --json "$OUT/bench-3b.json" 2>&1 | tee "$OUT/bench-3b.log"
echo "[gpu.sh] done: $OUT (append $OUT/BENCHMARKS-gpu.md to BENCHMARKS.md)"
