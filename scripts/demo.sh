#!/usr/bin/env bash
# One command: set up ./.venv (CPU torch, HF stack, embedded model and data), then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sstoken demo "$@"
