"""legalize-gru: an ONNX GRU (sequential recommenders: GRU4Rec, DIEN's interest extractor) becomes its
time steps unrolled into standard ONNX ops, which TVM's importer reads (it has no GRU converter).

Why a graph rewrite and not a converter registered with TVM's ONNX frontend: Relax has no recurrence
either, so a converter would emit the same unrolled matmuls and gates, only in Relax, where onnxruntime
cannot check them; as ONNX the rewrite is checked like every pass (`--verify-each`, `--emit=onnx`), the
later passes see it (the weights are constants to fold), and every target gets it.

What is supported: the sequence length (X's first dim) static and the batch symbolic; layout 0;
direction forward, reverse or bidirectional; linear_before_reset 0 or 1; W, R and B constants;
initial_h absent, zeros or any tensor; sequence_lens absent or built to hold the full length (a
constant, or a constant expanded to the batch);
the default activations (Sigmoid, Tanh) without clip; outputs Y and Y_h. Anything else stops the build
with a CompileError naming the node and what it has.

Per direction, with the ONNX gate order z, r, h and `*` elementwise:

    XW  = X @ W^T + [Wbz + Rbz, Wbr + Rbr, Wbh (+ Rbh if linear_before_reset = 0)]   (all steps at once)
    z   = sigmoid(XWz[t] + H @ Rz^T),  r = sigmoid(XWr[t] + H @ Rr^T)
    h   = tanh(XWh[t] + (r * H) @ Rh^T)                  linear_before_reset = 0
    h   = tanh(XWh[t] + r * (H @ Rh^T + Rbh))            linear_before_reset = 1
    H'  = h + z * (H - h)                                = (1 - z) * h + z * H

A reverse direction runs t = T-1 .. 0 and writes Y at the step's own t. Without initial_h the first
step's terms in H are dropped (they are zero), so no zeros tensor of the symbolic batch is built.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.errors import CompileError
from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import attr, constant_value, consumers, fresh_name, is_graph_output, new_constant, new_node, remove_node, shape_of

_DEFAULT_ACTIVATIONS = ("sigmoid", "tanh")


class _Emitter:
    """Appends the nodes of one GRU's rewrite; every name starts with the GRU's and is numbered, since a
    constant joins the graph only with the node that reads it (fresh_name alone would repeat names)."""

    def __init__(self, graph: gs.Graph, base: str, dtype):
        self.graph, self.base, self.dtype = graph, base, dtype
        self.count = 0

    def _name(self, what: str) -> str:
        self.count += 1
        return fresh_name(self.graph, f"{self.base}_{what}{self.count}")

    def const(self, values, dtype=None) -> gs.Constant:
        return new_constant(self.graph, self._name("c"), np.asarray(values, dtype=dtype or self.dtype))

    def ints(self, values) -> gs.Constant:
        return self.const(values, np.int64)

    def op(self, op: str, inputs: list[gs.Tensor], out: gs.Tensor | None = None, dtype=None, **attrs) -> gs.Tensor:
        result = out if out is not None else gs.Variable(self._name(op.lower()), dtype or self.dtype)
        new_node(self.graph, op, self._name(op.lower()), inputs, [result], **attrs)
        return result

    def split(self, tensor: gs.Tensor, sizes: list[int], axis: int) -> list[gs.Tensor]:
        parts = [gs.Variable(self._name("part"), self.dtype) for _ in sizes]
        new_node(self.graph, "Split", self._name("split"), [tensor, self.ints(sizes)], parts, axis=axis)
        return parts


def _fail(node: gs.Node, why: str) -> CompileError:
    return CompileError(f"GRU node '{node.name}': {why}; reccc unrolls GRUs only with a static sequence length, "
                        "layout 0, constant W/R/B, full-length sequences, the default activations and no clip")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def _check(node: gs.Node) -> tuple[int, list[str]]:
    """(sequence length, directions), or a CompileError saying what this GRU has that is unsupported."""
    if attr(node, "layout", 0) != 0:
        raise _fail(node, f"layout {attr(node, 'layout')} (batch first)")
    if attr(node, "clip") is not None:
        raise _fail(node, "clip is set")
    direction = _text(attr(node, "direction", "forward"))
    directions = {"forward": ["forward"], "reverse": ["reverse"], "bidirectional": ["forward", "reverse"]}.get(direction)
    if directions is None:
        raise _fail(node, f"direction '{direction}'")
    activations = [_text(a).lower() for a in (attr(node, "activations") or _DEFAULT_ACTIVATIONS * len(directions))]
    if activations != list(_DEFAULT_ACTIVATIONS) * len(directions) or attr(node, "activation_alpha") or attr(node, "activation_beta"):
        raise _fail(node, f"activations {activations}")
    if attr(node, "linear_before_reset", 0) not in (0, 1):
        raise _fail(node, f"linear_before_reset {attr(node, 'linear_before_reset')}")
    for index, name in ((1, "W"), (2, "R")):
        if constant_value(_input(node, index)) is None:
            raise _fail(node, f"{name} is computed at run time")
    if _input(node, 3) is not None and constant_value(_input(node, 3)) is None:
        raise _fail(node, "B is computed at run time")
    shape = shape_of(node.inputs[0])
    # Weights that do not fit the GRU (the checker does not compare them) would fail the rewrite later.
    weights, recurrences = constant_value(_input(node, 1)), constant_value(_input(node, 2))
    hidden = attr(node, "hidden_size", recurrences.shape[-1] if recurrences.ndim else 0)
    inputs = shape[-1] if shape and len(shape) == 3 and isinstance(shape[-1], int) else (weights.shape[-1] if weights.ndim else 0)
    expected = {1: (len(directions), 3 * hidden, inputs), 2: (len(directions), 3 * hidden, hidden), 3: (len(directions), 6 * hidden)}
    for index, name in ((1, "W"), (2, "R"), (3, "B")):
        value = constant_value(_input(node, index))
        if value is not None and value.shape != expected[index]:
            raise _fail(node, f"{name} has the shape {list(value.shape)}, not {list(expected[index])}")
    steps = shape[0] if shape else None
    if not isinstance(steps, int) or steps < 1:
        raise _fail(node, f"the sequence length (X's first dim) is {steps if steps is not None else 'unknown'}, not static")
    lengths = _input(node, 4)
    if lengths is not None and _fill(lengths) != steps:
        raise _fail(node, "sequence_lens may be shorter than the sequence")
    return steps, directions


def _fill(tensor: gs.Tensor, depth: int = 0) -> float | None:
    """The one value every element of `tensor` holds, if it is built to hold one: a constant, a
    ConstantOfShape, or Expand/Slice/Reshape/Cast/... of one (as torch's exporters build a GRU's initial
    state for the batch, and a batch's full sequence lengths)."""
    value = constant_value(tensor)
    if value is not None:
        flat = value.reshape(-1)
        return flat[0].item() if flat.size and np.all(flat == flat[0]) else None
    if len(tensor.inputs) != 1 or depth > 8:
        return None
    producer = tensor.inputs[0]
    if producer.op == "ConstantOfShape":
        fill = producer.attrs.get("value")
        return 0 if fill is None else fill.values.reshape(-1)[0].item()
    if producer.op in ("Expand", "Slice", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Cast", "Tile"):
        return _fill(producer.inputs[0], depth + 1)
    return None


def _used(graph: gs.Graph, node: gs.Node, index: int) -> gs.Tensor | None:
    if len(node.outputs) <= index or not node.outputs[index].name:
        return None
    output = node.outputs[index]
    return output if consumers(output) or is_graph_output(graph, output) else None


def _unroll(graph: gs.Graph, node: gs.Node, steps: int, directions: list[str]) -> None:
    weights, recurrences = constant_value(node.inputs[1]), constant_value(node.inputs[2])
    hidden = recurrences.shape[-1]
    dtype = weights.dtype
    biases = constant_value(_input(node, 3))
    if biases is None:
        biases = np.zeros((len(directions), 6 * hidden), dtype)
    before_reset = attr(node, "linear_before_reset", 0) == 1
    e = _Emitter(graph, node.name, dtype)
    initial = _input(node, 5)
    if initial is not None and _fill(initial) == 0:
        initial = None  # the exporters pass zeros: the first step then needs no terms in H
    outputs, last = [], []
    for d, direction in enumerate(directions):
        w, r, b = weights[d], recurrences[d], biases[d]
        wb, rb = b[:3 * hidden], b[3 * hidden:]
        input_bias = wb + np.concatenate([rb[:2 * hidden], np.zeros(hidden, dtype) if before_reset else rb[2 * hidden:]])
        # Every step's input projection in one matmul: [T, batch, 3H].
        projected = e.op("Add", [e.op("MatMul", [node.inputs[0], e.const(w.T)]), e.const(input_bias)])
        per_step = [e.op("Squeeze", [part, e.ints([0])]) for part in e.split(projected, [1] * steps, 0)] if steps > 1 \
            else [e.op("Squeeze", [projected, e.ints([0])])]
        state = None
        if initial is not None:
            state = e.op("Squeeze", [e.op("Slice", [initial, e.ints([d]), e.ints([d + 1]), e.ints([0])]), e.ints([0])])
        order = range(steps) if direction == "forward" else range(steps - 1, -1, -1)
        states = [None] * steps
        for t in order:
            state = _step(e, per_step[t], state, r, rb[2 * hidden:], hidden, before_reset)
            states[t] = state
        outputs.append(states)
        last.append(state)
    every = _used(graph, node, 0)
    final = _used(graph, node, 1)
    remove_node(graph, node)
    if every is not None:  # Y: [T, directions, batch, H]
        rows = []
        for t in range(steps):
            parts = [e.op("Unsqueeze", [outputs[d][t], e.ints([0, 1])]) for d in range(len(directions))]
            rows.append(parts[0] if len(parts) == 1 else e.op("Concat", parts, axis=1))
        e.op("Concat", rows, out=every, axis=0)
    if final is not None:  # Y_h: [directions, batch, H]
        e.op("Concat", [e.op("Unsqueeze", [state, e.ints([0])]) for state in last], out=final, axis=0)


def _step(e: _Emitter, x: gs.Tensor, state: gs.Tensor | None, r: np.ndarray, recurrent_bias: np.ndarray,
          hidden: int, before_reset: bool) -> gs.Tensor:
    """One time step: the new state [batch, H] from this step's input projection x [batch, 3H] and the
    previous state (None: zeros)."""
    xz, xr, xh = e.split(x, [hidden] * 3, 1)
    if state is None:
        z, reset = e.op("Sigmoid", [xz]), e.op("Sigmoid", [xr])
        # H = 0: (r * H) @ Rh^T is 0, and r * (H @ Rh^T + Rbh) is r * Rbh.
        candidate = e.op("Tanh", [e.op("Add", [xh, e.op("Mul", [reset, e.const(recurrent_bias)])]) if before_reset else xh])
        return e.op("Sub", [candidate, e.op("Mul", [z, candidate])])
    if before_reset:
        gates = e.op("Add", [e.op("MatMul", [state, e.const(r.T)]),
                             e.const(np.concatenate([np.zeros(2 * hidden, r.dtype), recurrent_bias]))])
        hz, hr, hh = e.split(gates, [hidden] * 3, 1)
        z, reset = e.op("Sigmoid", [e.op("Add", [xz, hz])]), e.op("Sigmoid", [e.op("Add", [xr, hr])])
        candidate = e.op("Tanh", [e.op("Add", [xh, e.op("Mul", [reset, hh])])])
    else:
        hz, hr = e.split(e.op("MatMul", [state, e.const(r[:2 * hidden].T)]), [hidden] * 2, 1)
        z, reset = e.op("Sigmoid", [e.op("Add", [xz, hz])]), e.op("Sigmoid", [e.op("Add", [xr, hr])])
        candidate = e.op("Tanh", [e.op("Add", [xh, e.op("MatMul", [e.op("Mul", [reset, state]), e.const(r[2 * hidden:].T)])])])
    return e.op("Add", [candidate, e.op("Mul", [z, e.op("Sub", [state, candidate])])])


@register_pass
class LegalizeGru(Pass):
    name = "legalize-gru"
    summary = "a GRU with a static sequence length becomes its time steps unrolled into MatMul, gates and Concat"

    def call(self, model: Model) -> bool:
        graph = model.graph
        grus = [n for n in graph.nodes if n.op == "GRU" and n.domain in (None, "", "ai.onnx")]
        for node in grus:
            steps, directions = _check(node)
            _unroll(graph, node, steps, directions)
            self.note(f"{node.name}: {steps} steps, {'+'.join(directions)}, "
                      f"linear_before_reset {attr(node, 'linear_before_reset', 0)}")
        if grus:
            graph.cleanup(remove_unused_graph_inputs=False)
            model.graph = gs.import_onnx(model.to_onnx())
        return bool(grus)
