"""magnitude-pruning (lossy): zero the small weights of fully connected layers.

Every weight w with |w| < threshold in the constant rank-2 float weight (input B) of a Gemm or MatMul
whose input A is computed at run time becomes 0. Biases, embedding tables and every other constant are
untouched: a weight is pruned only when all its readers are such layers, reading it as their weight (a
matrix also read as an embedding table, tied weights, stays). Weights computed at run time (a
Transpose of a constant before constant-folding) are not constants yet: run constant-folding first.

The zeros do not shrink the model by themselves; prune-dead-neurons then removes units whose whole
incoming weight vector became zero. details() reports the sparsity (fraction of zeros) of each weight
and over all FC weights.
"""

import math

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.dense_layers import FC_OPS, ConstantReplacer
from reccc.passes.patterns import constant_value, consumers, is_graph_output


def fc_weights(graph: gs.Graph) -> list[tuple[gs.Tensor, np.ndarray, list[gs.Node]]]:
    """(weight tensor, its values, the layers reading it) for every FC weight all of whose readers are
    Gemm/MatMul nodes reading it as input B, in graph order."""
    found, seen = [], set()
    for node in graph.nodes:
        if node.op not in FC_OPS or len(node.inputs) < 2 or id(node.inputs[1]) in seen:
            continue
        weight = node.inputs[1]
        seen.add(id(weight))
        values = constant_value(weight)
        if values is None or values.ndim != 2 or not np.issubdtype(values.dtype, np.floating) or is_graph_output(graph, weight):
            continue
        readers = consumers(weight)
        if all(
            reader.op in FC_OPS
            and reader.domain in (None, "", "ai.onnx")
            and [i for i, t in enumerate(reader.inputs) if t is weight] == [1]
            and constant_value(reader.inputs[0]) is None
            for reader in readers
        ):
            found.append((weight, values, readers))
    return found


@register_pass
class MagnitudePruning(Pass):
    name = "magnitude-pruning"
    summary = "zero FC weights (constant rank-2 B of Gemm/MatMul) with |w| < threshold; biases and tables untouched; reports sparsity"
    lossless = False

    def __init__(self, threshold: float | None = None):
        if threshold is None:
            raise ValueError("needs a threshold (reccc --prune-threshold=T)")
        threshold = float(threshold)
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, not {threshold}")
        self.threshold = threshold

    def call(self, model: Model) -> bool:
        graph = model.graph
        constants = ConstantReplacer(graph)
        total, zeros_before, zeros_after = 0, 0, 0
        changed = False
        for weight, values, readers in fc_weights(graph):
            small = (np.abs(values) < self.threshold) & (values != 0)
            before = int(values.size - np.count_nonzero(values))
            after = before + int(small.sum())
            total, zeros_before, zeros_after = total + values.size, zeros_before + before, zeros_after + after
            if small.any():
                constants.replace(weight, np.where(small, values.dtype.type(0), values))
                changed = True
            layers = ", ".join(f"{reader.op} '{reader.name}'" for reader in readers)
            shape = "x".join(str(d) for d in values.shape)
            self.note(
                f"{layers}: weight '{weight.name}' {shape}: sparsity {before / values.size:.3f} -> {after / values.size:.3f}"
            )
        constants.finish()
        if total:
            self.note(
                f"overall: {zeros_after} of {total} FC weights zero, sparsity {zeros_before / total:.3f} -> "
                f"{zeros_after / total:.3f} (threshold {self.threshold:g})"
            )
        else:
            self.note("no FC weights")
        return changed
