"""Hostile and corrupt model files: external data kept inside the model's folder, declared sizes checked
against the data before anything is allocated, cycles named, --input-shape, and regression tests for
what fuzzing (tools/fuzz_compile.py) found."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import reccc
from reccc.errors import ModelInputError
from reccc.manifest import read_manifest

from conftest import assert_matches_onnxruntime, model_path

DLRM = model_path("dlrm")
REPOSITORY = Path(__file__).resolve().parent.parent


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _write(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _matmul(weight: onnx.TensorProto) -> onnx.ModelProto:
    """x[b, 3] @ w[3, 4], with `w` as given (possibly corrupt)."""
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_float("x", ["b", 3])], [_float("y", ["b", 4])], [weight])


def _weight() -> onnx.TensorProto:
    return numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")


def _assert_usage_error(result, message: str) -> None:
    assert result.code == 2, result.stderr
    assert result.stderr.startswith("reccc: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr


# --- external data ---------------------------------------------------------------------------------


def test_a_model_with_external_data_compiles_and_runs(reccc_cli, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(onnx.load(DLRM), folder / "dlrm.onnx", save_as_external_data=True, location="dlrm.weights", size_threshold=0)
    assert (folder / "dlrm.weights").stat().st_size > 200_000  # the weights really are outside the .onnx
    monkeypatch.chdir(tmp_path)  # the location resolves from the model's folder, not the working directory
    result = reccc_cli(Path("model") / "dlrm.onnx", "-o", tmp_path / "m.so")
    assert (result.code, result.stderr) == (0, "")
    assert_matches_onnxruntime(folder / "dlrm.onnx", reccc.load(tmp_path / "m.so").run, batch=5)


def _external_model(folder: Path, **entries: str | None) -> Path:
    """The MatMul model in `folder` with `w` in the external file w.bin; `entries` override its
    external_data keys (None removes one)."""
    folder.mkdir(exist_ok=True)
    (folder / "w.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    weight = _weight()
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "w.bin", "offset": "0", "length": "48", **entries}.items():
        if value is not None:
            weight.external_data.add(key=key, value=value)
    return _write(folder / "m.onnx", _matmul(weight))


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin", "../../../../../../../../etc/passwd"])
def test_external_data_outside_the_folder_is_refused(reccc_cli, tmp_path, location):
    (tmp_path / "outside.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    model = _external_model(tmp_path / "model", location=location)
    result = reccc_cli(model, "--emit=onnx", "-o", tmp_path / "o.onnx")
    _assert_usage_error(result, f"{model}: tensor 'w': external data location '{location}' is outside the model's folder")


def test_an_absolute_external_data_location_is_refused(reccc_cli, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.arange(12, dtype=np.float32).tobytes())
    model = _external_model(tmp_path / "model", location=str(outside))
    result = reccc_cli(model, "--emit=onnx", "-o", tmp_path / "o.onnx")
    _assert_usage_error(result, f"{model}: tensor 'w': external data location '{outside}' is an absolute path")


@pytest.mark.parametrize("link, location", [("link.bin", "link.bin"), ("linked_folder", "linked_folder/outside.bin")])
def test_a_symlink_out_of_the_folder_is_refused(reccc_cli, tmp_path, link, location):
    (tmp_path / "outside.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    model = _external_model(tmp_path / "model", location=location)
    target = tmp_path / "outside.bin" if link == "link.bin" else tmp_path
    os.symlink(target, tmp_path / "model" / link)
    result = reccc_cli(model, "--emit=onnx", "-o", tmp_path / "o.onnx")
    _assert_usage_error(result, f"{model}: tensor 'w': external data location '{location}' is outside the model's folder")


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"location": "missing.bin"}, "tensor 'w': external data file 'missing.bin' does not exist"),
        ({"location": None}, "tensor 'w': external data without a location"),
        ({"length": "40"}, "tensor 'w': external data length 40 does not match shape [3, 4] of FLOAT (48 bytes)"),
        ({"offset": "8"}, "tensor 'w': external data file 'w.bin' is too short: the tensor needs 48 bytes at offset 8, the file has 48 bytes"),
        ({"offset": "-4"}, "tensor 'w': external data offset '-4' is not a non-negative integer"),
    ],
)
def test_bad_external_data_entries_name_the_tensor(reccc_cli, tmp_path, entries, message):
    model = _external_model(tmp_path / "model", **entries)
    _assert_usage_error(reccc_cli(model, "--emit=onnx", "-o", tmp_path / "o.onnx"), f"{model}: {message}")


def test_an_external_file_shorter_than_the_tensor_names_it(reccc_cli, tmp_path):
    model = _external_model(tmp_path / "model", length=None)
    (tmp_path / "model" / "w.bin").write_bytes(bytes(20))
    result = reccc_cli(model, "--emit=onnx", "-o", tmp_path / "o.onnx")
    _assert_usage_error(result, f"{model}: tensor 'w': external data file 'w.bin' is too short: the tensor needs 48 bytes")


# --- declared sizes --------------------------------------------------------------------------------


def _dims(weight: onnx.TensorProto, dims: list[int]) -> onnx.TensorProto:
    weight.dims[:] = dims
    return weight


def _raw_data(weight: onnx.TensorProto, data: bytes) -> onnx.TensorProto:
    weight.raw_data = data
    return weight


def _float_data(count: int) -> onnx.TensorProto:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 4], [0.5] * 12)
    weight.float_data.extend([0.5] * (count - 12))
    return weight


def _huge_table() -> onnx.ModelProto:
    table = helper.make_tensor("emb", TensorProto.FLOAT, [0, 16], [])
    table.dims[:] = [10**12, 16]  # a trillion rows, and no data for them
    gather = helper.make_node("Gather", ["emb", "ids"], ["y"], name="lookup")
    return _model([gather], [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])], [_float("y", ["b", 16])], [table])


def _huge_constant() -> onnx.ModelProto:
    value = helper.make_tensor("value", TensorProto.FLOAT, [0], [])
    value.dims[:] = [10**7, 10**7]
    nodes = [helper.make_node("Constant", [], ["c"], value=value, name="big"), helper.make_node("Add", ["x", "c"], ["y"])]
    return _model(nodes, [_float("x", [1])], [_float("y", ["n", "m"])])


@pytest.mark.parametrize(
    "model, message",
    [
        (_huge_table, "tensor 'emb': shape [1000000000000, 16] of FLOAT is 64000000000000 bytes, more than reccc's limit"),
        (_huge_constant, "attribute 'value' of node 'big': shape [10000000, 10000000] of FLOAT is 400000000000000 bytes"),
        (lambda: _matmul(_dims(_weight(), [2**40, 2**40])), "tensor 'w': shape [1099511627776, 1099511627776] of FLOAT is"),
        (lambda: _matmul(_dims(_weight(), [-3, -4])), "tensor 'w': negative dim in shape [-3, -4]"),
        # found by fuzzing: an empty tensor whose other dim overflowed numpy's reshape
        (lambda: _matmul(_raw_data(_dims(_weight(), [2**63 - 1, 0]), b"")),
         "tensor 'w': shape [9223372036854775807, 0] of FLOAT is 36893488147419103228 bytes counting its 0 dims as 1"),
        (lambda: _matmul(_raw_data(_weight(), bytes(52))), "tensor 'w': raw_data holds 52 bytes, but shape [3, 4] of FLOAT needs 48"),
        (lambda: _matmul(_raw_data(_weight(), bytes(44))), "tensor 'w': raw_data holds 44 bytes, but shape [3, 4] of FLOAT needs 48"),
        (lambda: _matmul(helper.make_tensor("w", TensorProto.FLOAT, [3, 4], [0.5] * 12)), None),  # typed data that fits
        (lambda: _matmul(_float_data(13)), "tensor 'w': float_data holds 13 values, but shape [3, 4] of FLOAT needs 12"),
        (lambda: _model([helper.make_node("Relu", ["x"], ["y"])], [_float("x", [10**12, 16])], [_float("y", ["a", 16])]),
         "input 'x': shape [1000000000000, 16] of FLOAT is 64000000000000 bytes, more than reccc's limit"),
        (lambda: _model([helper.make_node("Relu", ["x"], ["y"])], [_float("x", [-5, 16])], [_float("y", ["a", 16])]),
         "input 'x': negative dim in shape [-5, 16]"),
    ],
)
def test_declared_sizes_must_fit_the_data(reccc_cli, tmp_path, model, message):
    path = _write(tmp_path / "m.onnx", model())
    result = reccc_cli(path, "--emit=onnx", "-o", tmp_path / "o.onnx")
    if message is None:
        assert (result.code, result.stderr) == (0, "")
    else:
        _assert_usage_error(result, f"{path}: {message}")


def test_sparse_tensors_are_refused(reccc_cli, tmp_path):
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(2, np.float32), "w"), numpy_helper.from_array(np.array([0, 5]), "w_indices"), [3, 4]
    )
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_float("x", ["b", 3])], [_float("y", ["b", 4])])
    model.graph.sparse_initializer.append(sparse)
    path = _write(tmp_path / "m.onnx", model)
    _assert_usage_error(reccc_cli(path, "--emit=onnx", "-o", tmp_path / "o.onnx"), f"{path}: tensor 'w': sparse tensors are not supported")


# --- cycles ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodes, message",
    [
        (
            [helper.make_node("Relu", ["b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"], name="second"),
             helper.make_node("Add", ["x", "b"], ["y"], name="out")],
            "the graph has a cycle: nodes 'second' -> 'first' -> 'second'",
        ),
        ([helper.make_node("Add", ["x", "y"], ["y"], name="self")], "the graph has a cycle: nodes 'self' -> 'self'"),
    ],
)
def test_a_cycle_names_its_nodes(reccc_cli, tmp_path, nodes, message):
    path = _write(tmp_path / "m.onnx", _model(nodes, [_float("x", [2])], [_float("y", [2])]))
    _assert_usage_error(reccc_cli(path, "-o", tmp_path / "m.so"), f"{path}: {message}")


# --- --input-shape ---------------------------------------------------------------------------------


def test_input_shape_makes_the_artifact_static(reccc_cli, tmp_path):
    assert reccc_cli(DLRM, "--input-shape", "dense=64,13", "-o", tmp_path / "m.so").code == 0
    manifest = read_manifest(tmp_path / "m.so")
    # the ids share the dense features' symbolic batch dim, so they are fixed too
    assert [(t.name, t.shape) for t in manifest.inputs] == [("dense", [64, 13])] + [(f"cat_{i}", [64]) for i in range(4)]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("ctr", [64, 1])]
    model = reccc.load(tmp_path / "m.so")
    assert_matches_onnxruntime(DLRM, model.run, batch=64)
    with pytest.raises(ModelInputError, match=r"input 'dense' has size 32 in dim 0, expected 64"):
        assert_matches_onnxruntime(DLRM, model.run, batch=32)


def test_input_shape_in_emitted_onnx(reccc_cli, tmp_path):
    assert reccc_cli(model_path("deepfm"), "--input-shape", "feat_ids=8,5", "--emit=onnx", "-o", tmp_path / "o.onnx").code == 0
    emitted = onnx.load(tmp_path / "o.onnx")
    assert [d.dim_value for d in emitted.graph.input[0].type.tensor_type.shape.dim] == [8, 5]
    assert [d.dim_value for d in emitted.graph.output[0].type.tensor_type.shape.dim] == [8, 1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--input-shape", "nope=1,2"], "--input-shape nope=1,2: the model has no input 'nope' (its inputs are: dense, cat_0"),
        (["--input-shape", "dense=64"], "--input-shape dense=64: input 'dense' has rank 2 (shape ['batch', 13]), not 1"),
        (["--input-shape", "dense=64,x"], "--input-shape dense=64,x: dims must be integers"),
        (["--input-shape", "dense=0,13"], "--input-shape dense=0,13: dims must be positive integers"),
        (["--input-shape", "dense=-1,13"], "--input-shape dense=-1,13: dims must be positive integers"),
        (["--input-shape", "dense=64,12"], "--input-shape dense=64,12: dim 1 of input 'dense' is 13 in the model"),
        (["--input-shape", "dense=64,13", "--input-shape", "cat_0=32"], "--input-shape cat_0=32: dim 'batch' of input 'cat_0' is 64 in input 'dense'"),
        (["--input-shape", "dense=64,13", "--input-shape", "dense=8,13"], "--input-shape dense=8,13: input 'dense' is given twice"),
        (["--input-shape", "dense"], "--input-shape dense: expected NAME=DIM,DIM,..."),
    ],
)
def test_bad_input_shapes_are_usage_errors(reccc_cli, tmp_path, flags, message):
    result = reccc_cli(DLRM, *flags, "-o", tmp_path / "m.so")
    _assert_usage_error(result, message)
    assert not (tmp_path / "m.so").exists()


# --- regressions found by fuzzing ------------------------------------------------------------------


@pytest.mark.parametrize("elem_type", [999, 0])
def test_an_unknown_input_type_names_the_input(reccc_cli, tmp_path, elem_type):
    # shape inference raised a bare ValueError ("Invalid tensor data type 999.")
    model = onnx.load(model_path("two_tower"))
    model.graph.input[0].type.tensor_type.elem_type = elem_type
    path = _write(tmp_path / "m.onnx", model)
    name = model.graph.input[0].name
    _assert_usage_error(reccc_cli(path, "--emit=onnx", "-o", tmp_path / "o.onnx"), f"{path}: input '{name}': unknown data type {elem_type}")


def test_a_name_that_is_not_utf8_is_a_usage_error(reccc_cli, tmp_path):
    # onnx's checker raised UnicodeDecodeError formatting its message about the node
    data = _model([helper.make_node("Relu", ["x"], ["mulX12"])], [_float("x", [2])], [_float("y", [2])]).SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data.replace(b"mulX12", b"mul\xd312"))
    _assert_usage_error(reccc_cli(path, "--emit=onnx", "-o", tmp_path / "o.onnx"), f"{path}: invalid ONNX model: onnx.NodeProto.output b'mul\\xd312' is not valid UTF-8")


def test_a_cast_to_an_unknown_type_is_a_usage_error(reccc_cli, tmp_path):
    # shape inference raised a bare ValueError ("Invalid tensor data type 0.")
    path = _write(tmp_path / "m.onnx", _model([helper.make_node("Cast", ["x"], ["y"], to=2**40)], [_float("x", [2])], [_float("y", [2])]))
    _assert_usage_error(reccc_cli(path, "--emit=onnx", "-o", tmp_path / "o.onnx"), f"{path}: shape inference failed: Invalid tensor data type")


def test_nodes_that_share_a_name_are_renamed_quietly(reccc_cli, tmp_path):
    # graphsurgeon printed a page about them on every export, and errors naming the node were ambiguous
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="same"), helper.make_node("Relu", ["a"], ["y"], name="same")]
    path = _write(tmp_path / "m.onnx", _model(nodes, [_float("x", [2])], [_float("y", [2])]))
    result = reccc_cli(path, "--emit=onnx", "-O0", "-o", tmp_path / "o.onnx")
    assert (result.code, result.stdout, result.stderr) == (0, "", "")
    assert [node.name for node in onnx.load(tmp_path / "o.onnx").graph.node] == ["same", "same_1"]


def test_an_error_naming_a_hostile_name_stays_one_plain_line(reccc_cli, tmp_path):
    weight = _raw_data(_weight(), bytes(52))
    weight.name = "w\n\x1b[31mred"
    model = _model([helper.make_node("MatMul", ["x", weight.name], ["y"])], [_float("x", ["b", 3])], [_float("y", ["b", 4])], [weight])
    path = _write(tmp_path / "m.onnx", model)
    _assert_usage_error(reccc_cli(path, "--emit=onnx", "-o", tmp_path / "o.onnx"), f"{path}: tensor 'w\\n\\x1b[31mred': raw_data holds 52 bytes")


def _sliced(producer: onnx.NodeProto, constant: onnx.TensorProto | None = None, value_info=()) -> onnx.ModelProto:
    """x[2] -> `producer` -> t -> Slice(t, [0], [1], axes [0]) -> y."""
    slice_operands = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("start", 0), ("end", 1), ("axis", 0))]
    model = _model([producer, helper.make_node("Slice", ["t", "start", "end", "axis"], ["y"], name="slice")],
                   [_float("x", [2])], [_float("y", ["n"])], [*slice_operands, *([constant] if constant else [])])
    model.graph.value_info.extend(value_info)
    return model


def _cli_subprocess(*args) -> subprocess.CompletedProcess:
    """For inputs that used to kill the whole process."""
    return subprocess.run([sys.executable, "-m", "reccc", *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    "producer, constant",
    [
        (helper.make_node("Expand", ["x", "shape"], ["t"]), numpy_helper.from_array(np.array([-1, 1], np.int64), "shape")),
        (helper.make_node("Pad", ["x", "pads"], ["t"]), numpy_helper.from_array(np.array([-2, -3], np.int64), "pads")),
    ],
    ids=["expand", "pad"],
)
def test_a_negative_dim_into_slice_is_a_usage_error(tmp_path, producer, constant):
    # onnx's Slice shape inference aborted the process (a failed assertion in std::clamp)
    path = _write(tmp_path / "m.onnx", _sliced(producer, constant))
    result = _cli_subprocess(path, "--emit=onnx", "-o", tmp_path / "o.onnx")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"reccc: error: {path}: tensor 't', read by Slice node 'slice', has a negative dim in its shape [")


def test_a_negative_dim_below_another_slice_is_a_usage_error(tmp_path):
    # x[2] -> Slice -> [1] -> Expand to [-3] -> Slice: with the first Slice taken as a no-op, [2] and [-3]
    # do not broadcast and the negative dim went unseen until the real inference aborted
    first = helper.make_node("Slice", ["x", "start", "end", "axis"], ["a"], name="first")
    model = _sliced(helper.make_node("Expand", ["a", "shape"], ["t"]), numpy_helper.from_array(np.array([-3], np.int64), "shape"))
    model.graph.node.insert(0, first)
    path = _write(tmp_path / "m.onnx", model)
    result = _cli_subprocess(path, "--emit=onnx", "-o", tmp_path / "o.onnx")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"reccc: error: {path}: tensor 't', read by Slice node 'slice', has a negative dim in its shape [-3]")


def test_a_declared_negative_dim_into_slice_is_ignored(tmp_path):
    # a value_info dim of -1 (graphsurgeon writes unknown dims so) reached Slice's inference too
    path = _write(tmp_path / "m.onnx", _sliced(helper.make_node("Relu", ["x"], ["t"]), value_info=[_float("t", [-1])]))
    result = _cli_subprocess(path, "--emit=onnx", "-o", tmp_path / "o.onnx")
    assert (result.returncode, result.stderr) == (0, "")


def _limited_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


@pytest.mark.parametrize(
    "nodes, input_type",
    [
        # a long 1-D tensor through an op with a data propagation function
        ([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], helper.make_tensor_value_info("x", TensorProto.INT64, [2**28])),
        # a short vector whose propagated value is the length of a 1-D tensor: 65536 ** 2 dims
        (
            [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Mul", ["s", "s"], ["n"]),
             helper.make_node("ConstantOfShape", ["n"], ["c"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
             helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)],
            _float("x", [65536]),
        ),
    ],
    ids=["long-input", "propagated-length"],
)
def test_shape_inference_does_not_materialize_long_vectors(tmp_path, nodes, input_type):
    # onnx's data propagation allocated ~140 bytes per element of such a vector: terabytes for these models.
    # -O0: shape inference alone, in a process that may not allocate more than 6 GiB
    path = _write(tmp_path / "m.onnx", _model(nodes, [input_type], [_float("y", ["n"])]))
    result = subprocess.run(
        [sys.executable, "-m", "reccc", str(path), "-O0", "--emit=onnx", "-o", str(tmp_path / "o.onnx")],
        capture_output=True, text=True, timeout=120, preexec_fn=_limited_memory, check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_fuzzing_the_testsuite_models_finds_no_bug():
    # The structured mutator over the bundled models, as tools/fuzz_compile.py runs it: every mutated
    # model must compile or fail with a ReccError.
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "tools" / "fuzz_compile.py"), "--mutations", "500", "--seed", "0"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    summary = [line for line in result.stdout.splitlines() if line.startswith(("500 executions", "bug", "  "))]
    assert result.returncode == 0, "\n".join(summary)
    assert summary[0].startswith("500 executions") and " ok" in summary[0]


def test_shape_inference_serializes_the_skeleton_of_the_weights(monkeypatch):
    """onnx serializes what it infers: a model's weights would cost seconds a call on a model of hundreds
    of MB. It gets the model without the data of its float weights and its integer matrices (quantized
    tables), with its shape vectors, and the result has all of them back, the shapes inferred through
    the Reshape that reads one."""
    from reccc import shape_inference

    codes = numpy_helper.from_array(np.arange(256 * 64, dtype=np.uint8).reshape(256, 64), "codes")
    weight = numpy_helper.from_array(np.ones((64, 32), np.float32), "W")
    shape = numpy_helper.from_array(np.array([-1, 8, 4], np.int64), "shape")
    model = _model(
        [helper.make_node("Gather", ["codes", "ids"], ["rows"]), helper.make_node("Cast", ["rows"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])], [_float("y", None)], [codes, weight, shape],
    )
    serialized = []
    real = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda proto, **kw: serialized.append(proto.ByteSize()) or real(proto, **kw))
    result = shape_inference.inferred(model, "m.onnx")
    assert serialized and max(serialized) < 2048 < model.ByteSize()
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in result.graph.initializer} == {
        t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer
    }
    (output,) = result.graph.output
    assert [d.dim_value for d in output.type.tensor_type.shape.dim][1:] == [8, 4]
