"""A matmul kernel's constant weight is stored panel by panel when compiled (targets/weight_panels.py):
the kernel reads [N / panel, K, panel], the model holds that constant, and nothing packs it at run
time; a weight the model takes as a parameter stays as it is."""

import numpy as np
import onnx
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import reccc
from reccc.targets import cpu_schedules, lookup_fusion, relax_lowering, weight_panels
from reccc.targets.x86 import host_cpu

from conftest import assert_matches_onnxruntime

CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _layer(path, inputs: int, units: int, weight_as_input: bool = False):
    """x [batch, inputs] @ W + b, then Relu; W an initializer, or an input of the graph."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((inputs, units)) / np.sqrt(inputs)).astype(np.float32), "w")
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])]
    if weight_as_input:
        graph_inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [inputs, units]))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        "layer", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", units])],
        ([] if weight_as_input else [weight]) + [numpy_helper.from_array(rng.standard_normal(units, dtype=np.float32), "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, onnx.numpy_helper.to_array(weight)


def _scheduled_and_packed(path) -> tuple[tvm.IRModule, tvm.IRModule]:
    target = host_cpu().tvm_target()
    with target:
        module = lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(path)))
        scheduled = cpu_schedules.apply_default_schedules(module, target)
        before = dict(scheduled.functions)
        packed = weight_panels.pack_constant_weights(scheduled)
    assert all(scheduled[symbol].same_as(function) for symbol, function in before.items())  # its input stays as it was
    return scheduled, packed


def _kernel_calls(module: tvm.IRModule) -> list[relax.Call]:
    calls = []
    relax.analysis.post_order_visit(module["main"], lambda node: calls.append(node) if isinstance(node, relax.Call) and node.op.same_as(CALL_TIR) else None)
    return calls


def test_a_constant_weight_is_compiled_into_panels(tmp_path):
    """576 -> 512 (the DLRM's top layer): the register tile's panels are 64 columns, so the kernel
    reads W as [8, 576, 64], the model's constant is W so permuted, and no call packs it; the
    compiled layer agrees with onnxruntime below the tile's rows (the one-row branch reads the same
    panels), at them and past them."""
    path, weight = _layer(tmp_path / "layer.onnx", 576, 512)
    scheduled, packed = _scheduled_and_packed(path)
    (marked,) = [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and weight_panels.WEIGHT_PANEL_ATTR in f.attrs]
    panel = int(marked.attrs[weight_panels.WEIGHT_PANEL_ATTR][1])
    assert panel == 64
    (call,) = _kernel_calls(packed)
    assert call.args[0].name_hint.endswith("_prepacked")
    constants = []
    relax.analysis.post_order_visit(packed["main"], lambda node: constants.append(node.value.numpy()) if isinstance(node, tvm.ir.GenericConst) else None)
    constants = [value for value in constants if value.ndim == 3]
    assert len(constants) == 1
    np.testing.assert_array_equal(constants[0], weight.reshape(576, 8, 64).transpose(1, 0, 2))
    assert not any(symbol.name_hint.endswith("_weight_prepack") for symbol in packed.functions)
    kernel = packed[call.args[0]]
    assert kernel.attrs["tirx.noalias"]  # kept through the split: without it LLVM spills the accumulators
    reccc.compile(path, tmp_path / "layer.so")
    for batch in (1, 3, 4, 67):
        assert_matches_onnxruntime(path, reccc.load(tmp_path / "layer.so").run, batch, seed=batch)


def test_a_weight_the_model_takes_as_input_is_not_packed(tmp_path):
    """Packing a weight that arrives with each call would copy it on each call: the kernel keeps
    reading it as [K, N]."""
    path, _ = _layer(tmp_path / "layer.onnx", 64, 128, weight_as_input=True)
    scheduled, packed = _scheduled_and_packed(path)
    assert [symbol.name_hint for symbol in packed.functions] == [symbol.name_hint for symbol in scheduled.functions]
    (call,) = _kernel_calls(packed)
    assert not call.args[0].name_hint.endswith("_prepacked")


def test_a_weight_padded_to_whole_panels_is_not_marked(tmp_path):
    """40 columns are no whole number of vectors: the rule pads W to its panel on each call, and the
    kernel reads the padded copy, not W."""
    path, _ = _layer(tmp_path / "layer.onnx", 64, 40)
    scheduled, packed = _scheduled_and_packed(path)
    assert not any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs and weight_panels.WEIGHT_PANEL_ATTR in f.attrs for f in scheduled.functions.values())
    assert [symbol.name_hint for symbol in packed.functions] == [symbol.name_hint for symbol in scheduled.functions]
