"""Test-only generator of a DLRM-style model of any size, its embedding tables in ONNX external data.

The tables are written a chunk of rows at a time, straight to the external file, so making a model
larger than memory (or than protobuf's 2 GiB) takes only disk. The model: a bottom MLP on 13 dense
features, one lookup per table (each table's ids are an input of their own), the concatenation of
both, and a top MLP to a sigmoid.
"""

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DENSE_FEATURES = 13
_CHUNK_ROWS = 1 << 18
_PAGE = 4096  # tables start on a page: onnxruntime memory-maps aligned external data


def make_dlrm(folder: Path, table_bytes: int, tables: int = 4, dim: int = 32, seed: int = 0, sparse: bool = False) -> Path:
    """Write `folder`/dlrm.onnx with `tables` embedding tables of `dim` floats a row, about `table_bytes`
    in all, in the external file `folder`/tables.bin; returns the model's path. The tables differ in
    rows (as real ones do). `sparse` leaves the tables' file a hole of zeros (no disk, no time), for
    tests that only need its size."""
    rng = np.random.default_rng(seed)
    rows = [max(1, table_bytes // (tables * dim * 4)) + 17 * index for index in range(tables)]
    data = folder / "tables.bin"
    initializers, offset = [], 0
    with open(data, "wb") as out:
        for index, count in enumerate(rows):
            offset += -offset % _PAGE
            nbytes = count * dim * 4
            if sparse:
                out.truncate(offset + nbytes)
            else:
                out.seek(offset)
                for start in range(0, count, _CHUNK_ROWS):
                    block = rng.standard_normal((min(_CHUNK_ROWS, count - start), dim), dtype=np.float32)
                    out.write((block / math.sqrt(dim)).tobytes())
            table = TensorProto(name=f"table_{index}", data_type=TensorProto.FLOAT, dims=[count, dim], data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(nbytes))):
                table.external_data.add(key=key, value=value)
            initializers.append(table)
            offset += nbytes
    width = dim * (tables + 1)
    layers = [("bottom_0", DENSE_FEATURES, 64), ("bottom_1", 64, dim), ("top_0", width, 64), ("top_1", 64, 1)]
    for name, fan_in, fan_out in layers:
        initializers.append(numpy_helper.from_array(rng.standard_normal((fan_in, fan_out), dtype=np.float32) / np.float32(math.sqrt(fan_in)), f"{name}_w"))
        initializers.append(numpy_helper.from_array(np.full(fan_out, 0.01, np.float32), f"{name}_b"))
    nodes = [
        helper.make_node("Gemm", ["dense", "bottom_0_w", "bottom_0_b"], ["b0"], name="bottom_0"),
        helper.make_node("Relu", ["b0"], ["b0r"], name="bottom_0_relu"),
        helper.make_node("Gemm", ["b0r", "bottom_1_w", "bottom_1_b"], ["b1"], name="bottom_1"),
        helper.make_node("Relu", ["b1"], ["b1r"], name="bottom_1_relu"),
        *(helper.make_node("Gather", [f"table_{index}", f"ids_{index}"], [f"emb_{index}"], name=f"lookup_{index}") for index in range(tables)),
        helper.make_node("Concat", ["b1r", *(f"emb_{index}" for index in range(tables))], ["features"], axis=1, name="interaction"),
        helper.make_node("Gemm", ["features", "top_0_w", "top_0_b"], ["t0"], name="top_0"),
        helper.make_node("Relu", ["t0"], ["t0r"], name="top_0_relu"),
        helper.make_node("Gemm", ["t0r", "top_1_w", "top_1_b"], ["logit"], name="top_1"),
        helper.make_node("Sigmoid", ["logit"], ["ctr"], name="ctr"),
    ]
    inputs = [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", DENSE_FEATURES])]
    inputs += [helper.make_tensor_value_info(f"ids_{index}", TensorProto.INT64, ["batch"]) for index in range(tables)]
    graph = helper.make_graph(nodes, "huge_dlrm", inputs, [helper.make_tensor_value_info("ctr", TensorProto.FLOAT, ["batch", 1])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="reccc-testsuite")
    path = folder / "dlrm.onnx"
    onnx.save_model(model, path)
    return path


def model_bytes(path: Path) -> int:
    """The model's size: its .onnx file and its external data."""
    return path.stat().st_size + (path.parent / "tables.bin").stat().st_size
