"""Property tests of the import legalization passes (reccc.pipelines.IMPORT_LEGALIZATION), on random
graphs holding the forms that exporters write and TVM's importer cannot read: squeezes as If on a
dim (TorchScript's `x.squeeze(d)`), Squeeze without axes, and Reshape/Expand/Tile/ConstantOfShape
operands computed from Shape through Range, ConstantOfShape, Where and Concat (DIN's attention).

After the stage each model must be valid ONNX with the same interface and outputs (onnxruntime, at
batch >= 2: at batch 1 a Squeeze without axes squeezes the batch too, see explicit-squeeze-axes), and
the forms must be gone: no If whose condition is decided by static dims, no Squeeze without axes, and
every shape operand a constant or constants joined with graph input dims.
"""

import itertools

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import reccc
from reccc.ir import Model
from reccc.pass_manager import create_pass
from reccc.pipelines import IMPORT_LEGALIZATION, PIPELINES
from reccc.plugins import PASS_GROUP, load_entry_points
from reccc.reference import agreement, run_reference

load_entry_points(PASS_GROUP)

OPSET = 17
SHAPE_OPERANDS = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0}


class _Graph:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._ids = itertools.count()

    def const(self, values) -> str:
        name = f"c{next(self._ids)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int = 1, **attrs) -> str:
        names = [f"{op.lower()}{next(self._ids)}" for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=names[0], **attrs))
        return names[0]

    def dim(self, tensor: str, axis: int) -> str:
        """Shape(tensor)[axis] as a 1-element vector, the exporters' way (Shape, Gather, Unsqueeze)."""
        scalar = self.node("Gather", [self.node("Shape", [tensor]), self.const(np.array(axis, np.int64))], axis=0)
        return self.node("Unsqueeze", [scalar, self.const(np.array([0], np.int64))])


def _squeeze_if(g: _Graph, x: str, width: int, draw) -> tuple[str, int]:
    """TorchScript's x.squeeze(2) on [batch, width, 1]: If(Shape[2] == k, Squeeze, Identity), with k
    drawn 1 (the squeeze happens) or 2 (it does not)."""
    k = draw(st.sampled_from([1, 2]))
    widened = g.node("Unsqueeze", [x, g.const(np.array([2], np.int64))])
    condition = g.node("Equal", [g.node("Gather", [g.node("Shape", [widened]), g.const(np.array(2, np.int64))], axis=0),
                                 g.const(np.array(k, np.int64))])
    tag = next(g._ids)  # branch tensors need graph-wide unique names too
    squeezed = helper.make_tensor_value_info(f"squeezed{tag}", TensorProto.FLOAT, None)
    then_graph = helper.make_graph([helper.make_node("Squeeze", [widened, f"axes{tag}"], [f"squeezed{tag}"])], "then", [],
                                   [squeezed], [numpy_helper.from_array(np.array([2], np.int64), f"axes{tag}")])
    same = helper.make_tensor_value_info(f"same{tag}", TensorProto.FLOAT, None)
    else_graph = helper.make_graph([helper.make_node("Identity", [widened], [f"same{tag}"])], "else", [], [same])
    result = g.node("If", [condition], then_branch=then_graph, else_branch=else_graph)
    if k != 1:  # the trailing dim stayed: sum it away, so every case continues at [batch, width]
        result = g.node("ReduceSum", [result, g.const(np.array([2], np.int64))], keepdims=0)
    return g.node("Relu", [result]), width


def _squeeze_without_axes(g: _Graph, x: str, width: int, draw) -> tuple[str, int]:
    axis = draw(st.sampled_from([1, 2]))
    widened = g.node("Unsqueeze", [x, g.const(np.array([axis], np.int64))])
    return g.node("Squeeze", [widened]), width


def _reshape_through_shapes(g: _Graph, x: str, width: int, draw) -> tuple[str, int]:
    """Reshape to [batch, 1, width] and back, the targets computed from Shape ops."""
    up = g.node("Concat", [g.dim(x, 0), g.const(np.array([1], np.int64)), g.dim(x, 1)], axis=0)
    lifted = g.node("Reshape", [x, up])
    down = g.node("Concat", [g.dim(lifted, 0), g.const(np.array([-1], np.int64))], axis=0)
    return g.node("Reshape", [lifted, down]), width


def _din_tile(g: _Graph, x: str, width: int, draw) -> tuple[str, int]:
    """DIN's attention mask: Range(0, Shape[1]) expanded to ConstantOfShape(Shape(...)) and Tiled by
    [batch, 1], compared with x; then Expand of x[:, None, :] to a Where-built [batch, width, width]."""
    length = g.node("Gather", [g.node("Shape", [x]), g.const(np.array(1, np.int64))], axis=0)
    positions = g.node("Range", [g.const(np.array(0, np.int64)), length, g.const(np.array(1, np.int64))])
    rank = g.node("Shape", [g.node("Shape", [g.node("Unsqueeze", [positions, g.const(np.array([0], np.int64))])])])
    ones = g.node("ConstantOfShape", [rank], value=numpy_helper.from_array(np.array([1], np.int64)))  # [1, 1]
    row = g.node("Expand", [positions, ones])
    repeats = g.node("Concat", [g.dim(x, 0), g.const(np.array([1], np.int64))], axis=0)
    tiled = g.node("Cast", [g.node("Tile", [row, repeats])], to=TensorProto.FLOAT)  # [batch, width]
    masked = g.node("Add", [x, g.node("Mul", [tiled, g.const(np.float32(0.1))])])
    target = g.node("Concat", [g.dim(x, 0), g.dim(x, 1), g.dim(x, 1)], axis=0)
    minus_one = g.const(np.array([-1, -1, -1], np.int64))
    shape = g.node("Where", [g.node("Equal", [target, minus_one]), g.node("ConstantOfShape", [g.node("Shape", [target])],
                                                                            value=numpy_helper.from_array(np.array([1], np.int64))), target])
    square = g.node("Expand", [g.node("Unsqueeze", [masked, g.const(np.array([1], np.int64))]), shape])
    return g.node("ReduceSum", [square, g.const(np.array([1], np.int64))], keepdims=0), width


def _keyed_bags(g: _Graph, x: str, width: int, draw) -> tuple[str, int]:
    """torchrec's KeyedJaggedTensor of one id per bag and key, as torch's dynamo exporter writes it (the
    key's ids are x's columns): lengths = full((keys * batch,), 1) from a Reshape of the 0-d keys *
    batch; per-key sizes = lengths.view(keys, -1).sum(1), unbound into Slice/Squeeze/Reshape and
    concatenated into the sizes of a Split; offsets = cumsum(lengths) with a 0 in front, and each bag
    pooled by a membership matrix between offsets[:-1] and offsets[1:] (the end INT64_MAX) over
    Range(0, ids). Each key's pooled bags are its column again."""
    vector = lambda values: g.const(np.array(values, np.int64))  # noqa: E731
    batch = g.node("Squeeze", [g.node("Shape", [x], start=0, end=1), vector([0])])
    count = g.node("Reshape", [g.node("Mul", [g.const(np.array(width, np.int64)), batch]), vector([-1])])
    per_key = g.node("Reshape", [g.node("Expand", [g.const(np.array(1, np.int64)), count]), vector([width, -1])])
    totals = g.node("ReduceSum", [per_key, vector([1])], keepdims=0)
    sizes = g.node("Concat", [g.node("Reshape", [g.node("Squeeze", [g.node("Slice", [totals, vector([k]), vector([k + 1]), vector([0])]),
                                                                    vector([0])]), vector([-1])]) for k in range(width)], axis=0)
    flat = g.node("Reshape", [g.node("Transpose", [x], perm=[1, 0]), vector([-1])])
    columns = [f"column{next(g._ids)}" for _ in range(width)]
    g.nodes.append(helper.make_node("Split", [flat, sizes], columns, name=columns[0], axis=0))
    zeros = g.node("ConstantOfShape", [vector([width, 1])], value=numpy_helper.from_array(np.array([0], np.int64)))
    offsets = g.node("Concat", [zeros, g.node("CumSum", [per_key, g.const(np.array(-1, np.int64))])], axis=-1)
    pooled = []
    for k, column in enumerate(columns):
        key_offsets = g.node("Squeeze", [g.node("Slice", [offsets, vector([k]), vector([k + 1]), vector([0])]), vector([0])])
        starts = g.node("Slice", [key_offsets, vector([0]), vector([-1])])
        ends = g.node("Slice", [key_offsets, vector([1]), vector([np.iinfo(np.int64).max])])
        ids = g.node("Squeeze", [g.node("Shape", [column], start=0, end=1), vector([0])])
        positions = g.node("Unsqueeze", [g.node("Range", [g.const(np.array(0, np.int64)), ids, g.const(np.array(1, np.int64))]), vector([0])])
        member = g.node("And", [g.node("GreaterOrEqual", [positions, g.node("Unsqueeze", [starts, vector([1])])]),
                                g.node("Less", [positions, g.node("Unsqueeze", [ends, vector([1])])])])
        pooled.append(g.node("MatMul", [g.node("Cast", [member], to=TensorProto.FLOAT), g.node("Unsqueeze", [column, vector([1])])]))
    return g.node("Concat", pooled, axis=1), width


FORMS = [_squeeze_if, _squeeze_without_axes, _reshape_through_shapes, _din_tile, _keyed_bags]


@st.composite
def graphs(draw) -> tuple[onnx.ModelProto, int]:
    g = _Graph(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    width = draw(st.integers(2, 6))
    x, current = "x", width
    for form in draw(st.lists(st.sampled_from(FORMS), min_size=1, max_size=4)):
        x, current = form(g, x, current, draw)
        x = g.node("MatMul", [x, g.const((g.rng.standard_normal((current, width)) / np.sqrt(current)).astype(np.float32))])
    graph = helper.make_graph(g.nodes, "legalize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])], g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8), width


def legalized(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = Model.from_onnx(proto)
    for name in IMPORT_LEGALIZATION:
        create_pass(name)(model)
    return model.to_onnx()


def _reads_only_input_dims(graph: onnx.GraphProto, name: str) -> bool:
    """A constant, or Concat of constants and integer arithmetic on Shape(graph input) reads (which TVM
    reads as a shape expression)."""
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(name)
    if node is not None and node.op_type == "Concat":
        return all(_input_dim_arithmetic(graph, producers, part) for part in node.input)
    return _input_dim_arithmetic(graph, producers, name)


def _input_dim_arithmetic(graph: onnx.GraphProto, producers: dict, name: str, scalar: bool = False) -> bool:
    """Constants and Shape reads, through Gather/Squeeze/Unsqueeze and, on scalars (`scalar`: below a
    Mul or Add, which TVM keeps as PrimValues), of any tensor's dims."""
    constants = {init.name for init in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    if name in constants:
        return True
    node = producers.get(name)
    if node is None:
        return False
    if node.op_type == "Shape":
        return scalar or node.input[0] in {value.name for value in graph.input}
    return node.op_type in {"Gather", "Squeeze", "Unsqueeze", "Mul", "Add"} and all(
        _input_dim_arithmetic(graph, producers, part, scalar or node.op_type in {"Mul", "Add"}) for part in node.input)


def _assert_legal(proto: onnx.ModelProto) -> None:
    graph = proto.graph
    for node in graph.node:
        assert node.op_type != "If", "an If on a static dim stayed"
        assert not (node.op_type == "Squeeze" and len(node.input) == 1), "a Squeeze without axes stayed"
        if node.op_type == "Split":
            assert len(node.input) < 2 or node.input[1] in {i.name for i in graph.initializer}, f"{node.name}: sizes computed at run time"
        if node.op_type == "Range":
            assert node.input[1] in {i.name for i in graph.initializer}, f"{node.name}: a Range to a run-time end"
        if node.op_type in SHAPE_OPERANDS:
            operand = node.input[SHAPE_OPERANDS[node.op_type]]
            if node.op_type == "Tile":
                assert operand in {i.name for i in graph.initializer}, f"{node.name}: Tile repeats not constant"
            else:
                assert _reads_only_input_dims(graph, operand), f"{node.name}: {operand} is computed at run time"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=graphs(), batch=st.integers(2, 9), seed=st.integers(0, 2**32 - 1))
def test_import_legalization_keeps_outputs_and_removes_the_forms(case, batch, seed):
    proto, width = case
    onnx.checker.check_model(proto, full_check=True)
    transformed = legalized(proto)
    onnx.checker.check_model(transformed, full_check=True)
    assert [i.name for i in transformed.graph.input] == ["x"]
    assert transformed.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    feeds = {"x": np.random.default_rng(seed).standard_normal((batch, width)).astype(np.float32)}
    for name, (error, bound) in agreement(run_reference(proto, feeds), run_reference(transformed, feeds)).items():
        assert error <= bound, f"output '{name}': error {error:.3g} > {bound:.3g}"
    _assert_legal(transformed)
    assert legalized(transformed).SerializeToString() == transformed.SerializeToString(), "not idempotent"


def test_every_level_starts_with_import_legalization():
    for level, passes in PIPELINES.items():
        assert passes[: len(IMPORT_LEGALIZATION)] == IMPORT_LEGALIZATION, f"-O{level}"


def test_legalized_forms_compile_at_O0_with_a_symbolic_batch(tmp_path, reccc_cli):
    """One graph with every form: TVM's importer rejects it as exported; after the stage -O0 builds it."""
    g = _Graph(np.random.default_rng(0))
    draws = iter([1, 1, 2])  # the If's dim is 1 (then branch), squeeze axis 1

    def draw(_strategy):
        return next(draws)

    x, width = "x", 4
    for form in FORMS:
        x, width = form(g, x, width, draw if form is not _din_tile else None)
    graph = helper.make_graph(g.nodes, "all", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 4])], g.initializers)
    path = tmp_path / "forms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8), path)
    result = reccc_cli(path, "-O0", "-o", tmp_path / "forms.so")
    assert result.code == 0, result.stderr
    model = reccc.load(tmp_path / "forms.so")
    for batch in (2, 7):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)}
        for name, (error, bound) in agreement(run_reference(onnx.load(path), feeds), model.run(feeds)).items():
            assert error <= bound, f"batch {batch}: '{name}' error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", IMPORT_LEGALIZATION)
def test_legalization_passes_leave_plain_graphs_alone(name):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])]),
                              opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    assert create_pass(name)(Model.from_onnx(proto)) is False


def test_a_split_into_sizes_of_the_traced_batch_names_the_real_batch(tmp_path, reccc_cli):
    """Reshape(x[batch, 3], [-1]) split into [6, 6]: only batch 4 works."""
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["f"]), helper.make_node("Split", ["f", "sizes"], ["a", "b"], axis=0),
             helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])],
                              [numpy_helper.from_array(np.array([-1], np.int64), "flat"),
                               numpy_helper.from_array(np.array([6, 6], np.int64), "sizes")])
    path = tmp_path / "baked.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8), path)
    result = reccc_cli(path, "-O0", "-o", tmp_path / "baked.so")
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert "dim 'batch' is declared symbolic but is really 4" in result.stderr and "--input-shape x=4,3" in result.stderr
    fixed = reccc_cli(path, "-O0", "--input-shape", "x=4,3", "-o", tmp_path / "baked.so")
    assert fixed.code == 0, fixed.stderr


def test_sizes_read_from_a_split_of_unproven_sizes_are_not_taken_as_equal():
    """x [batch, 3] flattened is split into [batch, 2 * batch] by sizes computed from Expand and
    ReduceSum (which onnxruntime's symbolic inference does not follow, so it takes the parts to be
    3 * batch / 2 each), and split again by the parts' Shapes. legalize-batch-arithmetic must not
    prove those equal from the guess: that second Split would become an even one, with wrong values."""
    vector = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["batch"], start=0, end=1),
        helper.make_node("Mul", ["batch", "two"], ["twice"]),
        helper.make_node("Expand", ["one", "batch"], ["ones_a"]),
        helper.make_node("Expand", ["one", "twice"], ["ones_b"]),
        helper.make_node("ReduceSum", ["ones_a"], ["size_a"], keepdims=1),
        helper.make_node("ReduceSum", ["ones_b"], ["size_b"], keepdims=1),
        helper.make_node("Concat", ["size_a", "size_b"], ["sizes"], axis=0),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("Split", ["flat", "sizes"], ["a", "b"], name="unproven", axis=0),
        helper.make_node("Shape", ["a"], ["length_a"]),
        helper.make_node("Shape", ["b"], ["length_b"]),
        helper.make_node("Concat", ["length_a", "length_b"], ["sizes_again"], axis=0),
        helper.make_node("Split", ["flat", "sizes_again"], ["c", "d"], name="again", axis=0),
        helper.make_node("Mul", ["c", "scale"], ["scaled"]),
        helper.make_node("Concat", ["scaled", "d"], ["joined"], axis=0),
        helper.make_node("Reshape", ["joined", "rows"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "splits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                              [vector("two", 2), vector("one", 1), vector("flat_shape", [-1]), vector("rows", [-1, 3]),
                               numpy_helper.from_array(np.array(2.0, np.float32), "scale")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    model = Model.from_onnx(proto)
    create_pass("legalize-batch-arithmetic")(model)
    transformed = model.to_onnx()
    for batch in (2, 4):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 3)).astype(np.float32)}
        for name, (error, bound) in agreement(run_reference(proto, feeds), run_reference(transformed, feeds)).items():
            assert error <= bound, f"batch {batch}: '{name}' error {error:.3g} > {bound:.3g}"
    splits = [list(n.input) for n in transformed.graph.node if n.op_type == "Split"]
    assert ["flat", "sizes_again"] in splits, f"the second Split's sizes were taken as equal: {splits}"
