"""Software prefetch in lookup kernels (reccc/targets/lookup_prefetch.py): a lookup kernel prefetches
the rows it gathers enough output rows ahead for LOOKUPS_AHEAD lookups, in its serial and parallel
branches, from tables that miss the caches and whose rows are one cache line at most; kernels of
small tables or wide rows are left as they were; and the compiled models agree with onnxruntime at
batches shorter than the distance, the empty one included."""

import sys
from pathlib import Path

import onnx
import pytest
import tvm
import tvm_ffi

import reccc
from reccc.targets import cpu_schedules, lookup_fusion, lookup_prefetch, relax_lowering
from reccc.targets.x86 import host_cpu

from conftest import assert_matches_onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import testmodels  # noqa: E402

# Rows of 16 floats (one cache line) in a table of exactly MIN_TABLE_BYTES.
LARGE_ROWS = lookup_prefetch.MIN_TABLE_BYTES // 64


def _lookup_kernels(model: onnx.ModelProto) -> list:
    """The script of the model's lookup kernels as the CPU rules schedule them."""
    target = host_cpu().tvm_target()
    with target:
        module = cpu_schedules.apply_default_schedules(lookup_fusion.fuse_operators()(relax_lowering.to_relax(model)), target)
    return [function for symbol, function in module.functions.items() if symbol.name_hint.startswith(lookup_fusion.GROUP_PREFIX)]


def _prefetches(kernels: list) -> list:
    """The prefetch calls of `kernels`."""
    found = []

    def visit(call):
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "tirx.call_llvm_intrin" and "prefetch" in str(call):
            found.append(call)

    for kernel in kernels:
        tvm_ffi.structural_walk(kernel.body, [(tvm.ir.Call, visit)])
    return found


@pytest.mark.parametrize(("fields", "ahead"), [(4, 4), (26, 1), (5, 4)])
def test_a_large_table_of_one_line_rows_is_prefetched_enough_rows_ahead(fields, ahead):
    """DeepFM's ids [batch, fields] into one table: `fields` lookups a row, so a prefetch
    ceil(LOOKUPS_AHEAD / fields) rows ahead, in the serial and the parallel branch."""
    kernels = _lookup_kernels(testmodels.deepfm(fields=fields, rows=LARGE_ROWS, dim=16))
    assert len(_prefetches(kernels)) == 2  # the first-order table is small
    assert lookup_prefetch.LOOKUPS_AHEAD <= fields * ahead < lookup_prefetch.LOOKUPS_AHEAD + fields
    assert any(f"T.min(ax0 + T.int64({ahead}), batch - T.int64(1))" in kernel.script() for kernel in kernels)


def test_the_tables_a_concatenation_joins_are_each_prefetched():
    """A DLRM's lookups and their Concat: one prefetch per table in each branch, 16 / 2 rows ahead."""
    (kernel,) = _lookup_kernels(testmodels.dlrm(tables=2, rows=LARGE_ROWS, dim=16))
    assert len(_prefetches([kernel])) == 2 * 2
    assert "T.min(ax0 + T.int64(8), batch - T.int64(1))" in kernel.script()


@pytest.mark.parametrize(("rows", "dim"), [(LARGE_ROWS // 2, 16), (LARGE_ROWS, 64)])
def test_small_tables_and_rows_of_several_lines_are_not_prefetched(rows, dim):
    assert not _prefetches(_lookup_kernels(testmodels.deepfm(fields=4, rows=rows, dim=dim)))


@pytest.mark.parametrize("build", [lambda: testmodels.deepfm(fields=3, rows=LARGE_ROWS, dim=16),
                                   lambda: testmodels.dlrm(tables=2, rows=LARGE_ROWS, dim=16)], ids=["deepfm", "dlrm"])
def test_prefetching_models_agree_with_onnxruntime_at_batches_shorter_than_the_distance(tmp_path, build):
    source, library = tmp_path / "m.onnx", tmp_path / "m.so"
    onnx.save(build(), source)
    reccc.compile(source, library)
    assert _prefetches(_lookup_kernels(onnx.load(source)))
    model = reccc.load(library)
    for batch in (0, 1, 2, 7, 300):
        assert_matches_onnxruntime(source, model.run, batch, seed=batch)
