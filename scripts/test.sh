#!/usr/bin/env bash
# Quick start 2/2: set up, then run the whole test suite (tiny models, and the real
# default model end to end on a small slice of text). Extra flags go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPSEARCH_REQUIRE_BROWSER=1   # the HTML report's browser test fails, not skips, without Chromium
export MPSEARCH_REQUIRE_POSTGRES=1  # the Optuna RDB-storage tests fail, not skip, without a PostgreSQL server
exec .venv/bin/python -m pytest -q "$@"
