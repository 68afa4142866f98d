"""The weights file of `--weights=external`: a library's large constants beside it, memory-mapped at load.

File layout: a 64-byte header (MAGIC, then the sha256 of everything after the header), then each
tensor's bytes at an offset aligned to ALIGNMENT, zero-padded between. The manifest records the file's
name, size, digest and each tensor's name, dtype, shape and offset, so a weights file from another
build is refused by name instead of giving wrong outputs. `reccc.load` maps the file and passes TVM
views of it, aligned, without copying.

Only numpy here: `map_weights` is part of reccc's runtime, which a device runs with numpy and TVM's
runtime alone.
"""

import hashlib
import math
import mmap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reccc.errors import UsageError

ALIGNMENT = 64
MAGIC = b"RECCCWTS"
HEADER_BYTES = 64


@dataclass(frozen=True)
class Weight:
    """One tensor to write: its name, dtype, shape, and its bytes a chunk at a time."""

    name: str
    dtype: np.dtype
    shape: list[int]
    chunks: Iterable[bytes | memoryview]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def weights_path(library: Path) -> Path:
    """Where the weights of the library at `library` are written: beside it, named after it."""
    return library.with_name(library.name + ".weights")


def write_weights(weights: list[Weight], path: Path, name: str) -> dict:
    """Write `weights` to `path` in the weights file layout; returns the manifest's entry for the file
    (which names it `name`)."""
    specs, offset = [], HEADER_BYTES
    for weight in weights:
        offset += -offset % ALIGNMENT
        specs.append({"name": weight.name, "dtype": weight.dtype.str, "shape": list(weight.shape), "offset": offset})
        offset += weight.nbytes
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        out.write(bytes(HEADER_BYTES))
        for weight, spec in zip(weights, specs):
            padding = bytes(spec["offset"] - out.tell())
            digest.update(padding)
            out.write(padding)
            for chunk in weight.chunks:
                digest.update(chunk)
                out.write(chunk)
            if out.tell() != spec["offset"] + weight.nbytes:
                raise UsageError(f"{path}: '{weight.name}' gave {out.tell() - spec['offset']} bytes, not {weight.nbytes} "
                                 "(its external data file changed while reccc read it)")
        size = out.tell()
        out.seek(0)
        out.write(_header(digest.digest()))
    return {"file": name, "size": size, "sha256": digest.hexdigest(), "tensors": specs}


def map_weights(library: Path, entry: dict) -> list[np.ndarray]:
    """The weights of the library at `library` (its manifest's `entry`), as numpy views of the mapped
    file in the manifest's order; UsageError naming the file if it is missing or not this build's."""
    path = library.with_name(entry["file"])
    if not path.is_file():
        raise UsageError(f"{library}: its weights file '{path}' does not exist (built with --weights=external: copy both files)")
    size = path.stat().st_size
    if size != entry["size"]:
        raise UsageError(f"{path}: {size} bytes, but {library} was built with a weights file of {entry['size']} bytes: "
                         "not this library's weights (rebuild, or copy both files of one build)")
    with open(path, "rb") as file:
        header = file.read(HEADER_BYTES)
        # Private and copy-on-write: TVM gets writable views (it never writes its inputs), and the pages
        # stay the file's page cache, shared by every process that loads the model.
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    if header != _header(bytes.fromhex(entry["sha256"])):
        raise UsageError(f"{path}: its checksum is not the one {library} was built with: "
                         "not this library's weights (rebuild, or copy both files of one build)")
    return [
        np.frombuffer(mapped, np.dtype(spec["dtype"]), math.prod(spec["shape"]), spec["offset"]).reshape(spec["shape"])
        for spec in entry["tensors"]
    ]


def _header(digest: bytes) -> bytes:
    return (MAGIC + digest).ljust(HEADER_BYTES, b"\0")
