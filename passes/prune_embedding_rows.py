"""prune-unreadable-embedding-rows: a table read only at constant ids keeps only the rows it reads.

An embedding table (as reccc.embeddings defines one: a float constant gathered along axis 0) all of
whose readers are such Gathers with constant ids (an initializer or a Constant node), and which is
not a graph output, becomes the rows those ids name, in increasing order, and each Gather's ids are
remapped into it (same dtype and shape; negative ids, which count from the end, are resolved first).
Every Gather reads the same values as before, so this is exact. A table with any Gather by computed
ids (user ids) or any other reader is left alone, as is one whose constant ids fall outside
[-rows, rows) (onnxruntime rejects those). A table nobody reads is not this pass's: graphsurgeon does
not keep unread initializers, and dead-code-elimination drops a table whose readers are all dead.

The index guard of a compiled model clips the ids of every Gather with run-time ids to the rows of
what it reads: that is what keeps *user* ids, which can be anything, inside a table. The ids pruned
here are constants of the model, not user input; after remapping they are initializers inside the new
table's rows, so no guard is needed and none can fire (the guard skips constant ids).

Constant-folding computes a constant-id Gather ahead of time when it runs, leaving no Gather; this
pass matters in pipelines without it, and before it (a smaller table to fold).
"""

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.dense_layers import ConstantReplacer
from reccc.passes.patterns import constant_value, consumers, is_graph_output


def _table_gather(node: gs.Node) -> bool:
    """A Gather along axis 0 of a float constant (reccc.embeddings' embedding table), reading it once."""
    if node.op != "Gather" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 2:
        return False
    table = node.inputs[0]
    if not isinstance(table, gs.Constant) or table.values.ndim < 1 or not np.issubdtype(table.values.dtype, np.floating):
        return False
    return node.attrs.get("axis", 0) % table.values.ndim == 0 and node.inputs[1] is not table


@register_pass
class PruneUnreadableEmbeddingRows(Pass):
    name = "prune-unreadable-embedding-rows"
    summary = "an embedding table read only by lookups with constant ids keeps just the rows they read (ids remapped)"

    def call(self, model: Model) -> bool:
        graph = model.graph
        tables: dict[int, list[gs.Node]] = {}
        for node in graph.nodes:
            if _table_gather(node):
                tables.setdefault(id(node.inputs[0]), []).append(node)
        constants = ConstantReplacer(graph)
        changed = False
        for gathers in tables.values():
            table = gathers[0].inputs[0]
            values = table.values
            rows = int(values.shape[0])
            if is_graph_output(graph, table) or {id(n) for n in consumers(table)} != {id(g) for g in gathers}:
                continue
            ids = [constant_value(gather.inputs[1]) for gather in gathers]
            if any(i is None or not np.issubdtype(i.dtype, np.integer) or i.size and not (-rows <= i.min() and i.max() < rows) for i in ids):
                continue
            resolved = [np.where(i < 0, i + rows, i) for i in ids]
            read = np.unique(np.concatenate([r.reshape(-1) for r in resolved]))
            if read.size == 0:
                read = np.array([0])
            if read.size == rows:
                continue
            constants.replace(table, values[read])
            for gather, original, absolute in zip(gathers, ids, resolved):
                constants.set(gather, 1, np.searchsorted(read, absolute).astype(original.dtype).reshape(original.shape))
            freed = (rows - read.size) * values[0].nbytes
            changed = True
            self.note(f"table '{table.name}': {rows} -> {read.size} rows ({len(gathers)} lookups with constant ids; {freed} bytes freed)")
        constants.finish()
        return changed
