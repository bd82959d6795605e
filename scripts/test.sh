#!/usr/bin/env bash
# One command: set up ./.venv, then run the default test suite (no GPU, no hub, a few minutes
# on 2 cores). Tests marked real_model (the 135M model), engines (FSDP2/DeepSpeed, needs
# `pip install -e ".[deepspeed]"`) and gpu are deselected; run them with
#   .venv/bin/python -m pytest -m real_model      /      -m engines      /      -m gpu
# The browser test needs Debian's chromium; it is installed here when missing and possible.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[test.sh] could not install chromium; the browser test will fail and say why"
fi
exec .venv/bin/python -m pytest -m "not real_model and not gpu and not engines" "$@"
