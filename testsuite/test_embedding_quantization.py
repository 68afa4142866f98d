"""Embedding-table quantization through the CLI and the pass API: the formats' error bounds, the
issue's size and accuracy targets on an embedding-dominated DLRM, valid ONNX that onnxruntime runs and
the artifact computes, one fused kernel per lookup (pooled lookups included), -O3's default under its
budget, per-table choices and the id guard."""

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

import reccc
from reccc.errors import EmbeddingIndexError
from reccc.ir import Model
from reccc.pass_manager import create_pass
from reccc.passes import embedding_quantization  # noqa: F401  (registers the pass create_pass names)
from reccc.passes.embedding_formats import cache_lines_per_lookup, encode
from reccc.reference import agreement, run_reference
from reccc.sample_inputs import random_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import testmodels  # noqa: E402
from conftest import model_path  # noqa: E402

DIM = 64


@pytest.fixture(scope="module")
def embedding_dlrm(tmp_path_factory) -> Path:
    """Tables are 99% of the bytes (4 x 20000 x 64 fp32), drawn from N(0, 1/dim) as the issue states. The top
    layer is wider than the tables, so concat-fc-fusion does not fold them into it in the fp32 build."""
    path = tmp_path_factory.mktemp("models") / "dlrm.onnx"
    onnx.save(testmodels.dlrm(tables=4, rows=20000, dim=DIM, bottom=(32,), top=(128,), table_std=DIM**-0.5, seed=7), path)
    return path


def accuracy_line(stderr: str) -> float:
    match = re.search(r"accuracy: output deviation on .*?max ([0-9.e+-]+)", stderr)
    assert match, stderr
    return float(match.group(1))


def deviation_from_fp32(source: Path, artifact: Path, batch: int = 256) -> float:
    proto = onnx.load(source)
    feeds = random_inputs(Model.from_onnx(proto), batch, seed=11)
    expected = run_reference(proto, feeds)
    actual = reccc.load(artifact).run(feeds)
    return max(float(np.max(np.abs(actual[name] - expected[name]))) for name in expected)


@pytest.mark.parametrize(("format", "size_ratio", "deviation"), [("int8", 0.30, 2e-3), ("int4", 0.17, 2e-2)])
def test_quantized_artifact_meets_the_size_and_accuracy_targets(reccc_cli, embedding_dlrm, tmp_path, format, size_ratio, deviation):
    fp32, quantized = tmp_path / "fp32.so", tmp_path / f"{format}.so"
    assert reccc_cli(embedding_dlrm, "-o", fp32).code == 0
    result = reccc_cli(embedding_dlrm, f"--embedding-quant={format}", "-o", quantized)
    assert result.code == 0, result.stderr
    assert quantized.stat().st_size <= size_ratio * fp32.stat().st_size
    assert accuracy_line(result.stderr) <= deviation  # the guard's measurement on its calibration batch
    assert deviation_from_fp32(embedding_dlrm, quantized) <= deviation  # and on other rows, run compiled


def test_fp16_tables_halve_and_stay_close(reccc_cli, embedding_dlrm, tmp_path):
    result = reccc_cli(embedding_dlrm, "--embedding-quant=fp16", "--emit=onnx", "-o", tmp_path / "m.onnx")
    assert result.code == 0, result.stderr
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert sum(v.dtype == np.float16 for v in stored.values()) == 4
    assert accuracy_line(result.stderr) <= 1e-4


@pytest.mark.parametrize("format", ["int8", "int4", "fp16"])
def test_quantized_graph_is_valid_onnx_and_the_artifact_computes_it_exactly(reccc_cli, embedding_dlrm, tmp_path, format):
    graph, artifact = tmp_path / f"{format}.onnx", tmp_path / f"{format}.so"
    assert reccc_cli(embedding_dlrm, f"--embedding-quant={format}", "--emit=onnx", "-o", graph).code == 0
    assert reccc_cli(embedding_dlrm, f"--embedding-quant={format}", "-o", artifact).code == 0
    proto = onnx.load(graph)
    onnx.checker.check_model(proto, full_check=True)
    stored = {"int8": {TensorProto.UINT8}, "int4": {TensorProto.UINT8, TensorProto.FLOAT16}, "fp16": {TensorProto.FLOAT16}}[format]
    assert {t.data_type for t in proto.graph.initializer} >= stored
    feeds = random_inputs(Model.from_onnx(onnx.load(embedding_dlrm)), 33, seed=5)
    feeds["cat_1"][:3] -= 20000  # negative ids count from the table's end, in onnxruntime and in the fused lookup
    expected = run_reference(proto, feeds)  # onnxruntime runs the quantized graph: it stays the reference
    for name, (error, bound) in agreement(expected, reccc.load(artifact).run(feeds)).items():
        assert error <= bound, f"output '{name}': {error} > {bound}"


def lowered_lookups(proto: onnx.ModelProto, weights: str = "embed", table_rows: int = 1000, scheduled: bool = True) -> list[tuple[list, object, object]]:
    """The calls of the module -O2 compiles from the optimized graph `proto` (ids guarded as the
    compiler guards them, large tables made parameters with --weights=external, fused by
    reccc.targets.lookup_fusion, scheduled by the CPU rules unless not `scheduled`) that read an
    embedding table's stored tensors (2-D constants of at least `table_rows` rows): their shapes and
    dtypes, the call's output type, the kernel."""
    import tvm
    from tvm import relax

    from reccc.index_guard import guard_embedding_indices
    from reccc.targets import cpu_schedules, lookup_fusion, relax_lowering
    from reccc.targets.x86 import host_cpu
    from reccc.weights_inputs import lift_weights, values_to_bind

    model = Model.from_onnx(proto)
    guard_embedding_indices(model, "error")
    lowered, lifted = lift_weights(model)
    constants = values_to_bind(lifted) if weights == "embed" else []
    target = host_cpu().tvm_target()
    with target:
        module = lookup_fusion.fuse_operators()(relax_lowering.without_repeated_work(relax_lowering.to_relax(lowered, constants)))
        if scheduled:
            module = cpu_schedules.apply_default_schedules(module, target)
    calls = []
    for block in module["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not (isinstance(call, relax.Call) and call.op.name == "relax.call_tir"):
                continue
            tables = [(tuple(int(d) for d in arg.ty.shape), arg.ty.dtype) for arg in call.args[1].fields
                      if len(getattr(arg.ty, "shape", ())) == 2 and isinstance(arg.ty.shape[0], tvm.tirx.IntImm) and int(arg.ty.shape[0]) >= table_rows]
            if tables:
                calls.append((tables, binding.var.ty, module[call.args[0]]))
    return calls


def one_loop_nest(kernel) -> bool:
    """Every intermediate was inlined: the kernel is its output's block (and a reduction's init), parallel
    over rows and vectorized along them, so each stored row is loaded once, straight into the output.
    Where a batch of few rows runs on the calling thread (cpu_schedules.PARALLEL_MIN_WORK), the kernel
    branches on the rows, and that branch is the same loop nest but for the parallel loop."""
    import tvm
    from tvm import s_tir

    def single_nest(function) -> bool:
        schedule = s_tir.Schedule(function)
        blocks = [schedule.get(b).name_hint for b in schedule.get_child_blocks(schedule.get_sblock("root"))]
        text = function.script()
        single = len(blocks) == 1 or (len(blocks) == 2 and blocks[0].endswith("_init"))
        return single and "sblock_alloc_buffer" not in text and "T.vectorized" in text

    root = kernel.body.block
    if isinstance(root.body, tvm.tirx.IfThenElse):
        serial, parallel = (kernel.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", branch, alloc_buffers=root.alloc_buffers)))
                            for branch in (root.body.then_case, root.body.else_case))
        return single_nest(serial) and "T.parallel" not in serial.script() and single_nest(parallel) and "T.parallel" in parallel.script()
    return single_nest(kernel) and "T.parallel" in kernel.script()


@pytest.mark.parametrize(("format", "weights"), [("int8", "embed"), ("int4", "embed"), ("fp16", "embed"), ("none", "embed"),
                                                 ("int8", "external"), ("none", "external")])
def test_the_lookups_a_concat_joins_are_one_kernel_that_reads_each_row_once(reccc_cli, embedding_dlrm, tmp_path, format, weights):
    """The DLRM's four lookups meet the bottom MLP's output in a Concat: one kernel reads every constant
    each table is stored in and writes the concatenation, each stored row read once, straight into
    its columns of the output row."""
    graph = tmp_path / "m.onnx"
    assert reccc_cli(embedding_dlrm, f"--embedding-quant={format}", "--emit=onnx", "-o", graph).code == 0
    calls = lowered_lookups(onnx.load(graph), weights)
    expected = {"int8": [((20000, 64), "uint8"), ((20000, 2), "float32")],
                "int4": [((10000, 64), "uint8"), ((20000, 2), "float16")],
                "fp16": [((20000, 64), "float16")],
                "none": [((20000, 64), "float32")]}[format]
    (tables, output, kernel), = calls
    assert sorted(tables) == sorted(4 * expected)
    assert output.dtype == "float32" and [int(d) for d in list(output.shape)[1:]] == [(1 + 4) * DIM]  # the bottom MLP ends at DIM too
    assert one_loop_nest(kernel), kernel.script()


@pytest.mark.parametrize("format", ["int8", "int4", "none"])
def test_a_lookup_kernel_inlined_table_by_table_is_the_kernel_inlined_in_one_scope(reccc_cli, embedding_dlrm, tmp_path, format):
    """The CPU rules inline each table's blocks in a scope of their own before the Concat's
    (kernel_blocks.inline_producers, for compile time): the kernel is the same as inlining every
    block, producers first, in the kernel's one scope."""
    from tvm import s_tir
    import tvm_ffi

    from reccc.targets.kernel_blocks import inline_producers, root_blocks

    graph = tmp_path / "m.onnx"
    assert reccc_cli(embedding_dlrm, f"--embedding-quant={format}", "--emit=onnx", "-o", graph).code == 0
    (_, _, kernel), = lowered_lookups(onnx.load(graph), scheduled=False)
    schedule = s_tir.Schedule(kernel)
    assert len(root_blocks(schedule)) > 4 * 2
    for block in root_blocks(schedule):
        try:
            schedule.compute_inline(block)
        except s_tir.ScheduleError:
            continue
    assert tvm_ffi.structural_equal(inline_producers(kernel), schedule.mod["main"])


def test_a_quantized_tables_lookup_wraps_its_ids_around_once(reccc_cli, embedding_dlrm, tmp_path):
    """TVM's importer writes Gather's wrap-around of negative ids once per Gather, so an int8 table's
    codes and scale/bias gathers would wrap the same ids twice: what the build runs before lowering
    (relax_lowering.without_repeated_work) leaves one wrap-around (a `where`) a table in the lookup kernel."""
    from tvm import s_tir

    from reccc.targets.kernel_blocks import root_blocks

    graph = tmp_path / "m.onnx"
    assert reccc_cli(embedding_dlrm, "--embedding-quant=int8", "--emit=onnx", "-o", graph).code == 0
    (tables, _, kernel), = lowered_lookups(onnx.load(graph), scheduled=False)
    schedule = s_tir.Schedule(kernel)
    wrap_arounds = [b for b in root_blocks(schedule) if schedule.get(b).name_hint.startswith("T_where")]
    assert len(tables) == 2 * 4 and len(wrap_arounds) == 4


def test_lookups_whose_rows_flow_into_several_readers_are_one_kernel_each(reccc_cli, tmp_path):
    """DeepFM's embeddings feed the FM interaction and the MLP, and its ids, clipped once, feed the
    first-order table too (kept fp32: int8 would not shrink its dim-1 rows): each lookup still gathers
    (and dequantizes) its rows in one kernel, the embeddings' group ending at the rows (one loop nest)
    and taking the clipped ids as an input. (The first-order lookup's group goes on through its sum
    into the FM term it is added to.)"""
    graph = tmp_path / "deepfm.onnx"
    assert reccc_cli(model_path("deepfm"), "--embedding-quant=int8", "--embedding-quant-min-bytes=0", "--emit=onnx", "-o", graph).code == 0
    calls = lowered_lookups(onnx.load(graph), table_rows=300)
    assert sorted(sorted(tables) for tables, _, _ in calls) == [
        [((300, 1), "float32")],  # first-order weights
        [((300, 2), "float32"), ((300, 8), "uint8")],  # the fields' embeddings
    ]
    (embeddings,) = [kernel for tables, _, kernel in calls if ((300, 8), "uint8") in tables]
    assert one_loop_nest(embeddings), embeddings.script()


def embedding_bag_model(rows: int, dim: int, bag: int, seed: int = 0) -> onnx.ModelProto:
    """An EmbeddingBag(mode="sum") as exporters write a fixed-size bag: Gather then ReduceSum over the bag."""
    table = (np.random.default_rng(seed).standard_normal((rows, dim)) / np.sqrt(dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup", axis=0),
        helper.make_node("ReduceSum", ["rows", "bag_axis"], ["pooled"], name="pool", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "embedding_bag",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", bag])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", dim])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1], np.int64), "bag_axis")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_pooled_lookup_dequantizes_and_pools_in_one_kernel(reccc_cli, tmp_path):
    source = tmp_path / "bag.onnx"
    onnx.save(embedding_bag_model(rows=5000, dim=64, bag=6), source)
    graph, artifact = tmp_path / "bag.int8.onnx", tmp_path / "bag.so"
    assert reccc_cli(source, "--embedding-quant=int8", "--emit=onnx", "-o", graph).code == 0
    assert reccc_cli(source, "--embedding-quant=int8", "-o", artifact).code == 0
    (tables, output, kernel), = lowered_lookups(onnx.load(graph))
    assert sorted(tables) == [((5000, 2), "float32"), ((5000, 64), "uint8")]
    assert len(output.shape) == 2 and int(output.shape[1]) == 64 and one_loop_nest(kernel)  # pooled in the kernel
    feeds = random_inputs(Model.from_onnx(onnx.load(source)), 17, seed=2)
    expected = run_reference(onnx.load(graph), feeds)
    for name, (error, bound) in agreement(expected, reccc.load(artifact).run(feeds)).items():
        assert error <= bound


def lookup_model(table: np.ndarray) -> Model:
    """One Gather of `table` at run-time ids."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"], name="lookup", axis=0)], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", table.shape[1]])],
        [numpy_helper.from_array(table, "table")],
    )
    return Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def quantized_lookup(table: np.ndarray, format: str) -> np.ndarray:
    """Every row of `table` read back through the quantized graph in onnxruntime."""
    model = lookup_model(table)
    assert create_pass("embedding-quantization", format=format, min_bytes=0)(model)
    return run_reference(model.to_onnx(), {"ids": np.arange(table.shape[0], dtype=np.int64)})["out"]


# From dim 3, where int8 makes a table smaller (narrower ones stay fp32:
# test_a_format_that_would_not_shrink_a_table_leaves_it_fp32).
tables = arrays(
    np.float32,
    st.tuples(st.integers(1, 12), st.integers(3, 40)),
    elements=st.floats(-1e3, 1e3, width=32),
).map(lambda t: (t * 10.0 ** np.random.default_rng(t.size).integers(-4, 2)).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(table=tables)
def test_int8_and_int4_error_is_within_half_a_step_of_each_row(table):
    spread = (table.max(axis=1) - table.min(axis=1))[:, None]
    int8 = np.abs(quantized_lookup(table, "int8") - table)
    assert np.all(int8 <= spread / 255 / 2 * 1.001 + 1e-6 * np.abs(table).max(axis=1, keepdims=True) + 1e-30)
    int4 = np.abs(quantized_lookup(table, "int4") - table)
    # fp16 scale and bias add their rounding (2^-11 relative, 2^-25 absolute below fp16's normals) to the half step.
    slack = 2.0**-10 * (np.abs(table).max(axis=1, keepdims=True) + spread) + 2.0**-23
    assert np.all(int4 <= spread / 15 / 2 + slack)


@settings(max_examples=30, deadline=None)
@given(table=tables)
def test_fp16_error_is_fp16_rounding(table):
    error = np.abs(quantized_lookup(table, "fp16") - table)
    assert np.all(error <= 2.0**-11 * np.abs(table) + 2.0**-24)


def test_O3_quantizes_large_tables_by_default_and_none_turns_it_off(reccc_cli, embedding_dlrm, tmp_path):
    pipeline = reccc_cli("-O3", "--print-pipeline").stdout
    assert "embedding-quantization<format=auto>" in pipeline
    assert "embedding-quantization" not in reccc_cli("-O3", "--embedding-quant=none", "--print-pipeline").stdout
    assert "embedding-quantization" not in reccc_cli("-O2", "--print-pipeline").stdout
    result = reccc_cli(embedding_dlrm, "-O3", "--emit=onnx", "-o", tmp_path / "m.onnx")
    assert result.code == 0 and accuracy_line(result.stderr) <= 2e-3
    assert sum(t.data_type == TensorProto.UINT8 for t in onnx.load(tmp_path / "m.onnx").graph.initializer) == 4  # dim 64: int8


def test_auto_stores_each_table_in_the_format_whose_lookup_reads_fewest_cache_lines(reccc_cli, embedding_dlrm, tmp_path):
    """-O3's default. A 16-value row is one cache line as fp16 or fp32, but int8's scale and bias are a
    second line beside its codes: fp16. From 64 values int8 reads no more lines than fp16: int8."""
    narrow = tmp_path / "narrow.onnx"
    onnx.save(testmodels.deepfm(fields=4, rows=20000, dim=16, seed=5), narrow)  # 1.3 MB shared table
    result = reccc_cli(narrow, "-O3", "--time-passes", "--emit=onnx", "-o", tmp_path / "n.onnx")
    assert result.code == 0, result.stderr
    assert re.search(r"table '(\w+)' 20000x16: fp16 \(auto: a lookup reads 1 cache line as fp16, 2 cache lines as int8\), 1280000 -> 640000 bytes", result.stderr)
    stored = {t.name: t.data_type for t in onnx.load(tmp_path / "n.onnx").graph.initializer}
    assert TensorProto.UINT8 not in stored.values() and sum(name.endswith(".values") for name in stored) == 1
    feeds = random_inputs(Model.from_onnx(onnx.load(narrow)), 33, seed=3)
    assert reccc_cli(narrow, "-O3", "-o", tmp_path / "n.so").code == 0
    for output, (error, bound) in agreement(run_reference(onnx.load(tmp_path / "n.onnx"), feeds), reccc.load(tmp_path / "n.so").run(feeds)).items():
        assert error <= bound, output
    wide = reccc_cli(embedding_dlrm, "--embedding-quant=auto", "--time-passes", "--emit=onnx", "-o", tmp_path / "w.onnx")
    assert len(re.findall(r"20000x64: int8 \(auto: a lookup reads 2 cache lines as int8, 2 cache lines as fp16\)", wide.stderr)) == 4
    assert reccc_cli(narrow, "--embedding-quant=int8", "--emit=onnx", "-o", tmp_path / "i.onnx").code == 0  # asked for: int8
    assert TensorProto.UINT8 in {t.data_type for t in onnx.load(tmp_path / "i.onnx").graph.initializer}


def test_auto_falls_back_to_the_format_that_can_store_the_table():
    """Values beyond fp16's range leave int8, though fp16 would read fewer lines; a NaN leaves neither."""
    wide_range = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    wide_range[3, 5] = 1e6
    auto = create_pass("embedding-quantization", format="auto", min_bytes=0)
    assert auto(lookup_model(wide_range))
    assert auto.details()[0].startswith("table 'table' 100x16: int8 (auto: a lookup reads 2 cache lines as int8), 6400 -> 2400 bytes")
    broken = wide_range.copy()
    broken[7, 0] = np.nan
    assert not auto(lookup_model(broken))
    assert auto.details() == ["table 'table' 100x16: kept fp32: cannot store it as int8: it holds NaN or Inf"]


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 300), format=st.sampled_from(["int8", "int4", "fp16"]))
def test_cache_lines_per_lookup_is_the_average_over_the_tables_rows(dim, format):
    """Against counting the lines each of 128 rows (a whole period of any row size's offsets) spans in
    each stored array, the arrays starting on a line."""
    table = np.random.default_rng(dim).standard_normal((256, dim)).astype(np.float32)
    counted = 0.0
    for array in encode(table, format).arrays.values():
        row_bytes = array.itemsize * int(np.prod(array.shape[1:]))
        starts = np.arange(128) * row_bytes
        counted += np.mean((starts + row_bytes - 1) // 64 - starts // 64 + 1)
    assert cache_lines_per_lookup(table, format) == pytest.approx(counted)


def outlier_model(tmp_path: Path) -> Path:
    """One huge value per row stretches int8's step far beyond the other values' size, and the output
    reads only those: int8 moves it by far more than 1% of its scale."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((5000, 64)).astype(np.float32)
    table[:, 0] = 1e4
    weight = np.zeros((64, 1), np.float32)
    weight[1:] = 1.0
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0), helper.make_node("MatMul", ["rows", "w"], ["score"])],
        "outliers",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "outliers.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_O3_keeps_tables_fp32_when_the_default_budget_would_be_exceeded(reccc_cli, tmp_path):
    source = outlier_model(tmp_path)
    result = reccc_cli(source, "-O3", "--emit=onnx", "-o", tmp_path / "m.onnx")
    assert result.code == 0, result.stderr
    assert "embedding tables kept fp32" in result.stderr
    assert all(t.data_type == TensorProto.FLOAT for t in onnx.load(tmp_path / "m.onnx").graph.initializer)
    # Asked for explicitly, the same quantization is the user's choice: it is kept, its effect reported ...
    asked = reccc_cli(source, "-O3", "--embedding-quant=int8", "--emit=onnx", "-o", tmp_path / "asked.onnx")
    assert asked.code == 0 and accuracy_line(asked.stderr) > 1.0
    # ... and a budget makes the build fail with nothing written.
    failed = reccc_cli(source, "--embedding-quant=int8", "--accuracy-budget=0.5", "-o", tmp_path / "m.so")
    assert failed.code == 1 and "accuracy budget exceeded" in failed.stderr and not (tmp_path / "m.so").exists()


def test_tables_get_their_own_format_by_name_and_small_ones_stay_fp32(reccc_cli, tmp_path):
    source = tmp_path / "mixed.onnx"
    onnx.save(testmodels.dlrm(tables=3, rows=6000, dim=64, seed=2), source)  # 1.5 MB tables
    names = [t.name for t in onnx.load(source).graph.initializer if t.name.startswith("emb")]
    result = reccc_cli(
        source, "--embedding-quant=int8", f"--embedding-quant-table={names[0]}=none", f"--embedding-quant-table={names[1]}=int4",
        "--time-passes", "--emit=onnx", "-o", tmp_path / "m.onnx",
    )
    assert result.code == 0, result.stderr
    assert f"table '{names[0]}' 6000x64: kept fp32" in result.stderr
    assert re.search(rf"table '{names[1]}' 6000x64: int4, 1536000 -> \d+ bytes", result.stderr)
    assert re.search(rf"table '{names[2]}' 6000x64: int8, 1536000 -> 432000 bytes", result.stderr)
    stored = {t.name for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert f"{names[0]}.codes" not in stored and {f"{names[1]}.codes", f"{names[2]}.codes"} <= stored
    bigger = reccc_cli(source, "--embedding-quant=int8", "--embedding-quant-min-bytes=2000000", "--emit=onnx", "-o", tmp_path / "n.onnx")
    assert bigger.code == 0 and all(t.data_type == TensorProto.FLOAT for t in onnx.load(tmp_path / "n.onnx").graph.initializer)


def test_a_format_that_would_not_shrink_a_table_leaves_it_fp32(reccc_cli, tmp_path):
    """DeepFM's first-order weights are a dim-1 table: int8 with a per-row scale and bias would take
    9 bytes a row instead of 4 (and its lookups read more), int4 4.5. fp16 still halves it."""
    source = Path(__file__).parent / "models" / "deepfm.onnx"
    result = reccc_cli(source, "--embedding-quant=int8", "--embedding-quant-min-bytes=0", "--time-passes", "--emit=onnx", "-o", tmp_path / "m.onnx")
    assert result.code == 0, result.stderr
    assert "table 'emb_1' 300x1: kept fp32: int8 would store it in 2700 bytes, not fewer than its 1200" in result.stderr
    assert re.search(r"table 'emb_7' 300x8: int8, 9600 -> 4800 bytes", result.stderr)
    stored = {t.name: t.data_type for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert stored["emb_1"] == TensorProto.FLOAT and "emb_1.codes" not in stored and stored["emb_7.codes"] == TensorProto.UINT8
    asked = reccc_cli(source, "--embedding-quant=int8", "--embedding-quant-table=emb_1=int4", "-o", tmp_path / "m.so")
    assert asked.code == 2 and not (tmp_path / "m.so").exists()
    assert asked.stderr.strip().splitlines()[-1] == (
        "reccc: error: embedding-quantization: table 'emb_1' 300x1: int4 would store it in 1350 bytes, "
        "not fewer than its 1200; choose another format for it"
    )
    halved = reccc_cli(source, "--embedding-quant=int8", "--embedding-quant-table=emb_1=fp16", "--emit=onnx", "-o", tmp_path / "h.onnx")
    assert halved.code == 0 and "emb_1.values" in {t.name for t in onnx.load(tmp_path / "h.onnx").graph.initializer}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--embedding-quant=int8", "--embedding-quant-table=no_such_table=int4"], "no embedding table named 'no_such_table'"),
        (["--embedding-quant-table=emb_1=int4"], "embedding tables are not quantized in this build"),
        (["--embedding-quant=int8", "--embedding-quant-table=emb_1=int3"], "expected NAME=FORMAT"),
        (["--embedding-quant=int2"], "invalid choice"),
        (["--embedding-quant=int8", "--embedding-quant-min-bytes=-1"], "min_bytes must be a non-negative integer"),
    ],
)
def test_bad_quantization_flags_are_usage_errors(reccc_cli, tmp_path, flags, message):
    result = reccc_cli(Path(__file__).parent / "models" / "dlrm.onnx", *flags, "-o", tmp_path / "m.so")
    assert result.code == 2 and message in result.stderr and not (tmp_path / "m.so").exists()


def test_out_of_range_ids_into_a_quantized_table_raise_naming_the_input(reccc_cli, embedding_dlrm, tmp_path):
    assert reccc_cli(embedding_dlrm, "--embedding-quant=int4", "-o", tmp_path / "m.so").code == 0
    model = reccc.load(tmp_path / "m.so")
    feeds = random_inputs(Model.from_onnx(onnx.load(embedding_dlrm)), 4, seed=1)
    feeds["cat_2"][3] = 20000
    with pytest.raises(EmbeddingIndexError, match="input 'cat_2': id 20000 at \\[3\\]"):
        model.run(feeds)


@pytest.mark.parametrize("name", ["dlrm", "wide_and_deep", "two_tower", "deepfm"])
def test_every_bundled_model_with_all_tables_quantized_compiles_to_its_quantized_graph(reccc_cli, tmp_path, name):
    """All tables, whatever their size, but those int4 would not shrink (wide_and_deep's and deepfm's
    dim-1 tables; deepfm's other table feeds a pooling, a product and a flatten at once)."""
    source = Path(__file__).parent / "models" / f"{name}.onnx"
    flags = ["--embedding-quant=int4", "--embedding-quant-min-bytes=0"]
    assert reccc_cli(source, *flags, "--emit=onnx", "-o", tmp_path / "q.onnx").code == 0
    assert reccc_cli(source, *flags, "-o", tmp_path / "q.so").code == 0
    quantized = onnx.load(tmp_path / "q.onnx")
    assert any(t.data_type == TensorProto.UINT8 for t in quantized.graph.initializer)
    feeds = random_inputs(Model.from_onnx(onnx.load(source)), 9, seed=4)
    expected = run_reference(quantized, feeds)
    for output, (error, bound) in agreement(expected, reccc.load(tmp_path / "q.so").run(feeds)).items():
        assert error <= bound, f"{name} output '{output}': {error} > {bound}"
