"""Finding the lookups of a model: Gathers with run-time ids into data whose size along the
gathered axis is known. Embedding lookups are those into a constant float table along axis 0.

The index guard of a compiled model checks every lookup (TVM's gather reads out of bounds for any
bad id, whatever the data is) and input generation keeps generated ids in range for all of them;
inspection and the embedding passes work on the embedding lookups.
"""

from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model

# Ops that pass ids through unchanged (only their layout changes), so a range on their output is a
# range on their input.
_ID_PRESERVING_OPS = {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"}


@dataclass(frozen=True)
class EmbeddingLookup:
    node: str  # the Gather node
    table: str  # the gathered tensor: an initializer for embedding tables
    axis: int
    rows: int  # the table's size along `axis`: valid ids are -rows .. rows-1
    row_shape: tuple[int, ...]
    dtype: np.dtype
    constant_table: bool  # a constant float table gathered along axis 0
    indices: str  # the tensor of ids the Gather reads
    source_inputs: tuple[str, ...]  # graph inputs the ids are computed from
    direct_input: str | None  # the graph input whose values are the ids, when nothing but layout ops sit between

    @property
    def table_bytes(self) -> int:
        return int(self.rows * np.prod(self.row_shape, dtype=np.int64) * self.dtype.itemsize)


def gather_lookups(model: Model) -> list[EmbeddingLookup]:
    """Every Gather whose ids are computed at run time and whose data has a static size along the axis."""
    graph_inputs = {tensor.name for tensor in model.graph.inputs}
    flow = model.dataflow()
    lookups = []
    for node in model.nodes():
        if node.op != "Gather" or len(node.inputs) != 2 or _is_constant(node.inputs[1]):
            continue
        table, ids = node.inputs
        shape = table.values.shape if isinstance(table, gs.Constant) else table.shape
        if not shape:
            continue
        axis = node.attrs.get("axis", 0) % len(shape)
        if not isinstance(shape[axis], int) or shape[axis] < 0:
            continue
        dtype = np.dtype(table.values.dtype if isinstance(table, gs.Constant) else table.dtype or np.float32)
        lookups.append(
            EmbeddingLookup(
                node=node.name,
                table=table.name,
                axis=axis,
                rows=int(shape[axis]),
                row_shape=tuple(d if isinstance(d, int) else -1 for d in shape[axis + 1 :]),
                dtype=dtype,
                constant_table=isinstance(table, gs.Constant) and axis == 0 and np.issubdtype(dtype, np.floating),
                indices=ids.name,
                source_inputs=tuple(sorted((nx.ancestors(flow, ids.name) | {ids.name}) & graph_inputs)),
                direct_input=_direct_input(ids, graph_inputs),
            )
        )
    return lookups


def embedding_lookups(model: Model) -> list[EmbeddingLookup]:
    """Lookups into constant float tables along axis 0 (initializers, after constant folding also
    tables computed from constants)."""
    return [lookup for lookup in gather_lookups(model) if lookup.constant_table]


def _is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) or (len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant")


def _direct_input(ids: gs.Tensor, graph_inputs: set[str]) -> str | None:
    tensor = ids
    while tensor.name not in graph_inputs:
        if len(tensor.inputs) != 1 or tensor.inputs[0].op not in _ID_PRESERVING_OPS:
            return None
        tensor = tensor.inputs[0].inputs[0]
    return tensor.name
