"""reject-baked-dims: a graph whose inputs declare a symbolic dim that its nodes fixed at export time is
a usage error naming the dim and the size it really has, instead of an artifact that fails later.

The TorchScript exporter traces one batch: torchrec's EmbeddingBagCollection then splits the flat ids
into constant sizes (batch × ids per table at the traced batch), so the model runs at that batch only
(onnxruntime too fails at any other), although its inputs say the batch is free. A Split with
constant sizes along a dim that onnxruntime's symbolic shape inference computes from input dims
pins those dims: the sizes' sum must equal that dim.
"""

import numpy as np
import onnx_graphsurgeon as gs
import sympy

from reccc.errors import UsageError
from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import attr, constant_value, input_at
from reccc.passes.symbolic_shapes import symbolic_values


def _input_dims(graph: gs.Graph) -> dict[str, tuple[str, list]]:
    """dim_param -> (an input that has it, that input's declared dims)."""
    found = {}
    for tensor in graph.inputs:
        for dim in tensor.shape or ():
            if isinstance(dim, str) and dim:
                found.setdefault(dim, (tensor.name, list(tensor.shape)))
    return found


def _split_sizes(node: gs.Node) -> np.ndarray | None:
    sizes = constant_value(input_at(node, 1)) if input_at(node, 1) is not None else attr(node, "split")
    return None if sizes is None else np.asarray(sizes, np.int64).reshape(-1)


def _pinned(dim, total: int, symbols: set[str]) -> dict[str, int] | None:
    """The input dims a symbolic `dim` (e.g. '9*batch') must take so that it equals `total`."""
    if not isinstance(dim, str) or not dim:
        return None
    try:
        expression = sympy.sympify(dim)
    except (sympy.SympifyError, TypeError):
        return None
    free = {str(s) for s in expression.free_symbols}
    if len(free) != 1 or not free <= symbols:
        return None
    symbol = next(iter(expression.free_symbols))
    solutions = [s for s in sympy.solve(sympy.Eq(expression, total), symbol) if s.is_integer and s > 0]
    return {str(symbol): int(solutions[0])} if len(solutions) == 1 else None


@register_pass
class RejectBakedDims(Pass):
    name = "reject-baked-dims"
    summary = "a symbolic input dim that a node fixed at export (Split into constant sizes) is a usage error naming its real size"

    def requires(self, model: Model) -> None:
        graph = model.graph
        splits = [n for n in graph.nodes if n.op == "Split" and _split_sizes(n) is not None]
        symbols = _input_dims(graph)
        if not splits or not symbols:
            return
        _, shapes, _ = symbolic_values(model.to_onnx())
        for node in splits:
            shape = shapes.get(node.inputs[0].name)
            axis = attr(node, "axis", 0)
            if not shape or not -len(shape) <= axis < len(shape):
                continue
            sizes = _split_sizes(node)
            pinned = _pinned(shape[axis], int(sizes.sum()), set(symbols))
            if pinned is None:
                continue
            (symbol, size), = pinned.items()
            name, dims = symbols[symbol]
            fixed = ",".join(str(size if d == symbol else d) for d in dims)
            raise UsageError(
                f"{model.source}: dim '{symbol}' is declared symbolic but is really {size}: node '{node.name}' "
                f"splits a dim of {shape[axis]} into the fixed sizes {sizes.tolist()} (the exporter traced "
                f"{symbol} = {size}; the model fails at any other). Re-export it with a dynamic {symbol}, "
                f"or build it for that size: --input-shape {name}={fixed}"
            )

    def call(self, model: Model) -> bool:
        return False
