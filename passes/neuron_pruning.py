"""neuron-pruning (lossy): remove the weakest units of every hidden fully connected layer.

In each hidden layer (a Gemm/MatMul with a constant weight whose result reaches only other such layers
through elementwise activations, as prune-dead-neurons defines it; never a layer whose result is a
graph output or reaches anything else), the floor(fraction * units) units with the smallest L2 norm of
their incoming weights (ties: the lower index first) are removed, with their bias entry and the
matching weight rows of the layers reading them. A layer keeps at least one unit. Layers are visited
once each, in topological order; a layer's norms are taken after its inputs were pruned.

A removed unit's contribution is dropped, not compensated: the accuracy guard measures the effect.
Layers whose bias is computed at run time are left alone.
"""

import math

import numpy as np

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.dense_layers import ConstantReplacer, dense_layer, hidden_layer, hidden_layers, keep_units


@register_pass
class NeuronPruning(Pass):
    name = "neuron-pruning"
    summary = "remove floor(fraction x units) units of each hidden FC layer, lowest incoming-weight L2 norm first, with the next layer's rows"
    lossless = False

    def __init__(self, fraction: float | None = None):
        if fraction is None:
            raise ValueError("needs a fraction (reccc --prune-neurons=FRACTION)")
        fraction = float(fraction)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), not {fraction}")
        self.fraction = fraction

    def call(self, model: Model) -> bool:
        graph = model.graph
        graph.toposort()
        names = [hidden.layer.node.name for hidden in hidden_layers(graph)]
        changed = False
        for name in names:
            node = next((node for node in graph.nodes if node.name == name), None)
            layer = None if node is None else dense_layer(graph, node)
            hidden = None if layer is None else hidden_layer(graph, layer)
            if hidden is None:
                continue
            units = layer.units
            if not layer.bias_known:
                self.note(f"{layer.name}: {units} units, left alone (bias computed at run time)")
                continue
            count = min(math.floor(self.fraction * units + 1e-9), units - 1)
            if count > 0:
                norms = np.linalg.norm(layer.incoming(), axis=0)
                removed = np.argsort(norms, kind="stable")[:count]
                constants = ConstantReplacer(graph)
                keep_units(graph, hidden, np.setdiff1d(np.arange(units), removed), constants)
                constants.finish()
                changed = True
            self.note(f"{layer.name}: {units} -> {units - count} units")
        if not names:
            self.note("no hidden FC layers")
        return changed
