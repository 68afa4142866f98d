"""`reccc inspect`: what a model is made of, before compiling it."""

from collections import Counter

from reccc.embeddings import embedding_lookups
from reccc.ir import Model, tensor_dtype


def model_report(model: Model) -> dict:
    tables = {}
    for lookup in embedding_lookups(model):
        entry = tables.setdefault(
            lookup.table,
            {"table": lookup.table, "rows": lookup.rows, "row_shape": list(lookup.row_shape),
             "dtype": str(lookup.dtype), "bytes": lookup.table_bytes, "lookups": []},
        )
        entry["lookups"].append({"node": lookup.node, "ids": lookup.direct_input or lookup.indices})

    def io(tensor) -> dict:
        dtype = tensor_dtype(tensor)
        return {"name": tensor.name, "dtype": None if dtype is None else str(dtype), "shape": list(tensor.shape or [])}

    return {
        "model": model.source,
        "opset": model.opset,
        "nodes": len(model.graph.nodes),
        "ops": dict(sorted(Counter(node.op for node in model.nodes()).items(), key=lambda kv: (-kv[1], kv[0]))),
        "inputs": [io(t) for t in model.graph.inputs],
        "outputs": [io(t) for t in model.graph.outputs],
        "embedding_tables": list(tables.values()),
        "parameter_bytes": model.parameter_bytes(),
        "embedding_bytes": sum(t["bytes"] for t in tables.values()),
    }


def format_report(report: dict) -> str:
    def shape(dims) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"

    lines = [f"{report['model']}: opset {report['opset']}, {report['nodes']} nodes", "", "ops:"]
    lines += [f"  {op:<24}{count:>6}" for op, count in report["ops"].items()]
    for title in ("inputs", "outputs"):
        lines += ["", f"{title}:"]
        lines += [f"  {t['name']:<24}{t['dtype'] or '?':<10}{shape(t['shape'])}" for t in report[title]]
    lines += ["", f"embedding tables: {len(report['embedding_tables'])}"]
    for t in report["embedding_tables"]:
        ids = ", ".join(sorted({lookup["ids"] for lookup in t["lookups"]}))
        lines.append(
            f"  {t['table']:<24}{t['rows']:>10} x {'x'.join(map(str, t['row_shape'])) or '1':<8}"
            f"{t['dtype']:<10}{_bytes(t['bytes']):>12}   ids: {ids}"
        )
    lines += [
        "",
        f"parameter bytes: {_bytes(report['parameter_bytes'])} "
        f"(embedding tables {_bytes(report['embedding_bytes'])}, "
        f"{100 * report['embedding_bytes'] / max(1, report['parameter_bytes']):.1f}%)",
    ]
    return "\n".join(lines)


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size, unit = float(count), "B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            break
    return f"{size:.1f} {unit}"
