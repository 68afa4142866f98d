"""What a compilation target is, and the registry that turns a --target spec into one.

Concrete targets live in reccc.targets and register themselves; a spec is a registered name
(`x86`) or a TVM target as JSON (`{"kind": "llvm", ...}`), which goes to whichever target
registered that TVM kind.
"""

import abc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import onnx

from reccc.errors import UsageError
from reccc.plugins import TARGET_GROUP, load_entry_points


# How a library's Relax VM runs the model function (TVM's exec_mode): "compiled", its instructions
# compiled to native code with the kernels (about 7 us less a call than interpreting them: an int8
# DLRM-style model 0.050 instead of 0.057 ms at batch 1); "bytecode", interpreted, which TVM's VM
# instrument can time call by call (tools/kernel_profile.py).
VM_EXEC_MODES = ("compiled", "bytecode")


@dataclass(frozen=True)
class TuningOptions:
    """-O3's auto-tuning: its budget (whichever of trials and seconds ends first), where its records
    persist, and where candidates are measured (this machine, or an RPC tracker's devices)."""

    trials: int
    seconds: float
    database: Path
    rpc_tracker: tuple[str, int] | None = None  # (host, port) of a TVM RPC tracker
    device_key: str | None = None  # the tracker's key for the devices to measure on
    progress: TextIO | None = None  # where the one updating progress line goes; None: quiet


class Target(abc.ABC):
    """Lowers an ONNX model through TVM and writes a loadable library."""

    @abc.abstractmethod
    def tvm_target(self) -> Any:
        """The tvm.target.Target this target compiles for."""

    @abc.abstractmethod
    def compile(self, model: onnx.ModelProto, opt_level: int, tuning: TuningOptions | None = None, vm_exec: str = "compiled",
                constants: Sequence[np.ndarray] = ()) -> Any:
        """Lower `model` to a TVM executable (a Relax VM executable whose model function runs as
        `vm_exec` says, one of VM_EXEC_MODES). `constants` are the values of `model`'s last graph inputs,
        bound as constants after import (the compiler lifts large weights out of the graph:
        reccc.weights_inputs). `tuning` is given at -O3 only; a target without auto-tuning builds as at
        -O2 (the README's Status table says which targets tune)."""

    @abc.abstractmethod
    def export(self, executable: Any, path: Path, addons: list[Path]) -> None:
        """Write `executable` as a shared library at `path`, linking the extra sources `addons` into it."""

    def cpu_flags(self) -> list[str]:
        """CPU flags (Linux /proc/cpuinfo names) that the code of the last compile() needs beyond its
        target's arch, for the manifest: reccc.load checks them (and requests AMX's state, see
        reccc.host_cpu). None by default."""
        return []

    def description(self) -> dict:
        """The TVM target as JSON-able data, for the artifact's manifest."""
        return json.loads(json.dumps(dict(self.tvm_target().export()), default=str))


_NAMED: dict[str, Callable[[], Target]] = {}
_BY_TVM_KIND: dict[str, Callable[[dict], Target]] = {}


def register_target(name: str, factory: Callable[[], Target]) -> None:
    _NAMED[name] = factory


def register_tvm_kind(kind: str, factory: Callable[[dict], Target]) -> None:
    """`factory` builds a Target from a TVM target JSON dict whose "kind" is `kind`."""
    _BY_TVM_KIND[kind] = factory


def available_targets() -> list[str]:
    load_entry_points(TARGET_GROUP)
    return sorted(_NAMED)


def resolve_target(spec: str) -> Target:
    load_entry_points(TARGET_GROUP)
    if spec.lstrip().startswith("{"):
        try:
            config = json.loads(spec)
        except json.JSONDecodeError as error:
            raise UsageError(f"--target: invalid JSON: {error}") from error
        kind = config.get("kind") if isinstance(config, dict) else None
        if kind not in _BY_TVM_KIND:
            supported = ", ".join(sorted(_BY_TVM_KIND)) or "none"
            raise UsageError(f"--target: TVM target kind '{kind}' is not supported (supported kinds: {supported})")
        return _BY_TVM_KIND[kind](config)
    if spec not in _NAMED:
        raise UsageError(
            f"--target: unknown target '{spec}' (available: {', '.join(sorted(_NAMED))}, or a TVM target as JSON)"
        )
    return _NAMED[spec]()
