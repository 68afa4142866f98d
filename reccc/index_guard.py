"""Guarding embedding lookups in a compiled model against out-of-range ids.

TVM's gather reads out of bounds for a bad id: wrong values just past the table, SIGSEGV beyond.
Before lowering, every table Gather gets its ids clipped to the table's ONNX range [-rows, rows), so
the compiled code never reads outside the table. With --index-check=error the graph also gets one
flag output per lookup (1 if any id was clipped), and the runtime raises naming the input; with
clamp, clipped ids are what the user asked for.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from reccc.embeddings import embedding_lookups
from reccc.ir import Model
from reccc.manifest import IndexGuard

INDEX_CHECK_MODES = ("error", "clamp")
FLAG_PREFIX = "__reccc_index_out_of_range_"


def guard_embedding_indices(model: Model, mode: str) -> list[IndexGuard]:
    """Insert the guards in place; return the flag outputs the runtime must check (none for clamp)."""
    if mode not in INDEX_CHECK_MODES:
        raise ValueError(f"index check mode must be one of {INDEX_CHECK_MODES}, not {mode!r}")
    graph = model.graph
    nodes = {node.name: node for node in graph.nodes}
    guards = []
    for number, lookup in enumerate(embedding_lookups(model)):
        gather = nodes[lookup.node]
        ids = gather.inputs[1]
        dtype = ids.dtype if ids.dtype is not None else np.int64
        low = gs.Constant(f"{lookup.node}__id_low", np.array(-lookup.rows, dtype=dtype))
        high = gs.Constant(f"{lookup.node}__id_high", np.array(lookup.rows - 1, dtype=dtype))
        safe = gs.Variable(f"{lookup.node}__ids_in_range", dtype=dtype, shape=ids.shape)
        graph.nodes.append(gs.Node("Clip", f"{lookup.node}__clip_ids", inputs=[ids, low, high], outputs=[safe]))
        gather.inputs[1] = safe
        if mode == "clamp":
            continue
        flag = _any_differs(graph, ids, safe, f"{lookup.node}__", f"{FLAG_PREFIX}{number}")
        graph.outputs.append(flag)
        guards.append(
            IndexGuard(
                flag_output=flag.name,
                node=lookup.node,
                table=lookup.table,
                rows=lookup.rows,
                direct_input=lookup.direct_input,
                source_inputs=list(lookup.source_inputs),
            )
        )
    graph.toposort()
    return guards


def _any_differs(graph: gs.Graph, a: gs.Tensor, b: gs.Tensor, prefix: str, output_name: str) -> gs.Variable:
    """A scalar int32 tensor that is 1 if `a` and `b` differ anywhere, else 0 (also 0 for empty tensors)."""
    equal = gs.Variable(f"{prefix}ids_equal", dtype=np.bool_)
    differs = gs.Variable(f"{prefix}ids_differ", dtype=np.bool_)
    as_int = gs.Variable(f"{prefix}ids_differ_i32", dtype=np.int32)
    flag = gs.Variable(output_name, dtype=np.int32, shape=[])
    graph.nodes += [
        gs.Node("Equal", f"{prefix}equal", inputs=[a, b], outputs=[equal]),
        gs.Node("Not", f"{prefix}differs", inputs=[equal], outputs=[differs]),
        gs.Node("Cast", f"{prefix}cast", attrs={"to": onnx.TensorProto.INT32}, inputs=[differs], outputs=[as_int]),
        gs.Node("ReduceMax", f"{prefix}any", attrs={"keepdims": 0}, inputs=[as_int], outputs=[flag]),
    ]
    return flag
