"""reccc's default CPU schedules: they apply to the fused matmul, lookup and concatenation kernels at
-O2 (parallel, vectorized, register-tiled) and leave other kernels alone; numerics are covered by the runtime tests, which run -O2
artifacts at batch sizes that do and do not divide the tile (1, 7, 64, 2048)."""

import onnx
import pytest
import tvm

from reccc.targets import cpu_schedules, lookup_fusion, relax_lowering
from reccc.targets.x86 import host_cpu

from conftest import model_path


def _fused_module(name: str) -> tvm.IRModule:
    target = host_cpu().tvm_target()
    with target:
        return lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(model_path(name))))


@pytest.mark.parametrize("name", ["dlrm", "two_tower"])
def test_every_matmul_kernel_is_scheduled(name):
    target = host_cpu().tvm_target()
    module = cpu_schedules.apply_default_schedules(_fused_module(name), target)
    matmul_kernels = [(symbol.name_hint, f) for symbol, f in module.functions.items() if "matmul" in symbol.name_hint]
    assert matmul_kernels
    for kernel_name, function in matmul_kernels:
        text = function.script()
        assert "T.parallel" in text and "T.vectorized" in text, kernel_name
        assert "matmul_init" in text  # the reduction's initialization was hoisted out of the K loop


def test_vector_width_follows_the_target():
    avx512 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    avx2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    generic = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    assert [cpu_schedules.vector_lanes(t) for t in (avx512, avx2, generic)] == [16, 8, 4]


def test_lookup_and_concatenation_kernels_are_scheduled_and_others_left_alone():
    module = _fused_module("dlrm")
    functions = {s.name_hint: f for s, f in module.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    scheduled = cpu_schedules.apply_default_schedules(module, host_cpu().tvm_target())
    lookups = [name for name in functions if name.startswith(lookup_fusion.GROUP_PREFIX)]
    concatenations = [name for name in functions if name.startswith("concatenate")]
    assert lookups and concatenations
    for name in lookups:
        text = scheduled[name].script()
        assert "T.parallel" in text and "T.vectorized" in text, name
    for name in concatenations:
        assert "pragma_loop_partition_hint" in scheduled[name].script(), name
    for name, function in functions.items():
        if "matmul" not in name and name not in lookups + concatenations:
            assert scheduled[name].same_as(function), name


def test_every_kernel_keeps_its_noalias_pointers():
    """TVM's LLVM codegen gives all functions the `tirx.noalias` setting of the one whose name sorts
    last. With the lookups fused, that is the VM's shape function: without noalias pointers LLVM kept
    the matmul accumulators in memory (2x slower matmuls), so the lowering marks it noalias."""
    target = host_cpu().tvm_target()
    executable = relax_lowering.build(onnx.load(model_path("dlrm")), target, 2, cpu_schedules.apply_default_schedules)
    llvm = next(module for module in executable.mod.imports if module.kind == "llvm")
    entries = [line for line in llvm.inspect_source("ll").splitlines() if line.startswith("define") and "@__tvm_ffi_" in line]
    assert any("shape_func" in line for line in entries) and any("fused_lookup" in line for line in entries)
    assert all("noalias" in line for line in entries)
