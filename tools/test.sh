#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (both cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# The aarch64 emulator the ARM target tests run artifacts on (cached; minutes only the first time).
# CI must have it; elsewhere (e.g. without root for its first setup) those tests skip, saying why.
if ! bash tools/arm_emulator.sh && [ -n "${CI:-}" ]; then
    exit 1
fi
exec .venv/bin/python -m pytest -n 2 "$@"
