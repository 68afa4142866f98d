"""Small matching and rewriting helpers shared by the canonicalization passes.

Pattern rewrites read like the code they match (in the style of onnxscript's rewriter):

    matmul = producer(graph, add.inputs[0], "MatMul", single_use=True)
    weight = constant_value(matmul.inputs[1])

Every helper works on an onnx-graphsurgeon Graph in place. Helpers that remove nodes remove exactly
those nodes; whatever becomes dead otherwise is left for dead-code-elimination.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

Dim = int | str | None  # a graphsurgeon dim: a static size, a dim_param name, or unknown


# --- reading the graph -------------------------------------------------------------------------


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The values of a constant tensor: an initializer or the output of a Constant node; else None."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Constant":
        return None
    attrs = tensor.inputs[0].attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return attrs["value"].values
    for name, dtype in (("value_int", np.int64), ("value_ints", np.int64), ("value_float", np.float32), ("value_floats", np.float32)):
        if name in attrs:
            return np.array(attrs[name], dtype)
    return None  # value_string(s), sparse_value: not numeric constants for these passes


def is_constant(tensor: gs.Tensor | None) -> bool:
    return constant_value(tensor) is not None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes reading `tensor` (a node reading it twice appears once)."""
    unique: dict[int, gs.Node] = {}
    for node in tensor.outputs:
        unique.setdefault(id(node), node)
    return list(unique.values())


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(output is tensor for output in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(each is tensor for each in graph.inputs)


def has_single_use(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """`tensor` is read by exactly one node, once, and is not a graph output."""
    return len(tensor.outputs) == 1 and not is_graph_output(graph, tensor)


def unused(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Nothing reads `tensor` and it is not a graph output."""
    return not tensor.outputs and not is_graph_output(graph, tensor)


def producer(graph: gs.Graph, tensor: gs.Tensor | None, op: str | Iterable[str], *, single_use: bool = False) -> gs.Node | None:
    """The single node producing `tensor` if its op is `op` (or one of `op`); with `single_use`, only
    if that node's output `tensor` has exactly one consumer and is not a graph output."""
    if tensor is None or isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    ops = {op} if isinstance(op, str) else set(op)
    if node.op not in ops or node.domain not in (None, "", "ai.onnx"):
        return None
    if single_use and not has_single_use(graph, tensor):
        return None
    return node


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def input_at(node: gs.Node, index: int) -> gs.Tensor | None:
    """The node's input `index`, or None where it is absent (beyond the inputs, or the empty name)."""
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    return None if isinstance(tensor, gs.Variable) and not tensor.name else tensor


def dtype_of(tensor: gs.Tensor) -> np.dtype | None:
    if isinstance(tensor, gs.Constant):
        return tensor.values.dtype
    if tensor.dtype is None:
        return None
    try:
        return np.dtype(tensor.dtype)
    except TypeError:
        return None


def onnx_to_numpy_dtype(onnx_type: int) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))
    except (KeyError, TypeError, ValueError):
        return None


def shape_of(tensor: gs.Tensor) -> tuple[Dim, ...] | None:
    """The tensor's dims (static sizes, dim_param names or None), or None when its rank is unknown."""
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.values.shape)
    if tensor.shape is None:
        return None
    return tuple(d if isinstance(d, (int, str)) and not isinstance(d, bool) else None for d in tensor.shape)


def rank_of(tensor: gs.Tensor) -> int | None:
    shape = shape_of(tensor)
    return None if shape is None else len(shape)


def static_dim(dim: Dim) -> int | None:
    return dim if isinstance(dim, int) and dim >= 0 else None


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape when every dim is a static size."""
    shape = shape_of(tensor)
    if shape is None or any(static_dim(d) is None for d in shape):
        return None
    return tuple(shape)


def expands_nothing(x: gs.Tensor, target: list[int] | np.ndarray | None) -> bool:
    """Expand(x, target) is x itself: target is no longer than x's rank, and each entry is 1 or x's static dim."""
    shape = shape_of(x)
    if target is None or shape is None or np.ndim(target) != 1 or len(target) > len(shape):
        return False
    aligned = shape[len(shape) - len(target) :]
    return all(size == 1 or static_dim(dim) == size for size, dim in zip(list(target), aligned))


def same_dim(a: Dim, b: Dim) -> bool:
    """Two dims that are equal on every input: the same static size or the same named symbolic dim."""
    if static_dim(a) is not None or static_dim(b) is not None:
        return static_dim(a) is not None and a == b
    return isinstance(a, str) and bool(a) and a == b


# --- symbolic shape values ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DimOf:
    """A run-time dim: the size of axis `axis` of `tensor` (compared by tensor identity)."""

    tensor: gs.Tensor
    axis: int

    def dim(self) -> Dim:
        shape = shape_of(self.tensor)
        return None if shape is None else shape[self.axis]

    def is_dim(self, tensor: gs.Tensor, axis: int) -> bool:
        """Equal on every input to axis `axis` of `tensor`."""
        if self.tensor is tensor and self.axis == axis:
            return True
        shape = shape_of(tensor)
        return shape is not None and 0 <= axis < len(shape) and same_dim(self.dim(), shape[axis])


Entry = int | DimOf  # one entry of a shape vector: known now, or a dim read at run time


def shape_vector(graph: gs.Graph, tensor: gs.Tensor, _depth: int = 0) -> list[Entry] | None:
    """What an int64 shape-like 1-D tensor holds, entry by entry, when it is computed from constants and
    Shape ops (Shape, Gather, Unsqueeze, Concat, Slice, Identity): a static dim reads as its size.
    None when it depends on anything else."""
    value = _shape_value(graph, tensor, _depth)
    return value if isinstance(value, list) else None


def _shape_value(graph: gs.Graph, tensor: gs.Tensor, depth: int) -> list[Entry] | Entry | None:
    """A 1-D value as a list of entries, a 0-D value as one entry, or None."""
    if depth > 32:
        return None
    values = constant_value(tensor)
    if values is not None:
        if values.dtype != np.int64 or values.ndim > 1:
            return None
        return int(values) if values.ndim == 0 else [int(v) for v in values]
    node = producer(graph, tensor, ("Shape", "Gather", "Unsqueeze", "Concat", "Slice", "Identity"))
    if node is None or node.outputs[0] is not tensor:
        return None
    if node.op == "Shape":
        shape = shape_of(node.inputs[0])
        if shape is None:
            return None
        start, end = attr(node, "start", 0), attr(node, "end", len(shape))
        axes = range(len(shape))[slice(start, end)]
        return [_resolved(DimOf(node.inputs[0], axis)) for axis in axes]
    if node.op == "Identity":
        return _shape_value(graph, node.inputs[0], depth + 1)
    if node.op == "Gather":
        source, indices = _shape_value(graph, node.inputs[0], depth + 1), constant_value(node.inputs[1])
        if not isinstance(source, list) or indices is None or attr(node, "axis", 0) not in (0, -1) or indices.ndim > 1:
            return None
        if not all(-len(source) <= i < len(source) for i in indices.reshape(-1)):
            return None
        picked = [source[int(i)] for i in indices.reshape(-1)]
        return picked[0] if indices.ndim == 0 else picked
    if node.op == "Unsqueeze":
        scalar, axes = _shape_value(graph, node.inputs[0], depth + 1), constant_value(input_at(node, 1))
        if isinstance(scalar, list) or scalar is None or axes is None or axes.reshape(-1).tolist() not in ([0], [-1]):
            return None
        return [scalar]
    if node.op == "Concat":
        if attr(node, "axis") not in (0, -1):
            return None
        joined: list[Entry] = []
        for each in node.inputs:
            part = _shape_value(graph, each, depth + 1)
            if not isinstance(part, list):
                return None
            joined += part
        return joined
    # Slice with constant starts/ends along axis 0 and step 1
    source = _shape_value(graph, node.inputs[0], depth + 1)
    starts, ends = constant_value(input_at(node, 1)), constant_value(input_at(node, 2))
    axes, steps = constant_value(input_at(node, 3)), constant_value(input_at(node, 4))
    if not isinstance(source, list) or starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if (input_at(node, 3) is not None and (axes is None or axes.reshape(-1).tolist() not in ([0], [-1]))) or (
        input_at(node, 4) is not None and (steps is None or steps.reshape(-1).tolist() != [1])
    ):
        return None
    return source[slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]))]


def _resolved(entry: DimOf) -> Entry:
    size = static_dim(entry.dim())
    return entry if size is None else size


# --- rewriting ---------------------------------------------------------------------------------------


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node reading `old` read `new` instead (graph outputs are names, so they are not uses)."""
    for node in consumers(old):
        for index, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[index] = new


def remove_node(graph: gs.Graph, node: gs.Node) -> None:
    """Disconnect `node` and drop it from the graph (its inputs stay, perhaps dead)."""
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes[:] = [each for each in graph.nodes if each is not node]


def bypass(graph: gs.Graph, node: gs.Node, source: gs.Tensor | None = None) -> bool:
    """Remove a node whose first output equals `source` (default: its first input); its other outputs
    must be unused. Readers of the output read `source` instead. A graph output keeps its name: then
    `source`'s producer writes the output directly, which needs `source` to be a node's output that is
    neither a graph input nor a graph output; otherwise nothing changes. Returns whether it changed."""
    source = node.inputs[0] if source is None else source
    result = node.outputs[0]
    if any(not unused(graph, extra) for extra in node.outputs[1:]):
        return False
    if not is_graph_output(graph, result):
        remove_node(graph, node)
        replace_all_uses(graph, result, source)
        return True
    if (
        isinstance(source, gs.Constant)
        or len(source.inputs) != 1
        or is_graph_input(graph, source)
        or is_graph_output(graph, source)
    ):
        return False
    writer = source.inputs[0]
    remove_node(graph, node)
    replace_all_uses(graph, source, result)
    writer.outputs[writer.outputs.index(source)] = result
    return True


def remove_if_unused(graph: gs.Graph, node: gs.Node) -> bool:
    """Drop `node` when none of its outputs is read or a graph output."""
    if all(unused(graph, output) for output in node.outputs):
        remove_node(graph, node)
        return True
    return False


def fresh_name(graph: gs.Graph, base: str) -> str:
    """A tensor and node name not yet used in `graph`, starting with `base`."""
    taken = set(graph.tensors()) | {node.name for node in graph.nodes}
    name, count = base, 0
    while name in taken:
        count += 1
        name = f"{base}_{count}"
    return name


def new_constant(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(fresh_name(graph, base), np.asarray(values, order="C"))  # ascontiguousarray would make 0-d arrays 1-d


def new_node(graph: gs.Graph, op: str, name: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor], **attrs) -> gs.Node:
    """Append a node named `name` (made unique) to the graph."""
    node = gs.Node(op, fresh_name(graph, name), attrs=attrs, inputs=inputs, outputs=outputs)
    graph.nodes.append(node)
    return node


def replace_node(graph: gs.Graph, old: gs.Node, op: str, inputs: list[gs.Tensor], **attrs) -> gs.Node:
    """Replace `old` by a node computing its first output another way; it keeps `old`'s name."""
    output, name = old.outputs[0], old.name
    remove_node(graph, old)
    node = gs.Node(op, name, attrs=attrs, inputs=inputs, outputs=[output])
    graph.nodes.append(node)
    return node


def fixpoint(step) -> bool:
    """Call `step()` until it reports no change; return whether any call changed something."""
    changed = False
    while step():
        changed = True
    return changed
