"""The CUDA target: artifacts carry machine code for the requested arch, checked with NVIDIA's cuobjdump.

No GPU is needed to build; running needs one (tools/check_cuda.py compares with onnxruntime there).
Tests that need nvcc skip without it, except under CI (env CI set), whose machine has it.
"""

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from conftest import TESTSUITE_MODELS, model_path
from cuda_code import extract_fatbin, objdump
from fc_kernels import one_layer_model
from onnx import TensorProto, helper, numpy_helper
from tvm import te
from tvm.s_tir import dlight

import reccc
from reccc.manifest import read_manifest
from reccc.targets import gpu_schedules
from reccc.targets.cuda_device_code import find_fatbins

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="session")
def cuda_artifacts(tmp_path_factory, nvcc):
    """Artifacts compiled once per session (per worker), by target spec and model."""
    cache: dict[tuple[str, str], Path] = {}

    def get(spec: str, name: str) -> Path:
        if (spec, name) not in cache:
            path = tmp_path_factory.mktemp("cuda") / f"{name}.so"
            reccc.compile(model_path(name), path, target=spec)
            cache[spec, name] = path
        return cache[spec, name]

    return get


def _launch_table(artifact: Path) -> set[str]:
    """The kernels the host code launches by name: the function table TVM stores with the CUDA module,
    where each entry is the name twice (map key and FunctionInfo.name), each as u64 length + bytes."""
    names = set()
    for match in re.finditer(rb"(?s)(.{8})([A-Za-z_][A-Za-z0-9_]*)\1\2", artifact.read_bytes()):
        if struct.unpack("<Q", match.group(1))[0] == len(match.group(2)):
            names.add(match.group(2).decode())
    return names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_artifact_carries_machine_code_for_the_arch(reccc_cli, nvcc, cuobjdump, tmp_path, name, arch):
    artifact = tmp_path / f"{name}.so"
    result = reccc_cli(model_path(name), f"--target=cuda:{arch}", "-o", artifact)
    assert (result.code, result.stdout, result.stderr) == (0, "", "")
    assert read_manifest(artifact).target["arch"] == arch

    fatbin = extract_fatbin(artifact, tmp_path)
    assert re.findall(r"ELF file\s+\d+: \S+\.(sm_\d+)\.cubin", objdump(cuobjdump, fatbin, "-lelf")) == [arch]
    assert "PTX file" not in objdump(cuobjdump, fatbin, "-lptx")
    symbols = objdump(cuobjdump, fatbin, "-symbols")
    assert set(re.findall(r"^arch = (\S+)$", symbols, flags=re.MULTILINE)) == {arch}
    kernels = set(re.findall(r"^FUNC\s+GLOBAL\s+\S+\s+ENTRY\s+(\w+)$", symbols, flags=re.MULTILINE))
    launched = _launch_table(artifact)
    assert launched, f"{name}: no kernel table found in the artifact"
    assert kernels == launched


def test_plain_cuda_is_sm_80_and_json_targets_take_any_arch(cuda_artifacts, reccc_cli, nvcc, tmp_path):
    artifact = cuda_artifacts("cuda", "two_tower")
    assert read_manifest(artifact).target["arch"] == "sm_80"
    assert {e.arch for f in find_fatbins(artifact.read_bytes()) for e in f.entries} == {"sm_80"}

    artifact = tmp_path / "two_tower.so"
    result = reccc_cli(model_path("two_tower"), "--target", json.dumps({"kind": "cuda", "arch": "sm_86"}), "-o", artifact)
    assert result.code == 0, result.stderr
    assert read_manifest(artifact).target["kind"] == "cuda"
    assert {e.arch for f in find_fatbins(artifact.read_bytes()) for e in f.entries} == {"sm_86"}


def test_builds_are_reproducible_and_every_level_carries_device_code(cuda_artifacts, reccc_cli, nvcc, tmp_path):
    again = tmp_path / "again.so"
    assert reccc_cli(model_path("deepfm"), "--target=cuda:sm_90", "-o", again).code == 0
    assert again.read_bytes() == cuda_artifacts("cuda:sm_90", "deepfm").read_bytes()
    for level in ("-O0", "-O1"):
        artifact = tmp_path / f"deepfm{level}.so"
        assert reccc_cli(model_path("deepfm"), "--target=cuda:sm_90", level, "-o", artifact).code == 0
        assert {e.arch for f in find_fatbins(artifact.read_bytes()) for e in f.entries} == {"sm_90"}


def test_a_model_without_kernels_needs_no_device_code(reccc_cli, nvcc, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "passthrough",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = tmp_path / "passthrough.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    result = reccc_cli(model, "--target=cuda", "-o", tmp_path / "passthrough.so")
    assert (result.code, result.stderr) == (0, "")
    assert find_fatbins((tmp_path / "passthrough.so").read_bytes()) == []


@pytest.mark.parametrize(
    "spec, code, message",
    [
        ('{"kind": "cuda", "arch": "ampere"}', 2, "CUDA arch must look like sm_80"),
        ('{"kind": "cuda", "arch": "sm_35"}', 1, "this nvcc cannot compile for sm_35"),
        ("cuda:sm_81", 2, "unknown target 'cuda:sm_81'"),
        ('{"kind": "cuda", "host": "llvm"}', 2, "a CUDA target's host must be a JSON object"),
        ('{"kind": "cuda", "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}', 2, "host must be this machine's CPU"),
    ],
)
def test_bad_arch_fails_in_one_line_and_writes_nothing(reccc_cli, nvcc, tmp_path, spec, code, message):
    output = tmp_path / "model.so"
    result = reccc_cli(model_path("dlrm"), f"--target={spec}", "-o", output)
    assert result.code == code
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not output.exists()


def test_without_nvcc_the_build_fails_in_one_line(reccc_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    output = tmp_path / "model.so"
    result = reccc_cli(model_path("dlrm"), "--target=cuda", "-o", output)
    assert result.code == 1
    assert result.stderr == "reccc: error: the CUDA target needs nvcc (the CUDA toolkit) on PATH to compile device code\n"
    assert not output.exists()


def _has_driver() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_has_driver(), reason="a CUDA driver is installed: TVM loads its CUDA runtime by itself")
def test_an_artifact_without_device_code_is_refused(nvcc, tmp_path):
    """TVM's trap, reproduced: without reccc loading its CUDA runtime, TVM embeds CUDA C source only.
    The check before writing must catch it: exit 1, one line, an existing output left as it was."""
    output = tmp_path / "model.so"
    output.write_bytes(b"previous build")
    script = (
        "import sys\n"
        "from reccc.targets import cuda_toolchain\n"
        "cuda_toolchain.ensure_cuda_runtime = lambda: None\n"
        "from reccc.cli import main\n"
        f"sys.exit(main(['{model_path('two_tower')}', '--target=cuda:sm_90', '-o', '{output}']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "reccc: error: TVM embedded no CUDA device code for sm_90 (no fatbin in the library); nothing written\n"
    assert output.read_bytes() == b"previous build"


@pytest.mark.skipif(tvm.cuda(0).exist, reason="this machine has a CUDA GPU")
def test_loading_needs_a_gpu(cuda_artifacts):
    artifact = cuda_artifacts("cuda:sm_90", "wide_and_deep")
    with pytest.raises(reccc.errors.UsageError, match=rf"^{re.escape(str(artifact))}: built for CUDA \(sm_90\) and needs a CUDA GPU"):
        reccc.load(artifact)


@pytest.mark.skipif(tvm.cuda(0).exist, reason="this machine has a CUDA GPU")
def test_runtime_only_tvm_loads_its_cuda_library_and_says_why_it_cannot(cuda_artifacts):
    # A runtime-only TVM (the deployment without the 259 MB compiler library) does not load
    # libtvm_runtime_cuda.so at import; reccc.load does, and names the reason when that fails.
    artifact = cuda_artifacts("cuda:sm_90", "wide_and_deep")
    script = f"import reccc\ntry:\n    reccc.load({str(artifact)!r})\nexcept reccc.errors.UsageError as error:\n    print(error)\n"
    environment = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=True)
    assert result.stdout.startswith(f"{artifact}: built for CUDA (sm_90) and needs a CUDA GPU with its driver; this process sees none (")
    assert "TVM's CUDA runtime library did not load: " in result.stdout


@pytest.mark.skipif(tvm.cuda(0).exist, reason="this machine has a CUDA GPU")
def test_check_cuda_tool_says_it_needs_a_gpu():
    tool = Path(__file__).resolve().parent.parent / "tools" / "check_cuda.py"
    result = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "check_cuda: this process sees no CUDA GPU (and its driver); run it on a machine with one\n"


def test_importing_the_targets_leaves_tvms_tensor_intrinsics_unloaded():
    """Importing them parses every target's intrinsics (about 15 s); only a build with tensor-core
    layers needs them, not every process that registers the targets."""
    script = "import sys, reccc.targets\nprint(sorted(m for m in sys.modules if m.startswith('tvm.s_tir.tensor_intrin')))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"


def test_check_cuda_builds_each_precision_beside_its_reference_graph(nvcc, tmp_path):
    """tools/check_cuda.py --build-only, which prepares what a GPU machine checks: an artifact per FC
    precision, each lossy one beside the graph --fc-precision rewrote (its reference), in build.json."""
    tool = Path(__file__).resolve().parent.parent / "tools" / "check_cuda.py"
    source = tmp_path / "fc.onnx"
    one_layer_model(source, 40, 24, bias=True)
    folder = tmp_path / "built"
    command = [sys.executable, str(tool), "--build-only", str(folder), "--arch", "sm_90", str(source)]
    result = subprocess.run([*command, "--fc-precision", "fp32,int8"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((folder / "build.json").read_text())
    assert (index["arch"], index["opt_level"]) == ("sm_90", 2)
    assert index["models"] == [
        {"model": "fc.onnx", "precision": "fp32", "reference": "fc.onnx", "artifact": "fc.fp32.so"},
        {"model": "fc.onnx", "precision": "int8", "reference": "fc.int8.onnx", "artifact": "fc.int8.so"},
    ]
    assert [node.op_type for node in onnx.load(folder / "fc.int8.onnx").graph.node].count("MatMulInteger") == 1
    for artifact in ("fc.fp32.so", "fc.int8.so"):
        assert read_manifest(folder / artifact).target["arch"] == "sm_90"
    wrong = subprocess.run([*command, "--fc-precision", "fp16"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "precisions must be among fp32, int8, bf16, not 'fp16'" in wrong.stderr


def test_check_cuda_checks_an_o3_build_against_its_int8_tables(nvcc, tmp_path):
    """-O3 stores large tables as int8 (rows of 64 values; fp16 narrower ones), so a GPU run of its
    artifact is checked against onnxruntime's run of the quantized graph, which --build-only writes
    beside it, not against the fp32 model."""
    tool = Path(__file__).resolve().parent.parent / "tools" / "check_cuda.py"
    table = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.05, (4096, 64)).astype(np.float32), "table")  # 1 MiB
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 64])], [table],
    )
    source = tmp_path / "lookup.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    folder = tmp_path / "built"
    result = subprocess.run([sys.executable, str(tool), "--build-only", str(folder), "--arch", "sm_90", "-O", "3", str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((folder / "build.json").read_text())
    assert index["models"] == [{"model": "lookup.onnx", "precision": "fp32", "reference": "lookup.fp32.onnx", "artifact": "lookup.fp32.so"}]
    stored = {initializer.data_type for initializer in onnx.load(folder / "lookup.fp32.onnx").graph.initializer}
    assert TensorProto.UINT8 in stored and TensorProto.FLOAT in stored


@pytest.mark.skipif(tvm.cuda(0).exist, reason="this machine has a CUDA GPU")
def test_o3_without_a_gpu_says_so_and_keeps_the_o2_schedules(reccc_cli, nvcc, tmp_path):
    output = tmp_path / "model.so"
    result = reccc_cli(model_path("two_tower"), "--target=cuda:sm_90", "-O3", "-v", "-o", output)
    assert result.code == 0
    assert (
        "reccc: -O3: tuning CUDA kernels needs a GPU, and none is reachable (none on this machine, no --tune-rpc); "
        "keeping the -O2 schedules\n" in result.stderr
    )
    assert {e.arch for f in find_fatbins(output.read_bytes()) for e in f.entries} == {"sm_90"}


# The gather rule, on single kernels.


def _scheduled(compute) -> tvm.tirx.PrimFunc:
    module = tvm.IRModule({"main": te.create_prim_func(compute)})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    with target:
        return gpu_schedules.apply_default_schedules(module, target)["main"]


def _loops(function: tvm.tirx.PrimFunc) -> list[tuple[str, int | None]]:
    """(thread tag, "vectorized" or "serial"; static extent or None) of every loop, outermost first."""
    loops = []

    def visit(loop):
        if loop.thread_binding is not None:
            kind = loop.thread_binding.thread_tag
        else:
            kind = "vectorized" if loop.kind == tvm.tirx.ForKind.VECTORIZED else "serial"
        loops.append((kind, int(loop.extent) if isinstance(loop.extent, tvm.tirx.IntImm) else None))

    tvm_ffi.structural_walk(function.body, [(tvm.tirx.For, visit)], order="pre")
    return loops


def _lookup(table_rows: int, width: int):
    batch = tvm.tirx.Var("batch", "int64")
    ids = te.placeholder((batch,), "int64", name="ids")
    table = te.placeholder((table_rows, width), "float32", name="table")
    return batch, ids, table


def test_gather_rule_gives_row_chunks_threads_along_the_row_and_vector_loads():
    batch, ids, table = _lookup(100, 64)
    take = te.compute((batch, 64), lambda i, j: table[ids[i], j], name="take")
    assert _loops(_scheduled([ids, table, take])) == [
        ("blockIdx.x", None), ("threadIdx.y", 256 // 16), ("serial", 1), ("threadIdx.x", 16), ("vectorized", 4)
    ]


def test_gather_rule_keeps_misaligned_concat_columns_scalar():
    """Concat(dense[batch, 13], lookup): a float4 at column 13 of a 13-wide row would be misaligned."""
    batch, ids, table = _lookup(100, 64)
    dense = te.placeholder((batch, 13), "float32", name="dense")
    concat = te.compute(
        (batch, 77), lambda i, j: tvm.tirx.if_then_else(j < 13, dense[i, j], table[ids[i], j - 13]), name="concat"
    )
    loops = _loops(_scheduled([ids, table, dense, concat]))
    assert loops[:2] == [("blockIdx.x", None), ("threadIdx.y", 256 // 32)]
    assert ("threadIdx.x", 32) in loops and "vectorized" not in [kind for kind, _ in loops]


def test_gather_rule_leaves_other_kernels_to_dlight():
    batch, ids, table = _lookup(100, 64)
    scaled = te.compute((100, 64), lambda i, j: table[i, j] * 2.0, name="scaled")
    assert _loops(_scheduled([table, scaled])) == [("blockIdx.x", 100 * 64 // 1024 + 1), ("threadIdx.x", 1024)]


def test_gather_rule_covers_a_dequantizing_gather():
    batch, ids, _ = _lookup(100, 64)
    codes = te.placeholder((100, 64), "int8", name="codes")
    scales = te.placeholder((100,), "float32", name="scales")
    rows = te.compute((batch, 64), lambda i, j: codes[ids[i], j].astype("float32") * scales[ids[i]], name="dequantized")
    assert _loops(_scheduled([ids, codes, scales, rows])) == [
        ("blockIdx.x", None), ("threadIdx.y", 256 // 16), ("serial", 1), ("threadIdx.x", 16), ("vectorized", 4)
    ]


def test_a_dlight_rule_that_fails_on_a_pooled_gather_declines_instead_of_ending_the_build():
    """Sum pooling of lookups (an EmbeddingBag; the id fix-up's Select makes the row read a range):
    dlight's GEMV asserts on it. The kernel must still get a thread binding."""
    batch, _, table = _lookup(300, 1)
    ids = te.placeholder((batch, 5), "int64", name="ids")
    fixed = te.compute((batch, 5), lambda i, f: tvm.tirx.Select(ids[i, f] < 0, ids[i, f] + 300, ids[i, f]), name="fixed")
    rows = te.compute((batch, 5, 1), lambda i, f, j: table[fixed[i, f], j], name="take")
    fields, column = te.reduce_axis((0, 5), "fields"), te.reduce_axis((0, 1), "column")
    pooled = te.compute((batch,), lambda i: te.sum(rows[i, fields, column], axis=[fields, column]), name="pooled")
    module = tvm.IRModule({"main": te.create_prim_func([ids, table, pooled])})
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"}):
        with pytest.raises(AssertionError):
            dlight.ApplyDefaultSchedule(dlight.gpu.GEMV())(module)
    assert _loops(_scheduled([ids, table, pooled]))[:2] == [("blockIdx.x", None), ("threadIdx.x", 1024)]


@pytest.mark.parametrize("reduce", [te.max, te.min, te.sum])
def test_row_reduction_rule_gives_each_row_a_warp_stepping_along_it(reduce):
    """An int8 layer's per-row activation range: a warp per row (8 rows a block), its lanes reading
    consecutive elements, combined across the warp, instead of Fallback's one thread per row."""
    batch = tvm.tirx.Var("batch", "int64")
    x = te.placeholder((batch, 576), "float32", name="x")
    k = te.reduce_axis((0, 576), name="k")
    row = te.compute((batch, 1), lambda i, _: reduce(x[i, k], axis=k), name="row")
    assert _loops(_scheduled([x, row])) == [
        ("blockIdx.x", None), ("threadIdx.y", 8), ("serial", 576 // 32), ("threadIdx.x", 32)
    ]
