"""Every constant tensor of an untrusted ONNX file checked against the data the file really holds.

The checks read only TensorProto fields (dims, data type, the length of each data field, the size of an
external file), before any data is loaded or turned into numpy: a corrupt or hostile file cannot make
reccc allocate what its dims claim, read a file outside the model's folder, or fail later deep inside
numpy with a reshape error.
"""

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from reccc.errors import UsageError

# No host reccc compiles on holds a tensor this large: a file that declares one is corrupt or hostile.
MAX_TENSOR_BYTES = 1 << 38  # 256 GiB

# Types stored packed in raw_data, with their bits per element (looked up by name: the newest exist
# only in recent onnx releases).
_PACKED_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                       ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(TensorProto, name)
}
_COMPLEX = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def check_tensor_data(model: onnx.ModelProto, file: Path) -> None:
    """Raise UsageError naming `file` and the tensor if any constant tensor of `model` (read from `file`,
    its external data not loaded yet) declares a size its data does not have, or keeps its data where
    reccc does not read it from."""
    for label, tensor in _constant_tensors(model):
        where = f"{file}: {label}"
        if isinstance(tensor, onnx.SparseTensorProto):
            raise UsageError(f"{where}: sparse tensors are not supported")
        if tensor.HasField("segment"):
            raise UsageError(f"{where}: segmented tensors are not supported")
        nbytes = declared_bytes(tensor.data_type, tensor.dims, where)
        if tensor.data_location == TensorProto.EXTERNAL:
            _check_external_data(tensor, nbytes, file.parent, where)
        else:
            _check_inline_data(tensor, nbytes, where)


def declared_bytes(data_type: int, dims: Iterable[int], where: str) -> int:
    """The bytes a tensor of this type and these (static) dims occupies; UsageError naming `where` for an
    unknown type, a negative dim, or a size beyond MAX_TENSOR_BYTES. Strings count as a pointer each,
    as numpy holds them."""
    dims = list(dims)
    if data_type == TensorProto.UNDEFINED or data_type not in TensorProto.DataType.values():
        raise UsageError(f"{where}: unknown data type {data_type}")
    if any(dim < 0 for dim in dims):
        raise UsageError(f"{where}: negative dim in shape {dims}")
    bits = _PACKED_BITS.get(data_type) or 8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    nbytes = (math.prod(dims) * bits + 7) // 8
    # A 0 dim makes a tensor empty, but numpy still refuses a shape whose other dims overflow it.
    span = (math.prod(max(dim, 1) for dim in dims) * bits + 7) // 8
    if span > MAX_TENSOR_BYTES:
        raise UsageError(
            f"{where}: shape {dims} of {TensorProto.DataType.Name(data_type)} is {span} bytes"
            f"{' counting its 0 dims as 1' if span != nbytes else ''}, more than reccc's limit of "
            f"{MAX_TENSOR_BYTES >> 30} GiB for one tensor"
        )
    return nbytes


def _constant_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto | onnx.SparseTensorProto]]:
    """Every tensor with data in `model`, with a description naming it: initializers and node attributes,
    in subgraphs and functions too."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _attribute_tensors(function.node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, TensorProto | onnx.SparseTensorProto]]:
    for tensor in graph.initializer:
        yield f"tensor '{tensor.name}'", tensor
    for sparse in graph.sparse_initializer:
        yield f"tensor '{sparse.values.name}'", sparse
    yield from _attribute_tensors(graph.node)


def _attribute_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[tuple[str, TensorProto | onnx.SparseTensorProto]]:
    for node in nodes:
        for attribute in node.attribute:
            where = f"attribute '{attribute.name}' of node '{node.name or node.op_type}'"
            tensors = [attribute.t] if attribute.HasField("t") else []
            sparse = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
            for tensor in [*tensors, *attribute.tensors, *sparse, *attribute.sparse_tensors]:
                yield where, tensor
            graphs = [attribute.g] if attribute.HasField("g") else []
            for subgraph in [*graphs, *attribute.graphs]:
                yield from _graph_tensors(subgraph)


def _check_inline_data(tensor: TensorProto, nbytes: int, where: str) -> None:
    fields = [name for name in _TYPED_FIELDS if len(getattr(tensor, name))] + (["raw_data"] if tensor.HasField("raw_data") else [])
    if len(fields) > 1:
        raise UsageError(f"{where}: data in more than one field ({', '.join(fields)})")
    count = math.prod(tensor.dims)
    if not fields:
        if count:
            raise UsageError(f"{where}: no data for shape {list(tensor.dims)}")
        return
    field = fields[0]
    if field == "raw_data":
        if tensor.data_type == TensorProto.STRING:
            raise UsageError(f"{where}: a string tensor cannot have raw_data")
        held, expected = len(tensor.raw_data), nbytes
    else:
        expected_field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        if field != expected_field:
            raise UsageError(f"{where}: data in {field}, but a {TensorProto.DataType.Name(tensor.data_type)} tensor keeps it in {expected_field}")
        held, expected = len(getattr(tensor, field)), _typed_entries(tensor.data_type, count)
    if held != expected:
        raise UsageError(f"{where}: {field} holds {held} {'bytes' if field == 'raw_data' else 'values'}, "
                         f"but shape {list(tensor.dims)} of {TensorProto.DataType.Name(tensor.data_type)} needs {expected}")


def _typed_entries(data_type: int, count: int) -> int:
    """How many entries of its typed field (float_data, int32_data, ...) a tensor of `count` elements has:
    two per complex number, one byte of packed 4- and 2-bit values per int32_data entry."""
    if data_type in _COMPLEX:
        return 2 * count
    if _PACKED_BITS.get(data_type) in (2, 4):
        return (count * _PACKED_BITS[data_type] + 7) // 8
    return count


def _check_external_data(tensor: TensorProto, nbytes: int, folder: Path, where: str) -> None:
    """External data must be a regular file inside the model's folder (after resolving symlinks and '..')
    holding exactly the tensor's bytes at its offset."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    if tensor.data_type == TensorProto.STRING:
        raise UsageError(f"{where}: a string tensor cannot have external data")
    if not location:
        raise UsageError(f"{where}: external data without a location")
    if os.path.isabs(location):
        raise UsageError(f"{where}: external data location '{location}' is an absolute path; it must be relative to the model's folder")
    inside = os.path.realpath(folder)
    try:
        resolved = os.path.realpath(os.path.join(inside, location))
    except ValueError as error:  # a NUL byte in the location
        raise UsageError(f"{where}: invalid external data location {location!r}") from error
    if os.path.commonpath([inside, resolved]) != inside:
        raise UsageError(f"{where}: external data location '{location}' is outside the model's folder '{folder}'")
    if not os.path.isfile(resolved):
        raise UsageError(f"{where}: external data file '{location}' does not exist" if not os.path.exists(resolved)
                         else f"{where}: external data location '{location}' is not a regular file")
    offset, length = (_external_number(entries, key, where) for key in ("offset", "length"))
    if length is not None and length != nbytes:
        raise UsageError(f"{where}: external data length {length} does not match shape {list(tensor.dims)} "
                         f"of {TensorProto.DataType.Name(tensor.data_type)} ({nbytes} bytes)")
    start, size = offset or 0, os.path.getsize(resolved)
    if start + nbytes > size:
        raise UsageError(f"{where}: external data file '{location}' is too short: the tensor needs {nbytes} bytes "
                         f"at offset {start}, the file has {size} bytes")
    if length is None and size - start != nbytes:
        # onnx reads to the end of the file when no length is given
        raise UsageError(f"{where}: external data file '{location}' has {size - start} bytes after offset {start}, "
                         f"but the tensor has {nbytes} and no length is given")


def _external_number(entries: dict[str, str], key: str, where: str) -> int | None:
    text = entries.get(key)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{where}: external data {key} '{text}' is not a non-negative integer")
    return int(text)
