"""`--weights=external` on the compile side: the lowered model's large constants become parameters of
its `main` (graph inputs after the model's own, which TVM imports as parameters), and their bytes go
to the weights file (reccc.weights_file) a chunk at a time, never a whole table in memory.

Smaller constants stay in the library, where TVM folds them into the kernels (the transposes of FC
weights); the tables, nearly all of a recommender's bytes, are the large ones.
"""

import math
import os
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from reccc.external_data import file_region, is_mapped
from reccc.weights_file import Weight

EXTERNAL_MIN_BYTES = 1 << 20
_CHUNK = 1 << 24


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Weight]]:
    """`model` with each initializer of at least EXTERNAL_MIN_BYTES made a graph input after the model's
    own inputs (in the order of the weights file), and those initializers as weights to write."""
    taken = [tensor for tensor in model.graph.initializer if _nbytes(tensor) >= EXTERNAL_MIN_BYTES]
    if not taken:
        return model, []
    names = {tensor.name for tensor in taken}
    rest = onnx.ModelProto()
    rest.CopyFrom(model)  # small: the tables are mapped, or inline only in models under 2 GiB
    kept = [tensor for tensor in rest.graph.initializer if tensor.name not in names]
    del rest.graph.initializer[:]
    rest.graph.initializer.extend(kept)
    rest.graph.input.extend(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims) for tensor in taken)
    return rest, [Weight(tensor.name, _dtype(tensor), list(tensor.dims), _chunks(tensor)) for tensor in taken]


def _dtype(tensor: TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _nbytes(tensor: TensorProto) -> int:
    return math.prod(tensor.dims) * _dtype(tensor).itemsize


def _chunks(tensor: TensorProto) -> Iterator[bytes | memoryview]:
    """The tensor's bytes, a chunk at a time: read from its file when it is mapped, else from the model."""
    if is_mapped(tensor):
        path, offset, nbytes = file_region(tensor)
        with open(path, "rb") as source:
            while nbytes:
                chunk = os.pread(source.fileno(), min(_CHUNK, nbytes), offset)
                if not chunk:
                    return  # the file shrank: write_weights reports the short tensor
                yield chunk
                offset, nbytes = offset + len(chunk), nbytes - len(chunk)
        return
    data = memoryview(np.ascontiguousarray(onnx.numpy_helper.to_array(tensor)).reshape(-1).view(np.uint8))
    for start in range(0, len(data), _CHUNK):
        yield data[start : start + _CHUNK]
