"""Regenerate testsuite/corpus/: recommender models from deepctr-torch, pytorch-widedeep, torchrec and
plain torch.nn (GRU sequence models), exported to ONNX by torch's dynamo exporter (opset 20) and its
TorchScript exporter (opset 17) with a dynamic batch, with inputs and onnxruntime's outputs at batch 1,
7 and 64 so the tests need no torch.

Runs in the export environment (bash tools/export_env.sh), not in .venv:

    .venv-export/bin/python tools/export_corpus.py [--only NAME_SUBSTRING]

Deterministic: every model is built and fed from seeds. Writes
testsuite/corpus/<library>/<model>.<exporter>.onnx, <model>.<exporter>.npz (keys
`b<batch>/input/<name>` and `b<batch>/output/<name>`) and testsuite/corpus/index.json, which records
what did not export or does not run in onnxruntime, with the reason. Then run
`.venv/bin/python tools/corpus_status.py` to measure reccc on it and refresh the README's table.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import io
import json
import re
import sys
import types
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parent.parent / "testsuite" / "corpus"
BATCHES = (1, 7, 64)
TRACE_BATCH = 4
MAX_FILE_BYTES = 2 * 1024 * 1024
EXPORTERS = {"dynamo": 20, "torchscript": 17}


class _AbsentModule(types.ModuleType):
    """Stands in for a text/image dependency of pytorch-widedeep that its tabular models never call."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AbsentModule(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is not installed in the export environment")

    def __mro_entries__(self, bases):
        return (object,)


class _AbsentModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # pytorch-widedeep imports these at package import for its text and image components; torchvision's
    # PyPI wheel does not even load beside the CPU torch, and the others weigh gigabytes.
    roots = {"gensim", "spacy", "cv2", "transformers", "sentence_transformers", "torchvision"}

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _AbsentModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _offline_requests() -> None:
    """deepctr-torch asks PyPI for its latest version in a thread at import: answer it offline."""
    import requests

    def refuse(*args, **kwargs):
        raise requests.ConnectionError("the corpus export does not use the network")

    requests.get = refuse


# -- inputs ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """One column of a model's input: an id below `vocab` (0 excluded when `padding`) or a dense value."""

    vocab: int = 0
    padding: bool = False

    def sample(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        if not self.vocab:
            return rng.standard_normal(batch).astype(np.float32)
        low = 1 if self.padding else 0
        return rng.integers(low, self.vocab, batch)


@dataclass
class InputSpec:
    name: str
    dtype: str                       # "float32" (ids as float columns, as the libraries take them) or "int64"
    columns: list[Column]            # the last axis
    rows: int = 0                    # > 0: a [batch, rows, columns] input (torchrec's fixed-length bags)

    def sample(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        shape = (batch, self.rows) if self.rows else (batch,)
        count = int(np.prod(shape))
        data = np.stack([c.sample(rng, count) for c in self.columns], axis=-1).reshape(*shape, len(self.columns))
        return data.astype(self.dtype)


@dataclass
class CorpusModel:
    library: str
    name: str
    build: Callable[[], tuple[object, list[InputSpec]]]
    notes: list[str] = field(default_factory=list)


# -- deepctr-torch -----------------------------------------------------------------------------------

def _deepctr_columns(sparse=(("user", 500, 8), ("item", 1000, 8), ("cate", 50, 8), ("city", 100, 8)), dense=2):
    from deepctr_torch.inputs import DenseFeat, SparseFeat

    features = [SparseFeat(name, vocab, embedding_dim=dim) for name, vocab, dim in sparse]
    features += [DenseFeat(f"dense_{i}", 1) for i in range(dense)]
    columns = [Column(vocab) for _, vocab, _ in sparse] + [Column() for _ in range(dense)]
    return features, [InputSpec("X", "float32", columns)]


def _deepctr(model_name: str, dense: int = 2, **options) -> Callable:
    def build():
        import deepctr_torch.models as models

        features, inputs = _deepctr_columns(dense=dense)
        cls = getattr(models, model_name)
        if model_name == "PNN":
            return cls(features, dnn_hidden_units=(32, 16), **options), inputs
        if model_name == "AFM":
            return cls(features, features, **options), inputs
        return cls(features, features, dnn_hidden_units=(32, 16), **options), inputs
    return build


def _deepctr_sequence(model_name: str, **options) -> Callable:
    def build():
        import deepctr_torch.models as models
        from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

        length, items, cates = 6, 1000, 50
        features = [SparseFeat("user", 500, embedding_dim=8), SparseFeat("item_id", items, embedding_dim=8),
                    SparseFeat("cate_id", cates, embedding_dim=8), DenseFeat("score", 1)]
        features += [VarLenSparseFeat(SparseFeat("hist_item_id", items, embedding_dim=8, embedding_name="item_id"),
                                      maxlen=length, length_name="seq_length"),
                     VarLenSparseFeat(SparseFeat("hist_cate_id", cates, embedding_dim=8, embedding_name="cate_id"),
                                      maxlen=length, length_name="seq_length")]
        columns = [Column(500), Column(items), Column(cates), Column()]
        columns += [Column(items, padding=True)] * length + [Column(cates, padding=True)] * length
        columns += [Column(length, padding=True)]     # seq_length: 1..length-1
        model = getattr(models, model_name)(features, ["item_id", "cate_id"], dnn_hidden_units=(32, 16),
                                            att_hidden_size=(16, 8), **options) if model_name == "DIN" else \
            getattr(models, model_name)(features, ["item_id", "cate_id"], dnn_hidden_units=(32, 16),
                                        att_hidden_units=(16, 8), **options)
        return model, [InputSpec("X", "float32", columns)]
    return build


DEEPCTR = [
    CorpusModel("deepctr", "deepfm", _deepctr("DeepFM")),
    CorpusModel("deepctr", "dcn", _deepctr("DCN", cross_num=2)),
    CorpusModel("deepctr", "dcn_mix", _deepctr("DCNMix", cross_num=2, low_rank=4, num_experts=2)),
    CorpusModel("deepctr", "xdeepfm", _deepctr("xDeepFM", cin_layer_size=(8, 8))),
    CorpusModel("deepctr", "wdl", _deepctr("WDL")),
    CorpusModel("deepctr", "autoint", _deepctr("AutoInt", att_layer_num=2, att_head_num=2)),
    CorpusModel("deepctr", "nfm", _deepctr("NFM")),
    CorpusModel("deepctr", "fibinet", _deepctr("FiBiNET", reduction_ratio=2)),
    CorpusModel("deepctr", "afm", _deepctr("AFM", dense=0, attention_factor=8)),
    CorpusModel("deepctr", "pnn", _deepctr("PNN", use_inner=True, use_outter=True)),
    CorpusModel("deepctr", "ccpm", _deepctr("CCPM", dense=0, conv_kernel_width=(3, 2), conv_filters=(4, 4))),
    CorpusModel("deepctr", "ifm", _deepctr("IFM")),
    CorpusModel("deepctr", "din", _deepctr_sequence("DIN")),
    CorpusModel("deepctr", "dien", _deepctr_sequence("DIEN", gru_type="AUGRU")),
]


# -- pytorch-widedeep --------------------------------------------------------------------------------

def _positional(model, names: list[str]):
    """pytorch-widedeep's WideDeep takes a dict; ONNX (and torch.export's dynamic shapes) want named
    positional tensors."""
    import torch

    class OneInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, first):
            return self.model({names[0]: first})

    class TwoInputs(OneInput):
        def forward(self, first, second):
            return self.model({names[0]: first, names[1]: second})

    return (OneInput if len(names) == 1 else TwoInputs)()


_WD_CATS = [("user", 500, 8), ("item", 1000, 8), ("cate", 50, 8), ("city", 100, 8)]
_WD_CONT = ["age", "price"]


def _widedeep_tabular(cls_name: str, embed_dims: bool = True, **options) -> Callable:
    def build():
        from pytorch_widedeep.models import WideDeep
        import pytorch_widedeep.models as models
        import pytorch_widedeep.models.rec as rec

        cls = getattr(rec, cls_name, None) or getattr(models, cls_name)
        names = [n for n, _, _ in _WD_CATS] + _WD_CONT
        column_idx = {name: i for i, name in enumerate(names)}
        cat_input = [(n, v, d) for n, v, d in _WD_CATS] if embed_dims else [(n, v) for n, v, _ in _WD_CATS]
        deep = cls(column_idx=column_idx, cat_embed_input=cat_input, continuous_cols=_WD_CONT, **options)
        columns = [Column(v + 1) for _, v, _ in _WD_CATS] + [Column() for _ in _WD_CONT]
        model = _positional(WideDeep(deeptabular=deep), ["deeptabular"])
        return model, [InputSpec("X_tab", "float32", columns)]
    return build


def _widedeep_wide_and_deep():
    from pytorch_widedeep.models import TabMlp, Wide, WideDeep

    wide_vocab = 200
    names = [n for n, _, _ in _WD_CATS] + _WD_CONT
    deep = TabMlp(column_idx={n: i for i, n in enumerate(names)}, cat_embed_input=_WD_CATS,
                  continuous_cols=_WD_CONT, mlp_hidden_dims=[32, 16])
    model = WideDeep(wide=Wide(input_dim=wide_vocab, pred_dim=1), deeptabular=deep)
    wide = InputSpec("X_wide", "int64", [Column(wide_vocab + 1)] * 3)
    tab = InputSpec("X_tab", "float32", [Column(v + 1) for _, v, _ in _WD_CATS] + [Column() for _ in _WD_CONT])
    return _positional(model, ["wide", "deeptabular"]), [wide, tab]


def _widedeep_din():
    from pytorch_widedeep.models import WideDeep
    from pytorch_widedeep.models.rec import DeepInterestNetwork

    items, length = 1000, 5
    names = ["user", "target_item", "city"] + [f"item_{i}" for i in range(length)] + ["price"]
    deep = DeepInterestNetwork(
        column_idx={n: i for i, n in enumerate(names)},
        user_behavior_confiq=([f"item_{i}" for i in range(length)], items, 8),
        target_item_col="target_item",
        cat_embed_input=[("user", 500, 8), ("city", 100, 4)], continuous_cols=["price"],
        mlp_hidden_dims=[32, 16])
    columns = [Column(501), Column(items, padding=True), Column(101)]
    columns += [Column(items, padding=True)] * length + [Column()]
    return _positional(WideDeep(deeptabular=deep), ["deeptabular"]), [InputSpec("X_tab", "float32", columns)]


WIDEDEEP = [
    CorpusModel("widedeep", "wide_deep", _widedeep_wide_and_deep),
    CorpusModel("widedeep", "tab_mlp", _widedeep_tabular("TabMlp", mlp_hidden_dims=[32, 16])),
    CorpusModel("widedeep", "deepfm", _widedeep_tabular("DeepFactorizationMachine", embed_dims=False,
                                                        num_factors=8, mlp_hidden_dims=[32, 16])),
    CorpusModel("widedeep", "dcn", _widedeep_tabular("DeepCrossNetwork", n_cross_layers=2, mlp_hidden_dims=[32, 16])),
    CorpusModel("widedeep", "dcnv2", _widedeep_tabular("DeepCrossNetworkV2", num_cross_layers=2, low_rank=4,
                                                       mlp_hidden_dims=[32, 16])),
    CorpusModel("widedeep", "gdcn", _widedeep_tabular("GatedDeepCrossNetwork", num_cross_layers=2,
                                                      mlp_hidden_dims=[32, 16])),
    CorpusModel("widedeep", "xdeepfm", _widedeep_tabular("ExtremeDeepFactorizationMachine", embed_dims=False,
                                                         input_dim=8, cin_layer_dims=[8, 8],
                                                         mlp_hidden_dims=[32, 16])),
    CorpusModel("widedeep", "autoint", _widedeep_tabular("AutoInt", embed_dims=False, input_dim=8, num_heads=2,
                                                         embed_continuous_method="standard",
                                                         num_layers=2)),
    CorpusModel("widedeep", "ft_transformer", _widedeep_tabular("FTTransformer", embed_dims=False, input_dim=8,
                                                                embed_continuous_method="standard",
                                                                n_heads=2, n_blocks=2)),
    CorpusModel("widedeep", "din", _widedeep_din),
]


# -- torchrec ----------------------------------------------------------------------------------------

_TR_TABLES = [("t0", 1000), ("t1", 500), ("t2", 200)]
_TR_BAG = 3         # ids per bag (fixed length: the ONNX input is [batch, bag, tables])
_TR_DENSE = 4
_TR_DIM = 8


def _torchrec(cls_name: str, **options) -> Callable:
    def build():
        import torch
        import torchrec.models.dlrm as dlrm
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        keys = [name for name, _ in _TR_TABLES]
        collection = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=name, embedding_dim=_TR_DIM, num_embeddings=rows, feature_names=[name],
                               pooling=PoolingType.SUM if i != 1 else PoolingType.MEAN)
            for i, (name, rows) in enumerate(_TR_TABLES)])
        model = getattr(dlrm, cls_name)(collection, dense_in_features=_TR_DENSE, dense_arch_layer_sizes=[16, _TR_DIM],
                                        over_arch_layer_sizes=[16, 1], **options)

        class FixedBags(torch.nn.Module):
            """Bags of _TR_BAG ids per table and row, as the KeyedJaggedTensor torchrec takes."""

            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, dense, ids):
                batch = ids.shape[0]
                values = ids.permute(2, 0, 1).reshape(-1)               # key-major, then row, then position
                lengths = torch.full((len(keys) * batch,), _TR_BAG, dtype=torch.int64)
                sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
                return self.model(dense, sparse)

        ids = InputSpec("ids", "int64", [Column(rows) for _, rows in _TR_TABLES], rows=_TR_BAG)
        return FixedBags(), [InputSpec("dense", "float32", [Column()] * _TR_DENSE), ids]
    return build


TORCHREC = [
    CorpusModel("torchrec", "dlrm", _torchrec("DLRM")),
    CorpusModel("torchrec", "dlrm_dcn", _torchrec("DLRM_DCN", dcn_num_layers=2, dcn_low_rank_dim=4)),
]


# -- torch.nn sequential recommenders (GRU) ----------------------------------------------------------

_SEQ_ITEMS, _SEQ_LENGTH, _SEQ_DIM = 1000, 8, 16


def _gru4rec():
    """GRU4Rec-style: the session's items embedded, a GRU over them, its last hidden state scored."""
    import torch

    class GRU4Rec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.items = torch.nn.Embedding(_SEQ_ITEMS, _SEQ_DIM)
            self.gru = torch.nn.GRU(_SEQ_DIM, _SEQ_DIM, batch_first=True)
            self.score = torch.nn.Linear(_SEQ_DIM, 1)

        def forward(self, history):
            _, last = self.gru(self.items(history))
            return torch.sigmoid(self.score(last[-1]))

    return GRU4Rec(), [InputSpec("history", "int64", [Column(_SEQ_ITEMS)] * _SEQ_LENGTH)]


def _gru_interest():
    """DIEN-like interest extractor: a GRU's state at every step of the behavior sequence (its interests),
    attended by the target item, pooled and scored with the target by an MLP."""
    import torch

    class InterestExtractor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.items = torch.nn.Embedding(_SEQ_ITEMS, _SEQ_DIM)
            self.gru = torch.nn.GRU(_SEQ_DIM, _SEQ_DIM, batch_first=True)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * _SEQ_DIM, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

        def forward(self, target, history):
            item = self.items(target[:, 0])                              # [batch, dim]
            interests, _ = self.gru(self.items(history))                 # [batch, length, dim]
            weights = torch.softmax((interests * item.unsqueeze(1)).sum(-1), dim=1)
            pooled = (weights.unsqueeze(-1) * interests).sum(1)
            return torch.sigmoid(self.mlp(torch.cat([pooled, item], dim=1)))

    return InterestExtractor(), [InputSpec("target", "int64", [Column(_SEQ_ITEMS)]),
                                 InputSpec("history", "int64", [Column(_SEQ_ITEMS)] * _SEQ_LENGTH)]


TORCH = [
    CorpusModel("torch", "gru4rec", _gru4rec),
    CorpusModel("torch", "gru_interest", _gru_interest),
]

LIBRARIES = {"deepctr": DEEPCTR, "widedeep": WIDEDEEP, "torchrec": TORCHREC, "torch": TORCH}


# -- export ------------------------------------------------------------------------------------------

def _seed(text: str) -> int:
    return zlib.crc32(text.encode())


def _first_line(error: BaseException) -> str:
    """The root cause's first line: torch.onnx wraps the exception that says what went wrong."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = re.sub(r"\x1b\[[0-9;]*m", "", lines[0] if lines else "")
    return f"{type(error).__name__}: {text}"[:300]


def _export(module, specs: list[InputSpec], exporter: str, path: Path) -> None:
    import onnx
    import torch

    rng = np.random.default_rng(_seed(path.name))
    example = tuple(torch.from_numpy(spec.sample(rng, TRACE_BATCH)) for spec in specs)
    names = [spec.name for spec in specs]
    buffer = io.BytesIO()
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.onnx.export(module, example, input_names=names, output_names=["output"],
                                    opset_version=EXPORTERS[exporter], dynamo=True, verbose=False,
                                    dynamic_shapes=tuple({0: batch} for _ in specs))
        model = program.model_proto
    else:
        torch.onnx.export(module, example, buffer, input_names=names, output_names=["output"],
                          opset_version=EXPORTERS[exporter], dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in names + ["output"]})
        model = onnx.load_from_string(buffer.getvalue())
    model.producer_name = f"torch {torch.__version__} ({exporter})"
    data = model.SerializeToString()
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"the export is {len(data)} bytes, over the corpus limit of {MAX_FILE_BYTES}")
    path.write_bytes(data)


def _reference(path: Path, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Inputs and onnxruntime's outputs per batch; batches onnxruntime itself fails at, with why."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays, failures = {}, {}
    for batch in BATCHES:
        rng = np.random.default_rng(_seed(f"{path.name}/{batch}"))
        feeds = {spec.name: spec.sample(rng, batch) for spec in specs}
        try:
            outputs = session.run(None, feeds)
        except Exception as error:  # noqa: BLE001 - the reason is recorded in the index
            failures[batch] = _first_line(error)
            continue
        for name, value in feeds.items():
            arrays[f"b{batch}/input/{name}"] = value
        for meta, value in zip(session.get_outputs(), outputs):
            arrays[f"b{batch}/output/{meta.name}"] = value
    return arrays, failures


def export_model(entry: CorpusModel, exporter: str) -> dict:
    import torch

    folder = CORPUS / entry.library
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{entry.name}.{exporter}"
    record = {"library": entry.library, "model": entry.name, "exporter": exporter,
              "opset": EXPORTERS[exporter], "onnx": f"{entry.library}/{stem}.onnx"}
    torch.manual_seed(_seed(entry.name))
    np.random.seed(_seed(entry.name) % 2**32)
    try:
        module, specs = entry.build()
        module.eval()
        with torch.no_grad():
            _export(module, specs, exporter, folder / f"{stem}.onnx")
    except Exception as error:  # noqa: BLE001 - the reason is recorded in the index
        (folder / f"{stem}.onnx").unlink(missing_ok=True)
        record.update(onnx=None, export_error=_first_line(error))
        return record
    arrays, failures = _reference(folder / f"{stem}.onnx", specs)
    np.savez_compressed(folder / f"{stem}.npz", **arrays)
    record["reference"] = f"{entry.library}/{stem}.npz"
    record["batches"] = sorted({int(key.split("/")[0][1:]) for key in arrays})
    if failures:
        record["onnxruntime_errors"] = {str(batch): why for batch, why in failures.items()}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="export only models whose library/name contains this")
    args = parser.parse_args()
    _offline_requests()
    sys.meta_path.insert(0, _AbsentModuleFinder())
    import torch

    torch.set_num_threads(1)
    # nn.MultiheadAttention's inference fast path is one fused aten op that no ONNX exporter knows.
    torch.backends.mha.set_fastpath_enabled(False)
    index_path = CORPUS / "index.json"
    index = json.loads(index_path.read_text()) if args.only and index_path.exists() else {"models": []}
    kept = [r for r in index["models"] if args.only not in f"{r['library']}/{r['model']}"] if args.only else []
    records = []
    for library, entries in LIBRARIES.items():
        for entry in entries:
            if args.only not in f"{library}/{entry.name}":
                continue
            for exporter in EXPORTERS:
                record = export_model(entry, exporter)
                print(json.dumps(record), flush=True)
                records.append(record)
    index = {"torch": torch.__version__, "batches": list(BATCHES),
             "models": sorted(kept + records, key=lambda r: (r["library"], r["model"], r["exporter"]))}
    index_path.write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main()
