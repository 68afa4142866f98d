"""CUDA targets: `cuda` (sm_80), `cuda:sm_XX`, and any TVM `{"kind": "cuda", ...}` target.

The artifact holds the host code (x86-64) and the kernels as a fatbin of machine code (SASS) for
exactly the requested architecture, compiled by nvcc; no PTX, so it runs on GPUs of that compute
capability (an sm_80 build also on later 8.x GPUs). Without a GPU, TVM would silently embed CUDA C
source instead (see cuda_toolchain); reccc loads what TVM needs to emit device code and checks the
written library for it, so a build either carries device code for the arch or fails.
"""

import contextlib
import os
import platform
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import tvm

from reccc.errors import CompileError, UsageError, one_line
from reccc.target import Target, TuningOptions, register_target, register_tvm_kind
from reccc.targets import cuda_toolchain, gpu_fc_schedules, gpu_schedules, relax_lowering
from reccc.targets.cuda_device_code import find_fatbins
from reccc.targets.x86 import HOST_TRIPLE

DEFAULT_ARCH = "sm_80"
# Registered as cuda:ARCH: the architectures nvcc 13 compiles for that data-center and desktop GPUs
# report. Any other arch nvcc knows works through JSON: {"kind": "cuda", "arch": "sm_87"}.
NAMED_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
# The static shared memory a CUDA kernel may use on every supported arch (TVM assumes it, with a
# warning, when the target omits it).
SHARED_MEMORY_PER_BLOCK = 48 * 1024
_ARCH_PATTERN = re.compile(r"sm_(\d+)[af]?")


class CudaTarget(Target):
    def __init__(self, config: dict):
        config = dict(config)
        config.setdefault("arch", DEFAULT_ARCH)
        config.setdefault("max_shared_memory_per_block", SHARED_MEMORY_PER_BLOCK)
        arch = _ARCH_PATTERN.fullmatch(str(config["arch"]))
        if arch is None:
            raise UsageError(f"--target: CUDA arch must look like sm_80 or sm_90a, not '{config['arch']}'")
        self.arch = f"sm_{arch.group(1)}"  # what the fatbin records: the SM number, without suffix
        host = config.pop("host", None) or {"kind": "llvm"}
        if not isinstance(host, dict):
            raise UsageError(f"--target: a CUDA target's host must be a JSON object such as {{\"kind\": \"llvm\"}}, not {host!r}")
        host = dict(host)
        host.setdefault("mtriple", HOST_TRIPLE)
        if host.get("kind") != "llvm" or str(host["mtriple"]).split("-")[0] != platform.machine():
            raise UsageError(f"--target: a CUDA target's host must be this machine's CPU (llvm, {platform.machine()}), not {host}")
        try:
            self._target = tvm.target.Target(config, host=host)
        except Exception as error:
            raise UsageError(f"--target: TVM rejects {config}: {one_line(error)}") from error

    def tvm_target(self) -> tvm.target.Target:
        return self._target

    def compile(self, model: onnx.ModelProto, opt_level: int, tuning: TuningOptions | None = None, vm_exec: str = "compiled",
                constants: Sequence[np.ndarray] = ()) -> tvm.runtime.Executable:
        cuda_toolchain.check_nvcc(self.arch)
        cuda_toolchain.ensure_cuda_runtime()
        if tuning is not None and tuning.progress is not None:
            print(f"reccc: -O3: {_why_not_tuned(tuning)}; keeping the -O2 schedules", file=tuning.progress)
        with _nvcc_compile_mode():
            return relax_lowering.build(
                model, self._target, opt_level, gpu_schedules.apply_default_schedules, gpu_schedules.bind_unscheduled,
                select_kernels=gpu_fc_schedules.select_tensor_core_matmuls, vm_exec=vm_exec, constants=constants,
            )

    def export(self, executable: tvm.runtime.Executable, path: Path, addons: list[Path]) -> None:
        executable.export_library(str(path), addons=[str(a) for a in addons])
        if _has_kernels(executable.mod):  # a model that only moves its inputs to its outputs has none
            self._check_device_code(path)

    def _check_device_code(self, path: Path) -> None:
        """The library must hold machine code for exactly this arch, not CUDA source or PTX alone."""
        fatbins = find_fatbins(path.read_bytes())
        if not fatbins:
            raise CompileError(f"TVM embedded no CUDA device code for {self.arch} (no fatbin in the library); nothing written")
        archs = {entry.arch for fatbin in fatbins for entry in fatbin.entries if entry.kind == "elf"}
        if archs != {self.arch}:
            found = ", ".join(sorted(archs)) or "none"
            raise CompileError(f"the library's CUDA machine code is for {found}, not {self.arch}; nothing written")


def _has_kernels(module: tvm.runtime.Module) -> bool:
    """Whether the build made a CUDA module (with device code or, TVM's trap, only CUDA source)."""
    return module.kind == "cuda" or any(_has_kernels(imported) for imported in module.imports)


def _why_not_tuned(tuning: TuningOptions) -> str:
    """Tuning measures candidate kernels on the GPU itself."""
    if tuning.rpc_tracker is None and not tvm.cuda(0).exist:
        return "tuning CUDA kernels needs a GPU, and none is reachable (none on this machine, no --tune-rpc)"
    return "tuning CUDA kernels is not implemented yet"


@contextlib.contextmanager
def _nvcc_compile_mode() -> Iterator[None]:
    """TVM compiles kernels with nvcc into a fatbin for the current target's arch (its default, NVRTC,
    needs the cuda-bindings package), and without --use_fast_math: outputs must match onnxruntime's."""
    settings = {"TVM_CUDA_COMPILE_MODE": "nvcc", "TVM_CUDA_NVCC_NO_FAST_MATH": "1"}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _named(arch: str):
    return lambda: CudaTarget({"kind": "cuda", "arch": arch})


register_target("cuda", _named(DEFAULT_ARCH))
for _arch in NAMED_ARCHS:
    register_target(f"cuda:{_arch}", _named(_arch))
register_tvm_kind("cuda", CudaTarget)
