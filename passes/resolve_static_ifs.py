"""resolve-static-ifs: an If whose condition is known from constants and static dims is replaced by
the branch it always takes.

The TorchScript exporter writes `x.squeeze(d)` as If(Shape(x)[d] == 1, Squeeze, Identity). TVM's
importer gives such an If's result an unknown rank, so what follows it (a matmul, a concat) cannot be
lowered; when dim d is static the condition is decided before run time, and the taken branch's nodes
move into the graph. Conditions that depend on a symbolic dim (the batch) stay as they are.
Dims come from the graph's shapes and, where onnx's shape inference lost them (after a Squeeze
without axes, a Reshape to a Shape-built target), from onnxruntime's symbolic shape inference; only
static dims decide a condition.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import attr, constant_value, new_node, remove_node, shape_vector
from reccc.passes.symbolic_shapes import symbolic_values

_COMPARISONS = {
    "Equal": np.equal,
    "Greater": np.greater,
    "Less": np.less,
    "GreaterOrEqual": np.greater_equal,
    "LessOrEqual": np.less_equal,
    "And": np.logical_and,
    "Or": np.logical_or,
    "Xor": np.logical_xor,
}


def known_value(graph: gs.Graph, tensor: gs.Tensor, shapes: dict[str, list], depth: int = 0) -> np.ndarray | None:
    """The value of a small tensor computed from constants and static dims only; None otherwise.
    `shapes`: symbolic shape inference's shapes, for tensors whose dims onnx's inference lost."""
    value = constant_value(tensor)
    if value is not None or depth > 32:
        return value
    entries = shape_vector(graph, tensor)
    if entries is not None:
        return np.array(entries, np.int64) if all(isinstance(e, int) for e in entries) else None
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op == "Gather":
        picked = _picked_dims(graph, node, shapes)
        if picked is not None:
            return picked
    operands = [known_value(graph, each, shapes, depth + 1) for each in node.inputs]
    if any(each is None for each in operands):
        return None
    if node.op in _COMPARISONS:
        return _COMPARISONS[node.op](*operands)
    if node.op == "Not":
        return np.logical_not(operands[0])
    if node.op in ("Identity", "Squeeze", "Unsqueeze", "Reshape") and operands[0].size == 1:
        return operands[0].reshape(())  # a one-element condition, whatever its rank
    if node.op == "Cast" and attr(node, "to") == 9:  # BOOL
        return operands[0].astype(bool)
    if node.op == "Gather" and attr(node, "axis", 0) == 0 and operands[0].ndim == 1:
        return operands[0][operands[1]]
    return None


def _picked_dims(graph: gs.Graph, node: gs.Node, shapes: dict[str, list]) -> np.ndarray | None:
    """Gather of static entries from a shape whose other dims may be symbolic."""
    entries, indices = shape_vector(graph, node.inputs[0]), constant_value(node.inputs[1])
    reader = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
    if entries is None and reader is not None and reader.op == "Shape" and not reader.attrs and reader.inputs[0].name in shapes:
        entries = [dim if isinstance(dim, int) and dim > 0 else None for dim in shapes[reader.inputs[0].name]]
    if entries is None or indices is None or attr(node, "axis", 0) != 0:
        return None
    if not all(-len(entries) <= i < len(entries) for i in indices.reshape(-1)):
        return None
    picked = [entries[int(i)] for i in indices.reshape(-1)]
    return np.array(picked, np.int64).reshape(indices.shape) if all(isinstance(e, int) for e in picked) else None


def inline_branch(graph: gs.Graph, node: gs.Node, branch: gs.Graph) -> None:
    """Replace If `node` by `branch`'s nodes; its outputs are computed by the branch's (via Identity,
    since a branch output may be an outer tensor or a constant)."""
    results = list(node.outputs)
    remove_node(graph, node)
    for inner in branch.nodes:
        inner.name = f"{node.name}/{inner.name}"
        graph.nodes.append(inner)
    for produced, result in zip(branch.outputs, results):
        result.dtype, result.shape = produced.dtype or result.dtype, None  # re-inferred from the branch
        new_node(graph, "Identity", f"{node.name}/result", [produced], [result])


@register_pass
class ResolveStaticIfs(Pass):
    name = "resolve-static-ifs"
    summary = "an If whose condition is decided by constants and static dims becomes the branch it takes"

    def call(self, model: Model) -> bool:
        changed = False
        # An If's results have unknown shapes until it is resolved, so a later If may be decided only
        # after re-inference.
        while self._resolve_decided(model):
            changed = True
            model.graph.cleanup(remove_unused_graph_inputs=False)
            model.graph = gs.import_onnx(model.to_onnx())
        return changed

    def _resolve_decided(self, model: Model) -> bool:
        graph = model.graph
        ifs = [n for n in graph.nodes if n.op == "If"]
        if not ifs:
            return False
        _, shapes, _ = symbolic_values(model.to_onnx())
        changed = False
        for node in ifs:
            condition = known_value(graph, node.inputs[0], shapes)
            if condition is None or condition.size != 1:
                continue
            taken = "then_branch" if bool(condition.reshape(-1)[0]) else "else_branch"
            inline_branch(graph, node, node.attrs[taken])
            self.note(f"{node.name}: always takes its {taken.split('_')[0]} branch")
            changed = True
        return changed
