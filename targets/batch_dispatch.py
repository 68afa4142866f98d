"""Two schedules of one kernel, picked per call by the batch: the kernel runs its large-batch schedule
when its rows reach a threshold and its original schedule below it.

A tile that wins at large batches (more rows per register tile, fewer loads of the weights) pads a
batch of 1 to more rows than a small tile does; -O3 measures both (targets/tuning.py) and, where each
wins in its own range, keeps both. The branch is inside the kernel (targets/row_branches.py), not in
the Relax program: there an `If` cost the VM a shape kernel per call site to evaluate its condition,
and, since no dataflow block may hold one, left the program's reshapes copy kernels instead of views
(on the standard two-tower at batch 1, 4.9 us of a 15 us call).
"""

import tvm
from tvm import tirx

from reccc.targets.row_branches import branching, symbolic_rows
from reccc.targets.weight_panels import WEIGHT_PANEL_ATTR, panel_mark


def dispatch_by_rows(module: tvm.IRModule, large_kernels: dict[str, tirx.PrimFunc], rows: int) -> tvm.IRModule:
    """`module` with each kernel named in `large_kernels` (schedules of the same function) running that
    schedule from `rows` rows on, where its rows are symbolic (the batch)."""
    dispatched = tvm.IRModule(dict(module.functions), attrs=module.attrs)
    for name, large in large_kernels.items():
        small = module[name]
        batch = symbolic_rows(small)
        if batch is None:
            continue
        joined = branching(small, tirx.IfThenElse(batch < rows, small.body, large.body))
        # The weight is stored in the panels of either schedule that reads it so (weight_panels.py), the
        # small one's first: packing rewrites every read of it, in both branches, so both stay exact,
        # and a schedule reading another tile's panels still reads them contiguously, not at W's row stride.
        mark = panel_mark(small) or panel_mark(large)
        if mark is not None:
            joined = joined.with_attr(WEIGHT_PANEL_ATTR, list(mark))
        dispatched[name] = joined
    return dispatched

