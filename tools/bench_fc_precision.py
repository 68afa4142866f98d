"""Benchmark mixed-precision FC layers: latency and output deviation of reccc's fp32, int8 and bf16 FC
layers against onnxruntime's fp32 run and onnxruntime's own int8 (quantize_dynamic), on a DLRM-style
model (issue 7's anchor: 6 tables of dim 64, MLPs 13-128-64-64 and 448-256-64-1) and a DeepFM-style one
(26 fields of dim 16, MLP 416-400-400-400-1).

    python tools/bench_fc_precision.py                         # batches 64 and 2048, -O2
    python tools/bench_fc_precision.py --batches 64 --repeats 30 --models dlrm
    python tools/bench_fc_precision.py --target '{"kind": "llvm", "mcpu": "cooperlake"}'   # no AMX

All variants run in one process on the same inputs, timed as tools/bench.py times its engines: a
repetition of a variant is as many calls back to back as take 10 ms, each round runs every variant's
repetition in an order drawn per round (interleaved, so load on a shared machine hits every variant
alike), and the median over rounds is reported. onnxruntime runs with as many intra-op threads as the machine has cores, not spinning when
idle, reccc's artifacts with one TVM thread per core (set before the first compile, as reccc.load sets it). Deviation: max abs difference of the sigmoid output from the fp32
model in onnxruntime, on the batch. The machine's load average is printed before and after each model
(on a shared machine it says how far the medians can be trusted). Results go to
bench-results/fc_precision.json, or with --target to bench-results/fc_precision-MCPU.json (a target
other than this CPU's, such as one without AMX, must be one this CPU runs).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

import testmodels  # noqa: E402
from bench import Engine, time_interleaved, warm_up  # noqa: E402

import reccc  # noqa: E402
from reccc.ir import Model  # noqa: E402
from reccc.sample_inputs import random_inputs  # noqa: E402

MODELS = {
    "dlrm": lambda: testmodels.dlrm(tables=6, rows=10000, dim=64, dense=13, bottom=(128, 64), top=(256, 64)),
    # DeepFM's MLP as in its paper (400-400-400): with the test models' default 32-16 the MLP is a few
    # percent of the time and the FC precision cannot show.
    "deepfm": lambda: testmodels.deepfm(fields=26, rows=10000, dim=16, hidden=(400, 400, 400)),
}
PRECISIONS = ("fp32", "int8", "bf16")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    # Idle onnxruntime threads would otherwise spin and take the cores from TVM's in interleaved runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median_ms(runs: dict, feeds: dict, repeats: int) -> dict[str, float]:
    """A call's median time per variant, over `repeats` interleaved repetitions (bench.time_interleaved).
    A single call run right after onnxruntime was seen to take up to 10x its time at batch 64 (reccc
    fp32: 3 ms instead of 0.3), and one run right after another reccc artifact finds TVM's threads
    awake: repetitions of many calls, in an order drawn per round, spread such effects, and slow phases
    of a shared machine, over every variant."""
    engines = [Engine(name, lambda run=run: run(feeds), returns_outputs=False) for name, run in runs.items()]
    for engine in engines:
        warm_up(engine)
    time_interleaved(engines, repeats)
    return {engine.name: 1e3 * statistics.median(engine.seconds) for engine in engines}


def bench_model(name: str, work: Path, batches: list[int], repeats: int, opt_level: int, target: str) -> dict:
    source = work / f"{name}.onnx"
    onnx.save(MODELS[name](), source)
    quantized_by_ort = work / f"{name}.ort_int8.onnx"
    quantize_dynamic(str(source), str(quantized_by_ort), weight_type=QuantType.QInt8, op_types_to_quantize=["Gemm", "MatMul"])
    artifacts = {}
    for precision in PRECISIONS:
        library = work / f"{name}.{precision}.so"
        reccc.compile(source, library, target=target, opt_level=opt_level, fc_precision=precision)
        artifacts[precision] = reccc.load(library)
    sessions = {"onnxruntime fp32": _session(source), "onnxruntime quantize_dynamic": _session(quantized_by_ort)}
    runs = {label: (lambda feeds, s=session: s.run(None, feeds)[0]) for label, session in sessions.items()}
    output = onnx.load(source).graph.output[0].name
    runs.update({f"reccc {precision}": (lambda feeds, a=artifact: np.asarray(a.run(feeds)[output])) for precision, artifact in artifacts.items()})
    model = Model.from_onnx(onnx.load(source))
    results = {}
    for batch in batches:
        feeds = random_inputs(model, batch, seed=batch)
        reference = runs["onnxruntime fp32"](feeds)
        deviation = {label: float(np.abs(run(feeds) - reference).max()) for label, run in runs.items()}
        latency = _median_ms(runs, feeds, repeats)
        results[batch] = {label: {"ms": latency[label], "vs_ort_fp32": latency[label] / latency["onnxruntime fp32"],
                                  "vs_ort_int8": latency[label] / latency["onnxruntime quantize_dynamic"],
                                  "max_abs_deviation": deviation[label]} for label in runs}
        print(f"{name} batch {batch}:")
        for label, row in results[batch].items():
            print(f"  {label:30s} {row['ms']:9.3f} ms  {row['vs_ort_fp32']:5.2f}x ort fp32  {row['vs_ort_int8']:5.2f}x ort int8"
                  f"  deviation {row['max_abs_deviation']:.2e}")
    return results


def _load() -> list[float]:
    """1, 5 and 15 minute load averages (uptime's)."""
    return [round(value, 2) for value in os.getloadavg()]


def _suffix(target: str) -> str:
    """The results file's suffix for `target`: none for this CPU, else its CPU name (or the target's)."""
    if target == "x86":
        return ""
    name = json.loads(target).get("mcpu", "llvm") if target.startswith("{") else target
    return "-" + "".join(c if c.isalnum() else "-" for c in name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--batches", default="64,2048")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("-O", dest="opt_level", type=int, default=2, help="reccc's optimization level (default 2)")
    parser.add_argument("--target", default="x86", help="reccc's --target (default x86: this CPU)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    # reccc.load sets this for the process, but compiling here first starts TVM's thread pool with TVM's
    # default (a thread per two cores on x86); reccc fp32 then took 3 ms instead of 0.25 at batch 64.
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    results, load = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-fc-") as scratch:
        for name in args.models.split(","):
            before = _load()
            results[name] = bench_model(name, Path(scratch), batches, args.repeats, args.opt_level, args.target)
            load[name] = {"before": before, "after": _load()}
            print(f"{name}: load average {before} before, {load[name]['after']} after")
    out = REPO_ROOT / "bench-results" / f"fc_precision{_suffix(args.target)}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "target": args.target, "opt_level": args.opt_level, "repeats": args.repeats, "load_average": load, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
