"""The canonicalization passes: each rewrite on a small model (what changes, that a second run changes
nothing, outputs agree with onnxruntime at batch 1 and 13), the cases it must leave alone, TVM import
of the shape chains it rewrites, the bundled models, and property tests on random graphs."""

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_pass_properties import OPS, Case, _assert_same_model, _Builder, _model_proto, graphs

import reccc
from conftest import TESTSUITE_MODELS, model_path
from reccc.errors import CompileError
from reccc.ir import Model
from reccc.pass_manager import create_pass
from reccc.reference import agreement, run_reference
from reccc.sample_inputs import random_inputs

NO_OPS, SHAPES, TRANSPOSE = "remove-no-ops", "canonicalize-shape-chains", "fold-transpose-into-gemm"
GEMM, BN, RESHAPES, ID_CASTS = "matmul-add-to-gemm", "fold-batchnorm", "merge-reshapes", "remove-id-casts"
CANONICALIZATIONS = (NO_OPS, SHAPES, TRANSPOSE, GEMM, BN, RESHAPES, ID_CASTS)
F, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
RNG = np.random.default_rng(0)


# --- building and checking models --------------------------------------------------------------


def value(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def model(nodes, inputs, outputs, constants: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    initializers = [numpy_helper.from_array(array, name) for name, array in (constants or {}).items()]
    proto = _model_proto(helper.make_graph(nodes, "g", inputs, outputs, initializers))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def node(op: str, inputs: list[str], outputs: list[str] | str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [outputs] if isinstance(outputs, str) else outputs, **attrs)


def floats(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def run_pass(name: str, proto: onnx.ModelProto) -> tuple[bool, onnx.ModelProto]:
    """Run the pass; a second run must change nothing. Returns (changed, the model after it)."""
    ir = Model.from_onnx(proto)
    changed = create_pass(name)(ir)
    assert create_pass(name)(ir) is False, f"{name} is not idempotent"
    return changed, ir.to_onnx()


def live(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model without dead code, for asserting on the ops that compute the outputs."""
    ir = Model.from_onnx(proto)
    create_pass("dead-code-elimination")(ir)
    return ir.to_onnx()


def ops(proto: onnx.ModelProto) -> list[str]:
    return [each.op_type for each in live(proto).graph.node]


def the_node(proto: onnx.ModelProto, op: str) -> onnx.NodeProto:
    (found,) = [each for each in proto.graph.node if each.op_type == op]
    return found


def constant(proto: onnx.ModelProto, name: str) -> np.ndarray:
    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for each in proto.graph.node:
        if each.op_type == "Constant" and each.output[0] == name:
            return numpy_helper.to_array(each.attribute[0].t)
    raise KeyError(name)


def int_attr(each: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in each.attribute if a.name == name), default)


def assert_agrees(original: onnx.ModelProto, transformed: onnx.ModelProto) -> None:
    """Valid ONNX, the same interface (symbolic batch included), the same outputs at batch 1 and 13."""
    ir = Model.from_onnx(original)
    _assert_same_model(original, transformed, [random_inputs(ir, 1, seed=1), random_inputs(ir, 13, seed=2)])


def rewrites(name: str, proto: onnx.ModelProto) -> onnx.ModelProto:
    changed, transformed = run_pass(name, proto)
    assert changed is True
    assert_agrees(proto, transformed)
    return transformed


def leaves_alone(name: str, proto: onnx.ModelProto) -> None:
    changed, transformed = run_pass(name, proto)
    assert changed is False
    assert [n.op_type for n in transformed.graph.node] == [n.op_type for n in proto.graph.node]


def assert_tvm_agrees(proto: onnx.ModelProto, tmp_path, passes: list[str]) -> None:
    """Compiled by reccc with exactly `passes`, the model runs in TVM and agrees with onnxruntime."""
    index = len(list(tmp_path.glob("*.onnx")))  # a fresh path each time: a loaded library is cached by path
    source, artifact = tmp_path / f"model_{index}.onnx", tmp_path / f"model_{index}.so"
    onnx.save(proto, source)
    reccc.compile(source, artifact, passes=passes)
    compiled = reccc.load(artifact)
    for batch in (1, 7):
        feeds = random_inputs(Model.from_onnx(proto), batch, seed=batch)
        expected = run_reference(proto, feeds)
        actual = compiled.run(feeds)
        for name, (error, bound) in agreement(expected, {k: actual[k] for k in expected}).items():
            assert error <= bound, f"output '{name}' at batch {batch}: {error} > {bound}"


# --- remove-no-ops -----------------------------------------------------------------------------------


def test_remove_no_ops_bypasses_every_kind_of_no_op():
    nodes = [
        node("Relu", ["x"], "r"),
        node("Identity", ["r"], "a"),
        node("Dropout", ["a", "ratio"], ["b", "mask"]),  # inference: the mask is unused
        node("Cast", ["b"], "c", to=F),
        node("Reshape", ["c", "same"], "d"),  # [0, 6] on [batch, 6]
        node("Reshape", ["d", "inferred"], "e"),  # [-1, 6]
        node("Transpose", ["e"], "f", perm=[0, 1]),
        node("Tile", ["f", "ones"], "g"),
        node("Expand", ["g", "row"], "h"),  # [1, 6] broadcasts to [batch, 6] itself
        node("Sigmoid", ["h"], "y"),
    ]
    constants = {"ratio": np.array(0.5, np.float32), "same": ints(0, 6), "inferred": ints(-1, 6), "ones": ints(1, 1), "row": ints(1, 6)}
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 6])], constants)
    assert ops(rewrites(NO_OPS, proto)) == ["Relu", "Sigmoid"]


def test_remove_no_ops_keeps_graph_output_names_by_renaming_the_producer():
    nodes = [node("Relu", ["x"], "r"), node("Identity", ["r"], "y"), node("Sigmoid", ["r"], "z")]
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 6]), value("z", F, ["batch", 6])])
    transformed = rewrites(NO_OPS, proto)
    assert [(n.op_type, list(n.input), list(n.output)) for n in transformed.graph.node] == [
        ("Relu", ["x"], ["y"]),
        ("Sigmoid", ["y"], ["z"]),
    ]


Y6 = value("y", F, ["batch", 6])


@pytest.mark.parametrize(
    "nodes, outputs",
    [
        ([node("Identity", ["x"], "y")], [Y6]),  # its input is a graph input
        ([node("Relu", ["x"], "r"), node("Identity", ["r"], "y")], [value("r", F, ["batch", 6]), Y6]),  # its input is an output too
        ([node("Dropout", ["x", "ratio"], ["y", "mask"])], [Y6, value("mask", TensorProto.BOOL, ["batch", 6])]),  # the mask is used
        ([node("Dropout", ["x", "ratio", "training"], "y")], [Y6]),  # training mode
        ([node("Cast", ["x"], "c", to=I64), node("Cast", ["c"], "y", to=F)], [Y6]),  # casts that change values
        ([node("Reshape", ["x", "split"], "r"), node("Reshape", ["r", "merge"], "y")], [Y6]),
        ([node("Reshape", ["x", "same"], "y", allowzero=1)], [value("y", F, [0, 6])]),  # allowzero=1: 0 is a size
        ([node("Transpose", ["x"], "t", perm=[1, 0]), node("Transpose", ["t"], "y", perm=[1, 0])], [Y6]),
        ([node("Tile", ["x", "twice"], "y")], [value("y", F, ["batch", 12])]),
        ([node("Expand", ["x", "wider"], "y")], [value("y", F, [2, "batch", 6])]),
    ],
    ids=["input", "output-of-output", "dropout-mask", "dropout-training", "casts", "reshapes", "allowzero", "transposes", "tile", "expand"],
)
def test_remove_no_ops_leaves_alone(nodes, outputs):
    constants = {"ratio": np.array(0.5, np.float32), "training": np.array(True), "split": ints(0, 2, 3), "merge": ints(0, 6),
                 "same": ints(0, 6), "twice": ints(1, 2), "wider": ints(2, 1, 1)}
    used = {name for each in nodes for name in each.input}
    proto = model(nodes, [value("x", F, ["batch", 6])], outputs, {k: v for k, v in constants.items() if k in used})
    leaves_alone(NO_OPS, proto)


# --- canonicalize-shape-chains -----------------------------------------------------------------------


def _flatten_chain(gather_index: np.ndarray) -> onnx.ModelProto:
    """torch's x.view(x.size(0), -1) on x[batch, 2, 3]: a scalar Gather and Unsqueeze, or a 1-D Gather."""
    nodes = [node("Shape", ["x"], "shape"), node("Gather", ["shape", "index"], "batch", axis=0)]
    batch = "batch"
    if gather_index.ndim == 0:
        nodes.append(node("Unsqueeze", ["batch", "axis"], "batch_1d"))
        batch = "batch_1d"
    nodes += [node("Concat", [batch, "rest"], "target", axis=0), node("Reshape", ["x", "target"], "flat"), node("Relu", ["flat"], "y")]
    constants = {"index": gather_index, "axis": ints(0), "rest": ints(-1)}
    return model(nodes, [value("x", F, ["batch", 2, 3])], [value("y", F, ["batch", 6])], constants)


@pytest.mark.parametrize("gather_index", [np.array(0, np.int64), ints(0)], ids=["scalar-index", "1d-index"])
def test_shape_chain_reshape_becomes_a_constant_target(gather_index):
    transformed = rewrites(SHAPES, _flatten_chain(gather_index))
    assert ops(transformed) == ["Reshape", "Relu"]
    assert constant(transformed, the_node(transformed, "Reshape").input[1]).tolist() == [0, -1]


def test_shape_chain_batch_from_another_tensor_with_the_same_dim():
    """The batch is read from x, the Reshape reshapes Transpose(x): the same symbolic dim, so 0; the static dim folds."""
    nodes = [
        node("Transpose", ["x"], "t", perm=[0, 2, 1]),
        node("Shape", ["x"], "shape"),
        node("Gather", ["shape", "zero"], "batch", axis=0),
        node("Gather", ["shape", "one"], "rows", axis=0),
        node("Concat", ["batch", "rows", "three"], "target", axis=0),
        node("Reshape", ["t", "target"], "y"),
    ]
    constants = {"zero": ints(0), "one": ints(1), "three": ints(3)}
    proto = model(nodes, [value("x", F, ["batch", 2, 3])], [value("y", F, ["batch", 2, 3])], constants)
    transformed = rewrites(SHAPES, proto)
    assert constant(transformed, the_node(transformed, "Reshape").input[1]).tolist() == [0, 2, 3]


def test_shape_chain_one_unknown_entry_becomes_minus_one():
    """The leading entry is a dim of another input, not of the Reshape's: -1 is exact when the rest are sizes."""
    nodes = [node("Shape", ["z"], "shape"), node("Gather", ["shape", "zero"], "rows", axis=0),
             node("Concat", ["rows", "dims"], "target", axis=0), node("Reshape", ["x", "target"], "y")]
    proto = model(nodes, [value("x", F, ["batch", 6]), value("z", F, ["rows", 4])], [value("y", F, ["rows", 3, 2])],
                  {"zero": ints(0), "dims": ints(3, 2)})
    transformed = rewrites(SHAPES, proto)
    assert constant(transformed, the_node(transformed, "Reshape").input[1]).tolist() == [-1, 3, 2]


def _expand_chain(x_width: int, width: int) -> onnx.ModelProto:
    """Expand(x[batch, x_width], Concat(Gather(Shape(x), [0]), [width])): [batch, width]."""
    nodes = [node("Shape", ["x"], "shape"), node("Gather", ["shape", "zero"], "batch", axis=0),
             node("Concat", ["batch", "width"], "target", axis=0), node("Expand", ["x", "target"], "e"), node("Relu", ["e"], "y")]
    return model(nodes, [value("x", F, ["batch", x_width])], [value("y", F, ["batch", width])], {"zero": ints(0), "width": ints(width)})


def test_shape_chain_expand_of_a_column_becomes_tile_by_constant_repeats():
    transformed = rewrites(SHAPES, _expand_chain(1, 4))
    assert ops(transformed) == ["Tile", "Relu"]
    assert constant(transformed, the_node(transformed, "Tile").input[1]).tolist() == [1, 4]


def test_shape_chain_expand_to_its_own_shape_goes():
    assert ops(rewrites(SHAPES, _expand_chain(3, 3))) == ["Relu"]


def test_constant_expand_over_the_batch_becomes_tile():
    """Constant folding leaves Expand(x[batch, 1], [1, 4]), which TVM 0.27 cannot import; Tile it can."""
    proto = model([node("Expand", ["x", "shape"], "y")], [value("x", F, ["batch", 1])], [value("y", F, ["batch", 4])], {"shape": ints(1, 4)})
    assert ops(rewrites(SHAPES, proto)) == ["Tile"]


def test_shape_chain_tile_repeats_from_static_dims_become_constants():
    nodes = [node("Shape", ["z"], "shape"), node("Gather", ["shape", "one"], "width", axis=0),
             node("Concat", ["one", "width"], "repeats", axis=0), node("Tile", ["x", "repeats"], "y")]
    proto = model(nodes, [value("x", F, ["batch", 1]), value("z", F, ["batch", 4])], [value("y", F, ["batch", 4])], {"one": ints(1)})
    transformed = rewrites(SHAPES, proto)
    assert constant(transformed, the_node(transformed, "Tile").input[1]).tolist() == [1, 4]


def test_shape_chains_left_alone():
    # allowzero=1: a 0 would be a size, not a copy
    allowzero = _flatten_chain(ints(0))
    the_node(allowzero, "Reshape").attribute.append(helper.make_attribute("allowzero", 1))
    leaves_alone(SHAPES, allowzero)
    # two run-time entries that are not the Reshape input's own dims: neither 0 nor -1 can say it
    nodes = [node("Shape", ["z"], "shape"), node("Concat", ["shape", "shape"], "target", axis=0), node("Reshape", ["x", "target"], "y")]
    two = model(nodes, [value("x", F, ["batch", "n"]), value("z", F, ["m", "k"])], [value("y", F, ["m", "k", "m", "k"])])
    leaves_alone(SHAPES, two)
    # a target computed from data, not from shapes
    nodes = [node("Cast", ["x"], "xi", to=I64), node("Abs", ["xi"], "target"), node("Reshape", ["z", "target"], "y")]
    data = model(nodes, [value("x", F, [2]), value("z", F, ["batch", 6])], [value("y", F, [None, None])])
    leaves_alone(SHAPES, data)
    # Expand to a batch read from another tensor: no constant says it (TVM imports it as it is)
    leaves_alone(SHAPES, model(
        [node("Shape", ["z"], "shape"), node("Gather", ["shape", "zero"], "b", axis=0), node("Concat", ["b", "four"], "t", axis=0),
         node("Expand", ["w", "t"], "y")],
        [value("z", F, ["batch", 2])], [value("y", F, ["batch", 4])], {"zero": ints(0), "four": ints(4), "w": floats(1, 4)}))


def test_shape_chains_that_tvm_rejects_compile_after_the_pass(tmp_path):
    """TVM's importer fails on Reshape(x, Concat(Gather(Shape(x), [0]), ...)) and Expand to a constant shape
    over the batch; after canonicalize-shape-chains both import, and agree with onnxruntime."""
    reshape = _flatten_chain(ints(0))
    expand = model([node("Expand", ["x", "shape"], "y")], [value("x", F, ["batch", 1])], [value("y", F, ["batch", 4])], {"shape": ints(1, 4)})
    for proto in (reshape, expand):
        with pytest.raises(CompileError, match="TVM could not import"):
            assert_tvm_agrees(proto, tmp_path, passes=[])
        assert_tvm_agrees(proto, tmp_path, passes=[SHAPES])
    for proto in (_flatten_chain(np.array(0, np.int64)), _expand_chain(1, 4)):
        assert_tvm_agrees(proto, tmp_path, passes=[SHAPES, "dead-code-elimination"])


# --- fold-transpose-into-gemm ------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
def test_transposed_gemm_weight_flips_trans_b(trans_b):
    weight = floats(6, 4) if trans_b else floats(4, 6)  # op(Transpose(weight)) is [6, 4] either way
    nodes = [node("Transpose", ["w"], "wt", perm=[1, 0]), node("Gemm", ["x", "wt", "b"], "y", transB=trans_b, alpha=0.5)]
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 4])], {"w": weight, "b": floats(4)})
    transformed = rewrites(TRANSPOSE, proto)
    assert ops(transformed) == ["Gemm"]
    gemm = the_node(transformed, "Gemm")
    assert gemm.input[1] == "w" and int_attr(gemm, "transB") == 1 - trans_b


def test_transposed_gemm_input_flips_trans_a_even_when_not_constant():
    nodes = [node("Transpose", ["x"], "xt"), node("Gemm", ["xt", "w"], "y", transA=1)]
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 3])], {"w": floats(6, 3)})
    transformed = rewrites(TRANSPOSE, proto)
    assert ops(transformed) == ["Gemm"] and int_attr(the_node(transformed, "Gemm"), "transA") == 0


def test_matmul_of_a_transposed_constant_reads_the_transposed_constant():
    nodes = [node("Constant", [], "w_t", value=numpy_helper.from_array(floats(3, 6))),  # a Constant node, as some exporters write
             node("Transpose", ["w_t"], "w", perm=[1, 0]), node("MatMul", ["x", "w"], "y")]
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 3])])
    transformed = rewrites(TRANSPOSE, proto)
    assert ops(transformed) == ["MatMul"]
    assert constant(transformed, the_node(transformed, "MatMul").input[1]).shape == (6, 3)


def test_fold_transpose_leaves_alone():
    # the transposed weight is read by another node: no second copy of it
    nodes = [node("Transpose", ["w_t"], "w", perm=[1, 0]), node("MatMul", ["x", "w"], "y"), node("ReduceSum", ["w"], "s")]
    leaves_alone(TRANSPOSE, model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 3]), value("s", F, [1, 1])], {"w_t": floats(3, 6)}))
    # the transposed operand is not a constant
    nodes = [node("Transpose", ["z"], "zt", perm=[1, 0]), node("MatMul", ["x", "zt"], "y")]
    leaves_alone(TRANSPOSE, model(nodes, [value("x", F, ["batch", 6]), value("z", F, [3, 6])], [value("y", F, ["batch", 3])]))
    # the transposed constant is a graph output
    nodes = [node("Transpose", ["w_t"], "w", perm=[1, 0]), node("MatMul", ["x", "w"], "y")]
    leaves_alone(TRANSPOSE, model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 3]), value("w", F, [6, 3])], {"w_t": floats(3, 6)}))


def test_gemm_flag_flip_keeps_a_shared_transpose_for_its_other_reader():
    nodes = [node("Transpose", ["w"], "wt", perm=[1, 0]), node("Gemm", ["x", "wt"], "y"), node("ReduceSum", ["wt"], "s")]
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 3]), value("s", F, [1, 1])], {"w": floats(3, 6)})
    transformed = rewrites(TRANSPOSE, proto)
    assert sorted(ops(transformed)) == ["Gemm", "ReduceSum", "Transpose"]
    assert the_node(transformed, "Gemm").input[1] == "w"


# --- matmul-add-to-gemm ------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_shape, bias_first", [((3,), False), ((1, 3), True), ((), False), ((1,), True)])
def test_matmul_add_becomes_gemm(bias_shape, bias_first):
    add_inputs = ["b", "h"] if bias_first else ["h", "b"]
    nodes = [node("MatMul", ["x", "w"], "h"), node("Add", add_inputs, "y")]
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 3])], {"w": floats(6, 3), "b": floats(*bias_shape)})
    transformed = rewrites(GEMM, proto)
    assert [(n.op_type, list(n.input), list(n.output)) for n in transformed.graph.node] == [("Gemm", ["x", "w", "b"], ["y"])]


def test_matmul_add_left_alone():
    x6, y3 = [value("x", F, ["batch", 6])], [value("y", F, ["batch", 3])]
    constants = {"w": floats(6, 3), "b": floats(3)}
    # the MatMul's result is read by another node, or is a graph output
    leaves_alone(GEMM, model([node("MatMul", ["x", "w"], "h"), node("Add", ["h", "b"], "y"), node("Relu", ["h"], "r")], x6,
                             y3 + [value("r", F, ["batch", 3])], constants))
    leaves_alone(GEMM, model([node("MatMul", ["x", "w"], "h"), node("Add", ["h", "b"], "y")], x6, y3 + [value("h", F, ["batch", 3])], constants))
    # the weight or the bias is not a constant
    leaves_alone(GEMM, model([node("MatMul", ["x", "z"], "h"), node("Add", ["h", "b"], "y")], x6 + [value("z", F, [6, 3])], y3, {"b": floats(3)}))
    leaves_alone(GEMM, model([node("MatMul", ["x", "w"], "h"), node("Add", ["h", "z"], "y")], x6 + [value("z", F, ["batch", 3])], y3, {"w": floats(6, 3)}))
    # rank-3 MatMul is batched; Gemm is not
    leaves_alone(GEMM, model([node("MatMul", ["x", "w"], "h"), node("Add", ["h", "b"], "y")], [value("x", F, ["batch", 2, 6])],
                             [value("y", F, ["batch", 2, 3])], constants))
    # a bias that varies along the rows
    leaves_alone(GEMM, model([node("MatMul", ["x", "w"], "h"), node("Add", ["h", "b"], "y")], [value("x", F, [2, 6])], [value("y", F, [2, 3])],
                             {"w": floats(6, 3), "b": floats(2, 1)}))


# --- fold-batchnorm ----------------------------------------------------------------------------------


def _bn_constants(n: int) -> dict[str, np.ndarray]:
    return {"scale": floats(n), "shift": floats(n), "mean": floats(n), "var": (0.5 + RNG.random(n)).astype(np.float32)}


BN_INPUTS = ["scale", "shift", "mean", "var"]


@pytest.mark.parametrize("trans_b, with_bias", [(0, True), (1, True), (1, False)])
def test_batchnorm_after_gemm_folds_into_weight_and_bias(trans_b, with_bias):
    gemm_inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    nodes = [node("Gemm", gemm_inputs, "h", transB=trans_b, alpha=0.5, beta=2.0), node("BatchNormalization", ["h", *BN_INPUTS], "y", epsilon=1e-3)]
    constants = {"w": floats(4, 6) if trans_b else floats(6, 4), "b": floats(4), **_bn_constants(4)}
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 4])], constants if with_bias else {k: v for k, v in constants.items() if k != "b"})
    transformed = rewrites(BN, proto)
    assert ops(transformed) == ["Gemm"]


def test_batchnorm_after_matmul_becomes_gemm():
    nodes = [node("MatMul", ["x", "w"], "h"), node("BatchNormalization", ["h", *BN_INPUTS], "y")]
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 4])], {"w": floats(6, 4), **_bn_constants(4)})
    assert ops(rewrites(BN, proto)) == ["Gemm"]


def test_batchnorm_of_a_constant_becomes_a_constant():
    nodes = [node("BatchNormalization", ["c", *BN_INPUTS], "folded"), node("Add", ["x", "folded"], "y")]
    proto = model(nodes, [value("x", F, ["batch", 4, 2])], [value("y", F, ["batch", 4, 2])], {"c": floats(1, 4, 2), **_bn_constants(4)})
    assert ops(rewrites(BN, proto)) == ["Add"]


def test_fold_batchnorm_left_alone():
    x6, y4 = [value("x", F, ["batch", 6])], [value("y", F, ["batch", 4])]
    bn = node("BatchNormalization", ["h", *BN_INPUTS], "y")
    constants = {"w": floats(6, 4), **_bn_constants(4)}
    # the layer's result is read by another node, or is a graph output
    leaves_alone(BN, model([node("MatMul", ["x", "w"], "h"), bn, node("Relu", ["h"], "r")], x6, y4 + [value("r", F, ["batch", 4])], constants))
    leaves_alone(BN, model([node("MatMul", ["x", "w"], "h"), bn], x6, y4 + [value("h", F, ["batch", 4])], constants))
    # the weight is not a constant
    leaves_alone(BN, model([node("MatMul", ["x", "z"], "h"), bn], x6 + [value("z", F, [6, 4])], y4, _bn_constants(4)))
    # a statistic is not a constant
    stats = {k: v for k, v in constants.items() if k != "mean"}
    leaves_alone(BN, model([node("MatMul", ["x", "w"], "h"), bn], x6 + [value("mean", F, [4])], y4, stats))
    # rank 3: BN's channel axis is not the layer's feature axis
    leaves_alone(BN, model([node("MatMul", ["x", "w3"], "h"), node("BatchNormalization", ["h", *BN_INPUTS], "y")],
                           [value("x", F, ["batch", 4, 6])], [value("y", F, ["batch", 4, 5])], {"w3": floats(6, 5), **_bn_constants(4)}))


# --- merge-reshapes ----------------------------------------------------------------------------------


def test_reshape_of_reshape_merges_keeping_the_batch_copy():
    nodes = [node("Reshape", ["x", "s1"], "a"), node("Reshape", ["a", "s2"], "b"), node("Reshape", ["b", "s3"], "y")]
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 3, 2])], {"s1": ints(0, 2, 3), "s2": ints(0, 6), "s3": ints(0, 3, 2)})
    transformed = rewrites(RESHAPES, proto)
    assert ops(transformed) == ["Reshape"]
    reshape = the_node(transformed, "Reshape")
    assert reshape.input[0] == "x" and constant(transformed, reshape.input[1]).tolist() == [0, 3, 2]


@pytest.mark.parametrize("inner", ["Flatten", "Unsqueeze", "Squeeze"])
def test_reshape_of_a_layout_op_merges(inner):
    if inner == "Flatten":
        nodes, x = [node("Flatten", ["x"], "a", axis=1)], value("x", F, ["batch", 2, 3])
    elif inner == "Unsqueeze":
        nodes, x = [node("Unsqueeze", ["x", "axes"], "a")], value("x", F, ["batch", 6])
    else:
        nodes, x = [node("Squeeze", ["x", "axes"], "a")], value("x", F, ["batch", 1, 6])
    nodes.append(node("Reshape", ["a", "target"], "y"))
    proto = model(nodes, [x], [value("y", F, ["batch", 3, 2])], {"axes": ints(1), "target": ints(0, 3, 2)})
    assert ops(rewrites(RESHAPES, proto)) == ["Reshape"]


def test_merge_reshapes_resolves_a_zero_from_a_static_inner_dim():
    nodes = [node("Reshape", ["x", "s1"], "a"), node("Reshape", ["a", "s2"], "y")]
    proto = model(nodes, [value("x", F, ["batch", 6])], [value("y", F, ["batch", 3, 2])], {"s1": ints(-1, 3, 2), "s2": ints(-1, 0, 2)})
    transformed = rewrites(RESHAPES, proto)
    assert constant(transformed, the_node(transformed, "Reshape").input[1]).tolist() == [-1, 3, 2]


def test_merge_reshapes_left_alone():
    x = [value("x", F, ["batch", 6])]
    chain = [node("Reshape", ["x", "s1"], "a"), node("Reshape", ["a", "s2"], "y")]
    constants = {"s1": ints(0, 2, 3), "s2": ints(0, 3, 2)}
    # the inner result has another reader, or is a graph output
    leaves_alone(RESHAPES, model(chain + [node("Relu", ["a"], "r")], x, [value("y", F, ["batch", 3, 2]), value("r", F, ["batch", 2, 3])], constants))
    leaves_alone(RESHAPES, model(chain, x, [value("y", F, ["batch", 3, 2]), value("a", F, ["batch", 2, 3])], constants))
    # a 0 in the outer target with allowzero=1 is a size
    allowzero = [chain[0], node("Reshape", ["a", "s2"], "y", allowzero=1)]
    leaves_alone(RESHAPES, model(allowzero, [value("x", F, [0, 6])], [value("y", F, [0, 3, 2])], constants))
    # the outer target is not a constant
    leaves_alone(RESHAPES, model([chain[0], node("Shape", ["x"], "s"), node("Reshape", ["a", "s"], "y")], x, [value("y", F, ["batch", 6])], constants))
    # a 0 that copies a symbolic dim the inner Reshape inferred
    leaves_alone(RESHAPES, model(chain, x, [value("y", F, [None, 3, 2])], {"s1": ints(-1, 2, 3), "s2": ints(0, 3, 2)}))


# --- remove-id-casts ---------------------------------------------------------------------------------


def _lookup(ids_type: int, cast_to: int, extra_nodes=(), extra_outputs=()) -> onnx.ModelProto:
    nodes = [node("Cast", ["ids"], "cast_ids", to=cast_to), node("Gather", ["table", "cast_ids"], "y", axis=0), *extra_nodes]
    constants = {"table": floats(10, 4)} | ({"one": ints(1)} if extra_nodes else {})
    return model(nodes, [value("ids", ids_type, ["batch"])], [value("y", F, ["batch", 4]), *extra_outputs], constants)


def test_int32_ids_widened_for_gather_lose_the_cast(tmp_path):
    proto = _lookup(I32, I64)
    transformed = rewrites(ID_CASTS, proto)
    assert [(n.op_type, list(n.input)) for n in transformed.graph.node] == [("Gather", ["table", "ids"])]
    assert_tvm_agrees(proto, tmp_path, passes=[ID_CASTS])  # int32 ids through reccc's index guard too


def test_id_casts_left_alone():
    leaves_alone(ID_CASTS, _lookup(I64, I32))  # may change values
    leaves_alone(ID_CASTS, _lookup(TensorProto.FLOAT, I64))  # float to int truncates
    leaves_alone(ID_CASTS, _lookup(I32, I64, [node("Add", ["cast_ids", "one"], "next")], [value("next", I64, ["batch"])]))  # read as int64
    leaves_alone(ID_CASTS, _lookup(I32, I64, [], [value("cast_ids", I64, ["batch"])]))  # a graph output
    leaves_alone(ID_CASTS, model([node("Cast", ["ids"], "c", to=I64), node("Gather", ["c", "ids"], "y", axis=0)],  # read as data
                                 [value("ids", I32, [3])], [value("y", I64, [3])]))


# --- the bundled models ------------------------------------------------------------------------------


# What each pass changes on the bundled models; every other (model, pass) changes nothing.
EXPECTED_ON_BUNDLED = {
    ("dlrm", TRANSPOSE): "the top layer's stored-transposed weight: Transpose gone, Gemm transB flipped",
    ("two_tower", NO_OPS): "the Identity writing user_vector: its Gemm writes user_vector",
    ("deepfm", SHAPES): "Reshape(v, Concat(Unsqueeze(Gather(Shape(v), 0)), [40])) reads the constant [0, 40]",
}


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
@pytest.mark.parametrize("pipeline", [(each,) for each in CANONICALIZATIONS] + [CANONICALIZATIONS], ids=lambda p: p[0] if len(p) == 1 else "all")
def test_bundled_models_keep_outputs(name, pipeline):
    proto = onnx.load(model_path(name))
    ir = Model.from_onnx(proto)
    changed = {each: create_pass(each)(ir) for each in pipeline}
    assert {each for each, did in changed.items() if did} == {each for each in pipeline if (name, each) in EXPECTED_ON_BUNDLED}
    assert not any(create_pass(each)(ir) for each in pipeline)
    transformed = ir.to_onnx()
    assert_agrees(proto, transformed)
    before, after = ops(proto), ops(transformed)
    if (name, TRANSPOSE) in EXPECTED_ON_BUNDLED and TRANSPOSE in pipeline:
        assert before.count("Transpose") == 1 and after.count("Transpose") == 0
    if (name, NO_OPS) in EXPECTED_ON_BUNDLED and NO_OPS in pipeline:
        assert before.count("Identity") == 1 and after.count("Identity") == 0
    if (name, SHAPES) in EXPECTED_ON_BUNDLED and SHAPES in pipeline:
        assert before.count("Shape") == 1 and after.count("Shape") == 0


# --- property tests ----------------------------------------------------------------------------------


def _fc(b: _Builder, source: str, width: int, out: int) -> str:
    if b.draw(st.booleans()):
        return b.node("MatMul", [source, b.const(b.weight(width, out))])
    trans_b = b.draw(st.booleans())
    weight = b.weight(width, out)
    inputs = [source, b.const(np.ascontiguousarray(weight.T) if trans_b else weight)]
    if b.draw(st.booleans()):
        inputs.append(b.const(b.floats(out)))
    return b.node("Gemm", inputs, transB=int(trans_b), alpha=b.draw(st.sampled_from([1.0, 0.5])), beta=b.draw(st.sampled_from([1.0, 2.0])))


def _transposed_fc(b: _Builder) -> None:
    """A Gemm or MatMul whose operand is a Transpose: of a stored-transposed weight, or of the activations."""
    source, width = b.pick()
    out = b.draw(st.integers(1, 8))
    weight = b.node("Transpose", [b.const(np.ascontiguousarray(b.weight(width, out).T))], perm=[1, 0])
    if b.draw(st.booleans()):
        b.live_node("MatMul", [source, weight], out)
    elif b.draw(st.booleans()):
        b.live_node("Gemm", [source, weight], out, transB=0)
    else:  # Gemm(Transpose(x), W, transA=1)
        b.live_node("Gemm", [b.node("Transpose", [source], perm=[1, 0]), b.const(b.weight(width, out))], out, transA=1)


def _batchnorm_after_fc(b: _Builder) -> None:
    source, width = b.pick()
    out = b.draw(st.integers(1, 8))
    hidden = _fc(b, source, width, out)
    params = [b.const(b.floats(out)), b.const(b.floats(out)), b.const(b.floats(out)), b.const((0.5 + b.rng.random(out)).astype(np.float32))]
    b.live_node("BatchNormalization", [hidden, *params], out)


def _matmul_add(b: _Builder) -> None:
    source, width = b.pick()
    out = b.draw(st.integers(1, 8))
    hidden = b.node("MatMul", [source, b.const(b.weight(width, out))])
    bias = b.const(b.floats(*b.draw(st.sampled_from([(out,), (1, out), (), (1,)]))))
    b.live_node("Add", [hidden, bias] if b.draw(st.booleans()) else [bias, hidden], out)


def _no_op(b: _Builder) -> None:
    source, width = b.pick()
    kind = b.draw(st.sampled_from(["Identity", "Dropout", "Cast", "Reshape", "Transpose", "Tile", "Expand"]))
    if kind == "Dropout":
        b.live_node("Dropout", [source, b.const(np.array(0.3, np.float32))], width)
    elif kind == "Cast":
        b.live_node("Cast", [source], width, to=TensorProto.FLOAT)
    elif kind == "Reshape":
        b.live_node("Reshape", [source, b.const(np.array(b.draw(st.sampled_from([[0, width], [-1, width], [0, -1]])), np.int64))], width)
    elif kind == "Transpose":
        b.live_node("Transpose", [source], width, perm=[0, 1])
    elif kind == "Tile":
        b.live_node("Tile", [source, b.const(np.array([1, 1], np.int64))], width)
    elif kind == "Expand":
        b.live_node("Expand", [source, b.const(np.array(b.draw(st.sampled_from([[1, width], [width], [1]])), np.int64))], width)
    else:
        b.live_node("Identity", [source], width)


def _reshape_chain(b: _Builder) -> None:
    source, width = b.pick()
    inner = b.draw(st.sampled_from(["Reshape", "Unsqueeze", "Flatten"]))
    if inner == "Reshape":
        middle = b.node("Reshape", [source, b.const(np.array([0, 1, width], np.int64))])
    elif inner == "Unsqueeze":
        middle = b.node("Unsqueeze", [source, b.const(np.array([b.draw(st.sampled_from([1, 2, -1]))], np.int64))])
    else:
        middle = b.node("Flatten", [b.node("Unsqueeze", [source, b.const(np.array([2], np.int64))])], axis=1)
    b.live_node("Reshape", [middle, b.const(np.array(b.draw(st.sampled_from([[0, width], [-1, width], [0, -1]])), np.int64))], width)


def _broadcast_via_shape(b: _Builder) -> None:
    """Expand or Tile of a [batch, 1] column to a live tensor's width, sized by Shape chains."""
    source, width = b.pick()
    other, other_width = b.pick()
    column = b.node("ReduceSum", [source, b.const(np.array([1], np.int64))], keepdims=1)
    shape = b.node("Shape", [other])
    if b.draw(st.booleans()):
        batch = b.node("Gather", [b.node("Shape", [column]), b.const(np.array([0], np.int64))], axis=0)
        wide = b.node("Gather", [shape, b.const(np.array([1], np.int64))], axis=0)
        b.live_node("Expand", [column, b.node("Concat", [batch, wide], axis=0)], other_width)
    else:
        repeats = b.node("Concat", [b.const(np.array([1], np.int64)), b.node("Slice", [shape, b.const(np.array([1], np.int64)),
                                                                                        b.const(np.array([2], np.int64))])], axis=0)
        b.live_node("Tile", [column, repeats], other_width)


def _id_casts(b: _Builder) -> None:
    if not getattr(b, "has_ids", False):
        return
    narrowed = b.node("Cast", ["ids"], to=TensorProto.INT32)  # int64 -> int32 stays
    widened = b.node("Cast", [narrowed], to=TensorProto.INT64)  # int32 -> int64 read only by Gather goes
    dim = b.draw(st.integers(1, 6))
    b.live_node("Gather", [b.const(b.floats(b.id_rows, dim)), widened], dim, axis=0)


# The ops that make what each pass rewrites (test_pass_properties' OPS make some of it too).
FOCUS = {
    NO_OPS: [_no_op],
    SHAPES: [_broadcast_via_shape],
    TRANSPOSE: [_transposed_fc],
    GEMM: [_matmul_add],
    BN: [_batchnorm_after_fc],
    RESHAPES: [_reshape_chain],
    ID_CASTS: [_id_casts],
}


@st.composite
def canonicalization_graphs(draw, focus=tuple(FOCUS)) -> Case:
    """test_pass_properties' random graphs, with the patterns the passes in `focus` rewrite among the ops."""
    extra_ops = [op for name in focus for op in FOCUS[name]]
    b = _Builder(draw, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    features = draw(st.integers(1, 8))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])]
    b.live.append(("x", features))
    id_rows = None
    if _id_casts in extra_ops or draw(st.booleans()):
        id_rows = b.id_rows = draw(st.integers(2, 10))
        b.has_ids = True
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]))
    ops_to_draw = OPS + extra_ops * max(1, len(OPS) // len(extra_ops))  # about half the draws are the focus ops
    for op in draw(st.lists(st.sampled_from(ops_to_draw), min_size=1, max_size=10)):
        op(b)
    computed = b.live[1:] or [(b.live_node("Identity", ["x"], features), features)]
    outputs = draw(st.lists(st.sampled_from(computed), min_size=1, max_size=2, unique=True))
    graph = helper.make_graph(
        b.nodes, "random", inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]) for name, width in outputs], b.initializers,
    )
    return Case(_model_proto(graph), features, id_rows)


def _check_pipeline(case: Case, pipeline, batch: int, seed: int) -> None:
    onnx.checker.check_model(case.proto, full_check=True)
    ir = Model.from_onnx(case.proto)
    for name in pipeline:
        create_pass(name)(ir)
    if len(pipeline) == 1:
        assert create_pass(pipeline[0])(ir) is False, f"{pipeline[0]} is not idempotent"
    _assert_same_model(case.proto, ir.to_onnx(), [case.feeds(batch, seed)])


PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", CANONICALIZATIONS)
@PROPERTY_SETTINGS
@given(data=st.data(), batch=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_each_pass_keeps_outputs_interface_and_batch(name, data, batch, seed):
    case = data.draw(st.one_of(graphs(), canonicalization_graphs((name,)), canonicalization_graphs((name,))))
    _check_pipeline(case, (name,), batch, seed)


@PROPERTY_SETTINGS
@given(case=st.one_of(graphs(), canonicalization_graphs()), batch=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_all_passes_in_a_row_keep_outputs_interface_and_batch(case, batch, seed):
    _check_pipeline(case, CANONICALIZATIONS, batch, seed)
