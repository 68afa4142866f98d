"""A model's large constants reach TVM beside its ONNX graph (reccc/weights_inputs.py): lifted out as
graph inputs and bound after import, they give the Relax module that importing them as initializers
gives, so what the targets build does not depend on how the weights travelled."""

import numpy as np
import onnx
import pytest
import tvm

import reccc
from reccc.ir import Model
from reccc.model_file import read_model
from reccc.targets import relax_lowering
from reccc.weights_inputs import LIFTED_MIN_BYTES, lift_weights, values_to_bind

from conftest import TESTSUITE_MODELS, model_path

# Pipelines whose graphs differ in what their constants feed: fp32 tables and FC weights; row-wise int8
# tables (codes, scales, biases) with int8 FC layers (QuantizeLinear / MatMulInteger and their scales).
PIPELINES = {"fp32": {}, "int8": {"embedding_quant": "int8", "fc_precision": "int8"}}


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_every_constant_lifted_and_bound_imports_as_the_initializers_do(tmp_path, name, pipeline):
    optimized = tmp_path / "optimized.onnx"
    reccc.compile(model_path(name), optimized, emit="onnx", **PIPELINES[pipeline])
    model = Model.from_onnx(read_model(optimized), str(optimized))
    # every matrix (what LIFTED_MIN_BYTES lifts in a real model): weights, tables, codes, row parameters;
    # not the shape operands (axes, shapes), which TVM's importer needs as constants
    lowered, lifted = model.to_onnx_lifting(lambda constant: len(constant.shape) >= 2)
    assert lifted, "nothing to lift"
    assert [value.name for value in lowered.graph.input][-len(lifted):] == [constant.name for constant in lifted]
    assert not {constant.name for constant in lifted} & {tensor.name for tensor in lowered.graph.initializer}
    expected = relax_lowering.to_relax(model.to_onnx())
    tvm.ir.assert_structural_equal(relax_lowering.to_relax(lowered, values_to_bind(lifted)), expected, map_free_vars=True)


def test_the_constants_of_a_megabyte_and_more_are_lifted(tmp_path):
    rows = LIFTED_MIN_BYTES // (4 * 16)
    table = onnx.numpy_helper.from_array(np.ones((rows, 16), np.float32), "table")
    small = onnx.numpy_helper.from_array(np.ones((rows - 1, 16), np.float32), "small")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "ids"], ["a"]), onnx.helper.make_node("Gather", ["small", "ids"], ["b"]),
         onnx.helper.make_node("Add", ["a", "b"], ["y"])],
        "lookups", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 16])], [table, small],
    )
    lowered, lifted = lift_weights(Model.from_onnx(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])))
    assert [constant.name for constant in lifted] == ["table"]
    assert [value.name for value in lowered.graph.input] == ["ids", "table"]
    assert [tensor.name for tensor in lowered.graph.initializer] == ["small"]
