"""--fc-precision=int8|bf16 layers on NVIDIA tensor cores (targets/gpu_fc_schedules.py), without a GPU:
the artifacts' machine code (IMMA for int8, HMMA on bf16 operands), one tensor-core kernel per
layer, and what the kernels compute: the selected kernels, built for this CPU instead of the GPU,
against onnxruntime's run of the rewritten graph. Running the CUDA artifacts against onnxruntime
needs a GPU: tools/check_cuda.py --fc-precision does it (README)."""

import re

import hypothesis.strategies as st
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
import tvm
from conftest import model_path
from fc_kernels import (
    assert_agrees_with_graph, assert_selected_int8_layer_is_exact, layer_count, library_and_graph, one_layer_model, selected_for_this_cpu,
)
from hypothesis import HealthCheck, given, settings
from cuda_code import extract_fatbin, objdump

from reccc.reference import run_reference
from reccc.targets import gpu_fc_schedules

# The tensor-core instruction each precision's kernels must use: IMMA on int8 x int8, HMMA on bf16.
INSTRUCTIONS = {"int8": r"IMMA\.\w+\.S8\.S8", "bf16": r"HMMA\.\w+\.F32\.BF16"}
SM_90 = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})


def _sass_by_kernel(cuobjdump_path, library, folder) -> dict[str, str]:
    """Each kernel's SASS in the library's fatbin."""
    sass = objdump(cuobjdump_path, extract_fatbin(library, folder), "-sass")
    kernels = re.split(r"^\s*Function : (\w+)\s*$", sass, flags=re.MULTILINE)
    return dict(zip(kernels[1::2], kernels[2::2]))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_fc_layers_run_on_tensor_cores(reccc_cli, nvcc, cuobjdump, tmp_path, precision, arch):
    source = one_layer_model(tmp_path / "fc.onnx", 100, 40, bias=True)
    # The DLRM for one arch: it is the slowest build of the suite's CUDA tests.
    models = [("fc", source)] + ([("dlrm", model_path("dlrm"))] if arch == "sm_90" else [])
    for name, path in models:
        folder = tmp_path / name
        folder.mkdir()
        library, graph = library_and_graph(reccc_cli, folder, path, f"--target=cuda:{arch}", f"--fc-precision={precision}")
        sass = _sass_by_kernel(cuobjdump, library, folder)
        tensor_core_kernels = [kernel for kernel in sass if f"matmul_tensor_core_{precision}" in kernel]
        assert len(tensor_core_kernels) == layer_count(graph, precision) > 0, (name, sorted(sass))
        for kernel in tensor_core_kernels:
            assert re.search(INSTRUCTIONS[precision], sass[kernel]), (name, kernel)
        if name == "fc":  # int8: the input rows' scale and zero point, then one kernel quantizing, multiplying, scaling
            assert len(sass) == {"int8": 2, "bf16": 1}[precision], sorted(sass)
        # Only those kernels use tensor cores: the rest of the model stays as it was.
        assert not any(re.search(r"\b[IH]MMA\b", code) for kernel, code in sass.items() if kernel not in tensor_core_kernels)


def test_without_bf16_tensor_cores_bf16_layers_stay_on_cuda_cores(reccc_cli, nvcc, cuobjdump, tmp_path):
    """sm_75 (Turing) has int8 tensor cores but no bf16 ones: its bf16 layers keep TVM's own kernels."""
    source = one_layer_model(tmp_path / "fc.onnx", 100, 40, bias=True)
    for precision, expected in (("bf16", False), ("int8", True)):
        folder = tmp_path / precision
        folder.mkdir()
        library, _ = library_and_graph(reccc_cli, folder, source, "--target=cuda:sm_75", f"--fc-precision={precision}")
        sass = _sass_by_kernel(cuobjdump, library, folder)
        assert any(f"matmul_tensor_core_{precision}" in kernel for kernel in sass) == expected
        assert any(re.search(INSTRUCTIONS[precision], code) for code in sass.values()) == expected


def _selected_for_this_cpu(graph: onnx.ModelProto, kernel: str = "matmul_tensor_core_int8_quantizing"):
    """The graph with its FC layers selected as for an sm_90 GPU, run on this CPU (fc_kernels); each
    int8 layer one `kernel` (fc_quantization's: a quantizing one)."""
    return selected_for_this_cpu(graph, lambda module: gpu_fc_schedules.select_tensor_core_matmuls(module, SM_90), kernel)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fan_in=st.integers(1, 80), units=st.integers(8, 100), bias=st.booleans())
def test_int8_tensor_core_kernels_compute_the_rewritten_layer_bit_for_bit(reccc_cli, tmp_path_factory, fan_in, units, bias):
    """The shifted codes (c - 128 as int8) times the transposed weight plus 128 x its unit sums are the
    uint8 x int8 product exactly, whatever the shape: the layer's output equals onnxruntime's."""
    assert_selected_int8_layer_is_exact(reccc_cli, tmp_path_factory.mktemp("int8"), fan_in, units, bias, _selected_for_this_cpu)


def test_tensor_core_kernels_agree_on_the_dlrm(reccc_cli, tmp_path):
    assert reccc_cli(model_path("dlrm"), "--emit=onnx", "--fc-precision=int8", "-o", tmp_path / "m.onnx").code == 0
    graph = onnx.load(tmp_path / "m.onnx")
    assert_agrees_with_graph(graph, _selected_for_this_cpu(graph), batches=(1, 7, 64))


def test_int8_kernel_reads_codes_given_as_they_are(tmp_path):
    """A MatMulInteger of uint8 codes that are no quantization of fc_quantization's (here a model input)
    runs on the tensor cores reading the codes themselves; the int32 sums equal onnxruntime's."""
    rng = np.random.default_rng(4)
    weight = rng.integers(-128, 128, (70, 24)).astype(np.int8)
    graph = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMulInteger", ["x", "W"], ["y"], name="fc")], "codes",
            [helper.make_tensor_value_info("x", TensorProto.UINT8, ["batch", 70])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", 24])],
            [numpy_helper.from_array(weight, "W")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    run = _selected_for_this_cpu(graph, kernel="matmul_tensor_core_int8")
    for batch in (1, 40):
        x = rng.integers(0, 256, (batch, 70)).astype(np.uint8)
        np.testing.assert_array_equal(run({"x": x})["y"], run_reference(graph, {"x": x})["y"])
