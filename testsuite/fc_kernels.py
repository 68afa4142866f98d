"""What the tests of the FC layers' CPU kernels (test_fc_amx.py, test_fc_dot_products.py) share: a
one-layer model, a build's library with the graph --fc-precision rewrote, and a library's code and
kernel symbols."""

import subprocess

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def one_layer_model(path, fan_in: int, units: int, bias: bool):
    """Gemm (with a bias or without) + Relu of random weights, saved at `path`."""
    rng = np.random.default_rng(fan_in * 1000 + units)
    initializers = [numpy_helper.from_array(rng.standard_normal((fan_in, units)).astype(np.float32), "W")]
    inputs = ["x", "W"]
    if bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(units).astype(np.float32), "B"))
        inputs.append("B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", inputs, ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"])], "one_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", fan_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", units])], initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def library_and_graph(reccc_cli, folder, source, *flags):
    """The library (m.so) and the rewritten graph (m.onnx, loaded) the CLI writes in `folder` with `flags`."""
    library, graph = folder / "m.so", folder / "m.onnx"
    for output, emit in ((library, "library"), (graph, "onnx")):
        result = reccc_cli(source, f"--emit={emit}", *flags, "-o", output)
        assert result.code == 0, result.stderr
    return library, onnx.load(graph)


def disassembly(library) -> str:
    return subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout


def kernels(library, name: str) -> list[str]:
    """The library's exported kernels whose symbol contains `name`."""
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in symbols.splitlines() if name in line]


def layer_count(graph: onnx.ModelProto, precision: str) -> int:
    """The rewritten graph's int8 or bf16 FC layers."""
    if precision == "int8":
        return sum(node.op_type == "MatMulInteger" for node in graph.graph.node)
    return sum(node.name.endswith("__round_input") for node in graph.graph.node)
