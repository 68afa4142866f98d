"""The out-of-range counts of reccc's index guard (reccc.index_guard) as one CPU kernel.

The guard computes a group of ids' flags in ONNX as its graph is written, which TVM's importer gives as

    sum(concat((astype(logical_or(less(S, low), greater_equal(S, high)), "int32"), zeros), axis=1), axis=[1])
    S = concat((reshape(ids_0, [1, n]), ...), axis=0)  (or the one reshape)

and which runs as three kernels (the stacking with the comparisons, the zero column, the sum) and a
VM reshape per ids: 4 µs of a 9 µs DLRM call at batch 1, 37 µs of 320 at batch 2048. Here it is one
kernel that counts each ids' elements outside [low, high) in place, zeroing its counts before the
loops, so that an empty batch counts 0 without the zero column.
"""

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx

from reccc.targets.relax_lowering import BoundCalls, bindings_as_written

KERNEL = "index_flags"
_COUNT_BLOCK = "count_outside"


def _count_outside(*ids: te.Tensor, lows: list[int], highs: list[int]) -> te.Tensor:
    """int32 [len(ids)]: how many elements of each ids lie outside [lows[i], highs[i])."""
    counts = [te.compute((1,), _outside_count(tensor, low, high), name=f"{_COUNT_BLOCK}{number}")
              for number, (tensor, low, high) in enumerate(zip(ids, lows, highs))]

    def flag(j):
        value = counts[-1][0]
        for number in reversed(range(len(counts) - 1)):
            value = tirx.if_then_else(j == number, counts[number][0], value)
        return value

    return te.compute((len(counts),), flag, name="flags")


def _outside_count(tensor: te.Tensor, low: int, high: int):
    """fcompute of the count of `tensor`'s elements outside [low, high)."""
    axes = [te.reduce_axis((0, dim), name=f"i{axis}") for axis, dim in enumerate(tensor.shape)]

    def count(_):
        value = tensor(*axes)
        outside = tirx.Or(value < tirx.const(low, tensor.dtype), value >= tirx.const(high, tensor.dtype))
        return te.sum(tirx.Cast("int32", outside), axis=axes) if axes else tirx.Cast("int32", outside)

    return count


def _scheduled(function: tirx.PrimFunc) -> tirx.PrimFunc:
    """Each count zeroed before its loops (te's reductions initialize inside the reduced loop, so an
    empty ids would leave its count unwritten) and kept in a register; the flags copied out of them."""
    schedule = s_tir.Schedule(function)
    for block in schedule.get_child_blocks(schedule.get_sblock("root")):
        if schedule.get(block).name_hint.startswith(_COUNT_BLOCK):
            loops = schedule.get_loops(block)
            if len(loops) > 1:  # not a scalar ids, whose count is its one comparison
                schedule.decompose_reduction(block, loops[1])
            schedule.set_scope(block, 0, "local")
    return schedule.mod["main"]


@relax.expr_functor.mutator
class _IndexFlagsKernels(relax.PyExprMutator, BoundCalls):
    def __init__(self, module: tvm.IRModule):
        super().__init__(module)
        self.replaced = False
        self._written = bindings_as_written(module["main"])

    def lookup_binding(self, var: relax.Var) -> relax.Expr | None:
        return self._written.get(var)

    def visit_call_(self, call):
        operands = self._group_operands(call)
        if operands is None:
            return super().visit_call_(call)
        ids, lows, highs = operands
        self.replaced = True
        kernel_call = self.builder_.call_te(_count_outside, *ids, lows=lows, highs=highs, primfunc_name_hint=KERNEL)
        kernel = kernel_call.args[0]
        self.builder_.update_func(kernel, _scheduled(self.builder_.get()[kernel]))
        return kernel_call

    def _group_operands(self, call) -> tuple[list[relax.Expr], list[int], list[int]] | None:
        """The ids, lows and highs of a group's counts as the importer writes them (above), else None."""
        if not (call.op.same_as(tvm.ir.Op.get("relax.sum")) and _ints(call.attrs.axis) == [1] and not call.attrs.keepdims):
            return None
        padded = self._bound(call.args[0], "relax.concat")
        if padded is None or int(padded.attrs.axis) != 1 or len(padded.args[0].fields) != 2:
            return None
        counted, zeros = padded.args[0].fields
        counted = self._bound(counted, "relax.astype")
        if counted is None or counted.ty.dtype != "int32" or not _is_zeros(zeros):
            return None
        outside = self._bound(counted.args[0], "relax.logical_or")
        below = None if outside is None else self._bound(outside.args[0], "relax.less")
        above = None if outside is None else self._bound(outside.args[1], "relax.greater_equal")
        if below is None or above is None or not below.args[0].same_as(above.args[0]):
            return None
        ids = self._stacked_ids(below.args[0])
        lows, highs = _column(below.args[1]), _column(above.args[1])
        if ids is None or lows is None or highs is None or not len(ids) == len(lows) == len(highs):
            return None
        return ids, lows, highs

    def _stacked_ids(self, stacked) -> list[relax.Expr] | None:
        """The ids whose [1, n] rows `stacked` concatenates (or is), else None."""
        concatenated = self._bound(stacked, "relax.concat")
        if concatenated is not None and int(concatenated.attrs.axis) != 0:
            return None
        rows = list(concatenated.args[0].fields) if concatenated is not None else [stacked]
        reshapes = [self._bound(row, "relax.reshape") for row in rows]
        if any(reshape is None or reshape.ty.ndim != 2 or reshape.args[0].ty.shape is None for reshape in reshapes):
            return None
        return [reshape.args[0] for reshape in reshapes]


def _ints(values) -> list[int] | None:
    return None if values is None else [int(value) for value in values]


def _constant(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def _is_zeros(expr) -> bool:
    values = _constant(expr)
    return values is not None and not values.any()


def _column(expr) -> list[int] | None:
    """The values of a constant [k, 1] column."""
    values = _constant(expr)
    return None if values is None or values.ndim != 2 or values.shape[1] != 1 else [int(value) for value in values[:, 0]]


def select_index_flags_kernels(module: tvm.IRModule) -> tvm.IRModule:
    """The imported module with each of the index guard's groups of counts as one kernel; unchanged
    where it has none."""
    mutator = _IndexFlagsKernels(module)
    main = mutator.visit_expr(module["main"])
    if not mutator.replaced:
        return module
    module = mutator.builder_.get()
    module["main"] = main
    # The stacked ids and their comparisons are read by nothing now.
    return relax.transform.DeadCodeElimination(["main"])(module)
