#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -x .venv-optimum/bin/optimum-cli ]; then
  export LLM_ENDPOINT_OPTIMUM_CLI="$PWD/.venv-optimum/bin/optimum-cli"
fi
# Lint and type-check first: both take seconds, the suite takes minutes.
.venv/bin/ruff check .
.venv/bin/mypy
set +e
.venv/bin/python -m pytest -ra "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
