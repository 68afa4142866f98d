"""legalize-embedding-bags on the Loops torch's dynamo exporter wrote for torchrec's
EmbeddingBagCollection (taken from the corpus: sum pooling for table t0, mean for t1), run on random
bags of any length, empty ones included: the rewritten graph has no Loop and computes the same pooled
rows as the exported loop in onnxruntime.
"""

from pathlib import Path

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from reccc.ir import Model
from reccc.pass_manager import create_pass
from reccc.plugins import PASS_GROUP, load_entry_points
from reccc.reference import agreement, run_reference

load_entry_points(PASS_GROUP)

EXPORT = Path(__file__).resolve().parent / "corpus" / "torchrec" / "dlrm.dynamo.onnx"
DIM = 8  # the tables' embedding dim: the exported empty-bag row is a constant [1, 8]


def loop_graph(mode: str) -> onnx.ModelProto:
    """The exported loop of one table around graph inputs: rows [P, 8] (gathered, weighted) and
    offsets [N + 1]; its outer names are bound to these and to the constants it reads."""
    exported = onnx.load(EXPORT)
    loop = [n for n in exported.graph.node if n.op_type == "Loop"][{"sum": 0, "mean": 1}[mode]]
    loop.input[1], loop.input[2] = "cond", "result"
    suffix = {"sum": "", "mean": "_2"}[mode]
    offsets, rows = f"getitem_{13 + (mode == 'mean')}", f"new_weight_0{suffix}"
    constants = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
                 (("val_100", [-1]), ("int64_1_cast", 1), ("int64_2", 2), ("val_16", [0]), ("val_31", 0))]
    nodes = [
        helper.make_node("Size", [offsets], ["bags_plus_one"]),
        helper.make_node("Sub", ["bags_plus_one", "int64_1_cast"], [f"num_bag_6{suffix}"]),
        helper.make_node("Identity", [rows], [f"split_with_sizes_split_1"]) if mode == "mean" else None,
        helper.make_node("Less", ["val_31", f"num_bag_6{suffix}"], ["cond"]),
        helper.make_node("SequenceEmpty", [], ["result"], dtype=TensorProto.FLOAT),
        loop,
        helper.make_node("ConcatFromSequence", [loop.output[0]], ["pooled"], axis=0),
    ]
    graph = helper.make_graph(
        [n for n in nodes if n is not None], f"bags_{mode}",
        [helper.make_tensor_value_info(rows, TensorProto.FLOAT, ["ids", DIM]),
         helper.make_tensor_value_info(offsets, TensorProto.INT64, ["bags_plus_one"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["bags", DIM])], constants)
    return helper.make_model(graph, opset_imports=list(exported.opset_import), ir_version=exported.ir_version)


@settings(max_examples=20, deadline=None)
@given(mode=st.sampled_from(["sum", "mean"]), lengths=st.lists(st.integers(0, 4), min_size=1, max_size=9),
       seed=st.integers(0, 2**32 - 1))
def test_embedding_bag_loop_becomes_a_segment_reduction_with_the_same_rows(mode, lengths, seed):
    proto = loop_graph(mode)
    model = Model.from_onnx(proto)
    assert create_pass("legalize-embedding-bags")(model)
    rewritten = model.to_onnx()
    assert not any(n.op_type in ("Loop", "SequenceEmpty", "ConcatFromSequence") for n in rewritten.graph.node)
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    names = [i.name for i in proto.graph.input]
    feeds = {names[0]: rng.standard_normal((int(offsets[-1]), DIM)).astype(np.float32), names[1]: offsets}
    expected, actual = run_reference(proto, feeds), run_reference(rewritten, feeds)
    for name, (error, bound) in agreement(expected, actual).items():
        assert error <= bound, f"{mode} over bags {lengths}: '{name}' error {error:.3g} > {bound:.3g}"


def test_other_loops_are_left_alone():
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["x", "x"], ["y"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", ""], ["ys"], body=body)], "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("ys", TensorProto.FLOAT, [3, 2])],
        [numpy_helper.from_array(np.array(3, np.int64), "n")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert create_pass("legalize-embedding-bags")(Model.from_onnx(proto)) is False
