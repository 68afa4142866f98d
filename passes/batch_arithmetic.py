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

The evaluator also follows the offsets: a CumSum of such a tensor is a progression (elements start +
step x their index along one axis), which Concat (after `new_zeros`), Slice and Squeeze keep;
legalize-embedding-bags reads from it that every bag has one length. Its shapes are onnxruntime's,
except that onnxruntime takes a Split by sizes it cannot evaluate to be even: for its shapes the
evaluator gives it such Splits as Slices of unknown bounds (a new dim each), and then those whose sizes
it proves as they are.
"""

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import sympy
from onnx import helper, numpy_helper

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


class Uniform:
    """A tensor whose elements all equal `value` (a sympy expression of input dims)."""

    def __init__(self, value: sympy.Expr):
        self.value = sympy.expand(value)


class Progression:
    """A tensor whose elements are start + step x (their index along `axis`): the offsets of bags that
    all hold `step` ids. `step` is not 0 (that is a Uniform)."""

    def __init__(self, start: sympy.Expr, step: sympy.Expr, axis: int):
        self.start, self.step, self.axis = sympy.expand(start), sympy.expand(step), axis


Value = np.ndarray | Uniform | Progression


def _progression(start: sympy.Expr, step: sympy.Expr, axis: int) -> Uniform | Progression:
    return Uniform(start) if sympy.expand(step) == 0 else Progression(start, step, axis)


class Evaluator:
    """Values of the integer tensors computed from constants and input dims: explicit arrays of sympy
    expressions (constants and onnxruntime's symbolic values), Uniform or Progression."""

    def __init__(self, model: Model):
        self.proto = model.to_onnx()
        dims = {d for t in model.graph.inputs for d in (t.shape or ()) if isinstance(d, str)}
        self.symbols = {name: sympy.Symbol(name, integer=True, nonnegative=True) for name in dims}
        self.values: dict[str, list] = {}
        self.shapes: dict[str, list[sympy.Expr] | None] = {}
        self.known: dict[str, Value] = {}

    def _infer(self, proto: onnx.ModelProto) -> None:
        self.values, shapes, _ = symbolic_values(proto)
        self.shapes = {name: self._shape(dims) for name, dims in shapes.items()}

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

    def value(self, tensor: gs.Tensor) -> Value | None:
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
        """Evaluate `graph`'s nodes. First with every Split by run-time sizes given to the shape inference
        as Slices of unknown bounds, then, until nothing more is proven, with the Splits whose sizes the
        evaluation proved written with those sizes: each round's shapes hold for every run."""
        graph.toposort()
        splits = [n for n in graph.nodes if n.op == "Split" and len(n.inputs) > 1 and n.inputs[1].name
                  and constant_value(n.inputs[1]) is None]
        proven: dict[str, list[sympy.Expr]] = {}
        for _ in range(len(splits) + 1):  # a round per Split at most (each changes what is proven), and a last one
            self._infer(_exact_splits(self.proto, splits, proven) if splits else self.proto)
            self.known = {}
            for node in graph.nodes:
                result = self._evaluate(node)
                if result is not None and node.outputs:
                    self.known[node.outputs[0].name] = result
            now = {}
            for node in splits:
                sizes = self.entries(node.inputs[1], len(node.outputs))
                if sizes is not None and (all(s.is_Integer for s in sizes) or all(sympy.expand(s - sizes[0]) == 0 for s in sizes)):
                    now[node.name] = sizes
            if now.keys() == proven.keys():
                return
            proven = now

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shapes.get(tensor.name)
        return len(shape) if shape is not None else None

    def _evaluate(self, node: gs.Node) -> Value | None:
        inputs = [self.value(t) if t.name else None for t in node.inputs]
        if node.op == "ConstantOfShape":
            fill = node.attrs.get("value")
            fill = fill.values if isinstance(fill, gs.Constant) else np.zeros(1, np.float32)
            return Uniform(sympy.Integer(int(fill.item()))) if np.issubdtype(fill.dtype, np.integer) else None
        if not inputs or any(v is None for v in inputs[:1]):
            return None
        if isinstance(inputs[0], Progression):
            return self._rearranged_progression(node, inputs[0])
        if node.op == "CumSum" and _one_value(inputs[0]) is not None and not node.attrs.get("reverse", 0):
            return self._cumsum(node, _one_value(inputs[0]).value)
        if node.op in _REARRANGING:
            return _one_value(inputs[0])
        if node.op == "ReduceSum" and _one_value(inputs[0]) is not None:
            before, after = self.shapes.get(node.inputs[0].name), self.shapes.get(node.outputs[0].name)
            if before is None or after is None:
                return None
            # Each output element sums (input elements / output elements) equal values.
            return Uniform(_one_value(inputs[0]).value * sympy.Mul(*before) / sympy.Mul(*after))
        if node.op in _ARITHMETIC and len(inputs) == 2 and all(_one_value(v) is not None for v in inputs):
            return Uniform(_ARITHMETIC[node.op](_one_value(inputs[0]).value, _one_value(inputs[1]).value))
        if node.op == "Concat" and all(v is not None for v in inputs):
            parts = [self._explicit(v, t) for v, t in zip(inputs, node.inputs)]
            if all(p is not None for p in parts):
                try:
                    return np.concatenate(parts, axis=node.attrs.get("axis", 0))
                except (ValueError, np.exceptions.AxisError):  # parts that do not join: an invalid graph, not a value
                    return None
            return self._joined_progression(node, inputs)
        return None

    def _cumsum(self, node: gs.Node, value: sympy.Expr) -> Value | None:
        """A running sum of equal values: value x (index + 1), or x index when exclusive."""
        axis, rank = constant_value(node.inputs[1]), self.rank(node.inputs[0])
        if axis is None or axis.size != 1 or rank is None or not -rank <= int(axis.item()) < rank:
            return None
        return _progression(0 if node.attrs.get("exclusive", 0) else value, value, int(axis.item()) % rank)

    def _joined_progression(self, node: gs.Node, inputs: list[Value]) -> Value | None:
        """A Concat of progressions along the axis they step along, each starting where the one before
        it would continue (a one-long Uniform part fits any step: `new_zeros` before a cumsum)."""
        rank = self.rank(node.outputs[0])
        if rank is None or not -rank <= node.attrs.get("axis", 0) < rank:
            return None
        axis = node.attrs.get("axis", 0) % rank
        parts = []
        for value, tensor in zip(inputs, node.inputs):
            shape = self.shapes.get(tensor.name)
            if shape is None:
                return None
            if isinstance(value, Progression) and value.axis == axis:
                parts.append((value.start, value.step, shape[axis]))
            elif _one_value(value) is not None:
                parts.append((_one_value(value).value, None if shape[axis] == 1 else sympy.Integer(0), shape[axis]))
            else:
                return None
        steps = {sympy.expand(step) for _, step, _ in parts if step is not None}
        if len(steps) != 1:
            return None
        step = steps.pop()
        following = parts[0][0]
        for start, _, length in parts:
            if sympy.expand(start - following) != 0:
                return None
            following = start + step * length
        return _progression(parts[0][0], step, axis)

    def _rearranged_progression(self, node: gs.Node, value: Progression) -> Value | None:
        """A progression through ops that keep it: Identity and Cast; Slice (of its axis, from a
        nonnegative start by a positive step: a new start and step); Squeeze and Unsqueeze (its axis
        moves, or a squeezed one-long axis leaves its start)."""
        if node.op in ("Identity", "Cast"):
            return value
        rank = self.rank(node.inputs[0])
        if rank is None or node.op not in ("Slice", "Squeeze", "Unsqueeze") or len(node.inputs) < 2:
            return None
        operands = [constant_value(t) if t.name else None for t in node.inputs[1:]]
        if operands[0] is None or any(t.name and o is None for t, o in zip(node.inputs[1:], operands)):
            return None
        if node.op == "Slice":
            starts = operands[0].reshape(-1).tolist()
            axes = operands[2].reshape(-1).tolist() if len(operands) > 2 and operands[2] is not None else list(range(len(starts)))
            steps = operands[3].reshape(-1).tolist() if len(operands) > 3 and operands[3] is not None else [1] * len(axes)
            start, step = value.start, value.step
            for first, axis, stride in zip(starts, axes, steps):
                if axis % rank == value.axis:
                    if first < 0 or stride <= 0:
                        return None  # counted from the end: the length is not read here
                    start, step = start + step * first, step * stride
            return _progression(start, step, value.axis)
        axes = operands[0].reshape(-1).tolist()
        if node.op == "Squeeze":
            axes = [a % rank for a in axes]
            if value.axis in axes:
                return Uniform(value.start)
            return Progression(value.start, value.step, value.axis - sum(a < value.axis for a in axes))
        inserted = {a % (rank + len(axes)) for a in axes}
        kept = [position for position in range(rank + len(axes)) if position not in inserted]
        return Progression(value.start, value.step, kept[value.axis])

    def _explicit(self, value: Value, tensor: gs.Tensor) -> np.ndarray | None:
        """The value as an array: a Uniform or Progression needs a small static shape."""
        if isinstance(value, np.ndarray):
            return value
        shape = self.shapes.get(tensor.name)
        if shape is None or not all(d.is_Integer for d in shape) or math.prod(int(d) for d in shape) > _MAX_ELEMENTS:
            return None
        shape = [int(d) for d in shape]
        if isinstance(value, Progression):
            index = np.indices(shape)[value.axis].astype(object)
            return np.vectorize(sympy.expand, otypes=[object])(value.start + value.step * index) if index.size else index
        return np.full(shape, value.value, dtype=object)

    def entries(self, tensor: gs.Tensor, count: int) -> list[sympy.Expr] | None:
        """A vector of `count` sizes, if known."""
        value = self.value(tensor)
        if isinstance(value, Uniform):
            return [value.value] * count
        if isinstance(value, Progression):
            return [sympy.expand(value.start + value.step * i) for i in range(count)] if value.axis == 0 and self.rank(tensor) == 1 else None
        if value is None or value.ndim != 1 or len(value) != count:
            return None
        return [sympy.expand(e) for e in value]


def _exact_splits(proto: onnx.ModelProto, splits: list[gs.Node], proven: dict[str, list[sympy.Expr]]) -> onnx.ModelProto:
    """A copy of `proto` for the shape inference, which takes a Split by sizes it cannot evaluate to be
    even: a Split of `proven` sizes gets them (constants, or none: an even split), every other one of
    `splits` becomes a Slice per output with bounds that are graph inputs (values the inference cannot
    know), so each output's length along the axis is a dim of its own."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    opset = next((o.version for o in copy.opset_import if o.domain in ("", "ai.onnx")), 0)
    names = {n.name for n in splits}
    nodes = []
    for node in graph.node:
        if node.name not in names:
            nodes.append(node)
            continue
        sizes = proven.get(node.name)
        if sizes is not None and all(s.is_Integer for s in sizes):
            constant = f"{node.name}__sizes"
            graph.initializer.append(numpy_helper.from_array(np.array([int(s) for s in sizes], np.int64), constant))
            node.input[1] = constant
            nodes.append(node)
        elif sizes is not None:
            del node.input[1:]
            if opset >= 18 and not any(a.name == "num_outputs" for a in node.attribute):  # required there without sizes
                node.attribute.append(helper.make_attribute("num_outputs", len(node.output)))
            nodes.append(node)
        else:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            bound, axes = f"{node.name}__bound", f"{node.name}__axes"
            graph.input.append(helper.make_tensor_value_info(bound, onnx.TensorProto.INT64, [1]))
            graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
            nodes.extend(helper.make_node("Slice", [node.input[0], bound, bound, axes], [output], name=f"{output}__slice")
                         for output in node.output)
    del graph.node[:]
    graph.node.extend(nodes)
    return copy


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


def _one_value(value: Value | None) -> Uniform | None:
    """`value` as a Uniform, if all its elements are one expression."""
    if value is None:
        return None
    if isinstance(value, Uniform):
        return value
    if isinstance(value, Progression):
        return None
    flat = list(value.flat)
    if flat and all(sympy.expand(e - flat[0]) == 0 for e in flat):
        return Uniform(flat[0])
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
            evaluator = Evaluator(model)
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
