"""Huge pages for a loaded model's constants (reccc/huge_pages.py): `reccc.load` collapses what loading
the library mapped into 2 MiB pages, so a large embedding table ends up on them, and the model still
agrees with onnxruntime. Needs Linux with transparent huge pages not disabled."""

import mmap
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import reccc
from reccc import huge_pages

from conftest import assert_matches_onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import testmodels  # noqa: E402

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(),
                                reason="needs Linux with transparent huge pages (madvise or always)")


def _huge_bytes(start: int, end: int) -> int:
    """AnonHugePages of this process's mappings within [start, end)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and len(line.split()[0].split("-")) == 2 and ":" not in line.split()[0]:
            low, high = (int(part, 16) for part in line.split()[0].split("-"))
            inside = start <= low and high <= end
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def test_a_new_anonymous_region_is_found_and_collapsed():
    before = huge_pages.anonymous_regions()
    region = mmap.mmap(-1, 8 * huge_pages.HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.write(b"\1" * len(region))  # populated, as a loaded table is
    new = huge_pages.anonymous_regions() - before
    start, end = next((s, e) for s, e in new if e - s >= len(region))
    assert huge_pages.collapse(new) >= 6 * huge_pages.HUGE_PAGE
    assert _huge_bytes(start, end) >= 6 * huge_pages.HUGE_PAGE
    region.seek(0)
    assert region.read() == b"\1" * len(region)


def test_a_loaded_models_large_table_is_on_huge_pages(tmp_path):
    """A 16 MiB table (262144 x 16 floats) embedded in the library: the process that loads it holds
    at least 12 MiB of huge pages more than before (smaps), and the model agrees with onnxruntime."""
    source, library = tmp_path / "m.onnx", tmp_path / "m.so"
    onnx.save(testmodels.deepfm(fields=4, rows=262144, dim=16), source)
    reccc.compile(source, library)
    script = ("import sys, reccc\n"
              "def huge():\n"
              "    return next(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages:'))\n"
              "before = huge()\n"
              "model = reccc.load(sys.argv[1])\n"
              "print(huge() - before)\n")
    grown_kib = int(subprocess.run([sys.executable, "-c", script, str(library)], check=True, capture_output=True, text=True).stdout)
    assert grown_kib * 1024 >= 12 << 20
    model = reccc.load(library)
    for batch in (0, 1, 64):
        assert_matches_onnxruntime(source, model.run, batch, seed=batch)
