"""Large constant tensors kept in their ONNX external-data files, memory-mapped instead of read.

A model past protobuf's 2 GiB limit keeps its weights in external files. reccc reads such a tensor's
data only where something needs its values, and then as a read-only memory map of the file, so a
table is never held twice (numpy views the page cache) and never passes through protobuf.

read_model leaves every external initializer of the main graph of at least MAPPED_MIN_BYTES unread and
makes its location the resolved absolute path of its file (the location was checked to lie inside the
model's folder first); other external tensors (smaller ones, Constant nodes' values, subgraphs'
initializers) are read into the model as before. Such a "mapped" TensorProto is
internal to reccc: onnx and onnxruntime refuse absolute locations, so every consumer that hands a
model to them inlines the data first (`inlined`), which only models under 2 GiB allow.
"""

import math
import os

import numpy as np
import onnx
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from reccc.errors import UsageError
from reccc.tensor_data import declared_bytes

# Smaller external tensors are read into the model at once: mapping pays off only for large ones.
MAPPED_MIN_BYTES = 1 << 20
# protobuf cannot serialize a larger message, and onnxruntime and TVM's importer read models through it.
MAX_PROTO_BYTES = (1 << 31) - 1


def is_mapped(tensor: TensorProto) -> bool:
    """Whether `tensor` is one read_model left in its external file (its location an absolute path)."""
    return tensor.data_location == TensorProto.EXTERNAL and os.path.isabs(_entries(tensor).get("location", ""))


def file_region(tensor: TensorProto) -> tuple[str, int, int]:
    """(absolute path, offset, bytes) of a mapped tensor's data."""
    entries = _entries(tensor)
    return entries["location"], int(entries.get("offset", 0)), _nbytes(tensor)


def mapped_array(tensor: TensorProto) -> np.ndarray:
    """The values of a mapped tensor: a read-only view of its file, read from disk as it is touched."""
    path, offset, nbytes = file_region(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if nbytes == 0:
        return np.zeros(tuple(tensor.dims), dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims))


class MappedValues(LazyValues):
    """graphsurgeon's lazily loaded values for a mapped tensor: `load` maps the file instead of reading
    it, and remembers the array it gave, so that export can turn the untouched array (it is read-only)
    back into the reference to the file instead of copying its bytes into the model."""

    def __init__(self, tensor: TensorProto):
        super().__init__(tensor)
        self.loaded: np.ndarray | None = None

    def load(self) -> np.ndarray:
        self.loaded = mapped_array(self.tensor)
        return self.loaded


def read_small_external_data(model: onnx.ModelProto, folder: str) -> None:
    """Read the external tensors of `model` that stay in memory into it, and point the others' locations
    at their files' absolute paths (the locations were checked by tensor_data first)."""
    for tensor in model.graph.initializer:
        nbytes = declared_bytes(tensor.data_type, tensor.dims, tensor.name)
        # numpy cannot view packed types (int4, ...): those are read
        if tensor.data_location == TensorProto.EXTERNAL and nbytes >= MAPPED_MIN_BYTES and nbytes == _nbytes(tensor):
            _set_location(tensor, os.path.realpath(os.path.join(folder, _entries(tensor)["location"])))
    for tensor in _external_tensors(model):
        if is_mapped(tensor):
            continue
        entries = _entries(tensor)
        with open(os.path.realpath(os.path.join(folder, entries["location"])), "rb") as file:
            file.seek(int(entries.get("offset", 0)))
            tensor.raw_data = file.read(declared_bytes(tensor.data_type, tensor.dims, tensor.name))
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT


def inlined(model: onnx.ModelProto, purpose: str, remedy: str = "") -> onnx.ModelProto:
    """`model` with every mapped tensor's data read into it (a copy; `model` itself when none is mapped),
    for onnxruntime and TVM's importer. UsageError, saying that `purpose` needs it, if the result would be
    over protobuf's 2 GiB (the message ends with `remedy`)."""
    mapped = [tensor for tensor in _external_tensors(model) if is_mapped(tensor)]
    if not mapped:
        return model
    total = model.ByteSize() + sum(file_region(tensor)[2] for tensor in mapped)
    if total > MAX_PROTO_BYTES:
        raise UsageError(
            f"{purpose} needs the model's weights in memory, and with them the model is {total / (1 << 30):.1f} GiB, "
            f"over protobuf's 2 GiB limit{remedy}"
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in _external_tensors(copy):
        if is_mapped(tensor):
            tensor.raw_data = np.ascontiguousarray(mapped_array(tensor)).tobytes()
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
    return copy


def _external_tensors(model: onnx.ModelProto):
    return (tensor for tensor in onnx.external_data_helper._get_all_tensors(model) if tensor.data_location == TensorProto.EXTERNAL)


def _nbytes(tensor: TensorProto) -> int:
    return math.prod(tensor.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _entries(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_location(tensor: TensorProto, path: str) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = path
