"""Per model and optimization level: nodes and parameter bytes after the passes, compile time, and the
compiled artifact's max deviation from onnxruntime on the input model (batch 64).

    python tools/level_report.py [MODEL.onnx ...]      # default: the bundled testsuite models
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

import reccc
from reccc.ir import Model
from reccc.reference import agreement, run_reference
from reccc.sample_inputs import random_inputs

MODELS_DIR = Path(__file__).resolve().parent.parent / "testsuite" / "models"
BATCH = 64


def measure(model_path: Path, level: int, folder: Path) -> dict:
    optimized = folder / f"{model_path.stem}.O{level}.onnx"
    reccc.compile(model_path, optimized, opt_level=level, emit="onnx")
    ir = Model.from_onnx(onnx.load(optimized))
    artifact = folder / f"{model_path.stem}.O{level}.so"
    start = time.perf_counter()
    reccc.compile(model_path, artifact, opt_level=level)
    seconds = time.perf_counter() - start
    source = onnx.load(model_path)
    feeds = random_inputs(Model.from_onnx(source), BATCH, seed=7)
    checked = agreement(run_reference(source, feeds), reccc.load(artifact).run(feeds))
    return {
        "model": model_path.stem,
        "level": level,
        "nodes": len(ir.graph.nodes),
        "parameter_bytes": ir.parameter_bytes(),
        "compile_seconds": round(seconds, 2),
        "max_deviation": max(error for error, _ in checked.values()),
        "within_fp32_bound": all(error <= bound for error, bound in checked.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="ONNX models (default: testsuite/models/*.onnx)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    models = args.models or sorted(MODELS_DIR.glob("*.onnx"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="reccc-levels-") as folder:
        for model_path in models:
            source = Model.from_onnx(onnx.load(model_path))
            print(f"{model_path.stem}: input {len(source.graph.nodes)} nodes, {source.parameter_bytes()} parameter bytes")
            for level in range(4):
                row = measure(model_path, level, Path(folder))
                rows.append(row)
                print(
                    f"  -O{level}: {row['nodes']:>3} nodes {row['parameter_bytes']:>9} B  compile {row['compile_seconds']:>5.2f} s"
                    f"  max deviation {row['max_deviation']:.2g}{'' if row['within_fp32_bound'] else '  OUTSIDE THE FP32 BOUND'}"
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    sys.exit(0 if all(row["within_fp32_bound"] for row in rows) else 1)


if __name__ == "__main__":
    main()
