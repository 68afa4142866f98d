"""legalize-embedding-bags: the ONNX Loop that torch's dynamo exporter writes for an EmbeddingBag
(torchrec's EmbeddingBagCollection: one per table) becomes a gather plus a segment reduction.

The exported loop runs once per bag: it slices the gathered rows between offsets[i] and offsets[i+1],
reduces them (ReduceSum, ReduceMean, ReduceMax; an empty bag gives zeros) and appends the row to a
sequence that ConcatFromSequence stacks. TVM imports no Loop. The replacement reads the same gathered
rows [P, D] and offsets [N+1]: a bag-membership matrix M[i, p] = offsets[i] <= p < offsets[i+1], then
sum = M @ rows, mean = sum / max(length, 1), max = the masked maximum (0 for an empty bag). Bags may
have any lengths, empty ones included. M costs N×P (bags × ids), which a fused segment-reduction
kernel would avoid.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import attr, consumers, fresh_name, new_constant, new_node, remove_node

_REDUCTIONS = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max"}


def _subgraph_nodes(graph: gs.Graph):
    """The nodes of `graph` and of every subgraph inside it."""
    for node in graph.nodes:
        yield node
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from _subgraph_nodes(value)


def _match(graph: gs.Graph, loop: gs.Node) -> tuple[gs.Tensor, gs.Tensor, str, gs.Node] | None:
    """(offsets, gathered rows, reduction, the ConcatFromSequence of the loop's results) or None."""
    body = attr(loop, "body")
    if body is None or not loop.outputs:
        return None
    readers = consumers(loop.outputs[0])
    if len(readers) != 1 or readers[0].op != "ConcatFromSequence" or attr(readers[0], "axis") != 0 or attr(readers[0], "new_axis", 0):
        return None
    local = {t.name for node in _subgraph_nodes(body) for t in node.outputs} | {t.name for t in body.inputs}
    bounds = [n for n in body.nodes if n.op == "Slice" and n.inputs[0].name not in local]
    offsets = {n.inputs[0].name: n.inputs[0] for n in bounds}
    if len(bounds) != 2 or len(offsets) != 1:
        return None
    start, end = bounds[0].outputs[0], bounds[1].outputs[0]
    nodes = list(_subgraph_nodes(body))
    windows = [n for n in nodes if n.op == "Slice" and n.inputs[1:3] == [start, end] and n.inputs[0].name not in local]
    if len(windows) != 1:
        return None
    window = windows[0].outputs[0]
    reductions = {n.op for n in nodes if n.op in _REDUCTIONS and n.inputs[0] is window}
    if not reductions:
        return None
    mode = "mean" if "ReduceMean" in reductions else _REDUCTIONS[sorted(reductions)[0]]
    return next(iter(offsets.values())), windows[0].inputs[0], mode, readers[0]


class _Emitter:
    def __init__(self, graph: gs.Graph, base: str):
        self.graph, self.base = graph, base
        self.constants = 0

    def const(self, values) -> gs.Constant:
        # Numbered: a constant joins the graph only with the node that reads it, so fresh_name alone
        # would give two constants of one node the same name.
        self.constants += 1
        return new_constant(self.graph, f"{self.base}_c{self.constants}", np.asarray(values))

    def op(self, op: str, inputs: list[gs.Tensor], dtype=None, out: gs.Tensor | None = None, **attrs) -> gs.Tensor:
        result = out if out is not None else gs.Variable(fresh_name(self.graph, f"{self.base}_{op.lower()}"), dtype)
        new_node(self.graph, op, f"{self.base}_{op.lower()}", inputs, [result], **attrs)
        return result


def segment_reduce(graph: gs.Graph, base: str, offsets: gs.Tensor, rows: gs.Tensor, mode: str, out: gs.Tensor) -> None:
    """Write into `out` the `mode` reduction of `rows` over the bags that `offsets` delimits."""
    e = _Emitter(graph, base)
    i64, dtype = np.int64, rows.dtype or np.float32
    starts = e.op("Slice", [offsets, e.const(np.array([0], i64)), e.const(np.array([-1], i64))], i64)
    ends = e.op("Slice", [offsets, e.const(np.array([1], i64)), e.const(np.array([np.iinfo(i64).max], i64))], i64)
    count = e.op("Squeeze", [e.op("Shape", [rows], i64, start=0, end=1), e.const(np.array([0], i64))], i64)
    positions = e.op("Unsqueeze", [e.op("Range", [e.const(np.array(0, i64)), count, e.const(np.array(1, i64))], i64),
                                   e.const(np.array([0], i64))], i64)                      # [1, P]
    column = np.array([1], i64)
    inside = e.op("And", [e.op("GreaterOrEqual", [positions, e.op("Unsqueeze", [starts, e.const(column)], i64)], bool),
                          e.op("Less", [positions, e.op("Unsqueeze", [ends, e.const(column)], i64)], bool)], bool)  # [N, P]
    lengths = e.op("Unsqueeze", [e.op("Sub", [ends, starts], i64), e.const(column)], i64)           # [N, 1]
    if mode == "max":
        lowest = e.const(np.array(-np.inf, dtype))
        masked = e.op("Where", [e.op("Unsqueeze", [inside, e.const(np.array([2], i64))], bool),
                                e.op("Unsqueeze", [rows, e.const(np.array([0], i64))], dtype), lowest], dtype)
        peak = e.op("ReduceMax", [masked, e.const(np.array([1], i64))], dtype, keepdims=0)
        nonempty = e.op("Greater", [lengths, e.const(np.array(0, i64))], bool)
        e.op("Where", [nonempty, peak, e.const(np.array(0, dtype))], out=out)
        return
    weights = e.op("Cast", [inside], dtype, to=_onnx_type(dtype))
    if mode == "sum":
        e.op("MatMul", [weights, rows], out=out)
        return
    total = e.op("MatMul", [weights, rows], dtype)
    divisor = e.op("Cast", [e.op("Max", [lengths, e.const(np.array(1, i64))], i64)], dtype, to=_onnx_type(dtype))
    e.op("Div", [total, divisor], out=out)


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


@register_pass
class LegalizeEmbeddingBags(Pass):
    name = "legalize-embedding-bags"
    summary = "an exported EmbeddingBag Loop (per-bag slice + reduce) becomes a gather plus a segment reduction"

    def call(self, model: Model) -> bool:
        graph = model.graph
        changed = False
        for loop in [n for n in graph.nodes if n.op == "Loop"]:
            matched = _match(graph, loop)
            if matched is None:
                continue
            offsets, rows, mode, stack = matched
            out = stack.outputs[0]
            remove_node(graph, stack)
            remove_node(graph, loop)
            segment_reduce(graph, loop.name, offsets, rows, mode, out)
            self.note(f"{loop.name}: {mode} over bags")
            changed = True
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)
            model.graph = gs.import_onnx(model.to_onnx())
        return changed
