"""Check reccc's CUDA artifacts on a machine with an NVIDIA GPU: numerics and speed against onnxruntime.

    python tools/check_cuda.py                                   # GPU machine with nvcc: build for its GPU, check
    python tools/check_cuda.py --build-only DIR --arch sm_90     # build host (nvcc, no GPU): artifacts into DIR
    python tools/check_cuda.py --artifacts DIR                   # GPU machine: check what --build-only wrote

Models: the bundled testsuite models and GPU_DLRM (the standard DLRM's layers, tools/bench.py, with
small tables so its artifact travels), or the .onnx paths given. Building needs nvcc, not a GPU, as
reccc does; checking needs a GPU and only TVM's runtime (a runtime-only TVM, TVM_USE_RUNTIME_LIB=1,
is enough). Per model and batch, on random valid inputs (reccc.sample_inputs): every output of
reccc.load(artifact).run against onnxruntime within reccc's fp32 tolerance, then timed, interleaved in
one process, medians after warm-ups:
  reccc               reccc.load(artifact).run(feeds): numpy in and out, the copies to and from the GPU included
  reccc_on_gpu        the artifact's VM entry on inputs already on the GPU, outputs left there (kernels and launches)
  onnxruntime_cpu     onnxruntime, CPU provider, ORT_ENABLE_ALL, all cores
  onnxruntime_cuda    onnxruntime's CUDA provider (numpy in and out), where the installed onnxruntime has it
Writes bench-results/check-cuda.json; exits 0 when every output agrees, 1 when any does not, 2 when no
CUDA GPU is visible (or the artifacts folder is not a --build-only one).
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))  # bench.py and testmodels.py are scripts beside this one, not a package
from bench import STANDARD_MODEL, Engine, batch_list, machine_info, onnxruntime_session, time_interleaved, versions, warm_up  # noqa: E402

REPO_ROOT = TOOLS.parent
BUNDLED_MODELS = sorted((REPO_ROOT / "testsuite" / "models").glob("*.onnx"))
# The standard DLRM's MLPs with 4096-row tables (8 MB instead of 205 MB): GPU time at batch 64 and up
# is the MLPs', and the artifact (weights embedded) stays small enough to copy to a GPU machine.
GPU_DLRM = {**STANDARD_MODEL, "rows": 4096}
BUILD_INDEX = "build.json"
INPUT_SEED = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run reccc's CUDA artifacts on this GPU against onnxruntime.")
    parser.add_argument("models", nargs="*", type=Path, help="ONNX models (default: testsuite/models/*.onnx and GPU_DLRM)")
    parser.add_argument("--arch", help="CUDA arch to compile for, e.g. sm_90 (default: this GPU's; required with --build-only)")
    parser.add_argument("-O", dest="opt_level", type=int, default=2, help="reccc optimization level (default: 2)")
    parser.add_argument("--build-only", type=Path, metavar="DIR", help="only build: write the artifacts and their models into DIR")
    parser.add_argument("--artifacts", type=Path, metavar="DIR", help="check the artifacts a --build-only run wrote into DIR")
    parser.add_argument("--batches", type=batch_list, default=[1, 64, 2048], help="comma-separated batch sizes (default: 1,64,2048)")
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per engine and batch (default: 50)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "bench-results" / "check-cuda.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.build_only and args.artifacts:
        parser.error("--build-only and --artifacts are the two halves of one check: give one")
    if args.build_only and not args.arch:
        parser.error("--build-only needs --arch (no GPU to read it from)")
    if args.artifacts and (args.models or args.arch):
        parser.error("--artifacts checks what was built: models and --arch were given to --build-only")
    return args


def local_gpu() -> dict | None:
    """GPU 0's name and arch (sm_XY), or None when this process sees no CUDA GPU."""
    import tvm

    from reccc.runtime import load_tvm_cuda_runtime

    device = tvm.cuda(0)
    if not device.exist:
        load_tvm_cuda_runtime()  # a runtime-only TVM does not load it at import
    if not device.exist:
        return None
    return {"name": device.device_name, "arch": "sm_" + device.compute_version.replace(".", "")}


def build(models: list[Path], arch: str, opt_level: int, folder: Path) -> dict:
    """Compile each model for `arch` into `folder` beside a copy of the model; returns the build index."""
    import reccc

    folder.mkdir(parents=True, exist_ok=True)
    if not models:
        import testmodels

        generated = folder / "dlrm_gpu.onnx"
        onnx.save(testmodels.dlrm(**GPU_DLRM), str(generated))
        models = [*BUNDLED_MODELS, generated]
    built = []
    for path in models:
        model, artifact = folder / path.name, folder / f"{path.stem}.so"
        if path.resolve() != model.resolve():
            shutil.copyfile(path, model)
        reccc.compile(str(path), str(artifact), target=json.dumps({"kind": "cuda", "arch": arch}), opt_level=opt_level)
        print(f"built {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
        built.append({"model": model.name, "artifact": artifact.name})
    index = {"arch": arch, "opt_level": opt_level, "models": built}
    (folder / BUILD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


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


def on_gpu_engine(artifact: Path, compiled, feeds: dict[str, np.ndarray]) -> Engine:
    """The artifact's VM entry on inputs already copied to GPU 0, synchronized after each call."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    device = tvm.cuda(0)
    main = VirtualMachine(tvm.runtime.load_module(str(artifact)), device)["main"]
    tensors = [tvm.runtime.tensor(feeds[name], device) for name in compiled.input_names]

    def call():
        main(*tensors)
        device.sync()

    return Engine("reccc_on_gpu", call, returns_outputs=False)


def check_batch(artifact: Path, compiled, proto: onnx.ModelProto, ir_model, sessions: dict, batch: int, repeat: int) -> dict:
    from reccc.reference import agreement, run_reference
    from reccc.sample_inputs import random_inputs

    feeds = random_inputs(ir_model, batch, seed=INPUT_SEED)
    engines = [Engine("reccc", lambda: compiled.run(feeds)), on_gpu_engine(artifact, compiled, feeds)]
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


def check_model(model: Path, artifact: Path, args: argparse.Namespace) -> dict:
    import reccc
    from reccc.ir import Model

    compiled = reccc.load(artifact)
    proto = onnx.load(str(model))
    ir_model = Model.from_onnx(proto, str(model))
    sessions = {"onnxruntime_cpu": onnxruntime_session(proto, threads=0), "onnxruntime_cuda": onnxruntime_cuda_session(proto)}
    batches = [check_batch(artifact, compiled, proto, ir_model, sessions, batch, args.repeat) for batch in args.batches]
    return {"model": model.name, "artifact_bytes": artifact.stat().st_size, "batches": batches}


def print_model(result: dict) -> None:
    print(f"\n{result['model']}")
    for batch in result["batches"]:
        timings = ", ".join(f"{name} {ms:.3f} ms" for name, ms in batch["median_ms"].items())
        errors = ", ".join(f"{name} {error:.3g} (allowed {batch['allowed_error'][name]:.3g})" for name, error in batch["max_abs_error"].items())
        verdict = "agrees" if batch["agrees"] else "DIFFERS from onnxruntime"
        print(f"  batch {batch['batch']:>5}: {verdict}; max abs error {errors}; median {timings}")


def check(folder: Path, index: dict, gpu: dict, args: argparse.Namespace) -> int:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("check_cuda: onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); timing the CPU provider only")
    results = []
    for entry in index["models"]:
        results.append(check_model(folder / entry["model"], folder / entry["artifact"], args))
        print_model(results[-1])
    report = {"machine": machine_info(), "gpu": gpu, "versions": versions(), "arch": index["arch"],
              "opt_level": index["opt_level"], "repeat": args.repeat, "models": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if all(batch["agrees"] for result in results for batch in result["batches"]) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_only:
        build(args.models, args.arch, args.opt_level, args.build_only)
        return 0
    gpu = local_gpu()
    if gpu is None:
        print("check_cuda: this process sees no CUDA GPU (and its driver); run it on a machine with one", file=sys.stderr)
        return 2
    if args.artifacts:
        index_path = args.artifacts / BUILD_INDEX
        if not index_path.is_file():
            print(f"check_cuda: {args.artifacts}: no {BUILD_INDEX}; write the folder with --build-only", file=sys.stderr)
            return 2
        index = json.loads(index_path.read_text())
        print(f"GPU 0: {gpu['name']} ({gpu['arch']}); artifacts built for {index['arch']}")
        return check(args.artifacts, index, gpu, args)
    arch = args.arch or gpu["arch"]
    print(f"GPU 0: {gpu['name']} ({gpu['arch']}); compiling for {arch}")
    with tempfile.TemporaryDirectory(prefix="reccc-check-cuda-") as scratch:
        index = build(args.models, arch, args.opt_level, Path(scratch))
        return check(Path(scratch), index, gpu, args)


if __name__ == "__main__":
    sys.exit(main())
