"""Reading and writing ONNX model files, with one clear error line for each way a file can be bad."""

import os
from pathlib import Path

import networkx as nx
import onnx

from reccc.atomic_file import atomic_output
from reccc.errors import UsageError, one_line
from reccc.external_data import read_small_external_data
from reccc.tensor_data import check_tensor_data


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse and check an ONNX file; raise UsageError naming the file on any problem. External data is
    read only after every tensor's size and data location have been checked, and large external tensors
    are not read at all: they stay in their files, memory-mapped where their values are needed
    (reccc.external_data), so a model may be larger than protobuf's 2 GiB."""
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{file}: no such file")
    if file.is_dir():
        raise UsageError(f"{file}: is a directory, expected an .onnx file")
    if file.stat().st_size == 0:
        raise UsageError(f"{file}: empty file, expected an ONNX model")
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning-like and ValueError variants
        raise UsageError(f"{file}: not a valid ONNX model ({one_line(error)})") from error
    if not model.graph.node and not model.graph.output:
        raise UsageError(f"{file}: not a valid ONNX model (no graph)")
    _check_utf8(model, file)
    check_tensor_data(model, file)
    _check_acyclic(model.graph, file)
    try:
        # By path: the checker resolves external data locations from the model's folder, not the working one.
        onnx.checker.check_model(str(file))
    except onnx.checker.ValidationError as error:
        raise UsageError(f"{file}: invalid ONNX model: {one_line(error)}") from error
    _read_external_data(model, file)
    return model


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` atomically to `path`."""
    with atomic_output(path) as temporary:
        onnx.save(model, str(temporary))


def _read_external_data(model: onnx.ModelProto, file: Path) -> None:
    try:
        read_small_external_data(model, str(file.parent))
    except OSError as error:
        raise UsageError(f"{file}: cannot read external data: {one_line(error)}") from error


def _check_utf8(message, file: Path) -> None:
    """protobuf hands a string field that is not UTF-8 to Python as bytes, and onnx's checker fails on it
    with a UnicodeDecodeError: reject such a name or string first."""
    for field, value in message.ListFields():
        items = value if field.is_repeated else [value]
        if field.type == field.TYPE_MESSAGE:
            for item in items:
                _check_utf8(item, file)
        elif field.type == field.TYPE_STRING and any(isinstance(item, bytes) for item in items):
            text = next(item for item in items if isinstance(item, bytes))
            raise UsageError(f"{file}: invalid ONNX model: {field.full_name} {text!r} is not valid UTF-8")


def _check_acyclic(graph: onnx.GraphProto, file: Path) -> None:
    """ONNX's checker reports a cycle as one node out of topological order; name every node of the cycle."""
    names = [node.name or f"{node.op_type}_{index}" for index, node in enumerate(graph.node)]
    producer = {output: index for index, node in enumerate(graph.node) for output in node.output if output}
    flow = nx.DiGraph()
    for index, node in enumerate(graph.node):
        flow.add_edges_from((producer[name], index) for name in node.input if name in producer)
    try:
        cycle = nx.find_cycle(flow)
    except nx.NetworkXNoCycle:
        pass
    else:
        path = " -> ".join(f"'{names[source]}'" for source, _ in cycle)
        raise UsageError(f"{file}: the graph has a cycle: nodes {path} -> '{names[cycle[0][0]]}'")
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for subgraph in [*subgraphs, *attribute.graphs]:
                _check_acyclic(subgraph, file)
