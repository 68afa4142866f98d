"""onnx shape inference, made safe for untrusted models.

onnx 1.23 can be made to allocate without bound, or to abort the process, by a small hostile model;
reccc infers a skeleton of the model first (its weights' data left out) to check for those, and turns
every error onnx raises for an invalid model into a UsageError naming the model.
"""

import math
from collections.abc import Iterator

import onnx

from reccc.errors import UsageError, one_line
from reccc.tensor_data import declared_bytes

# onnx 1.23's data propagation turns each 1-D tensor that an op propagates into a list of dims, about
# 140 bytes an element, so a tiny model can make it allocate terabytes. Shape vectors are short.
SHAPE_VECTOR_MAX_LENGTH = 64

_INTEGER_TYPES = {getattr(onnx.TensorProto, name) for name in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")}


def _check_static_sizes(graph: onnx.GraphProto, source: str) -> None:
    """The shapes a model declares or shape inference derives are allocated later (inputs for
    --verify-each, constant folding in onnxruntime): reject absurd ones first, and unknown types, naming
    the tensor."""
    for kind, values in (("input", graph.input), ("tensor", graph.value_info), ("output", graph.output)):
        for value in values:
            if not value.type.HasField("tensor_type"):
                continue
            tensor_type = value.type.tensor_type
            dims = [dim.dim_value for dim in tensor_type.shape.dim if dim.HasField("dim_value")]
            declared_bytes(tensor_type.elem_type, dims, f"{source}: {kind} '{value.name}'")


def inferred(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Shapes and types inferred, in strict mode, with data propagation (Shape->Gather->Concat->Reshape
    chains keep their symbolic batch) where that is safe."""
    proto = _without_negative_dims(proto)
    _check_static_sizes(proto.graph, source)  # an unknown type would make inference raise a bare ValueError
    # Inference reads the skeleton of the model only (onnx serializes what it infers: the weights would
    # cost seconds per call on a model of hundreds of MB); the weights' data goes back in afterwards.
    skeleton = _skeleton(proto)
    _check_slice_inputs(skeleton, source, data_prop=False)
    plain = _run_inference(skeleton, source, data_prop=False)
    _check_static_sizes(plain.graph, source)
    data_prop = _propagates_only_shape_vectors(plain)
    if data_prop:
        _check_slice_inputs(skeleton, source, data_prop=True)
        result = _run_inference(skeleton, source, data_prop=True)
        _check_static_sizes(result.graph, source)
    else:
        result = plain
    return _with_weights_of(proto, result) if skeleton is not proto else result


def _skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` without the data of its large non-integer initializers (weights, embedding tables) and of
    its integer matrices (quantized tables and weights), which shape inference never reads (it reads
    shape-like inputs: integer scalars and vectors, or a few float scales) and which make up nearly all
    of the bytes it would serialize."""
    def large_weight(tensor: onnx.TensorProto) -> bool:
        if tensor.data_type in _INTEGER_TYPES:
            return len(tensor.dims) >= 2
        return math.prod(tensor.dims) > SHAPE_VECTOR_MAX_LENGTH

    if not any(large_weight(tensor) for tensor in proto.graph.initializer):
        return proto
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(proto)
    for tensor in skeleton.graph.initializer:
        if large_weight(tensor):
            for field in ("raw_data", "float_data", "double_data", "int32_data"):
                tensor.ClearField(field)
    return skeleton


def _with_weights_of(proto: onnx.ModelProto, inferred_skeleton: onnx.ModelProto) -> onnx.ModelProto:
    """The inferred skeleton with the initializers of `proto` put back (the ones it kept are the same)."""
    weights = {tensor.name: tensor for tensor in proto.graph.initializer}
    for tensor in inferred_skeleton.graph.initializer:
        tensor.CopyFrom(weights[tensor.name])
    return inferred_skeleton


def _propagates_only_shape_vectors(inferred: onnx.ModelProto) -> bool:
    """Whether every 1-D input of an op with a data propagation function is a short shape vector: of a
    static length up to SHAPE_VECTOR_MAX_LENGTH, or of a symbolic length that a graph input declares
    (propagation cannot make that one static). A tensor of unknown rank or length, or one in a subgraph,
    might be anything once propagated."""
    graph = inferred.graph
    lengths = {tensor.name: tensor.dims for tensor in graph.initializer}
    lengths.update((value.name, value.type.tensor_type.shape.dim if value.type.tensor_type.HasField("shape") else None)
                   for value in [*graph.input, *graph.value_info, *graph.output])
    declared = {dim.dim_param for value in graph.input for dim in value.type.tensor_type.shape.dim if dim.dim_param}
    opset = next((entry.version for entry in inferred.opset_import if entry.domain in ("", "ai.onnx")), 1)
    for node in graph.node:
        if _subgraphs(node):
            return False
        if _propagates_data(node, opset) and not all(_short_or_not_1d(lengths.get(name), declared) for name in node.input if name):
            return False
    return True


def _short_or_not_1d(dims, declared: set[str]) -> bool:
    if dims is None:
        return False
    if len(dims) != 1:
        return True
    dim = dims[0]
    if isinstance(dim, int):  # an initializer's dim
        return dim <= SHAPE_VECTOR_MAX_LENGTH
    return dim.dim_value <= SHAPE_VECTOR_MAX_LENGTH if dim.HasField("dim_value") else dim.dim_param in declared


def _propagates_data(node: onnx.NodeProto, opset: int) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    try:
        return onnx.defs.get_schema(node.op_type, opset).has_data_propagation_function
    except onnx.defs.SchemaError:
        return False


def _without_negative_dims(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto`, or a copy with each negative dim of its value_info and outputs made unknown: graphsurgeon
    writes an unknown dim as -1 (and a declared one would reach Slice's inference, see below). A graph
    input's negative dim stays, to be reported."""
    values = [*proto.graph.value_info, *proto.graph.output]
    if not any(dim.dim_value < 0 for value in values for dim in value.type.tensor_type.shape.dim):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in [*copy.graph.value_info, *copy.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_value < 0:
                dim.Clear()
    return copy


def _check_slice_inputs(proto: onnx.ModelProto, source: str, data_prop: bool) -> None:
    """onnx's Slice shape inference aborts the whole process (a failed assertion) when its input has a
    negative dim, which Expand or Pad with a negative constant infers. Check the Slices level by level:
    infer a copy in which the Slices not checked yet are Identity, so that the Slices below checked ones
    only see exactly the input shape they will see; reject a negative dim there, naming the tensor. (Slices
    in subgraphs are Identity throughout.)"""
    if not any(_is_slice(node) for node in _nodes(proto.graph)):
        return
    levels = _slice_levels(proto.graph)
    for level in range(max(levels.values(), default=0) + 1):
        lint = onnx.ModelProto()
        lint.CopyFrom(proto)
        checked = {}  # Slice input -> the Slice, for the Slices checked at this level
        for position, node in enumerate(lint.graph.node):
            if levels.get(position, -1) >= level:
                if levels[position] == level:
                    checked[node.input[0]] = node.name or node.output[0]
                _make_identity(node)
        for node in (inner for outer in lint.graph.node for graph in _subgraphs(outer) for inner in _nodes(graph)):
            if _is_slice(node):
                if level == 0:
                    checked[node.input[0]] = node.name or node.output[0]
                _make_identity(node)
        try:
            result = onnx.shape_inference.infer_shapes(lint, check_type=False, strict_mode=False, data_prop=data_prop)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
            return  # the real inference reports what is wrong
        for value in _values(result.graph):
            dims = [dim.dim_value if dim.HasField("dim_value") else "?" for dim in value.type.tensor_type.shape.dim]
            if value.name in checked and any(dim != "?" and dim < 0 for dim in dims):
                raise UsageError(f"{source}: tensor '{value.name}', read by Slice node '{checked[value.name]}', has a negative dim in its shape {dims}")


def _slice_levels(graph: onnx.GraphProto) -> dict[int, int]:
    """For each Slice of `graph` (by position), how many Slices lie above it on the longest path."""
    producer = {output: position for position, node in enumerate(graph.node) for output in node.output if output}
    above = {}  # position -> Slices on the longest path into the node's inputs
    for position, node in enumerate(graph.node):
        sources = [producer[name] for name in node.input if producer.get(name, position) < position]
        above[position] = max((above[p] + _is_slice(graph.node[p]) for p in sources), default=0)
    return {position: above[position] for position, node in enumerate(graph.node) if _is_slice(node)}


def _make_identity(node: onnx.NodeProto) -> None:
    node.op_type = "Identity"
    del node.input[1:]
    del node.attribute[:]


def _is_slice(node: onnx.NodeProto) -> bool:
    return node.op_type == "Slice" and node.domain in ("", "ai.onnx") and len(node.input) > 0


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs."""
    for node in graph.node:
        yield node
        for subgraph in _subgraphs(node):
            yield from _nodes(subgraph)


def _values(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    """Every typed value of `graph` and of its subgraphs."""
    yield from [*graph.input, *graph.value_info, *graph.output]
    for node in graph.node:
        for subgraph in _subgraphs(node):
            yield from _values(subgraph)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [graph for attribute in node.attribute for graph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]]


def _run_inference(proto: onnx.ModelProto, source: str, data_prop: bool) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=data_prop)
    # onnx raises a plain ValueError for some invalid models, such as a Cast to an unknown type
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as error:
        raise UsageError(f"{source}: shape inference failed: {one_line(error)}") from error
