"""This machine's CPU as the artifacts that need more than their target's ISA see it: the flags Linux
reports (/proc/cpuinfo, which lists a feature only when the kernel also enables it), and the AMX
tile state, which Linux gives a process only on request.

Why the request: AMX's tile data is 8 KB of register state per thread, so Linux (5.16 and later)
makes a process ask for it once, arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), before its
first tile instruction; without it that instruction raises SIGILL and kills the process.
"""

import ctypes
import functools
import platform
from pathlib import Path

from reccc.errors import UsageError

AMX_TILE_FLAG = "amx_tile"
_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU flags of /proc/cpuinfo (the first processor's; Linux lists the same on every core);
    empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def request_amx() -> str | None:
    """Ask Linux for this process's AMX tile state (idempotent); None when granted, else why not."""
    if platform.machine() != "x86_64":
        return f"AMX is x86-64's, and this host is {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        errno = ctypes.get_errno()
        return f"the kernel refused the process AMX's tile state (arch_prctl: errno {errno})"
    return None


def prepare_to_run(flags: list[str], artifact: Path) -> None:
    """Check that this CPU has the `flags` an artifact's manifest says its code needs, and request the
    AMX state if they include it: a UsageError naming the artifact instead of a SIGILL later."""
    missing = [flag for flag in flags if flag not in cpu_flags()]
    if missing:
        raise UsageError(
            f"{artifact}: its kernels need the CPU flags {', '.join(flags)}, and this machine (CPU or kernel) "
            f"lacks {', '.join(missing)}: build it for this machine (--target=x86)"
        )
    if AMX_TILE_FLAG in flags:
        refused = request_amx()
        if refused is not None:
            raise UsageError(f"{artifact}: its kernels use AMX, and {refused}")
