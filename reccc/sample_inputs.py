"""Inputs for running a model: random but valid ones (dense features from N(0, 1), ids inside their
tables' rows), or a user's batch read from an .npz.

Used by --verify-each, the accuracy guard, golden recording, the benchmarks and the tests.
"""

import zipfile
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from reccc.embeddings import gather_lookups
from reccc.errors import UsageError
from reccc.ir import Model, tensor_dtype

# Symbolic dims other than the leading (batch) dim, such as a bag length, get this size.
INNER_SYMBOLIC_DIM = 4
# Integer inputs that feed no embedding table get values in [0, this).
SMALL_INT_RANGE = 8


def input_shape(tensor: gs.Tensor, batch: int) -> tuple[int, ...]:
    """The concrete shape of a graph input at `batch`: the leading symbolic dim is the batch."""
    shape = []
    for axis, dim in enumerate(tensor.shape or ()):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        else:
            shape.append(batch if axis == 0 else INNER_SYMBOLIC_DIM)
    return tuple(shape)


def random_inputs(model: Model, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    id_ranges: dict[str, int] = {}
    for lookup in gather_lookups(model):
        for name in lookup.source_inputs:
            id_ranges[name] = min(id_ranges.get(name, lookup.rows), lookup.rows)
    feeds = {}
    for tensor in model.graph.inputs:
        dtype = tensor_dtype(tensor)
        shape = input_shape(tensor, batch)
        if dtype is None:
            raise ValueError(f"input '{tensor.name}' has no known dtype")
        if np.issubdtype(dtype, np.floating):
            feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            high = id_ranges.get(tensor.name, SMALL_INT_RANGE)
            feeds[tensor.name] = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[tensor.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise ValueError(f"input '{tensor.name}' has dtype {dtype}, which reccc cannot generate")
    return feeds


def load_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """A batch from an .npz whose array names are the model's input names."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file}: no such inputs file")
    try:
        with np.load(file, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UsageError(f"{file}: not an .npz of input arrays ({error})") from error
