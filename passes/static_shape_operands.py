"""static-shape-operands: shape-like operands computed at run time (Reshape/Expand/Tile targets, Pad
pads, ConstantOfShape shapes, Range bounds, TopK k, ...) become constants, or constants joined with the
graph input dims they are made of.

Exporters build these operands from Shape ops, often through Range, Where, Equal and ConstantOfShape
(DIN's attention, for one). TVM's importer follows only simple Shape chains: "Node ... cannot handle
ShapeExpr inputs", "Dynamic pads are not supported yet", a Reshape of a tensor with unknown shape.
onnxruntime's symbolic shape inference computes what each operand holds in terms of the graph inputs'
symbolic dims; an operand it knows entirely becomes a constant, and one holding input dims becomes
Concat(constants, Shape(input)[axis], ...), which TVM reads as a shape expression. A Reshape copies a
dim that its input has at the same axis (0); a Tile by an input dim of a 1-sized axis becomes Expand.
"""

import numpy as np
import onnx_graphsurgeon as gs
import sympy

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import constant_value, new_constant, new_node, replace_node, shape_of
from reccc.passes.symbolic_shapes import symbolic_values

# op -> the inputs that are shape-like (int64 vectors or scalars read as sizes, axes or bounds).
_SHAPE_OPERANDS = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Pad": (1,),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "Slice": (1, 2, 3, 4),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "Split": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
}
# Operands that may hold graph input dims (those that TVM's importer reads as shape expressions).
_SYMBOLIC_OK = {("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0), ("Tile", 1)}

Entry = int | str | None  # a known value, a graph input's dim_param (that dim's size at run time), or unknown
_MAX_ROUNDS = 4
def _input_dims(graph: gs.Graph) -> dict[str, tuple[str, int]]:
    """dim_param -> (graph input, axis) where it can be read at run time."""
    sources = {}
    for tensor in graph.inputs:
        for axis, dim in enumerate(tensor.shape or ()):
            if isinstance(dim, str) and dim:
                sources.setdefault(dim, (tensor.name, axis))
    return sources


def _entries(values, sources: dict[str, tuple[str, int]]) -> list[Entry] | None:
    """A symbolic value as ints, input dims and unknowns (None), or None if it is not a flat int value."""
    flat = np.asarray(values, dtype=object).reshape(-1).tolist()
    entries: list[Entry] = []
    for each in flat:
        if isinstance(each, bool):
            return None
        if isinstance(each, (int, np.integer, sympy.Integer)):
            entries.append(int(each))
        elif isinstance(each, sympy.Symbol) and str(each) in sources:
            entries.append(str(each))
        elif isinstance(each, sympy.Expr):
            entries.append(None)
        else:
            return None
    return entries


def _value(tensor: gs.Tensor, inferred: dict[str, list], depth: int = 0):
    """What a shape-like tensor holds: the inference's value, a constant, or for Identity and Concat
    (which the inference does not follow when constants feed them) their inputs' values."""
    if tensor.name in inferred:
        return inferred[tensor.name]
    constant = constant_value(tensor)
    if constant is not None or len(tensor.inputs) != 1 or depth > 16:
        return constant
    node = tensor.inputs[0]
    if node.op == "Identity":
        return _value(node.inputs[0], inferred, depth + 1)
    if node.op == "Concat" and node.attrs.get("axis") in (0, -1):
        parts = [_value(each, inferred, depth + 1) for each in node.inputs]
        if all(part is not None and np.asarray(part, dtype=object).ndim == 1 for part in parts):
            return [entry for part in parts for entry in np.asarray(part, dtype=object).tolist()]
    return None


def _same_constant(operand: gs.Tensor, entries: list[Entry]) -> bool:
    current = constant_value(operand)
    return current is not None and all(isinstance(e, int) for e in entries) and current.reshape(-1).tolist() == entries


def _shape_entries(dims: list | None, sources: dict[str, tuple[str, int]]) -> list[Entry] | None:
    """An inferred shape (dim_values, dim_params; 0 is unknown) as entries, or None."""
    if dims is None or not all((isinstance(d, int) and d > 0) or d in sources for d in dims):
        return None
    return list(dims)


class _Builder:
    """Makes the replacement operands, reading each input dim with one Shape node per graph input."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph, self.opset = graph, opset
        self.inputs = {tensor.name: tensor for tensor in graph.inputs}
        self.sources = _input_dims(graph)
        self.dims: dict[str, gs.Variable] = {}

    def operand(self, entries: list[Entry], like: np.ndarray | None, base: str) -> gs.Tensor | None:
        if all(isinstance(e, int) for e in entries):
            values = np.array(entries, np.int64)
            return new_constant(self.graph, base, values.reshape(like.shape) if like is not None else values)
        if self.opset < 15:  # Shape's start/end attributes
            return None
        parts, run = [], []
        for entry in entries:
            if isinstance(entry, int):
                run.append(entry)
                continue
            if run:
                parts.append(new_constant(self.graph, f"{base}_part{len(parts)}", np.array(run, np.int64)))
                run = []
            parts.append(self._dim(entry))
        if run:
            parts.append(new_constant(self.graph, f"{base}_part{len(parts)}", np.array(run, np.int64)))
        joined = gs.Variable(f"{base}_shape", np.int64, [len(entries)])
        new_node(self.graph, "Concat", f"{base}_concat", parts, [joined], axis=0)
        return joined

    def _dim(self, symbol: str) -> gs.Variable:
        if symbol not in self.dims:
            name, axis = self.sources[symbol]
            dim = gs.Variable(f"{name}_dim{axis}", np.int64, [1])
            new_node(self.graph, "Shape", f"{name}_dim{axis}", [self.inputs[name]], [dim], start=axis, end=axis + 1)
            self.dims[symbol] = dim
        return self.dims[symbol]


@register_pass
class StaticShapeOperands(Pass):
    name = "static-shape-operands"
    summary = ("shape operands computed at run time (Reshape/Expand/Tile targets, pads, ...) become constants, "
               "or constants joined with graph input dims")

    def call(self, model: Model) -> bool:
        # Each round's constants give the next round's inference static dims it could not see.
        changed = False
        for _ in range(_MAX_ROUNDS):
            if not self._round(model):
                break
            changed = True
            # Shapes the new operands make static are what the next passes (resolve-static-ifs) read.
            model.graph = gs.import_onnx(model.to_onnx())
        return changed

    def _round(self, model: Model) -> bool:
        graph = model.graph
        pending = [(node, index) for node in graph.nodes for index in _SHAPE_OPERANDS.get(node.op, ())
                   if index < len(node.inputs) and node.inputs[index].name and _needs_rewrite(node, index)]
        if not pending:
            return False
        values, shapes, failure = symbolic_values(model.to_onnx())
        if failure:
            self.note(f"symbolic shape inference stopped early ({failure}): operands after that stay")
        builder = _Builder(graph, model.opset)
        changed = False
        for node, index in pending:
            operand = node.inputs[index]
            value = _value(operand, values)
            entries = None if value is None else _entries(value, builder.sources)
            if entries is None:
                continue
            if node.op == "Reshape":
                entries = _reshape_target(node, entries)
            elif node.op == "Expand" and not _static(node.inputs[0]):
                # TVM's importer expands a tensor with symbolic dims only to a shape expression: the
                # output's full shape, its input dims read at run time.
                entries = _shape_entries(shapes.get(node.outputs[0].name), builder.sources) or entries
            if entries is None or None in entries:
                continue
            if node.op == "Tile" and not all(isinstance(e, int) for e in entries):
                changed |= self._tile_by_input_dims(graph, node, entries, shapes.get(node.inputs[0].name), builder)
                continue
            if not all(isinstance(e, int) for e in entries) and (node.op, index) not in _SYMBOLIC_OK:
                continue
            if _same_constant(operand, entries):
                continue
            like = np.asarray(value, dtype=object)
            replacement = builder.operand(entries, like if like.ndim == 0 else None, f"{node.name}_in{index}")
            if replacement is not None:
                node.inputs[index] = replacement
                changed = True
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)
        return changed

    def _tile_by_input_dims(self, graph: gs.Graph, node: gs.Node, repeats: list[Entry], shape: list | None,
                            builder: _Builder) -> bool:
        """Tile(x, [..., input dim, ...]) where x's axis is 1 there: Tile by the static repeats, then
        Expand the 1-sized axes to the input dims. `shape`: x's inferred shape."""
        if shape is None or len(shape) != len(repeats):
            return False
        if any(not isinstance(r, int) and dim != 1 for r, dim in zip(repeats, shape)):
            return False
        static = [r if isinstance(r, int) else 1 for r in repeats]
        target = [r if not isinstance(r, int) else (dim * r if isinstance(dim, int) and dim > 0 else 1)
                  for r, dim in zip(repeats, shape)]
        tiled = node.inputs[0]
        if any(r != 1 for r in static):
            tiled = gs.Variable(f"{node.name}_tiled", node.inputs[0].dtype)
            new_node(graph, "Tile", f"{node.name}_static", [node.inputs[0], new_constant(graph, f"{node.name}_repeats", np.array(static, np.int64))], [tiled])
        expanded_to = builder.operand(target, None, f"{node.name}_in1")
        if expanded_to is None:
            return False
        replace_node(graph, node, "Expand", [tiled, expanded_to])
        return True


def _needs_rewrite(node: gs.Node, index: int) -> bool:
    """Computed at run time (other than this pass's own constants joined with input dims), or a constant
    Expand target for a tensor with symbolic dims (which TVM's importer expands only to a shape
    expression)."""
    operand = node.inputs[index]
    if constant_value(operand) is None:
        return node.op == "Tile" or not _reads_input_dims(operand)  # TVM tiles by constants only
    return node.op == "Expand" and not _static(node.inputs[0])


def _reads_input_dims(tensor: gs.Tensor) -> bool:
    """Concat of constants and one-dim Shape reads of graph inputs: what this pass writes."""
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Concat":
        return False
    return all(constant_value(part) is not None or _input_dim_read(part) for part in tensor.inputs[0].inputs)


def _input_dim_read(tensor: gs.Tensor) -> bool:
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Shape":
        return False
    reader = tensor.inputs[0]
    source = reader.inputs[0]
    return not source.inputs and not isinstance(source, gs.Constant) and reader.attrs.get("end", 0) - reader.attrs.get("start", 0) == 1


def _static(tensor: gs.Tensor) -> bool:
    shape = shape_of(tensor)
    return shape is not None and all(isinstance(dim, int) for dim in shape)


def _reshape_target(node: gs.Node, entries: list[Entry]) -> list[Entry] | None:
    """A Reshape target in constants where it can be: an input dim that the data has at the same axis
    becomes 0 (copy that dim), and one input dim or unknown left, with no -1, becomes -1 (onnx's shape
    inference keeps static dims through these, not through a target read from Shape). None when
    unknowns remain."""
    if node.attrs.get("allowzero", 0):
        return entries
    shape = shape_of(node.inputs[0]) or ()
    target = [0 if isinstance(entry, str) and axis < len(shape) and shape[axis] == entry else entry
              for axis, entry in enumerate(entries)]
    open_axes = [axis for axis, entry in enumerate(target) if not isinstance(entry, int)]
    if len(open_axes) == 1 and -1 not in target:
        target[open_axes[0]] = -1
    return target
