"""concat-fc-fusion: Concat -> Gemm/MatMul with a constant weight, with embedding lookups folded into
their block of the weight (Gather(E·Wi, ids)), by a cost model.

Differential against onnxruntime on the original model, as reccc's other pass tests: the bundled models,
hand-built layers for every Gemm variant and for each fold/keep decision, graphs the pattern must not
match, random graphs (test_pass_properties' strategy), the compiled DLRM through reccc.load, and the
Relax module TVM makes of the fused DLRM (each layer, bias and activation one fused kernel).
"""

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import reccc
from reccc.embeddings import embedding_lookups
from reccc.errors import EmbeddingIndexError
from reccc.ir import Model
from reccc.pass_manager import create_pass, registered_passes
from reccc.passes.concat_fc_fusion import DEFAULT_TABLE_BYTES_THRESHOLD, ConcatFcFusion, decide
from reccc.plugins import PASS_GROUP, TARGET_GROUP, load_entry_points
from reccc.reference import agreement, run_reference
from reccc.sample_inputs import random_inputs

from conftest import assert_matches_onnxruntime, model_path
from test_pass_properties import DCE, FOLD, MAX_WIDTH, OPS, _assert_same_model, _Builder, _model_proto, graphs

load_entry_points(PASS_GROUP)
FUSE = "concat-fc-fusion"
OPSET = 17


# ---------------------------------------------------------------------------------------------- helpers


def _optimized(proto: onnx.ModelProto, *passes, fusion: ConcatFcFusion | None = None) -> tuple[Model, list[bool]]:
    """Run the named passes (FUSE runs `fusion` when given) on a fresh IR of `proto`; returns the model
    and what each pass returned."""
    model = Model.from_onnx(proto)
    changed = []
    for name in passes:
        changed.append((fusion if name == FUSE and fusion is not None else create_pass(name))(model))
    return model, changed


def _assert_agrees(original: onnx.ModelProto, transformed: onnx.ModelProto, feeds: dict) -> None:
    for name, (error, bound) in agreement(run_reference(original, feeds), run_reference(transformed, feeds)).items():
        assert error <= bound, f"output '{name}': error {error:.3g} > {bound:.3g}"


def _concat_feeds_gemm(proto: onnx.ModelProto) -> list[str]:
    """Concat nodes whose output a Gemm or MatMul reads."""
    readers = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    return [
        node.name
        for node in proto.graph.node
        if node.op_type == "Concat" and {"Gemm", "MatMul"} & set(readers.get(node.output[0], []))
    ]


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _float(name: str, *shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _ids(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch"])


def _layer(*, dense: int = 5, tables: list[tuple[int, int]] = ((50, 8),), width: int = 16, op: str = "Gemm",
           trans_b: bool = True, alpha: float = 1.0, beta: float = 1.0, bias: str | None = "vector",
           dense_first: bool = True, relu: bool = True, seed: int = 0) -> onnx.ModelProto:
    """Relu(dense) and a lookup per (rows, dim) table, concatenated, into one Gemm/MatMul (then Relu).
    `dense=0` leaves only lookups; bias: "vector" [N], "row" [1, N], "scalar", "input" (a [batch, N] graph
    input) or None."""
    rng = np.random.default_rng(seed)
    inputs, nodes, inits, parts = [], [], [], []
    if dense:
        inputs.append(_float("dense", "batch", dense))
        nodes.append(helper.make_node("Relu", ["dense"], ["dense_relu"], name="dense_relu"))
        parts.append("dense_relu")
    lookups = []
    for i, (rows, dim) in enumerate(tables):
        inputs.append(_ids(f"ids_{i}"))
        inits.append(numpy_helper.from_array((0.5 * rng.standard_normal((rows, dim))).astype(np.float32), f"emb_{i}"))
        nodes.append(helper.make_node("Gather", [f"emb_{i}", f"ids_{i}"], [f"looked_up_{i}"], name=f"lookup_{i}", axis=0))
        lookups.append(f"looked_up_{i}")
    parts = parts + lookups if dense_first else lookups + parts
    nodes.append(helper.make_node("Concat", parts, ["joined"], name="concat", axis=1))
    depth = dense + sum(dim for _, dim in tables)
    weight = (rng.standard_normal((depth, width)) / np.sqrt(depth)).astype(np.float32)
    layer_out = "fc" if relu else "y"
    if op == "MatMul":
        inits.append(numpy_helper.from_array(weight, "w"))
        nodes.append(helper.make_node("MatMul", ["joined", "w"], [layer_out], name="layer"))
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight.T) if trans_b else weight, "w"))
        gemm_inputs = ["joined", "w"]
        if bias == "input":
            inputs.append(_float("c", "batch", width))
            gemm_inputs.append("c")
        elif bias is not None:
            shape = {"vector": (width,), "row": (1, width), "scalar": ()}[bias]
            inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "c"))
            gemm_inputs.append("c")
        nodes.append(helper.make_node("Gemm", gemm_inputs, [layer_out], name="layer", transB=int(trans_b), alpha=alpha, beta=beta))
    if relu:
        nodes.append(helper.make_node("Relu", ["fc"], ["y"], name="out_relu"))
    return _model(nodes, inputs, [_float("y", "batch", width)], inits)


def _layer_feeds(proto: onnx.ModelProto, batch: int, seed: int = 0, negative: bool = True) -> dict[str, np.ndarray]:
    """Random valid inputs; ids cover the whole ONNX range [-rows, rows) when `negative`."""
    feeds = random_inputs(Model.from_onnx(proto), batch, seed)
    rows = {init.name: init.dims[0] for init in proto.graph.initializer if init.dims}
    rng = np.random.default_rng(seed + 1)
    for node in proto.graph.node:
        if node.op_type == "Gather" and negative:
            n = rows[node.input[0]]
            feeds[node.input[1]] = rng.integers(-n, n, size=batch).astype(np.int64)
    return feeds


# ---------------------------------------------------------------------------------------------- registration


def test_registered_with_its_contract():
    assert registered_passes()[FUSE] is ConcatFcFusion
    assert ConcatFcFusion.lossless
    assert "Concat" in ConcatFcFusion.summary


# ---------------------------------------------------------------------------------------------- bundled models


@pytest.mark.parametrize("name", ["dlrm", "wide_and_deep", "two_tower"])
def test_bundled_models_lose_every_concat_into_a_gemm_and_keep_their_outputs(name):
    original = onnx.load(model_path(name))
    assert _concat_feeds_gemm(original)
    fusion = ConcatFcFusion()
    model, (folded, changed) = _optimized(original, FOLD, FUSE, fusion=fusion)
    assert changed is True
    assert all(decision.decision == "fold" for decision in fusion.report) and fusion.report
    transformed = model.to_onnx()
    onnx.checker.check_model(transformed, full_check=True)
    assert not _concat_feeds_gemm(transformed)
    assert [i.name for i in transformed.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in transformed.graph.output] == [o.name for o in original.graph.output]
    for batch in (1, 13):
        _assert_agrees(original, transformed, random_inputs(Model.from_onnx(original), batch, seed=batch))
    assert fusion(model) is False  # idempotent
    assert fusion.details() == [d.line() for d in fusion.report]  # nothing rewritten the second time


def test_dlrm_folds_each_table_into_its_block_of_the_top_weight():
    original = onnx.load(model_path("dlrm"))
    fusion = ConcatFcFusion()
    model, _ = _optimized(original, FOLD, FUSE, DCE, fusion=fusion)
    # 4 tables 1000x16 into the 64-wide top layer: each 256000 B, below the 1 MiB threshold, N = 4 x dim.
    assert [(d.rows, d.dim, d.width, d.new_bytes, d.freed_bytes, d.decision) for d in fusion.report] == [
        (1000, 16, 64, 256_000, 64_000, "fold")
    ] * 4
    details = fusion.details()
    assert details[0].endswith("over 5 inputs: 4 lookups folded, 1 GEMM over the other 1")
    assert all("fold (<= 1048576 B threshold)" in line for line in details[1:])
    # The index guard still sees four lookups, in 1000-row tables that are now 64 wide.
    lookups = embedding_lookups(model)
    assert [(lookup.rows, lookup.row_shape) for lookup in lookups] == [(1000, (64,))] * 4
    transformed = model.to_onnx()
    ops = [node.op_type for node in transformed.graph.node]
    assert ops.count("Gemm") == 5 and "Concat" not in ops  # the 5 layers
    feeds = random_inputs(Model.from_onnx(original), 9)
    feeds["cat_1"][:] = np.arange(-9, 0)  # negative ids count from the end, as before
    _assert_agrees(original, transformed, feeds)


# ---------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"trans_b": False},
        {"alpha": 0.5, "beta": 2.0},
        {"bias": "row"},
        {"bias": "scalar", "beta": -0.5},
        {"bias": None},
        {"bias": "input", "beta": 3.0},
        {"op": "MatMul"},
        {"dense_first": False},
        {"relu": False},  # the layer's output is the graph output
        {"dense": 0},  # only lookups: the bias is added after them
        {"dense": 0, "bias": "scalar", "beta": 0.25},
        {"dense": 0, "bias": "input", "beta": -2.0},
        {"dense": 0, "op": "MatMul"},
        {"dense": 0, "bias": None},  # a single lookup and nothing else: the Gather alone makes the output
        {"tables": [(50, 8), (30, 16), (20, 4)]},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
@pytest.mark.parametrize("split_unfolded", [False, True])
def test_layer_variants_keep_their_outputs(options, split_unfolded):
    original = _layer(**options)
    fusion = ConcatFcFusion(split_unfolded=split_unfolded)
    model, (changed,) = _optimized(original, FUSE, fusion=fusion)
    assert changed is True
    transformed = model.to_onnx()
    onnx.checker.check_model(transformed, full_check=True)
    assert "Concat" not in [node.op_type for node in transformed.graph.node]
    for batch in (1, 13):
        _assert_agrees(original, transformed, _layer_feeds(original, batch, seed=batch))
    assert fusion(model) is False


@pytest.mark.parametrize("bias", ["vector", "input"])
def test_gemm_over_the_rest_then_one_add_per_folded_lookup(bias):
    """The order TVM fuses best: Gemm(rest, W_rest), then one Add per folded lookup. A constant bias the same
    for every row goes into the first folded table; any other bias stays on the Gemm."""
    model, _ = _optimized(_layer(tables=[(50, 8), (30, 16)], bias=bias, beta=2.0), FUSE)
    nodes = {node.name: node for node in model.graph.nodes}
    (gemm,) = [node for node in model.graph.nodes if node.op == "Gemm"]
    assert gemm.inputs[0].name == "dense_relu"
    assert [t.name for t in gemm.inputs[2:]] == ([] if bias == "vector" else ["c"])
    first_add = gemm.outputs[0].outputs[0]
    assert first_add.op == "Add" and first_add.inputs[1].inputs[0] is nodes["lookup_0"]
    second_add = first_add.outputs[0].outputs[0]
    assert second_add.op == "Add" and second_add.inputs[1].inputs[0] is nodes["lookup_1"]
    assert second_add.outputs[0].name == "fc"  # the layer's output tensor keeps its name


def test_split_unfolded_gives_each_input_its_own_gemm():
    original = _layer(dense=6, tables=[(5000, 8)], width=40)  # 5000 x 40 x 4 B > 1 MiB and N = 5 x dim: kept
    fusion = ConcatFcFusion(split_unfolded=True)
    model, (changed,) = _optimized(original, FUSE, fusion=fusion)
    assert changed is True and [d.decision for d in fusion.report] == ["keep"]
    transformed = model.to_onnx()
    ops = [node.op_type for node in transformed.graph.node]
    assert ops.count("Gemm") == 2 and "Concat" not in ops
    assert sum(len(node.input) == 3 for node in transformed.graph.node if node.op_type == "Gemm") == 1  # one bias
    for batch in (1, 13):
        _assert_agrees(original, transformed, _layer_feeds(original, batch, seed=batch))
    # By default nothing folds there, so the layer stays as it is.
    assert _optimized(original, FUSE)[1] == [False]


def test_kept_lookups_stay_in_one_concat_with_the_dense_input():
    # Table 0 folds (small), table 1 is kept (100000 x 16 x 4 B = 6.4 MB, grows), table 2 folds.
    original = _layer(tables=[(50, 8), (100_000, 8), (40, 16)], width=16)
    fusion = ConcatFcFusion()
    model, (changed,) = _optimized(original, FUSE, fusion=fusion)
    assert changed is True
    assert [d.decision for d in fusion.report] == ["fold", "keep", "fold"]
    transformed = model.to_onnx()
    (concat,) = [node for node in transformed.graph.node if node.op_type == "Concat"]
    assert list(concat.input) == ["dense_relu", "looked_up_1"]
    assert fusion(model) is False
    for batch in (1, 13):
        _assert_agrees(original, transformed, _layer_feeds(original, batch, seed=batch))


# ---------------------------------------------------------------------------------------------- cost model


@pytest.mark.parametrize(
    "rows, dim, width, shared, expected",
    [
        (1000, 16, 64, False, ("fold", 256_000, 64_000)),  # small: under 1 MiB, N = 4 x dim
        (100_000, 16, 8, False, ("fold", 3_200_000, 6_400_000)),  # large, N <= dim: the tables shrink
        (100_000, 16, 16, False, ("fold", 6_400_000, 6_400_000)),  # large, N == dim: same size
        (20_000, 8, 16, False, ("keep", 1_280_000, 640_000)),  # large, N > dim: grows past the threshold
        (1000, 8, 64, False, ("keep", 256_000, 32_000)),  # small, but N = 8 x dim: slower in TVM
        (100_000, 16, 8, True, ("keep", 3_200_000, 0)),  # N <= dim but E has other readers: E stays, E' is new
        (100, 16, 8, True, ("fold", 3_200, 0)),  # shared but small
    ],
)
def test_cost_model(rows, dim, width, shared, expected):
    decision, reason, new_bytes, freed_bytes = decide(rows, dim, width, 4, shared, DEFAULT_TABLE_BYTES_THRESHOLD)
    assert (decision, new_bytes, freed_bytes) == expected, reason


@pytest.mark.parametrize(
    "table, width, threshold, expected",
    [
        ((1000, 16), 64, DEFAULT_TABLE_BYTES_THRESHOLD, "fold"),  # small table, N > dim
        ((1000, 16), 64, 0, "keep"),  # the same with no threshold: it grows
        ((40_000, 16), 16, DEFAULT_TABLE_BYTES_THRESHOLD, "fold"),  # large table, N <= dim
        ((40_000, 16), 32, DEFAULT_TABLE_BYTES_THRESHOLD, "keep"),  # large table, N > dim
        ((100, 4), 32, DEFAULT_TABLE_BYTES_THRESHOLD, "keep"),  # small table, N = 8 x dim
    ],
)
def test_fold_or_keep_follows_the_cost_model(table, width, threshold, expected):
    original = _layer(tables=[table], width=width)
    fusion = ConcatFcFusion(table_bytes_threshold=threshold)
    model, (changed,) = _optimized(original, FUSE, fusion=fusion)
    (decision,) = fusion.report
    rows, dim = table
    assert (decision.lookup, decision.table, decision.rows, decision.dim, decision.width) == ("lookup_0", "emb_0", rows, dim, width)
    assert decision.decision == expected
    assert decision.new_bytes == rows * width * 4 and decision.freed_bytes == rows * dim * 4
    assert f": {expected} (" in fusion.details()[-1]
    assert changed is (expected == "fold")  # with nothing folded, one Concat+GEMM stays as it was
    tables = {init.name: init for init in model.to_onnx().graph.initializer}
    gather_table = next(node.inputs[0] for node in model.graph.nodes if node.name == "lookup_0")
    assert gather_table.values.shape == ((rows, width) if expected == "fold" else (rows, dim))
    assert (gather_table.name == "emb_0") is (expected == "keep") and gather_table.name in tables
    _assert_agrees(original, model.to_onnx(), _layer_feeds(original, 7))


@pytest.mark.parametrize("bias", [None, "vector", "row", "scalar"])
def test_fold_in_float64_matches_the_product(bias):
    original = _layer(dense=0, tables=[(30, 8), (20, 4)], width=12, alpha=0.75, beta=-1.5, trans_b=True, bias=bias)
    model, _ = _optimized(original, FUSE)
    assert not [node for node in model.graph.nodes if node.op in ("Gemm", "MatMul")]
    inits = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in original.graph.initializer}
    row = -1.5 * np.broadcast_to(inits["c"], (1, 12)) if bias else 0.0
    gathers = {node.name: node for node in model.graph.nodes if node.op == "Gather"}
    expected_0 = (0.75 * (inits["emb_0"] @ inits["w"][:, :8].T) + row).astype(np.float32)  # the bias rides on the first
    expected_1 = (0.75 * (inits["emb_1"] @ inits["w"][:, 8:].T)).astype(np.float32)
    np.testing.assert_array_equal(gathers["lookup_0"].inputs[0].values, expected_0)
    np.testing.assert_array_equal(gathers["lookup_1"].inputs[0].values, expected_1)
    assert [node.op for node in model.graph.nodes if node.op not in ("Gather",)] == ["Add", "Relu"]
    _assert_agrees(original, model.to_onnx(), _layer_feeds(original, 7))


def test_a_table_shared_by_two_lookups():
    """Both readers of one big table, N <= dim: neither fold alone frees it, so both are kept; small: both fold."""
    for rows, expected in ((100_000, ["keep", "keep"]), (100, ["fold", "fold"])):
        rng = np.random.default_rng(0)
        table = numpy_helper.from_array(rng.standard_normal((rows, 16)).astype(np.float32), "emb")
        weight = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w")
        nodes = [
            helper.make_node("Gather", ["emb", "ids_0"], ["a"], name="lookup_a", axis=0),
            helper.make_node("Gather", ["emb", "ids_1"], ["b"], name="lookup_b", axis=0),
            helper.make_node("Concat", ["a", "b"], ["joined"], axis=1),
            helper.make_node("MatMul", ["joined", "w"], ["y"]),
        ]
        original = _model(nodes, [_ids("ids_0"), _ids("ids_1")], [_float("y", "batch", 8)], [table, weight])
        fusion = ConcatFcFusion()
        model, (changed,) = _optimized(original, FUSE, fusion=fusion)
        assert [d.decision for d in fusion.report] == expected
        assert changed is (expected[0] == "fold")
        _assert_agrees(original, model.to_onnx(), _layer_feeds(original, 5))


def test_pass_parameters_are_checked():
    with pytest.raises(ValueError):
        ConcatFcFusion(table_bytes_threshold=-1)
    with pytest.raises(ValueError):
        ConcatFcFusion(max_widening=0.5)
    assert ConcatFcFusion(max_widening=None).max_widening is None


# ---------------------------------------------------------------------------------------------- not matched


def _lookup_and_dense():
    """A 20 x 8 table 'emb' and its lookup 'e' of input 'ids'."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((20, 8)).astype(np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="lookup", axis=0)]
    return rng, table, nodes


def test_not_matched_when_the_concat_has_other_readers():
    rng, table, nodes = _lookup_and_dense()
    weight = numpy_helper.from_array(rng.standard_normal((12, 16)).astype(np.float32), "w")
    nodes += [
        helper.make_node("Concat", ["x", "e"], ["joined"], axis=1),
        helper.make_node("MatMul", ["joined", "w"], ["y"]),
        helper.make_node("Relu", ["joined"], ["side"]),
    ]
    original = _model(nodes, [_float("x", "batch", 4), _ids("ids")],
                      [_float("y", "batch", 16), _float("side", "batch", 12)], [table, weight])
    assert _optimized(original, FUSE)[1] == [False]


def test_not_matched_when_the_concat_is_a_graph_output():
    rng, table, nodes = _lookup_and_dense()
    weight = numpy_helper.from_array(rng.standard_normal((12, 16)).astype(np.float32), "w")
    nodes += [helper.make_node("Concat", ["x", "e"], ["joined"], axis=1), helper.make_node("MatMul", ["joined", "w"], ["y"])]
    original = _model(nodes, [_float("x", "batch", 4), _ids("ids")],
                      [_float("y", "batch", 16), _float("joined", "batch", 12)], [table, weight])
    assert _optimized(original, FUSE)[1] == [False]


def test_not_matched_when_the_weight_is_not_constant():
    _, table, nodes = _lookup_and_dense()
    nodes += [helper.make_node("Concat", ["x", "e"], ["joined"], axis=1), helper.make_node("Gemm", ["joined", "w"], ["y"])]
    original = _model(nodes, [_float("x", "batch", 4), _ids("ids"), _float("w", 12, 16)], [_float("y", "batch", 16)], [table])
    assert _optimized(original, FUSE)[1] == [False]


def test_not_matched_when_the_concat_reads_the_weight_side():
    """Concat feeding B of a MatMul (A the dense input): the blocks would be columns of the product."""
    _, table, nodes = _lookup_and_dense()
    nodes += [helper.make_node("Concat", ["x", "e"], ["joined"], axis=1), helper.make_node("MatMul", ["a", "joined"], ["y"])]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [3])
    original = _model(nodes, [_float("x", 3, 4), ids, _float("a", 5, 3)], [_float("y", 5, 12)], [table])
    assert _optimized(original, FUSE)[1] == [False]


def test_not_matched_for_an_axis_0_concat():
    rng, table, nodes = _lookup_and_dense()
    weight = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w")
    nodes += [helper.make_node("Concat", ["x", "e"], ["joined"], axis=0), helper.make_node("Gemm", ["joined", "w"], ["y"])]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [3])
    original = _model(nodes, [_float("x", 2, 8), ids], [_float("y", 5, 16)], [table, weight])
    assert _optimized(original, FUSE)[1] == [False]


def test_not_matched_for_rank_3_inputs():
    rng, table, nodes = _lookup_and_dense()
    weight = numpy_helper.from_array(rng.standard_normal((12, 16)).astype(np.float32), "w")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])  # -> [batch, 2, 8]
    for axis in (2, -1):
        body = nodes + [
            helper.make_node("Concat", ["x", "e"], ["joined"], axis=axis),
            helper.make_node("MatMul", ["joined", "w"], ["y"]),
        ]
        original = _model(body, [_float("x", "batch", 2, 4), ids], [_float("y", "batch", 2, 16)], [table, weight])
        assert _optimized(original, FUSE)[1] == [False]


def test_not_matched_for_trans_a():
    rng, table, nodes = _lookup_and_dense()
    weight = numpy_helper.from_array(rng.standard_normal((3, 16)).astype(np.float32), "w")
    nodes += [helper.make_node("Concat", ["x", "e"], ["joined"], axis=1), helper.make_node("Gemm", ["joined", "w"], ["y"], transA=1)]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [3])
    original = _model(nodes, [_float("x", 3, 4), ids], [_float("y", 12, 16)], [table, weight])
    assert _optimized(original, FUSE)[1] == [False]


# ---------------------------------------------------------------------------------------------- random graphs

CONFIGS = {
    "default": {},
    "split": {"split_unfolded": True},
    "fold-all": {"max_widening": None},
    "no-fold": {"table_bytes_threshold": 0, "max_widening": 1.0, "split_unfolded": True},
}
PIPELINES = [(FOLD, FUSE, DCE), (FUSE, DCE), (FUSE,)]


@st.composite
def fusable_graphs(draw):
    """test_pass_properties' random graphs with a Concat -> Gemm/MatMul head over some of their live tensors
    and up to 3 lookups (of input "ids", added if the graph has none). Returns the case and the head's Concat output."""
    case = draw(graphs())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = _Builder(draw, rng)
    # Rebuild on the case's own nodes: keep its graph and add the head over its outputs (all [batch, w]).
    b.nodes, b.initializers = list(case.proto.graph.node), list(case.proto.graph.initializer)
    b._ids = iter(range(10**6, 2 * 10**6))
    b.live = [(out.name, out.type.tensor_type.shape.dim[1].dim_value) for out in case.proto.graph.output]
    for op in draw(st.lists(st.sampled_from(OPS), max_size=3)):
        op(b)
    graph_inputs, id_rows = list(case.proto.graph.input), case.id_rows
    lookups = draw(st.integers(0, 3))
    if lookups and id_rows is None:
        id_rows = draw(st.integers(2, 10))
        graph_inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]))
    parts = draw(st.lists(st.sampled_from(b.live), min_size=0 if lookups else 1, max_size=4))
    for _ in range(lookups):  # lookups of "ids" read by the Concat alone, at random places among the parts
        dim = draw(st.integers(1, 8))
        table = b.fresh("table")
        b.initializers.append(numpy_helper.from_array(b.floats(id_rows, dim), table))
        parts.insert(draw(st.integers(0, len(parts))), (b.node("Gather", [table, "ids"], axis=0), dim))
    depth = sum(width for _, width in parts)
    if depth > 4 * MAX_WIDTH:
        parts, depth = parts[:1], parts[0][1]
    joined = b.node("Concat", [name for name, _ in parts], axis=draw(st.sampled_from([1, -1])))
    width = draw(st.integers(1, 8))
    weight = b.weight(depth, width)
    if draw(st.booleans()):
        trans_b = draw(st.booleans())
        inputs = [joined, b.const(np.ascontiguousarray(weight.T) if trans_b else weight)]
        if draw(st.booleans()):
            inputs.append(b.const(b.floats(*draw(st.sampled_from([(width,), (1, width), ()])))))
        attrs = {"transB": int(trans_b), "alpha": draw(st.sampled_from([1.0, 0.5])), "beta": draw(st.sampled_from([1.0, -2.0]))}
        head = b.node("Gemm", inputs, **attrs)
    else:
        head = b.node("MatMul", [joined, b.const(weight)])
    outputs = [*case.proto.graph.output, helper.make_tensor_value_info(head, TensorProto.FLOAT, ["batch", width])]
    graph = helper.make_graph(b.nodes, "fusable", graph_inputs, outputs, b.initializers)
    return type(case)(_model_proto(graph), case.features, id_rows), joined


def _check_random_case(case, config, pipeline, batch, seed):
    onnx.checker.check_model(case.proto, full_check=True)
    fusion = ConcatFcFusion(**CONFIGS[config])
    model, _ = _optimized(case.proto, *pipeline, fusion=fusion)
    transformed = model.to_onnx()
    _assert_same_model(case.proto, transformed, [case.feeds(batch, seed)])
    if pipeline[-1] == FUSE:
        # Idempotent: a second run right after the first changes nothing. (After dead-code-elimination
        # it may: a Concat whose other reader was dead now has the layer as its only reader.)
        assert fusion(model) is False, fusion.details()
    return transformed


@pytest.mark.parametrize("config", CONFIGS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=graphs(), pipeline=st.sampled_from(PIPELINES), batch=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_random_graphs_keep_outputs_and_interface(config, case, pipeline, batch, seed):
    _check_random_case(case, config, pipeline, batch, seed)


@pytest.mark.parametrize("config", CONFIGS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(head=fusable_graphs(), pipeline=st.sampled_from(PIPELINES), batch=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_random_graphs_with_a_concat_into_a_layer(config, head, pipeline, batch, seed):
    case, joined = head
    transformed = _check_random_case(case, config, pipeline, batch, seed)
    if CONFIGS[config].get("split_unfolded"):  # the head always matches: its Concat must be gone
        assert joined not in {out for node in transformed.graph.node for out in node.output}


# ---------------------------------------------------------------------------------------------- compiled


@pytest.fixture(scope="module")
def fused_dlrm(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("concat-fc") / "dlrm.so"
    reccc.compile(model_path("dlrm"), path, passes=[FOLD, FUSE, DCE])
    return path


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_compiled_fused_dlrm_matches_onnxruntime(fused_dlrm, batch):
    compiled = reccc.load(fused_dlrm)
    assert compiled.manifest.passes == [FOLD, FUSE, DCE]
    assert_matches_onnxruntime(model_path("dlrm"), compiled.run, batch, seed=batch)


@pytest.mark.parametrize("good_id", [-1000, -1, 999])
def test_compiled_fused_dlrm_ids_at_the_boundaries_and_the_guard(fused_dlrm, good_id):
    compiled = reccc.load(fused_dlrm)
    feeds = random_inputs(Model.from_onnx(onnx.load(model_path("dlrm"))), 4)
    feeds["cat_2"][2] = good_id
    expected = run_reference(onnx.load(model_path("dlrm")), feeds)
    for error, bound in agreement(expected, compiled.run(feeds)).values():
        assert error <= bound
    feeds["cat_2"][2] = 1000  # the folded lookup is still guarded, with its table's 1000 rows
    with pytest.raises(EmbeddingIndexError, match=r"input 'cat_2': id 1000 at \[2\] is out of range .* 1000 rows"):
        compiled.run(feeds)


# ---------------------------------------------------------------------------------------------- fusion in TVM


def _relax_calls(proto: onnx.ModelProto) -> tuple[list[str], set[str]]:
    """The PrimFuncs main calls (in order) in the Relax module TVM makes at -O1+, and all PrimFunc names."""
    from tvm import relax

    load_entry_points(TARGET_GROUP)
    from reccc.targets import relax_lowering
    from reccc.targets.x86 import host_cpu

    module = relax_lowering.to_relax(proto)
    with host_cpu().tvm_target():
        module = relax.get_pipeline("zero")(module)
    prim_funcs = {gv.name_hint for gv, f in module.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    calls = re.findall(r"R\.call_tir\(cls\.(\w+),|R\.call_tir\((\w+),", module["main"].script())
    return [a or b for a, b in calls], prim_funcs


def test_tvm_fuses_each_layer_with_its_bias_lookups_and_activation():
    """reccc leaves Gemm + bias + activation fusion to TVM: after concat-fc-fusion, every layer of the DLRM
    is one fused PrimFunc called once, and the rewritten top layer's Adds of the folded lookups are in it too."""
    model, _ = _optimized(onnx.load(model_path("dlrm")), FOLD, FUSE, DCE)
    calls, prim_funcs = _relax_calls(model.to_onnx())
    layers = [name for name in calls if "matmul" in name]
    pattern = re.compile(r"fused_matmul\d*(_add\d*)+_(relu|tir_sigmoid|sigmoid)\d*")
    assert len(layers) == 5 and all(pattern.fullmatch(name) for name in layers), layers
    assert len(set(layers)) == 5  # each called once
    assert [name.rsplit("_", 1)[-1].rstrip("0123456789") for name in layers][-1] == "sigmoid"
    assert sum(re.search(r"_relu\d*$", name) is not None for name in layers) == 4
    # The top layer: matmul over the bottom MLP's output, the 4 folded lookups (the first with the bias), Relu.
    assert max(len(re.findall(r"_add", name)) for name in layers) == 4
    assert not any(name.startswith("concatenate") for name in calls)
    assert not [name for name in calls if re.fullmatch(r"(matmul|add|relu|sigmoid)\d*", name)]  # nothing left unfused
    assert set(layers) <= prim_funcs


def test_tvm_fuses_the_layers_of_the_unfused_dlrm_too():
    """The baseline the pass is measured against: concat feeds one fused matmul + bias + Relu."""
    model, _ = _optimized(onnx.load(model_path("dlrm")), FOLD, DCE)
    calls, _ = _relax_calls(model.to_onnx())
    layers = [name for name in calls if "matmul" in name]
    assert len(layers) == 5 and any(name.startswith("concatenate") for name in calls)
