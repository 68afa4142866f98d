"""prune-dead-neurons: remove units of hidden fully connected layers whose removal cannot change an output.

A hidden layer is a Gemm/MatMul with a constant weight whose result reaches only other such layers
(as their input A), through elementwise activations (Relu, LeakyRelu, Sigmoid, Tanh, Elu, Selu,
HardSigmoid, Softplus, Clip with constant bounds, ...) each read once, no tensor on the way being a
graph output (see passes/dense_layers.py). Unit j of such a layer is removed, with its weight column
(row when transB=1), its bias entry and row j of every reader's weight, when

  (a) its incoming weights are all zero, so it outputs the constant v = f(beta * C_j) (f: the
      activation chain; alpha and beta as the Gemm applies them), and
        - v == 0 (a zero bias under Relu, Tanh, LeakyRelu, Identity, ...; a negative one under Relu):
          it contributes nothing, or
        - v != 0 and finite (Sigmoid's 0.5, a positive bias under Relu): its contribution v * W2[j, :]
          is a constant, folded into each reader's bias (a Gemm's C, beta becoming 1; a MatMul's Add,
          or a new Add when it has none); or
  (b) every reader's weight row j is zero: nobody reads it.

A layer keeps at least one unit. Removing units can make more units constant (a reader's unit whose
only nonzero weights read folded units), so the pass repeats until nothing changes: a second call
changes nothing.

Exact for finite inputs, up to the rounding of the folded sum (the sum is reassociated). With Inf or
NaN in the inputs, 0 * Inf = NaN would have reached the outputs through a dead unit's zero weights;
after the pass it does not.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.dense_layers import ConstantReplacer, Hidden, add_to_bias, hidden_layers, keep_units


@register_pass
class PruneDeadNeurons(Pass):
    name = "prune-dead-neurons"
    summary = (
        "remove hidden FC units with zero incoming weights (their constant output, e.g. Sigmoid's 0.5, folded into "
        "the next layer's bias) or zero outgoing weights, with the next layer's matching weight rows; exact"
    )

    def __init__(self):
        self._layers: dict[str, dict] = {}

    def details(self) -> list[str]:
        lines = []
        for name, r in self._layers.items():
            reasons = [f"{r[key]} {label}" for key, label in (
                ("zero", "output 0"), ("folded", "constant, folded into the next layer's bias"), ("unread", "unread"),
            ) if r[key]]
            lines.append(f"{name}: {r['before']} -> {r['after']} units ({', '.join(reasons)})")
        return lines

    def call(self, model: Model) -> bool:
        self._layers = {}
        graph = model.graph
        changed = False
        progress = True
        while progress:
            progress = False
            for hidden in hidden_layers(graph):
                if self._prune(graph, hidden):
                    progress = changed = True
                    break  # tensors and weights changed: match again
        if changed:
            graph.toposort()
        return changed

    def _prune(self, graph: gs.Graph, hidden: Hidden) -> bool:
        layer, readers = hidden.layer, hidden.readers
        if not layer.bias_known:
            return False
        constant = ~layer.incoming().any(axis=0)
        values = hidden.activation(layer.unit_bias())
        finite = np.isfinite(values)
        unread = np.logical_and.reduce([~reader.incoming().any(axis=1) for reader in readers])
        zero = constant & (values == 0)
        foldable = constant & ~zero & finite & all(reader.bias_known for reader in readers)
        remove = (unread & ~(constant & ~finite)) | zero | foldable
        if remove.all():  # keep one unit, preferably one that needs no folding
            plain = np.flatnonzero(remove & ~(foldable & ~unread))
            remove[plain[0] if plain.size else 0] = False
        if not remove.any():
            return False
        fold = remove & foldable & ~unread
        constants = ConstantReplacer(graph)
        for reader in readers:
            if fold.any():
                delta = values[fold] @ reader.incoming()[fold, :]
                if delta.any():
                    add_to_bias(graph, reader, delta, constants)
        keep_units(graph, hidden, np.flatnonzero(~remove), constants)
        constants.finish()

        record = self._layers.setdefault(layer.name, {"before": layer.units, "zero": 0, "folded": 0, "unread": 0})
        record["after"] = int((~remove).sum())
        record["zero"] += int((remove & zero & ~unread).sum())
        record["folded"] += int(fold.sum())
        record["unread"] += int((remove & unread).sum())
        return True
