"""What the tests of the FC layers' kernels (test_fc_amx.py, test_fc_dot_products.py,
test_fc_tensor_cores.py) share: a one-layer model, a build's library with the graph --fc-precision
rewrote, a library's code and kernel symbols, the artifact's agreement with onnxruntime's run of the
rewritten graph, and kernels selected for another target run on this CPU."""

import re
import subprocess

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import tvm
from tvm.runtime.vm import VirtualMachine

from reccc.ir import Model
from reccc.reference import agreement, run_reference
from reccc.sample_inputs import random_inputs
from reccc.targets import relax_lowering
from reccc.targets.x86 import host_cpu


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


def selected_for_this_cpu(graph: onnx.ModelProto, select, kernel: str):
    """The graph's build with its FC layers selected by `select` (module -> module: a target's
    selector, for that target), compiled for this CPU by TVM's default schedules: the kernels'
    computation, not their target's schedule, which may need a GPU or an AMX host to run. Each int8
    layer must have become one `kernel`. As a function of the feeds."""
    kernels = []

    def selected(module, _):
        module = select(module)
        kernels.extend(function.name_hint for function in module.functions)
        return module

    executable = relax_lowering.build(graph, host_cpu().tvm_target(), 2, select_kernels=selected)
    assert sum(bool(re.fullmatch(rf"{kernel}\d*", name)) for name in kernels) == layer_count(graph, "int8") > 0, kernels
    main = VirtualMachine(executable, tvm.cpu())["main"]
    inputs = [value.name for value in graph.graph.input]
    outputs = [value.name for value in graph.graph.output]

    def run(feeds):
        result = main(*(tvm.runtime.tensor(feeds[name]) for name in inputs))
        values = [result] if len(outputs) == 1 else list(result)
        return {name: value.numpy() for name, value in zip(outputs, values)}

    return run


def assert_selected_int8_layer_is_exact(reccc_cli, folder, fan_in: int, units: int, bias: bool, run_selected) -> None:
    """A one-layer model's int8 layer (--fc-precision-layer), its kernels selected and run by
    `run_selected(graph)` (selected_for_this_cpu), equals onnxruntime's run of the rewritten graph bit
    for bit at batches 1, 5 and 67 of random x (scaled by 4, past the unit range) whose first row is
    zeros (the tiny scale, zero point 0)."""
    source = one_layer_model(folder / "fc.onnx", fan_in, units, bias)
    assert reccc_cli(source, "--emit=onnx", "--fc-precision-layer", "fc=int8", "-o", folder / "m.onnx").code == 0
    graph = onnx.load(folder / "m.onnx")
    run = run_selected(graph)
    rng = np.random.default_rng(fan_in * 1000 + units)
    for batch in (1, 5, 67):
        x = (rng.standard_normal((batch, fan_in)) * 4).astype(np.float32)
        x[0, :] = 0.0
        np.testing.assert_array_equal(run({"x": x})["y"], run_reference(graph, {"x": x})["y"])
