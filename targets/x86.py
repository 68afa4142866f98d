"""CPU targets: `x86` (this host's CPU) and any TVM `{"kind": "llvm", ...}` target for this host's ISA."""

import platform
from pathlib import Path

import onnx
import tvm

from reccc.errors import UsageError, one_line
from reccc.target import Target, TuningOptions, register_target, register_tvm_kind
from reccc.targets import cpu_schedules, relax_lowering

# The triple TVM's LLVM defaults to is x86_64-conda-linux-gnu, which builds for a generic CPU;
# reccc always names the host's.
HOST_TRIPLE = "x86_64-linux-gnu"


class CpuTarget(Target):
    def __init__(self, config: dict):
        config = dict(config)
        config.setdefault("mtriple", HOST_TRIPLE)
        if config.get("mcpu") == "native":
            config["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        arch = str(config["mtriple"]).split("-")[0]
        if arch != platform.machine():
            raise UsageError(
                f"--target: cross-compiling for '{config['mtriple']}' from a {platform.machine()} host is not supported yet"
            )
        try:
            self._target = tvm.target.Target(config)
        except Exception as error:
            raise UsageError(f"--target: TVM rejects {config}: {one_line(error)}") from error

    def tvm_target(self) -> tvm.target.Target:
        return self._target

    def compile(self, model: onnx.ModelProto, opt_level: int, tuning: TuningOptions | None = None) -> tvm.runtime.Executable:
        return relax_lowering.build(model, self._target, opt_level, cpu_schedules.apply_default_schedules)

    def export(self, executable: tvm.runtime.Executable, path: Path, addons: list[Path]) -> None:
        executable.export_library(str(path), addons=[str(a) for a in addons])


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


register_target("x86", host_cpu)
register_tvm_kind("llvm", CpuTarget)
