"""The exported-model corpus (testsuite/corpus, made by tools/export_corpus.py): every model that the
recommender libraries exported compiles at -O0, -O2 and -O3 with the batch symbolic, runs at every
batch onnxruntime ran it at (1, 7, 64), and matches onnxruntime's stored outputs within
1e-4 × max(1, max|output|).

testsuite/corpus/status.json (written by tools/corpus_status.py, which also writes the README's
table) records each model and level that does not yet compile or match, with the reason; those
cases are strict xfails, so fixing one fails its test until the status is regenerated.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import reccc

CORPUS = Path(__file__).resolve().parent / "corpus"
INDEX = json.loads((CORPUS / "index.json").read_text())
STATUS = json.loads((CORPUS / "status.json").read_text())
LEVELS = (0, 2, 3)
TOLERANCE = 1e-4
# -O3 with the smallest tuning budget: no new measurements, the database's records only (a fresh one
# per session, so a developer's database changes nothing here); without -O3's default embedding
# quantization, which is lossy by design (its own tests hold it to its budget), so -O3 is held to the
# same tolerance as the other levels.
O3_OPTIONS = {"tune_trials": 0, "embedding_quant": "none"}

EXPORTED = [record for record in INDEX["models"] if record["onnx"]]
# Exports that onnxruntime itself runs at no batch but the traced one: their dynamic batch is not.
BAKED = [record for record in EXPORTED if not record["batches"]]


def compile_options(level: int) -> dict:
    return {"opt_level": level, **(O3_OPTIONS if level == 3 else {})}


def references(record: dict) -> dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per batch: the inputs and onnxruntime's outputs the export tool stored."""
    arrays = np.load(CORPUS / record["reference"])
    result = {}
    for batch in record["batches"]:
        inputs = {key.split("/", 2)[2]: arrays[key] for key in arrays.files if key.startswith(f"b{batch}/input/")}
        outputs = {key.split("/", 2)[2]: arrays[key] for key in arrays.files if key.startswith(f"b{batch}/output/")}
        result[batch] = (inputs, outputs)
    return result


def deviation(expected: np.ndarray, actual: np.ndarray) -> float:
    """Max abs difference relative to max(1, max|expected|)."""
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    return float(np.max(np.abs(actual.astype(np.float64) - expected))) / scale if expected.size else 0.0


@pytest.fixture(scope="session")
def corpus_artifact(tmp_path_factory):
    """Compiled corpus models by (onnx path, level), once per test session (per worker)."""
    cache: dict[tuple[str, int], Path] = {}
    tune_db = tmp_path_factory.mktemp("tune-db")

    def get(onnx: str, level: int) -> Path:
        if (onnx, level) not in cache:
            path = tmp_path_factory.mktemp("corpus") / f"{Path(onnx).stem}.O{level}.so"
            options = compile_options(level)
            if level == 3:
                options["tune_db"] = str(tune_db)
            reccc.compile(CORPUS / onnx, path, **options)
            cache[(onnx, level)] = path
        return cache[(onnx, level)]

    return get


def _cases():
    for record in EXPORTED:
        if record in BAKED:
            continue
        for level in LEVELS:
            known = STATUS["models"].get(record["onnx"], {}).get(f"O{level}")
            marks = [pytest.mark.xfail(strict=True, reason=known)] if known and known != "matches" else []
            yield pytest.param(record, level, id=f"{record['onnx'][:-5]}-O{level}", marks=marks)


@pytest.mark.parametrize("record, level", _cases())
def test_corpus_model_compiles_and_matches_onnxruntime(corpus_artifact, record, level):
    model = reccc.load(corpus_artifact(record["onnx"], level))
    for batch, (inputs, expected) in references(record).items():
        actual = model.run(inputs)
        assert list(actual) == list(expected)
        for name, value in expected.items():
            assert actual[name].shape == value.shape, f"output '{name}' at batch {batch}"
            error = deviation(value, actual[name])
            assert error <= TOLERANCE, f"output '{name}' at batch {batch}: deviation {error:.3g} > {TOLERANCE}"


def test_index_accounts_for_every_model_and_exporter():
    """Each model is there once per exporter, exported (with references) or with the reason it is not."""
    seen = {(r["library"], r["model"], r["exporter"]) for r in INDEX["models"]}
    assert len(seen) == len(INDEX["models"])
    for library, model in {(r["library"], r["model"]) for r in INDEX["models"]}:
        assert {e for lib, m, e in seen if (lib, m) == (library, model)} == {"dynamo", "torchscript"}
    for record in INDEX["models"]:
        if record["onnx"] is None:
            assert record["export_error"]
            continue
        path = CORPUS / record["onnx"]
        assert path.stat().st_size < 2 * 1024 * 1024
        missing = [b for b in INDEX["batches"] if b not in record["batches"]]
        assert all(str(b) in record.get("onnxruntime_errors", {}) for b in missing), record["onnx"]


@pytest.mark.parametrize("record", BAKED, ids=[r["onnx"][:-5] for r in BAKED])
def test_export_with_a_baked_batch_is_a_usage_error_naming_the_real_size(reccc_cli, tmp_path, record):
    """TorchScript's torchrec exports split the ids into sizes of the traced batch (4): reccc says so."""
    result = reccc_cli(CORPUS / record["onnx"], "-O0", "-o", tmp_path / "model.so")
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert "dim 'batch' is declared symbolic but is really 4" in result.stderr
    assert "--input-shape" in result.stderr and not (tmp_path / "model.so").exists()
