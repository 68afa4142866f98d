"""remove-no-ops: bypass nodes whose output equals their input.

Identity; Dropout in inference (its mask unused); Cast to the dtype it already has; Reshape to the
shape it already has (0 copies a dim, so Reshape(x[batch, 6], [0, 6]) counts, as does one -1 among
matching dims); Transpose with the identity perm; Expand to a shape that broadcasts to x's own; Tile by
ones. A node whose output is a graph output stays unless its input can take the output's name (see
patterns.bypass): an output's name is the model's interface.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import (
    attr,
    bypass,
    constant_value,
    dtype_of,
    expands_nothing,
    fixpoint,
    input_at,
    onnx_to_numpy_dtype,
    shape_of,
    static_dim,
)


def is_no_op(node: gs.Node) -> bool:
    """Whether the node's first output always equals its first input."""
    if not node.inputs or not node.outputs or node.domain not in (None, "", "ai.onnx"):
        return False
    x = node.inputs[0]
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        training = input_at(node, 2)
        if training is None:
            return True
        flag = constant_value(training)
        return flag is not None and not bool(flag.reshape(-1)[0])
    if node.op == "Cast":
        source = dtype_of(x)
        return source is not None and source == onnx_to_numpy_dtype(attr(node, "to"))
    if node.op == "Reshape":
        return _same_shape_reshape(x, constant_value(input_at(node, 1)), attr(node, "allowzero", 0))
    if node.op == "Transpose":
        shape = shape_of(x)
        perm = attr(node, "perm")
        if perm is None:
            return shape is not None and len(shape) <= 1
        # A perm shorter than the rank is an invalid model, not an identity: leave it for onnx to reject.
        return shape is not None and list(perm) == list(range(len(shape)))
    if node.op == "Expand":
        return expands_nothing(x, constant_value(input_at(node, 1)))
    if node.op == "Tile":
        repeats = constant_value(input_at(node, 1))
        return repeats is not None and repeats.size > 0 and bool(np.all(repeats == 1))
    return False


def _same_shape_reshape(x: gs.Tensor, target: np.ndarray | None, allowzero: int) -> bool:
    shape = shape_of(x)
    if target is None or shape is None or target.ndim != 1 or len(target) != len(shape):
        return False
    inferred = 0
    for size, dim in zip(target.tolist(), shape):
        if size == 0 and not allowzero:
            continue  # copies x's dim
        if size == -1:
            inferred += 1  # equals x's dim when every other dim matches
            continue
        if static_dim(dim) != size:
            return False
    return inferred <= 1


@register_pass
class RemoveNoOps(Pass):
    name = "remove-no-ops"
    summary = "bypass Identity, inference Dropout, Cast/Reshape/Expand to what x already is, identity Transpose, Tile by ones; output names stay"

    def call(self, model: Model) -> bool:
        graph = model.graph

        def sweep() -> bool:
            changed = False
            for node in list(graph.nodes):
                if is_no_op(node) and bypass(graph, node):
                    changed = True
            return changed

        return fixpoint(sweep)
