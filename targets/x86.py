"""CPU targets: `x86` (this host's CPU) and any TVM `{"kind": "llvm", ...}` target for this host's ISA;
an "llvm" target whose triple names another ISA goes to the target registered for that arch (aarch64:
reccc.targets.arm)."""

import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import tvm

from reccc import host_cpu as host_cpu_flags
from reccc.errors import UsageError, one_line
from reccc.target import Target, TuningOptions, register_target, register_tvm_kind
from reccc.targets import cpu_amx_schedules, cpu_dot_schedules, cpu_schedules, index_flags, relax_lowering, tuning as auto_tuning

# The triple TVM's LLVM defaults to is x86_64-conda-linux-gnu, which builds for a generic CPU;
# reccc always names the host's.
HOST_TRIPLE = "x86_64-linux-gnu"
# The features reccc's kernels are chosen by, as Linux's /proc/cpuinfo and LLVM name them. LLVM names
# the host's CPU by its model number, which a virtual machine may report for an older CPU than the
# one it runs on (one machine of this project read as "rocketlake", a CPU without AMX or AVX-512 BF16,
# for one with both), or for a CPU whose features its kernel does not enable (another read as
# "emeraldrapids" without AMX in /proc/cpuinfo: its artifacts' AMX kernels could not run there). So a
# target for this host has exactly those of them that Linux reports.
HOST_FEATURES = {"avx512_vnni": "avx512vnni", "avx512_bf16": "avx512bf16", "amx_tile": "amx-tile",
                 "amx_bf16": "amx-bf16", "amx_int8": "amx-int8"}


class CpuTarget(Target):
    def __init__(self, config: dict):
        config = dict(config)
        config.setdefault("mtriple", HOST_TRIPLE)
        native = config.get("mcpu") == "native"
        if native:
            config["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        self.check_arch(_arch(config["mtriple"]))
        try:
            self._target = tvm.target.Target(config)
            if native and _arch(config["mtriple"]) == "x86_64":
                self._target = _with_host_features(config, self._target)
        except Exception as error:
            raise UsageError(f"--target: TVM rejects {config}: {one_line(error)}") from error
        self._cpu_flags: list[str] = []

    def check_arch(self, arch: str) -> None:
        """UsageError unless this target can build for `arch` (the triple's first part)."""
        if arch != platform.machine():
            raise UsageError(f"--target: cross-compiling for {arch} from a {platform.machine()} host is not supported")

    def tvm_target(self) -> tvm.target.Target:
        return self._target

    def compile(self, model: onnx.ModelProto, opt_level: int, tuning: TuningOptions | None = None, vm_exec: str = "compiled",
                constants: Sequence[np.ndarray] = ()) -> tvm.runtime.Executable:
        schedule = _default_schedules
        if tuning is not None:
            schedule = auto_tuning.tuned_schedules(
                tuning, default=schedule, alternatives=cpu_schedules.matmul_tile_alternatives, keep=cpu_amx_schedules.is_amx_kernel
            )
        self._cpu_flags = []
        return relax_lowering.build(model, self._target, opt_level, schedule, select_kernels=self._select_kernels, vm_exec=vm_exec,
                                    constants=constants)

    def _select_kernels(self, module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
        """AMX kernels for the bf16 and int8 layers where the target has AMX, dot-product kernels for
        the layers left where it has their instruction (AVX-512 VNNI / BF16; on aarch64 the
        dot-product / BF16 extensions), and the index guard's counts as one kernel."""
        module, self._cpu_flags = cpu_amx_schedules.select_amx_matmuls(module, target)
        return index_flags.select_index_flags_kernels(cpu_dot_schedules.select_dot_matmuls(module, target))

    def cpu_flags(self) -> list[str]:
        return list(self._cpu_flags)

    def export(self, executable: tvm.runtime.Executable, path: Path, addons: list[Path]) -> None:
        executable.export_library(str(path), addons=[str(a) for a in addons])


def _default_schedules(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """-O2's rules: AMX kernels first (AMX targets), then dot-product FC kernels (VNNI / BF16
    targets), then the CPU rules for the rest."""
    module = cpu_dot_schedules.apply_dot_schedules(cpu_amx_schedules.apply_amx_schedules(module, target), target)
    return cpu_schedules.apply_default_schedules(module, target)


def _with_host_features(config: dict, target: tvm.target.Target) -> tvm.target.Target:
    """`target` (this host's CPU by name) with the HOST_FEATURES that the host has and the name lacks
    added, and those the name has and the host lacks removed."""
    flags = host_cpu_flags.cpu_flags()
    changes = [f"{'+' if flag in flags else '-'}{feature}" for flag, feature in HOST_FEATURES.items()
               if (flag in flags) != bool(tvm.target.codegen.target_has_features(feature, target))]
    if not changes:
        return target
    return tvm.target.Target({**config, "mattr": [*config.get("mattr", []), *changes]})


def host_cpu() -> CpuTarget:
    if platform.machine() != "x86_64":
        raise UsageError(f"--target=x86 builds for this host's CPU, but this host is {platform.machine()}")
    return CpuTarget({"kind": "llvm", "mtriple": HOST_TRIPLE, "mcpu": "native"})


def _arch(triple) -> str:
    return str(triple).split("-")[0]


_LLVM_BY_ARCH: dict[str, Callable[[dict], Target]] = {}


def register_llvm_arch(arch: str, factory: Callable[[dict], Target]) -> None:
    """TVM "llvm" targets whose triple starts with `arch` are built by `factory`."""
    _LLVM_BY_ARCH[arch] = factory


def llvm_target(config: dict) -> Target:
    """TVM's "llvm" kind: the target registered for the triple's arch, else this host's CPU."""
    return _LLVM_BY_ARCH.get(_arch(config.get("mtriple", HOST_TRIPLE)), CpuTarget)(config)


register_target("x86", host_cpu)
register_tvm_kind("llvm", llvm_target)
