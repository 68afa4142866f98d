"""Compiled artifacts through the public API: `reccc.load(path).run(inputs)` against onnxruntime,
input checking, and the embedding index guard."""

import os
import subprocess
import sys
import threading

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import reccc
from reccc.errors import EmbeddingIndexError, ModelInputError, UsageError
from reccc.ir import Model
from reccc.pipelines import PIPELINES
from reccc.manifest import read_manifest
from reccc.reference import agreement, run_reference
from reccc.sample_inputs import random_inputs

from conftest import TESTSUITE_MODELS, assert_matches_onnxruntime, model_path


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_one_artifact_serves_every_batch_size(compiled, name):
    model = reccc.load(compiled(name))
    for batch in (1, 7, 64, 2048):
        assert_matches_onnxruntime(model_path(name), model.run, batch, seed=batch)


@pytest.mark.parametrize("level", [0, 1, 3])
def test_every_optimization_level_matches_onnxruntime(compiled, level):
    model = reccc.load(compiled("dlrm", opt_level=level))
    assert_matches_onnxruntime(model_path("dlrm"), model.run, batch=9)


def test_manifest_describes_the_interface(compiled):
    manifest = read_manifest(compiled("dlrm"))
    assert [(t.name, t.dtype, t.shape) for t in manifest.inputs] == [("dense", "float32", ["batch", 13])] + [
        (f"cat_{i}", "int64", ["batch"]) for i in range(4)
    ]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("ctr", ["batch", 1])]
    assert manifest.passes == list(PIPELINES[2])
    assert manifest.target["kind"] == "llvm" and manifest.target["mtriple"] == "x86_64-linux-gnu"
    assert manifest.index_check == "error" and len(manifest.index_guards) == 4


def test_reading_a_manifest_from_a_non_artifact_names_the_file(tmp_path):
    bogus = tmp_path / "x.so"
    bogus.write_bytes(b"\x7fELF" + bytes(100))
    with pytest.raises(UsageError, match="x.so: not a reccc artifact"):
        read_manifest(bogus)


def _dlrm_inputs(batch=4):
    return random_inputs(Model.from_onnx(onnx.load(model_path("dlrm"))), batch, seed=1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("cat_1"), "missing input 'cat_1'"),
        (lambda f: f.update(extra=np.zeros(4)), "unknown input 'extra'"),
        (lambda f: f.update(dense=f["dense"].astype(np.float64)), "input 'dense' has dtype float64, expected float32"),
        (lambda f: f.update(cat_0=f["cat_0"].astype(np.int32)), "input 'cat_0' has dtype int32, expected int64"),
        (lambda f: f.update(dense=f["dense"][None]), "input 'dense' has rank 3"),
        (lambda f: f.update(dense=f["dense"][:, :12]), "input 'dense' has size 12 in dim 1, expected 13"),
        (lambda f: f.update(cat_3=f["cat_3"][:3]), "input 'cat_3' has batch=3 in dim 0, but input 'dense' has batch=4"),
    ],
)
@pytest.mark.parametrize("after_a_good_call", [False, True], ids=["first call", "after a good call"])
def test_bad_inputs_raise_naming_the_input(compiled, change, message, after_a_good_call):
    """Also after a call that matched the manifest, whose inputs' shapes and dtypes run unchecked again."""
    model = reccc.load(compiled("dlrm"))
    feeds = _dlrm_inputs()
    if after_a_good_call:
        model.run(feeds)
    change(feeds)
    with pytest.raises(ModelInputError, match=message.replace("[", r"\[")):
        model.run(feeds)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.update(dense=f["dense"][:, :12]), r"param=dense.*shape\[1\] mismatch"),
        (lambda f: f.update(dense=f["dense"].astype(np.float64)), "param=dense.*expect Tensor with dtype float32"),
        (lambda f: f.update(cat_3=f["cat_3"][:3]), "mismatch"),
    ],
)
def test_the_model_function_refuses_bad_inputs_without_reccc_runtime(compiled, change, message):
    """The kernels carry no argument checks (relax_lowering._without_kernel_argument_checks): the
    model's Relax function, which a TVM user calls directly, still checks its inputs at entry and
    raises naming the parameter, instead of running kernels on tensors of the wrong shape."""
    import tvm
    from tvm import relax

    artifact = compiled("dlrm")
    feeds = _dlrm_inputs()
    change(feeds)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact)), tvm.cpu())
    arguments = [tvm.runtime.tensor(np.ascontiguousarray(feeds[spec.name])) for spec in read_manifest(artifact).inputs]
    with pytest.raises((RuntimeError, ValueError), match=message):
        vm["main"](*arguments)


@pytest.mark.parametrize("good_id", [0, 999, -1, -1000])
def test_ids_at_the_table_boundaries_match_onnxruntime(compiled, good_id):
    model = reccc.load(compiled("dlrm"))
    feeds = _dlrm_inputs()
    feeds["cat_2"][2] = good_id
    expected = run_reference(onnx.load(model_path("dlrm")), feeds)
    for error, bound in agreement(expected, model.run(feeds)).values():
        assert error <= bound


@pytest.mark.parametrize("bad_id", [1000, 1063, 1064, 10**12, -1001, -(2**62)])
def test_out_of_range_ids_raise_naming_the_input(compiled, bad_id):
    model = reccc.load(compiled("dlrm"))
    feeds = _dlrm_inputs()
    feeds["cat_2"][2] = bad_id
    with pytest.raises(EmbeddingIndexError, match=rf"input 'cat_2': id {bad_id} at \[2\] is out of range .* 1000 rows"):
        model.run(feeds)


def test_out_of_range_ids_in_a_multi_id_input(compiled):
    model = reccc.load(compiled("deepfm"))
    feeds = {"feat_ids": np.array([[1, 2, 3, 4, 5], [1, 2, 3, 300, 5]], np.int64)}
    with pytest.raises(EmbeddingIndexError, match=r"input 'feat_ids': id 300 at \[1, 3\]"):
        model.run(feeds)


def test_clamp_mode_reads_the_nearest_row(compiled):
    model = reccc.load(compiled("dlrm", index_check="clamp"))
    feeds = _dlrm_inputs()
    feeds["cat_0"][:4] = [1000, 10**9, -1001, -(10**9)]
    clamped = dict(feeds, cat_0=np.clip(feeds["cat_0"], -1000, 999))
    expected = run_reference(onnx.load(model_path("dlrm")), clamped)
    for error, bound in agreement(expected, model.run(feeds)).values():
        assert error <= bound


def _offset_ids_model(path):
    """A table gathered with ids computed inside the graph (input + 5), as hashed or offset ids are."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    offset = numpy_helper.from_array(np.array(5, np.int64), "offset")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["ids", "offset"], ["shifted"], name="shift"),
            helper.make_node("Gather", ["table", "shifted"], ["rows"], name="lookup"),
        ],
        "offset_ids",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 4])],
        [table, offset],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_ids_computed_in_the_graph_are_checked_too(tmp_path):
    _offset_ids_model(tmp_path / "m.onnx")
    reccc.compile(tmp_path / "m.onnx", tmp_path / "m.so")
    model = reccc.load(tmp_path / "m.so")
    np.testing.assert_array_equal(model.run({"ids": np.array([0, 4])})["rows"], [[20, 21, 22, 23], [36, 37, 38, 39]])
    with pytest.raises(EmbeddingIndexError, match="Gather node 'lookup': ids computed from input 'ids' are out of range"):
        model.run({"ids": np.array([0, 5])})


def test_nan_and_inf_in_dense_features_propagate(compiled):
    model = reccc.load(compiled("dlrm"))
    feeds = _dlrm_inputs()
    feeds["dense"][1, 0] = np.nan
    feeds["dense"][2, 0] = np.inf
    out = model.run(feeds)["ctr"]
    expected = run_reference(onnx.load(model_path("dlrm")), feeds)["ctr"]
    assert np.isnan(out[1, 0]) == np.isnan(expected[1, 0])
    np.testing.assert_allclose(out[[0, 3]], expected[[0, 3]], rtol=1e-5, atol=1e-6)


def test_compile_through_the_python_api_with_options(tmp_path):
    result = reccc.compile(model_path("two_tower"), tmp_path / "tt.so", opt_level=1, target="x86")
    assert result.output == tmp_path / "tt.so" and [r.name for r in result.passes] == list(PIPELINES[1])
    model = reccc.load(result.output)
    assert model.input_names == ["user_id", "user_features", "item_id", "item_features"]
    assert model.output_names == ["score", "user_vector"]
    assert_matches_onnxruntime(model_path("two_tower"), model.run, batch=5)


def test_a_second_symbolic_dim_is_free_per_call(tmp_path):
    """Pooled lookups over a variable bag length, as EmbeddingBag(mode="sum") exports with a symbolic bag dim."""
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), "table")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "bags"], ["rows"], name="lookup"),
            helper.make_node("ReduceSum", ["rows", "axes"], ["pooled"], name="pool", keepdims=0),
        ],
        "bag",
        [helper.make_tensor_value_info("bags", TensorProto.INT64, ["batch", "bag"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 8])],
        [table, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "bag.onnx")
    reccc.compile(tmp_path / "bag.onnx", tmp_path / "bag.so")
    compiled_model = reccc.load(tmp_path / "bag.so")
    assert compiled_model.manifest.inputs[0].shape == ["batch", "bag"]
    for batch, bag in [(1, 1), (3, 7), (64, 2)]:
        ids = np.random.default_rng(batch).integers(-50, 50, size=(batch, bag))
        expected = run_reference(model, {"bags": ids})["pooled"]
        np.testing.assert_allclose(compiled_model.run({"bags": ids})["pooled"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", [0, 2])
def test_a_table_held_in_a_constant_node_is_guarded_too(tmp_path, level):
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "values")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["table"], value=table, name="table_constant"),
            helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup"),
        ],
        "constant_node_table",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    reccc.compile(tmp_path / "m.onnx", tmp_path / "m.so", opt_level=level)
    compiled_model = reccc.load(tmp_path / "m.so")
    np.testing.assert_array_equal(compiled_model.run({"ids": np.array([1, -10])})["rows"], [[4, 5, 6, 7], [0, 1, 2, 3]])
    with pytest.raises(EmbeddingIndexError, match=r"input 'ids': id 1000000000 at \[0\] is out of range .* 10 rows"):
        compiled_model.run({"ids": np.array([10**9])})


def test_gathers_with_constant_ids_need_no_guard(tmp_path):
    """Ids from a Constant node are not run-time input: the model compiles at -O0 and runs."""
    table = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(6, 2), "table")
    ids = numpy_helper.from_array(np.array([5, 0], np.int64), "ids_value")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["ids"], value=ids, name="ids_constant"),
            helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup"),
            helper.make_node("Add", ["rows", "x"], ["y"], name="add"),
        ],
        "constant_ids",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    reccc.compile(tmp_path / "m.onnx", tmp_path / "m.so", opt_level=0)
    out = reccc.load(tmp_path / "m.so").run({"x": np.zeros((2, 2), np.float32)})["y"]
    np.testing.assert_array_equal(out, [[10, 11], [0, 1]])


def _save(graph, path, opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_outputs_are_the_callers_to_change(tmp_path):
    """An output that is a constant of the model (or an input) comes back as a copy: writing to it
    changes neither the next call's result nor the caller's input."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["same"], name="same")],
        "constant_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor_value_info("same", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [2]),
        ],
        [numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "bias")],
    )
    reccc.compile(_save(graph, tmp_path / "m.onnx"), tmp_path / "m.so")
    model = reccc.load(tmp_path / "m.so")
    x = np.ones((3, 2), np.float32)
    first = model.run({"x": x})
    first["bias"][:] = 0
    first["same"][:] = 7
    again = model.run({"x": x})
    np.testing.assert_array_equal(again["bias"], [1.5, -2.0])
    np.testing.assert_array_equal(x, np.ones((3, 2)))


def _compiled_cast(tmp_path, source: int, target: int):
    """A model of one Cast from `source` to `target` (ONNX types), compiled and loaded."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], name="cast", to=target)],
        "cast",
        [helper.make_tensor_value_info("x", source, ["batch", 4])],
        [helper.make_tensor_value_info("y", target, ["batch", 4])],
    )
    reccc.compile(_save(graph, tmp_path / "m.onnx"), tmp_path / "m.so")
    return reccc.load(tmp_path / "m.so")


def test_bfloat16_outputs_come_back_as_bfloat16(tmp_path):
    x = np.array([[1.0, 0.5, -3.25, 1 + 2**-7]], np.float32)
    y = _compiled_cast(tmp_path, TensorProto.FLOAT, TensorProto.BFLOAT16).run({"x": x})["y"]
    assert str(y.dtype) == "bfloat16"
    np.testing.assert_array_equal(y.astype(np.float32), [[1.0, 0.5, -3.25, 1 + 2**-7]])


def test_bfloat16_inputs_are_taken(tmp_path):
    model = _compiled_cast(tmp_path, TensorProto.BFLOAT16, TensorProto.FLOAT)
    for rows in ([[1.0, 0.5, -3.25, 1 + 2**-7]], [[2.0, 0.0, -1.0, 3.0]] * 3):
        x = np.array(rows, np.float32)
        y = model.run({"x": x.astype(ml_dtypes.bfloat16)})["y"]
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("table", range(4))
def test_each_guarded_table_is_named_by_its_own_input(compiled, table):
    """The guards of same-shaped ids share one check: a bad id must still name the input it came from."""
    model = reccc.load(compiled("dlrm"))
    feeds = _dlrm_inputs()
    feeds[f"cat_{table}"][1] = 1000
    with pytest.raises(EmbeddingIndexError, match=rf"input 'cat_{table}': id 1000 at \[1\]"):
        model.run(feeds)


def test_calls_of_the_same_shapes_compute_their_own_inputs(compiled):
    """Inputs of the last call's shapes go into the buffers kept from it: each call's own values, given
    as arrays, views or (ids) lists, reach the kernels."""
    model = reccc.load(compiled("dlrm"))
    proto = onnx.load(model_path("dlrm"))
    for seed, given in enumerate([lambda a: a, lambda a: a[::-1][::-1], _ids_as_lists, lambda a: a]):
        feeds = random_inputs(Model.from_onnx(proto), 5, seed=seed)
        actual = model.run({name: given(array) for name, array in feeds.items()})
        for name, (error, bound) in agreement(run_reference(proto, feeds), actual).items():
            assert error <= bound, f"output '{name}', call {seed}: error {error} > {bound}"


def _ids_as_lists(array: np.ndarray):
    """Ids as a Python list (numpy makes int64 of it), other inputs as they are."""
    return array.tolist() if array.dtype == np.int64 else array


LAYOUTS = ("as allocated", "unaligned", "strided")


def _laid_out(array: np.ndarray, layout: str) -> np.ndarray:
    """`array`'s values in memory a caller may hand over: as numpy allocated them, one element past the
    start of a buffer (not at TVM's alignment), or every other row of a larger array (not contiguous)."""
    if layout == "unaligned":
        buffer = np.empty(array.size + 1, array.dtype)
        moved = buffer[1:].reshape(array.shape)
    elif layout == "strided":
        moved = np.zeros((2 * array.shape[0], *array.shape[1:]), array.dtype)[::2]
    else:
        return array
    moved[...] = array
    return moved


@settings(max_examples=25, deadline=None)
@given(calls=st.lists(st.tuples(st.integers(1, 70), st.sampled_from(LAYOUTS)), min_size=1, max_size=4))
def test_calls_of_changing_batch_and_memory_layout_match_onnxruntime(compiled, calls):
    """One loaded model called with a batch that changes from call to call (its kept input buffers
    are reallocated) and inputs that are not aligned or not contiguous."""
    model = reccc.load(compiled("dlrm"))
    proto = onnx.load(model_path("dlrm"))
    for batch, layout in calls:
        feeds = random_inputs(Model.from_onnx(proto), batch, seed=batch)
        actual = model.run({name: _laid_out(array, layout) for name, array in feeds.items()})
        for name, (error, bound) in agreement(run_reference(proto, feeds), actual).items():
            assert error <= bound, f"output '{name}', batch {batch}, {layout} inputs: error {error} > {bound}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inputs_of_a_mebibyte_and_more_run_as_given(tmp_path, layout):
    """Inputs this large take their own path: the caller's array itself where aligned and contiguous."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])],
    )
    reccc.compile(_save(graph, tmp_path / "m.onnx"), tmp_path / "m.so")
    model = reccc.load(tmp_path / "m.so")
    for batch in (300, 301):  # 1.2 MB each
        x = np.random.default_rng(batch).standard_normal((batch, 1024)).astype(np.float32)
        np.testing.assert_array_equal(model.run({"x": _laid_out(x, layout)})["y"], np.maximum(x, 0))


def test_an_empty_batch_runs(compiled):
    model = reccc.load(compiled("dlrm"))
    assert model.run(_dlrm_inputs(batch=0))["ctr"].shape == (0, 1)


def test_concurrent_calls_from_threads_get_their_own_results(compiled):
    """Serving code calls one loaded model from many threads; the Relax VM alone crashes then."""
    model = reccc.load(compiled("dlrm"))
    cases = [_dlrm_inputs(batch) for batch in (1, 7, 64, 300)]
    expected = [model.run(case)["ctr"] for case in cases]
    wrong = []

    def serve(worker: int) -> None:
        for call in range(100):
            index = (call + worker) % len(cases)
            if not np.array_equal(model.run(cases[index])["ctr"], expected[index]):
                wrong.append((worker, call))

    threads = [threading.Thread(target=serve, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong



@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="with one core, TVM's default thread pool is every core")
def test_a_thread_pool_started_before_load_uses_every_core(compiled):
    """TVM sizes a thread's pool when the thread first runs a parallel kernel (by default a thread per
    two cores on x86) and never grows it: a pool started before reccc.load, by any TVM code run after
    `import reccc` (tuning, another framework's model), must already have every core."""
    code = (
        "import reccc, tvm\n"
        "pool_threads = tvm.get_global_func('runtime.NumThreads')\n"
        "pool_threads()  # starts this thread's pool\n"
        f"reccc.load({str(compiled('dlrm'))!r})\n"
        "print(pool_threads())\n"
    )
    env = {name: value for name, value in os.environ.items() if name not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    assert int(result.stdout) == len(os.sched_getaffinity(0))
