"""embedding-quantization (lossy): store large embedding tables as row-wise int8 / int4 or fp16.

A table qualifies when it is an embedding table (a float constant [rows, dim]) whose every reader is
a Gather along axis 0 with run-time ids, and it is not a graph output. It is quantized when it holds
at least `min_bytes` (small tables are not worth the accuracy), or when `tables` names it; `tables`
also keeps a named table fp32 ("none") or gives it its own format. A format that would not make a
table smaller (rows so narrow that the per-row scale and bias outweigh the codes: dim 1 or 2 for
int8, dim 1 for int4) leaves it fp32, and is a usage error when `tables` asks for it by name.

"auto" (-O3's default) picks per table the format whose lookup reads the fewest cache lines, int8 or
fp16, int8 on a tie (fewer bytes). A lookup is bound by the lines it misses, not by its bytes:
int8's scale and bias are a second line beside the codes, so rows of up to 32 values, which fp16
fits in one line, read faster as fp16 (DeepFM's 16-value rows at batch 2048: 0.27-0.29 ms fp16,
0.38-0.41 int8, 0.29-0.31 fp32), and from 64 values int8 reads no more lines than fp16.

The formats and the ops that read them back are in reccc.passes.embedding_formats; every lookup
still yields float32 rows of the same shape, so the rest of the graph is untouched.

details() reports each table's bytes before and after, and the largest error the format introduced
in any value of it (the accuracy guard then measures the effect on the outputs).
"""

from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from reccc.errors import UsageError
from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.embedding_formats import FORMATS, cache_lines_per_lookup, decode, emit_lookup, encode, unsupported_reason
from reccc.passes.patterns import consumers, is_constant, is_graph_output, new_constant, remove_node

DEFAULT_MIN_BYTES = 1 << 20
KEEP = "none"
AUTO = "auto"
AUTO_FORMATS = ("int8", "fp16")  # in order of preference on a tie


@register_pass
class EmbeddingQuantization(Pass):
    name = "embedding-quantization"
    summary = ("store embedding tables >= min_bytes as row-wise int8/int4 (scale and bias per row) or fp16, or auto: "
               "int8 or fp16, whichever a lookup reads fewer cache lines of; lookups dequantize")
    lossless = False

    def __init__(self, format: str = "int8", min_bytes: int = DEFAULT_MIN_BYTES, tables: Mapping[str, str] | None = None):
        if format not in (*FORMATS, AUTO):
            raise ValueError(f"format must be one of {', '.join((*FORMATS, AUTO))}, not {format!r}")
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"min_bytes must be a non-negative integer, not {min_bytes!r}")
        tables = dict(tables or {})
        for table, choice in tables.items():
            if choice not in (*FORMATS, AUTO, KEEP):
                raise ValueError(f"table '{table}': format must be one of {', '.join((*FORMATS, AUTO, KEEP))}, not {choice!r}")
        self.format, self.min_bytes, self.tables = format, min_bytes, tables

    def call(self, model: Model) -> bool:
        graph = model.graph
        tables = _embedding_tables(graph)
        unknown = sorted(set(self.tables) - {table.name for table, _ in tables})
        if unknown:
            names = ", ".join(table.name for table, _ in tables) or "none"
            raise UsageError(f"{self.name}: no embedding table named '{unknown[0]}' (the model's embedding tables: {names})")
        changed = False
        for table, gathers in tables:
            choice = self.tables.get(table.name) or (self.format if table.values.nbytes >= self.min_bytes else KEEP)
            size = f"{table.values.shape[0]}x{table.values.shape[1]}"
            if choice == KEEP:
                self.note(f"table '{table.name}' {size}: kept fp32 ({table.values.nbytes} bytes)")
                continue
            if choice == AUTO:
                choice, why, reason = _fewest_lines_format(table.values)
            else:
                why, reason = "", unsupported_reason(table.values, choice)
            if reason is not None:
                self.note(f"table '{table.name}' {size}: kept fp32: cannot store it as {choice}: {reason}")
                continue
            encoded = encode(table.values, choice)
            if encoded.nbytes >= table.values.nbytes:
                # Narrow rows: a row's scale and bias outweigh what its codes save (a dim-1 table
                # would take 9 bytes a row as int8 instead of 4), and the lookup reads more.
                grows = f"{choice} would store it in {encoded.nbytes} bytes, not fewer than its {table.values.nbytes}"
                if table.name in self.tables:
                    raise UsageError(f"{self.name}: table '{table.name}' {size}: {grows}; choose another format for it")
                self.note(f"table '{table.name}' {size}: kept fp32: {grows}")
                continue
            worst = float(np.abs(decode(encoded) - table.values).max())
            stored = {role: new_constant(graph, f"{table.name}.{role}", array) for role, array in encoded.arrays.items()}
            for gather in gathers:
                ids, output, name = gather.inputs[1], gather.outputs[0], gather.name
                remove_node(graph, gather)
                emit_lookup(graph, encoded, stored, ids, output, name)
            self.note(
                f"table '{table.name}' {size}: {choice}{why}, {table.values.nbytes} -> {encoded.nbytes} bytes "
                f"({encoded.nbytes / table.values.nbytes:.3f}x), max value error {worst:.3g}"
            )
            changed = True
        if changed:
            graph.cleanup()
            graph.toposort()
        return changed


def _fewest_lines_format(table: np.ndarray) -> tuple[str, str, str | None]:
    """The AUTO_FORMATS format whose lookup reads the fewest cache lines (the first on a tie) among
    those that can store `table`, a note of the comparison, and why that format cannot store it (None
    but where neither can). Each format's check scans the whole table once."""
    reasons = {format: unsupported_reason(table, format) for format in AUTO_FORMATS}
    lines = {format: cache_lines_per_lookup(table, format) for format in AUTO_FORMATS if reasons[format] is None}
    if not lines:  # neither can store it: int8's reason says why
        return AUTO_FORMATS[0], "", reasons[AUTO_FORMATS[0]]
    best = min(lines, key=lines.get)
    best_first = sorted(lines, key=lambda format: format != best)
    compared = ", ".join(f"{lines[format]:.3g} cache line{'' if lines[format] == 1 else 's'} as {format}" for format in best_first)
    return best, f" (auto: a lookup reads {compared})", None


def _embedding_tables(graph: gs.Graph) -> list[tuple[gs.Constant, list[gs.Node]]]:
    """Float constant tables [rows, dim] read only by Gathers along axis 0 with run-time ids, in graph order."""
    found: dict[int, tuple[gs.Constant, list[gs.Node]]] = {}
    for node in graph.nodes:
        if node.op != "Gather" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 2:
            continue
        table = node.inputs[0]
        if isinstance(table, gs.Constant) and table.values.ndim == 2 and np.issubdtype(table.values.dtype, np.floating):
            found.setdefault(id(table), (table, []))[1].append(node)
    tables = []
    for table, gathers in found.values():
        readers = consumers(table)
        if is_graph_output(graph, table) or len(readers) != len(gathers):
            continue
        if all(g.attrs.get("axis", 0) in (0, -2) and g.inputs[1] is not table and not is_constant(g.inputs[1]) for g in gathers):
            tables.append((table, gathers))
    return tables
