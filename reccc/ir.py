"""reccc's IR: an onnx-graphsurgeon Graph plus what reccc adds to it.

graphsurgeon does import/export, toposort and cleanup; this module adds checked shapes and dtypes
(onnx shape inference in strict mode, sizes no larger than reccc.tensor_data's limit), opset validation, unique node names (errors name nodes),
and a networkx view of the dataflow for analyses.
"""

from collections.abc import Iterator, Mapping, Sequence

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from reccc.errors import CompileError, UsageError, one_line
from reccc.tensor_data import declared_bytes

# Opsets of the default ONNX domain that both TVM's Relax importer and onnxruntime handle.
SUPPORTED_OPSETS = range(13, 24)


class Model:
    """One ONNX model being compiled. Passes mutate `graph` in place."""

    def __init__(self, graph: gs.Graph, source: str = "<model>"):
        self.graph = graph
        self.source = source

    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto, source: str = "<model>") -> "Model":
        opset = _default_opset(proto)
        if opset not in SUPPORTED_OPSETS:
            raise UsageError(
                f"{source}: unsupported opset {opset} (reccc supports ONNX opsets "
                f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})"
            )
        model = cls(gs.import_onnx(_inferred(proto, source)), source)
        model._name_unnamed_nodes()
        return model

    def to_onnx(self) -> onnx.ModelProto:
        """Export as a ModelProto with shapes re-inferred; raises UsageError if the graph is invalid."""
        self.graph.toposort()
        try:
            return _inferred(gs.export_onnx(self.graph), self.source)
        except UsageError as error:  # the input was valid, so a broken graph now is a compiler bug
            raise CompileError(str(error)) from error

    def set_input_shapes(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Give the named graph inputs these shapes, and other inputs the same size for each symbolic dim
        they share by name (in ONNX equal names are equal sizes); then re-infer every shape from them."""
        sizes = {}
        for tensor in self.graph.inputs:
            if tensor.name in shapes:
                sizes.update((dim, size) for dim, size in zip(tensor.shape or (), shapes[tensor.name]) if isinstance(dim, str))
        for tensor in self.graph.inputs:
            if tensor.name in shapes:
                tensor.shape = list(shapes[tensor.name])
            elif tensor.shape is not None:
                tensor.shape = [sizes.get(dim, dim) if isinstance(dim, str) else dim for dim in tensor.shape]
        self.graph = Model.from_onnx(gs.export_onnx(self.graph), self.source).graph

    @property
    def opset(self) -> int:
        return self.graph.opset

    def initializers(self) -> dict[str, gs.Constant]:
        """Every constant tensor of the graph by name (initializers and Constant node values alike)."""
        return {name: t for name, t in self.graph.tensors().items() if isinstance(t, gs.Constant)}

    def parameter_bytes(self) -> int:
        return sum(t.values.nbytes for t in self.initializers().values())

    def nodes(self) -> Iterator[gs.Node]:
        return iter(self.graph.nodes)

    def dataflow(self) -> nx.DiGraph:
        """Tensor-level dataflow: an edge from each input tensor of a node to each of its outputs,
        labelled with the node's name. Graph inputs and initializers are sources."""
        flow = nx.DiGraph()
        flow.add_nodes_from(self.graph.tensors())
        for node in self.graph.nodes:
            for source in node.inputs:
                for target in node.outputs:
                    if source.name and target.name:
                        flow.add_edge(source.name, target.name, node=node.name)
        return flow

    def _name_unnamed_nodes(self) -> None:
        taken = {node.name for node in self.graph.nodes if node.name}
        for index, node in enumerate(self.graph.nodes):
            if node.name:
                continue
            name = f"{node.op}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def tensor_dtype(tensor: gs.Tensor) -> np.dtype | None:
    """The numpy dtype of a graphsurgeon tensor, or None when unknown."""
    return None if tensor.dtype is None else np.dtype(tensor.dtype)


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


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
            if kind != "input":  # graphsurgeon exports an unknown dim as -1; a graph input must not have one
                dims = [dim for dim in dims if dim >= 0]
            declared_bytes(tensor_type.elem_type, dims, f"{source}: {kind} '{value.name}'")


def _inferred(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Shapes and types inferred, in strict mode, with data propagation (Shape->Gather->Concat->Reshape
    chains keep their symbolic batch) where that is safe."""
    _check_static_sizes(proto.graph, source)  # an unknown type would make inference raise a bare ValueError
    inferred = _run_inference(proto, source, data_prop=False)
    _check_static_sizes(inferred.graph, source)
    if _propagates_only_shape_vectors(inferred):
        inferred = _run_inference(proto, source, data_prop=True)
        _check_static_sizes(inferred.graph, source)
    return inferred


# onnx 1.23's data propagation turns each 1-D tensor that an op propagates into a list of dims, about
# 140 bytes an element, so a tiny model can make it allocate terabytes. Shape vectors are short.
SHAPE_VECTOR_MAX_LENGTH = 64


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
    opset = _default_opset(inferred)
    for node in graph.node:
        if any(attribute.HasField("g") or attribute.graphs for attribute in node.attribute):
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


def _run_inference(proto: onnx.ModelProto, source: str, data_prop: bool) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=data_prop)
    # onnx raises a plain ValueError for some invalid models, such as a Cast to an unknown type
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as error:
        raise UsageError(f"{source}: shape inference failed: {one_line(error)}") from error
