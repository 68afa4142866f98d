"""aarch64 targets: `arm` / `arm:neon` (any ARMv8-A with NEON), `arm:sve` (ARMv8-A with SVE), `arm:TAG`
for TVM's named aarch64 Linux devices (e.g. `arm:raspberry-pi/4b-aarch64`), and any TVM
`{"kind": "llvm", "mtriple": "aarch64-...", ...}` target. They cross-compile on an x86 host: TVM's
LLVM emits aarch64 code, and the GNU aarch64 toolchain links it, with the manifest, into a library
that the aarch64 TVM runtime loads.
"""

import platform
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm.support import cc

from reccc.errors import UsageError
from reccc.target import TuningOptions, register_target
from reccc.targets import x86

ARCH = "aarch64"
TRIPLE = "aarch64-linux-gnu"
CROSS_LINKER = f"{TRIPLE}-g++"
NEON = {"kind": "llvm", "mtriple": TRIPLE, "mattr": ["+neon"]}
SVE = {"kind": "llvm", "mtriple": TRIPLE, "mattr": ["+neon", "+sve"]}


def _linker() -> str:
    """The compiler that links aarch64 objects: the cross toolchain, or this host's own on aarch64."""
    if shutil.which(CROSS_LINKER):
        return CROSS_LINKER
    if platform.machine() == ARCH:
        return "g++"
    raise UsageError(
        f"--target: linking for {ARCH} needs {CROSS_LINKER} (Debian: apt-get install g++-aarch64-linux-gnu, "
        "or run bash tools/arm_emulator.sh, which installs it)"
    )


class ArmTarget(x86.CpuTarget):
    """An aarch64 Linux CPU: compiled as x86's CPU targets are (same lowering and default schedules, with
    the target's vector width), linked by the aarch64 toolchain."""

    def __init__(self, config: dict):
        config = dict(config)
        config.setdefault("mtriple", TRIPLE)
        if config.get("mcpu") == "native" and platform.machine() != ARCH:
            raise UsageError(f'--target: "mcpu": "native" means this host\'s CPU, and this host is {platform.machine()}, not {ARCH}')
        self._linker = _linker()
        super().__init__(config)

    def check_arch(self, arch: str) -> None:
        if arch != ARCH:
            raise UsageError(f"--target: the arm targets build for {ARCH}, not {arch}")

    def compile(self, model: onnx.ModelProto, opt_level: int, tuning: TuningOptions | None = None, vm_exec: str = "compiled",
                constants: Sequence[np.ndarray] = ()) -> tvm.runtime.Executable:
        if tuning is not None:
            # MetaSchedule measures each candidate by running it: that needs the aarch64 toolchain in its
            # builder and an aarch64 device behind its runner, neither of which reccc wires up yet.
            raise UsageError(f"-O3: auto-tuning for {ARCH} is not supported yet; build with -O2 (the default schedules)")
        return super().compile(model, opt_level, vm_exec=vm_exec, constants=constants)

    def export(self, executable: tvm.runtime.Executable, path: Path, addons: list[Path]) -> None:
        executable.export_library(
            str(path), fcompile=cc.cross_compiler(self._linker), addons=[str(a) for a in addons]
        )


def tvm_device_tags() -> dict[str, dict]:
    """TVM's tags of aarch64 Linux devices, as the target configs they stand for (their CPU and features)."""
    configs = {}
    for tag, target in tvm.target.list_tags().items():
        exported = dict(target.export())
        if exported.get("kind") == "llvm" and exported.get("mtriple") == TRIPLE:
            config = {key: exported[key] for key in ("kind", "mtriple", "mcpu", "num-cores") if key in exported}
            configs[tag] = config | {"mattr": [str(feature) for feature in exported.get("mattr", [])]}
    return configs


register_target("arm", lambda: ArmTarget(NEON))
register_target("arm:neon", lambda: ArmTarget(NEON))
register_target("arm:sve", lambda: ArmTarget(SVE))
for _tag, _config in tvm_device_tags().items():
    register_target(f"arm:{_tag}", lambda config=_config: ArmTarget(config))
x86.register_llvm_arch(ARCH, ArmTarget)
