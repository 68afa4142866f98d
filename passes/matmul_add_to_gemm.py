"""matmul-add-to-gemm: a fully connected layer written as MatMul then Add becomes one Gemm.

    Add(MatMul(x[M, K], W_const[K, N]), bias_const)   ->  Gemm(x, W_const, bias_const)

when x has rank 2 (MatMul of higher rank is batched, Gemm is not), the MatMul's result is read by the
Add alone, the bias broadcasts to [N] along the rows (shape [], [1], [N], [1, 1] or [1, N]), and the
dtype is float or double. The Add's output keeps its name.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import constant_value, dtype_of, producer, rank_of, remove_node, replace_node

GEMM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _row_bias(bias: np.ndarray, columns: int) -> bool:
    """Broadcasts unidirectionally to [M, columns] for any M, as Gemm's C must."""
    if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
        return False
    return bias.ndim == 0 or bias.shape[-1] in (1, columns)


def match(graph: gs.Graph, add: gs.Node) -> tuple[gs.Node, gs.Tensor] | None:
    """(the MatMul, the bias tensor) of a fusable Add, or None."""
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    for product, bias in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        matmul = producer(graph, product, "MatMul", single_use=True)
        if matmul is None:
            continue
        x, weight, bias_values = matmul.inputs[0], constant_value(matmul.inputs[1]), constant_value(bias)
        if weight is None or bias_values is None or weight.ndim != 2 or rank_of(x) != 2:
            continue
        if not (dtype_of(x) == weight.dtype == bias_values.dtype and weight.dtype in GEMM_DTYPES):
            continue
        if _row_bias(bias_values, weight.shape[1]):
            return matmul, bias
    return None


@register_pass
class MatMulAddToGemm(Pass):
    name = "matmul-add-to-gemm"
    summary = "Add(MatMul(x[M,K], W_const), bias_const) -> Gemm(x, W, bias) for rank-2 x and a row bias; the Add's output keeps its name"

    def call(self, model: Model) -> bool:
        graph = model.graph
        changed = False
        for add in list(graph.nodes):
            found = add.outputs and match(graph, add)
            if not found:
                continue
            matmul, bias = found
            x, weight, name = matmul.inputs[0], matmul.inputs[1], matmul.name
            remove_node(graph, matmul)
            replace_node(graph, add, "Gemm", [x, weight, bias]).name = name
            changed = True
        return changed
