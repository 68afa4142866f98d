"""Benchmark embedding-table quantization: artifact size, accuracy and lookup speed of fp32, int8,
int4 and fp16 tables, all compiled by reccc at -O2 in one process.

    python tools/bench_embedding_quant.py                          # 8 tables x 250k x 64 (512 MB fp32)
    python tools/bench_embedding_quant.py --rows 1000000 --formats int8 --no-accuracy --weights external
                                                                   # 8 x 1M x 64: 2 GB fp32, past the caches

Two models, built in a temp dir by tools/testmodels.py with tables drawn from N(0, 1/dim):
  dlrm      DLRM-style, tables >= 95% of the bytes: artifact size and the max abs deviation of its
            sigmoid output from the fp32 model in onnxruntime, on --rows-checked generated rows
  lookups   the same tables and ids with nothing but the lookups and their concat as output, so its
            latency is the lookups' own: rows looked up per second = batch x tables / latency
Latency repetitions are interleaved over the formats (one round runs each once) and the median is
reported. Results go to bench-results/embedding_quant.json. --no-accuracy skips the dlrm model (its
compiles and its onnxruntime reference), for tables whose lookups alone take the memory and time.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import testmodels  # noqa: E402

FORMATS = ("none", "int8", "int4", "fp16")
WARMUP_CHUNK = 65536


def lookups_only(dlrm: onnx.ModelProto) -> onnx.ModelProto:
    """The DLRM's embedding lookups alone, joined by a Concat that is the only output."""
    graph = dlrm.graph
    gathers = [node for node in graph.node if node.op_type == "Gather" and node.input[1].startswith("cat_")]
    tables = {node.input[0] for node in gathers}
    joined = helper.make_node("Concat", [node.output[0] for node in gathers], ["embedded"], axis=1)
    dim = next(t.dims[1] for t in graph.initializer if t.name in tables)
    model = helper.make_model(
        helper.make_graph(
            [*gathers, joined], "lookups",
            [i for i in graph.input if i.name.startswith("cat_")],
            [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", dim * len(gathers)])],
            [t for t in graph.initializer if t.name in tables],
        ),
        opset_imports=list(dlrm.opset_import),
    )
    model.ir_version = dlrm.ir_version
    return model


def median_latencies(artifacts: dict, feeds: dict, repeat: int, rows: int) -> dict[str, float]:
    import reccc

    models = {name: reccc.load(path) for name, path in artifacts.items()}
    for model in models.values():
        # Every row of every table once, so that no timed run pays for a first touch of a page (with
        # --weights external the tables are mapped from their file, page by page).
        for start in range(0, rows, WARMUP_CHUNK):
            model.run({name: np.arange(start, min(start + WARMUP_CHUNK, rows), dtype=ids.dtype) for name, ids in feeds.items()})
        model.run(feeds)
    seconds = {name: [] for name in models}
    for _ in range(repeat):
        for name, model in models.items():
            start = time.perf_counter()
            model.run(feeds)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batches", default="64,2048")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rows-checked", type=int, default=4096, help="generated rows the accuracy is measured on")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, from {','.join(FORMATS)} (none: fp32, the baseline, always runs)")
    parser.add_argument("--no-accuracy", action="store_true", help="lookup latency only: skip the dlrm model's size and accuracy")
    parser.add_argument("--weights", choices=("embed", "external"), default="embed",
                        help="reccc's --weights: external keeps GB-sized tables out of the compile's memory")
    args = parser.parse_args()
    formats = ["none", *(f for f in args.formats.split(",") if f != "none")]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"--formats: unknown format '{unknown[0]}'")

    import reccc
    from reccc.ir import Model
    from reccc.reference import run_reference
    from reccc.sample_inputs import random_inputs

    results = {
        "machine": platform.processor() or platform.machine(),
        "model": {"tables": args.tables, "rows": args.rows, "dim": args.dim, "table_std": args.dim**-0.5},
        "formats": {},
    }
    with tempfile.TemporaryDirectory(prefix="reccc-bench-") as scratch:
        scratch = Path(scratch)
        dlrm = testmodels.dlrm(tables=args.tables, rows=args.rows, dim=args.dim, bottom=(128,), top=(256, 64),
                               table_std=args.dim**-0.5, seed=0)
        sources = {"lookups": scratch / "lookups.onnx"} if args.no_accuracy else {"dlrm": scratch / "dlrm.onnx", "lookups": scratch / "lookups.onnx"}
        if not args.no_accuracy:
            onnx.save(dlrm, sources["dlrm"])
        onnx.save(lookups_only(dlrm), sources["lookups"])
        artifacts: dict[str, dict[str, Path]] = {kind: {} for kind in sources}
        batches = [int(b) for b in args.batches.split(",")]
        lookup_model = Model.from_onnx(onnx.load(sources["lookups"]))
        feeds = {batch: random_inputs(lookup_model, batch, seed=batch) for batch in batches}
        del lookup_model  # GB-sized models stay on disk only while the compiles run
        if args.no_accuracy:
            del dlrm
        for kind, source in sources.items():
            for format in formats:
                path = scratch / f"{kind}.{format}.so"
                start = time.perf_counter()
                # One process per compile: its peak memory (model copies, the accuracy guard's
                # onnxruntime sessions) is returned before the next one starts.
                subprocess.run([sys.executable, "-m", "reccc", str(source), "-O2", f"--embedding-quant={format}",
                                f"--weights={args.weights}", "-o", str(path)], check=True)
                artifacts[kind][format] = path
                print(f"compiled {kind} {format}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s", file=sys.stderr)

        for format in formats:
            results["formats"][format] = {"lookups": {}}
        if not args.no_accuracy:
            checked = random_inputs(Model.from_onnx(dlrm), args.rows_checked, seed=99)
            expected = run_reference(dlrm, checked)["ctr"]
            fp32_size = artifacts["dlrm"]["none"].stat().st_size
            for format in formats:
                actual = reccc.load(artifacts["dlrm"][format]).run(checked)["ctr"]
                size = artifacts["dlrm"][format].stat().st_size
                results["formats"][format].update({
                    "artifact_bytes": size,
                    "artifact_ratio": size / fp32_size,
                    "max_abs_deviation": float(np.max(np.abs(actual - expected))),
                    "mean_abs_deviation": float(np.mean(np.abs(actual - expected))),
                })
        for batch in batches:
            latencies = median_latencies(artifacts["lookups"], feeds[batch], args.repeat, args.rows)
            for format, seconds in latencies.items():
                results["formats"][format]["lookups"][str(batch)] = {
                    "median_ms": seconds * 1e3,
                    "rows_per_second": batch * args.tables / seconds,
                    "vs_fp32": seconds / latencies["none"],
                }

    out = REPO_ROOT / "bench-results" / "embedding_quant.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"{'format':<8}{'size':>8}{'max dev':>11}" + "".join(f"{'lookups b=' + b:>22}" for b in args.batches.split(",")))
    for format, row in results["formats"].items():
        speeds = "".join(f"{row['lookups'][b]['median_ms']:>10.3f} ms ({row['lookups'][b]['vs_fp32']:.2f}x)" for b in args.batches.split(","))
        accuracy = f"{row['artifact_ratio']:>7.3f}x{row['max_abs_deviation']:>11.2e}" if "artifact_ratio" in row else f"{'-':>8}{'-':>11}"
        print(f"{format:<8}{accuracy}{speeds}")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
