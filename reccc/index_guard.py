"""Guarding embedding lookups in a compiled model against out-of-range ids.

TVM's gather reads out of bounds for a bad id: wrong values just past the table, SIGSEGV beyond.
Before lowering, every table Gather gets its ids clipped to the table's ONNX range [-rows, rows), so
the compiled code never reads outside the table. Lookups of the same ids into tables of the same
rows (a quantized table's codes and its scales, DeepFM's tables per field) share one guard. With --index-check=error the graph also gets an
output flagging the lookups that clipped an id, and the runtime raises naming the input; with clamp,
clipped ids are what the user asked for.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from reccc.embeddings import gather_lookups
from reccc.ir import Model
from reccc.manifest import IndexGuard

INDEX_CHECK_MODES = ("error", "clamp")
FLAGS_OUTPUT = "__reccc_index_out_of_range"


def guard_embedding_indices(model: Model, mode: str) -> list[IndexGuard]:
    """Insert the guards in place. With mode "error", the graph gains the output FLAGS_OUTPUT, an int32
    vector with one entry per returned guard, positive where that lookup clipped an id."""
    if mode not in INDEX_CHECK_MODES:
        raise ValueError(f"index check mode must be one of {INDEX_CHECK_MODES}, not {mode!r}")
    graph = model.graph
    nodes = {node.name: node for node in graph.nodes}
    guards, flags = [], []
    clipped: dict[tuple[str, int], gs.Variable] = {}  # (ids, rows) -> ids in range: lookups sharing them share a guard
    for lookup in gather_lookups(model):
        gather = nodes[lookup.node]
        ids = gather.inputs[1]
        if (ids.name, lookup.rows) in clipped:
            gather.inputs[1] = clipped[ids.name, lookup.rows]
            continue
        dtype = ids.dtype if ids.dtype is not None else np.int64
        low = gs.Constant(f"{lookup.node}__id_low", np.array(-lookup.rows, dtype=dtype))
        high = gs.Constant(f"{lookup.node}__id_high", np.array(lookup.rows - 1, dtype=dtype))
        safe = gs.Variable(f"{lookup.node}__ids_in_range", dtype=dtype, shape=ids.shape)
        graph.nodes.append(gs.Node("Clip", f"{lookup.node}__clip_ids", inputs=[ids, low, high], outputs=[safe]))
        gather.inputs[1] = safe
        clipped[ids.name, lookup.rows] = safe
        if mode == "clamp":
            continue
        flags.append(_any_differs(graph, ids, safe, f"{lookup.node}__"))
        guards.append(
            IndexGuard(
                node=lookup.node,
                table=lookup.table,
                rows=lookup.rows,
                direct_input=lookup.direct_input,
                source_inputs=list(lookup.source_inputs),
            )
        )
    if flags:
        # One output for all lookups: each output costs the runtime a tensor conversion per call.
        vector = gs.Variable(FLAGS_OUTPUT, dtype=np.int32, shape=[len(flags)])
        graph.nodes.append(gs.Node("Concat", "__reccc_index_flags", attrs={"axis": 0}, inputs=flags, outputs=[vector]))
        graph.outputs.append(vector)
    graph.toposort()
    return guards


def _any_differs(graph: gs.Graph, a: gs.Tensor, b: gs.Tensor, prefix: str) -> gs.Variable:
    """A [1] int32 tensor that is 1 if `a` and `b` differ anywhere, else 0 (a negative number for empty tensors)."""
    equal = gs.Variable(f"{prefix}ids_equal", dtype=np.bool_)
    differs = gs.Variable(f"{prefix}ids_differ", dtype=np.bool_)
    as_int = gs.Variable(f"{prefix}ids_differ_i32", dtype=np.int32)
    flat = gs.Variable(f"{prefix}ids_differ_flat", dtype=np.int32)
    flag = gs.Variable(f"{prefix}ids_out_of_range", dtype=np.int32, shape=[1])
    graph.nodes += [
        gs.Node("Equal", f"{prefix}equal", inputs=[a, b], outputs=[equal]),
        gs.Node("Not", f"{prefix}differs", inputs=[equal], outputs=[differs]),
        gs.Node("Cast", f"{prefix}cast", attrs={"to": onnx.TensorProto.INT32}, inputs=[differs], outputs=[as_int]),
        gs.Node("Reshape", f"{prefix}flatten", inputs=[as_int, gs.Constant(f"{prefix}flat_shape", np.array([-1], np.int64))], outputs=[flat]),
        gs.Node("ReduceMax", f"{prefix}any", attrs={"keepdims": 1}, inputs=[flat], outputs=[flag]),
    ]
    return flag
