"""`--weights=external`: a model's large constants in a file beside the library, memory-mapped at load.

The library's `main` takes them as parameters after the model's inputs (TVM imports each as a graph
input of its own), so the library holds code and small constants only, and `reccc.load` passes views
of the mapped file, aligned for TVM, without copying them.

File layout: a 64-byte header (MAGIC, then the sha256 of everything after the header), then each
tensor's bytes at an offset aligned to ALIGNMENT, zero-padded between. The manifest records the file's
name, size, digest and each tensor's name, dtype, shape and offset, so a weights file from another
build is refused by name instead of giving wrong outputs.
"""

import hashlib
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from reccc.errors import UsageError
from reccc.external_data import file_region, is_mapped

WEIGHTS_MODES = ("embed", "external")
# Smaller constants stay in the library, where TVM folds them into the kernels (weight transposes);
# the tables, which are nearly all of a recommender's bytes, go to the file.
EXTERNAL_MIN_BYTES = 1 << 20
ALIGNMENT = 64
MAGIC = b"RECCCWTS"
HEADER_BYTES = 64
_CHUNK = 1 << 24  # bytes copied at a time: the compiler never holds a table in memory to write it


@dataclass(frozen=True)
class WeightSpec:
    name: str
    dtype: str
    shape: list[int]
    offset: int


def weights_path(library: Path) -> Path:
    """Where the weights of the library at `library` are written: beside it, named after it."""
    return library.with_name(library.name + ".weights")


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[TensorProto]]:
    """`model` with each initializer of at least EXTERNAL_MIN_BYTES made a graph input after the model's
    own inputs (in the order of the weights file), and those initializers."""
    weights = [tensor for tensor in model.graph.initializer if _nbytes(tensor) >= EXTERNAL_MIN_BYTES]
    if not weights:
        return model, []
    names = {tensor.name for tensor in weights}
    rest = onnx.ModelProto()
    rest.CopyFrom(model)  # the weights are mapped, or inline only in models under 2 GiB
    kept = [tensor for tensor in rest.graph.initializer if tensor.name not in names]
    del rest.graph.initializer[:]
    rest.graph.initializer.extend(kept)
    rest.graph.input.extend(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims) for tensor in weights)
    return rest, weights


def write_weights(tensors: list[TensorProto], path: Path, name: str) -> dict:
    """Write `tensors` to `path` in the weights file layout; returns the manifest's entry for the file
    (which names it `name`)."""
    specs, offset = [], HEADER_BYTES
    for tensor in tensors:
        offset += -offset % ALIGNMENT
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        specs.append(WeightSpec(tensor.name, dtype.str, list(tensor.dims), offset))
        offset += _nbytes(tensor)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        out.write(bytes(HEADER_BYTES))
        for tensor, spec in zip(tensors, specs):
            padding = bytes(spec.offset - out.tell())
            digest.update(padding)
            out.write(padding)
            for chunk in _chunks(tensor):
                digest.update(chunk)
                out.write(chunk)
        size = out.tell()
        out.seek(0)
        out.write(_header(digest.digest()))
    return {"file": name, "size": size, "sha256": digest.hexdigest(), "tensors": [spec.__dict__ for spec in specs]}


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


def _nbytes(tensor: TensorProto) -> int:
    return math.prod(tensor.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _chunks(tensor: TensorProto):
    """The tensor's bytes, a chunk at a time: read from its file when it is mapped, else from the model."""
    if is_mapped(tensor):
        path, offset, nbytes = file_region(tensor)
        with open(path, "rb") as source:
            while nbytes:
                chunk = os.pread(source.fileno(), min(_CHUNK, nbytes), offset)
                if not chunk:
                    raise UsageError(f"{path}: external data of '{tensor.name}' ended early (the file changed while reccc read it)")
                yield chunk
                offset, nbytes = offset + len(chunk), nbytes - len(chunk)
        return
    data = memoryview(np.ascontiguousarray(onnx.numpy_helper.to_array(tensor)).reshape(-1).view(np.uint8))
    for start in range(0, len(data), _CHUNK):
        yield data[start : start + _CHUNK]
