"""Finding the embedding lookups of a model: Gathers along axis 0 of a constant float table.

Inspection reports them, input generation keeps generated ids in range, and the index guard of a
compiled model checks them.
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
    table: str  # the table's initializer
    rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    indices: str  # the tensor of ids the Gather reads
    source_inputs: tuple[str, ...]  # graph inputs the ids are computed from
    direct_input: str | None  # the graph input whose values are the ids, when nothing but layout ops sit between

    @property
    def table_bytes(self) -> int:
        return int(self.rows * np.prod(self.row_shape, dtype=np.int64) * self.dtype.itemsize)


def embedding_lookups(model: Model) -> list[EmbeddingLookup]:
    graph_inputs = {tensor.name for tensor in model.graph.inputs}
    flow = model.dataflow()
    lookups = []
    for node in model.nodes():
        if not _is_table_gather(node):
            continue
        table, ids = node.inputs[0], node.inputs[1]
        values = table.values
        lookups.append(
            EmbeddingLookup(
                node=node.name,
                table=table.name,
                rows=int(values.shape[0]),
                row_shape=tuple(int(d) for d in values.shape[1:]),
                dtype=values.dtype,
                indices=ids.name,
                source_inputs=tuple(sorted((nx.ancestors(flow, ids.name) | {ids.name}) & graph_inputs)),
                direct_input=_direct_input(ids, graph_inputs),
            )
        )
    return lookups


def _is_table_gather(node: gs.Node) -> bool:
    if node.op != "Gather" or node.attrs.get("axis", 0) != 0 or len(node.inputs) != 2:
        return False
    table = node.inputs[0]
    return isinstance(table, gs.Constant) and table.values.ndim >= 1 and np.issubdtype(table.values.dtype, np.floating)


def _direct_input(ids: gs.Tensor, graph_inputs: set[str]) -> str | None:
    tensor = ids
    while tensor.name not in graph_inputs:
        if len(tensor.inputs) != 1 or tensor.inputs[0].op not in _ID_PRESERVING_OPS:
            return None
        tensor = tensor.inputs[0].inputs[0]
    return tensor.name
