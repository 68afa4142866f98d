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
    guards: list[IndexGuard] = []
    checked: list[gs.Tensor] = []  # the ids of each guard
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
        checked.append(ids)
        guards.append(
            IndexGuard(
                node=lookup.node,
                table=lookup.table,
                rows=lookup.rows,
                direct_input=lookup.direct_input,
                source_inputs=list(lookup.source_inputs),
            )
        )
    if guards:
        guards = _add_flags_output(graph, guards, checked)
    graph.toposort()
    return guards


def _add_flags_output(graph: gs.Graph, guards: list[IndexGuard], checked: list[gs.Tensor]) -> list[IndexGuard]:
    """Add the output FLAGS_OUTPUT; returns the guards in the order of its entries. The flags count the
    ids outside each table's range, read from the ids themselves, not compared with their clip: the
    clip's one reader is then its lookup, which fusion puts it in, and the checks of ids of the same
    shape and dtype (DLRM's one id column per table) are one stack, comparison and reduction: at batch
    1 every kernel call costs more than the lookups. The CPU targets replace each such group by one
    kernel of their own, recognizing the graph written here (reccc/targets/index_flags.py). One output
    for all of them: each output costs the runtime a tensor conversion per call."""
    groups: dict[tuple, list[int]] = {}
    for index, ids in enumerate(checked):
        shape = tuple(ids.shape) if ids.shape is not None else None
        known = shape is not None and ids.dtype is not None and all(isinstance(d, (int, str)) and d != -1 for d in shape)
        groups.setdefault((shape, np.dtype(ids.dtype).str) if known else ("unknown", index), []).append(index)
    flags, ordered = [], []
    for number, members in enumerate(groups.values()):
        prefix = f"__reccc_index_group{number}_"
        dtype = checked[members[0]].dtype or np.int64
        rows = [_as_row(graph, checked[i], f"{guards[i].node}__") for i in members]
        stacked = rows[0]
        if len(rows) > 1:
            stacked = gs.Variable(f"{prefix}ids", dtype=dtype)
            graph.nodes.append(gs.Node("Concat", f"{prefix}stack", attrs={"axis": 0}, inputs=rows, outputs=[stacked]))
        low = gs.Constant(f"{prefix}low", np.array([[-guards[i].rows] for i in members], dtype=dtype))
        high = gs.Constant(f"{prefix}high", np.array([[guards[i].rows] for i in members], dtype=dtype))
        below, above, outside, counted, padded = (
            gs.Variable(f"{prefix}{name}", dtype=np.bool_ if name in ("below", "above", "outside") else np.int32)
            for name in ("below", "above", "outside", "counted", "padded")
        )
        # A zero column, so that the reduction never runs over an empty axis: TVM's reduction kernels
        # leave the output unwritten then (their init sits inside the reduced loop), and an empty
        # batch would read as out-of-range ids. The count fits int32 for any number of ids.
        zeros = gs.Constant(f"{prefix}zeros", np.zeros((len(members), 1), np.int32))
        group_flags = gs.Variable(f"{prefix}flags", dtype=np.int32, shape=[len(members)])
        graph.nodes += [
            gs.Node("Less", f"{prefix}below", inputs=[stacked, low], outputs=[below]),
            gs.Node("GreaterOrEqual", f"{prefix}above", inputs=[stacked, high], outputs=[above]),
            gs.Node("Or", f"{prefix}outside", inputs=[below, above], outputs=[outside]),
            gs.Node("Cast", f"{prefix}count", attrs={"to": onnx.TensorProto.INT32}, inputs=[outside], outputs=[counted]),
            gs.Node("Concat", f"{prefix}pad", attrs={"axis": 1}, inputs=[counted, zeros], outputs=[padded]),
            gs.Node("ReduceSum", f"{prefix}sum", attrs={"keepdims": 0},
                    inputs=[padded, gs.Constant(f"{prefix}axes", np.array([1], np.int64))], outputs=[group_flags]),
        ]
        flags.append(group_flags)
        ordered += [guards[i] for i in members]
    vector = gs.Variable(FLAGS_OUTPUT, dtype=np.int32, shape=[len(guards)])
    if len(flags) == 1:
        graph.nodes.append(gs.Node("Identity", "__reccc_index_flags", inputs=flags, outputs=[vector]))
    else:
        graph.nodes.append(gs.Node("Concat", "__reccc_index_flags", attrs={"axis": 0}, inputs=flags, outputs=[vector]))
    graph.outputs.append(vector)
    return ordered


def _as_row(graph: gs.Graph, ids: gs.Tensor, prefix: str) -> gs.Variable:
    """`ids` flattened to a [1, size] row."""
    row = gs.Variable(f"{prefix}ids_row", dtype=ids.dtype)
    shape = gs.Constant(f"{prefix}row_shape", np.array([1, -1], np.int64))
    graph.nodes.append(gs.Node("Reshape", f"{prefix}as_row", inputs=[ids, shape], outputs=[row]))
    return row
