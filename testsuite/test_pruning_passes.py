"""The pruning passes: dedupe-initializers, prune-dead-neurons, prune-unreadable-embedding-rows (lossless)
and magnitude-pruning, neuron-pruning (lossy, under the accuracy guard).

Lossless passes: the rewrite happened (shapes, node counts, bytes), a second call changes nothing, and
onnxruntime agrees with the original model at batch 1 and 13; plus the cases where they must not act,
and property tests on test_pass_properties' random graphs, mutated to give each pass work. Lossy passes
are driven through the CLI flags on the bundled DLRM.
"""

import math
import re

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import reccc
from conftest import TESTSUITE_MODELS, model_path
from reccc.accuracy_guard import CALIBRATION_ROWS, CALIBRATION_SEED
from reccc.errors import UsageError
from reccc.ir import Model
from reccc.pass_manager import create_pass
from reccc.plugins import PASS_GROUP, load_entry_points
from reccc.reference import agreement, max_abs_error, run_reference
from reccc.sample_inputs import random_inputs
from test_pass_properties import Case, _assert_same_model, graphs

load_entry_points(PASS_GROUP)

DEDUPE, DEAD, ROWS = "dedupe-initializers", "prune-dead-neurons", "prune-unreadable-embedding-rows"
MAGNITUDE, NEURONS = "magnitude-pruning", "neuron-pruning"
DCE, FOLD = "dead-code-elimination", "constant-folding"
DLRM = model_path("dlrm")
OPSET, IR_VERSION = 17, 8


# --- helpers -------------------------------------------------------------------------------------------


def _proto(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _float_input(name: str, width: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])


def _apply(proto: onnx.ModelProto, name: str, **params):
    """Run one pass twice: (the optimized proto, the first call's details(), what each call returned)."""
    model = Model.from_onnx(proto)
    each = create_pass(name, **params)
    first = each(model)
    details = each.details()
    second = each(model)
    return model.to_onnx(), details, (first, second)


def _assert_agrees(original: onnx.ModelProto, optimized: onnx.ModelProto, batches=(1, 13)) -> None:
    onnx.checker.check_model(optimized, full_check=True)
    model = Model.from_onnx(original)
    for batch in batches:
        feeds = random_inputs(model, batch, seed=batch)
        for name, (error, bound) in agreement(run_reference(original, feeds), run_reference(optimized, feeds)).items():
            assert error <= bound, f"output '{name}' at batch {batch}: {error:.3g} > {bound:.3g}"


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def _weights(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The shape of each Gemm/MatMul's weight, by the node's name."""
    values = _initializers(proto)
    return {node.name: values[node.input[1]].shape for node in proto.graph.node if node.op_type in ("Gemm", "MatMul")}


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


def _parameter_bytes(proto: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(init).nbytes for init in proto.graph.initializer)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- dedupe-initializers ----------------------------------------------------------------------------


def _duplicates_model() -> onnx.ModelProto:
    rng = _rng()
    w = rng.standard_normal((4, 3)).astype(np.float32)
    bias = np.array([1.0, 2.0, 3.0], np.float32)
    inits = [
        numpy_helper.from_array(w, "w_a"),
        numpy_helper.from_array(w.copy(), "w_b"),  # a duplicate
        numpy_helper.from_array(w.reshape(3, 4), "w_c"),  # the same bytes, another shape: not one
        numpy_helper.from_array(bias, "b_init"),
        numpy_helper.from_array(np.zeros(3, np.float32), "z_pos"),
        numpy_helper.from_array(-np.zeros(3, np.float32), "z_neg"),  # -0.0: other bytes
        numpy_helper.from_array(np.zeros(3, np.float32), "z_pos_2"),  # a duplicate
    ]
    nodes = [
        helper.make_node("Constant", [], ["b_node"], value=numpy_helper.from_array(bias, "b_value")),  # a duplicate too
        helper.make_node("MatMul", ["x", "w_a"], ["h1"]),
        helper.make_node("MatMul", ["x", "w_b"], ["h2"]),
        helper.make_node("Gemm", ["x", "w_c"], ["h3"], transB=1),
        helper.make_node("Add", ["h1", "b_init"], ["s1"]),
        helper.make_node("Add", ["h2", "b_node"], ["s2"]),
        helper.make_node("Add", ["s1", "z_pos"], ["s3"]),
        helper.make_node("Add", ["s2", "z_neg"], ["s4"]),
        helper.make_node("Add", ["h3", "z_pos_2"], ["s5"]),
        helper.make_node("Sum", ["s3", "s4", "s5"], ["y"]),
    ]
    return _proto(nodes, [_float_input("x", 4)], [_float_input("y", 3)], inits)


def test_dedupe_merges_equal_constants_only():
    original = _duplicates_model()
    optimized, details, changed = _apply(original, DEDUPE)
    assert changed == (True, False)
    assert sorted(_initializers(optimized)) == ["b_init", "w_a", "w_c", "z_neg", "z_pos"]
    assert "Constant" not in _ops(optimized) and len(optimized.graph.node) == len(original.graph.node) - 1
    readers = {node.output[0]: list(node.input) for node in optimized.graph.node}
    assert readers["h2"] == ["x", "w_a"] and readers["s2"] == ["h2", "b_init"] and readers["s5"] == ["h3", "z_pos"]
    assert _parameter_bytes(optimized) == _parameter_bytes(original) - 48 - 12  # w_b, z_pos_2 (b_node was a node)
    assert details == ["merged 3 duplicate constants into 3 (72 bytes)"]
    _assert_agrees(original, optimized)


def test_dedupe_tells_apart_constants_that_differ_only_between_its_samples():
    """The pass reads in full only constants whose dtype, shape and evenly spaced elements match."""
    base = np.arange(1000, dtype=np.float32)
    apart = base.copy()
    apart[1] = -1.0  # not among the sampled elements (every 15th)
    inits = [numpy_helper.from_array(base, "v_a"), numpy_helper.from_array(apart, "v_b"), numpy_helper.from_array(base.copy(), "v_c")]
    nodes = [helper.make_node("Add", ["x", "v_a"], ["s1"]), helper.make_node("Add", ["s1", "v_b"], ["s2"]),
             helper.make_node("Add", ["s2", "v_c"], ["y"])]
    original = _proto(nodes, [_float_input("x", 1000)], [_float_input("y", 1000)], inits)
    optimized, details, _ = _apply(original, DEDUPE)
    assert sorted(_initializers(optimized)) == ["v_a", "v_b"]
    assert details == ["merged 1 duplicate constants into 1 (4000 bytes)"]
    _assert_agrees(original, optimized)


def test_dedupe_on_the_bundled_models():
    for name in TESTSUITE_MODELS:
        original = onnx.load(model_path(name))
        optimized, _, (_, second) = _apply(original, DEDUPE)
        assert second is False
        assert _parameter_bytes(optimized) <= _parameter_bytes(original)
        _assert_agrees(original, optimized)


# --- prune-dead-neurons ---------------------------------------------------------------------------------


class _Net:
    """Builds chains of FC layers from canonical [in, out] weights, as Gemm (either transB, any alpha/beta)
    or MatMul (with or without an Add bias)."""

    def __init__(self, width: int):
        self.nodes, self.inits, self.count = [], [], 0
        self.x, self.width = "x", width
        self.inputs = [_float_input("x", width)]

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, prefix: str, values: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.float32), name))
        return name

    def fc(self, source: str, weight: np.ndarray, bias=None, kind: str = "gemm", trans_b: int = 1,
           alpha: float = 1.0, beta: float = 1.0, name: str | None = None) -> str:
        out = name or self.fresh("fc")
        if kind == "gemm":
            stored = weight.T if trans_b else weight
            inputs = [source, self.const("w", stored)] + ([self.const("b", bias)] if bias is not None else [])
            self.nodes.append(helper.make_node("Gemm", inputs, [out], name=out, transB=trans_b, alpha=alpha, beta=beta))
        else:
            product = out if bias is None else self.fresh("mm")
            self.nodes.append(helper.make_node("MatMul", [source, self.const("w", weight)], [product], name=out))
            if bias is not None:
                self.nodes.append(helper.make_node("Add", [product, self.const("b", bias)], [out]))
        return out

    def act(self, source: str, op: str, **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, [source], [out], **attrs))
        return out

    def model(self, outputs: dict[str, int]) -> onnx.ModelProto:
        return _proto(self.nodes, self.inputs, [_float_input(name, width) for name, width in outputs.items()], self.inits)


def _layer(fan_in: int, units: int, seed: int, dead: tuple[int, ...] = (), unread_rows: tuple[int, ...] = ()):
    """A weight [fan_in, units] and bias, with units `dead` zero (weights and bias) and rows `unread_rows` zero."""
    rng = _rng(seed)
    weight = (rng.standard_normal((fan_in, units)) / math.sqrt(fan_in)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(units)).astype(np.float32)
    weight[:, list(dead)] = 0
    bias[list(dead)] = 0
    weight[list(unread_rows), :] = 0
    return weight, bias


@pytest.mark.parametrize("activation", ["Relu", "Tanh", "LeakyRelu", None])
@pytest.mark.parametrize("trans_b, alpha, beta", [(1, 1.0, 1.0), (0, 0.5, 2.0)])
def test_zero_units_are_removed(activation, trans_b, alpha, beta):
    net = _Net(6)
    w1, b1 = _layer(6, 8, seed=1, dead=(1, 4))
    w2, b2 = _layer(8, 3, seed=2)
    hidden = net.fc("x", w1, b1, trans_b=trans_b, alpha=alpha, beta=beta, name="fc1")
    if activation:
        hidden = net.act(hidden, activation)
    net.fc(hidden, w2, b2, trans_b=trans_b, alpha=alpha, beta=beta, name="fc2")
    original = net.model({"fc2": 3})

    optimized, details, changed = _apply(original, DEAD)
    assert changed == (True, False)
    shapes = _weights(optimized)
    assert shapes == ({"fc1": (6, 6), "fc2": (3, 6)} if trans_b else {"fc1": (6, 6), "fc2": (6, 3)})
    assert details == ["Gemm 'fc1': 8 -> 6 units (2 output 0)"]
    kept = [0, 2, 3, 5, 6, 7]
    weights = _initializers(optimized)
    (w2_name,) = [node.input[1] for node in optimized.graph.node if node.output[0] == "fc2"]
    np.testing.assert_array_equal(weights[w2_name], w2[kept].T if trans_b else w2[kept])
    assert _parameter_bytes(optimized) == _parameter_bytes(original) - 4 * (2 * 6 + 2 + 2 * 3)
    _assert_agrees(original, optimized)


@pytest.mark.parametrize("reader", ["gemm", "gemm_no_bias", "gemm_beta_0", "matmul", "matmul_add"])
def test_a_dead_sigmoid_unit_is_folded_into_the_next_bias(reader):
    """Sigmoid(0) = 0.5: the unit is a constant, whose share 0.5 * W2[j] moves into the next layer's bias."""
    net = _Net(5)
    w1, b1 = _layer(5, 4, seed=3, dead=(2,))
    w2, b2 = _layer(4, 3, seed=4)
    hidden = net.act(net.fc("x", w1, b1, name="fc1"), "Sigmoid")
    kind = "gemm" if reader.startswith("gemm") else "matmul"
    bias = None if reader in ("gemm_no_bias", "matmul") else b2
    net.fc(hidden, w2, bias, kind=kind, alpha=1.5 if kind == "gemm" else 1.0,
           beta=0.0 if reader == "gemm_beta_0" else 1.0, trans_b=0, name="fc2")
    original = net.model({"fc2": 3})

    optimized, details, changed = _apply(original, DEAD)
    assert changed == (True, False)
    assert _weights(optimized) == {"fc1": (3, 5), "fc2": (3, 3)}
    assert details == ["Gemm 'fc1': 4 -> 3 units (1 constant, folded into the next layer's bias)"]
    alpha = 1.5 if kind == "gemm" else 1.0
    base = b2 if reader in ("gemm", "matmul_add") else np.zeros(3, np.float32)
    expected = base + 0.5 * alpha * w2[2]
    bias_node = next(n for n in optimized.graph.node if (n.op_type == "Gemm" and n.output[0] == "fc2") or n.op_type == "Add")
    np.testing.assert_allclose(_initializers(optimized)[bias_node.input[-1] if kind == "gemm" else bias_node.input[1]], expected, rtol=1e-6)
    if reader == "matmul":
        assert _ops(optimized) == ["Gemm", "Sigmoid", "MatMul", "Add"]  # the bias the fold needed
    _assert_agrees(original, optimized)


def test_units_nobody_reads_are_removed():
    net = _Net(6)
    w1, b1 = _layer(6, 8, seed=5)
    w2, b2 = _layer(8, 2, seed=6, unread_rows=(0, 3, 7))
    hidden = net.act(net.fc("x", w1, b1, kind="matmul", name="fc1"), "Sigmoid")  # non-zero outputs, but unread
    net.fc(hidden, w2, b2, kind="matmul", name="fc2")
    original = net.model({"fc2": 2})
    optimized, details, changed = _apply(original, DEAD)
    assert changed == (True, False)
    assert _weights(optimized) == {"fc1": (6, 5), "fc2": (5, 2)}
    assert details == ["MatMul 'fc1': 8 -> 5 units (3 unread)"]
    _assert_agrees(original, optimized)


def test_pruning_reaches_a_fixed_point_through_several_layers():
    """Folding fc1's constant units leaves fc2's unit 0 reading only them, so it becomes constant too."""
    net = _Net(4)
    w1, b1 = _layer(4, 5, seed=7, dead=(0, 1))
    b1[1] = 0.3  # zero weights, positive bias under Relu: a constant 0.3, folded
    w2, b2 = _layer(5, 4, seed=8)
    w2[2:, 0] = 0  # fc2's unit 0 reads only fc1's units 0 and 1
    w3, b3 = _layer(4, 2, seed=9)
    h = net.act(net.fc("x", w1, b1, name="fc1"), "Relu")
    h = net.act(net.fc(h, w2, b2, name="fc2"), "Tanh")
    net.fc(h, w3, b3, name="fc3")
    original = net.model({"fc3": 2})
    optimized, details, changed = _apply(original, DEAD)
    assert changed == (True, False)
    assert _weights(optimized) == {"fc1": (3, 4), "fc2": (3, 3), "fc3": (2, 3)}
    assert details == [
        "Gemm 'fc1': 5 -> 3 units (1 output 0, 1 constant, folded into the next layer's bias)",
        "Gemm 'fc2': 4 -> 3 units (1 constant, folded into the next layer's bias)",
    ]
    _assert_agrees(original, optimized)


def test_a_hidden_matmul_of_rank_3():
    """[batch, fields, K] through MatMuls: units are the last axis."""
    w1, b1 = _layer(4, 6, seed=10, dead=(5,))
    w2, b2 = _layer(6, 2, seed=11, unread_rows=(0,))
    inits = [numpy_helper.from_array(v, n) for v, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="m1"), helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="m2"),
        helper.make_node("Add", ["b2", "m2"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 2])
    original = _proto(nodes, [x], [y], inits)
    optimized, _, changed = _apply(original, DEAD)
    assert changed == (True, False)
    assert _weights(optimized) == {"m1": (4, 4), "m2": (4, 2)}
    _assert_agrees(original, optimized)


def _dead_unit_net(extra: str) -> tuple[onnx.ModelProto, dict]:
    net = _Net(6)
    w1, b1 = _layer(6, 8, seed=12, dead=(1, 4))
    w2, b2 = _layer(8, 3, seed=13, unread_rows=(0,))
    hidden = net.act(net.fc("x", w1, b1, name="fc1"), "Relu")
    outputs = {"fc2": 3}
    if extra == "another reader":
        net.nodes.append(helper.make_node("ReduceMax", [hidden], ["peak"], keepdims=1))
        outputs["peak"] = 1
    if extra == "graph output":
        outputs[hidden] = 8
    net.fc(hidden, w2, b2, name="fc2")
    return net.model(outputs), outputs


@pytest.mark.parametrize("extra", ["another reader", "graph output"])
def test_a_hidden_tensor_read_elsewhere_is_left_alone(extra):
    original, _ = _dead_unit_net(extra)
    optimized, details, changed = _apply(original, DEAD)
    assert changed == (False, False) and details == []
    assert _weights(optimized) == _weights(original)


def test_the_output_layer_is_left_alone():
    net = _Net(6)
    w1, b1 = _layer(6, 8, seed=14)
    w2, b2 = _layer(8, 3, seed=15, dead=(1,))  # a zero unit, but its output is the model's
    net.fc(net.act(net.fc("x", w1, b1, name="fc1"), "Relu"), w2, b2, name="fc2")
    original = net.model({"fc2": 3})
    _, _, changed = _apply(original, DEAD)
    assert changed == (False, False)


def test_a_constant_unit_is_kept_when_the_reader_s_bias_is_computed():
    """Sigmoid's 0.5 needs a constant bias to fold into; a run-time bias (an input) has none."""
    net = _Net(5)
    w1, b1 = _layer(5, 4, seed=16, dead=(2,))
    w2, _ = _layer(4, 3, seed=17)
    hidden = net.act(net.fc("x", w1, b1, name="fc1"), "Sigmoid")
    net.inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3]))
    net.nodes.append(helper.make_node("Gemm", [hidden, net.const("w", w2), "c"], ["fc2"]))
    original = net.model({"fc2": 3})
    _, _, changed = _apply(original, DEAD)
    assert changed == (False, False)


def test_magnitude_pruning_then_prune_dead_neurons_removes_emptied_units(tmp_path):
    """Units 0 and 3 of fc1 have only small weights: magnitude pruning zeroes them, prune-dead-neurons
    removes them (the zero bias makes them 0 under Relu) and the matching rows of fc2."""
    net = _Net(6)
    w1, b1 = _layer(6, 5, seed=18)
    w1 = np.where(np.abs(w1) < 0.05, np.float32(0.2), w1)  # only the chosen units have small weights
    w1[:, [0, 3]] = 0.01
    b1[[0, 3]] = 0
    w2, b2 = _layer(5, 2, seed=19)
    net.fc(net.act(net.fc("x", w1, b1, name="fc1"), "Relu"), np.where(np.abs(w2) < 0.05, 0.2, w2), b2, name="fc2")
    source = tmp_path / "m.onnx"
    onnx.save(net.model({"fc2": 2}), source)

    result = reccc.compile(source, tmp_path / "m.opt.onnx", passes=[DEAD, DCE], prune_threshold=0.05, emit="onnx")
    assert [record.name for record in result.passes] == [MAGNITUDE, DEAD, DCE]
    assert result.passes[1].details == ["Gemm 'fc1': 5 -> 3 units (2 output 0)"]
    assert _weights(onnx.load(tmp_path / "m.opt.onnx")) == {"fc1": (3, 6), "fc2": (2, 3)}
    assert result.accuracy.max_deviation < 0.05


# --- prune-unreadable-embedding-rows ------------------------------------------------------------------


def _constant_lookups_model() -> onnx.ModelProto:
    rng = _rng(20)
    table = rng.standard_normal((10, 4)).astype(np.float32)
    other = rng.standard_normal((6, 4)).astype(np.float32)
    inits = [
        numpy_helper.from_array(table, "E"),
        numpy_helper.from_array(other, "F"),  # also read by user ids: must stay whole
        numpy_helper.from_array(np.array([7, -1, 7], np.int64), "ids_e1"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([1], np.int64), "ids_f"),
    ]
    nodes = [
        helper.make_node("Constant", [], ["ids_e2"], value=numpy_helper.from_array(np.array(2, np.int32), "v")),
        helper.make_node("Gather", ["E", "ids_e1"], ["g1"], axis=0),  # [3, 4]
        helper.make_node("ReduceSum", ["g1", "axes"], ["r1"], keepdims=1),  # [1, 4]
        helper.make_node("Gather", ["E", "ids_e2"], ["g2"], axis=0),  # [4]
        helper.make_node("Gather", ["F", "cat"], ["g3"], axis=0),  # [batch, 4]
        helper.make_node("Gather", ["F", "ids_f"], ["g4"], axis=0),  # [1, 4]
        helper.make_node("Sum", ["x", "r1", "g2", "g3", "g4"], ["y"]),
    ]
    inputs = [_float_input("x", 4), helper.make_tensor_value_info("cat", TensorProto.INT64, ["batch"])]
    return _proto(nodes, inputs, [_float_input("y", 4)], inits)


def test_a_table_read_at_constant_ids_keeps_only_those_rows():
    original = _constant_lookups_model()
    optimized, details, changed = _apply(original, ROWS)
    assert changed == (True, False)
    values = _initializers(optimized)
    source = _initializers(original)["E"]
    np.testing.assert_array_equal(values["E"], source[[2, 7, 9]])
    np.testing.assert_array_equal(values["F"], _initializers(original)["F"])
    gathers = {node.output[0]: list(node.input) for node in optimized.graph.node if node.op_type == "Gather"}
    np.testing.assert_array_equal(values[gathers["g1"][1]], np.array([1, 2, 1], np.int64))
    ids_2 = values.get(gathers["g2"][1])
    assert ids_2 is not None and ids_2.dtype == np.int32 and ids_2.shape == () and int(ids_2) == 0
    assert "Constant" not in _ops(optimized)
    assert details == ["table 'E': 10 -> 3 rows (2 lookups with constant ids; 112 bytes freed)"]
    _assert_agrees(original, optimized)


def test_out_of_range_constant_ids_leave_the_table_alone():
    table = numpy_helper.from_array(np.ones((5, 2), np.float32), "E")
    ids = numpy_helper.from_array(np.array([1, 5], np.int64), "ids")
    nodes = [helper.make_node("Gather", ["E", "ids"], ["g"], axis=0), helper.make_node("Add", ["x", "g"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    proto = _proto(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [table, ids])
    _, _, changed = _apply(proto, ROWS)
    assert changed == (False, False)


def test_a_table_nobody_reads_is_not_kept():
    """No lookup, nothing for this pass: an unread initializer is not even part of reccc's graph (graphsurgeon
    keeps the tensors nodes read), so every pipeline, dead-code-elimination's included, drops it."""
    original = _constant_lookups_model()
    original.graph.initializer.append(numpy_helper.from_array(np.ones((1000, 8), np.float32), "unread_table"))
    for pipeline in ([], [ROWS], [DCE]):
        model = Model.from_onnx(original)
        for each in pipeline:
            create_pass(each)(model)
        assert "unread_table" not in {init.name for init in model.to_onnx().graph.initializer}


@pytest.mark.parametrize("index_check", ["error", "clamp"])
def test_a_pruned_table_compiles_and_runs_under_the_index_guard(tmp_path, index_check):
    source = tmp_path / "lookups.onnx"
    onnx.save(_constant_lookups_model(), source)
    result = reccc.compile(source, tmp_path / "lookups.so", passes=[ROWS], index_check=index_check)
    assert result.passes[0].details == ["table 'E': 10 -> 3 rows (2 lookups with constant ids; 112 bytes freed)"]
    compiled = reccc.load(result.output)
    if index_check == "error":  # the user ids are guarded; constant ids need no guard
        assert [(guard.table, guard.direct_input) for guard in compiled.manifest.index_guards] == [("F", "cat")]
    original = onnx.load(source)
    for batch in (1, 13):
        feeds = random_inputs(Model.from_onnx(original), batch, seed=batch)
        expected = run_reference(original, feeds)["y"]
        assert max_abs_error(expected, compiled.run(feeds)["y"]) <= 1e-5 * max(1.0, float(np.abs(expected).max()))


# --- the lossless passes on the bundled models ----------------------------------------------------------


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_lossless_pruning_keeps_the_bundled_models_outputs(name):
    original = onnx.load(model_path(name))
    model = Model.from_onnx(original)
    for each in (FOLD, DEDUPE, ROWS, DEAD, DCE):
        create_pass(each)(model)
    _assert_agrees(original, model.to_onnx())


# --- property tests -----------------------------------------------------------------------------------


def _constant_protos(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every constant by name: initializers and Constant nodes' `value` tensors (mutable in place)."""
    found = {init.name: init for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    found[node.output[0]] = attribute.t
    return found


def _set(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


@st.composite
def with_duplicates(draw) -> tuple[Case, onnx.ModelProto]:
    """A random graph where some readers of constants read equal copies (initializers or Constant nodes)."""
    case = draw(graphs())
    proto = onnx.ModelProto()
    proto.CopyFrom(case.proto)
    constants = _constant_protos(proto)
    count = 0
    for node in list(proto.graph.node):
        for index, name in enumerate(node.input):
            if name in constants and draw(st.booleans()):
                count += 1
                copy = f"{name}__copy{count}"
                values = numpy_helper.to_array(constants[name])
                if draw(st.booleans()):
                    proto.graph.initializer.append(numpy_helper.from_array(values, copy))
                else:
                    proto.graph.node.insert(0, helper.make_node("Constant", [], [copy], value=numpy_helper.from_array(values, copy)))
                node.input[index] = copy
    return case, proto


ACTIVATIONS = [("Relu", {}), ("Sigmoid", {}), ("Tanh", {}), ("LeakyRelu", {"alpha": 0.1}), ("Elu", {}),
               ("HardSigmoid", {}), ("Softplus", {}), ("Identity", {}), ("Selu", {})]


def _append_mlp(draw, proto: onnx.ModelProto) -> None:
    """Run the first graph output through 2-3 FC layers of drawn kinds (Gemm either transB, alpha/beta;
    MatMul with or without an Add bias) with 0-2 activations between; maybe the last stage is two FC
    readers summed, maybe a hidden tensor is also a graph output (which must keep it whole)."""
    rng = _rng(draw(st.integers(0, 2**16)))
    output = proto.graph.output[0]
    current, fan_in = output.name, output.type.tensor_type.shape.dim[1].dim_value
    extra_outputs = []

    def fc(source: str, fan_in: int, units: int, tag: str) -> str:
        weight = (rng.standard_normal((fan_in, units)) / math.sqrt(fan_in)).astype(np.float32)
        bias = (0.5 * rng.standard_normal(units)).astype(np.float32)
        kind = draw(st.sampled_from(["gemm", "gemm_t", "gemm_scaled", "gemm_no_bias", "matmul", "matmul_add"]))
        w_name, b_name, out = f"{tag}_w", f"{tag}_b", f"{tag}_out"
        if kind.startswith("gemm"):
            trans_b = int(kind == "gemm_t")
            proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T) if trans_b else weight, w_name))
            inputs = [source, w_name]
            if kind != "gemm_no_bias":
                proto.graph.initializer.append(numpy_helper.from_array(bias, b_name))
                inputs.append(b_name)
            scale = {"alpha": 0.5, "beta": 2.0} if kind == "gemm_scaled" else {}
            proto.graph.node.append(helper.make_node("Gemm", inputs, [out], transB=trans_b, **scale))
        else:
            proto.graph.initializer.append(numpy_helper.from_array(weight, w_name))
            product = out if kind == "matmul" else f"{tag}_product"
            proto.graph.node.append(helper.make_node("MatMul", [source, w_name], [product]))
            if kind == "matmul_add":
                proto.graph.initializer.append(numpy_helper.from_array(bias, b_name))
                proto.graph.node.append(helper.make_node("Add", [product, b_name], [out]))
        return out

    layers = draw(st.integers(2, 3))
    for layer in range(layers):
        units = draw(st.integers(1, 6))
        tag = f"mlp{layer}"
        if layer == layers - 1 and draw(st.booleans()):  # two readers of the last hidden tensor
            parts = [fc(current, fan_in, units, f"{tag}a"), fc(current, fan_in, units, f"{tag}b")]
            proto.graph.node.append(helper.make_node("Add", parts, [f"{tag}_sum"]))
            current = f"{tag}_sum"
        else:
            current = fc(current, fan_in, units, tag)
        fan_in = units
        if layer < layers - 1:
            for step in range(draw(st.integers(0, 2))):
                op, attrs = draw(st.sampled_from(ACTIVATIONS))
                proto.graph.node.append(helper.make_node(op, [current], [f"{tag}_act{step}"], **attrs))
                current = f"{tag}_act{step}"
            if draw(st.integers(0, 9)) == 0:
                extra_outputs.append(_float_input(current, units))
    output.name = current
    output.type.tensor_type.shape.dim[1].dim_value = fan_in
    proto.graph.output.extend(extra_outputs)


@st.composite
def with_dead_units(draw) -> tuple[Case, onnx.ModelProto]:
    """A random graph with an MLP appended, whose FC weights have some units (and maybe their biases) or
    some input rows zeroed."""
    case = draw(graphs())
    proto = onnx.ModelProto()
    proto.CopyFrom(case.proto)
    _append_mlp(draw, proto)
    constants = _constant_protos(proto)
    for node in proto.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or node.input[1] not in constants:
            continue
        weight = numpy_helper.to_array(constants[node.input[1]]).copy()
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        mode = draw(st.sampled_from(["units", "rows", "none"]))
        axis = (0 if trans_b else 1) if mode == "units" else (1 if trans_b else 0)
        chosen = [i for i in range(weight.shape[axis]) if mode != "none" and draw(st.booleans())]
        if not chosen:
            continue
        index = [slice(None), slice(None)]
        index[axis] = chosen
        weight[tuple(index)] = 0
        _set(constants[node.input[1]], weight)
        bias_name = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else None
        if node.op_type == "MatMul":  # the bias of a MatMul is the Add reading it
            bias_name = next((add.input[1] for add in proto.graph.node if add.op_type == "Add" and add.input[0] == node.output[0]), None)
        if mode == "units" and bias_name in constants and draw(st.booleans()):
            bias = numpy_helper.to_array(constants[bias_name]).copy()
            if bias.ndim and bias.shape[-1] == weight.shape[axis]:
                bias[..., chosen] = 0
                _set(constants[bias_name], bias)
    return case, proto


@st.composite
def with_constant_lookups(draw) -> tuple[Case, onnx.ModelProto]:
    """A random graph with a table read at constant ids (some negative) added to one of its outputs."""
    case = draw(graphs())
    proto = onnx.ModelProto()
    proto.CopyFrom(case.proto)
    output = proto.graph.output[0]
    width = output.type.tensor_type.shape.dim[1].dim_value
    rows = draw(st.integers(1, 12))
    table = _rng(draw(st.integers(0, 1000))).standard_normal((rows, width)).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(table, "const_table"))
    proto.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "sum_axes"))
    total = output.name
    for lookup in range(draw(st.integers(1, 2))):
        ids = np.array(draw(st.lists(st.integers(-rows, rows - 1), min_size=1, max_size=4)), np.int64)
        ids_name, gathered, summed, added = (f"{prefix}_{lookup}" for prefix in ("const_ids", "gathered", "summed", "with_lookup"))
        if draw(st.booleans()):
            proto.graph.initializer.append(numpy_helper.from_array(ids, ids_name))
        else:
            proto.graph.node.append(helper.make_node("Constant", [], [ids_name], value=numpy_helper.from_array(ids, ids_name)))
        proto.graph.node.extend([
            helper.make_node("Gather", ["const_table", ids_name], [gathered], axis=0),
            helper.make_node("ReduceSum", [gathered, "sum_axes"], [summed], keepdims=1),
            helper.make_node("Add", [total, summed], [added]),
        ])
        total = added
    output.name = total
    return case, proto


def _check_pass_on(mutated: tuple[Case, onnx.ModelProto], name: str, batch: int, seed: int) -> None:
    case, proto = mutated
    onnx.checker.check_model(proto, full_check=True)
    model = Model.from_onnx(proto)
    each = create_pass(name)
    each(model)
    assert each(model) is False  # it did all it could in one call
    _assert_same_model(proto, model.to_onnx(), [case.feeds(batch, seed)])


PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(mutated=with_duplicates(), batch=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_dedupe_initializers_property(mutated, batch, seed):
    _check_pass_on(mutated, DEDUPE, batch, seed)


@PROPERTY_SETTINGS
@given(mutated=with_dead_units(), batch=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_prune_dead_neurons_property(mutated, batch, seed):
    _check_pass_on(mutated, DEAD, batch, seed)


@PROPERTY_SETTINGS
@given(mutated=with_constant_lookups(), batch=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_prune_unreadable_embedding_rows_property(mutated, batch, seed):
    _check_pass_on(mutated, ROWS, batch, seed)


# --- lossy passes: parameters and unit behaviour ------------------------------------------------------


def test_magnitude_pruning_zeroes_small_fc_weights_only():
    net = _Net(4)
    w1 = np.array([[0.01, 0.5], [-0.02, -0.7], [0.3, 0.04], [0.0, 0.9]], np.float32)
    hidden = net.act(net.fc("x", w1, np.array([0.001, 0.002]), name="fc1"), "Relu")
    net.fc(hidden, np.array([[0.03], [0.6]], np.float32), None, kind="matmul", name="fc2")
    original = net.model({"fc2": 1})
    model = Model.from_onnx(original)
    each = create_pass(MAGNITUDE, threshold=0.05)
    assert each(model) is True
    optimized = model.to_onnx()
    values = _initializers(optimized)
    w1_pruned = values[next(n.input[1] for n in optimized.graph.node if n.output[0] == "fc1")]
    np.testing.assert_array_equal(w1_pruned.T, np.where(np.abs(w1) < 0.05, 0, w1))
    np.testing.assert_array_equal(values["b2"], np.array([0.001, 0.002], np.float32))  # biases stay
    assert each.details() == [
        "Gemm 'fc1': weight 'w1' 2x4: sparsity 0.125 -> 0.500",
        "MatMul 'fc2': weight 'w4' 2x1: sparsity 0.000 -> 0.500",
        "overall: 5 of 10 FC weights zero, sparsity 0.100 -> 0.500 (threshold 0.05)",
    ]
    assert each(model) is False


def test_neuron_pruning_removes_the_weakest_hidden_units():
    net = _Net(3)
    w1 = np.array([[1, 0.1, 2, 0.2], [1, 0.1, 2, 0.3], [1, 0.1, 2, 0.2]], np.float32)  # unit norms: 1.7, 0.17, 3.5, 0.41
    b1 = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    w2 = np.arange(8, dtype=np.float32).reshape(4, 2)
    hidden = net.act(net.fc("x", w1, b1, trans_b=0, name="fc1"), "Relu")
    net.fc(hidden, w2, np.zeros(2), name="fc2")
    original = net.model({"fc2": 2})
    model = Model.from_onnx(original)
    each = create_pass(NEURONS, fraction=0.5)
    assert each(model) is True
    optimized = model.to_onnx()
    values = _initializers(optimized)
    layer = {n.output[0]: n for n in optimized.graph.node}
    np.testing.assert_array_equal(values[layer["fc1"].input[1]], w1[:, [0, 2]])
    np.testing.assert_array_equal(values[layer["fc1"].input[2]], b1[[0, 2]])
    np.testing.assert_array_equal(values[layer["fc2"].input[1]], w2[[0, 2]].T)
    assert each.details() == ["Gemm 'fc1': 4 -> 2 units"]  # fc2 is the output layer


@pytest.mark.parametrize(
    "name, params, message",
    [
        (MAGNITUDE, {"threshold": -1}, "threshold must be a finite number >= 0"),
        (MAGNITUDE, {"threshold": float("nan")}, "threshold must be a finite number >= 0"),
        (MAGNITUDE, {}, "needs a threshold"),
        (NEURONS, {"fraction": 1.0}, "fraction must be in [0, 1)"),
        (NEURONS, {"fraction": -0.1}, "fraction must be in [0, 1)"),
        (NEURONS, {}, "needs a fraction"),
    ],
)
def test_lossy_pass_parameters_are_checked(name, params, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        create_pass(name, **params)


# --- lossy passes through the CLI -------------------------------------------------------------------------


def _printed_deviation(stderr: str) -> float:
    line = next(line for line in stderr.splitlines() if line.startswith("reccc: accuracy: "))
    return float(line.split("'ctr' max ")[1].split()[0])


def test_prune_threshold_on_dlrm(reccc_cli, tmp_path):
    artifact = tmp_path / "dlrm.so"
    result = reccc_cli(DLRM, "--prune-threshold=0.05", "--time-passes", "-o", artifact)
    assert result.code == 0, result.stderr
    assert "reccc: accuracy: output deviation on 64 generated rows: 'ctr' max" in result.stderr
    sparsity = [line for line in result.stderr.splitlines() if line.startswith("    overall: ")]
    assert len(sparsity) == 1 and re.search(r"sparsity 0\.000 -> 0\.[1-9]\d\d \(threshold 0\.05\)", sparsity[0])
    printed = _printed_deviation(result.stderr)
    assert 0 < printed < 0.5

    source = onnx.load(DLRM)
    feeds = random_inputs(Model.from_onnx(source), CALIBRATION_ROWS, seed=CALIBRATION_SEED)
    compiled = reccc.load(artifact)
    deviation = max_abs_error(run_reference(source, feeds)["ctr"], compiled.run(feeds)["ctr"])
    assert deviation <= printed * 1.01 + 1e-6  # printed with 3 digits; TVM's rounding is far below that
    assert compiled.manifest.accuracy["max_abs_deviation"] == pytest.approx(deviation, rel=1e-3, abs=1e-6)


def test_a_budget_the_pruning_exceeds_fails_and_writes_nothing(reccc_cli, tmp_path):
    artifact = tmp_path / "dlrm.so"
    result = reccc_cli(DLRM, "--prune-threshold=0.05", "--accuracy-budget=1e-4", "-o", artifact)
    assert result.code == 1
    assert "reccc: error: accuracy budget exceeded" in result.stderr
    assert not artifact.exists()


def test_prune_neurons_shrinks_the_hidden_layers_by_a_quarter(reccc_cli, tmp_path):
    output = tmp_path / "dlrm.opt.onnx"
    result = reccc_cli(DLRM, "-O1", "--prune-neurons=0.25", "--time-passes", "--emit=onnx", "-o", output)
    assert result.code == 0, result.stderr
    # transB=1 everywhere: weights are [units, fan_in]. Hidden: the bottom MLP's 64 and the top's 64, 32;
    # the bottom's last layer feeds the Concat and the top's last is the output: both keep their units.
    assert _weights(onnx.load(output)) == {
        "fc_3_node": (48, 13), "fc_7_node": (16, 48), "gemm_24_node": (48, 80), "fc_28_node": (24, 48), "fc_32_node": (1, 24),
    }
    assert "    Gemm 'gemm_24_node': 64 -> 48 units" in result.stderr.splitlines()
    assert "reccc: accuracy: output deviation" in result.stderr


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--prune-neurons=1.5", "pass 'neuron-pruning': bad parameters {'fraction': 1.5}: fraction must be in [0, 1)"),
        ("--prune-neurons=-0.25", "fraction must be in [0, 1)"),
        ("--prune-threshold=-1", "pass 'magnitude-pruning': bad parameters {'threshold': -1.0}: threshold must be a finite number >= 0"),
        ("--prune-threshold=inf", "threshold must be a finite number >= 0"),
    ],
)
def test_bad_pruning_values_are_usage_errors(reccc_cli, tmp_path, flag, message):
    result = reccc_cli(DLRM, flag, "-o", tmp_path / "m.so")
    assert result.code == 2 and message in result.stderr
    assert not (tmp_path / "m.so").exists()
