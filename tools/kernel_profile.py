"""Time each kernel of a compiled reccc artifact, and rate the hot ones against the machine's limits.

The Relax VM calls an instrument before and after every call it makes; timing between the two gives
each kernel's time (a few microseconds of instrument overhead each, so batch-1 kernel times are upper
bounds). The VM calls the instrument only when it interprets the model function: profile an artifact
built with `--vm-exec=bytecode` (reccc's default compiles it to native code, which calls kernels
directly). A matmul kernel (its name says matmul, its output is [M, N], its widest [M, K] argument the
activations) does 2*M*N*K FLOPs; a gather kernel (its name says take or lookup) moves the bytes of its output. Runs are
separate from the end-to-end timings: the instrument slows the whole call.

    reccc model.onnx --vm-exec=bytecode -o model.so
    python tools/kernel_profile.py model.so model.onnx --batch 2048
"""

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

PROFILE_RUNS = 10
WARMUP_RUNS = 2
# A kernel is hot when it takes at least this share of the kernel time.
HOT_SHARE = 0.05


def _shape(value) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _work(name: str, shapes: list[tuple[int, ...] | None]) -> dict:
    """FLOPs of a matmul kernel or bytes of a gather kernel from its argument shapes ({} if neither)."""
    tensors = [s for s in shapes if s is not None]
    if len(tensors) < 2:
        return {}
    output = tensors[-1]
    # A matmul's activations are its widest [M, K] argument: an int8 kernel's first ones are its rows'
    # [M, 1] ranges, its weight is packed.
    activations = [shape for shape in tensors[:-1] if len(shape) == 2 and len(output) == 2 and shape[0] == output[0]]
    if "matmul" in name and activations:
        return {"flops": 2 * output[0] * output[1] * max(shape[1] for shape in activations)}
    if "take" in name or "lookup" in name:
        return {"gathered_elements": int(np.prod(output))}
    return {}


def profile_kernels(artifact: Path, feeds: list[dict[str, np.ndarray]], runs: int = PROFILE_RUNS) -> list[dict]:
    """Per kernel name: calls per run, median ms per run (summed over its calls), and its work. Run i
    takes feeds[i % len(feeds)]: with as many feeds as runs, every run looks up rows the others did not
    (a serving process's case; repeating one batch would time lookups of rows left in the caches)."""
    import tvm

    from reccc import host_cpu, huge_pages
    from reccc.manifest import read_manifest

    manifest = read_manifest(artifact)
    host_cpu.prepare_to_run(manifest.cpu_flags, artifact)  # AMX kernels need the process's request
    vm = huge_pages.virtual_machine(artifact, tvm.cpu())  # as reccc.load maps it
    arguments = [[tvm.runtime.tensor(feed[spec.name]) for spec in manifest.inputs] for feed in feeds]
    started: dict[str, float] = {}
    calls: list[tuple[str, float, list]] = []

    def instrument(function, symbol, before_run, result, *args):
        if symbol.startswith("vm.builtin"):
            return 0
        if before_run:
            started[symbol] = time.perf_counter()
        else:
            calls.append((symbol, time.perf_counter() - started[symbol], [_shape(a) for a in args]))
        return 0

    vm.set_instrument(instrument)
    per_run: dict[str, list[float]] = defaultdict(list)
    for index in range(WARMUP_RUNS + runs):
        calls.clear()
        vm["main"](*arguments[index % len(arguments)])
        if not calls:
            raise SystemExit(f"{artifact}: no kernel calls to time: its model function is compiled to native code "
                             "(reccc's default); rebuild it with --vm-exec=bytecode to profile it")
        if index < WARMUP_RUNS:
            continue
        totals: dict[str, float] = defaultdict(float)
        for symbol, seconds, _ in calls:
            totals[symbol] += seconds
        for symbol, seconds in totals.items():
            per_run[symbol].append(seconds)
    # Calls and work are the same in every run: take them from the last.
    counts: dict[str, int] = defaultdict(int)
    work: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    for symbol, _, shapes in calls:
        counts[symbol] += 1
        for key, value in _work(symbol, shapes).items():
            work[symbol][key] += value
    return sorted(
        (
            {"kernel": symbol, "calls": counts[symbol], "median_ms": 1e3 * statistics.median(seconds), **work[symbol]}
            for symbol, seconds in per_run.items()
        ),
        key=lambda kernel: -kernel["median_ms"],
    )


def rate_hot_kernels(kernels: list[dict], limits: dict) -> list[dict]:
    """The kernels taking HOT_SHARE of the kernel time or more, and every lookup kernel (its rate is a
    target of its own), with their GFLOP/s (matmuls) or GB/s of gathered rows (lookups) and the
    fraction of the machine's sgemm or copy rate that is."""
    total = sum(kernel["median_ms"] for kernel in kernels) or 1.0
    hot = []
    for kernel in kernels:
        share = kernel["median_ms"] / total
        if share < HOT_SHARE and "gathered_elements" not in kernel:
            continue
        rated = {**kernel, "share": share}
        seconds = kernel["median_ms"] / 1e3
        if "flops" in kernel and seconds > 0:
            rated["gflops"] = kernel["flops"] / seconds / 1e9
            rated["of_sgemm_peak"] = kernel["flops"] / seconds / limits["sgemm_flops_per_s"]
        if "gathered_elements" in kernel and seconds > 0:
            gathered = 4 * kernel["gathered_elements"]  # fp32 rows: the bytes a lookup must move at least
            rated["gathered_gb_per_s"] = gathered / seconds / 1e9
            # A lookup reads each row once and writes it once, as a copy does.
            rated["of_copy_bandwidth"] = 2 * gathered / seconds / limits["copy_bytes_per_s"]
        hot.append(rated)
    return hot


def print_hot_kernels(hot: list[dict], indent: str = "  ") -> None:
    for kernel in hot:
        rate = ""
        if "gflops" in kernel:
            rate = f"{kernel['gflops']:.1f} GFLOP/s = {100 * kernel['of_sgemm_peak']:.0f}% of sgemm"
        elif "gathered_gb_per_s" in kernel:
            rate = f"{kernel['gathered_gb_per_s']:.2f} GB/s gathered = {100 * kernel['of_copy_bandwidth']:.0f}% of copy bandwidth"
        print(f"{indent}{kernel['kernel']:<36} x{kernel['calls']:<3} {kernel['median_ms']:>9.3f} ms {100 * kernel['share']:>4.0f}%  {rate}")


def main() -> None:
    import onnx

    from machine_limits import measure
    from reccc.ir import Model
    from reccc.sample_inputs import random_inputs

    parser = argparse.ArgumentParser(description="Time each kernel of a reccc artifact and rate the hot ones.")
    parser.add_argument("artifact", type=Path, help="a library written by reccc --vm-exec=bytecode for this CPU")
    parser.add_argument("model", type=Path, help="the .onnx model it was compiled from (for valid random inputs)")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="copy threads of the bandwidth measurement")
    args = parser.parse_args()
    model = Model.from_onnx(onnx.load(str(args.model)), str(args.model))
    feeds = [random_inputs(model, args.batch, seed=seed) for seed in range(WARMUP_RUNS + PROFILE_RUNS)]
    print_hot_kernels(rate_hot_kernels(profile_kernels(args.artifact, feeds), measure(args.threads)))


if __name__ == "__main__":
    main()
