"""targets/batch_dispatch.py: a kernel with a second schedule for large batches, picked at run time by its rows."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import tvm
from tvm import relax, tirx

from reccc.ir import Model
from reccc.reference import run_reference
from reccc.sample_inputs import random_inputs
from reccc.targets import cpu_schedules, lookup_fusion, relax_lowering, weight_panels
from reccc.targets.batch_dispatch import dispatch_by_rows
from reccc.targets.x86 import _default_schedules, host_cpu

from conftest import model_path

ROWS = 8


def _with_large_tiles(module: tvm.IRModule, target) -> tvm.IRModule:
    """-O2's schedules, with every matmul kernel's 6x4-tile schedule used from ROWS rows on."""
    large_kernels = {}
    lanes = cpu_schedules.vector_lanes(target)
    for symbol, function in module.functions.items():
        if isinstance(function, tirx.PrimFunc) and "matmul" in symbol.name_hint:
            large = cpu_schedules.schedule_function(function, symbol.name_hint, lanes, cpu_schedules.MatmulTile(6, 4))
            if large is not None:
                large_kernels[symbol.name_hint] = large
    _with_large_tiles.large_kernels = large_kernels
    return dispatch_by_rows(_default_schedules(module, target), large_kernels, ROWS)


def test_a_dispatched_kernel_runs_the_large_schedule_from_its_threshold_on():
    """One kernel, branching on its batch: below ROWS its -O2 schedule, from ROWS on the large one.
    The Relax program keeps its calls as they were (no If, no second kernel)."""
    target = host_cpu().tvm_target()
    with target:
        fused = lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(model_path("dlrm"))))
        dispatched = _with_large_tiles(fused, target)
    large_kernels = _with_large_tiles.large_kernels
    assert len(large_kernels) >= 3  # the dlrm's matmul layers
    assert set(symbol.name_hint for symbol in dispatched.functions) == set(symbol.name_hint for symbol in fused.functions)
    assert "R.If" not in dispatched["main"].script() and "if " not in dispatched["main"].script()
    for name, large in large_kernels.items():
        branches = dispatched[name].body.block.body
        assert isinstance(branches, tirx.IfThenElse)
        assert isinstance(branches.condition, tirx.LT) and int(branches.condition.b) == ROWS
        tvm.ir.assert_structural_equal(branches.else_case, large.body.block.body, map_free_vars=True)


def test_each_batch_on_either_side_of_the_threshold_matches_onnxruntime():
    proto = onnx.load(model_path("dlrm"))
    executable = relax_lowering.build(proto, host_cpu().tvm_target(), 2, _with_large_tiles)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    model = Model.from_onnx(proto)
    names = [value.name for value in proto.graph.input]
    for batch in (1, ROWS - 1, ROWS, ROWS + 1, 64):
        feeds = random_inputs(model, batch, seed=batch)
        result = vm["main"](*(tvm.runtime.tensor(feeds[name]) for name in names))
        expected = run_reference(proto, feeds)["ctr"]
        np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=f"batch {batch}")


def test_a_weight_is_stored_in_the_panels_of_the_schedule_that_reads_it_so(tmp_path):
    """A 416->400 layer: its -O2 tile takes 5 vectors of columns (panels of 80), the 6x4 tile pads the
    400 columns to 448 and reads W as it is. Joined, the weight is packed in the 80-column panels, and
    both branches read them right."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((416, 400)) / np.sqrt(416)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 416])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 400])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.standard_normal(400, dtype=np.float32), "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    target = host_cpu().tvm_target()
    with target:
        dispatched = _with_large_tiles(lookup_fusion.fuse_operators()(relax_lowering.to_relax(proto)), target)
    [(name, large)] = _with_large_tiles.large_kernels.items()
    assert "reccc.weight_panel" not in (large.attrs or {})  # 400 columns are no whole number of 64-column panels
    assert [int(value) for value in dispatched[name].attrs["reccc.weight_panel"]] == [1, 80]
    with target:
        assert f"{name}_prepacked" in [symbol.name_hint for symbol in weight_panels.pack_constant_weights(dispatched).functions]
    vm = relax.VirtualMachine(relax_lowering.build(proto, target, 2, _with_large_tiles), tvm.cpu())
    for batch in (1, ROWS - 1, ROWS, 67):
        x = rng.standard_normal((batch, 416), dtype=np.float32)
        expected = run_reference(proto, {"x": x})["y"]
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=f"batch {batch}")
