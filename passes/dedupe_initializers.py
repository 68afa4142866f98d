"""dedupe-initializers: constants with equal dtype, shape and bytes become one tensor.

Initializers and Constant-node values alike (bit equality: 0.0 and -0.0 differ, equal NaN payloads
match). The first initializer of a group in graph order (or, when the group has none, the first
Constant node's output) is kept and every reader of the others reads it instead; Constant nodes left
unread are removed, unread initializers drop out of the graph. Constants that are graph inputs or
outputs, or are read inside a subgraph, keep their identity. Exact: every reader reads the same values.
"""

import collections
import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.patterns import constant_value, remove_if_unused, replace_all_uses


_SAMPLED_ELEMENTS = 64


def _sampled(values: np.ndarray) -> tuple:
    """The dtype, shape and the bytes of up to _SAMPLED_ELEMENTS evenly spaced elements: equal for equal constants."""
    flat = values.reshape(-1)
    return values.dtype.str, values.shape, flat[:: max(1, flat.size // _SAMPLED_ELEMENTS)].tobytes()


def _subgraph_names(graph: gs.Graph) -> set[str]:
    """Names read by nodes of the subgraphs (If/Loop/Scan bodies) of `graph`, recursively."""
    names = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    names |= {t.name for n in sub.nodes for t in n.inputs} | _subgraph_names(sub)
    return names


@register_pass
class DedupeInitializers(Pass):
    name = "dedupe-initializers"
    summary = "constants (initializers, Constant nodes) with equal dtype, shape and bytes become one tensor that every reader reads"

    def call(self, model: Model) -> bool:
        graph = model.graph
        protected = {t.name for t in [*graph.inputs, *graph.outputs]} | _subgraph_names(graph)
        groups: dict[tuple, list[tuple[gs.Tensor, np.ndarray]]] = {}
        seen = set()
        constants: list[tuple[gs.Tensor, np.ndarray]] = []
        for node in graph.nodes:
            candidates = list(node.inputs) + (list(node.outputs) if node.op == "Constant" else [])
            for tensor in candidates:
                if id(tensor) in seen or tensor.name in protected:
                    continue
                seen.add(id(tensor))
                values = constant_value(tensor)
                if values is not None and values.dtype.kind not in "OSUV":
                    constants.append((tensor, values))
        # Only constants of the same dtype and shape can be equal: a table of its own shape (the usual
        # embedding table, memory-mapped from its file) is never read. Of those, only constants whose
        # sampled elements match too are read whole (hashing a 26-table DLRM's 166 MB of equal-shaped
        # tables took 0.24 s).
        shapes = collections.Counter((values.dtype.str, values.shape) for _, values in constants)
        constants = [(tensor, values) for tensor, values in constants if shapes[values.dtype.str, values.shape] > 1]
        sampled = [_sampled(values) for _, values in constants]
        samples = collections.Counter(sampled)
        for (tensor, values), sample in zip(constants, sampled):
            if samples[sample] < 2:
                continue
            data = _bytes_view(values)
            key = (values.dtype.str, values.shape, hashlib.blake2b(data, digest_size=16).digest())
            bucket = groups.setdefault(key, [])
            if bucket and not _same_bytes(_bytes_view(bucket[0][1]), data):
                continue  # a digest collision: leave it alone
            bucket.append((tensor, values))
        merged, saved, kept = 0, 0, 0
        for bucket in groups.values():
            if len(bucket) < 2:
                continue
            keeper = next((t for t, _ in bucket if isinstance(t, gs.Constant)), bucket[0][0])
            kept += 1
            for tensor, values in bucket:
                if tensor is keeper:
                    continue
                replace_all_uses(graph, tensor, keeper)
                if not isinstance(tensor, gs.Constant):
                    remove_if_unused(graph, tensor.inputs[0])
                merged += 1
                saved += values.nbytes
        if merged:
            self.note(f"merged {merged} duplicate constants into {kept} ({saved} bytes)")
        if merged:
            graph.toposort()
        return bool(merged)


def _bytes_view(values: np.ndarray) -> memoryview:
    """The array's bytes without copying them (a copy only of a non-contiguous array)."""
    return memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))


def _same_bytes(first: memoryview, second: memoryview, chunk: int = 1 << 24) -> bool:
    """Bit equality, compared a chunk at a time so that no copy of a whole table is made."""
    return len(first) == len(second) and all(
        first[start : start + chunk].tobytes() == second[start : start + chunk].tobytes() for start in range(0, len(first), chunk)
    )
