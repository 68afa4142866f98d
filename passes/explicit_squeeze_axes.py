"""explicit-squeeze-axes: a Squeeze without axes gets the axes of its input's static 1-dims.

Without axes, Squeeze removes every dim that is 1 at run time, so its result's rank depends on the
batch: TVM imports it as R.squeeze(axis=None), which it cannot legalize on a symbolic dim. A symbolic
dim counts as not 1 here: that is the only reading in which the graph has one rank for every batch
(at batch 1, onnxruntime squeezes the batch dim too, and such graphs typically fail there, e.g.
deepctr-torch's DCN-Mix).
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import new_constant, replace_node, shape_of


@register_pass
class ExplicitSqueezeAxes(Pass):
    name = "explicit-squeeze-axes"
    summary = "Squeeze without axes squeezes its input's static 1-dims (a symbolic dim counts as not 1)"

    def call(self, model: Model) -> bool:
        changed = False
        # onnx's shape inference leaves what follows a Squeeze without axes unknown: fixing one gives the
        # next its input shape, after re-inference.
        while self._fix_known(model):
            changed = True
            model.graph = gs.import_onnx(model.to_onnx())
        return changed

    def _fix_known(self, model: Model) -> bool:
        graph = model.graph
        changed = False
        for node in [n for n in graph.nodes if n.op == "Squeeze" and len(n.inputs) == 1 and "axes" not in n.attrs]:
            shape = shape_of(node.inputs[0])
            if shape is None or any(dim is None for dim in shape):
                continue
            axes = [axis for axis, dim in enumerate(shape) if dim == 1]
            if axes:
                replace_node(graph, node, "Squeeze", [node.inputs[0], new_constant(graph, f"{node.name}_axes", np.array(axes, np.int64))])
            else:
                replace_node(graph, node, "Identity", [node.inputs[0]])
            self.note(f"{node.name}: axes {axes}")
            changed = True
        return changed
