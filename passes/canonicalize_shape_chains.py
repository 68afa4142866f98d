"""canonicalize-shape-chains: constant shapes for Reshape, Expand and Tile in place of Shape-op chains.

Exporters compute shapes around the dynamic batch at run time, as torch writes x.view(x.size(0), -1):

    Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))     ->  Reshape(x, [0, -1])

Reshape (allowzero=0): an entry equal to the same dim of the Reshape's own input becomes 0 (copy it),
a static dim its size, and a single remaining run-time entry -1 when every other entry is a positive
size. Expand: an entry equal to x's aligned dim becomes 1 (broadcast keeps it), a static dim its size;
the result is dropped when it expands nothing, else written as Tile by constant repeats (which works
when every expanded dim of x is 1), else kept as Expand with a constant shape when x's shape is static.
This applies to constant Expand shapes too: TVM 0.27's importer fails on Expand with a constant shape
over a symbolic dim, and takes Tile. Tile: repeats that are all static become constants.

The Shape/Gather/Concat nodes left unread are for dead-code-elimination to remove.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import (
    Entry,
    attr,
    bypass,
    constant_value,
    expands_nothing,
    input_at,
    new_constant,
    replace_node,
    shape_of,
    shape_vector,
    static_dim,
    static_shape,
)


def reshape_target(x: gs.Tensor, entries: list[Entry]) -> list[int] | None:
    """The constant Reshape target (allowzero=0) equal to `entries` on every input of x, or None."""
    target: list[int | None] = []
    for axis, entry in enumerate(entries):
        if isinstance(entry, int):
            target.append(entry)
        elif entry.is_dim(x, axis):
            target.append(0)
        else:
            target.append(None)
    unknown = [axis for axis, size in enumerate(target) if size is None]
    if not unknown:
        return target
    # One run-time entry: -1 infers it from the element count, exactly, if every other entry is a positive size.
    if len(unknown) == 1 and all(size is None or size > 0 for size in target):
        return [-1 if size is None else size for size in target]
    return None


def expand_target(x: gs.Tensor, entries: list[Entry]) -> list[int] | None:
    """A constant Expand shape equal in effect to `entries` for x, or None."""
    shape = shape_of(x)
    if shape is None:
        return None
    offset = len(entries) - len(shape)
    target = []
    for index, entry in enumerate(entries):
        if isinstance(entry, int):
            target.append(entry)
        elif index >= offset and entry.is_dim(x, index - offset):
            target.append(1)  # broadcasting keeps x's dim
        else:
            return None
    return target


def tile_repeats(x: gs.Tensor, target: list[int]) -> list[int] | None:
    """Repeats for Tile(x) equal to Expand(x, target), when every dim that expands is 1 in x."""
    shape = shape_of(x)
    if shape is None or len(target) > len(shape):
        return None
    repeats = [1] * (len(shape) - len(target))
    for size, dim in zip(target, shape[len(shape) - len(target) :]):
        if size < 1:
            return None
        if size == 1 or static_dim(dim) == size:
            repeats.append(1)
        elif static_dim(dim) == 1:
            repeats.append(size)
        else:
            return None
    return repeats


@register_pass
class CanonicalizeShapeChains(Pass):
    name = "canonicalize-shape-chains"
    summary = "Reshape/Tile targets computed by Shape->Gather->Concat become constants (0 copies the batch dim); Expand to a known shape -> Tile or nothing"

    def call(self, model: Model) -> bool:
        graph = model.graph
        changed = False
        for node in list(graph.nodes):
            if not node.outputs:
                continue  # removed earlier in this sweep
            if node.op == "Reshape":
                changed |= self._reshape(graph, node)
            elif node.op == "Expand":
                changed |= self._expand(graph, node)
            elif node.op == "Tile":
                changed |= self._tile(graph, node)
        return changed

    def _reshape(self, graph: gs.Graph, node: gs.Node) -> bool:
        x, shape = node.inputs[0], input_at(node, 1)
        if shape is None or constant_value(shape) is not None or attr(node, "allowzero", 0):
            return False
        entries = shape_vector(graph, shape)
        target = None if entries is None else reshape_target(x, entries)
        if target is None:
            return False
        node.inputs[1] = new_constant(graph, f"{node.name}_shape", np.array(target, np.int64))
        return True

    def _expand(self, graph: gs.Graph, node: gs.Node) -> bool:
        x, shape = node.inputs[0], input_at(node, 1)
        entries = None if shape is None else shape_vector(graph, shape)
        target = None if entries is None else expand_target(x, entries)
        if target is None:
            return False
        if expands_nothing(x, target) and bypass(graph, node, x):
            return True
        repeats = tile_repeats(x, target)
        if repeats is not None:
            replace_node(graph, node, "Tile", [x, new_constant(graph, f"{node.name}_repeats", np.array(repeats, np.int64))])
            return True
        if constant_value(shape) is None and static_shape(x) is not None:
            node.inputs[1] = new_constant(graph, f"{node.name}_shape", np.array(target, np.int64))
            return True
        return False

    def _tile(self, graph: gs.Graph, node: gs.Node) -> bool:
        repeats = input_at(node, 1)
        if repeats is None or constant_value(repeats) is not None:
            return False
        entries = shape_vector(graph, repeats)
        if entries is None or not all(isinstance(entry, int) for entry in entries):
            return False
        node.inputs[1] = new_constant(graph, f"{node.name}_repeats", np.array(entries, np.int64))
        return True

