"""merge-reshapes: a Reshape of a pure layout change reads the layout change's input instead.

    Reshape(Reshape(x, s1), s2_const)   ->  Reshape(x, s2_const)

and the same with Flatten, Squeeze or Unsqueeze in place of the inner Reshape: all four keep the element
order, so only the outer target matters. It applies when the inner result is read by the outer Reshape
alone. A 0 in s2 (allowzero=0) copies a dim of the inner result: it stays 0 where that dim is x's own
dim at the same axis (e.g. s1 has 0 there), becomes the dim's size where that is static, and otherwise
the Reshapes are not merged; so are they when the outer one has allowzero=1 and a 0 in s2.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import (
    attr,
    constant_value,
    fixpoint,
    input_at,
    new_constant,
    producer,
    rank_of,
    remove_node,
    shape_of,
    static_dim,
)

LAYOUT_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def copied_axes(inner: gs.Node) -> set[int]:
    """Axes at which the inner node's output dim is its input's dim at the same axis, on every input."""
    if inner.op == "Reshape":
        target = constant_value(input_at(inner, 1))
        if target is None or attr(inner, "allowzero", 0):
            return set()
        return {axis for axis, size in enumerate(target.reshape(-1).tolist()) if size == 0}
    if inner.op == "Flatten":
        rank = rank_of(inner.inputs[0])
        axis = attr(inner, "axis", 1)
        return {0} if axis == 1 or (rank is not None and axis + rank == 1) else set()
    axes = constant_value(input_at(inner, 1))  # Squeeze / Unsqueeze (opset 13+: axes is an input)
    rank = rank_of(inner.inputs[0])
    if axes is None or axes.size == 0 or rank is None:
        return set()
    rank = rank + axes.size if inner.op == "Unsqueeze" else rank
    first = min(int(a) % rank for a in axes.reshape(-1))
    return set(range(first))


def merged_target(inner: gs.Node, outer: gs.Node) -> list[int] | None:
    """The outer target with its 0 entries made valid for the inner node's input, or None."""
    target = constant_value(input_at(outer, 1))
    if target is None or target.ndim != 1:
        return None
    sizes = target.tolist()
    if 0 not in sizes:
        return sizes
    if attr(outer, "allowzero", 0):
        return None
    copied, inner_shape = copied_axes(inner), shape_of(inner.outputs[0])
    for axis, size in enumerate(sizes):
        if size != 0 or axis in copied:
            continue
        static = None if inner_shape is None or axis >= len(inner_shape) else static_dim(inner_shape[axis])
        if static is None:
            return None
        sizes[axis] = static
    return sizes


@register_pass
class MergeReshapes(Pass):
    name = "merge-reshapes"
    summary = "Reshape(Reshape|Flatten|Squeeze|Unsqueeze(x), s_const) -> Reshape(x, s) when the inner result has no other reader"

    def call(self, model: Model) -> bool:
        graph = model.graph

        def sweep() -> bool:
            changed = False
            for outer in list(graph.nodes):
                if outer.op != "Reshape" or not outer.outputs:
                    continue
                inner = producer(graph, outer.inputs[0], LAYOUT_OPS, single_use=True)
                target = None if inner is None else merged_target(inner, outer)
                if target is None:
                    continue
                if target != constant_value(outer.inputs[1]).tolist():
                    outer.inputs[1] = new_constant(graph, f"{outer.name}_shape", np.array(target, np.int64))
                outer.inputs[0] = inner.inputs[0]
                remove_node(graph, inner)
                changed = True
            return changed

        return fixpoint(sweep)
