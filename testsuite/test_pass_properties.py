"""Property tests: the built-in passes keep a model's outputs, its interface and its symbolic batch dim.

Random ONNX graphs (opset 17) are built to exercise both passes: constant-only subgraphs and transposed
weights to fold, Shape->Gather->Concat->Reshape chains over the symbolic batch, dead branches and unused
initializers. After each pipeline the model must be valid ONNX, keep its inputs and outputs, and agree
with the original in onnxruntime within reccc.reference's fp32 bound.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from reccc.ir import Model
from reccc.pass_manager import create_pass
from reccc.plugins import PASS_GROUP, load_entry_points
from reccc.reference import agreement, run_reference

load_entry_points(PASS_GROUP)  # built-in passes register themselves only when their entry point loads

DCE, FOLD = "dead-code-elimination", "constant-folding"
PIPELINES = [(DCE,), (FOLD,), (FOLD, DCE), (DCE, FOLD)]
OPSET, IR_VERSION = 17, 8
MAX_WIDTH = 32  # Concat joins tensors only while the result stays this wide, so graphs stay small


@dataclass(frozen=True)
class Case:
    proto: onnx.ModelProto
    features: int  # width of the float input "x"
    id_rows: int | None  # rows of the table the int64 input "ids" indexes; None when there is no "ids"

    def feeds(self, batch: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        feeds = {"x": rng.standard_normal((batch, self.features)).astype(np.float32)}
        if self.id_rows is not None:
            feeds["ids"] = rng.integers(0, self.id_rows, size=batch).astype(np.int64)
        return feeds


class _Builder:
    """Collects nodes and constants under fresh names, tracking the live tensors: those computed from the
    graph inputs, all of shape [batch, width]. Only live tensors can become graph outputs."""

    def __init__(self, draw, rng: np.random.Generator):
        self.draw, self.rng = draw, rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.live: list[tuple[str, int]] = []
        self._ids = itertools.count()

    def fresh(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    def const(self, values: np.ndarray) -> str:
        """A constant as an initializer or a Constant node: models in the wild use both."""
        name = self.fresh("c")
        tensor = numpy_helper.from_array(values, name)
        if self.draw(st.booleans()):
            self.initializers.append(tensor)
        else:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name

    def floats(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32)

    def weight(self, fan_in: int, fan_out: int) -> np.ndarray:
        # Scaled by 1/sqrt(fan_in) so activations stay O(1) and the fp32 bound stays meaningful.
        return self.floats(fan_in, fan_out) / np.float32(math.sqrt(fan_in))

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        output = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def live_node(self, op: str, inputs: list[str], width: int, **attrs) -> str:
        output = self.node(op, inputs, **attrs)
        self.live.append((output, width))
        return output

    def pick(self) -> tuple[str, int]:
        return self.draw(st.sampled_from(self.live))


def _unary(b: _Builder) -> None:
    source, width = b.pick()
    b.live_node(b.draw(st.sampled_from(["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Identity"])), [source], width)


def _binary_with_constant(b: _Builder) -> None:
    source, width = b.pick()
    shape = b.draw(st.sampled_from([(width,), (1, width), ()]))  # broadcast both ways and as a scalar
    constant = b.const(b.floats(*shape))
    inputs = [source, constant] if b.draw(st.booleans()) else [constant, source]
    b.live_node(b.draw(st.sampled_from(["Add", "Mul", "Sub"])), inputs, width)


def _binary_with_live(b: _Builder) -> None:
    source, width = b.pick()
    other = b.draw(st.sampled_from([name for name, w in b.live if w == width]))
    op = b.draw(st.sampled_from(["Add", "Mul", "Sub"]))
    if op == "Mul":  # squash one factor so chains of products cannot overflow float32
        other = b.node("Tanh", [other])
    b.live_node(op, [source, other], width)


def _matmul(b: _Builder) -> None:
    source, width = b.pick()
    out = b.draw(st.integers(1, 8))
    weight = b.weight(width, out)
    if b.draw(st.booleans()):  # stored transposed and transposed back at run time: a Transpose to fold
        weight_name = b.node("Transpose", [b.const(np.ascontiguousarray(weight.T))], perm=[1, 0])
    else:
        weight_name = b.const(weight)
    b.live_node("MatMul", [source, weight_name], out)


def _gemm(b: _Builder) -> None:
    source, width = b.pick()
    out = b.draw(st.integers(1, 8))
    weight = b.weight(width, out)
    trans_b = b.draw(st.booleans())
    inputs = [source, b.const(np.ascontiguousarray(weight.T) if trans_b else weight)]
    if b.draw(st.booleans()):
        inputs.append(b.const(b.floats(out)))
    b.live_node("Gemm", inputs, out, transB=int(trans_b))


def _constant_subgraph(b: _Builder) -> None:
    """A value computed from constants alone, feeding a live op: what constant folding replaces."""
    source, width = b.pick()
    kind = b.draw(st.sampled_from(["Add", "Mul", "Cast", "Reshape"]))
    if kind in ("Add", "Mul"):
        value = b.node(kind, [b.const(b.floats(width)), b.const(b.floats(width))])
    elif kind == "Cast":
        dtype = b.draw(st.sampled_from([np.float64, np.int64]))
        value = b.node("Cast", [b.const((b.rng.standard_normal(width) * 3).astype(dtype))], to=TensorProto.FLOAT)
    else:
        value = b.node("Reshape", [b.const(b.floats(width)), b.const(np.array([1, width], np.int64))])
    b.live_node(b.draw(st.sampled_from(["Add", "Mul", "Sub"])), [source, value], width)


def _reshape_via_shape(b: _Builder) -> None:
    """Reshape to a target built by Shape->Gather->Concat: the batch entry must stay computed at run
    time, while the feature entry is a static dim that shape folding can turn into a constant."""
    source, width = b.pick()
    shape = b.node("Shape", [source])
    batch = b.node("Gather", [shape, b.const(np.array([0], np.int64))], axis=0)
    features = b.node("Gather", [shape, b.const(np.array([1], np.int64))], axis=0)
    if width % 2 == 0 and b.draw(st.booleans()):
        # Through [batch, 2, width/2] transposed, so a wrong reshape target shows in the values.
        halves = b.node("Reshape", [source, b.node("Concat", [batch, b.const(np.array([2, -1], np.int64))], axis=0)])
        source = b.node("Transpose", [halves], perm=[0, 2, 1])
    b.live_node("Reshape", [source, b.node("Concat", [batch, features], axis=0)], width)


def _concat(b: _Builder) -> None:
    source, width = b.pick()
    partners = [(name, w) for name, w in b.live if width + w <= MAX_WIDTH]
    if partners:
        other, other_width = b.draw(st.sampled_from(partners))
        b.live_node("Concat", [source, other], width + other_width, axis=1)


def _dead_branch(b: _Builder) -> None:
    """Nodes whose results reach no graph output: a chain off a live tensor and one from constants alone."""
    source, width = b.pick()
    b.node("Mul", [b.node(b.draw(st.sampled_from(["Relu", "Tanh"])), [source]), b.const(b.floats(width))])
    b.node("Neg", [b.node("Add", [b.const(b.floats(width)), b.const(b.floats(width))])])


OPS = [
    _unary,
    _binary_with_constant,
    _binary_with_live,
    _matmul,
    _gemm,
    _constant_subgraph,
    _reshape_via_shape,
    _concat,
    _dead_branch,
]


@st.composite
def graphs(draw) -> Case:
    # Structure is drawn through hypothesis (so it shrinks); the float values come from one seeded rng.
    b = _Builder(draw, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    features = draw(st.integers(1, 8))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])]
    b.live.append(("x", features))
    id_rows = None
    if draw(st.booleans()):
        id_rows, dim = draw(st.integers(2, 10)), draw(st.integers(1, 8))
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]))
        b.live_node("Gather", [b.const(b.floats(id_rows, dim)), "ids"], dim, axis=0)
    for op in draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=10)):
        op(b)
    computed = b.live[1:]  # node outputs only: a graph output that is the input itself is no test of a pass
    if not computed:
        computed = [(b.live_node("Identity", ["x"], features), features)]
    outputs = draw(st.lists(st.sampled_from(computed), min_size=1, max_size=2, unique=True))
    if draw(st.booleans()):
        b.initializers.append(numpy_helper.from_array(b.floats(3), b.fresh("unused")))
    graph = helper.make_graph(
        b.nodes,
        "random",
        inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]) for name, width in outputs],
        b.initializers,
    )
    return Case(_model_proto(graph), features, id_rows)


def _model_proto(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _run_passes(proto: onnx.ModelProto, pipeline: tuple[str, ...]) -> onnx.ModelProto:
    model = Model.from_onnx(proto)
    for name in pipeline:
        create_pass(name)(model)
    return model.to_onnx()


def _interface(values) -> list[tuple]:
    """Names, order, element types and dims (symbolic ones by name) of graph inputs or outputs."""
    return [
        (v.name, v.type.tensor_type.elem_type, tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
        for v in values
    ]


def _assert_same_model(original: onnx.ModelProto, transformed: onnx.ModelProto, all_feeds: list[dict]) -> None:
    onnx.checker.check_model(transformed, full_check=True)
    # Equal dims include dim 0 staying the symbolic "batch" the originals declare.
    assert _interface(transformed.graph.input) == _interface(original.graph.input)
    assert _interface(transformed.graph.output) == _interface(original.graph.output)
    for feeds in all_feeds:
        reference, actual = run_reference(original, feeds), run_reference(transformed, feeds)
        for name, (error, bound) in agreement(reference, actual).items():
            assert error <= bound, f"output '{name}': max abs error {error:.3g} exceeds {bound:.3g}"


def _unused(proto: onnx.ModelProto) -> list[str]:
    """Nodes whose outputs reach no graph output, and initializers that no live node reads."""
    needed = {output.name for output in proto.graph.output}
    dead = []
    for node in reversed(proto.graph.node):  # exported graphs are topologically sorted
        if needed.intersection(node.output):
            needed.update(node.input)
        else:
            dead.append(node.name)
    return dead + [init.name for init in proto.graph.initializer if init.name not in needed]


def _foldable(proto: onnx.ModelProto) -> list[str]:
    """Nodes (other than Constant) whose inputs are all constants."""
    graph = proto.graph
    constants = {init.name for init in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    return [
        node.name
        for node in graph.node
        if node.op_type != "Constant" and all(name in constants for name in node.input if name)
    ]


@pytest.mark.parametrize("pipeline", PIPELINES, ids="+".join)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=graphs(), batch=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_pipeline_keeps_outputs_and_interface(pipeline, case, batch, seed):
    onnx.checker.check_model(case.proto, full_check=True)  # the generator itself must make valid ONNX
    transformed = _run_passes(case.proto, pipeline)
    _assert_same_model(case.proto, transformed, [case.feeds(batch, seed)])
    # Keeping outputs alone would let a pass that does nothing pass; check each pass did its job too.
    if pipeline[-1] == DCE:
        assert not _unused(transformed)
    if FOLD in pipeline:
        assert not _foldable(transformed)


X6 = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])


def _x6_feeds(batch: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch).standard_normal((batch, 6)).astype(np.float32)}


def test_dead_code_elimination_removes_dead_nodes_and_is_idempotent():
    constant = numpy_helper.from_array(np.ones(6, np.float32), "c")
    unused = numpy_helper.from_array(np.ones(3, np.float32), "unused")
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dead_1"]),  # a dead branch off the input
        helper.make_node("Tanh", ["dead_1"], ["dead_2"]),
        helper.make_node("Add", ["c", "c"], ["orphan_1"]),  # a chain from constants whose end nothing reads
        helper.make_node("Neg", ["orphan_1"], ["orphan_2"]),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])
    proto = _model_proto(helper.make_graph(nodes, "dce", [X6], [y], [constant, unused]))
    model = Model.from_onnx(proto)
    dce = create_pass(DCE)

    assert dce(model) is True
    transformed = model.to_onnx()
    assert [node.op_type for node in transformed.graph.node] == ["Relu"]
    assert not transformed.graph.initializer  # "c" was read only by dead nodes, "unused" by none
    assert dce(model) is False
    _assert_same_model(proto, transformed, [_x6_feeds(1), _x6_feeds(5)])


def test_constant_folding_folds_constants_and_static_dims_but_keeps_batch_symbolic():
    weight_t = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32), "w_t")
    index = {i: numpy_helper.from_array(np.array([i], np.int64), f"index_{i}") for i in (0, 1)}
    two = numpy_helper.from_array(np.array([2], np.int64), "two")
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),  # [batch, 4]
        helper.make_node("Shape", ["h"], ["shape"]),
        helper.make_node("Gather", ["shape", "index_0"], ["batch_dim"], axis=0),  # symbolic: must stay
        helper.make_node("Gather", ["shape", "index_1"], ["feature_dim"], axis=0),  # static 4: foldable
        helper.make_node("Div", ["feature_dim", "two"], ["half"]),
        helper.make_node("Concat", ["batch_dim", "two", "half"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["y"]),  # [batch, 2, 2]
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 2])
    proto = _model_proto(helper.make_graph(nodes, "fold", [X6], [y], [weight_t, index[0], index[1], two]))
    model = Model.from_onnx(proto)

    assert create_pass(FOLD)(model) is True
    transformed = model.to_onnx()
    ops = [node.op_type for node in transformed.graph.node]
    assert "Transpose" not in ops and "Div" not in ops
    assert ops.count("Gather") == 1  # only the batch dim's Gather is left
    (reshape,) = [node for node in transformed.graph.node if node.op_type == "Reshape"]
    assert reshape.input[1] not in {init.name for init in transformed.graph.initializer}
    _assert_same_model(proto, transformed, [_x6_feeds(1), _x6_feeds(13)])


def test_differential_check_catches_a_broken_pass(monkeypatch):
    """The checks above must be able to fail: a 'constant-folding' that zeroes MatMul weights is caught."""

    def zero_matmul_weights(self, model: Model) -> bool:
        for node in model.graph.nodes:
            if node.op == "MatMul":
                weight = node.inputs[1]
                node.inputs[1] = gs.Constant(f"{weight.name}_zeroed", np.zeros_like(weight.values))
        return True

    monkeypatch.setattr(type(create_pass(FOLD)), "call", zero_matmul_weights)
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32), "w")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    proto = _model_proto(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [X6], [y], [weight]))

    transformed = _run_passes(proto, (FOLD,))
    with pytest.raises(AssertionError, match="output 'y': max abs error"):
        _assert_same_model(proto, transformed, [_x6_feeds(4)])


def test_the_reference_runs_graphs_onnxruntime_s_optimizers_fail_on():
    """Found by hypothesis: ORT 1.32's graph optimizers reject this valid model (a Gemm output that is a
    graph output and also read by a dead Transpose); the reference executor must still run it."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
        helper.make_node("Gemm", ["xt", "w"], ["y"], transA=1),
        helper.make_node("Transpose", ["y"], ["dead"], perm=[1, 0]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([[2.0]], np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    np.testing.assert_array_equal(run_reference(model, {"x": np.ones((2, 1), np.float32)})["y"], [[2.0], [2.0]])
