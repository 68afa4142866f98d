"""fold-transpose-into-gemm: Transposes feeding Gemm and MatMul become Gemm attributes or constants.

    Gemm(A, Transpose(B), transB=t)    ->  Gemm(A, B, transB=1-t)      (likewise A with transA)
    MatMul(x, Transpose(W_const))      ->  MatMul(x, W_const transposed, stored as a new constant)

Gemm takes any 2-D Transpose (the flag costs nothing and copies no weight); MatMul only a Transpose of
a constant that nothing else reads, so no weight is stored twice. A Transpose left unread is removed.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import attr, constant_value, new_constant, producer, rank_of, remove_if_unused


def _is_2d_swap(transpose: gs.Node) -> bool:
    perm = attr(transpose, "perm")
    if perm is None:  # the default perm reverses the dims
        return rank_of(transpose.inputs[0]) == 2
    return list(perm) == [1, 0]


@register_pass
class FoldTransposeIntoGemm(Pass):
    name = "fold-transpose-into-gemm"
    summary = "Gemm(A, Transpose(B)) -> Gemm(A, B) with transB flipped (and transA); MatMul(x, Transpose(W_const)) -> MatMul(x, W^T)"

    def call(self, model: Model) -> bool:
        graph = model.graph
        changed = False
        for node in list(graph.nodes):
            if node.op == "Gemm" and node.outputs:
                for index, flag in ((0, "transA"), (1, "transB")):
                    while (transpose := producer(graph, node.inputs[index], "Transpose")) and _is_2d_swap(transpose):
                        node.inputs[index] = transpose.inputs[0]
                        node.attrs[flag] = 1 - int(attr(node, flag, 0))
                        remove_if_unused(graph, transpose)
                        changed = True
            elif node.op == "MatMul" and node.outputs:
                for index in (0, 1):
                    transpose = producer(graph, node.inputs[index], "Transpose", single_use=True)
                    weight = None if transpose is None else constant_value(transpose.inputs[0])
                    if weight is None:
                        continue
                    perm = attr(transpose, "perm")
                    transposed = np.transpose(weight, None if perm is None else list(perm))
                    node.inputs[index] = new_constant(graph, f"{transpose.inputs[0].name}_transposed", transposed)
                    remove_if_unused(graph, transpose)
                    changed = True
        return changed
