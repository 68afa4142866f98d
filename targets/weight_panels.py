"""A matmul kernel's constant weight stored panel by panel, packed when compiled.

cpu_schedules' matmul rule runs each register tile over a panel of W's columns (tile.vectors vectors
wide) for every step of the reduction. In W's own [K, N] layout one step's panel is 256 bytes at a
stride of N floats: for N = 512 that stride is 2 KiB, so a 576-row panel falls into 8 of L1's 64
sets, and the tile reads W from L2 on every row tile. Stored as [N / panel, K, panel], each panel is
one contiguous run that the tile streams through in order.

The rule marks the kernels it can serve so (`mark`: W a parameter whose columns are whole panels);
`pack_constant_weights`, after all schedules are chosen (so -O3 measures them all on W as it is),
gives each marked kernel a copy of W in panels (TVM's layout-rewrite preprocessing block), splits
that copy off into its own function (relax SplitLayoutRewritePreproc) and folds it: where every
call passes W as a constant, the model holds the packed constant instead. A W that is a parameter of
the model (--weights=external) is left as it is: packing it would copy it on every call.
"""

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

from reccc.targets.kernel_blocks import root_blocks

# [weight parameter index, panel columns] of a kernel whose weight may be stored in panels.
WEIGHT_PANEL_ATTR = "reccc.weight_panel"
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_PREPROC_ANNOTATION = "meta_schedule.layout_rewrite_preproc"


def mark(function: tirx.PrimFunc, weight, panel: int) -> tirx.PrimFunc:
    """`function` marked as reading `weight` (a buffer) panel by panel, where it is a parameter."""
    index = next((i for i, param in enumerate(function.params) if param.same_as(weight)), None)
    return function if index is None else function.with_attr(WEIGHT_PANEL_ATTR, [index, panel])


def panel_mark(function: tirx.PrimFunc) -> tuple[int, int] | None:
    """(weight parameter index, panel columns) of a marked kernel, else None."""
    if function.attrs is None or WEIGHT_PANEL_ATTR not in function.attrs:
        return None
    index, panel = (int(value) for value in function.attrs[WEIGHT_PANEL_ATTR])
    return index, panel


def pack_constant_weights(module: tvm.IRModule) -> tvm.IRModule:
    """`module` with the weight of each marked kernel that every call passes a constant stored in
    panels (see above); unchanged where there is none."""
    constant_weights = _called_with_constant_weights(module)
    packed = {}
    for symbol, function in module.functions.items():
        if symbol.name_hint in constant_weights:
            packed[symbol] = _with_panel_copy(function, *panel_mark(function))
    if not packed:
        return module
    module = tvm.IRModule(dict(module.functions), attrs=module.attrs)  # the caller's module stays as it was
    attrs = {}
    for symbol, function in packed.items():
        module[symbol] = function
        attrs[symbol.name_hint] = function.without_attr(WEIGHT_PANEL_ATTR).attrs
    module = relax.transform.SplitLayoutRewritePreproc()(module)
    # The split rebuilds the kernel without its attributes: tirx.noalias among them, without which
    # LLVM keeps the accumulators in memory.
    for symbol, function in list(module.functions.items()):
        original = symbol.name_hint.removesuffix("_prepacked")
        if original != symbol.name_hint and original in attrs:
            module[symbol] = function.with_attrs(attrs[original])
    return relax.transform.DeadCodeElimination()(_FoldPanelCopies(module, {f"{name}_weight_prepack" for name in attrs}).fold())


def _called_with_constant_weights(module: tvm.IRModule) -> set[str]:
    """The marked kernels whose every call (there is at least one) passes a constant weight."""
    calls: dict[str, list[bool]] = {}

    def visit(node):
        if isinstance(node, relax.Call) and node.op.same_as(_CALL_TIR):
            function = module[node.args[0]]
            mark = panel_mark(function) if isinstance(function, tirx.PrimFunc) else None
            if mark is not None:
                weight = node.args[1].fields[mark[0]]
                calls.setdefault(node.args[0].name_hint, []).append(isinstance(weight, tvm.ir.GenericConst))

    for function in module.functions.values():
        if isinstance(function, relax.Function):
            relax.analysis.post_order_visit(function, visit)
    return {name for name, constant in calls.items() if all(constant)}


def _with_panel_copy(function: tirx.PrimFunc, index: int, panel: int) -> tirx.PrimFunc:
    """`function` with its matmul blocks reading a copy of W [K, N] (parameter `index`) stored as
    [N / panel, K, panel], made by a layout-rewrite block first under the root."""
    schedule = s_tir.Schedule(function)
    weight = function.params[index]
    readers = [block for block in root_blocks(schedule) if any(read.source.same_as(weight) for read in schedule.get(block).reads)]
    read = next(i for i, region in enumerate(schedule.get(readers[0]).reads) if region.source.same_as(weight))
    copy = schedule.cache_read(readers[0], read, "global", consumer_blocks=readers)
    schedule.transform_layout(copy, ("write", 0), lambda k, j: (j // panel, k, j % panel))
    schedule.annotate(copy, _PREPROC_ANNOTATION, True)
    return schedule.mod["main"]


@relax.expr_functor.mutator
class _FoldPanelCopies(relax.PyExprMutator):
    """Each call of one of `copies` (the "<kernel>_weight_prepack" functions SplitLayoutRewritePreproc
    made of the panel copies) on a constant, as the constant in panels: a permutation of W, so numpy
    makes it exactly."""

    def __init__(self, module: tvm.IRModule, copies: set[str]):
        super().__init__(module)
        self.module, self.copies = module, copies

    def fold(self) -> tvm.IRModule:
        for symbol, function in list(self.module.functions.items()):
            if isinstance(function, relax.Function):
                self.builder_.update_func(symbol, self.visit_expr(function))
        return self.builder_.get()

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (call.op.same_as(_CALL_TIR) and call.args[0].name_hint in self.copies):
            return call
        (weight,) = call.args[1].fields
        panels, _, panel = (int(dim) for dim in call.ty.shape)
        value = weight.value.numpy()
        return relax.const(np.ascontiguousarray(value.reshape(value.shape[0], panels, panel).transpose(1, 0, 2)), str(value.dtype))
