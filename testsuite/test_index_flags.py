"""The index guard's out-of-range counts as one CPU kernel (reccc/targets/index_flags.py): the ids of
every bundled model are counted by one kernel in place of the guard's stacked comparisons, and a
compiled model raises for exactly the ids outside their tables, at -O2 (the kernel) as at -O1 (the
guard as its ONNX graph computes it), for any batch, the empty one included."""

import numpy as np
import onnx
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

import reccc
from reccc.errors import EmbeddingIndexError
from reccc.index_guard import guard_embedding_indices
from reccc.ir import Model
from reccc.reference import run_reference
from reccc.targets import relax_lowering
from reccc.targets.index_flags import KERNEL, select_index_flags_kernels

from conftest import TESTSUITE_MODELS, model_path

# The guard's comparisons (Gather's wrap-around of negative ids is a less of its own) and its sum.
_GUARD_OPS = {"relax.less": 1, "relax.greater_equal": 1, "relax.logical_or": 1, "relax.sum": 1}


def _calls(module: tvm.IRModule) -> tuple[list[str], list[str]]:
    """The names of main's operators and of the kernels it calls."""
    operators, kernels = [], []

    def visit(node):
        if isinstance(node, tvm.relax.Call) and isinstance(node.op, tvm.ir.Op):
            operators.append(node.op.name)
            if node.op.name == "relax.call_tir":
                kernels.append(node.args[0].name_hint)

    tvm.relax.analysis.post_order_visit(module["main"], visit)
    return operators, kernels


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_the_guard_of_every_bundled_model_is_one_kernel(name):
    model = Model.from_onnx(onnx.load(model_path(name)))
    guards = guard_embedding_indices(model, "error")
    imported = relax_lowering.to_relax(model.to_onnx())
    operators, kernels = _calls(imported)
    selected_operators, selected_kernels = _calls(select_index_flags_kernels(imported))
    assert len(guards) > 0 and KERNEL not in kernels
    assert selected_kernels.count(KERNEL) == 1
    assert {op: operators.count(op) - selected_operators.count(op) for op in _GUARD_OPS} == _GUARD_OPS


def test_a_model_without_guards_is_left_as_it_is():
    model = Model.from_onnx(onnx.load(model_path("dlrm")))
    guard_embedding_indices(model, "clamp")
    imported = relax_lowering.to_relax(model.to_onnx())
    assert select_index_flags_kernels(imported).same_as(imported)


# Ids of three shapes and two dtypes into tables of 7 and 5 rows: the guard counts them in two groups
# of ids of the same shape (the bag's are [batch, 3]).
_ROWS = {"single": 7, "bag": 5, "narrow": 7}


def _lookups_model(path):
    tables = [helper.make_tensor("t7", TensorProto.FLOAT, [7, 2], np.arange(14, dtype=np.float32)),
              helper.make_tensor("t5", TensorProto.FLOAT, [5, 2], 100 + np.arange(10, dtype=np.float32))]
    nodes = [
        helper.make_node("Gather", ["t7", "single"], ["a"], name="gather_single"),
        helper.make_node("Gather", ["t5", "bag"], ["bag_rows"], name="gather_bag"),
        helper.make_node("ReduceSum", ["bag_rows", "bag_axis"], ["b"], keepdims=0),
        helper.make_node("Gather", ["t7", "narrow"], ["c"], name="gather_narrow"),
        helper.make_node("Sum", ["a", "b", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "lookups",
        [helper.make_tensor_value_info("single", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("bag", TensorProto.INT64, ["batch", 3]),
         helper.make_tensor_value_info("narrow", TensorProto.INT32, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [*tables, helper.make_tensor("bag_axis", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.fixture(scope="module")
def lookups(tmp_path_factory):
    """The model's path and its artifacts at -O1 and -O2."""
    folder = tmp_path_factory.mktemp("lookups")
    _lookups_model(folder / "m.onnx")
    for level in (1, 2):
        reccc.compile(folder / "m.onnx", folder / f"O{level}.so", opt_level=level)
    return folder / "m.onnx", {level: reccc.load(folder / f"O{level}.so") for level in (1, 2)}


@st.composite
def _ids(draw):
    batch = draw(st.integers(0, 4))
    values = st.integers(-9, 9)
    return {
        "single": draw(hnp.arrays(np.int64, (batch,), elements=values)),
        "bag": draw(hnp.arrays(np.int64, (batch, 3), elements=values)),
        "narrow": draw(hnp.arrays(np.int32, (batch,), elements=values)),
    }


@settings(max_examples=60, deadline=None)
@given(ids=_ids())
def test_a_compiled_model_raises_for_exactly_the_ids_outside_their_tables(lookups, ids):
    path, compiled = lookups
    outside = [name for name, values in ids.items() if ((values < -_ROWS[name]) | (values >= _ROWS[name])).any()]
    for level, model in compiled.items():
        if outside:
            with pytest.raises(EmbeddingIndexError, match=f"input '({'|'.join(outside)})'"):
                model.run(ids)
        else:
            expected = run_reference(onnx.load(path), ids)["y"]
            np.testing.assert_array_equal(model.run(ids)["y"], expected, err_msg=f"-O{level}")
