#!/usr/bin/env bash
# Set up ./.venv, compile the bundled DLRM-style model for this CPU, run it against onnxruntime,
# and print their agreement and latencies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
.venv/bin/reccc inspect testsuite/models/dlrm.onnx
.venv/bin/reccc testsuite/models/dlrm.onnx --target=x86 -O2 -o "$out/dlrm.so" --time-passes -v
.venv/bin/python tools/bench.py testsuite/models/dlrm.onnx --levels 2 --batches 1,64,2048 --repeat 20 --json "$out/bench.json"
