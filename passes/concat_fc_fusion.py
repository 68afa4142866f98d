"""concat-fc-fusion: a fully connected layer over a concatenation, as a sum of partial products.

    Concat(x1..xn, axis=1) -> Gemm(., W, C) | MatMul(., W)        (xi: [batch, d_i], W constant)
      ==  x1·W1 + x2·W2 + ... + xn·Wn  (+ C)

where Wi is the i-th row block of W (rows d_1+..+d_{i-1} up to +d_i; a column block of B when
transB=1). Matched only when the Concat joins rank-2 tensors with static widths along axis 1 (or -1),
is read by nothing but input A of that one Gemm (transA=0) or MatMul, is not a graph output, and W is a
constant (initializer or Constant node) of rank 2.

Embedding lookups. When xi = Gather(E, ids) (axis 0, E a constant float table rows x dim, ids of rank 1,
the Gather read by this Concat alone), its partial product is a row of E·Wi, so the pass folds

    Gather(E, ids) · Wi   ==>   Gather(E', ids),    E' = alpha * (E @ Wi)   (rows x N, N the layer's width)

computed in float64 and cast to E's dtype, and that partial GEMM disappears. The Gather keeps its node
and its ids: negative ids and out-of-range behaviour are unchanged (E' has E's rows), and reccc's index
guard still finds it as an embedding lookup (a float constant table, axis 0).

The rewrite (default: split_unfolded=False):

    Gemm(Concat(inputs that are not folded lookups), W rows of those, C; alpha, beta, transB)
      + Gather(E'_1, ids_1) + ... + Gather(E'_k, ids_k)            a left chain of Add, in that order

The inputs that stay multiplied keep one GEMM, over a Concat of just them (or over the input itself when
only one is left). A constant bias that is the same for every row (C of shape [], [N] or [1, N]) is
added, times beta, into the first folded table (each output row reads exactly one of its rows), so the
layer's kernel has one Add less; any other C stays on the GEMM, or is added last when no GEMM is left.
GEMM first is the order TVM likes: FuseOps puts the matmul, every Add of the chain and the activation
after it into one kernel (fused_matmul_add_add..._relu). A layer where no lookup folds is left as it
is, so `changed` means some lookup folded. With split_unfolded=True every input that stays multiplied
gets its own Gemm/MatMul instead (the first carries the bias), and no concatenation is left at all.

Cost model, per lookup (itemsize = E's, 4 for fp32), decided before anything changes:

    new_bytes   = rows * N * itemsize                                # E'
    freed_bytes = rows * dim * itemsize  if the Gather is E's only reader, else 0
    fold  iff   N <= max_widening * dim                              (speed; default 4, measured below)
          and  (new_bytes <= freed_bytes                             (the tables do not grow)
                or new_bytes <= table_bytes_threshold)               (a small table; default 1 MiB)
    keep  otherwise: the lookup stays an input of the GEMM.

The speed rules come from tools/bench_concat_fc.py: reccc `run` at -O2 (TVM 0.27 with reccc's default
CPU schedules, targets/cpu_schedules.py), medians of interleaved runs, batches 1 / 64 / 2048, on this
project's shared 2-core x86 machine (other jobs running, so about +-5 % noise):
- One GEMM per input (split_unfolded=True) against concat + one GEMM: the standard DLRM's 9 x 64 -> 512
  layer 1.00 / 0.99 / 1.14x; 2..9 inputs 64..128 wide into 256..512: 1.06..1.13 / 1.06..1.48 /
  0.98..1.26x; 8 x 16 -> 64: 1.15 / 1.14 / 1.06x; 26 inputs 1..4 wide: 1.17..1.25 / 1.38..1.63 /
  3.0..5.5x. Never faster: TVM fuses one matmul per kernel, so each extra partial GEMM is a kernel
  that writes and re-reads a [batch, N] intermediate, which costs more than the concatenation it
  saves. Hence split_unfolded=False, and no rewrite at all when nothing folds.
- Folding a lookup trades its dim x N multiply-adds per row for an N-wide row read plus one Add stage.
  N <= 4 x dim (folded): the bundled DLRM (4 x 16 -> 64) 1.00 / 1.03 / 0.89x, Wide&Deep (3 x 8 -> 32)
  1.00 / 1.00 / 1.00x, two-tower (16 -> 32) 1.00 / 0.99 / 0.81x; synthetic 4..8 lookups of dim 8..64 into
  N = 2..4 x dim 0.98..1.07 / 0.83..1.06 / 0.45..0.97x. N > 4 x dim (kept): dim 1..16 into 8..256 x dim
  1.03..1.08 / 1.12..1.37 / 1.12..3.8x slower; dim 32 into 8 and 16 x dim was about even (1.03 / 0.89 /
  0.91x and 0.96 / 0.95 / 0.98x) and is kept too. At batch 1 a fold can cost a few microseconds (each
  Add of the chain is its own parallel loop in the scheduled kernel), at most 7 % of `run` measured;
  the batch is symbolic, so no static rule can trade that against the gains at larger batches.

Each decision is kept in `report` (LookupDecision objects, reset by every call) and `details()` renders
them with the rewritten layers as text lines, for --time-passes, e.g.
`Gemm 'fc': lookup 'g' table 'E' 1000x16 -> 1000x64 (256000 B, frees 64000 B): fold (<= 1048576 B threshold)`.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass

DEFAULT_TABLE_BYTES_THRESHOLD = 1 << 20  # 1 MiB
DEFAULT_MAX_WIDENING = 4.0  # fold only when N <= 4 * dim: measured in TVM 0.27, see the module docstring


@dataclass(frozen=True)
class LookupDecision:
    """What the cost model decided for one embedding lookup feeding a fused layer."""

    layer: str  # the Gemm/MatMul node that was split
    lookup: str  # the Gather node
    table: str  # E's name
    rows: int
    dim: int
    width: int  # N, the layer's output width
    new_bytes: int
    freed_bytes: int
    threshold: int
    decision: str  # "fold" or "keep"
    reason: str

    def line(self) -> str:
        return (
            f"{self.layer}: lookup '{self.lookup}' table '{self.table}' {self.rows}x{self.dim} -> {self.rows}x{self.width} "
            f"({self.new_bytes} B, frees {self.freed_bytes} B): {self.decision} ({self.reason})"
        )


def decide(rows: int, dim: int, width: int, itemsize: int, table_shared: bool, threshold: int,
           max_widening: float | None = DEFAULT_MAX_WIDENING) -> tuple[str, str, int, int]:
    """The cost model: (decision, reason, new_bytes, freed_bytes) for folding a rows x dim table into rows x width."""
    new_bytes = rows * width * itemsize
    freed_bytes = 0 if table_shared else rows * dim * itemsize
    if max_widening is not None and width > max_widening * dim:
        return "keep", f"N > {max_widening:g} x dim: slower in TVM than its share of the GEMM", new_bytes, freed_bytes
    if new_bytes <= freed_bytes:
        return "fold", "tables do not grow", new_bytes, freed_bytes
    if new_bytes <= threshold:
        return "fold", f"<= {threshold} B threshold", new_bytes, freed_bytes
    why = "table shared with other readers, " if table_shared and width <= dim else ""
    return "keep", f"{why}grows by {new_bytes - freed_bytes} B and > {threshold} B threshold", new_bytes, freed_bytes


@dataclass
class _Match:
    concat: gs.Node
    layer: gs.Node  # Gemm or MatMul
    parts: list[gs.Tensor]
    widths: list[int]
    weight: np.ndarray
    trans_b: bool
    alpha: float
    beta: float
    bias: gs.Tensor | None
    width: int  # N


@register_pass
class ConcatFcFusion(Pass):
    name = "concat-fc-fusion"
    summary = (
        "Concat(x1..xn, axis=1) into Gemm/MatMul with a constant weight: embedding lookups among the xi become "
        "Gather(E·Wi, ids) added to one GEMM over the rest, where the cost model says so (table size, N <= 4 x dim)"
    )

    def __init__(
        self,
        table_bytes_threshold: int = DEFAULT_TABLE_BYTES_THRESHOLD,
        max_widening: float | None = DEFAULT_MAX_WIDENING,
        split_unfolded: bool = False,
    ):
        if int(table_bytes_threshold) < 0 or (max_widening is not None and not float(max_widening) >= 1):
            raise ValueError("table_bytes_threshold must be >= 0 and max_widening >= 1 (or None: no limit)")
        self.table_bytes_threshold = int(table_bytes_threshold)
        self.max_widening = None if max_widening is None else float(max_widening)
        self.split_unfolded = bool(split_unfolded)
        self._decisions: dict[str, LookupDecision] = {}  # by Gather node
        self.rewritten: list[str] = []  # the layers the last call rewrote, described

    @property
    def report(self) -> list[LookupDecision]:
        """The cost model's decision for each lookup the last call considered (its final one)."""
        return list(self._decisions.values())

    def details(self) -> list[str]:
        return self.rewritten + [decision.line() for decision in self.report]

    def call(self, model: Model) -> bool:
        self._decisions: dict[str, LookupDecision] = {}
        self.rewritten = []
        graph = model.graph
        graph_outputs = {id(t) for t in graph.outputs}
        names = _NameSource(graph)
        # Until nothing changes: folding one reader of a shared table can make the table's last reader
        # worth folding, and a single call should leave nothing for the next.
        while True:
            before = len(self.rewritten)
            for node in list(graph.nodes):
                match = _match(node, graph_outputs) if node.op == "Concat" else None
                if match is not None:
                    self._rewrite(graph, match, names, graph_outputs)
            if len(self.rewritten) == before:
                break
        if self.rewritten:
            graph.toposort()
        return bool(self.rewritten)

    def _rewrite(self, graph: gs.Graph, m: _Match, names: "_NameSource", graph_outputs: set[int]) -> None:
        layer, output = m.layer, m.layer.outputs[0]
        offsets = np.cumsum([0, *m.widths])
        # W's block for each input as stored (column blocks under transB), and as multiplied (d_i x N).
        blocks = [m.weight[:, a:b] if m.trans_b else m.weight[a:b, :] for a, b in zip(offsets[:-1], offsets[1:])]
        folds = [self._decide_fold(part, m, graph_outputs) for part in m.parts]
        folded = [i for i, fold in enumerate(folds) if fold]
        unfolded = [i for i, fold in enumerate(folds) if not fold]
        if not folded and not self.split_unfolded:
            return  # nothing to gain: TVM runs one GEMM over the concatenation faster than n partial GEMMs
        bias_pending = m.bias
        row_bias = _row_bias(m.bias, m.beta, m.width) if folded else None
        if row_bias is not None:
            # Every output row reads exactly one row of the first folded table: the bias goes there, and
            # the kernel TVM fuses for the layer has one Add less.
            bias_pending = None
        for n, i in enumerate(folded):
            self._fold(m.parts[i], blocks[i].T if m.trans_b else blocks[i], m, names, row_bias if n == 0 else None)
        groups = [[i] for i in unfolded] if self.split_unfolded else ([unfolded] if unfolded else [])

        dtype, out_shape = output.dtype, [output.shape[0] if output.shape else None, m.width]
        new_nodes: list[gs.Node] = []
        terms: list[gs.Tensor] = []
        for group in groups:
            parts = [m.parts[i] for i in group]
            weight = np.concatenate([blocks[i] for i in group], axis=1 if m.trans_b else 0)
            weight = gs.Constant(names.fresh(f"{layer.name}__w"), np.ascontiguousarray(weight))
            if len(parts) == 1:
                operand = parts[0]
            else:  # the inputs that stay multiplied keep one concatenation of just them
                width = sum(m.widths[i] for i in group)
                operand = gs.Variable(names.fresh(f"{layer.name}__concat"), dtype=dtype, shape=[out_shape[0], width])
                new_nodes.append(gs.Node("Concat", names.fresh(f"{m.concat.name}__rest"), {"axis": 1}, parts, [operand]))
            term = gs.Variable(names.fresh(f"{layer.name}__part"), dtype=dtype, shape=list(out_shape))
            if layer.op == "Gemm":
                inputs, attrs = [operand, weight], {"alpha": m.alpha, "transB": int(m.trans_b)}
                if bias_pending is not None:
                    inputs.append(bias_pending)
                    attrs["beta"] = m.beta
                    bias_pending = None
                new_nodes.append(gs.Node("Gemm", names.fresh(f"{layer.name}__gemm"), attrs, inputs, [term]))
            else:
                new_nodes.append(gs.Node("MatMul", names.fresh(f"{layer.name}__matmul"), {}, [operand, weight], [term]))
            terms.append(term)
        # The lookups come after the GEMM that carries the bias, so that TVM fuses the whole left chain of
        # Adds (and the activation after it) into that GEMM's kernel.
        terms += [m.parts[i] for i in folded]
        if bias_pending is not None:  # every partial product was folded into a table
            terms.append(self._scaled_bias(bias_pending, m.beta, names, new_nodes, layer.name))
        total = terms[0]
        for term in terms[1:]:
            summed = gs.Variable(names.fresh(f"{layer.name}__sum"), dtype=dtype, shape=list(out_shape))
            new_nodes.append(gs.Node("Add", names.fresh(f"{layer.name}__add"), {}, [total, term], [summed]))
            total = summed
        # The last node of the sum (or the only partial product) takes over the layer's output tensor.
        for node in (m.concat, layer):
            node.inputs.clear()
            node.outputs.clear()
            graph.nodes.remove(node)
        total.inputs[0].outputs[0] = output
        graph.nodes.extend(new_nodes)
        self.rewritten.append(
            f"{layer.op} '{layer.name}' over {len(m.parts)} inputs: {len(folded)} lookups folded, "
            f"{len(groups)} GEMM{'' if len(groups) == 1 else 's'} over the other {len(unfolded)}"
        )

    def _decide_fold(self, part: gs.Tensor, m: _Match, graph_outputs: set[int]) -> bool:
        """Whether the lookup producing `part` (if it is one) folds, by the cost model; records the decision."""
        gather = _exclusive_lookup(part, graph_outputs)
        if gather is None:
            return False
        table = gather.inputs[0]
        values = table.values
        if values.dtype != m.weight.dtype:
            return False
        rows, dim = (int(d) for d in values.shape)
        decision, reason, new_bytes, freed_bytes = decide(
            rows, dim, m.width, values.dtype.itemsize, len(table.outputs) > 1, self.table_bytes_threshold, self.max_widening
        )
        earlier = self._decisions.get(gather.name)
        if earlier is None or earlier.decision != decision:  # a later round re-sees kept lookups under the new GEMM
            self._decisions[gather.name] = LookupDecision(
                f"{m.layer.op} '{m.layer.name}'", gather.name, table.name, rows, dim, m.width,
                new_bytes, freed_bytes, self.table_bytes_threshold, decision, reason,
            )
        return decision == "fold"

    @staticmethod
    def _fold(part: gs.Tensor, block: np.ndarray, m: _Match, names: "_NameSource", row_bias: np.ndarray | None) -> None:
        """Gather(E, ids) · block  ==>  Gather(alpha * E @ block (+ row_bias), ids), in float64; `block` is d x N."""
        gather = part.inputs[0]
        values = gather.inputs[0].values
        folded = (values.astype(np.float64) @ block.astype(np.float64)) * m.alpha
        if row_bias is not None:
            folded += row_bias
        table = gs.Constant(names.fresh(f"{gather.inputs[0].name}__x_{m.layer.name}"), np.ascontiguousarray(folded.astype(values.dtype)))
        gather.inputs[0] = table
        part.shape = [part.shape[0], m.width]

    @staticmethod
    def _scaled_bias(bias: gs.Tensor, beta: float, names: "_NameSource", new_nodes: list, layer: str) -> gs.Tensor:
        if beta == 1.0:
            return bias
        values = _constant_values(bias)
        if values is not None:  # as Gemm computes beta * C: in C's dtype
            return gs.Constant(names.fresh(f"{layer}__bias"), np.asarray(values * values.dtype.type(beta), values.dtype))
        scaled = gs.Variable(names.fresh(f"{layer}__bias"), dtype=bias.dtype, shape=bias.shape)
        factor = gs.Constant(names.fresh(f"{layer}__beta"), np.array(beta, dtype=np.dtype(bias.dtype)))
        new_nodes.append(gs.Node("Mul", names.fresh(f"{layer}__scale_bias"), {}, [bias, factor], [scaled]))
        return scaled


def _match(concat: gs.Node, graph_outputs: set[int]) -> _Match | None:
    if len(concat.outputs) != 1 or not concat.inputs:
        return None
    joined = concat.outputs[0]
    if id(joined) in graph_outputs or len(joined.outputs) != 1:
        return None
    layer = joined.outputs[0]
    if layer.op not in ("Gemm", "MatMul") or len(layer.outputs) != 1 or not layer.inputs or layer.inputs[0] is not joined:
        return None
    if sum(t is joined for t in layer.inputs) != 1:
        return None
    widths = [_static_width(t) for t in concat.inputs]
    if any(w is None or w <= 0 for w in widths) or concat.attrs.get("axis") not in (1, -1):
        return None
    weight = _constant_values(layer.inputs[1]) if len(layer.inputs) > 1 else None
    if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        return None
    if layer.op == "Gemm":
        if layer.attrs.get("transA", 0):
            return None
        trans_b = bool(layer.attrs.get("transB", 0))
        alpha, beta = float(layer.attrs.get("alpha", 1.0)), float(layer.attrs.get("beta", 1.0))
        bias = layer.inputs[2] if len(layer.inputs) > 2 and layer.inputs[2].name else None
    else:
        trans_b, alpha, beta, bias = False, 1.0, 1.0, None
    depth, width = (weight.shape[1], weight.shape[0]) if trans_b else weight.shape
    if depth != sum(widths):
        return None
    return _Match(concat, layer, list(concat.inputs), widths, weight, trans_b, alpha, beta, bias, int(width))


def _row_bias(bias: gs.Tensor | None, beta: float, width: int) -> np.ndarray | None:
    """beta * C in float64 as one [width] row, when C is a constant that is the same for every output row."""
    values = None if bias is None else _constant_values(bias)
    if values is None or values.shape not in ((), (width,), (1, width)):
        return None
    return beta * np.broadcast_to(values.astype(np.float64), (1, width)).reshape(width)


def _static_width(tensor: gs.Tensor) -> int | None:
    shape = tensor.shape
    if shape is None or len(shape) != 2 or not isinstance(shape[1], (int, np.integer)):
        return None
    return int(shape[1])


def _constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of an initializer, or of a Constant node's output."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.values
    return None


def _exclusive_lookup(part: gs.Tensor, graph_outputs: set[int]) -> gs.Node | None:
    """The Gather(E, ids) producing `part` when it is a table lookup reccc recognizes (axis 0, E a float
    constant table of rank 2, ids of rank 1) and `part` has no reader but the one Concat."""
    if len(part.inputs) != 1 or len(part.outputs) != 1 or id(part) in graph_outputs:
        return None
    gather = part.inputs[0]
    if gather.op != "Gather" or gather.attrs.get("axis", 0) != 0 or len(gather.inputs) != 2:
        return None
    table, ids = gather.inputs
    if not isinstance(table, gs.Constant) or table.values.ndim != 2 or not np.issubdtype(table.values.dtype, np.floating):
        return None
    if ids.shape is None or len(ids.shape) != 1:
        return None
    return gather


class _NameSource:
    """Fresh tensor and node names (graph-wide unique, as ONNX requires for tensors)."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors()) | {node.name for node in graph.nodes}
        self.counter = itertools.count()

    def fresh(self, prefix: str) -> str:
        name = f"{prefix}_{next(self.counter)}"
        while name in self.taken:
            name = f"{prefix}_{next(self.counter)}"
        self.taken.add(name)
        return name
