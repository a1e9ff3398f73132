#!/usr/bin/env bash
# Quick start 2/2: set up, then run the whole test suite (tiny models, and the real
# default model end to end on a small slice of text), after ruff. Extra flags go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPSEARCH_REQUIRE_BROWSER=1   # the HTML report's browser test fails, not skips, without Chromium
export MPSEARCH_REQUIRE_POSTGRES=1  # the Optuna RDB-storage tests fail, not skip, without a PostgreSQL server
echo "[test] ruff: lint and format (configuration in pyproject.toml)"
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
# the tests include the docs site (tests/test_docs.py: `mkdocs build --strict`, generated results pages current)
exec .venv/bin/python -m pytest -q "$@"
