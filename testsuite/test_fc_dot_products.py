"""int8 and bf16 FC layers on AVX-512's dot-product instructions (targets/cpu_dot_schedules.py), the
path of x86 targets without AMX: vpdpbusd (VNNI) and vdpbf16ps (AVX512-BF16) in the artifact, one
kernel per layer, agreement with onnxruntime's run of the rewritten graph (layers of any shape, with
and without bias, batches inside and past the register tile), bf16 rounding ties, targets without the
instruction keeping the plain product, and -O3.

The targets are Intel CPUs without AMX whose code runs on any CPU with the instruction; running it
needs such a host, and those tests skip elsewhere."""

import re

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import reccc
from reccc.reference import run_reference
from reccc.targets import cpu_amx_schedules, cpu_dot_schedules, x86
from testsuite.conftest import model_path
from testsuite.fc_kernels import (
    assert_agrees_with_graph, assert_layer_agrees, disassembly, kernels, layer_count, library_and_graph, one_layer_model,
)

PRODUCTS = {"int8": cpu_dot_schedules.VNNI, "bf16": cpu_dot_schedules.AVX512_BF16}
TARGETS = {
    "int8": '--target={"kind": "llvm", "mcpu": "icelake-server"}',  # AVX-512 VNNI; no AMX, no AVX-512 BF16
    "bf16": '--target={"kind": "llvm", "mcpu": "cooperlake"}',  # AVX-512 VNNI and BF16; no AMX
}
WITHOUT_INSTRUCTION = {
    "int8": '--target={"kind": "llvm", "mcpu": "skylake-avx512"}',
    "bf16": '--target={"kind": "llvm", "mcpu": "icelake-server"}',
}
INSTRUCTION = {"int8": "vpdpbusd", "bf16": "vdpbf16ps"}
AMX_TARGET = '--target={"kind": "llvm", "mcpu": "sapphirerapids"}'


def _needs_host_with(precision: str) -> None:
    if not cpu_dot_schedules.has_dot_product(x86.host_cpu().tvm_target(), PRODUCTS[precision]):
        pytest.skip(f"this CPU has no {INSTRUCTION[precision]} to run the kernels on")


def _dot_kernels(library, precision: str) -> list[str]:
    return kernels(library, PRODUCTS[precision].block)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_layers_run_on_the_dot_product(reccc_cli, tmp_path, precision):
    """Each int8 / bf16 layer of the DLRM is one kernel whose product is the instruction on zmm
    registers, and the artifact agrees with onnxruntime's run of the rewritten graph (bf16 activations
    rounded as its Casts round them) at batches that are and are not multiples of the row tile."""
    _needs_host_with(precision)
    library, graph = library_and_graph(reccc_cli, tmp_path, model_path("dlrm"), f"--fc-precision={precision}", TARGETS[precision])
    assert len(_dot_kernels(library, precision)) == layer_count(graph, precision) == 4
    assert re.search(rf"\b{INSTRUCTION[precision]}\s+\S*%zmm", disassembly(library))
    assert_agrees_with_graph(graph, reccc.load(library).run, (1, 6, 64, 257))


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("fan_in, units", [(13, 20), (64, 16), (30, 72), (100, 112), (416, 400)])
def test_layer_of_any_shape(reccc_cli, tmp_path, precision, fan_in, units):
    """Inputs not a multiple of the instruction's group (4 int8, 2 bf16) and units not a multiple of 16
    or of the register tile's vectors (3, 4, 5 or 6 of 16) are zero-padded in the kernel, rows to the
    4-row tile. Without a bias the int8 layer equals onnxruntime's run exactly (integer sums, the same
    float operations after); bf16 sums in another order, within the fp32 bound. With a bias and Relu
    fused, both within the fp32 bound."""
    _needs_host_with(precision)
    for bias in (False, True):
        folder = tmp_path / f"bias_{bias}"
        folder.mkdir()
        source = one_layer_model(folder / "fc.onnx", fan_in, units, bias)
        library, graph = library_and_graph(reccc_cli, folder, source, f"--fc-precision={precision}", TARGETS[precision])
        assert len(_dot_kernels(library, precision)) == 1
        # int8: the rows' scale and zero point, then one kernel quantizing, multiplying, dequantizing
        # (bias and Relu fused); bf16: one kernel.
        # TVM's own symbols start "__tvm_ffi__" (the library's data and context, the compiled VM function).
        compute = [k for k in kernels(library, "__tvm_ffi_") if not k.startswith("__tvm_ffi__") and k != "__tvm_ffi_shape_func"]
        assert len(compute) == {"int8": 2, "bf16": 1}[precision], compute
        assert_layer_agrees(reccc.load(library), graph, fan_in, (1, 3, 4, 5, 33), exact=precision == "int8" and not bias)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@settings(max_examples=10, deadline=None)
@given(fan_in=st.integers(1, 80), units=st.integers(8, 140), bias=st.booleans())
def test_random_layers_match_onnxruntime_at_every_batch(tmp_path_factory, precision, fan_in, units, bias):
    """Property: a layer of any fan-in and width (8 units or more: fc_quantization's threshold) agrees
    with onnxruntime's run of the rewritten graph at batches 0 to 5 and 67, inside, at and past the
    4-row tile (int8 without bias bit for bit)."""
    _needs_host_with(precision)
    folder = tmp_path_factory.mktemp("layer")
    source = one_layer_model(folder / "fc.onnx", fan_in, units, bias)
    options = {"target": TARGETS[precision].removeprefix("--target="), "fc_precision": precision}
    reccc.compile(source, folder / "m.so", **options)
    reccc.compile(source, folder / "m.onnx", emit="onnx", **options)
    assert len(_dot_kernels(folder / "m.so", precision)) == 1
    assert_layer_agrees(reccc.load(folder / "m.so"), onnx.load(folder / "m.onnx"), fan_in, (0, 1, 2, 3, 4, 5, 67),
                        exact=precision == "int8" and not bias)


@pytest.mark.parametrize("kernel", ["dot", "amx"])
def test_bf16_rounding_ties_agree(reccc_cli, tmp_path, kernel):
    """The bf16 kernels round their input to nearest even, as onnxruntime's Cast does: inputs exactly
    halfway between two bf16 numbers, times weights of 1 (every sum exact, in any order), give
    onnxruntime's outputs bit for bit, which truncation or rounding half away from zero would not."""
    if kernel == "dot":
        _needs_host_with("bf16")
    elif not cpu_amx_schedules.has_amx(x86.host_cpu().tvm_target(), cpu_amx_schedules.BF16):
        pytest.skip("this CPU (or its kernel) has no AMX-BF16 to run the kernels on")
    fan_in, units = 16, 8
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", fan_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", units])],
        [numpy_helper.from_array(np.ones((fan_in, units), np.float32), "W")],
    )
    source = tmp_path / "ties.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    target = TARGETS["bf16"] if kernel == "dot" else AMX_TARGET
    library, rewritten = library_and_graph(reccc_cli, tmp_path, source, "--fc-precision=bf16", target)
    assert _dot_kernels(library, "bf16") if kernel == "dot" else "tdpbf16ps" in disassembly(library)
    # 1 + (2m + 1) / 256 lies halfway between two bf16 numbers (7 fraction bits); so do their negatives.
    ties = np.array([1 + (2 * m + 1) / 256 for m in range(fan_in // 2)], np.float32)
    x = np.stack([np.concatenate([ties, -ties]), np.concatenate([ties[::-1], ties])])
    expected = run_reference(rewritten, {"x": x})["y"]
    np.testing.assert_array_equal(np.asarray(reccc.load(library).run({"x": x})["y"]), expected)
    truncated = (x.view(np.uint32) & 0xFFFF0000).view(np.float32) @ np.ones((fan_in, units), np.float32)
    assert not np.array_equal(truncated, expected)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_target_without_the_instruction_keeps_the_plain_product(reccc_cli, tmp_path, precision):
    """A target without the instruction (int8: Skylake-SP, no VNNI; bf16: Ice Lake-SP, no AVX-512 BF16)
    builds no dot-product kernel and no such instruction; this CPU runs that code too, and it agrees
    with onnxruntime (int8; the bf16 layers' weights-only numbers: test_fc_precision.py)."""
    library, graph = library_and_graph(reccc_cli, tmp_path, model_path("dlrm"), f"--fc-precision={precision}", WITHOUT_INSTRUCTION[precision])
    assert not _dot_kernels(library, precision) and INSTRUCTION[precision] not in disassembly(library)
    if precision == "int8":
        assert_agrees_with_graph(graph, reccc.load(library).run, (64,))


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_dot_kernels_at_o3(reccc_cli, tmp_path, precision):
    """-O3 builds on -O2's schedules: its layers are the dot-product kernels too (here from an empty
    tuning database, so nothing is tuned)."""
    library = tmp_path / "m.so"
    result = reccc_cli(model_path("dlrm"), "-O3", f"--fc-precision={precision}", "--embedding-quant=none", "--tune-trials", "0",
                       "--tune-db", tmp_path / "db", TARGETS[precision], "-o", library)
    assert result.code == 0, result.stderr
    assert len(_dot_kernels(library, precision)) == 4 and INSTRUCTION[precision] in disassembly(library)


def _scheduled_int8_kernels(reccc_cli, folder, fan_in: int, units: int):
    """The one-layer model's int8 layer kernels as the dot-product rules schedule them for Ice Lake-SP:
    its rows' parameters, and the layer (codes, product, dequantization)."""
    from tvm import tirx

    from reccc.targets import relax_lowering

    source = one_layer_model(folder / "fc.onnx", fan_in, units, bias=True)
    assert reccc_cli(source, "--emit=onnx", "--fc-precision=int8", "-o", folder / "m.onnx").code == 0
    target = x86.llvm_target({"kind": "llvm", "mcpu": "icelake-server"}).tvm_target()
    scheduled = {}

    def schedule(module, target):
        module = cpu_dot_schedules.apply_dot_schedules(module, target)
        scheduled.update((symbol.name_hint, f) for symbol, f in module.functions.items() if isinstance(f, tirx.PrimFunc))
        return module

    relax_lowering.build(onnx.load(folder / "m.onnx"), target, 2, schedule, select_kernels=cpu_dot_schedules.select_dot_matmuls)
    (parameters,) = [f for name, f in scheduled.items() if name.startswith("fc_row_parameters")]
    (layer,) = [f for name, f in scheduled.items() if "quantizing" in name]
    return parameters, layer


def _serial_rows(kernel, parallel_loops: int) -> int:
    """The rows up to which `kernel` runs on the calling thread: its body branches on the batch, no
    parallel loop below, `parallel_loops` above."""
    body = kernel.body.block.body
    condition = str(body.condition)
    assert condition.startswith("batch <= "), condition
    assert "T.parallel" not in body.then_case.script() and body.else_case.script().count("T.parallel") == parallel_loops
    return int(condition.removeprefix("batch <= ").removeprefix("T.int64(").rstrip(")"))


def test_small_dot_product_kernels_run_on_the_calling_thread(reccc_cli, tmp_path):
    """Where its parallel loops run fewer statements than waking the threads is worth
    (cpu_schedules.PARALLEL_MIN_WORK), an int8 layer's kernels run on the calling thread: the rows'
    parameters (rows in parallel above) and the layer (its codes' and its tiles' loops in parallel
    above) branch on the batch; those of a wider layer at fewer rows (the layer: 116 rows of a 64 x
    32 layer, 4 of a 416 x 400 one)."""
    serial_rows = []
    for fan_in, units in ((64, 32), (416, 400)):
        folder = tmp_path / f"{fan_in}x{units}"
        folder.mkdir()
        parameters, layer = _scheduled_int8_kernels(reccc_cli, folder, fan_in, units)
        serial_rows.append((_serial_rows(parameters, 1), _serial_rows(layer, 2)))
    assert serial_rows[0][0] > serial_rows[1][0] >= 1 and serial_rows[0][1] > serial_rows[1][1] >= 1, serial_rows
