"""Benchmark a model compiled by reccc against onnxruntime and plain TVM on this CPU.

    python tools/bench.py                                   # the standard DLRM-style model, built in a temp dir
    python tools/bench.py testsuite/models/dlrm.onnx --batches 1,64 --repeat 10
    python tools/bench.py --levels 2 --no-plain-tvm         # -O2 only: no tuning

Engines, all fed the same random valid inputs (reccc.sample_inputs) in one process:
  onnxruntime    ORT_ENABLE_ALL with --threads intra-op threads, not spinning when idle (see onnxruntime_session)
  reccc_O2, reccc_O3
                 reccc.load(artifact).run(feeds) of the artifact built at that level: numpy in, numpy out,
                 inputs checked against the manifest. -O3 tunes with --tune-trials / --tune-time into a
                 fresh tuning database (so its compile time is the tuning's), or into --tune-db
  reccc_O2_vm_call, reccc_O3_vm_call
                 the same artifact's Relax VM "main" called on inputs already converted to TVM tensors,
                 so the difference to `reccc_O*` is the Python wrapper's overhead
  plain_tvm      tvm.compile(from_onnx(model)) with no reccc passes and no Relax pipeline, numpy in and out
Repetitions are interleaved (each round runs every engine once, in an order drawn per round:
tools/round_order.py), so drift in machine speed hits all engines alike. A repetition is as many calls
back to back as take REPETITION_S (counted from the warm-up), timed together: a call is their mean.

Beside the timings, in the same run: the machine's limits (tools/machine_limits.py: copy bandwidth,
numpy's fp32 GEMM rate) and each reccc build's hot kernels at every batch (tools/kernel_profile.py:
GFLOP/s of the matmuls against the GEMM rate, gathered GB/s of the lookups against the copy
bandwidth). Results go to bench-results/bench-<model>.json (bench.json for the standard models)
with a chart beside it (.png).
"""

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from kernel_profile import print_hot_kernels
from reccc.pipelines import EMBEDDING_FORMAT_CHOICES
from round_order import round_order

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench-results"

# The model of the TVM notes' speed table: 8 tables 100k x 64, MLPs 13-512-256-64 and 576-512-256-1.
STANDARD_MODEL = {"tables": 8, "rows": 100_000, "dim": 64, "dense": 13, "bottom": (512, 256), "top": (512, 256)}
# The standard models by name: tools/testmodels.py builder and its configuration. DeepFM as in its
# paper (Criteo's 26 fields, one shared 1M-row table of dim 16, MLP 400-400-400); a two-tower
# retrieval model with 1M-row tables of dim 64 and 256-128 towers.
STANDARD_MODELS = {
    "dlrm": ("dlrm", STANDARD_MODEL),
    "deepfm": ("deepfm", {"fields": 26, "rows": 1_000_000, "dim": 16, "hidden": (400, 400, 400)}),
    "two_tower": ("two_tower", {"rows": 1_000_000, "dim": 64, "dense": 32, "hidden": (256, 128)}),
}

WARMUP_RUNS = 3
# A timed repetition lasts at least this long. One call of a small model at batch 1 (30-60 us) timed
# alone varied 4x between repetitions on this project's VMs (a timer interrupt, a descheduled thread,
# caches the engine before left cold), so that 20 of them moved a median by 10%.
REPETITION_S = 0.01
# An engine stops repeating once its timed runs add up to this many seconds (and it has at least
# MIN_RUNS): plain TVM takes 1-2 s per run at batch 2048, where --repeat runs would take minutes.
ENGINE_BUDGET_S = 20.0
MIN_RUNS = 3
INPUT_SEED = 0


@dataclass
class Engine:
    name: str
    run: Callable[[], object]
    # Whether run() returns {output name: ndarray}, which is then checked against onnxruntime.
    returns_outputs: bool = True
    calls: int = 1  # calls per timed repetition (warm_up sets it)
    seconds: list[float] = field(default_factory=list)  # a call's time in each repetition
    timed_s: float = 0.0  # all repetitions' time

    def wants_more(self, repeat: int) -> bool:
        if len(self.seconds) >= repeat:
            return False
        return len(self.seconds) < MIN_RUNS or self.timed_s < ENGINE_BUDGET_S


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time reccc's compiled model against onnxruntime and plain TVM (tvm.compile, no reccc passes).",
    )
    parser.add_argument("model", nargs="?", type=Path, help="an .onnx model (default: the --standard models)")
    parser.add_argument("--standard", type=standard_list, default=list(STANDARD_MODELS),
                        help="without a model: the standard models to build (in a temp dir) and time, comma-separated, of "
                        f"{', '.join(STANDARD_MODELS)} (default: all; see STANDARD_MODELS for their sizes)")
    parser.add_argument("--batches", type=batch_list, default=[1, 64, 2048], help="comma-separated batch sizes (default: 1,64,2048)")
    parser.add_argument("--repeat", type=int, default=20, help="timed repetitions per engine and batch (default: 20; "
                        f"an engine stops early after {ENGINE_BUDGET_S:g} s of timed runs, but not before {MIN_RUNS})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="onnxruntime intra-op threads, and TVM's threads unless TVM_NUM_THREADS is set (default: all cores)")
    parser.add_argument("--levels", type=level_list, default=[2, 3], help="reccc optimization levels to compare, comma-separated (default: 2,3)")
    parser.add_argument("--tune-trials", type=int, default=256, help="-O3's tuning trials (default: 256, reccc's default)")
    parser.add_argument("--tune-time", type=float, default=600.0, help="-O3's tuning seconds (default: 600, reccc's default)")
    parser.add_argument("--embedding-quant", choices=EMBEDDING_FORMAT_CHOICES,
                        help="embedding table format at every level (default: each level's own: -O3's is auto, int8 or fp16 per table)")
    parser.add_argument("--tune-db", type=Path, help="-O3's tuning database (default: a fresh one, so -O3's compile time is the tuning's)")
    parser.add_argument("--json", type=Path, help="where to write the results, the chart beside it with suffix .png "
                        "(default: bench-results/bench-<model stem>.json, or bench.json for the standard models)")
    parser.add_argument("--no-plain-tvm", action="store_true", help="skip the plain TVM baseline (its compile and runs are slow)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        parser.error("--repeat and --threads must be at least 1")
    return args


def level_list(text: str) -> list[int]:
    levels = batch_list(text) if text else []
    if not levels or any(level not in (0, 1, 2, 3) for level in levels):
        raise argparse.ArgumentTypeError(f"expected comma-separated levels 0..3, not '{text}'")
    return levels


def standard_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in STANDARD_MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown standard model '{unknown[0]}' (known: {', '.join(STANDARD_MODELS)})")
    return names


def batch_list(text: str) -> list[int]:
    try:
        batches = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not '{text}'") from None
    if any(batch < 1 for batch in batches):
        raise argparse.ArgumentTypeError("batch sizes must be at least 1")
    return batches


def set_tvm_threads(threads: int) -> str:
    """Give TVM's runtime --threads threads unless TVM_NUM_THREADS is set; must run before TVM starts
    its thread pool. Without either, TVM takes half of hardware_concurrency on x86 (it assumes
    hyper-threading), which is 1 thread on a 2-core machine while onnxruntime gets 2."""
    if "TVM_NUM_THREADS" in os.environ:
        return f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']} (from the environment)"
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return f"TVM_NUM_THREADS={threads} (set by bench.py from --threads)"


def build_standard_model(name: str, folder: Path) -> Path:
    import testmodels

    builder, config = STANDARD_MODELS[name]
    path = folder / f"{name}-standard.onnx"
    onnx.save(getattr(testmodels, builder)(**config), str(path))
    return path


def machine_info() -> dict:
    cpu_model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_model": cpu_model, "cores": os.cpu_count()}


def versions() -> dict:
    import onnxruntime
    import tvm

    import reccc

    return {"reccc": reccc.__version__, "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__}


def tvm_runtime_threads() -> int:
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


def onnxruntime_session(model: onnx.ModelProto, threads: int):
    """onnxruntime as reccc's reference runs it (ORT_ENABLE_ALL), with `threads` intra-op threads that
    do not spin when idle: interleaved with TVM in one process, spinning onnxruntime threads take the
    cores from TVM's thread pool (and TVM's from them), which made medians 2-10x the minimum."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compile_with_reccc(model_path: Path, artifact: Path, opt_level: int, tuning: dict, embedding_quant: str | None,
                       vm_exec: str = "compiled") -> float:
    import reccc

    options = {**(tuning if opt_level == 3 else {}), **({"embedding_quant": embedding_quant} if embedding_quant else {})}
    start = time.perf_counter()
    reccc.compile(str(model_path), str(artifact), target="x86", opt_level=opt_level, vm_exec=vm_exec, **options)
    return time.perf_counter() - start


def compile_plain_tvm(model: onnx.ModelProto) -> tuple[Callable, float]:
    """The baseline: TVM's ONNX importer and tvm.compile's default pipeline for this host's CPU,
    kept in memory (no export); returns the VM's main function and the compile seconds."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from reccc.native_output import silenced_output
    from reccc.targets.x86 import host_cpu

    start = time.perf_counter()
    with silenced_output(enabled=True):  # TVM's gather warnings, as reccc silences them
        executable = tvm.compile(from_onnx(model), target=host_cpu().tvm_target())
    seconds = time.perf_counter() - start
    return relax.VirtualMachine(executable, tvm.cpu())["main"], seconds


def load_vm_main(artifact: Path) -> Callable:
    """The artifact's Relax VM entry point, loaded as reccc.load loads it (its constants on huge pages)
    but without reccc's runtime wrapper."""
    import tvm

    from reccc import huge_pages

    return huge_pages.virtual_machine(artifact, tvm.cpu())["main"]


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """The graph inputs in the order from_onnx makes them parameters of main (initializers excluded)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


@dataclass
class Build:
    """One reccc artifact under test: its level, the loaded model and its bare VM entry point."""

    level: int
    compiled: object
    vm_main: Callable


def make_engines(feeds: dict[str, np.ndarray], session, builds: list[Build], plain_main: Callable | None,
                 plain_inputs: list[str], plain_outputs: list[str]) -> list[Engine]:
    import tvm

    ort_outputs = [output.name for output in session.get_outputs()]

    def plain_tvm() -> dict[str, np.ndarray]:
        result = plain_main(*(tvm.runtime.tensor(feeds[name]) for name in plain_inputs))
        values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return {name: value.numpy() for name, value in zip(plain_outputs, values)}

    engines = [Engine("onnxruntime", lambda: dict(zip(ort_outputs, session.run(ort_outputs, feeds))))]
    for build in builds:
        # The raw VM call gets its TVM tensors made once, outside the timing.
        vm_arguments = [tvm.runtime.tensor(feeds[spec.name]) for spec in build.compiled.manifest.inputs]
        engines.append(Engine(f"reccc_O{build.level}", lambda build=build: build.compiled.run(feeds)))
        engines.append(Engine(f"reccc_O{build.level}_vm_call", lambda build=build, a=vm_arguments: build.vm_main(*a), returns_outputs=False))
    if plain_main is not None:
        engines.append(Engine("plain_tvm", plain_tvm))
    return engines


def warm_up(engine: Engine) -> object:
    """Run WARMUP_RUNS times (first-call allocation, page faults on the weights, thread-pool start) and
    set the engine's calls per repetition from its fastest; returns the last result."""
    fastest = float("inf")
    for _ in range(WARMUP_RUNS):
        start = time.perf_counter()
        result = engine.run()
        fastest = min(fastest, time.perf_counter() - start)
    engine.calls = max(1, math.ceil(REPETITION_S / fastest))
    return result


def time_interleaved(engines: list[Engine], repeat: int) -> None:
    """Fill each engine's `seconds`, round by round in each round's order (round_order), so a slow
    phase of the machine, or what an engine leaves behind for the next, is spread over all engines."""
    round_number = 0
    while any(engine.wants_more(repeat) for engine in engines):
        for engine in round_order(engines, round_number):
            if engine.wants_more(repeat):
                start = time.perf_counter()
                for _ in range(engine.calls):
                    engine.run()
                elapsed = time.perf_counter() - start
                engine.seconds.append(elapsed / engine.calls)
                engine.timed_s += elapsed
        round_number += 1


def errors_against_onnxruntime(engines: list[Engine], results: dict[str, object], budgets: dict[str, float]) -> tuple[dict, dict]:
    """Per engine that returns outputs, the max abs error of each output against onnxruntime's, and
    the error it is allowed: reccc's fp32 tolerance, or for a lossy build (`budgets`, by engine name:
    -O3's int8 tables, say) the accuracy budget its build was held to."""
    from reccc.reference import agreement

    errors, allowed = {}, {}
    for engine in engines:
        if engine.returns_outputs and engine.name != "onnxruntime":
            checked = agreement(results["onnxruntime"], results[engine.name])
            errors[engine.name] = {name: error for name, (error, _) in checked.items()}
            allowed[engine.name] = {name: budgets.get(engine.name, bound) for name, (_, bound) in checked.items()}
    return errors, allowed


def bench_batch(batch: int, ir_model, proto: onnx.ModelProto, session, builds: list[Build], plain_main, repeat: int) -> dict:
    from reccc.sample_inputs import random_inputs

    feeds = random_inputs(ir_model, batch, seed=INPUT_SEED)
    plain_outputs = [output.name for output in proto.graph.output]
    engines = make_engines(feeds, session, builds, plain_main, graph_input_names(proto), plain_outputs)
    budgets = {f"reccc_O{build.level}": build.compiled.manifest.accuracy["budget"] for build in builds if build.compiled.manifest.accuracy}
    errors, allowed = errors_against_onnxruntime(engines, {engine.name: warm_up(engine) for engine in engines}, budgets)
    time_interleaved(engines, repeat)
    timings = {
        engine.name: {
            "median_ms": 1e3 * statistics.median(engine.seconds),
            "min_ms": 1e3 * min(engine.seconds),
            "runs": len(engine.seconds),
            "calls_per_run": engine.calls,
            # In the order they ran, so a slow phase of the machine or interference between engines shows.
            "all_ms": [round(1e3 * seconds, 4) for seconds in engine.seconds],
        }
        for engine in engines
    }
    baseline = timings["onnxruntime"]["median_ms"]
    return {
        "batch": batch,
        "engines": timings,
        "ratio_to_onnxruntime": {name: t["median_ms"] / baseline for name, t in timings.items() if name != "onnxruntime"},
        "max_abs_error": errors,
        "allowed_error": allowed,
        "lossy_builds": sorted(budgets),
        "agrees": all(error <= allowed[engine][name] for engine, per_output in errors.items() for name, error in per_output.items()),
    }


def print_batch(result: dict) -> None:
    print(f"\nbatch {result['batch']}")
    print(f"  {'engine':<17} {'runs':>5} {'median ms':>11} {'min ms':>11} {'x onnxruntime':>14}")
    for name, timing in result["engines"].items():
        ratio = result["ratio_to_onnxruntime"].get(name)
        ratio_text = f"{ratio:.2f}" if ratio is not None else "1"
        print(f"  {name:<17} {timing['runs']:>5} {timing['median_ms']:>11.3f} {timing['min_ms']:>11.3f} {ratio_text:>14}")
    for engine, per_output in result["max_abs_error"].items():
        listed = ", ".join(f"{name} {error:.3g} (allowed {result['allowed_error'][engine][name]:.3g})" for name, error in per_output.items())
        lossy = " (lossy build: allowed its accuracy budget)" if engine in result["lossy_builds"] else ""
        print(f"  max abs error vs onnxruntime, {engine}{lossy}: {listed}")
    if not result["agrees"]:
        print("  WARNING: outputs differ from onnxruntime beyond what is allowed (fp32 tolerance, or a lossy build's budget)")
    for build, hot in result.get("hot_kernels", {}).items():
        print(f"  {build} hot kernels (instrumented runs):")
        print_hot_kernels(hot, indent="    ")


def run_benchmark(args: argparse.Namespace, model_path: Path, model_description: dict, limits: dict, scratch: Path) -> dict:
    import reccc
    from reccc.ir import Model

    proto = onnx.load(str(model_path))
    ir_model = Model.from_onnx(proto, str(model_path))
    model_description["parameter_bytes"] = ir_model.parameter_bytes()

    tuning = {"tune_trials": args.tune_trials, "tune_seconds": args.tune_time, "tune_db": str(args.tune_db or scratch / "tune"), "tune_progress": True}
    builds, compiles, artifacts = [], {}, {}
    for level in args.levels:
        artifact = scratch / f"{model_path.stem}-O{level}.so"
        print(f"compiling with reccc -O{level} ...", flush=True)
        seconds = compile_with_reccc(model_path, artifact, level, tuning, args.embedding_quant)
        builds.append(Build(level, reccc.load(artifact), load_vm_main(artifact)))
        compiles[f"reccc_O{level}"] = {"seconds": seconds, "artifact_bytes": artifact.stat().st_size}
        print(f"  {seconds:.1f} s, artifact {artifact.stat().st_size / 1e6:.1f} MB", flush=True)
        # The kernel profile times the VM's calls, which it sees only in a bytecode build (-O3's from the
        # tuning records just made: the same kernels).
        artifacts[level] = artifact.with_suffix(".bytecode.so")
        compile_with_reccc(model_path, artifacts[level], level, tuning, args.embedding_quant, vm_exec="bytecode")
    plain_main, plain_seconds = None, None
    if not args.no_plain_tvm:
        print("compiling plain TVM (tvm.compile, no reccc passes, no pipeline) ...", flush=True)
        plain_main, plain_seconds = compile_plain_tvm(proto)
        print(f"  {plain_seconds:.1f} s", flush=True)

    session = onnxruntime_session(proto, args.threads)
    print(f"threads: onnxruntime {args.threads}, TVM {tvm_runtime_threads()}", flush=True)
    batches = []
    for batch in args.batches:
        batches.append(bench_batch(batch, ir_model, proto, session, builds, plain_main, args.repeat))
        batches[-1]["hot_kernels"] = profile_builds(artifacts, ir_model, batch, limits)
        print_batch(batches[-1])
    return {"model": model_description, "compile": {**compiles, "plain_tvm_seconds": plain_seconds}, "batches": batches}


def profile_builds(artifacts: dict[int, Path], ir_model, batch: int, limits: dict) -> dict[str, list[dict]]:
    """Each build's hot kernels at this batch, rated against the machine's limits (untimed runs)."""
    from kernel_profile import PROFILE_RUNS, WARMUP_RUNS, profile_kernels, rate_hot_kernels
    from reccc.sample_inputs import random_inputs

    feeds = [random_inputs(ir_model, batch, seed=INPUT_SEED + run) for run in range(WARMUP_RUNS + PROFILE_RUNS)]
    return {f"reccc_O{level}": rate_hot_kernels(profile_kernels(artifact, feeds), limits) for level, artifact in artifacts.items()}


def print_limits(limits: dict) -> None:
    print(f"machine limits: copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s ({limits['threads']} threads), "
          f"numpy sgemm {limits['sgemm_flops_per_s'] / 1e9:.0f} GFLOP/s at {limits['sgemm_size']}^3", flush=True)


def main(argv: list[str] | None = None) -> None:
    from bench_chart import write_chart
    from machine_limits import measure

    args = parse_args(argv)
    tvm_threads_source = set_tvm_threads(args.threads)
    limits = measure(args.threads)
    print_limits(limits)
    models = []
    with tempfile.TemporaryDirectory(prefix="reccc-bench-") as folder:
        scratch = Path(folder)
        if args.model is not None:
            models.append(run_benchmark(args, args.model, {"name": args.model.stem, "path": str(args.model)}, limits, scratch))
        for name in args.standard if args.model is None else []:
            print(f"\n=== {name}: building the standard {name} model ...", flush=True)
            builder, config = STANDARD_MODELS[name]
            description = {"name": name, "built": f"tools/testmodels.py {builder}", "config": config}
            models.append(run_benchmark(args, build_standard_model(name, scratch), description, limits, scratch))

    report = {
        "machine": machine_info(),
        "versions": versions(),
        "threads": {"onnxruntime_intra_op": args.threads, "tvm_runtime": tvm_runtime_threads(), "tvm_source": tvm_threads_source},
        "limits": limits,
        "levels": args.levels,
        "embedding_quant": args.embedding_quant or "each level's default",
        "tuning": {"trials": args.tune_trials, "seconds": args.tune_time, "database": str(args.tune_db) if args.tune_db else "fresh"},
        "repeat": args.repeat,
        "warmup_runs": WARMUP_RUNS,
        "engine_budget_seconds": ENGINE_BUDGET_S,
        "models": models,
    }
    output = args.json or RESULTS_DIR / ("bench.json" if args.model is None else f"bench-{args.model.stem}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    chart = write_chart(report, output.with_suffix(".png"))
    print(f"\nwrote {output} and {chart}")


if __name__ == "__main__":
    main()
