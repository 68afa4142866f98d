"""constant-folding: evaluate every subgraph whose inputs are all constants, in onnxruntime.

Uses graphsurgeon's folder, including its shape folding: Shape of a tensor with static dims becomes a
constant, while anything that depends on a symbolic (batch) dim stays computed at run time. The nodes
whose outputs were all folded are removed, since ONNX forbids a node without outputs.

Constants over MAX_FOLDED_INPUT_BYTES (embedding tables) are hidden from the folder: it would copy
them into the model it hands onnxruntime, and what it could compute from a whole table is rarely
worth a copy of it.
"""

import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from reccc.external_data import MappedValues
from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.graph_delta import structure

MAX_FOLDED_INPUT_BYTES = 64 << 20


@register_pass
class ConstantFolding(Pass):
    name = "constant-folding"
    summary = "replace tensors computable from constants alone by constants; batch dims stay symbolic; tables over 64 MiB are not read"

    def call(self, model: Model) -> bool:
        before = structure(model.graph)
        severity = G_LOGGER.severity
        G_LOGGER.severity = G_LOGGER.CRITICAL  # nodes it cannot fold are reported as warnings: expected
        hidden = _hide_large_constants(model.graph)
        try:
            model.graph.fold_constants(fold_shapes=True, error_ok=True)
        finally:
            G_LOGGER.severity = severity
            _restore(model.graph, hidden)
        model.graph.cleanup(remove_unused_graph_inputs=False)
        return structure(model.graph) != before


def _hide_large_constants(graph: gs.Graph) -> dict[int, tuple[gs.Variable, gs.Constant]]:
    """Replace each constant over MAX_FOLDED_INPUT_BYTES in the nodes' inputs by a Variable of the same
    name, shape and dtype (which the folder treats as computed at run time); returns them by the
    Variable's id."""
    outputs = {id(tensor) for tensor in graph.outputs}
    hidden = {}
    for node in graph.nodes:
        for position, tensor in enumerate(node.inputs):
            if id(tensor) in hidden:
                node.inputs[position] = hidden[id(tensor)][0]
            elif isinstance(tensor, gs.Constant) and id(tensor) not in outputs and _nbytes(tensor) > MAX_FOLDED_INPUT_BYTES:
                placeholder = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
                hidden[id(tensor)] = (placeholder, tensor)
                node.inputs[position] = placeholder
            elif isinstance(tensor, gs.Constant) and isinstance(tensor._values, MappedValues):
                # Mapped from its file: load (map) it, so that graphsurgeon hands onnxruntime its values
                # and not the reference to the file, which onnxruntime refuses.
                tensor.values
    return {id(placeholder): (placeholder, constant) for placeholder, constant in hidden.values()}


def _restore(graph: gs.Graph, hidden: dict[int, tuple[gs.Variable, gs.Constant]]) -> None:
    for node in graph.nodes:
        for position, tensor in enumerate(node.inputs):
            if id(tensor) in hidden:
                node.inputs[position] = hidden[id(tensor)][1]


def _nbytes(constant: gs.Constant) -> int:
    """The constant's size without reading its values (graphsurgeon's lazy values know it)."""
    return constant._values.nbytes
