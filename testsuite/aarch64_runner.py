"""Runs reccc artifacts on the aarch64 Python of tools/arm_emulator.sh (under qemu), for the x86 tests.

It starts once and serves requests, since starting Python and TVM under qemu takes seconds. Each
stdin line is a JSON request {"artifact": .so, "inputs": .npz, "outputs": .npz}: it runs the artifact
with `reccc.load(...).run(...)`, as on a device, writes the outputs to that .npz and answers one JSON
line on stdout: {"ok": true}, or {"error": "Type: message"} when the run raised.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's reccc: only its runtime is used

import numpy as np  # noqa: E402

import reccc  # noqa: E402


def serve() -> None:
    models = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["artifact"] not in models:
                models[request["artifact"]] = reccc.load(request["artifact"])
            with np.load(request["inputs"]) as inputs:
                outputs = models[request["artifact"]].run(dict(inputs))
            np.savez(request["outputs"], **outputs)
            answer = {"ok": True}
        except Exception as error:  # reported to the test, which fails with it; the next request still runs
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
