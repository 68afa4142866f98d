"""remove-id-casts: a Cast of ids read only as Gather indices goes; Gather takes int32 and int64 indices.

    Gather(table, Cast(ids: int32, to=int64))   ->  Gather(table, ids)

The Cast must keep every value: int32 to int64, or to the dtype it already has. A Cast that can change
values stays (int64 to int32 of ids that may exceed int32, float to int), as does one whose result any
node reads other than as Gather indices, or that is a graph output.
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import attr, bypass, consumers, dtype_of, fixpoint, is_graph_output, onnx_to_numpy_dtype

INT32, INT64 = np.dtype(np.int32), np.dtype(np.int64)
# (from, to) casts that keep every value of an index
VALUE_PRESERVING = {(INT32, INT64), (INT32, INT32), (INT64, INT64)}


def read_only_as_indices(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    if is_graph_output(graph, tensor) or not tensor.outputs:
        return False
    return all(
        node.op == "Gather" and all(index == 1 for index, each in enumerate(node.inputs) if each is tensor)
        for node in consumers(tensor)
    )


@register_pass
class RemoveIdCasts(Pass):
    name = "remove-id-casts"
    summary = "a value-preserving Cast (int32->int64) of ids read only as Gather indices is removed"

    def call(self, model: Model) -> bool:
        graph = model.graph

        def sweep() -> bool:
            changed = False
            for cast in list(graph.nodes):
                if cast.op != "Cast" or not cast.outputs or not cast.inputs:
                    continue
                conversion = (dtype_of(cast.inputs[0]), onnx_to_numpy_dtype(attr(cast, "to")))
                if conversion in VALUE_PRESERVING and read_only_as_indices(graph, cast.outputs[0]):
                    changed |= bypass(graph, cast)
            return changed

        return fixpoint(sweep)
