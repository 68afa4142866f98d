"""A model's large constants handed to the target beside its ONNX graph instead of inside it.

The lowered model's constants of at least LIFTED_MIN_BYTES (the tables, nearly all of a recommender's
bytes) become parameters of its `main`: graph inputs after the model's own, which TVM imports as
parameters. With `--weights=embed` the target binds their values as constants right after import (the
same Relax module as importing them as initializers, without their bytes passing through protobuf);
with `--weights=external` they stay parameters and their bytes go to the weights file
(reccc.weights_file) a chunk at a time, never a whole table in memory.

Smaller constants stay in the graph, where TVM folds them into the kernels (the transposes of FC weights).
"""

import math
import os
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from reccc.errors import UsageError
from reccc.external_data import MappedValues, file_region
from reccc.ir import Model
from reccc.weights_file import Weight

LIFTED_MIN_BYTES = 1 << 20
# A library's weights are one blob in its data (TVM serializes the executable's constants and links them
# in); reccc has not built one past 2 GiB, which --weights=external has no limit for.
EMBEDDED_MAX_BYTES = (1 << 31) - 1
_CHUNK = 1 << 24


def lift_weights(model: Model) -> tuple[onnx.ModelProto, list[gs.Constant]]:
    """`model` as the target imports it, each constant of at least LIFTED_MIN_BYTES a graph input after
    the model's own, in the order of the constants returned."""
    return model.to_onnx_lifting(lambda constant: _nbytes(constant) >= LIFTED_MIN_BYTES)


def check_embeddable(lowered: onnx.ModelProto, constants: list[gs.Constant], source: str) -> None:
    """UsageError unless the model and its lifted constants fit in a library (--weights=embed)."""
    nbytes = lowered.ByteSize() + sum(_nbytes(constant) for constant in constants)
    if nbytes > EMBEDDED_MAX_BYTES:
        raise UsageError(f"{source}: --weights=embed: the model with its weights is {nbytes / (1 << 30):.1f} GiB, over the 2 GiB "
                         "a library embeds; build with --weights=external")


def weights_to_write(constants: list[gs.Constant]) -> list[Weight]:
    """The lifted constants as the weights file's tensors."""
    return [Weight(constant.name, np.dtype(constant.dtype), list(constant.shape), _chunks(constant)) for constant in constants]


def values_to_bind(constants: list[gs.Constant]) -> list[np.ndarray]:
    """The lifted constants' values, for the target to bind (a table still in its file is mapped, not read)."""
    return [constant.values for constant in constants]


def _nbytes(constant: gs.Constant) -> int:
    """Bytes of the constant's values, without loading them; 0 for a dtype numpy lacks (bfloat16, int4:
    onnx packs those, and they stay in the graph)."""
    try:
        dtype = np.dtype(constant.dtype)
    except TypeError:
        return 0
    return math.prod(constant.shape) * dtype.itemsize


def _chunks(constant: gs.Constant) -> Iterator[bytes | memoryview]:
    """The constant's bytes, a chunk at a time: read from its file while it is still the mapped table
    (reccc.external_data), else from its values."""
    if isinstance(constant._values, MappedValues):
        path, offset, nbytes = file_region(constant._values.tensor)
        with open(path, "rb") as source:
            while nbytes:
                chunk = os.pread(source.fileno(), min(_CHUNK, nbytes), offset)
                if not chunk:
                    return  # the file shrank: write_weights reports the short tensor
                yield chunk
                offset, nbytes = offset + len(chunk), nbytes - len(chunk)
        return
    data = memoryview(np.ascontiguousarray(constant.values).reshape(-1).view(np.uint8))
    for start in range(0, len(data), _CHUNK):
        yield data[start : start + _CHUNK]
