"""legalize-embedding-bags on the Loops torch's dynamo exporter wrote for torchrec's
EmbeddingBagCollection (taken from the corpus: sum pooling for table t0, mean for t1; max is t0's loop
with ReduceMax for its ReduceSum), differentially against the exported loop in onnxruntime:

- bags of one length, with offsets computed from the batch as torchrec's `full()` lengths give them:
  the rewritten graph pools a Gather of [bags, length] ids with one reduction (the form the lookup
  fusion makes one kernel of; checked on the corpus DLRM's lowered module);
- bags of random lengths, empty ones included, or offsets of one length whose ids are not proven to
  fill the bags: the bag-membership form.
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


MEMBERSHIP = {"Range", "GreaterOrEqual", "Less", "And", "MatMul", "Where"}  # the form for bags of any length
LOOP = {"Loop", "SequenceEmpty", "ConcatFromSequence"}


def exported_loop(mode: str) -> tuple[onnx.ModelProto, onnx.NodeProto]:
    """The exported model and its loop for `mode`; max is the sum loop reducing with ReduceMax."""
    exported = onnx.load(EXPORT)
    loop = [n for n in exported.graph.node if n.op_type == "Loop"][{"sum": 0, "max": 0, "mean": 1}[mode]]
    loop.input[1], loop.input[2] = "cond", "result"
    if mode == "max":
        for node in _all_nodes(loop.attribute[0].g):
            if node.op_type == "ReduceSum":
                node.op_type = "ReduceMax"
    return exported, loop


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)


def loop_names(mode: str) -> tuple[str, str]:
    """The outer names the loop reads its offsets and its gathered rows from."""
    return f"getitem_{13 + (mode == 'mean')}", f"new_weight_0{'_2' if mode == 'mean' else ''}"


def around_loop(mode: str, inputs: list, nodes: list, initializers: list, ids: str) -> onnx.ModelProto:
    """The exported loop of one table in a graph whose `nodes` compute its offsets and rows (see
    loop_names) from `inputs`; `ids` is the tensor of the ids the rows were gathered for (the mean
    loop reads their count). Its other outer names are bound to the constants it reads."""
    exported, loop = exported_loop(mode)
    suffix = "_2" if mode == "mean" else ""
    offsets, _ = loop_names(mode)
    constants = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
                 (("val_100", [-1]), ("int64_1_cast", 1), ("int64_2", 2), ("val_16", [0]), ("val_31", 0))]
    nodes = [
        *nodes,
        helper.make_node("Size", [offsets], ["bags_plus_one"]),
        helper.make_node("Sub", ["bags_plus_one", "int64_1_cast"], [f"num_bag_6{suffix}"]),
        helper.make_node("Identity", [ids], ["split_with_sizes_split_1"]) if mode == "mean" else None,
        helper.make_node("Less", ["val_31", f"num_bag_6{suffix}"], ["cond"]),
        helper.make_node("SequenceEmpty", [], ["result"], dtype=TensorProto.FLOAT),
        loop,
        helper.make_node("ConcatFromSequence", [loop.output[0]], ["pooled"], axis=0),
    ]
    graph = helper.make_graph([n for n in nodes if n is not None], f"bags_{mode}", inputs,
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["bags", DIM])], constants + initializers)
    return helper.make_model(graph, opset_imports=list(exported.opset_import), ir_version=exported.ir_version)


def loop_graph(mode: str) -> onnx.ModelProto:
    """The loop around graph inputs: rows [P, 8] (gathered, weighted) and offsets [N + 1]."""
    offsets, rows = loop_names(mode)
    return around_loop(mode, [helper.make_tensor_value_info(rows, TensorProto.FLOAT, ["ids", DIM]),
                              helper.make_tensor_value_info(offsets, TensorProto.INT64, ["bags_plus_one"])], [], [], rows)


TABLE_ROWS = 50


def fixed_loop_graph(mode: str, length: int, rows_input: bool = False) -> onnx.ModelProto:
    """The loop over bags of `length` ids, as torchrec's dynamo export computes them: inputs ids and
    per-sample weights [batch, length], offsets = cumsum(full((batch,), length)) after a 0, rows = the
    table's rows gathered for the flattened ids times the weights. With `rows_input`, the rows are an
    input [P, 8] instead, which the offsets do not prove to be batch x length rows."""
    offsets, rows = loop_names(mode)
    vector = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    table = np.random.default_rng(length).standard_normal((TABLE_ROWS, DIM)).astype(np.float32)
    initializers = [vector("length", length), vector("zero", [0]), vector("row", [-1, 1]), vector("axis0", 0),
                    numpy_helper.from_array(table, "table")]
    nodes = [
        helper.make_node("Shape", ["ids"], ["batch"], start=0, end=1),
        helper.make_node("Expand", ["length", "batch"], ["lengths"]),
        helper.make_node("CumSum", ["lengths", "axis0"], ["ends"]),
        helper.make_node("Concat", ["zero", "ends"], [offsets], axis=0),
        helper.make_node("Reshape", ["ids", "val_100"], ["flat_ids"]),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", length])]
    if rows_input:
        inputs.append(helper.make_tensor_value_info(rows, TensorProto.FLOAT, ["ids", DIM]))
    else:
        inputs.append(helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["batch", length]))
        nodes += [helper.make_node("Gather", ["table", "flat_ids"], ["gathered"], axis=0),
                  helper.make_node("Reshape", ["weights", "row"], ["weight_column"]),
                  helper.make_node("Mul", ["gathered", "weight_column"], [rows])]
    return around_loop(mode, inputs, nodes, initializers, "flat_ids")


def _legalized(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = Model.from_onnx(proto)
    assert create_pass("legalize-embedding-bags")(model)
    return model.to_onnx()


def _assert_same_rows(proto: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict, case: str) -> None:
    expected, actual = run_reference(proto, feeds), run_reference(rewritten, feeds)
    for name, (error, bound) in agreement(expected, actual).items():
        assert error <= bound, f"{case}: '{name}' error {error:.3g} > {bound:.3g}"


@settings(max_examples=15, deadline=None)
@given(mode=st.sampled_from(["sum", "mean", "max"]), length=st.integers(1, 4), batch=st.integers(1, 9),
       seed=st.integers(0, 2**32 - 1))
def test_bags_of_one_length_become_a_gather_of_bags_and_one_reduction(mode, length, batch, seed):
    proto = fixed_loop_graph(mode, length)
    rewritten = _legalized(proto)
    ops = {n.op_type for n in rewritten.graph.node}
    assert not ops & (LOOP | MEMBERSHIP), f"{mode}, length {length}: {sorted(ops)}"
    producers = {out: node for node in rewritten.graph.node for out in node.output}
    reductions = [n for n in rewritten.graph.node if n.op_type in ("ReduceSum", "ReduceMax")]
    assert len(reductions) == 1
    # The reduced tensor: the table's rows gathered for ids shaped [bags, length], times the weights.
    weighted = producers[reductions[0].input[0]]
    assert weighted.op_type == "Mul"
    gather = next(producers[name] for name in weighted.input if producers.get(name) and producers[name].op_type == "Gather")
    assert gather.input[0] == "table"
    rng = np.random.default_rng(seed)
    feeds = {"ids": rng.integers(0, TABLE_ROWS, (batch, length)).astype(np.int64),
             "weights": rng.standard_normal((batch, length)).astype(np.float32)}
    _assert_same_rows(proto, rewritten, feeds, f"{mode} over {batch} bags of {length}")


@settings(max_examples=8, deadline=None)
@given(mode=st.sampled_from(["sum", "mean", "max"]), length=st.integers(1, 4), batch=st.integers(1, 9),
       seed=st.integers(0, 2**32 - 1))
def test_bags_of_one_length_over_rows_of_unproven_count_keep_the_membership_form(mode, length, batch, seed):
    """The offsets step by `length`, but the rows are an input: P = batch x length is not proven (fed
    so here, as the exported mean's last bag divides by P - its start)."""
    proto = fixed_loop_graph(mode, length, rows_input=True)
    rewritten = _legalized(proto)
    assert {"Range", "GreaterOrEqual", "Less"} <= {n.op_type for n in rewritten.graph.node}
    rng = np.random.default_rng(seed)
    _, rows = loop_names(mode)
    feeds = {"ids": rng.integers(0, TABLE_ROWS, (batch, length)).astype(np.int64),
             rows: rng.standard_normal((batch * length, DIM)).astype(np.float32)}
    _assert_same_rows(proto, rewritten, feeds, f"{mode} over {batch} bags of {length}")


@settings(max_examples=20, deadline=None)
@given(mode=st.sampled_from(["sum", "mean", "max"]), lengths=st.lists(st.integers(0, 4), min_size=1, max_size=9),
       trailing=st.integers(0, 2), seed=st.integers(0, 2**32 - 1))
def test_embedding_bag_loop_becomes_a_segment_reduction_with_the_same_rows(mode, lengths, trailing, seed):
    """`trailing` rows past the last offset: in no bag, but the exported mean counts them in the last."""
    proto = loop_graph(mode)
    rewritten = _legalized(proto)
    ops = {n.op_type for n in rewritten.graph.node}
    assert not ops & LOOP
    assert {"Range", "GreaterOrEqual", "Less"} <= ops, "offsets of a graph input are any lengths: the membership form"
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    names = [i.name for i in proto.graph.input]
    feeds = {names[0]: rng.standard_normal((int(offsets[-1]) + trailing, DIM)).astype(np.float32), names[1]: offsets}
    _assert_same_rows(proto, rewritten, feeds, f"{mode} over bags {lengths} and {trailing} more rows")


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


def test_each_table_of_the_exported_dlrm_pools_in_its_lookup_kernel(tmp_path):
    """The corpus DLRM (bags of 3 ids; tables t0 and t2 sum, t1 means) at -O2: one fused lookup kernel
    per table, whose output is the pooled [batch, 8], and no kernel of its own for the pooling."""
    import tvm
    from tvm import relax

    import reccc
    from reccc.targets import lookup_fusion, relax_lowering
    from reccc.targets.x86 import host_cpu

    optimized = tmp_path / "dlrm.opt.onnx"
    reccc.compile(str(EXPORT), str(optimized), emit="onnx", opt_level=2)
    with host_cpu().tvm_target():
        module = lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(optimized)))
    kernels = [(binding.value.args[0].name_hint, binding.var.ty) for block in module["main"].body.blocks
               for binding in block.bindings
               if isinstance(binding.value, relax.Call) and binding.value.op.same_as(tvm.ir.Op.get("relax.call_tir"))]
    lookups = [ty for name, ty in kernels if name.startswith(lookup_fusion.GROUP_PREFIX)]
    assert len(lookups) == 3, kernels
    assert all(len(ty.shape) == 2 and str(ty.shape[0]) == "batch" and int(ty.shape[1]) == DIM for ty in lookups), lookups
    assert not [name for name, _ in kernels if name.startswith(("sum", "mean", "max")) or "greater_equal" in name], kernels
