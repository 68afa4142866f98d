"""Does concat-fc-fusion pay off in TVM? Concat + one GEMM against the pass's rewrites, timed.

    python tools/bench_concat_fc.py                            # the standard DLRM-style model and the bundled small one
    python tools/bench_concat_fc.py --models small --batches 1,64 --repeat 20
    python tools/bench_concat_fc.py --models sweep             # synthetic Concat(n x [batch, d]) -> Gemm(N) layers

For each model, artifacts are compiled with reccc.compile(..., opt_level=2, passes=...):
  concat     constant-folding, dead-code-elimination
  fusion     constant-folding, concat-fc-fusion, dead-code-elimination     (the pass with its default cost model)
  fold-all   ... concat-fc-fusion-fold-all ...   (max_widening=None: fold every lookup the table-size rule allows)
  split-all  ... concat-fc-fusion-split-all ...  (max_widening=None, split_unfolded=True: also one GEMM per other input)
(the last two are registered by this script only, to measure what the default cost model rules out). A
variant whose pass leaves the model unchanged, or makes the same graph as an earlier variant, is not
compiled again and is reported as such ("same_as"). reccc.load(artifact).run(feeds) is timed on the same random
valid inputs (reccc.sample_inputs), interleaved (each round runs every engine once, in an order drawn
per round: tools/round_order.py), after warm-up runs. An engine stops after --repeat timed runs, or once its timed
runs add up to --budget seconds, but never before --min-runs. Every artifact's outputs are checked
against onnxruntime on the original model. The JSON (bench-results/bench-concat-fc.json by default)
holds every timing, medians, the ratios to concat, and the pass's fold/keep decisions.

Models:
  standard  tools/testmodels.dlrm(tables=8, rows=100_000, dim=64, dense=13, bottom=(512, 256), top=(512, 256)):
            the tables are too large to fold, so `fusion` keeps the model and `split-all` makes 9 partial GEMMs
  small     testsuite/models/dlrm.onnx (4 tables 1000x16: every lookup folds into a 1000x64 table)
  bundled   testsuite/models/wide_and_deep.onnx and two_tower.onnx
  sweep     Relu(x_i) for n inputs [batch, d], Concat, Gemm(N, transB=1, bias), Relu, for several (n, d, N);
            and Concat(Relu(dense), k lookups in 500 x dim tables), Gemm(N, transB=1, bias), Relu, for several (k, dim, N)

This machine may be shared: run it on a quiet one, and trust ratios within one run (interleaved) more
than absolute times across runs.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))  # bench.py and testmodels.py are scripts beside this one

from bench import STANDARD_MODEL, machine_info, set_tvm_threads, tvm_runtime_threads, versions  # noqa: E402
from round_order import round_order  # noqa: E402

# Variants of the pass registered by this script only, to measure what the default cost model rules out.
BENCH_PASSES = {
    "fold-all": ("concat-fc-fusion-fold-all", {"max_widening": None}),
    "split-all": ("concat-fc-fusion-split-all", {"max_widening": None, "split_unfolded": True}),
}
VARIANTS = {
    "concat": ["constant-folding", "dead-code-elimination"],
    "fusion": ["constant-folding", "concat-fc-fusion", "dead-code-elimination"],
    **{variant: ["constant-folding", name, "dead-code-elimination"] for variant, (name, _) in BENCH_PASSES.items()},
}
MODELS = ("standard", "small", "bundled", "sweep")
# (inputs n, width d, output width N) of the synthetic layers over computed inputs (nothing folds).
SWEEP = [(2, 64, 512), (9, 64, 512), (4, 128, 256), (8, 16, 64), (26, 1, 256), (26, 4, 256)]
# (lookups k, table dim, output width N) of the synthetic layers over a dense input and k lookups in
# tables of LOOKUP_ROWS rows (small enough that every lookup folds).
LOOKUP_SWEEP = [(4, 16, 64), (8, 1, 256), (8, 4, 256), (8, 8, 16), (8, 8, 32), (8, 8, 64), (8, 8, 256), (8, 16, 32),
                (8, 16, 256), (8, 16, 512), (8, 32, 128), (8, 32, 256), (8, 32, 512), (8, 64, 256), (26, 8, 128)]
LOOKUP_ROWS, LOOKUP_DENSE = 500, 13
WARMUP_RUNS = 3
INPUT_SEED = 0


@dataclass
class Engine:
    name: str
    run: object
    seconds: list[float] = field(default_factory=list)

    def wants_more(self, repeat: int, min_runs: int, budget: float) -> bool:
        if len(self.seconds) < min_runs:
            return True
        return len(self.seconds) < repeat and sum(self.seconds) < budget


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time concat + GEMM against concat-fc-fusion's rewrites in TVM.")
    parser.add_argument("--models", default="standard,small", help=f"comma-separated, of {', '.join(MODELS)} (default: standard,small)")
    parser.add_argument("--batches", default="1,64,2048", help="comma-separated batch sizes (default: 1,64,2048)")
    parser.add_argument("--repeat", type=int, default=100, help="timed runs per engine and batch at most (default: 100)")
    parser.add_argument("--min-runs", type=int, default=10, help="timed runs per engine and batch at least (default: 10)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs after which an engine stops, "
                        "once it has --min-runs (default: 20)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="TVM runtime threads unless TVM_NUM_THREADS is set (default: all cores)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "bench-results" / "bench-concat-fc.json")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m not in MODELS for m in args.models):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.min_runs < 1 or args.repeat < args.min_runs or any(b < 1 for b in args.batches):
        parser.error("need 1 <= --min-runs <= --repeat and positive batch sizes")
    return args


def register_bench_passes() -> None:
    from reccc.pass_manager import register_pass
    from reccc.passes.concat_fc_fusion import ConcatFcFusion
    from reccc.plugins import PASS_GROUP, load_entry_points

    load_entry_points(PASS_GROUP)
    for pass_name, params in BENCH_PASSES.values():
        register_pass(type(pass_name, (ConcatFcFusion,), {
            "name": pass_name,
            "summary": f"concat-fc-fusion with {params} (tools/bench_concat_fc.py only)",
            "__init__": lambda self, params=params: ConcatFcFusion.__init__(self, **params),
        }))


def sweep_layer(n: int, d: int, width: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info(f"x_{i}", TensorProto.FLOAT, ["batch", d]) for i in range(n)]
    nodes = [helper.make_node("Relu", [f"x_{i}"], [f"r_{i}"]) for i in range(n)]
    nodes.append(helper.make_node("Concat", [f"r_{i}" for i in range(n)], ["joined"], axis=1))
    weight = numpy_helper.from_array((rng.standard_normal((width, n * d)) / np.sqrt(n * d)).astype(np.float32), "w")
    bias = numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), "b")
    nodes += [helper.make_node("Gemm", ["joined", "w", "b"], ["fc"], transB=1), helper.make_node("Relu", ["fc"], ["y"])]
    graph = helper.make_graph(nodes, f"concat{n}x{d}_N{width}", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def sweep_lookup_layer(k: int, dim: int, width: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", LOOKUP_DENSE])]
    inputs += [helper.make_tensor_value_info(f"ids_{i}", TensorProto.INT64, ["batch"]) for i in range(k)]
    tables = [numpy_helper.from_array((0.05 * rng.standard_normal((LOOKUP_ROWS, dim))).astype(np.float32), f"emb_{i}") for i in range(k)]
    nodes = [helper.make_node("Relu", ["dense"], ["dense_relu"])]
    nodes += [helper.make_node("Gather", [f"emb_{i}", f"ids_{i}"], [f"emb_out_{i}"], axis=0) for i in range(k)]
    nodes.append(helper.make_node("Concat", ["dense_relu", *[f"emb_out_{i}" for i in range(k)]], ["joined"], axis=1))
    depth = LOOKUP_DENSE + k * dim
    weight = numpy_helper.from_array((rng.standard_normal((width, depth)) / np.sqrt(depth)).astype(np.float32), "w")
    bias = numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), "b")
    nodes += [helper.make_node("Gemm", ["joined", "w", "b"], ["fc"], transB=1), helper.make_node("Relu", ["fc"], ["y"])]
    graph = helper.make_graph(nodes, f"lookups{k}x{dim}_N{width}", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], [*tables, weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def model_files(name: str, scratch: Path) -> list[tuple[str, Path, dict]]:
    if name == "small":
        return [("small", REPO_ROOT / "testsuite" / "models" / "dlrm.onnx", {"path": "testsuite/models/dlrm.onnx"})]
    if name == "bundled":
        return [(stem, REPO_ROOT / "testsuite" / "models" / f"{stem}.onnx", {"path": f"testsuite/models/{stem}.onnx"})
                for stem in ("wide_and_deep", "two_tower")]
    if name == "standard":
        from testmodels import dlrm

        path = scratch / "dlrm-standard.onnx"
        onnx.save(dlrm(**STANDARD_MODEL), str(path))
        return [("standard", path, {"built": "tools/testmodels.py dlrm", "config": STANDARD_MODEL})]
    models = []
    for n, d, width in SWEEP:
        label = f"concat{n}x{d}-N{width}"
        path = scratch / f"{label}.onnx"
        onnx.save(sweep_layer(n, d, width), str(path))
        models.append((label, path, {"built": "tools/bench_concat_fc.py sweep_layer", "inputs": n, "width": d, "output_width": width}))
    for k, dim, width in LOOKUP_SWEEP:
        label = f"lookups{k}x{dim}-N{width}"
        path = scratch / f"{label}.onnx"
        onnx.save(sweep_lookup_layer(k, dim, width), str(path))
        models.append((label, path, {"built": "tools/bench_concat_fc.py sweep_lookup_layer", "lookups": k, "dim": dim,
                                     "rows": LOOKUP_ROWS, "dense": LOOKUP_DENSE, "output_width": width}))
    return models


def rewrite(proto: onnx.ModelProto, pass_name: str) -> tuple[bool, list[str], bytes]:
    """Whether `pass_name` changes the model after constant folding, its details() lines, and the result."""
    from reccc.ir import Model
    from reccc.pass_manager import create_pass

    model = Model.from_onnx(proto)
    create_pass("constant-folding")(model)
    fusion = create_pass(pass_name)
    changed = fusion(model)
    return changed, fusion.details(), model.to_onnx().graph.SerializeToString()


def interleave(engines: list[Engine], args: argparse.Namespace) -> None:
    round_number = 0
    while any(e.wants_more(args.repeat, args.min_runs, args.budget) for e in engines):
        for engine in round_order(engines, round_number):
            if engine.wants_more(args.repeat, args.min_runs, args.budget):
                start = time.perf_counter()
                engine.run()
                engine.seconds.append(time.perf_counter() - start)
        round_number += 1


def bench_model(label: str, path: Path, description: dict, args: argparse.Namespace, scratch: Path) -> dict:
    import reccc
    from reccc.ir import Model
    from reccc.reference import agreement, run_reference
    from reccc.sample_inputs import random_inputs

    proto = onnx.load(str(path))
    ir_model = Model.from_onnx(proto)
    description["parameter_bytes"] = ir_model.parameter_bytes()
    print(f"\n== {label}: {path.name}, {description['parameter_bytes'] / 1e6:.1f} MB of parameters", flush=True)
    rewrites, graphs = {}, {}
    for variant, passes in VARIANTS.items():
        if variant == "concat":
            continue
        changed, details, graphs[variant] = rewrite(proto, passes[1])
        rewrites[variant] = {"changed": changed, "details": details}
        for line in details if variant == "fusion" else details[:1]:
            print(f"  {variant}: {line}")

    compiled, compile_info = {}, {}
    for variant, passes in VARIANTS.items():
        same_as = None
        if variant != "concat" and not rewrites[variant]["changed"]:
            same_as = "concat"
        elif variant != "concat":
            same_as = next((other for other in compiled if other != "concat" and graphs[other] == graphs[variant]), None)
        if same_as is not None:
            compile_info[variant] = {"passes": passes, "same_as": same_as}
            print(f"  {variant:<9} is the same model as {same_as}", flush=True)
            continue
        artifact = scratch / f"{label}-{variant}.so"
        start = time.perf_counter()
        reccc.compile(str(path), str(artifact), target="x86", opt_level=2, passes=passes)
        seconds = time.perf_counter() - start
        compile_info[variant] = {"passes": passes, "seconds": seconds, "artifact_bytes": artifact.stat().st_size}
        compiled[variant] = reccc.load(artifact)
        print(f"  compiled {variant:<9} in {seconds:5.1f} s, {artifact.stat().st_size / 1e6:.1f} MB", flush=True)

    batches = []
    for batch in args.batches:
        feeds = random_inputs(ir_model, batch, seed=INPUT_SEED)
        expected = run_reference(proto, feeds)
        engines = [Engine(variant, (lambda m=model: m.run(feeds))) for variant, model in compiled.items()]
        errors = {}
        for engine in engines:
            for _ in range(WARMUP_RUNS):
                result = engine.run()
            checked = agreement(expected, {k: v for k, v in result.items() if k in expected})
            errors[engine.name] = {out: {"max_abs_error": e, "allowed": b} for out, (e, b) in checked.items()}
        interleave(engines, args)
        timings = {
            e.name: {"median_ms": 1e3 * statistics.median(e.seconds), "min_ms": 1e3 * min(e.seconds), "runs": len(e.seconds),
                     "all_ms": [round(1e3 * s, 4) for s in e.seconds]}
            for e in engines
        }
        base = timings["concat"]["median_ms"]
        ratios = {name: t["median_ms"] / base for name, t in timings.items() if name != "concat"}
        agrees = all(v["max_abs_error"] <= v["allowed"] for per in errors.values() for v in per.values())
        batches.append({"batch": batch, "engines": timings, "ratio_to_concat": ratios, "errors_vs_onnxruntime": errors, "agrees": agrees})
        listed = "  ".join(f"{name} {t['median_ms']:9.3f} ms ({t['runs']:>3})" for name, t in timings.items())
        ratio_text = "  ".join(f"{name}/concat {r:.3f}" for name, r in ratios.items())
        print(f"  batch {batch:>5}: {listed}   {ratio_text}{'' if agrees else '  WARNING: outputs differ from onnxruntime'}", flush=True)
    return {"model": description, "rewrites": rewrites, "compile": compile_info, "batches": batches}


def main(argv=None) -> None:
    args = parse_args(argv)
    threads_source = set_tvm_threads(args.threads)
    register_bench_passes()
    results = {}
    with tempfile.TemporaryDirectory(prefix="reccc-bench-concat-fc-") as folder:
        for name in args.models:
            for label, path, description in model_files(name, Path(folder)):
                results[label] = bench_model(label, path, description, args, Path(folder))
    report = {
        "machine": machine_info(),
        "versions": versions(),
        "threads": {"tvm_runtime": tvm_runtime_threads(), "tvm_source": threads_source},
        "variants": VARIANTS,
        "opt_level": 2,
        "repeat": args.repeat, "min_runs": args.min_runs, "budget_seconds": args.budget, "warmup_runs": WARMUP_RUNS,
        "models": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
