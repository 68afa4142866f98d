"""Reading and writing ONNX model files, with one clear error line for each way a file can be bad."""

import os
from pathlib import Path

import onnx

from reccc.atomic_file import atomic_output
from reccc.errors import UsageError, one_line


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse and check an ONNX file; raise UsageError naming the file on any problem."""
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{file}: no such file")
    if file.is_dir():
        raise UsageError(f"{file}: is a directory, expected an .onnx file")
    if file.stat().st_size == 0:
        raise UsageError(f"{file}: empty file, expected an ONNX model")
    try:
        model = onnx.load(str(file))
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning-like and ValueError variants
        raise UsageError(f"{file}: not a valid ONNX model ({one_line(error)})") from error
    if not model.graph.node and not model.graph.output:
        raise UsageError(f"{file}: not a valid ONNX model (no graph)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise UsageError(f"{file}: invalid ONNX model: {one_line(error)}") from error
    return model


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` atomically to `path`."""
    with atomic_output(path) as temporary:
        onnx.save(model, str(temporary))

