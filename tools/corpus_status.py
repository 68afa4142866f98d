"""Measure the exported-model corpus and write what was found: testsuite/corpus/status.json (which the
tests read for the cases that do not work yet) and the README's corpus table.

    .venv/bin/python tools/corpus_status.py [--only SUBSTRING] [--jobs N]

Each exported model is compiled at the levels testsuite/test_corpus.py tests, with the same options,
run at the batches onnxruntime ran it at, and compared with the stored outputs. A model+level that
compiles and matches is "matches"; otherwise the entry is the reason, in one line.
"""

import argparse
import json
import re
import sys
import tempfile
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "testsuite"))

import test_corpus as corpus  # noqa: E402  (the tests' own definitions of levels, options and tolerance)

README = REPO / "README.md"
TABLE_START, TABLE_END = "<!-- corpus-table -->", "<!-- /corpus-table -->"
EXPORTERS = ("dynamo", "torchscript")


def measure(record: dict, level: int) -> str:
    import reccc

    with tempfile.TemporaryDirectory(prefix="reccc-corpus-") as scratch:
        options = corpus.compile_options(level)
        if level == 3:
            options["tune_db"] = str(Path(scratch) / "tune-db")
        artifact = Path(scratch) / "model.so"
        try:
            reccc.compile(corpus.CORPUS / record["onnx"], artifact, **options)
        except Exception as error:  # noqa: BLE001 - the reason is what this tool records
            return _one_line(f"does not compile: {error}")
        model = reccc.load(artifact)
        for batch, (inputs, expected) in corpus.references(record).items():
            try:
                actual = model.run(inputs)
            except Exception as error:  # noqa: BLE001
                return _one_line(f"fails at batch {batch}: {error}")
            for name, value in expected.items():
                if actual[name].shape != value.shape:
                    return f"output '{name}' has shape {list(actual[name].shape)} at batch {batch}, not {list(value.shape)}"
                error = corpus.deviation(value, actual[name])
                if error > corpus.TOLERANCE:
                    return f"output '{name}' deviates {error:.2g} at batch {batch}"
    return "matches"


def _one_line(text: str) -> str:
    text = re.sub(r"\s+", " ", text.replace(f"{corpus.CORPUS}/", "")).strip()
    return text if len(text) <= 200 else text[:197] + "..."


def _measure_entry(args: tuple[dict, int]) -> tuple[str, int, str]:
    record, level = args
    return record["onnx"], level, measure(record, level)


def table(status: dict) -> str:
    """The README table: one row per model, a column per exporter."""
    rows = {}
    for record in corpus.INDEX["models"]:
        rows.setdefault((record["library"], record["model"]), {})[record["exporter"]] = _cell(record, status)
    lines = [f"| library | model | {' | '.join(EXPORTERS)} |", f"| --- | --- |{' --- |' * len(EXPORTERS)}"]
    for (library, model), cells in sorted(rows.items()):
        lines.append(f"| {library} | {model} | {' | '.join(cells.get(e, '') for e in EXPORTERS)} |")
    return "\n".join(lines)


def _cell(record: dict, status: dict) -> str:
    if record["onnx"] is None:
        return f"not exported: {_escape(record['export_error'])}"
    levels = status["models"].get(record["onnx"], {})
    good = [f"-O{level}" for level in corpus.LEVELS if levels.get(f"O{level}") == "matches"]
    bad = {reason for key, reason in levels.items() if reason != "matches"}
    parts = []
    if good:
        batches = ", ".join(map(str, record["batches"]))
        parts.append(f"matches at {', '.join(good)} (batch {batches})")
    parts += [_escape(reason) for reason in sorted(bad)]
    if record.get("onnxruntime_errors"):
        failing = ", ".join(record["onnxruntime_errors"])
        parts.append(f"onnxruntime itself fails at batch {failing}")
    return "; ".join(parts)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def write_readme_table(status: dict) -> None:
    text = README.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    README.write_text(text[:start] + "\n" + table(status) + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="measure only models whose path contains this; keep the others' status")
    parser.add_argument("--jobs", type=int, default=2, help="compile this many models at once (default: 2)")
    args = parser.parse_args()
    path = corpus.CORPUS / "status.json"
    status = json.loads(path.read_text()) if path.exists() else {"models": {}}
    status["models"] = {k: v for k, v in status["models"].items() if k in {r["onnx"] for r in corpus.EXPORTED}}
    work = [(record, level) for record in corpus.EXPORTED if args.only in record["onnx"] for level in corpus.LEVELS]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for onnx, level, result in pool.map(_measure_entry, work):
            print(f"{onnx} -O{level}: {result}", flush=True)
            status["models"].setdefault(onnx, {})[f"O{level}"] = result
    status["models"] = dict(sorted(status["models"].items()))
    path.write_text(json.dumps(status, indent=1) + "\n")
    write_readme_table(status)


if __name__ == "__main__":
    main()
