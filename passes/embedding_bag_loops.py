"""legalize-embedding-bags: the ONNX Loop that torch's dynamo exporter writes for an EmbeddingBag
(torchrec's EmbeddingBagCollection: one per table) becomes a gather plus a reduction over each bag.

The exported loop runs once per bag: it slices the gathered rows between offsets[i] and offsets[i+1],
reduces them (ReduceSum, ReduceMean, ReduceMax; an empty bag gives zeros) and appends the row to a
sequence that ConcatFromSequence stacks. TVM imports no Loop. The replacement reads the same gathered
rows [P, D] and offsets [N+1], in one of two forms:

- Bags of one length L (offsets = 0, L, 2L, ..., with P = N×L ids), as torchrec's dynamo exports of a
  KeyedJaggedTensor of `full()` lengths give them: the rows as [N, L, D] (the table gathered for the
  ids shaped [N, L], times the per-sample weights shaped alike) reduced over axis 1. That costs what
  the lookup costs, and reccc's lookup fusion makes the gather and the pooling one kernel per table.
  legalize-batch-arithmetic's evaluator proves the offsets' form and P (its shapes do not take a
  Split by run-time sizes to be even, as onnxruntime's do).
- Any other bags, of any lengths, empty ones included: a bag-membership matrix
  M[i, p] = offsets[i] <= p < offsets[i+1], then sum = M @ rows, mean = sum / max(length, 1) (the
  last bag's length counted to P, as the loop counts it), max = the masked maximum (0 for an empty
  bag). M costs N×P (bags × ids, which grows with the batch squared), which a fused segment-reduction
  kernel would avoid. Offsets past P (more bag than ids, which torch rejects) are not matched.
"""

import numpy as np
import onnx_graphsurgeon as gs
import sympy

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.batch_arithmetic import Evaluator, Progression
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
    # The exported loop divides the last bag's sum by P - its start: ids past offsets[N] count there.
    counted_ends = e.op("Concat", [e.op("Slice", [offsets, e.const(np.array([1], i64)), e.const(np.array([-1], i64))], i64),
                                   e.op("Shape", [rows], i64, start=0, end=1)], i64, axis=0)
    counts = e.op("Unsqueeze", [e.op("Sub", [counted_ends, starts], i64), e.const(column)], i64)
    divisor = e.op("Cast", [e.op("Max", [counts, e.const(np.array(1, i64))], i64)], dtype, to=_onnx_type(dtype))
    e.op("Div", [total, divisor], out=out)


def fixed_length(evaluator: Evaluator, offsets: gs.Tensor, rows: gs.Tensor) -> tuple[int, int] | None:
    """(L, D) where `offsets` are 0, L, 2L, ..., N×L for a static L >= 1 and `rows` is [N×L, D] with a
    static D, as `evaluator` (run on the graph) proves them; else None."""
    value = evaluator.value(offsets)
    offsets_shape, rows_shape = evaluator.shapes.get(offsets.name), evaluator.shapes.get(rows.name)
    if not (isinstance(value, Progression) and value.axis == 0 and value.start == 0 and value.step.is_Integer
            and value.step >= 1 and offsets_shape is not None and len(offsets_shape) == 1
            and rows_shape is not None and len(rows_shape) == 2 and rows_shape[1].is_Integer):
        return None
    # All ids in bags: a row beyond the last bag would change the exported mean of the last bag, which
    # divides by P - offsets[N-1]; fewer rows than N×L would leave bags short.
    if sympy.expand(rows_shape[0] - value.step * (offsets_shape[0] - 1)) != 0:
        return None
    return int(value.step), int(rows_shape[1])


def pool_fixed_bags(graph: gs.Graph, base: str, evaluator: Evaluator, rows: gs.Tensor, length: int, dim: int, mode: str,
                    opset: int, out: gs.Tensor) -> None:
    """Write into `out` the `mode` reduction of each `length` consecutive rows of `rows` (width `dim`).

    In the form reccc's lookup fusion makes one kernel of, with the gather: a Gather of ids shaped
    [N, L] and a reduction (sum; mean as sum / L; max) over axis 1. TVM gives a Reshape of the gathered
    rows, with a symbolic batch, an opaque pattern that ends the fused lookup, and a mean the pattern
    of a reduction with an epilogue, which the lookup fusion does not take."""
    e = _Emitter(graph, base)
    bags = _as_bags(e, evaluator, rows, length, dim)
    if mode == "mean":
        total = e.op("ReduceSum", [bags, e.const(np.array([1], np.int64))], rows.dtype, keepdims=0)
        e.op("Div", [total, e.const(np.array(length, rows.dtype or np.float32))], out=out)
    elif mode == "sum":
        e.op("ReduceSum", [bags, e.const(np.array([1], np.int64))], out=out, keepdims=0)
    elif opset >= 18:  # ReduceMax's axes became an input in opset 18
        e.op("ReduceMax", [bags, e.const(np.array([1], np.int64))], out=out, keepdims=0)
    else:
        e.op("ReduceMax", [bags], out=out, axes=[1], keepdims=0)


def _as_bags(e: "_Emitter", evaluator: Evaluator, rows: gs.Tensor, length: int, width: int) -> gs.Tensor:
    """`rows` [P, width] as [P / length, length, width]: a Gather along axis 0 of 1-D ids gathers the
    ids reshaped instead, and an elementwise op (per-sample weights) is computed on its operands
    reshaped (those of P rows; others broadcast as they did, and one constant Expanded as itself);
    anything else is Reshaped."""
    producer = rows.inputs[0] if rows.inputs else None
    shape = evaluator.shapes.get(rows.name)
    if producer is not None and producer.op == "Gather" and producer.attrs.get("axis", 0) == 0 and evaluator.rank(producer.inputs[1]) == 1:
        ids = e.op("Reshape", [producer.inputs[1], e.const(np.array([-1, length], np.int64))], producer.inputs[1].dtype)
        return e.op("Gather", [producer.inputs[0], ids], rows.dtype, axis=0)
    if producer is not None and producer.op in ("Mul", "Add", "Sub", "Div") and shape is not None:
        operands = []
        for operand in producer.inputs:
            operand_shape = evaluator.shapes.get(operand.name)
            if operand_shape is None:
                break
            if _one_constant(operand) is not None:
                operands.append(_one_constant(operand))
            elif len(operand_shape) == 2 and sympy.expand(operand_shape[0] - shape[0]) == 0 and operand_shape[1].is_Integer:
                operands.append(_as_bags(e, evaluator, operand, length, int(operand_shape[1])))
            elif len(operand_shape) < 2 or operand_shape[0] == 1:
                operands.append(operand)  # broadcast along the rows, as [N, L, width] broadcasts it
            else:
                break
        else:
            return e.op(producer.op, operands, rows.dtype)
    return e.op("Reshape", [rows, e.const(np.array([-1, length, width], np.int64))], rows.dtype)


def _one_constant(tensor: gs.Tensor) -> gs.Constant | None:
    """The one-element constant that `tensor` Expands (through Unsqueezes), as torch's exporter writes
    per-sample weights of 1: that constant broadcasts against the bags to the same values, inside the
    lookup kernel, where the Expand reshaped to [N, L, 1] would add two kernels per table."""
    while tensor.inputs and tensor.inputs[0].op in ("Expand", "Unsqueeze"):
        tensor = tensor.inputs[0].inputs[0]
    return tensor if isinstance(tensor, gs.Constant) and tensor.values.size == 1 else None


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


@register_pass
class LegalizeEmbeddingBags(Pass):
    name = "legalize-embedding-bags"
    summary = ("an exported EmbeddingBag Loop (per-bag slice + reduce) becomes a gather plus a reduction over each "
               "bag: a Gather of [bags, length] ids and a Reduce for bags of one length, a bag-membership matrix otherwise")

    def call(self, model: Model) -> bool:
        graph = model.graph
        bags = []
        for loop in [n for n in graph.nodes if n.op == "Loop"]:
            matched = _match(graph, loop)
            if matched is None:
                continue
            offsets, rows, mode, stack = matched
            out = stack.outputs[0]
            remove_node(graph, stack)
            remove_node(graph, loop)
            # Every bag in the form for any lengths first: onnxruntime's shape inference, which the
            # evaluator reads, stops at the first Loop.
            segment_reduce(graph, loop.name, offsets, rows, mode, out)
            bags.append((loop.name, offsets, rows, mode, out))
        if not bags:
            return False
        graph.cleanup(remove_unused_graph_inputs=False)
        evaluator = Evaluator(model)
        evaluator.run(graph)
        for name, offsets, rows, mode, out in bags:
            fixed = fixed_length(evaluator, offsets, rows)
            if fixed is None:
                self.note(f"{name}: {mode} over bags of any length")
                continue
            # The membership form's last node gives up `out` and, unread, goes with the rest of it.
            out.inputs[0].outputs = [gs.Variable(fresh_name(graph, f"{name}_unused"), out.dtype)]
            pool_fixed_bags(graph, name, evaluator, rows, *fixed, mode, model.opset, out)
            self.note(f"{name}: {mode} over bags of {fixed[0]} ids")
        graph.cleanup(remove_unused_graph_inputs=False)
        model.graph = gs.import_onnx(model.to_onnx())
        return True
