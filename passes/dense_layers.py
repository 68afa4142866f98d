"""Fully connected layers and the hidden tensors between them, for the pruning passes.

A *dense layer* is a Gemm (transA=0) or MatMul whose input B is a constant float matrix (an
initializer or a Constant node's output) and whose input A is computed at run time, with its bias:

    Gemm(x, W, C)         y = alpha * x·op(W) + beta * C     op(W) = W (transB=0) or Wᵀ (transB=1)
    MatMul(x, W) [+ C]    y = x·W (+ C when the MatMul's result is read by one Add of a constant C)

Its *units* are the output features (the last axis of y); `incoming()` is the effective weight as
[fan_in, units] in float64 (alpha applied, transB undone) and `unit_bias()` the effective bias per unit
(beta applied, broadcast), when the bias is a constant that varies along the units axis only (shapes
[], [1], [N], [1, N], [1, 1] for Gemm; for an Add, any shape of 1s ending in 1 or N).

A dense layer is *hidden* when its result reaches only other dense layers, as their input A, through
a chain of elementwise activations (Relu, LeakyRelu, Sigmoid, Tanh, Elu, Celu, Selu, HardSigmoid,
HardSwish, Softplus, Softsign, ThresholdedRelu, Gelu, Neg, Abs, Identity, Clip with constant bounds),
each read once, no tensor on the way being a graph output. Then unit j of the layer is exactly row j of every reader's (effective) weight, so removing
unit j means slicing the layer's weight and bias and each reader's weight rows.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from reccc.passes.patterns import (
    constant_value,
    consumers,
    fresh_name,
    has_single_use,
    input_at,
    is_graph_output,
    remove_if_unused,
    replace_all_uses,
    shape_of,
)

FC_OPS = ("Gemm", "MatMul")


# --- activations: elementwise, unit by unit, with their value on a constant input ---------------


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        tensor = input_at(node, index)
        if tensor is None:
            bounds.append(default)
            continue
        value = constant_value(tensor)
        if value is None or value.size != 1:
            return None
        bounds.append(float(value.reshape(-1)[0]))
    return bounds[0], bounds[1]


def _activation(node: gs.Node) -> Callable[[np.ndarray], np.ndarray] | None:
    """The float64 function an elementwise activation node computes, or None when `node` is not one."""
    a = node.attrs
    op = node.op
    if node.domain not in (None, "", "ai.onnx"):
        return None
    if op == "Clip":
        bounds = _clip_bounds(node)
        return None if bounds is None else (lambda x: np.clip(x, *bounds))
    simple: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "Identity": lambda x: x,
        "Relu": lambda x: np.maximum(x, 0.0),
        "LeakyRelu": lambda x: np.where(x >= 0, x, float(a.get("alpha", 0.01)) * x),
        "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
        "Tanh": np.tanh,
        "Elu": lambda x: np.where(x > 0, x, float(a.get("alpha", 1.0)) * np.expm1(x)),
        "Celu": lambda x: np.maximum(x, 0.0) + np.minimum(0.0, float(a.get("alpha", 1.0)) * np.expm1(x / float(a.get("alpha", 1.0)))),
        "Selu": lambda x: float(a.get("gamma", 1.0507009873554805)) * np.where(x > 0, x, float(a.get("alpha", 1.6732632423543772)) * np.expm1(x)),
        "HardSigmoid": lambda x: np.clip(float(a.get("alpha", 0.2)) * x + float(a.get("beta", 0.5)), 0.0, 1.0),
        "HardSwish": lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
        "Softplus": lambda x: np.logaddexp(0.0, x),
        "Softsign": lambda x: x / (1.0 + np.abs(x)),
        "ThresholdedRelu": lambda x: np.where(x > float(a.get("alpha", 1.0)), x, 0.0),
        "Neg": lambda x: -x,
        "Abs": np.abs,
        "Gelu": lambda x: (
            0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
            if a.get("approximate", "none") == "tanh"
            else 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
        ),
    }
    return simple.get(op)


# --- dense layers ------------------------------------------------------------------------------------


@dataclass(eq=False)
class DenseLayer:
    node: gs.Node  # the Gemm or MatMul
    weight: np.ndarray  # input B as stored
    trans_b: bool
    alpha: float
    beta: float
    bias_node: gs.Node | None  # the node holding the bias: the Gemm (input 2) or a MatMul's Add; None: no bias
    bias_index: int
    bias: np.ndarray | None  # the bias as stored; None when there is none or it is not a row constant
    bias_known: bool  # no bias, or a constant one varying along the units axis only
    output: gs.Tensor  # the layer's result (after its bias)

    @property
    def name(self) -> str:
        return f"{self.node.op} '{self.node.name}'"

    @property
    def fan_in(self) -> int:
        return int(self.weight.shape[1] if self.trans_b else self.weight.shape[0])

    @property
    def units(self) -> int:
        return int(self.weight.shape[0] if self.trans_b else self.weight.shape[1])

    def incoming(self) -> np.ndarray:
        """The effective weight, [fan_in, units], float64: column j holds unit j's incoming weights."""
        weight = self.weight.T if self.trans_b else self.weight
        return self.alpha * weight.astype(np.float64)

    def unit_bias(self) -> np.ndarray:
        """The effective bias per unit, float64 (zeros without a bias); only when `bias_known`."""
        if self.bias is None:
            return np.zeros(self.units)
        dtype = self.weight.dtype
        bias = (self.bias.astype(dtype) * dtype.type(self.beta)).astype(dtype)  # beta*C, as the layer computes it
        return np.broadcast_to(bias.reshape(-1).astype(np.float64), (self.units,)).copy()


def _row_bias(bias: np.ndarray, units: int, max_rank: int) -> bool:
    """Varies along the last (units) axis only, and broadcasting it adds no axis beyond `max_rank`."""
    if bias.ndim > max_rank or any(d != 1 for d in bias.shape[:-1]):
        return False
    return bias.ndim == 0 or bias.shape[-1] in (1, units)


def dense_layer(graph: gs.Graph, node: gs.Node) -> DenseLayer | None:
    if node.op not in FC_OPS or node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    x, w = node.inputs[0], node.inputs[1]
    weight = constant_value(w)
    if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating) or constant_value(x) is not None:
        return None
    if any(t is x for t in node.inputs[1:]):
        return None
    output = node.outputs[0]
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        trans_b = bool(node.attrs.get("transB", 0))
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        units = weight.shape[0] if trans_b else weight.shape[1]
        c = input_at(node, 2)
        if c is None:
            return DenseLayer(node, weight, trans_b, alpha, beta, None, 2, None, True, output)
        values = constant_value(c)
        known = values is not None and values.dtype == weight.dtype and _row_bias(values, units, 2)
        return DenseLayer(node, weight, trans_b, alpha, beta, node, 2, values if known else None, known, output)
    # MatMul, with the bias of a following Add of a constant
    units = weight.shape[1]
    if has_single_use(graph, output):
        (add,) = consumers(output)
        if add.op == "Add" and len(add.inputs) == 2 and add.domain in (None, "", "ai.onnx"):
            index = 1 if add.inputs[0] is output else 0
            values = constant_value(add.inputs[index])
            out_shape = shape_of(output)
            max_rank = len(out_shape) if out_shape is not None else 1
            if values is not None and values.dtype == weight.dtype and _row_bias(values, units, max_rank):
                return DenseLayer(node, weight, False, 1.0, 1.0, add, index, values, True, add.outputs[0])
    return DenseLayer(node, weight, False, 1.0, 1.0, None, 1, None, True, output)


@dataclass(eq=False)
class Hidden:
    """A hidden dense layer: `tensors` carry its units on their last axis (its output to the tensor the
    readers read); `activations` are the nodes between; `readers` are the dense layers reading it."""

    layer: DenseLayer
    tensors: list[gs.Tensor]
    activations: list[gs.Node]
    readers: list[DenseLayer]

    def activation(self, values: np.ndarray) -> np.ndarray:
        """What the readers see for pre-activation `values` (float64, per unit)."""
        dtype = self.layer.weight.dtype
        values = values.astype(dtype).astype(np.float64)  # the layer's output is in its dtype
        with np.errstate(all="ignore"):
            for node in self.activations:
                values = _activation(node)(values).astype(dtype).astype(np.float64)
        return values


def hidden_layer(graph: gs.Graph, layer: DenseLayer) -> Hidden | None:
    tensors = [layer.node.outputs[0]]
    if layer.output is not tensors[0]:
        tensors.append(layer.output)
    activations = []
    tensor = layer.output
    while True:
        if is_graph_output(graph, tensor) or not tensor.outputs:
            return None
        readers = consumers(tensor)
        if len(readers) == 1 and readers[0].op not in FC_OPS:
            node = readers[0]
            if (
                not has_single_use(graph, tensor)
                or node.inputs[0] is not tensor
                or len(node.outputs) != 1
                or _activation(node) is None
                or any(t is tensor for t in node.inputs[1:])
            ):
                return None
            activations.append(node)
            tensor = node.outputs[0]
            tensors.append(tensor)
            continue
        break
    dense_readers = []
    for node in readers:
        reader = dense_layer(graph, node)
        if reader is None or node.inputs[0] is not tensor or reader.fan_in != layer.units or reader.node is layer.node:
            return None
        dense_readers.append(reader)
    return Hidden(layer, tensors, activations, dense_readers)


# --- rewriting ---------------------------------------------------------------------------------------


class ConstantReplacer:
    """Give nodes new constant inputs under fresh names; `finish()` drops Constant nodes left unread and
    gives each new constant the name of the tensor it replaced (first in a chain of replacements) where
    that name became free, so weights keep their names."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.replaced: list[tuple[gs.Constant, str]] = []  # new constant, the name it should take
        self._origin: dict[int, str] = {}
        self._old: list[gs.Tensor] = []

    def set(self, node: gs.Node, index: int, values: np.ndarray) -> gs.Constant:
        old = node.inputs[index]
        new = gs.Constant(fresh_name(self.graph, f"{old.name}__new"), np.asarray(values, order="C"))
        node.inputs[index] = new
        self._record(old, new)
        return new

    def replace(self, old: gs.Tensor, values: np.ndarray) -> gs.Constant:
        """One new constant for every reader of `old`."""
        new = gs.Constant(fresh_name(self.graph, f"{old.name}__new"), np.asarray(values, order="C"))
        replace_all_uses(self.graph, old, new)
        self._record(old, new)
        return new

    def _record(self, old: gs.Tensor, new: gs.Constant) -> None:
        origin = self._origin.get(id(old), old.name)
        self._origin[id(new)] = origin
        self.replaced.append((new, origin))
        self._old.append(old)

    def finish(self) -> None:
        for old in self._old:
            if not isinstance(old, gs.Constant) and len(old.inputs) == 1 and old.inputs[0].op == "Constant":
                remove_if_unused(self.graph, old.inputs[0])
        tensors = self.graph.tensors()
        live, taken = {id(t) for t in tensors.values()}, set(tensors)
        for new, name in self.replaced:
            if id(new) in live and name not in taken:
                taken.discard(new.name)
                new.name = name
                taken.add(name)
        self.replaced, self._origin, self._old = [], {}, []


def keep_units(graph: gs.Graph, hidden: Hidden, keep: Sequence[int], constants: ConstantReplacer) -> None:
    """Keep only units `keep` (sorted indices) of a hidden layer: its weight, bias and tensors, and the
    readers' weight rows."""
    layer = hidden.layer
    keep = np.asarray(keep, dtype=np.int64)
    weight = layer.weight[keep, :] if layer.trans_b else layer.weight[:, keep]
    constants.set(layer.node, 1, weight)
    if layer.bias is not None and layer.bias.ndim >= 1 and layer.bias.shape[-1] == layer.units and layer.units != 1:
        constants.set(layer.bias_node, layer.bias_index, layer.bias[..., keep])
    for tensor in hidden.tensors:
        if tensor.shape is not None and len(tensor.shape):
            tensor.shape = [*tensor.shape[:-1], len(keep)]
    for reader in hidden.readers:
        rows = reader.weight[:, keep] if reader.trans_b else reader.weight[keep, :]
        constants.set(reader.node, 1, rows)


def add_to_bias(graph: gs.Graph, reader: DenseLayer, delta: np.ndarray, constants: ConstantReplacer) -> None:
    """Add `delta` (float64, one value per unit) to what `reader` computes, through its bias. Needs
    `reader.bias_known`. A Gemm's beta becomes 1; a MatMul without a bias gets an Add."""
    dtype = reader.weight.dtype
    node = reader.node
    if node.op == "Gemm":
        bias = (reader.unit_bias() + delta).astype(dtype)
        if input_at(node, 2) is None:
            constant = gs.Constant(fresh_name(graph, f"{node.name}__bias"), bias)
            if len(node.inputs) > 2:
                node.inputs[2] = constant
            else:
                node.inputs.append(constant)
        else:
            constants.set(node, 2, bias)
        node.attrs["beta"] = 1.0
        return
    if reader.bias_node is not None:
        stored = reader.bias.astype(np.float64)
        updated = stored + (delta.reshape((1,) * (stored.ndim - 1) + (-1,)) if stored.ndim else delta)
        constants.set(reader.bias_node, reader.bias_index, updated.astype(dtype))
        return
    output = node.outputs[0]
    product = gs.Variable(fresh_name(graph, f"{output.name}__product"), dtype=output.dtype, shape=output.shape)
    node.outputs[0] = product
    bias = gs.Constant(fresh_name(graph, f"{node.name}__bias"), delta.astype(dtype))
    graph.nodes.append(gs.Node("Add", fresh_name(graph, f"{node.name}__add_bias"), inputs=[product, bias], outputs=[output]))


def hidden_layers(graph: gs.Graph) -> list[Hidden]:
    """Every hidden dense layer, in graph order."""
    found = []
    for node in graph.nodes:
        layer = dense_layer(graph, node)
        if layer is not None:
            hidden = hidden_layer(graph, layer)
            if hidden is not None:
                found.append(hidden)
    return found
