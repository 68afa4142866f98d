"""targets/batch_dispatch.py: a kernel with a second schedule for large batches, picked at run time."""

import numpy as np
import onnx
import tvm
from tvm import relax, tirx

from reccc.ir import Model
from reccc.reference import run_reference
from reccc.sample_inputs import random_inputs
from reccc.targets import cpu_schedules, relax_lowering
from reccc.targets.batch_dispatch import dispatch_by_rows
from reccc.targets.x86 import _default_schedules, host_cpu

from conftest import model_path

ROWS = 8


def _with_large_tiles(module: tvm.IRModule, target) -> tvm.IRModule:
    """-O2's schedules, with every matmul kernel's 6x4-tile schedule used from ROWS rows on."""
    large_kernels = {}
    for symbol, function in module.functions.items():
        if isinstance(function, tirx.PrimFunc):
            alternatives = dict(cpu_schedules.matmul_tile_alternatives(function, target))
            if "tile 6x4" in alternatives:
                large_kernels[symbol.name_hint] = alternatives["tile 6x4"]
    module = dispatch_by_rows(_default_schedules(module, target), large_kernels, ROWS)
    _with_large_tiles.dispatched = [symbol.name_hint for symbol in module.functions if symbol.name_hint.endswith("_large")]
    return module


def test_each_batch_runs_the_kernel_of_its_range_and_matches_onnxruntime():
    proto = onnx.load(model_path("dlrm"))
    # Interpreted: the VM reports the kernel calls it makes (compiled, the model function calls them directly).
    executable = relax_lowering.build(proto, host_cpu().tvm_target(), 2, _with_large_tiles, vm_exec="bytecode")
    assert len(_with_large_tiles.dispatched) >= 3  # the dlrm's matmul layers
    vm = relax.VirtualMachine(executable, tvm.cpu())
    called: list[str] = []

    def record(function, symbol, before_run, result, *args) -> int:
        if before_run:  # a kernel whose weight is stored in panels is "<kernel>_prepacked" (targets/weight_panels.py)
            called.append(symbol.removesuffix("_prepacked"))
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    vm.set_instrument(record)
    model = Model.from_onnx(proto)
    names = [value.name for value in proto.graph.input]
    for batch in (1, ROWS - 1, ROWS, ROWS + 1, 64):
        feeds = random_inputs(model, batch, seed=batch)
        called.clear()
        result = vm["main"](*(tvm.runtime.tensor(feeds[name]) for name in names))
        expected = run_reference(proto, feeds)["ctr"]
        np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=f"batch {batch}")
        large_calls = [symbol for symbol in called if symbol in _with_large_tiles.dispatched]
        small_calls = [symbol for symbol in called if f"{symbol}_large" in _with_large_tiles.dispatched]
        assert (large_calls, small_calls) == (([], small_calls) if batch < ROWS else (large_calls, []))
        assert len(large_calls if batch >= ROWS else small_calls) >= 3
