"""How fast this machine can gather the rows of the standard models' embedding lookups at all: a plain
C loop (gather_ceiling.c: one memcpy per row, OpenMP threads, optionally prefetching ahead) over a
table of the model's size, at batch 2048, beside the copy bandwidth that tools/bench.py rates lookups
against (tools/kernel_profile.py). A random row is fetched at memory latency, not at the streaming
copy's rate, and a row of 64 bytes (DeepFM's 16 floats) is one cache line: this says how much of the
copy bandwidth a lookup of the model's rows can reach at all.

    python tools/gather_ceiling.py            # writes bench-results/gather_ceiling.json
    python tools/gather_ceiling.py --models deepfm --threads 2
"""

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from bench import RESULTS_DIR, STANDARD_MODELS, machine_info
from machine_limits import copy_bandwidth

SOURCE = Path(__file__).resolve().parent / "gather_ceiling.c"
BATCH = 2048
PREFETCH_DISTANCES = (0, 16, 32)  # rows ahead; 0: no prefetch
REPEATS = 21


def lookup_shape(name: str, config: dict, batch: int) -> tuple[int, int, int]:
    """The rows of all the model's tables, the floats of a row, and the rows a batch gathers."""
    if name == "dlrm":
        return config["tables"] * config["rows"], config["dim"], config["tables"] * batch
    if name == "deepfm":  # one table of every field's rows, a row per field
        return config["rows"], config["dim"], config["fields"] * batch
    if name == "two_tower":  # a user table and an item table, a row of each
        return 2 * config["rows"], config["dim"], 2 * batch
    raise ValueError(f"no lookup shape for model '{name}'")


def build(folder: Path) -> Path:
    binary = folder / "gather_ceiling"
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", "-fopenmp", str(SOURCE), "-o", str(binary)], check=True)
    return binary


def gather_seconds(binary: Path, rows: int, dim: int, lookups: int, threads: int, prefetch: int, repeats: int = REPEATS) -> float:
    """Median seconds of one gather of `lookups` random rows."""
    result = subprocess.run([str(binary), str(rows), str(dim), str(lookups), str(threads), str(prefetch), str(repeats)],
                            check=True, capture_output=True, text=True)
    return float(result.stdout)


def measure(models: list[str], threads: int, batch: int = BATCH) -> dict:
    copy = copy_bandwidth(threads)
    results = {"machine": machine_info(), "threads": threads, "batch": batch, "copy_bytes_per_s": copy, "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        binary = build(Path(scratch))
        for name in models:
            rows, dim, lookups = lookup_shape(name, STANDARD_MODELS[name][1], batch)
            gathered = lookups * dim * 4
            rates = {}
            for prefetch in PREFETCH_DISTANCES:
                seconds = gather_seconds(binary, rows, dim, lookups, threads, prefetch)
                # read once and written once, as a copy's bytes are: the measure tools/kernel_profile.py rates lookups by
                rates[f"prefetch_{prefetch}"] = {"gathered_gb_per_s": gathered / seconds / 1e9, "of_copy_bandwidth": 2 * gathered / seconds / copy}
            results["models"][name] = {"table_rows": rows, "row_floats": dim, "rows_gathered": lookups, "rates": rates}
            best = max(rate["of_copy_bandwidth"] for rate in rates.values())
            print(f"{name}: {rows} rows of {dim} floats, {lookups} gathered: at best {best:.0%} of copy bandwidth "
                  f"({copy / 1e9:.1f} GB/s); " + ", ".join(f"{key} {rate['gathered_gb_per_s']:.1f} GB/s" for key, rate in rates.items()),
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure the fastest random-row gather of the standard models' lookups "
                                                 "(a plain C loop) against this machine's copy bandwidth.")
    parser.add_argument("--models", type=lambda text: text.split(","), default=list(STANDARD_MODELS),
                        help=f"comma-separated: {', '.join(STANDARD_MODELS)} (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (default: every core)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "gather_ceiling.json")
    args = parser.parse_args()
    unknown = [name for name in args.models if name not in STANDARD_MODELS]
    if unknown:
        parser.error(f"unknown model '{unknown[0]}' (known: {', '.join(STANDARD_MODELS)})")
    results = measure(args.models, args.threads)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
