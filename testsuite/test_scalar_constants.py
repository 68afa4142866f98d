"""Scalar constants written into their kernels (reccc/targets/scalar_constants.py): no kernel of a
bundled model takes a 0-d constant tensor once operators are fused, one copy of a kernel is made per
set of constants it is called with, and models whose clips and lookups read such constants agree
with onnxruntime at every level that fuses."""

import numpy as np
import onnx
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import reccc
from reccc.index_guard import guard_embedding_indices
from reccc.ir import Model
from reccc.targets import relax_lowering
from reccc.targets.lookup_fusion import fuse_operators
from reccc.targets.scalar_constants import inline_scalar_constants
from reccc.targets.x86 import host_cpu

from conftest import TESTSUITE_MODELS, assert_matches_onnxruntime, model_path


def _kernel_calls(module: tvm.IRModule) -> list[tuple[str, list]]:
    """(kernel, arguments) of each call_tir of the module's Relax functions."""
    calls = []

    def visit(node):
        if isinstance(node, tvm.relax.Call) and isinstance(node.op, tvm.ir.Op) and node.op.name == "relax.call_tir":
            calls.append((node.args[0].name_hint, list(node.args[1].fields)))

    for function in module.functions.values():
        if isinstance(function, tvm.relax.Function):
            tvm.relax.analysis.post_order_visit(function, visit)
    return calls


def _scalar_constant_arguments(module: tvm.IRModule) -> list[str]:
    return [kernel for kernel, arguments in _kernel_calls(module) for argument in arguments
            if isinstance(argument, tvm.ir.GenericConst) and argument.value.numpy().ndim == 0]


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_no_fused_kernel_of_a_bundled_model_takes_a_scalar_constant_tensor(name):
    """With its index guard (a Clip of each lookup's ids between two 0-d constants) and Gather's id
    wrap-around (which adds the table's row count), as reccc compiles it."""
    model = Model.from_onnx(onnx.load(model_path(name)))
    guard_embedding_indices(model, "error")
    imported = relax_lowering.to_relax(model.to_onnx())
    with host_cpu().tvm_target():
        fused = fuse_operators()(imported)
    assert _scalar_constant_arguments(imported)
    assert not _scalar_constant_arguments(fused)


def _clips_model(bounds: list[tuple[int, int]]) -> onnx.ModelProto:
    """The Clip(x_i, low_i, high_i), concatenated: same-shaped int64 clips (float ones compute their
    bounds, NaN-checked, until constant folding), whose kernels TVM's importer shares."""
    initializers, nodes, inputs = [], [], []
    for index, (low, high) in enumerate(bounds):
        initializers += [helper.make_tensor(f"low{index}", TensorProto.INT64, [], [low]),
                         helper.make_tensor(f"high{index}", TensorProto.INT64, [], [high])]
        nodes.append(helper.make_node("Clip", [f"x{index}", f"low{index}", f"high{index}"], [f"c{index}"]))
        inputs.append(helper.make_tensor_value_info(f"x{index}", TensorProto.INT64, ["batch", 4]))
    nodes.append(helper.make_node("Concat", [f"c{index}" for index in range(len(bounds))], ["y"], axis=1))
    output = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", 4 * len(bounds)])
    return helper.make_model(helper.make_graph(nodes, "clips", inputs, [output], initializers), opset_imports=[helper.make_opsetid("", 17)])


def test_a_kernel_gets_one_copy_per_set_of_constants_it_is_called_with():
    imported = relax_lowering.to_relax(_clips_model([(-3, 4), (-3, 5), (2, 4)]))
    inlined = inline_scalar_constants(imported)
    before, after = _kernel_calls(imported), _kernel_calls(inlined)
    assert {kernel for kernel, _ in before} == {"maximum", "minimum"}
    assert not _scalar_constant_arguments(inlined)
    maximum = [kernel for kernel, arguments in after if kernel.startswith("maximum")]
    minimum = [kernel for kernel, arguments in after if kernel.startswith("minimum")]
    assert len(maximum) == len(minimum) == 3
    assert maximum[0] == maximum[1] != maximum[2]  # lows -3, -3, 2
    assert minimum[0] == minimum[2] != minimum[1]  # highs 4, 5, 4
    assert not [symbol for symbol, function in inlined.functions.items()
                if isinstance(function, tvm.tirx.PrimFunc) and any(len(param.shape) == 0 for param in function.params)]


def _lookup_model(rows: int, ids_type: int, low: int, high: int, scale: float) -> onnx.ModelProto:
    """A lookup of ids clipped to [low, high] (the model's own clip: negative ids count from the end),
    its rows clipped to [-scale, scale], beside a dense input clipped the same way."""
    table = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / rows - 2.0
    initializers = [
        helper.make_tensor("table", TensorProto.FLOAT, [rows, 4], table.ravel()),
        helper.make_tensor("low", ids_type, [], [low]), helper.make_tensor("high", ids_type, [], [high]),
        helper.make_tensor("lower", TensorProto.FLOAT, [], [-scale]), helper.make_tensor("upper", TensorProto.FLOAT, [], [scale]),
    ]
    nodes = [
        helper.make_node("Clip", ["ids", "low", "high"], ["clipped"]),
        helper.make_node("Gather", ["table", "clipped"], ["rows"], name="lookup"),
        helper.make_node("Clip", ["rows", "lower", "upper"], ["bounded"]),
        helper.make_node("Clip", ["dense", "lower", "upper"], ["dense_bounded"]),
        helper.make_node("Concat", ["bounded", "dense_bounded"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "lookup",
        [helper.make_tensor_value_info("ids", ids_type, ["batch"]), helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(2, 40), ids_type=st.sampled_from([TensorProto.INT64, TensorProto.INT32]), data=st.data(),
       scale=st.floats(0.125, 3.0, width=32), level=st.sampled_from([1, 2]))
def test_clipped_lookups_agree_with_onnxruntime(tmp_path_factory, rows, ids_type, data, scale, level):
    low = data.draw(st.integers(-rows, rows - 1), label="low")
    high = data.draw(st.integers(low, rows - 1), label="high")
    folder = tmp_path_factory.mktemp("lookup")
    source, library = folder / "m.onnx", folder / "m.so"
    onnx.save(_lookup_model(rows, ids_type, low, high, scale), source)
    reccc.compile(source, library, opt_level=level)
    model = reccc.load(library)
    for batch in (0, 1, 9):
        assert_matches_onnxruntime(source, model.run, batch, seed=batch)
