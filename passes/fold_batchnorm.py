"""fold-batchnorm: inference BatchNormalization folded into the layer before it, or into a constant.

BatchNormalization(y) with constant scale, bias, mean and var is y * s + t per channel (axis 1), where
s = scale / sqrt(var + epsilon) and t = bias - mean * s. On a [batch, N] tensor the channel is the
feature, so after a fully connected layer with a constant weight:

    BN(Gemm(A, B_const, C_const, alpha, beta, transA, transB))  ->  Gemm(A, B * s, beta*C*s + t, alpha, beta=1)
    BN(MatMul(x[M, K], W_const[K, N]))                           ->  Gemm(x, W * s, t)

(B is scaled along N: its columns, or its rows with transB=1), when the layer's result is read by the BN
alone. A BN of a constant becomes a constant. Folded values are computed in float64.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import (
    attr,
    constant_value,
    input_at,
    is_graph_output,
    new_constant,
    producer,
    rank_of,
    remove_node,
    replace_all_uses,
    replace_node,
    unused,
)

FOLD_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) in float64 of an inference-mode BN with constant parameters, or None."""
    if bn.op != "BatchNormalization" or len(bn.inputs) != 5 or attr(bn, "training_mode", 0):
        return None
    params = [constant_value(tensor) for tensor in bn.inputs[1:]]
    if any(p is None or p.ndim != 1 or p.shape != params[0].shape for p in params):
        return None
    scale, bias, mean, var = (p.astype(np.float64) for p in params)
    s = scale / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return s, bias - mean * s


@register_pass
class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "inference BatchNormalization on [batch, N] after Gemm/MatMul with a constant weight -> folded into weight and bias; BN of a constant -> constant"

    def call(self, model: Model) -> bool:
        graph = model.graph
        changed = False
        for bn in list(graph.nodes):
            if not bn.outputs or any(not unused(graph, extra) for extra in bn.outputs[1:]):
                continue
            folded = affine(bn)
            if folded is None:
                continue
            s, t = folded
            x = bn.inputs[0]
            if constant_value(x) is not None:
                changed |= self._constant(graph, bn, constant_value(x), s, t)
            elif rank_of(x) == 2:
                changed |= self._gemm(graph, bn, s, t) or self._matmul(graph, bn, s, t)
        return changed

    def _constant(self, graph: gs.Graph, bn: gs.Node, x: np.ndarray, s: np.ndarray, t: np.ndarray) -> bool:
        result = bn.outputs[0]
        if is_graph_output(graph, result) or x.dtype not in FOLD_DTYPES or x.ndim < 2 or x.shape[1] != s.size:
            return False
        channel = (1, -1) + (1,) * (x.ndim - 2)
        values = (x.astype(np.float64) * s.reshape(channel) + t.reshape(channel)).astype(x.dtype)
        remove_node(graph, bn)
        replace_all_uses(graph, result, new_constant(graph, f"{bn.name}_folded", values))
        return True

    def _gemm(self, graph: gs.Graph, bn: gs.Node, s: np.ndarray, t: np.ndarray) -> bool:
        gemm = producer(graph, bn.inputs[0], "Gemm", single_use=True)
        if gemm is None:
            return False
        a, weight = gemm.inputs[0], constant_value(gemm.inputs[1])
        c = input_at(gemm, 2)
        c_values = np.zeros((), weight.dtype if weight is not None else np.float32) if c is None else constant_value(c)
        if weight is None or c_values is None or weight.dtype not in FOLD_DTYPES or weight.ndim != 2:
            return False
        trans_b = int(attr(gemm, "transB", 0))
        columns = weight.shape[0] if trans_b else weight.shape[1]
        if columns != s.size:
            return False
        scaled = weight.astype(np.float64) * (s[:, None] if trans_b else s[None, :])
        bias = float(attr(gemm, "beta", 1.0)) * c_values.astype(np.float64) * s + t
        self._replace(graph, bn, gemm, a, scaled.astype(weight.dtype), bias.astype(weight.dtype),
                      alpha=float(attr(gemm, "alpha", 1.0)), beta=1.0, transA=int(attr(gemm, "transA", 0)), transB=trans_b)
        return True

    def _matmul(self, graph: gs.Graph, bn: gs.Node, s: np.ndarray, t: np.ndarray) -> bool:
        matmul = producer(graph, bn.inputs[0], "MatMul", single_use=True)
        weight = None if matmul is None else constant_value(matmul.inputs[1])
        if weight is None or weight.dtype not in FOLD_DTYPES or weight.ndim != 2 or weight.shape[1] != s.size:
            return False
        if rank_of(matmul.inputs[0]) != 2:
            return False
        scaled = weight.astype(np.float64) * s[None, :]
        self._replace(graph, bn, matmul, matmul.inputs[0], scaled.astype(weight.dtype), t.astype(weight.dtype))
        return True

    def _replace(self, graph: gs.Graph, bn: gs.Node, layer: gs.Node, a: gs.Tensor, weight: np.ndarray, bias: np.ndarray, **attrs) -> None:
        """Replace BN(layer(a)) by Gemm(a, weight, bias): the BN's output keeps its name, the layer's name is reused."""
        name = layer.name
        inputs = [a, new_constant(graph, f"{name}_weight_bn", weight), new_constant(graph, f"{name}_bias_bn", bias)]
        remove_node(graph, layer)
        replace_node(graph, bn, "Gemm", inputs, **attrs).name = name

