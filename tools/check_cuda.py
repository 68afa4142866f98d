"""Check reccc's CUDA artifacts on a machine with an NVIDIA GPU: numerics and speed against onnxruntime.

    python tools/check_cuda.py                                   # GPU machine with nvcc: build for its GPU, check
    python tools/check_cuda.py --build-only DIR --arch sm_90     # build host (nvcc, no GPU): artifacts into DIR
    python tools/check_cuda.py --artifacts DIR                   # GPU machine: check what --build-only wrote
    python tools/check_cuda.py --fc-precision fp32,int8,bf16 ...  # also the models' int8 / bf16 FC builds

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
With --fc-precision int8 or bf16 (reccc's --fc-precision, FC layers on the tensor cores), or at -O3
(whose tables are int8 or fp16 by default), the artifact is checked against onnxruntime's run of the
graph reccc's lossy passes rewrote (which the build writes beside it), and its outputs' deviation
from the fp32 model is reported beside that graph's; onnxruntime's timings are of the fp32 model,
the baseline. Such a build agrees when each output is within reccc's fp32 tolerance of that run, or
within half of the graph's own deviation from the fp32 model (RE_ROUNDING_SHARE): the GPU's fused multiply-adds and the tensor cores' summation order move
intermediate values by an ulp, and where one crosses a rounding boundary of a later layer's bf16
activation or int8 code, the output moves by that rounding, which is the quantization's own error.

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
# The standard DLRM's MLPs with 1024-row tables (2 MB instead of 205 MB): GPU time at batch 64 and up
# is the MLPs', and its artifacts (weights embedded) in three FC precisions, with their models, stay
# small enough to copy to a GPU machine.
GPU_DLRM = {**STANDARD_MODEL, "rows": 1024}
BUILD_INDEX = "build.json"
PRECISIONS = ("fp32", "int8", "bf16")
RE_ROUNDING_SHARE = 0.5
INPUT_SEED = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run reccc's CUDA artifacts on this GPU against onnxruntime.")
    parser.add_argument("models", nargs="*", type=Path, help="ONNX models (default: testsuite/models/*.onnx and GPU_DLRM)")
    parser.add_argument("--arch", help="CUDA arch to compile for, e.g. sm_90 (default: this GPU's; required with --build-only)")
    parser.add_argument("-O", dest="opt_level", type=int, default=2, help="reccc optimization level (default: 2)")
    parser.add_argument("--build-only", type=Path, metavar="DIR", help="only build: write the artifacts and their models into DIR")
    parser.add_argument("--artifacts", type=Path, metavar="DIR", help="check the artifacts a --build-only run wrote into DIR")
    parser.add_argument("--fc-precision", type=precision_list, default=["fp32"], metavar="LIST",
                        help="comma-separated FC precisions to build each model in: fp32, int8, bf16 (default: fp32)")
    parser.add_argument("--batches", type=batch_list, default=[1, 64, 2048], help="comma-separated batch sizes (default: 1,64,2048)")
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per engine and batch (default: 50)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "bench-results" / "check-cuda.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.build_only and args.artifacts:
        parser.error("--build-only and --artifacts are the two halves of one check: give one")
    if args.build_only and not args.arch:
        parser.error("--build-only needs --arch (no GPU to read it from)")
    if args.artifacts and (args.models or args.arch or args.fc_precision != ["fp32"]):
        parser.error("--artifacts checks what was built: models, --arch and --fc-precision were given to --build-only")
    return args


def precision_list(text: str) -> list[str]:
    precisions = text.split(",")
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"precisions must be among {', '.join(PRECISIONS)}, not {text!r}")
    return precisions


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


def build(models: list[Path], arch: str, opt_level: int, precisions: list[str], folder: Path) -> dict:
    """Compile each model for `arch` in each FC precision into `folder`, beside a copy of the model and,
    for a lossy build (int8 / bf16 FC layers, -O3's int8 / fp16 tables), the graph reccc rewrote (the reference);
    returns the build index."""
    import reccc
    from reccc.pipelines import DEFAULT_EMBEDDING_FORMAT

    folder.mkdir(parents=True, exist_ok=True)
    if not models:
        import testmodels

        generated = folder / "dlrm_gpu.onnx"
        onnx.save(testmodels.dlrm(**GPU_DLRM), str(generated))
        models = [*BUNDLED_MODELS, generated]
    target = json.dumps({"kind": "cuda", "arch": arch})
    built = []
    for path in models:
        model = folder / path.name
        if path.resolve() != model.resolve():
            shutil.copyfile(path, model)
        for precision in precisions:
            artifact, reference = folder / f"{path.stem}.{precision}.so", model
            options = {} if precision == "fp32" else {"fc_precision": precision}
            if options or DEFAULT_EMBEDDING_FORMAT[opt_level]:  # a lossy build: -O3 quantizes the tables
                reference = folder / f"{path.stem}.{precision}.onnx"
                reccc.compile(str(path), str(reference), emit="onnx", opt_level=opt_level, **options)
            reccc.compile(str(path), str(artifact), target=target, opt_level=opt_level, **options)
            print(f"built {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
            built.append({"model": model.name, "precision": precision, "reference": reference.name, "artifact": artifact.name})
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


def check_batch(artifact: Path, compiled, fp32_model: onnx.ModelProto, reference: onnx.ModelProto, ir_model, sessions: dict, batch: int, repeat: int) -> dict:
    from reccc.reference import agreement, run_reference
    from reccc.sample_inputs import random_inputs

    feeds = random_inputs(ir_model, batch, seed=INPUT_SEED)
    engines = [Engine("reccc", lambda: compiled.run(feeds)), on_gpu_engine(artifact, compiled, feeds)]
    engines += [session_engine(name, session, feeds) for name, session in sessions.items() if session is not None]
    results = {engine.name: warm_up(engine) for engine in engines}
    expected = run_reference(reference, feeds)
    checked = agreement(expected, results["reccc"])
    fp32_outputs = run_reference(fp32_model, feeds) if reference is not fp32_model else None
    if fp32_outputs is not None:
        graph_deviation = {name: _max_difference(expected[name], fp32) for name, fp32 in fp32_outputs.items()}
        # See the module's docstring: a lossy build may also differ by half its graph's own error.
        checked = {name: (error, max(bound, RE_ROUNDING_SHARE * graph_deviation[name])) for name, (error, bound) in checked.items()}
    time_interleaved(engines, repeat)
    medians = {engine.name: 1e3 * statistics.median(engine.seconds) for engine in engines}
    result = {
        "batch": batch,
        "median_ms": medians,
        "max_abs_error": {name: error for name, (error, _) in checked.items()},
        "allowed_error": {name: bound for name, (_, bound) in checked.items()},
        "agrees": all(error <= bound for error, bound in checked.values()),
    }
    if fp32_outputs is not None:
        result["max_abs_deviation_from_fp32"] = {name: _max_difference(results["reccc"][name], fp32) for name, fp32 in fp32_outputs.items()}
        result["graph_deviation_from_fp32"] = graph_deviation
    return result


def _max_difference(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected), initial=0.0))


def check_model(folder: Path, entry: dict, args: argparse.Namespace) -> dict:
    import reccc
    from reccc.ir import Model

    model, artifact = folder / entry["model"], folder / entry["artifact"]
    compiled = reccc.load(artifact)
    proto = onnx.load(str(model))
    reference = onnx.load(str(folder / entry["reference"])) if entry["reference"] != entry["model"] else proto
    ir_model = Model.from_onnx(proto, str(model))
    sessions = {"onnxruntime_cpu": onnxruntime_session(proto, threads=0), "onnxruntime_cuda": onnxruntime_cuda_session(proto)}
    batches = [check_batch(artifact, compiled, proto, reference, ir_model, sessions, batch, args.repeat) for batch in args.batches]
    return {"model": model.name, "precision": entry["precision"], "artifact_bytes": artifact.stat().st_size, "batches": batches}


def print_model(result: dict) -> None:
    print(f"\n{result['model']}, FC layers {result['precision']}")
    for batch in result["batches"]:
        timings = ", ".join(f"{name} {ms:.3f} ms" for name, ms in batch["median_ms"].items())
        errors = ", ".join(f"{name} {error:.3g} (allowed {batch['allowed_error'][name]:.3g})" for name, error in batch["max_abs_error"].items())
        verdict = "agrees" if batch["agrees"] else "DIFFERS from onnxruntime"
        deviation = batch.get("max_abs_deviation_from_fp32")
        lossy = f"; deviation from fp32 {max(deviation.values()):.3g}" if deviation else ""
        print(f"  batch {batch['batch']:>5}: {verdict}; max abs error {errors}{lossy}; median {timings}")


def check(folder: Path, index: dict, gpu: dict, args: argparse.Namespace) -> int:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("check_cuda: onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); timing the CPU provider only")
    results = []
    for entry in index["models"]:
        results.append(check_model(folder, entry, args))
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
        build(args.models, args.arch, args.opt_level, args.fc_precision, args.build_only)
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
        index = build(args.models, arch, args.opt_level, args.fc_precision, Path(scratch))
        return check(Path(scratch), index, gpu, args)


if __name__ == "__main__":
    sys.exit(main())
