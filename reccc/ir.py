"""reccc's IR: an onnx-graphsurgeon Graph plus what reccc adds to it.

graphsurgeon does import/export, toposort and cleanup; this module adds checked shapes and dtypes
(onnx shape inference in strict mode, made safe for untrusted models by reccc.shape_inference), opset validation, unique node names (errors name nodes),
and a networkx view of the dataflow for analyses.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from reccc.errors import CompileError, UsageError
from reccc.external_data import MappedValues, is_mapped
from reccc.shape_inference import inferred

# Opsets of the default ONNX domain that both TVM's Relax importer and onnxruntime handle.
SUPPORTED_OPSETS = range(13, 24)


class Model:
    """One ONNX model being compiled. Passes mutate `graph` in place."""

    def __init__(self, graph: gs.Graph, source: str = "<model>"):
        self.graph = graph
        self.source = source
        self._mapped: list[MappedValues] = []  # the tensors left in their files (reccc.external_data)

    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto, source: str = "<model>") -> "Model":
        opset = _default_opset(proto)
        if opset not in SUPPORTED_OPSETS:
            raise UsageError(
                f"{source}: unsupported opset {opset} (reccc supports ONNX opsets "
                f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})"
            )
        model = cls(gs.import_onnx(inferred(proto, source)), source)
        for constant in model.initializers().values():
            if isinstance(constant._values, LazyValues) and is_mapped(constant._values.tensor):
                constant._values = MappedValues(constant._values.tensor)
                model._mapped.append(constant._values)
        model._name_nodes_uniquely()
        return model

    def to_onnx(self) -> onnx.ModelProto:
        """Export as a ModelProto with shapes re-inferred; raises UsageError if the graph is invalid."""
        self.graph.toposort()
        return self._checked(self._export())

    def to_onnx_lifting(self, lift: Callable[[gs.Constant], bool]) -> tuple[onnx.ModelProto, list[gs.Constant]]:
        """to_onnx, except that each constant `lift` selects becomes a graph input after the model's own, in
        the order of the constants returned, and its data stays out of the ModelProto (of the constants
        that only nodes of the main graph read). For the targets: TVM's importer copies each initializer
        twice and checks a serialized copy of the model, and export and shape inference copy them too,
        seconds for the tables of a model of hundreds of MB; the target binds the values after import."""
        self.graph.toposort()
        self._restore_mapped()
        graph = self.graph.copy()  # tensors and nodes, not their values
        main_nodes = {id(node) for node in graph.nodes}
        interface = {id(tensor) for tensor in [*graph.inputs, *graph.outputs]}
        lifted = []
        for constant in [tensor for tensor in graph.tensors().values() if isinstance(tensor, gs.Constant)]:
            readers = list(constant.outputs)
            if id(constant) in interface or not readers or not all(id(node) in main_nodes for node in readers) or not lift(constant):
                continue
            variable = gs.Variable(constant.name, constant.dtype, constant.shape)
            for node in readers:
                for index in [index for index, tensor in enumerate(node.inputs) if tensor is constant]:
                    node.inputs[index] = variable
            graph.inputs.append(variable)
            lifted.append(constant)
        return self._checked(gs.export_onnx(graph)), lifted

    def _checked(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        """`proto` with its shapes re-inferred; the input was valid, so an invalid graph now is a compiler bug."""
        try:
            return inferred(proto, self.source)
        except UsageError as error:
            raise CompileError(str(error)) from error

    def _export(self) -> onnx.ModelProto:
        self._restore_mapped()
        return gs.export_onnx(self.graph)

    def _restore_mapped(self) -> None:
        """Each mapped table a reference to its file again, for export: a constant that still holds the
        read-only map of its file is unchanged, so it gets its MappedValues back, which graphsurgeon exports
        as the original TensorProto instead of copying the values into the model (passes that change a
        table make a new array)."""
        by_array = {id(values.loaded): values for values in self._mapped if values.loaded is not None}
        for constant in self.initializers().values():
            if id(constant._values) in by_array:
                constant._values = by_array[id(constant._values)]

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
        reimported = Model.from_onnx(self._export(), self.source)
        self.graph, self._mapped = reimported.graph, reimported._mapped

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

    def _name_nodes_uniquely(self) -> None:
        """Errors name nodes: an unnamed node becomes OP_INDEX, and a name used again NAME_INDEX."""
        taken = {node.name for node in self.graph.nodes if node.name}
        seen = set()
        for index, node in enumerate(self.graph.nodes):
            if node.name and node.name not in seen:
                seen.add(node.name)
                continue
            name = f"{node.name or node.op}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            seen.add(name)


def tensor_dtype(tensor: gs.Tensor) -> np.dtype | None:
    """The numpy dtype of a graphsurgeon tensor, or None when unknown. graphsurgeon keeps the ONNX type
    number of types numpy lacks (bfloat16); onnx maps those to ml_dtypes' numpy types."""
    if tensor.dtype is None:
        return None
    if isinstance(tensor.dtype, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.dtype))
    return np.dtype(tensor.dtype)


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1
