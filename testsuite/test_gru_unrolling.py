"""legalize-gru (passes/gru_unrolling.py): GRU nodes built with onnx.helper over every supported attribute
combination (directions, linear_before_reset, bias, initial state, full sequence lengths, which outputs
are read) give onnxruntime the same outputs after the rewrite as the GRU node before it, with a
symbolic batch; TVM compiles the rewrite and matches onnxruntime; unsupported GRUs stop the build in one
line naming the node and what it has. The corpus (testsuite/corpus/torch) holds torch's exports of GRU
recommenders."""

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import reccc
from reccc.errors import CompileError
from reccc.ir import Model
from reccc.pass_manager import create_pass
from reccc.plugins import PASS_GROUP, load_entry_points
from reccc.reference import agreement, run_reference

load_entry_points(PASS_GROUP)

OPSET = 17


def gru_model(steps: int, inputs: int, hidden: int, direction: str = "forward", linear_before_reset: int = 0,
              bias: bool = True, initial: str = "absent", lengths: str = "absent", outputs: str = "both",
              explicit_activations: bool = False, seed: int = 0, **unsupported) -> onnx.ModelProto:
    """One GRU over X [steps, batch, inputs]. `initial`: absent, "input" (a graph input h0) or "zeros"
    (ConstantOfShape of [directions, batch, hidden], as the exporters build it); `lengths`: absent or
    "full" (the step count expanded to the batch); `outputs`: "both", "Y" or "Y_h". `unsupported`
    overrides attributes or inputs (see test_unsupported_gru_is_one_line_naming_the_node)."""
    rng = np.random.default_rng(seed)
    directions = 2 if direction == "bidirectional" else 1
    scale = 1 / np.sqrt(hidden)
    initializers = [numpy_helper.from_array(rng.uniform(-scale, scale, (directions, 3 * hidden, inputs)).astype(np.float32), "W"),
                    numpy_helper.from_array(rng.uniform(-scale, scale, (directions, 3 * hidden, hidden)).astype(np.float32), "R")]
    if bias:
        initializers.append(numpy_helper.from_array(rng.uniform(-scale, scale, (directions, 6 * hidden)).astype(np.float32), "B"))
    sequence = unsupported.pop("steps_dim", steps)
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [sequence, "batch", inputs])]
    nodes = []
    batch = ["batch_dim"]
    nodes.append(helper.make_node("Shape", ["X"], batch, start=1, end=2))
    if lengths == "full":
        initializers.append(numpy_helper.from_array(np.array(steps, np.int32), "steps"))
        nodes.append(helper.make_node("Expand", ["steps", "batch_dim"], ["lengths"]))
    elif lengths == "input":
        graph_inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]))
    if initial == "input":
        graph_inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [directions, "batch", hidden]))
    elif initial == "zeros":
        initializers += [numpy_helper.from_array(np.array([directions], np.int64), "dirs"),
                         numpy_helper.from_array(np.array([hidden], np.int64), "width")]
        nodes += [helper.make_node("Concat", ["dirs", "batch_dim", "width"], ["h0_shape"], axis=0),
                  helper.make_node("ConstantOfShape", ["h0_shape"], ["h0"],
                                   value=numpy_helper.from_array(np.zeros(1, np.float32)))]
    if unsupported.pop("weights_input", False):
        graph_inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [directions, 3 * hidden, inputs]))
        initializers = [t for t in initializers if t.name != "W"]
    attrs = {"hidden_size": hidden, "direction": direction, "linear_before_reset": linear_before_reset}
    if explicit_activations:
        attrs["activations"] = ["Sigmoid", "Tanh"] * directions
    attrs.update(unsupported)
    gru_inputs = ["X", "W", "R", "B" if bias else "", "lengths" if lengths != "absent" else "", "h0" if initial != "absent" else ""]
    while gru_inputs[-1] == "":
        gru_inputs.pop()
    nodes.append(helper.make_node("GRU", gru_inputs, ["Y" if outputs != "Y_h" else "", "Y_h" if outputs != "Y" else ""],
                                  name="the_gru", **attrs))
    graph_outputs = []
    if outputs != "Y_h":
        graph_outputs.append(helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 4))  # layout 1 orders the dims otherwise
    if outputs != "Y":
        graph_outputs.append(helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [None] * 3))
    graph = helper.make_graph(nodes, "gru", graph_inputs, graph_outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def feeds_for(proto: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in proto.graph.input:
        dims = [batch if dim.dim_param else dim.dim_value for dim in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def legalized(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    model = Model.from_onnx(proto)
    changed = create_pass("legalize-gru")(model)
    return model.to_onnx(), changed


@st.composite
def supported_grus(draw) -> onnx.ModelProto:
    return gru_model(steps=draw(st.integers(1, 4)), inputs=draw(st.integers(1, 5)), hidden=draw(st.integers(1, 5)),
                     direction=draw(st.sampled_from(["forward", "reverse", "bidirectional"])),
                     linear_before_reset=draw(st.sampled_from([0, 1])), bias=draw(st.booleans()),
                     initial=draw(st.sampled_from(["absent", "input", "zeros"])),
                     lengths=draw(st.sampled_from(["absent", "full"])),
                     outputs=draw(st.sampled_from(["both", "Y", "Y_h"])),
                     explicit_activations=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=supported_grus(), batch=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_unrolled_gru_matches_onnxruntime(proto, batch, seed):
    onnx.checker.check_model(proto, full_check=True)
    transformed, changed = legalized(proto)
    assert changed
    onnx.checker.check_model(transformed, full_check=True)
    assert not [n for n in transformed.graph.node if n.op_type == "GRU"]
    assert [i.name for i in transformed.graph.input] == [i.name for i in proto.graph.input]
    feeds = feeds_for(proto, batch, seed)
    expected, actual = run_reference(proto, feeds), run_reference(transformed, feeds)
    assert list(expected) == list(actual)
    for name, (error, bound) in agreement(expected, actual).items():
        assert error <= bound, f"output '{name}': error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("config", [
    dict(direction="bidirectional", linear_before_reset=0, initial="input"),
    dict(direction="reverse", linear_before_reset=1, initial="zeros", lengths="full", outputs="Y"),
], ids=["bidirectional-lbr0-h0", "reverse-lbr1-zeros-Y"])
def test_unrolled_gru_compiles_and_matches_onnxruntime(tmp_path, config):
    """TVM compiles the rewrite with the batch symbolic (the corpus covers torch's forward GRUs)."""
    proto = gru_model(steps=3, inputs=4, hidden=5, seed=3, **config)
    onnx.save(proto, tmp_path / "gru.onnx")
    reccc.compile(tmp_path / "gru.onnx", tmp_path / "gru.so", opt_level=2)
    model = reccc.load(tmp_path / "gru.so")
    for batch in (1, 7):
        feeds = feeds_for(proto, batch, batch)
        for name, (error, bound) in agreement(run_reference(proto, feeds), model.run(feeds)).items():
            assert error <= bound, f"batch {batch}: '{name}' error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("overrides, why", [
    (dict(layout=1), "layout 1 (batch first)"),
    (dict(clip=5.0), "clip is set"),
    (dict(activations=["Relu", "Tanh"]), "activations ['relu', 'tanh']"),
    (dict(lengths="input"), "sequence_lens may be shorter than the sequence"),
    (dict(steps_dim="steps"), "the sequence length (X's first dim) is steps, not static"),
    (dict(weights_input=True), "W is computed at run time"),
    (dict(hidden_size=3), "W has the shape [1, 6, 3], not [1, 9, 3]"),
], ids=["layout", "clip", "activations", "lengths", "symbolic-steps", "weights", "hidden-size"])
def test_unsupported_gru_is_one_line_naming_the_node(overrides, why):
    proto = gru_model(steps=2, inputs=3, hidden=2, **overrides)
    with pytest.raises(CompileError) as raised:
        legalized(proto)
    message = str(raised.value)
    assert message.startswith(f"GRU node 'the_gru': {why}; ") and "\n" not in message


def test_unsupported_gru_fails_the_build_in_one_line(tmp_path, reccc_cli):
    onnx.save(gru_model(steps=2, inputs=3, hidden=2, clip=5.0), tmp_path / "gru.onnx")
    result = reccc_cli(tmp_path / "gru.onnx", "-O0", "-o", tmp_path / "gru.so")
    assert result.code == 1 and result.stderr.count("\n") == 1
    assert "GRU node 'the_gru': clip is set" in result.stderr and not (tmp_path / "gru.so").exists()


def test_graphs_without_gru_are_left_alone():
    proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])]),
                              opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    assert create_pass("legalize-gru")(Model.from_onnx(proto)) is False
