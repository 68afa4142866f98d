#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (both cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -n 2 "$@"
