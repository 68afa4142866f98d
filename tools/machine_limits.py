"""What this machine can do at best, measured beside the benchmarks so that kernel rates have a ceiling:
memory copy bandwidth (an embedding lookup is a copy of rows) and fp32 GEMM throughput (numpy's BLAS,
as onnxruntime's MLAS runs near the same peak).

    python tools/machine_limits.py --threads 2
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Far beyond any cache: the copy runs at DRAM speed, as lookups into large tables do.
COPY_BYTES = 512 * 2**20
GEMM_SIZE = 2048
REPEATS = 7


def copy_bandwidth(threads: int, nbytes: int = COPY_BYTES, repeats: int = REPEATS) -> float:
    """Bytes moved per second (read + written) by `threads` threads each copying a slice of a
    `nbytes` buffer; median of `repeats` runs after one that faults the pages in."""
    source = np.ones(nbytes // 4, np.float32)
    destination = np.empty_like(source)
    slices = [slice(i * len(source) // threads, (i + 1) * len(source) // threads) for i in range(threads)]

    def copy_slice(part: slice) -> None:
        np.copyto(destination[part], source[part])  # numpy releases the GIL for a plain copy

    seconds = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            list(pool.map(copy_slice, slices))
            seconds.append(time.perf_counter() - start)
    return 2 * source.nbytes / statistics.median(seconds[1:])


def sgemm_flops(size: int = GEMM_SIZE, repeats: int = REPEATS) -> float:
    """fp32 FLOP/s of numpy's matmul on two size x size matrices (its BLAS's threads: set
    OPENBLAS_NUM_THREADS / OMP_NUM_THREADS before numpy loads to pin them)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds)


def measure(threads: int) -> dict:
    return {
        "copy_bytes_per_s": copy_bandwidth(threads),
        "copy_buffer_bytes": COPY_BYTES,
        "sgemm_flops_per_s": sgemm_flops(),
        "sgemm_size": GEMM_SIZE,
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure this machine's copy bandwidth and fp32 GEMM throughput.")
    parser.add_argument("--threads", type=int, default=1, help="copy threads (default: 1)")
    limits = measure(parser.parse_args().threads)
    print(json.dumps(limits, indent=2))


if __name__ == "__main__":
    main()
