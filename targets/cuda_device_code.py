"""Finding the CUDA device code in a compiled artifact.

TVM serializes its CUDA module into its own blob inside the shared library, so the fatbin is not in
an ELF section where cuobjdump would look. A fatbin starts with a 16-byte header (magic 0xBA55ED50,
version, header size, payload size) followed by entries, each with its own header: kind (1 = PTX,
2 = an ELF cubin), header size, payload size, and the SM architecture at byte 28. reccc checks
what it writes with this; the tests cross-check it with cuobjdump.
"""

import struct
from dataclasses import dataclass

FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # 0xBA55ED50, little-endian
_HEADER = struct.Struct("<IHHQ")  # magic, version, header size, payload size
_ENTRY = struct.Struct("<HHIQ")  # kind, version, header size, payload size
_ENTRY_ARCH_OFFSET = 28
ENTRY_KINDS = {1: "ptx", 2: "elf"}


@dataclass(frozen=True)
class FatbinEntry:
    kind: str  # "elf" (a cubin: machine code) or "ptx"
    arch: str  # e.g. "sm_90"


@dataclass(frozen=True)
class Fatbin:
    data: bytes
    entries: list[FatbinEntry]


def _parse(blob: bytes, start: int) -> Fatbin | None:
    """The fatbin at `start`, or None where the bytes there only happen to match the magic."""
    if start + _HEADER.size > len(blob):
        return None
    _, version, header_size, payload_size = _HEADER.unpack_from(blob, start)
    end = start + header_size + payload_size
    if version != 1 or header_size != _HEADER.size or end > len(blob):
        return None
    entries, offset = [], start + header_size
    while offset < end:
        if offset + _ENTRY_ARCH_OFFSET + 4 > end:
            return None
        kind, _, entry_header, entry_size = _ENTRY.unpack_from(blob, offset)
        if kind not in ENTRY_KINDS or entry_header < _ENTRY_ARCH_OFFSET + 4:
            return None
        (arch,) = struct.unpack_from("<I", blob, offset + _ENTRY_ARCH_OFFSET)
        entries.append(FatbinEntry(ENTRY_KINDS[kind], f"sm_{arch}"))
        offset += entry_header + entry_size
    if offset != end or not entries:
        return None
    return Fatbin(blob[start:end], entries)


def find_fatbins(blob: bytes) -> list[Fatbin]:
    """Every well-formed fatbin in `blob` (a weight that happens to hold the magic is skipped)."""
    found, start = [], blob.find(FATBIN_MAGIC)
    while start >= 0:
        fatbin = _parse(blob, start)
        if fatbin is not None:
            found.append(fatbin)
        start = blob.find(FATBIN_MAGIC, start + 1)
    return found
