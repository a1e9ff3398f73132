#!/usr/bin/env bash
# Quick start 1/2: set up, then search on the embedded default model (SmolLM2-135M)
# at the effective bits of uniform 3-bit, with the Fisher proxy and the exact MILP,
# next to the uniform and llama.cpp-recipe baselines. Extra flags go to `mpsearch search`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mpsearch search --proxy fisher --budget uniform:3 --out runs/quickstart "$@"
