"""CPU targets: `x86` (this host's CPU) and any TVM `{"kind": "llvm", ...}` target for this host's ISA;
an "llvm" target whose triple names another ISA goes to the target registered for that arch (aarch64:
reccc.targets.arm)."""

import platform
from collections.abc import Callable
from pathlib import Path

import onnx
import tvm

from reccc.errors import UsageError, one_line
from reccc.target import Target, TuningOptions, register_target, register_tvm_kind
from reccc.targets import cpu_int8_schedules, cpu_schedules, relax_lowering, tuning as auto_tuning

# The triple TVM's LLVM defaults to is x86_64-conda-linux-gnu, which builds for a generic CPU;
# reccc always names the host's.
HOST_TRIPLE = "x86_64-linux-gnu"


class CpuTarget(Target):
    def __init__(self, config: dict):
        config = dict(config)
        config.setdefault("mtriple", HOST_TRIPLE)
        if config.get("mcpu") == "native":
            config["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        self.check_arch(_arch(config["mtriple"]))
        try:
            self._target = tvm.target.Target(config)
        except Exception as error:
            raise UsageError(f"--target: TVM rejects {config}: {one_line(error)}") from error

    def check_arch(self, arch: str) -> None:
        """UsageError unless this target can build for `arch` (the triple's first part)."""
        if arch != platform.machine():
            raise UsageError(f"--target: cross-compiling for {arch} from a {platform.machine()} host is not supported")

    def tvm_target(self) -> tvm.target.Target:
        return self._target

    def compile(self, model: onnx.ModelProto, opt_level: int, tuning: TuningOptions | None = None) -> tvm.runtime.Executable:
        schedule = _default_schedules
        if tuning is not None:
            schedule = auto_tuning.tuned_schedules(tuning, default=schedule, alternatives=cpu_schedules.matmul_tile_alternatives)
        return relax_lowering.build(model, self._target, opt_level, schedule, select_kernels=cpu_int8_schedules.select_vnni_matmuls)

    def export(self, executable: tvm.runtime.Executable, path: Path, addons: list[Path]) -> None:
        executable.export_library(str(path), addons=[str(a) for a in addons])


def _default_schedules(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """-O2's rules: int8 FC kernels first (VNNI targets), then the CPU rules for the rest."""
    return cpu_schedules.apply_default_schedules(cpu_int8_schedules.apply_int8_schedules(module, target), target)


def host_cpu() -> CpuTarget:
    if platform.machine() != "x86_64":
        raise UsageError(f"--target=x86 builds for this host's CPU, but this host is {platform.machine()}")
    return CpuTarget(
        {
            "kind": "llvm",
            "mtriple": HOST_TRIPLE,
            "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
        }
    )


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
