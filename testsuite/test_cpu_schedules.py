"""reccc's default CPU schedules: they apply to the fused matmul, lookup and concatenation kernels at
-O2 (parallel, vectorized, register-tiled) and leave other kernels alone; numerics are covered by the runtime tests, which run -O2
artifacts at batch sizes that do and do not divide the tile (1, 7, 64, 2048)."""

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from tvm import s_tir

import reccc
from reccc.targets import cpu_schedules, lookup_fusion, relax_lowering
from reccc.targets.x86 import host_cpu

from conftest import TESTSUITE_MODELS, assert_matches_onnxruntime, model_path


def _fused_module(name: str) -> tvm.IRModule:
    target = host_cpu().tvm_target()
    with target:
        return lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(model_path(name))))


def _narrow(function: tvm.tirx.PrimFunc) -> bool:
    """A matmul kernel of fewer output columns than a vector of the host (a CTR model's last layer)."""
    return int(function.params[-1].shape[-1]) < cpu_schedules.vector_lanes(host_cpu().tvm_target())


@pytest.mark.parametrize("name", ["dlrm", "two_tower"])
def test_every_matmul_kernel_is_scheduled(name):
    target = host_cpu().tvm_target()
    module = cpu_schedules.apply_default_schedules(_fused_module(name), target)
    matmul_kernels = [(symbol.name_hint, f) for symbol, f in module.functions.items() if "matmul" in symbol.name_hint]
    assert matmul_kernels
    for kernel_name, function in matmul_kernels:
        text = function.script()
        assert "T.parallel" in text and "T.vectorized" in text, kernel_name
        # the reduction's initialization was hoisted out of the K loop (a narrow one's, of its vector partial sums)
        assert ("matmul_rf_init" if _narrow(function) else "matmul_init") in text, kernel_name


def test_a_layer_of_fewer_columns_than_a_vector_sums_each_row_in_vectors(tmp_path):
    """A 64 -> 1 layer (a CTR logit) is a vectorized dot product per row, its 16 partial sums then
    added, without the register tile's weight padded to a whole vector; 64 -> 5 too. Both agree with
    onnxruntime, one row and many, on the calling thread and in parallel."""
    target = host_cpu().tvm_target()
    for widths in ([64, 1], [64, 5]):
        source = _mlp(tmp_path / f"m{widths[-1]}.onnx", 32, widths, seed=3)
        with target:
            module = lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(source)))
        scheduled = cpu_schedules.apply_default_schedules(module, target)
        (narrow,) = [f for s, f in scheduled.functions.items() if "matmul" in s.name_hint and _narrow(f)]
        text = narrow.script()
        assert "matmul_rf" in text and "_pad" not in text and "T.parallel" in text, text
        library = tmp_path / f"m{widths[-1]}.so"
        reccc.compile(source, library)
        for batch in (1, 7, 4096):
            assert_matches_onnxruntime(source, reccc.load(library).run, batch, seed=batch)


def test_vector_width_follows_the_target():
    avx512 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    avx2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    generic = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    assert [cpu_schedules.vector_lanes(t) for t in (avx512, avx2, generic)] == [16, 8, 4]


def _vectorized_loops(kernel) -> int:
    return kernel.script().count("T.vectorized")


def test_lookups_joined_by_a_concatenation_are_one_kernel_copying_each_source_in_vectors():
    """The bundled DLRM's lookups and the bottom MLP's output meet in a Concat: one kernel computes it,
    parallel over the rows, each row a vectorized copy per source (the bottom MLP's output, then each
    table's row), every other non-matmul kernel left to TVM."""
    module = _fused_module("dlrm")
    functions = {s.name_hint: f for s, f in module.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    scheduled = cpu_schedules.apply_default_schedules(module, host_cpu().tvm_target())
    (lookups,) = [name for name in functions if name.startswith(lookup_fusion.GROUP_PREFIX)]
    assert not [name for name in functions if name.startswith("concatenate")]
    sources = 1 + sum(1 for init in onnx.load(model_path("dlrm")).graph.initializer if init.name.startswith("emb"))
    kernel = _parallel_branch(scheduled[lookups])
    assert "T.parallel" in kernel.script() and _vectorized_loops(kernel) == sources, kernel.script()
    for name, function in functions.items():
        if "matmul" not in name and name != lookups:
            assert scheduled[name].same_as(function), name


def test_each_source_copy_of_a_concatenation_declares_reading_only_its_source():
    """A lookup kernel's copy of a table's row reads that table and its ids alone, and declares so:
    the block regions TIR's lowering simplifies grew with the square of the tables when each copy kept
    the whole concatenation's."""
    module = _fused_module("dlrm")
    (lookups,) = [s for s in module.functions if s.name_hint.startswith(lookup_fusion.GROUP_PREFIX)]
    kernel = cpu_schedules.apply_default_schedules(module, host_cpu().tvm_target())[lookups]
    copies = []
    tvm_ffi.structural_walk(kernel.body, [(s_tir.SBlock, lambda block: copies.append(block) if isinstance(block.body, tvm.tirx.BufferStore) else None)])
    tables = sum(1 for init in onnx.load(model_path("dlrm")).graph.initializer if init.name.startswith("emb"))
    assert len(copies) == 2 * (1 + tables)  # each source's, in the serial and the parallel branch
    for copy in copies:
        loaded = set()
        tvm_ffi.structural_walk(copy.body.value, [(tvm.ir.TensorLoad, lambda load: loaded.add(load.source))])
        assert {region.source for region in copy.reads} == loaded, copy


def _concatenated_mlps(path, widths: list[int]):
    """x [batch, 8] into one Gemm + Relu per width, concatenated along the features."""
    rng = np.random.default_rng(0)
    initializers, nodes = [], []
    for index, width in enumerate(widths):
        initializers.append(numpy_helper.from_array(rng.standard_normal((8, width)).astype(np.float32), f"w{index}"))
        nodes += [helper.make_node("MatMul", ["x", f"w{index}"], [f"h{index}"]), helper.make_node("Relu", [f"h{index}"], [f"r{index}"])]
    nodes.append(helper.make_node("Concat", [f"r{index}" for index in range(len(widths))], ["y"], axis=1))
    graph = helper.make_graph(nodes, "concatenated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sum(widths)])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(("widths", "vectorized"), [((32, 64, 16), 3), ((32, 13), 0)])
def test_concatenation_copies_each_source_in_its_own_loop(tmp_path, widths, vectorized):
    """A Concat's kernel copies a row source by source: one loop per source, vectorized where every
    source's width is a whole number of vectors (13 columns are not), and it agrees with onnxruntime."""
    source = _concatenated_mlps(tmp_path / "m.onnx", list(widths))
    target = host_cpu().tvm_target()
    with target:
        module = lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(source)))
    (name,) = [s.name_hint for s in module.functions if s.name_hint.startswith("concatenate")]
    kernel = _parallel_branch(cpu_schedules.apply_default_schedules(module, target)[name])
    assert _vectorized_loops(kernel) == vectorized and kernel.script().count("for ") >= len(widths) + 1, kernel.script()
    library = tmp_path / "m.so"
    reccc.compile(source, library)
    for batch in (1, 7, 64):
        assert_matches_onnxruntime(source, reccc.load(library).run, batch)


def _static_shape_reads(module: tvm.IRModule) -> int:
    """How many shape_of calls of a tensor with a static shape the module's main function makes."""
    calls = []

    def visit(node):
        if isinstance(node, tvm.relax.Call) and node.op.same_as(tvm.ir.Op.get("relax.shape_of")):
            dims = node.args[0].ty.shape
            if dims is not None and all(isinstance(dim, tvm.tirx.IntImm) for dim in dims):
                calls.append(node)

    tvm.relax.analysis.post_order_visit(module["main"], visit)
    return len(calls)


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_tables_row_counts_are_constants_before_constant_folding(name):
    """TVM's importer reads each table's row count through shape_of (Gather's negative-id wrap-around);
    fold_static_dim_reads makes them constants, so that FoldConstant builds and runs no kernel for
    them. (The bundled models' outputs are checked against onnxruntime elsewhere.)"""
    imported = relax_lowering.to_relax(onnx.load(model_path(name)))
    assert _static_shape_reads(imported) > 0
    assert _static_shape_reads(relax_lowering.fold_static_dim_reads(imported)) == 0


def test_every_kernel_keeps_its_noalias_pointers():
    """TVM's LLVM codegen gives all functions the `tirx.noalias` setting of the one whose name sorts
    last. With the lookups fused, that is the VM's shape function: without noalias pointers LLVM kept
    the matmul accumulators in memory (2x slower matmuls), so the lowering marks it noalias."""
    target = host_cpu().tvm_target()
    executable = relax_lowering.build(onnx.load(model_path("dlrm")), target, 2, cpu_schedules.apply_default_schedules)
    llvm = next(module for module in executable.mod.imports if module.kind == "llvm")
    entries = [line for line in llvm.inspect_source("ll").splitlines() if line.startswith("define") and "@__tvm_ffi_" in line]
    assert any("shape_func" in line for line in entries) and any("fused_lookup" in line for line in entries)
    assert all("noalias" in line for line in entries)


def _mlp(path, inputs: int, widths: list[int], seed: int, batch: int | str = "batch"):
    """An ONNX MLP (by default of a symbolic batch): Gemm + Relu layers of `widths`, the last one's output raw."""
    rng = np.random.default_rng(seed)
    nodes, initializers, x = [], [], "x"
    for layer, width in enumerate(widths):
        weight = (rng.standard_normal((width, inputs)) / np.sqrt(inputs)).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(rng.standard_normal(width, dtype=np.float32), f"b{layer}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{layer}", f"b{layer}"], [f"h{layer}"], transB=1))
        x, inputs = f"h{layer}", width
        if layer < len(widths) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{layer}"]))
            x = f"r{layer}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, initializers[0].dims[1]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, widths[-1]])], initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


TILE_ROWS = cpu_schedules.DEFAULT_TILE_ROWS


@settings(max_examples=12, deadline=None)
@given(
    inputs=st.sampled_from([1, 13, 64, 100]),
    widths=st.lists(st.sampled_from([1, 5, 16, 40, 64, 80, 130, 192, 400]), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_fc_layers_of_any_width_match_onnxruntime_at_every_batch(tmp_path_factory, inputs, widths, seed):
    """Batches below the register tile's rows (the GEMV branch), at it and past it, widths that are
    not whole vectors or panels."""
    folder = tmp_path_factory.mktemp("mlp")
    model_file = _mlp(folder / "mlp.onnx", inputs, widths, seed)
    reccc.compile(model_file, folder / "mlp.so")
    model = reccc.load(folder / "mlp.so")
    for batch in (*range(TILE_ROWS + 2), 67):
        assert_matches_onnxruntime(model_file, model.run, batch, seed=batch)


def test_batches_below_the_tile_run_a_one_row_tile_and_one_tile_of_rows_splits_the_panels():
    """Every matmul kernel of a symbolic batch branches on it: below DEFAULT_TILE_ROWS, the kernel
    scheduled with GEMV_TILE (which multiplies no padding rows); below two tiles of rows, the tile with
    the threads splitting the panels (their loop outside the rows'); from there, each thread taking
    whole tiles of rows (the parallel loop is over the tiles of rows alone)."""
    module = cpu_schedules.apply_default_schedules(_fused_module("dlrm"), host_cpu().tvm_target())
    for symbol, function in module.functions.items():
        if "matmul" not in symbol.name_hint or _narrow(function):  # a narrow layer has no tile (see above)
            continue
        branches = _parallel_branch(function)
        assert isinstance(branches, tvm.tirx.IfThenElse), symbol.name_hint
        assert str(branches.condition) == f"batch < T.int64({TILE_ROWS})"
        assert "T.unroll(T.int64(1))" in branches.then_case.script()  # the tile's rows
        tiles = branches.else_case
        assert str(tiles.condition) == f"batch < T.int64({2 * TILE_ROWS})"
        for case, rows_outside in ((tiles.then_case, False), (tiles.else_case, True)):
            assert f"T.unroll(T.int64({TILE_ROWS}))" in case.script()
            # panels outside: one parallel loop of the panels fused with the tiles of rows
            fused = "fused" in cpu_schedules._first_parallel_loop(case).loop_var.name
            assert fused != rows_outside, symbol.name_hint


def _parallel_branch(function: tvm.tirx.PrimFunc):
    """The body of a scheduled kernel with a symbolic batch that runs with all threads: past the rows
    that run on the calling thread (where one row's work is below PARALLEL_MIN_WORK), the else-branch."""
    body = function.body.block.body  # the branches are under one root block
    if not str(body.condition).startswith("batch <= "):
        return body
    assert "T.parallel" not in body.then_case.script()
    return body.else_case


def test_kernels_of_less_work_than_waking_the_threads_costs_run_on_the_calling_thread(tmp_path):
    """A kernel branches on its work (rows x statements a row) against PARALLEL_MIN_WORK: below, one
    thread runs it, no parallel loop; with a batch fixed when compiled, the choice is made then."""
    target = host_cpu().tvm_target()
    scheduled = cpu_schedules.apply_default_schedules(_fused_module("two_tower"), target)
    kernels = {symbol.name_hint: f for symbol, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "T.parallel" in f.script()}
    assert {"fused_lookup", "fused_matmul_add1_relu"} <= set(kernels)
    for name, function in kernels.items():  # two_tower's layers are small: every kernel runs a row on one thread
        assert str(function.body.block.body.condition).startswith("batch <= "), name
        assert "T.parallel" in _parallel_branch(function).script(), name
    with target:
        one_row = lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(_mlp(tmp_path / "b1.onnx", 96, [256, 1024], 0, batch=1))))
    small, large = sorted((f for s, f in cpu_schedules.apply_default_schedules(one_row, target).functions.items() if "matmul" in s.name_hint),
                          key=lambda f: len(f.script()))  # 96 x 256: 24k statements, 256 x 1024: 262k
    assert "T.parallel" not in small.script() and "T.parallel" in large.script()


def _matmul_branches(tmp_path, inputs: int, units: int) -> tuple[str, str]:
    """The one-row (GEMV) and the register-tile branch of a single FC layer's scheduled matmul kernel
    (with all threads), as TVMScript."""
    target = host_cpu().tvm_target()
    with target:
        module = lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(_mlp(tmp_path / "m.onnx", inputs, [units], seed=0))))
    (kernel,) = [f for s, f in cpu_schedules.apply_default_schedules(module, target).functions.items() if "matmul" in s.name_hint]
    branches = _parallel_branch(kernel)
    return branches.then_case.script(), branches.else_case.script()


def test_the_gemv_branch_pads_no_weight_columns_the_tile_does_not(tmp_path):
    """A padded weight is copied every call. 192 columns are whole panels of the 4 x 4 tile (64), so
    the one-row branch takes panels that divide them too (6 vectors, 96 columns: 2 panels), not
    GEMV_TILE's 128 (which would pad to 256)."""
    branch, _ = _matmul_branches(tmp_path, 64, 192)
    assert "T.int64(256)" not in branch
    assert "T.parallel(batch * T.int64(2))" in branch
    assert "T.unroll(T.int64(6))" in branch  # one vector instruction per vector of the panel


@pytest.mark.parametrize(("units", "offered"), [(512, {"tile 6x4", "tile 8x2", "tile 12x2", "tile 4x2"}), (400, set())])
def test_minus_o3_measures_only_tiles_padding_no_more_weight_columns_than_the_default(tmp_path, units, offered):
    """512 columns are whole panels of every tile; 400 are of the default 5-vector tile alone (2 and 4
    vectors pad them to 416 and 448), so -O3 has no other tile to measure for them."""
    target = host_cpu().tvm_target()
    with target:
        module = lookup_fusion.fuse_operators()(relax_lowering.to_relax(onnx.load(_mlp(tmp_path / "m.onnx", 416, [units], seed=0))))
    (kernel,) = [f for s, f in module.functions.items() if "matmul" in s.name_hint]
    assert {label for label, _ in cpu_schedules.matmul_tile_alternatives(kernel, target)} == offered


def test_fc_layers_take_the_register_tile_that_pads_fewest_weight_columns(tmp_path):
    """DeepFM's 400 units are 25 vectors: 4-vector panels (64 columns) and GEMV_TILE's 7-vector ones
    would pad W to 448 columns, copied on every call and multiplied; 5 vectors (80 columns, 5 panels)
    divide them, in both branches."""
    gemv, tiled = _matmul_branches(tmp_path, 416, 400)
    for branch in (gemv, tiled):
        assert "T.int64(448)" not in branch
        assert "T.unroll(T.int64(5))" in branch
    assert "T.parallel(batch * T.int64(5))" in gemv
    assert "T.parallel((batch + T.int64(3)) // T.int64(4) * T.int64(5))" in tiled
