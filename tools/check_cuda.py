"""Check reccc's CUDA artifacts on a machine with an NVIDIA GPU: numerics and speed against onnxruntime.

    python tools/check_cuda.py                          # the bundled testsuite models, for this GPU's arch
    python tools/check_cuda.py model.onnx --batches 1,64,2048 --repeat 50

Per model: compile with reccc for the local GPU's arch (`{"kind": "cuda", "arch": "sm_XY"}` from the
device's compute capability, or --arch), load it with reccc.load (inputs copied to the GPU, outputs
back), and on random valid inputs (reccc.sample_inputs) compare every output with onnxruntime within
reccc's fp32 tolerance. Then time, interleaved in one process, median after warm-ups:
  reccc               reccc.load(artifact).run(feeds): numpy in and out, including the copies to and from the GPU
  onnxruntime_cpu     onnxruntime, CPU provider, ORT_ENABLE_ALL
  onnxruntime_cuda    onnxruntime's CUDA provider (numpy in and out too), where the installed onnxruntime
                      has it (pip install onnxruntime-gpu); reported as unavailable otherwise
Writes bench-results/check-cuda.json; exits 0 when every output agrees, 1 when any does not, 2 when no
CUDA GPU is visible.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))  # bench.py is a script beside this one, not a package
from bench import Engine, batch_list, machine_info, onnxruntime_session, time_interleaved, versions, warm_up  # noqa: E402

REPO_ROOT = TOOLS.parent
BUNDLED_MODELS = sorted((REPO_ROOT / "testsuite" / "models").glob("*.onnx"))
INPUT_SEED = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run reccc's CUDA artifacts on this GPU against onnxruntime.")
    parser.add_argument("models", nargs="*", type=Path, help="ONNX models (default: testsuite/models/*.onnx)")
    parser.add_argument("--arch", help="CUDA arch to compile for, e.g. sm_90 (default: this GPU's)")
    parser.add_argument("--batches", type=batch_list, default=[1, 64, 2048], help="comma-separated batch sizes (default: 1,64,2048)")
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per engine and batch (default: 50)")
    parser.add_argument("-O", dest="opt_level", type=int, default=2, help="reccc optimization level (default: 2)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "bench-results" / "check-cuda.json", help="where to write the results")
    return parser.parse_args(argv)


def local_gpu() -> dict | None:
    """GPU 0's name and arch (sm_XY), or None when this process sees no CUDA GPU."""
    import tvm

    device = tvm.cuda(0)
    if not device.exist:
        return None
    return {"name": device.device_name, "arch": "sm_" + device.compute_version.replace(".", "")}


def onnxruntime_cuda_session(model: onnx.ModelProto):
    """onnxruntime on its CUDA provider, or None where the installed onnxruntime lacks it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])


def session_engine(name: str, session, feeds: dict[str, np.ndarray]) -> Engine:
    names = [output.name for output in session.get_outputs()]
    return Engine(name, lambda: dict(zip(names, session.run(names, feeds))))


def check_batch(compiled, proto: onnx.ModelProto, ir_model, sessions: dict, batch: int, repeat: int) -> dict:
    from reccc.reference import agreement, run_reference
    from reccc.sample_inputs import random_inputs

    feeds = random_inputs(ir_model, batch, seed=INPUT_SEED)
    engines = [Engine("reccc", lambda: compiled.run(feeds))]
    engines += [session_engine(name, session, feeds) for name, session in sessions.items() if session is not None]
    results = {engine.name: warm_up(engine) for engine in engines}
    checked = agreement(run_reference(proto, feeds), results["reccc"])
    time_interleaved(engines, repeat)
    medians = {engine.name: 1e3 * statistics.median(engine.seconds) for engine in engines}
    return {
        "batch": batch,
        "median_ms": medians,
        "max_abs_error": {name: error for name, (error, _) in checked.items()},
        "allowed_error": {name: bound for name, (_, bound) in checked.items()},
        "agrees": all(error <= bound for error, bound in checked.values()),
    }


def check_model(path: Path, arch: str, args: argparse.Namespace, scratch: Path) -> dict:
    import reccc
    from reccc.ir import Model

    artifact = scratch / f"{path.stem}.so"
    reccc.compile(str(path), str(artifact), target=json.dumps({"kind": "cuda", "arch": arch}), opt_level=args.opt_level)
    compiled = reccc.load(artifact)
    proto = onnx.load(str(path))
    ir_model = Model.from_onnx(proto, str(path))
    sessions = {"onnxruntime_cpu": onnxruntime_session(proto, threads=0), "onnxruntime_cuda": onnxruntime_cuda_session(proto)}
    batches = [check_batch(compiled, proto, ir_model, sessions, batch, args.repeat) for batch in args.batches]
    return {"model": str(path), "artifact_bytes": artifact.stat().st_size, "batches": batches}


def print_model(result: dict) -> None:
    print(f"\n{result['model']}")
    for batch in result["batches"]:
        timings = ", ".join(f"{name} {ms:.3f} ms" for name, ms in batch["median_ms"].items())
        errors = ", ".join(f"{name} {error:.3g} (allowed {batch['allowed_error'][name]:.3g})" for name, error in batch["max_abs_error"].items())
        verdict = "agrees" if batch["agrees"] else "DIFFERS from onnxruntime"
        print(f"  batch {batch['batch']:>5}: {verdict}; max abs error {errors}; median {timings}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = local_gpu()
    if gpu is None:
        print("check_cuda: this process sees no CUDA GPU (and its driver); run it on a machine with one", file=sys.stderr)
        return 2
    arch = args.arch or gpu["arch"]
    print(f"GPU 0: {gpu['name']} ({gpu['arch']}); compiling for {arch}")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("check_cuda: onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); timing the CPU provider only")
    with tempfile.TemporaryDirectory(prefix="reccc-check-cuda-") as folder:
        results = []
        for path in args.models or BUNDLED_MODELS:
            results.append(check_model(path, arch, args, Path(folder)))
            print_model(results[-1])
    report = {"machine": machine_info(), "gpu": gpu, "versions": versions(), "arch": arch, "opt_level": args.opt_level,
              "repeat": args.repeat, "models": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if all(batch["agrees"] for result in results for batch in result["batches"]) else 1


if __name__ == "__main__":
    sys.exit(main())
