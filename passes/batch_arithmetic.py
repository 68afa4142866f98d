"""legalize-batch-arithmetic: batch-size arithmetic that TVM's importer cannot follow becomes forms it
reads, with the same values.

torchrec's KeyedJaggedTensor, exported by torch's dynamo exporter, derives its per-table split sizes
and offsets from the batch: `lengths = full((tables * batch,), bag)` (an Expand to
`Reshape(bag * batch_dim, [-1])`), `sizes = lengths.view(tables, -1).sum(1)` (then Slice, Squeeze,
Reshape, Gather of each sum and a Concat) to Split the flat ids, and `offsets = cumsum(lengths)` that
legalize-embedding-bags pools between (`offsets[1:]`, `Range(0, ids)`). TVM's importer keeps an
integer scalar derived from Shape as a PrimValue (a symbolic scalar), and stops on four forms:

- `Reshape(scalar, [-1])`: "Reshape expects the input data to be a Tensor. However, the given input is
  ir.PrimType". Unsqueeze(axes [0]) computes the same one-element vector for any 0-d tensor, and TVM
  reads it of a PrimValue as a shape expression (which Expand takes).
- `Slice(x, 1, INT64_MAX)` on a symbolic axis: TVM gives it the length min(2^63 - 1, dim) - 1, which it
  cannot prove equal to the dim - 1 of the other operand of an elementwise op, whose result then has
  an unknown shape ("Reshape expects the input tensor to have known shape"). Ending at the dim, read
  with Shape (a shape expression), gives exactly dim - start.
- `Range(0, n, 1)` with n a PrimValue: an unknown length. An exclusive CumSum of ones of the shape
  [n] (a shape expression) has the length n; only where onnxruntime's symbolic inference knows n to
  be a size (nonnegative), as a negative end makes Range empty and ConstantOfShape fail.
- Split by a tensor of sizes: "Dynamic Split not yet supported". Neither onnx's nor onnxruntime's
  symbolic inference follows values through Expand and ReduceSum, so this pass evaluates them itself,
  for the one kind of value the chain holds: a tensor whose elements are all one expression of the
  graph inputs' dims (`full()`'s value; a ReduceSum multiplies it by the reduced size; reshaping,
  slicing, gathering, squeezing keep it). Sizes proven equal (each table's `bag * batch`) make the
  Split even; sizes proven static become constants.
"""

import math

import numpy as np
import onnx_graphsurgeon as gs
import sympy

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import constant_value, fresh_name, new_constant, new_node, replace_node, shape_of
from reccc.passes.symbolic_shapes import symbolic_values

# Ops whose every output element is an element of input 0: a tensor of one value stays one.
_REARRANGING = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather", "Transpose",
                "Tile", "Expand", "Cast"}
_ARITHMETIC = {"Add": sympy.Add, "Mul": sympy.Mul, "Sub": lambda a, b: a - b}
# Explicit values are kept only this small: they are shape-like vectors.
_MAX_ELEMENTS = 64


class _Uniform:
    """A tensor whose elements all equal `value` (a sympy expression of input dims)."""

    def __init__(self, value: sympy.Expr):
        self.value = sympy.expand(value)


class _Evaluator:
    """Values of the integer tensors computed from constants and input dims: explicit arrays of sympy
    expressions (constants and onnxruntime's symbolic values) or _Uniform."""

    def __init__(self, model: Model):
        self.values, shapes, _ = symbolic_values(model.to_onnx())
        dims = {d for t in model.graph.inputs for d in (t.shape or ()) if isinstance(d, str)}
        self.symbols = {name: sympy.Symbol(name, integer=True, nonnegative=True) for name in dims}
        self.shapes = {name: self._shape(dims) for name, dims in shapes.items()}
        self.known: dict[str, np.ndarray | _Uniform] = {}

    def _shape(self, dims: list) -> list[sympy.Expr] | None:
        """onnxruntime's inferred shape as expressions (dims are ints or texts like '3*batch'), or None
        where a dim is unknown (0)."""
        result = []
        for dim in dims:
            if isinstance(dim, int):
                if dim <= 0:
                    return None
                result.append(sympy.Integer(dim))
            else:
                try:
                    result.append(sympy.sympify(dim, locals=self.symbols))
                except (sympy.SympifyError, TypeError, SyntaxError):
                    return None
        return result

    def value(self, tensor: gs.Tensor) -> np.ndarray | _Uniform | None:
        if tensor.name in self.known:
            return self.known[tensor.name]
        constant = constant_value(tensor)
        if constant is not None and constant.size <= _MAX_ELEMENTS and np.issubdtype(constant.dtype, np.integer):
            return np.vectorize(sympy.Integer, otypes=[object])(constant) if constant.size else constant.astype(object)
        inferred = self.values.get(tensor.name)
        if inferred is not None:
            array = np.asarray(inferred, dtype=object)
            if array.size <= _MAX_ELEMENTS and all(isinstance(e, (int, sympy.Expr)) and not isinstance(e, bool) for e in array.flat):
                return np.vectorize(sympy.sympify, otypes=[object])(array) if array.size else array
        return None

    def run(self, graph: gs.Graph) -> None:
        graph.toposort()
        for node in graph.nodes:
            result = self._evaluate(node)
            if result is not None and node.outputs:
                self.known[node.outputs[0].name] = result

    def _evaluate(self, node: gs.Node) -> np.ndarray | _Uniform | None:
        inputs = [self.value(t) if t.name else None for t in node.inputs]
        if not inputs or any(v is None for v in inputs[:1]):
            return None
        if node.op in _REARRANGING:
            return _one_value(inputs[0])
        if node.op == "ReduceSum" and _one_value(inputs[0]) is not None:
            before, after = self.shapes.get(node.inputs[0].name), self.shapes.get(node.outputs[0].name)
            if before is None or after is None:
                return None
            # Each output element sums (input elements / output elements) equal values.
            return _Uniform(_one_value(inputs[0]).value * sympy.Mul(*before) / sympy.Mul(*after))
        if node.op in _ARITHMETIC and len(inputs) == 2 and all(_one_value(v) is not None for v in inputs):
            return _Uniform(_ARITHMETIC[node.op](_one_value(inputs[0]).value, _one_value(inputs[1]).value))
        if node.op == "Concat" and all(v is not None for v in inputs):
            parts = [self._explicit(v, t) for v, t in zip(inputs, node.inputs)]
            if any(p is None for p in parts):
                return None
            try:
                return np.concatenate(parts, axis=node.attrs.get("axis", 0))
            except (ValueError, np.exceptions.AxisError):  # parts that do not join: an invalid graph, not a value
                return None
        return None

    def _explicit(self, value: np.ndarray | _Uniform, tensor: gs.Tensor) -> np.ndarray | None:
        """The value as an array: a _Uniform needs a small static shape."""
        if isinstance(value, np.ndarray):
            return value
        shape = self.shapes.get(tensor.name)
        if shape is None or not all(d.is_Integer for d in shape) or math.prod(int(d) for d in shape) > _MAX_ELEMENTS:
            return None
        return np.full([int(d) for d in shape], value.value, dtype=object)

    def entries(self, tensor: gs.Tensor, count: int) -> list[sympy.Expr] | None:
        """A vector of `count` sizes, if known."""
        value = self.value(tensor)
        if isinstance(value, _Uniform):
            return [value.value] * count
        if value is None or value.ndim != 1 or len(value) != count:
            return None
        return [sympy.expand(e) for e in value]


def _is_int(tensor: gs.Tensor, number: int) -> bool:
    value = constant_value(tensor)
    return value is not None and value.size == 1 and np.issubdtype(value.dtype, np.integer) and int(value.item()) == number


def _as_int64(graph: gs.Graph, node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    """`tensor`, Cast to int64 if it is another integer type (ConstantOfShape takes an int64 shape)."""
    if tensor.dtype == np.int64:
        return tensor
    cast = gs.Variable(fresh_name(graph, f"{node.name}_end64"), np.int64, None)
    new_node(graph, "Cast", f"{node.name}_end64", [tensor], [cast], to=7)  # onnx.TensorProto.INT64
    return cast


def _one_value(value: np.ndarray | _Uniform) -> _Uniform | None:
    """`value` as a _Uniform, if all its elements are one expression."""
    if isinstance(value, _Uniform):
        return value
    flat = list(value.flat)
    if flat and all(sympy.expand(e - flat[0]) == 0 for e in flat):
        return _Uniform(flat[0])
    return None


@register_pass
class LegalizeBatchArithmetic(Pass):
    name = "legalize-batch-arithmetic"
    summary = ("batch-size arithmetic TVM cannot import, rewritten: Reshape of a 0-d value to Unsqueeze, Slice to "
               "the end of a symbolic axis to Slice to its dim, Range(0, size) to CumSum, Split by run-time sizes "
               "proven equal to an even Split")

    def call(self, model: Model) -> bool:
        # Shapes as of now: a rewrite before this pass (an If resolved to its branch) may have left what
        # follows it without the ranks this pass reads. Only then, as re-importing costs an export.
        if any(n.op in ("Reshape", "Slice", "Split") and shape_of(n.inputs[0]) is None for n in model.graph.nodes):
            model.graph = gs.import_onnx(model.to_onnx())
        graph = model.graph
        self.opset = model.opset  # Shape's start and end attributes are opset 15's
        changed = False
        for node in [n for n in graph.nodes if n.op == "Reshape"]:
            target = constant_value(node.inputs[1])
            if shape_of(node.inputs[0]) == () and target is not None and target.reshape(-1).tolist() in ([-1], [1]):
                replace_node(graph, node, "Unsqueeze", [node.inputs[0], new_constant(graph, f"{node.name}_axes", np.array([0], np.int64))])
                self.note(f"{node.name}: Reshape of a scalar becomes Unsqueeze")
                changed = True
        for node in [n for n in graph.nodes if n.op == "Slice"]:
            changed |= self._slice_to_end(graph, node)
        ranges = [n for n in graph.nodes if n.op == "Range" and constant_value(n.inputs[1]) is None
                  and _is_int(n.inputs[0], 0) and _is_int(n.inputs[2], 1)]
        if ranges:
            values, _, _ = symbolic_values(model.to_onnx())
            for node in ranges:
                changed |= self._range(graph, node, values.get(node.inputs[1].name))
        splits = [n for n in graph.nodes if n.op == "Split" and len(n.inputs) > 1 and n.inputs[1].name
                  and constant_value(n.inputs[1]) is None]
        if splits:
            evaluator = _Evaluator(model)
            evaluator.run(graph)
            for node in splits:
                changed |= self._split(model, node, evaluator.entries(node.inputs[1], len(node.outputs)))
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)
        return changed

    def _slice_to_end(self, graph: gs.Graph, node: gs.Node) -> bool:
        """A Slice to the end (an end of 2^31 - 1 or more, as torch writes x[1:]) of a symbolic axis ends
        at that axis's dim, read with Shape: TVM gives the result the length dim - start instead of
        min(2^63 - 1, dim) - start, a dim it cannot prove equal to others (an elementwise op of the
        slice and a tensor of `dim - start` rows then has an unknown shape)."""
        starts, ends = (constant_value(t) for t in node.inputs[1:3])
        axes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        steps = constant_value(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
        shape = shape_of(node.inputs[0])
        if starts is None or ends is None or ends.dtype != np.int64 or shape is None or self.opset < 15 or (len(node.inputs) > 3 and node.inputs[3].name and axes is None):
            return False
        axes = axes.reshape(-1).tolist() if axes is not None else list(range(ends.size))
        steps = steps.reshape(-1).tolist() if steps is not None else [1] * len(axes)
        if not shape or not (starts.ndim == ends.ndim == 1 and len(starts) == len(ends) == len(axes) == len(steps)):
            return False  # an invalid Slice: left for onnx and TVM to report
        axes = [a % len(shape) for a in axes]
        to_end = [i for i, axis in enumerate(axes) if ends[i] >= 2**31 - 1 and isinstance(shape[axis], str)
                  and steps[i] == 1 and starts[i] >= 0]
        if not to_end:
            return False
        parts, run = [], []
        for i, end in enumerate(ends.tolist()):
            if i not in to_end:
                run.append(end)
                continue
            if run:
                parts.append(new_constant(graph, f"{node.name}_ends_part{len(parts)}", np.array(run, np.int64)))
                run = []
            dim = gs.Variable(fresh_name(graph, f"{node.name}_dim{axes[i]}"), np.int64, [1])
            new_node(graph, "Shape", f"{node.name}_dim{axes[i]}", [node.inputs[0]], [dim], start=axes[i], end=axes[i] + 1)
            parts.append(dim)
        if run:
            parts.append(new_constant(graph, f"{node.name}_ends_part{len(parts)}", np.array(run, np.int64)))
        joined = gs.Variable(fresh_name(graph, f"{node.name}_ends"), np.int64, [len(ends)])
        new_node(graph, "Concat", f"{node.name}_ends", parts, [joined], axis=0)
        node.inputs[2] = joined
        self.note(f"{node.name}: slices to the end of axes {[axes[i] for i in to_end]}")
        return True

    def _range(self, graph: gs.Graph, node: gs.Node, end) -> bool:
        """Range(0, end, 1) -> CumSum(ConstantOfShape([end], 1), exclusive): TVM imports a Range whose end
        is a PrimValue with an unknown length, and the CumSum with the length [end] (a shape
        expression). Only where `end` is known to be a size (a nonnegative expression of input dims):
        a negative end gives Range an empty result and ConstantOfShape an error."""
        end = np.asarray(end, dtype=object) if end is not None else None
        if end is None or end.size != 1 or not isinstance(end.item(), sympy.Expr) or not end.item().is_nonnegative:
            return False
        dtype = node.inputs[1].dtype
        length = gs.Variable(fresh_name(graph, f"{node.name}_length"), np.int64, [1])
        ones = gs.Variable(fresh_name(graph, f"{node.name}_ones"), dtype, None)
        new_node(graph, "Unsqueeze", f"{node.name}_length", [_as_int64(graph, node, node.inputs[1]),
                 new_constant(graph, f"{node.name}_axes", np.array([0], np.int64))], [length])
        new_node(graph, "ConstantOfShape", f"{node.name}_ones", [length], [ones],
                 value=gs.Constant(f"{node.name}_one", np.ones(1, dtype)))
        replace_node(graph, node, "CumSum", [ones, new_constant(graph, f"{node.name}_axis", np.array(0, np.int64))], exclusive=1)
        self.note(f"{node.name}: Range(0, {end.item()}) becomes an exclusive CumSum of ones")
        return True

    def _split(self, model: Model, node: gs.Node, sizes: list[sympy.Expr] | None) -> bool:
        if sizes is None:
            return False
        if all(size.is_Integer for size in sizes):
            node.inputs[1] = new_constant(model.graph, f"{node.name}_sizes", np.array([int(s) for s in sizes], np.int64))
            self.note(f"{node.name}: sizes {[int(s) for s in sizes]}")
            return True
        if all(sympy.expand(size - sizes[0]) == 0 for size in sizes):
            self._even_split(model.graph, node)
            self.note(f"{node.name}: {len(sizes)} equal parts of {sizes[0]}")
            return True
        return False

    def _even_split(self, graph: gs.Graph, node: gs.Node) -> None:
        """Split `node`'s input into its outputs' count of equal parts (the sizes sum to the axis, as the
        graph is valid, so equal parts are these sizes). Where the dims after the axis are static, as a
        Reshape that makes the parts an axis of their own, a Split of it and Squeezes: TVM's even split
        of a symbolic dim gives each part a length like (9 * batch + 2) // 3 - ..., which later passes
        do not simplify, and the Reshape gives it 3 * batch."""
        data, count = node.inputs[0], len(node.outputs)
        shape = shape_of(data)
        axis = node.attrs.get("axis", 0) % len(shape) if shape else None
        if not shape or not all(isinstance(d, int) for d in shape[axis + 1:]):
            node.inputs = [data]
            if self.opset >= 18:
                node.attrs["num_outputs"] = count
            return
        parted = gs.Variable(fresh_name(graph, f"{node.name}_parts"), data.dtype, None)
        target = [0] * axis + [count, -1] + list(shape[axis + 1:])
        new_node(graph, "Reshape", f"{node.name}_parts", [data, new_constant(graph, f"{node.name}_parts_shape", np.array(target, np.int64))], [parted])
        pieces = [gs.Variable(fresh_name(graph, f"{output.name}_part"), data.dtype, None) for output in node.outputs]
        new_node(graph, "Split", node.name, [parted], pieces, axis=axis,
                 **({"num_outputs": count} if self.opset >= 18 else {}))
        axes = new_constant(graph, f"{node.name}_squeeze_axes", np.array([axis], np.int64))
        for piece, output in zip(pieces, list(node.outputs)):
            new_node(graph, "Squeeze", f"{output.name}_squeeze", [piece, axes], [output])
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.remove(node)
