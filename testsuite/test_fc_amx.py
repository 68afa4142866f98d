"""bf16 and int8 FC layers on AMX (targets/cpu_amx_schedules.py): the tile instructions in the artifact,
agreement with onnxruntime's run of the rewritten graph (any shape, batches inside and past the
kernels' 32-row blocks), the manifest's CPU flags and reccc.load's refusal where they are missing,
targets without AMX keeping their paths, and -O3 leaving the AMX kernels untuned.

Artifacts built for Sapphire Rapids are checked on any x86 host, and so is what the int8 kernels
compute (selected as for Sapphire Rapids, built for this CPU); running AMX code needs an AMX host, and
those tests skip elsewhere."""


import hypothesis.strategies as st
import numpy as np
import onnx
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

import reccc
from reccc import host_cpu
from reccc.errors import UsageError
from reccc.manifest import read_manifest
from reccc.reference import run_reference
from reccc.targets import cpu_amx_schedules, x86
from testsuite.conftest import model_path
from testsuite.fc_kernels import (
    assert_agrees_with_graph, assert_layer_agrees, assert_selected_int8_layer_is_exact, disassembly, kernels, layer_count,
    library_and_graph, one_layer_model, selected_for_this_cpu,
)

AMX_TARGET = '--target={"kind": "llvm", "mcpu": "sapphirerapids"}'
NO_AMX_TARGET = '--target={"kind": "llvm", "mcpu": "icelake-server"}'  # AVX-512 VNNI, no AMX, no AVX-512 BF16
INSTRUCTION = {"bf16": "tdpbf16ps", "int8": "tdpbusd"}
FLAGS = {"bf16": ["amx_bf16", "amx_tile"], "int8": ["amx_int8", "amx_tile"]}


def _host_has_amx(precision: str) -> bool:
    product = cpu_amx_schedules.BF16 if precision == "bf16" else cpu_amx_schedules.INT8
    return cpu_amx_schedules.has_amx(x86.host_cpu().tvm_target(), product)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_amx_target_builds_tile_kernels(reccc_cli, tmp_path, precision):
    """Built for Sapphire Rapids, each bf16 / int8 layer of the DLRM is one AMX kernel: the tile
    instruction in the disassembly (and no VNNI product), the manifest naming the CPU flags."""
    library, graph = library_and_graph(reccc_cli, tmp_path, model_path("dlrm"), f"--fc-precision={precision}", AMX_TARGET)
    assert len(kernels(library, f"matmul_amx_{precision}")) == layer_count(graph, precision) == 4
    code = disassembly(library)
    assert INSTRUCTION[precision] in code and "ldtilecfg" in code and "vpdpbusd" not in code
    assert read_manifest(library).cpu_flags == FLAGS[precision]
    # The kernels round (bf16) or quantize (int8) their fp32 input themselves: no bf16 or uint8 tensor,
    # hence no kernel writing one, is left between kernels.
    from tvm import relax

    from reccc.targets import relax_lowering

    target = x86.llvm_target({"kind": "llvm", "mcpu": "sapphirerapids"}).tvm_target()
    with target:
        module, _ = cpu_amx_schedules.select_amx_matmuls(relax_lowering.to_relax(graph), target)
    dtypes, called = set(), []

    def visit(node):
        if isinstance(node, relax.Var) and isinstance(node.ty, relax.TensorType):
            dtypes.add(str(node.ty.dtype))
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op) and node.op.name == "relax.call_tir":
            called.append(node.args[0].name_hint)

    relax.analysis.post_order_visit(module["main"], visit)
    assert "float32" in dtypes and not dtypes & {"bfloat16", "uint8"}
    # int8: each layer's rows' scale and zero point computed by a kernel of their own, read by the layer's.
    assert sum(name.startswith("fc_row_parameters") for name in called) == (4 if precision == "int8" else 0)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_target_without_amx_keeps_its_paths(reccc_cli, tmp_path, precision):
    """Ice Lake-SP has no AMX: bf16 layers stay fp32 matmuls of widened weights, int8 layers VNNI
    kernels; no tile instruction, and the manifest asks for no CPU flag."""
    library, _ = library_and_graph(reccc_cli, tmp_path, model_path("dlrm"), f"--fc-precision={precision}", NO_AMX_TARGET)
    code = disassembly(library)
    assert not kernels(library, "matmul_amx") and "ldtilecfg" not in code and INSTRUCTION[precision] not in code
    assert ("vpdpbusd" in code) == (precision == "int8")
    assert read_manifest(library).cpu_flags == []


def test_fp32_build_for_amx_needs_no_flags(reccc_cli, tmp_path):
    library, _ = library_and_graph(reccc_cli, tmp_path, model_path("dlrm"), AMX_TARGET)
    assert not kernels(library, "matmul_amx") and read_manifest(library).cpu_flags == []


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("name", ["dlrm", "deepfm", "two_tower"])
def test_amx_artifact_matches_onnxruntime_of_rewritten_graph(reccc_cli, tmp_path, precision, name):
    """On this host's target (AMX where it has AMX): the artifact agrees with onnxruntime's run of the
    graph --fc-precision wrote, bf16 activations rounded as its Casts round them, at batches inside,
    at and past one 32-row block."""
    if not _host_has_amx(precision):
        pytest.skip(f"this CPU (or its kernel) has no AMX-{precision.upper()} to run the kernels on")
    library, graph = library_and_graph(reccc_cli, tmp_path, model_path(name), f"--fc-precision={precision}")
    assert INSTRUCTION[precision] in disassembly(library)
    assert_agrees_with_graph(graph, reccc.load(library).run, (1, 7, 32, 257))


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("fan_in, units", [(13, 20), (64, 16), (30, 72), (100, 40), (416, 32)])
def test_amx_layer_of_any_shape(reccc_cli, tmp_path, precision, fan_in, units):
    """Inputs not a multiple of a tile row (32 bf16, 64 int8) and units not a multiple of 16 or 32 are
    zero-padded in the kernel, rows to its 32-row block. Without a bias the int8 layer equals
    onnxruntime's run exactly (integer sums, the same float operations after); bf16 sums in another
    order, within the fp32 bound. With a bias and Relu fused, both within the fp32 bound."""
    if not _host_has_amx(precision):
        pytest.skip(f"this CPU (or its kernel) has no AMX-{precision.upper()} to run the kernels on")
    for bias in (False, True):
        folder = tmp_path / f"bias_{bias}"
        folder.mkdir()
        library, graph = library_and_graph(reccc_cli, folder, one_layer_model(folder / "fc.onnx", fan_in, units, bias), f"--fc-precision={precision}")
        assert len(kernels(library, f"matmul_amx_{precision}")) == 1
        assert_layer_agrees(reccc.load(library), graph, fan_in, (1, 7, 33, 257), exact=precision == "int8" and not bias)


def _selected_for_sapphire_rapids(graph: onnx.ModelProto, kernel: str = "matmul_amx_int8_quantizing"):
    """The graph with its FC layers selected as for Sapphire Rapids, run on this CPU (fc_kernels): what
    the AMX kernels compute, on any x86 host; each int8 layer one `kernel` (fc_quantization's: a
    quantizing one)."""
    target = x86.llvm_target({"kind": "llvm", "mcpu": "sapphirerapids"}).tvm_target()
    return selected_for_this_cpu(graph, lambda module: cpu_amx_schedules.select_amx_matmuls(module, target)[0], kernel)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fan_in=st.integers(1, 80), units=st.integers(8, 100), bias=st.booleans())
def test_amx_int8_layer_computes_the_rewritten_layer_bit_for_bit(reccc_cli, tmp_path_factory, fan_in, units, bias):
    """An fc_quantization int8 layer becomes a kernel of its rows' scale and zero point and one that
    quantizes, multiplies and dequantizes, with the graph's operations in its order: whatever the
    shape, the layer's output equals onnxruntime's run of the rewritten graph bit for bit."""
    assert_selected_int8_layer_is_exact(reccc_cli, tmp_path_factory.mktemp("int8"), fan_in, units, bias, _selected_for_sapphire_rapids)


def test_amx_int8_kernels_agree_on_the_dlrm(reccc_cli, tmp_path):
    assert reccc_cli(model_path("dlrm"), "--emit=onnx", "--fc-precision=int8", "-o", tmp_path / "m.onnx").code == 0
    graph = onnx.load(tmp_path / "m.onnx")
    assert_agrees_with_graph(graph, _selected_for_sapphire_rapids(graph), batches=(1, 7, 64))


def test_int8_kernel_reads_codes_given_as_they_are(reccc_cli, tmp_path):
    """A MatMulInteger of uint8 codes that are no quantization of fc_quantization's (here a model input)
    becomes an AMX kernel reading the codes themselves; the int32 sums equal onnxruntime's (on an AMX
    host also the artifact's)."""
    rng = np.random.default_rng(4)
    weight = rng.integers(-128, 128, (70, 24)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "W"], ["y"], name="fc")], "codes",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["batch", 70])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", 24])],
        [numpy_helper.from_array(weight, "W")],
    )
    source = tmp_path / "codes.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    run = _selected_for_sapphire_rapids(onnx.load(source), kernel="matmul_amx_int8")
    for batch in (1, 40):
        x = rng.integers(0, 256, (batch, 70)).astype(np.uint8)
        np.testing.assert_array_equal(run({"x": x})["y"], run_reference(onnx.load(source), {"x": x})["y"])
    if not _host_has_amx("int8"):
        return
    library, _ = library_and_graph(reccc_cli, tmp_path, source)
    assert len(kernels(library, "matmul_amx_int8")) == 1
    artifact = reccc.load(library)
    for batch in (1, 40):
        x = rng.integers(0, 256, (batch, 70)).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(artifact.run({"x": x})["y"]), run_reference(onnx.load(source), {"x": x})["y"])


@pytest.fixture
def amx_artifact(reccc_cli, tmp_path):
    library, _ = library_and_graph(reccc_cli, tmp_path, model_path("dlrm"), "--fc-precision=bf16", AMX_TARGET)
    return library


def test_load_refuses_amx_artifact_without_amx(monkeypatch, amx_artifact):
    """On a CPU (or kernel) without AMX's flags, reccc.load refuses the artifact in one line naming it
    and the missing flags, before the library is loaded (no SIGILL)."""
    monkeypatch.setattr(host_cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni", "amx_tile"}))
    with pytest.raises(UsageError) as refused:
        reccc.load(amx_artifact)
    message = str(refused.value)
    assert message.startswith(f"{amx_artifact}: its kernels need the CPU flags amx_bf16, amx_tile") and message.endswith(
        "lacks amx_bf16: build it for this machine (--target=x86)"
    ) and "\n" not in message


def test_load_refuses_amx_artifact_when_the_kernel_refuses_the_state(monkeypatch, amx_artifact):
    monkeypatch.setattr(host_cpu, "cpu_flags", lambda: frozenset({"amx_tile", "amx_bf16"}))
    monkeypatch.setattr(host_cpu, "request_amx", lambda: "the kernel refused the process AMX's tile state (arch_prctl: errno 22)")
    with pytest.raises(UsageError, match="its kernels use AMX, and the kernel refused the process AMX's tile state"):
        reccc.load(amx_artifact)


@pytest.mark.parametrize("cpu, flags, expected", [
    ("rocketlake", {"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, True),
    ("rocketlake", {"avx512f", "avx512_vnni"}, False),
    ("emeraldrapids", {"avx512f", "avx512_vnni", "avx512_bf16"}, False),
    ("emeraldrapids", {"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, True),
])
def test_host_target_takes_amx_from_the_host_flags(monkeypatch, cpu, flags, expected):
    """LLVM names a CPU by its model number, which a virtual machine may report for an older CPU than
    it runs on (one AMX machine of this project reads as "rocketlake"), or for one whose kernel does
    not enable all its features (another reads as "emeraldrapids" and lists no AMX flag): the host
    target has the AMX features exactly where Linux reports them."""
    monkeypatch.setattr(tvm.target.codegen, "llvm_get_system_cpu", lambda: cpu)
    monkeypatch.setattr(host_cpu, "cpu_flags", lambda: frozenset(flags))
    target = x86.host_cpu().tvm_target()
    assert cpu_amx_schedules.has_amx(target, cpu_amx_schedules.BF16) == expected
    assert cpu_amx_schedules.has_amx(target, cpu_amx_schedules.INT8) == expected
    assert bool(tvm.target.codegen.target_has_features("avx512bf16", target)) == ("avx512_bf16" in flags)


def test_o3_does_not_tune_amx_kernels(reccc_cli, tmp_path, monkeypatch):
    """-O3 builds on -O2's schedules and leaves the AMX kernels out of tuning (MetaSchedule's runners
    would need AMX's permission): x86 gives tuning their test, and the candidates it would tune
    hold none."""
    from reccc.targets import tuning as auto_tuning

    given = {}
    real = auto_tuning.tuned_schedules

    def tuned_schedules(*args, **kwargs):
        given.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(auto_tuning, "tuned_schedules", tuned_schedules)
    from tvm import relax

    from reccc.targets import relax_lowering, tuning
    from reccc.targets.lookup_fusion import fuse_operators

    _, graph = library_and_graph(reccc_cli, tmp_path, model_path("dlrm"), "--fc-precision=bf16", AMX_TARGET)
    target = x86.llvm_target({"kind": "llvm", "mcpu": "sapphirerapids"}).tvm_target()
    with target:
        module, _ = cpu_amx_schedules.select_amx_matmuls(relax_lowering.to_relax(graph), target)
        fused = fuse_operators()(relax.transform.LegalizeOps()(module))
    every = [name for kernel in tuning._kernels(fused) for name in kernel.functions]
    kept = [name for kernel in tuning._kernels(fused, keep=cpu_amx_schedules.is_amx_kernel) for name in kernel.functions]
    amx = [name for name in every if "matmul_amx" in name]
    assert len(amx) == 4 and sorted(kept) == sorted(set(every) - set(amx))
    library = tmp_path / "o3.so"
    result = reccc_cli(model_path("dlrm"), "-O3", "--fc-precision=bf16", "--embedding-quant=none", "--tune-trials", "0",
                       "--tune-db", tmp_path / "db", AMX_TARGET, "-o", library)
    assert result.code == 0, result.stderr
    assert len(kernels(library, "matmul_amx_bf16")) == 4 and "tdpbf16ps" in disassembly(library)
    assert given["keep"] is cpu_amx_schedules.is_amx_kernel
