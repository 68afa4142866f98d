"""What the tests of the FC layers' CPU kernels (test_fc_amx.py, test_fc_dot_products.py) share: a
one-layer model, a build's library with the graph --fc-precision rewrote, a library's code and kernel
symbols, and the artifact's agreement with onnxruntime's run of the rewritten graph."""

import subprocess

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from reccc.ir import Model
from reccc.reference import agreement, run_reference
from reccc.sample_inputs import random_inputs


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


def assert_agrees_with_graph(graph: onnx.ModelProto, run, batches) -> None:
    """`run(feeds)` agrees with onnxruntime's run of `graph` (fp32 bound) on random valid inputs at each batch."""
    for batch in batches:
        feeds = random_inputs(Model.from_onnx(graph), batch, seed=batch)
        for output, (error, bound) in agreement(run_reference(graph, feeds), run(feeds)).items():
            assert error <= bound, (batch, output, error, bound)


def assert_layer_agrees(artifact, graph: onnx.ModelProto, fan_in: int, batches, exact: bool) -> None:
    """A one-layer artifact's output y on random x (scaled by 4, past the unit range) equals
    onnxruntime's run of `graph` bit for bit (`exact`) or within the fp32 bound, at each batch."""
    rng = np.random.default_rng(fan_in)
    for batch in batches:
        x = (rng.standard_normal((batch, fan_in)) * 4).astype(np.float32)
        actual, expected = np.asarray(artifact.run({"x": x})["y"]), run_reference(graph, {"x": x})["y"]
        assert actual.shape == expected.shape
        if exact:
            np.testing.assert_array_equal(actual, expected)
        else:
            for _, (error, bound) in agreement({"y": expected}, {"y": actual}).items():
                assert error <= bound, (batch, error, bound)
