"""How long reccc takes to compile, as a build system runs it (`reccc MODEL -O2 -o OUT`, the process
included: Python start, TVM import, writing the library): a 26-table DLRM (Criteo's 26 categorical
features) at -O2, and at -O3 once tuning into an empty database and once rebuilding from it, with
fp32 tables (-O3 then differs from -O2 by the tuning alone) and with -O3's default tables (auto:
fp16 for this model's 16-value rows, see README's Embedding-table quantization).

    python tools/bench_compile.py                    # writes bench-results/compile.json
    python tools/bench_compile.py --tune-trials 256  # -O3's default budget for the first build
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

import testmodels
from bench import RESULTS_DIR, machine_info, versions

REPO_ROOT = Path(__file__).resolve().parent.parent
# Criteo-style DLRM scaled to this machine: 26 tables of 100k x 16 (166 MB), MLPs 13-512-256-64-16 and
# 512-256-1 as in DLRM's Criteo Kaggle configuration.
CRITEO_DLRM = {"tables": 26, "rows": 100_000, "dim": 16, "dense": 13, "bottom": (512, 256, 64), "top": (512, 256)}


def timed_compile(model: Path, output: Path, *options: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "reccc"), str(model), "-o", str(output), *options],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="Time reccc's compiles of a 26-table DLRM: -O2, -O3 tuning, -O3 cached rebuild.")
    parser.add_argument("--repeat", type=int, default=3, help="-O2 compiles and cached -O3 rebuilds to take the median of (default: 3)")
    parser.add_argument("--tune-trials", type=int, default=64, help="-O3's trials for the first build (default: 64)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "compile.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reccc-compile-") as folder:
        scratch = Path(folder)
        model = scratch / "dlrm26.onnx"
        onnx.save(testmodels.dlrm(**CRITEO_DLRM), str(model))
        output, tune_db = scratch / "dlrm26.so", scratch / "tune"
        o2 = [timed_compile(model, output, "-O2") for _ in range(args.repeat)]
        print(f"-O2: median {statistics.median(o2):.1f} s of {[round(s, 1) for s in o2]}", flush=True)
        # fp32 tables, so that -O3 differs from -O2 by the tuning only.
        o3_options = ["-O3", "--embedding-quant=none", f"--tune-db={tune_db}", f"--tune-trials={args.tune_trials}"]
        tuned = timed_compile(model, output, *o3_options)
        print(f"-O3 tuning {args.tune_trials} trials into an empty database: {tuned:.1f} s", flush=True)
        rebuilds = [timed_compile(model, output, *o3_options) for _ in range(args.repeat)]
        print(f"-O3 rebuild from the database: median {statistics.median(rebuilds):.1f} s of {[round(s, 1) for s in rebuilds]}")
        # -O3 as a user runs it: its default tables add their quantization, the accuracy check and
        # larger lookup kernels, and its hot kernels are not all the fp32 build's: its first build tunes
        # those into the same database.
        default_options = ["-O3", f"--tune-db={tune_db}", f"--tune-trials={args.tune_trials}"]
        default_tuned = timed_compile(model, output, *default_options)
        print(f"-O3 with its default tables, tuning what the fp32 build did not: {default_tuned:.1f} s", flush=True)
        default_rebuilds = [timed_compile(model, output, *default_options) for _ in range(args.repeat)]
        print(f"-O3 rebuild with its default tables: median {statistics.median(default_rebuilds):.1f} s of "
              f"{[round(s, 1) for s in default_rebuilds]}")
        report = {
            "machine": machine_info(), "versions": versions(), "model": {"built": "tools/testmodels.py dlrm", "config": CRITEO_DLRM,
                                                                        "bytes": model.stat().st_size},
            "O2_seconds": o2, "O3_tuning_seconds": tuned, "O3_tune_trials": args.tune_trials, "O3_cached_rebuild_seconds": rebuilds,
            "O3_default_tables_tuning_seconds": default_tuned, "O3_default_tables_rebuild_seconds": default_rebuilds,
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
