"""constant-folding: evaluate every subgraph whose inputs are all constants, in onnxruntime.

Uses graphsurgeon's folder, including its shape folding: Shape of a tensor with static dims becomes a
constant, while anything that depends on a symbolic (batch) dim stays computed at run time. The nodes
whose outputs were all folded are removed, since ONNX forbids a node without outputs.
"""

from onnx_graphsurgeon.logger import G_LOGGER

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.graph_delta import structure


@register_pass
class ConstantFolding(Pass):
    name = "constant-folding"
    summary = "replace tensors computable from constants alone by constants; batch dims stay symbolic"

    def call(self, model: Model) -> bool:
        before = structure(model.graph)
        severity = G_LOGGER.severity
        G_LOGGER.severity = G_LOGGER.CRITICAL  # nodes it cannot fold are reported as warnings: expected
        try:
            model.graph.fold_constants(fold_shapes=True, error_ok=True).cleanup(remove_unused_graph_inputs=False)
        finally:
            G_LOGGER.severity = severity
        return structure(model.graph) != before
