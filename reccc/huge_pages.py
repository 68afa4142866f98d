"""Embedding tables on huge pages: the memory a compiled model's load maps, collapsed into 2 MiB pages.

A lookup reads rows at random across a table: with 4 KiB pages nearly every row of a table past a few
MB misses the TLB, and the page walks, not the memory, bound the gather. A C gather of the standard
two-tower's rows (two 256 MB tables) took 71-72 us on 2 MiB pages against 113-149 on 4 KiB pages, and
of DeepFM's (a 64 MB table) 275-299 against 373-434 us (tools/gather_ceiling.c, prefetching 16 rows
ahead). Linux gives a process huge pages where it asks for them (transparent huge pages in "madvise"
mode) or everywhere ("always"); TVM allocates the model's constants itself, so after loading a model
reccc asks for them: every anonymous region of at least a huge page that the load mapped is advised
MADV_HUGEPAGE and collapsed now (MADV_COLLAPSE, Linux 6.1), not when khugepaged gets to it. Best
effort: where the kernel refuses (no THP, an older kernel, no free huge pages), the model runs as before.
"""

import ctypes
import sys
from pathlib import Path

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


def virtual_machine(path, device):
    """A Relax VM of the compiled library at `path` on `device`; on the CPU, what loading it mapped
    (the model's constants among it) collapsed into huge pages."""
    import tvm
    from tvm.runtime.vm import VirtualMachine  # not relax's: a device's runtime-only TVM has no relax

    mapped_before = anonymous_regions()
    machine = VirtualMachine(tvm.runtime.load_module(str(path)), device)
    if device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
        collapse(anonymous_regions() - mapped_before)
    return machine


def anonymous_regions() -> set[tuple[int, int]]:
    """(start, end) of this process's private writable mappings of no file, [heap] included; none
    where /proc is missing (not Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    regions = set()
    for line in lines:
        fields = line.split()
        path = fields[5] if len(fields) > 5 else ""
        if fields[1].startswith("rw") and fields[1].endswith("p") and path in ("", "[heap]"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            regions.add((start, end))
    return regions


def collapse(regions: set[tuple[int, int]]) -> int:
    """Advise and collapse the whole huge pages inside `regions`; returns the bytes the kernel collapsed."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for start, end in sorted(regions):
        first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if last <= first:
            continue
        if libc.madvise(first, last - first, MADV_HUGEPAGE) == 0 and libc.madvise(first, last - first, MADV_COLLAPSE) == 0:
            collapsed += last - first
    return collapsed
