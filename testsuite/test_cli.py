"""The `reccc` command as a build system meets it: exit codes, one-line errors, atomic output,
pipelines and their instrumentation, inspect, --help."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import reccc
from reccc.reference import agreement, run_reference
from reccc.sample_inputs import random_inputs
from reccc.ir import Model
from reccc.pipelines import IMPORT_LEGALIZATION, PIPELINES

from conftest import TESTSUITE_MODELS, assert_matches_onnxruntime, model_path

DLRM = model_path("dlrm")
REPO = Path(__file__).resolve().parent.parent


def test_compile_writes_a_loadable_artifact_quietly(reccc_cli, tmp_path):
    result = reccc_cli(DLRM, "--target=x86", "-O2", "-o", tmp_path / "m.so")
    assert (result.code, result.stdout, result.stderr) == (0, "", "")
    assert_matches_onnxruntime(DLRM, reccc.load(tmp_path / "m.so").run, batch=3)
    assert sorted(os.listdir(tmp_path)) == ["m.so"]  # no temporary files left behind


def test_output_is_deterministic(tmp_path):
    # Separate processes, as a build system runs them: TVM's maps keyed by object addresses used to
    # reorder the shape function's stores from process to process.
    for name in ("a.so", "b.so"):
        subprocess.run([sys.executable, "-m", "reccc", str(DLRM), "-o", str(tmp_path / name)], check=True)
    assert (tmp_path / "a.so").read_bytes() == (tmp_path / "b.so").read_bytes()


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_rebuilding_in_one_process_gives_the_same_bytes(reccc_cli, tmp_path, name):
    for output in ("a.so", "b.so"):
        assert reccc_cli(model_path(name), "-o", tmp_path / output).code == 0
    assert (tmp_path / "a.so").read_bytes() == (tmp_path / "b.so").read_bytes()


def test_default_output_path_is_beside_the_model(reccc_cli, tmp_path):
    model = tmp_path / "wd.onnx"
    model.write_bytes(model_path("wide_and_deep").read_bytes())
    assert reccc_cli(model).code == 0
    assert (tmp_path / "wd.so").is_file()
    assert reccc_cli(model, "--emit=onnx").code == 0
    assert (tmp_path / "wd.opt.onnx").is_file()


def test_tvm_target_as_json(reccc_cli, tmp_path):
    target = json.dumps({"kind": "llvm", "mcpu": "x86-64-v2"})
    assert reccc_cli(DLRM, f"--target={target}", "-o", tmp_path / "m.so").code == 0
    model = reccc.load(tmp_path / "m.so")
    assert model.manifest.target["mcpu"] == "x86-64-v2"
    assert_matches_onnxruntime(DLRM, model.run, batch=2)


@pytest.mark.parametrize(
    "target, message",
    [
        ("riscv", "unknown target 'riscv' (available: "),
        ("rocm", "unknown target 'rocm'"),
        ('{"kind": "rocm"}', "TVM target kind 'rocm' is not supported (supported kinds: cuda, llvm)"),
        ('{"kind": "llvm", "mtriple": "riscv64-linux-gnu"}', "cross-compiling for riscv64 from a x86_64 host is not supported"),
        ('{"kind": "llvm", "mcpu": "no-such-cpu-at-all", "bogus-key": 1}', "TVM rejects"),
        ("{not json", "invalid JSON"),
    ],
)
def test_unavailable_targets_are_usage_errors(reccc_cli, tmp_path, target, message):
    result = reccc_cli(DLRM, f"--target={target}", "-o", tmp_path / "m.so")
    assert result.code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "m.so").exists()


def test_emit_onnx_writes_the_optimized_graph(reccc_cli, tmp_path):
    assert reccc_cli(DLRM, "--emit=onnx", "-O2", "-o", tmp_path / "opt.onnx").code == 0
    optimized = onnx.load(tmp_path / "opt.onnx")
    onnx.checker.check_model(optimized, full_check=True)
    ops = [node.op_type for node in optimized.graph.node]
    assert "Transpose" not in ops and "Mul" not in ops  # the folded weight transpose and the dead debug branch
    assert optimized.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    original = onnx.load(DLRM)
    feeds = random_inputs(Model.from_onnx(original), batch=6)
    for error, bound in agreement(run_reference(original, feeds), run_reference(optimized, feeds)).values():
        assert error <= bound


@pytest.fixture
def print_pipeline(reccc_cli):
    def run(*flags) -> list[str]:
        result = reccc_cli(*flags, "--print-pipeline")
        assert result.code == 0 and result.stdout.endswith("\n")
        return [name for name in result.stdout.strip().split(",") if name]

    return run


def test_print_pipeline_per_level(print_pipeline):
    legalization = list(IMPORT_LEGALIZATION)
    assert print_pipeline("-O0") == legalization
    cleanup = print_pipeline("-O1")
    assert cleanup[: len(legalization)] == legalization
    cleanup = cleanup[len(legalization):]
    assert cleanup[0] == "remove-no-ops" and cleanup[-1] == "dead-code-elimination"
    assert cleanup.index("constant-folding") < cleanup.index("fold-transpose-into-gemm") < cleanup.index("prune-dead-neurons")
    assert "concat-fc-fusion" not in cleanup
    fast = print_pipeline("-O2")
    assert fast == [*legalization, *cleanup[:-1], "concat-fc-fusion", "dead-code-elimination"]
    # -O3 adds the lossy default: int8 or fp16 embedding tables, before the cleanup that follows lossy passes.
    position = fast.index("prune-dead-neurons")
    assert print_pipeline("-O3") == [*fast[:position], "embedding-quantization<format=auto>", *fast[position:]]
    assert print_pipeline("-O3", "--embedding-quant=none") == fast


def test_print_pipeline_with_choices(print_pipeline):
    assert "dead-code-elimination" not in print_pipeline("-O3", "--disable-pass=dead-code-elimination")
    assert print_pipeline("-O0", "--passes=dead-code-elimination,constant-folding") == ["dead-code-elimination", "constant-folding"]
    lossy = print_pipeline("-O1", "--prune-threshold=0.01")
    assert lossy[lossy.index("prune-dead-neurons") - 1] == "magnitude-pruning<threshold=0.01>"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--passes=no-such-pass"], "unknown pass 'no-such-pass' (known passes: "),
        (["-O0", "--disable-pass=constant-folding"], "--disable-pass: 'constant-folding' is not in the pipeline"),
        (["-O7"], "argument -O: invalid choice"),
        (["--emit=ptx"], "argument --emit: invalid choice"),
        (["--vm-exec=jit"], "argument --vm-exec: invalid choice"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ([], "no input model"),
    ],
)
def test_usage_errors_exit_2_with_one_line(reccc_cli, flags, message):
    result = reccc_cli(*flags)
    assert result.code == 2 and message in result.stderr
    assert result.stderr.startswith("reccc: error: ") and result.stderr.count("\n") == 1


def test_the_model_function_is_compiled_or_interpreted_as_vm_exec_says(reccc_cli, tmp_path):
    """By default the library's Relax function is native code, which calls its kernels directly; with
    --vm-exec=bytecode the VM interprets it, and tools/kernel_profile.py times each kernel call. Both
    agree with onnxruntime, one row and many."""
    sys.path.insert(0, str(REPO / "tools"))
    from kernel_profile import profile_kernels

    feeds = [random_inputs(Model.from_onnx(onnx.load(DLRM)), 64, seed=seed) for seed in range(2)]
    for mode in ("compiled", "bytecode"):
        library = tmp_path / f"{mode}.so"
        assert reccc_cli(DLRM, f"--vm-exec={mode}", "-o", library).code == 0
        for batch in (1, 64):
            assert_matches_onnxruntime(DLRM, reccc.load(library).run, batch=batch)
    kernels = profile_kernels(tmp_path / "bytecode.so", feeds, runs=2)
    assert any("matmul" in kernel["kernel"] for kernel in kernels) and all(kernel["median_ms"] > 0 for kernel in kernels)
    with pytest.raises(SystemExit, match="rebuild it with --vm-exec=bytecode"):
        profile_kernels(tmp_path / "compiled.so", feeds, runs=2)


def test_passes_runs_exactly_those(reccc_cli, tmp_path):
    result = reccc_cli(DLRM, "--passes=dead-code-elimination", "--emit=onnx", "-o", tmp_path / "o.onnx", "--time-passes")
    assert result.code == 0
    assert "dead-code-elimination" in result.stderr and "constant-folding" not in result.stderr
    assert "Transpose" in [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node]  # nothing folded


def test_time_passes_reports_time_and_changes(reccc_cli, tmp_path):
    result = reccc_cli(DLRM, "-O2", "--time-passes", "-o", tmp_path / "m.so")
    lines = result.stderr.splitlines()
    assert lines[0].split()[:3] == ["pass", "ms", "changed"]
    folding = next(line for line in lines if line.startswith("constant-folding")).split()
    assert folding[2] == "yes" and folding[3] == "18->15"
    assert lines[-1].startswith("total")


def test_print_after_shows_the_graph(reccc_cli, tmp_path):
    result = reccc_cli(DLRM, "--print-after=constant-folding", "--emit=onnx", "-o", tmp_path / "o.onnx")
    assert result.code == 0
    assert result.stderr.count("*** IR after ") == 1 and "*** IR after constant-folding ***" in result.stderr
    assert "Gemm" in result.stderr and "Transpose" not in result.stderr
    everything = reccc_cli(DLRM, "-O1", "--print-after=all", "--emit=onnx", "-o", tmp_path / "o.onnx")
    assert everything.stderr.count("*** IR after ") == len(PIPELINES[1])


def test_verify_each_accepts_the_builtin_pipeline(reccc_cli, tmp_path):
    assert reccc_cli(DLRM, "-O2", "--verify-each", "-o", tmp_path / "m.so").code == 0


def test_verbose_reports_progress(reccc_cli, tmp_path):
    result = reccc_cli(DLRM, "-v", "-o", tmp_path / "m.so")
    assert result.code == 0 and "reccc: passes" in result.stderr and "wrote" in result.stderr


def _write(path, nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_unsupported_ops_are_listed_with_their_nodes(reccc_cli, tmp_path):
    model = _write(
        tmp_path / "m.onnx",
        [
            helper.make_node("Celu", ["x"], ["a"], name="celu_1"),
            helper.make_node("Celu", ["a"], ["b"], name="celu_2"),
            helper.make_node("Det", ["b"], ["y"], name="det"),
        ],
        [_float("x", [3, 3])],
        [_float("y", [])],
    )
    existing = tmp_path / "m.so"
    existing.write_bytes(b"an older artifact")
    result = reccc_cli(model, "-o", existing)
    assert result.code == 1
    assert result.stderr == "reccc: error: unsupported ops: Celu (nodes: celu_1, celu_2); Det (nodes: det)\n"
    assert existing.read_bytes() == b"an older artifact"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.so"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "empty file"),
        (b"\x08\x07garbage that is not protobuf \xff\xfe", "not a valid ONNX model"),
    ],
)
def test_bad_model_files_are_usage_errors(reccc_cli, tmp_path, content, message):
    model = tmp_path / "bad.onnx"
    if content is not None:
        model.write_bytes(content)
    result = reccc_cli(model, "-o", tmp_path / "out.so")
    assert result.code == 2 and result.stderr == f"reccc: error: {model}: {message}" + result.stderr.split(message, 1)[1]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out.so").exists()


def test_truncated_model_is_a_usage_error(reccc_cli, tmp_path):
    model = tmp_path / "cut.onnx"
    model.write_bytes(DLRM.read_bytes()[: DLRM.stat().st_size // 2])
    result = reccc_cli(model, "-o", tmp_path / "out.so")
    assert result.code == 2 and f"{model}: " in result.stderr and result.stderr.count("\n") == 1


def test_invalid_graph_names_the_node(reccc_cli, tmp_path):
    model = _write(
        tmp_path / "m.onnx",
        [helper.make_node("Add", ["x", "nowhere"], ["y"], name="adder")],
        [_float("x", [2])],
        [_float("y", [2])],
    )
    result = reccc_cli(model, "-o", tmp_path / "m.so")
    assert result.code == 2 and "adder" in result.stderr and "nowhere" in result.stderr


def test_type_mismatch_is_a_usage_error(reccc_cli, tmp_path):
    model = _write(
        tmp_path / "m.onnx",
        [helper.make_node("Add", ["x", "n"], ["y"], name="adder")],
        [_float("x", [2]), helper.make_tensor_value_info("n", TensorProto.INT64, [2])],
        [_float("y", [2])],
    )
    result = reccc_cli(model, "-o", tmp_path / "m.so")
    assert result.code == 2 and "m.onnx" in result.stderr and result.stderr.count("\n") == 1


def test_unsupported_opset_is_a_usage_error(reccc_cli, tmp_path):
    model = _write(tmp_path / "m.onnx", [helper.make_node("Relu", ["x"], ["y"])], [_float("x", [2])], [_float("y", [2])], opset=9)
    result = reccc_cli(model, "-o", tmp_path / "m.so")
    assert result.code == 2 and "unsupported opset 9 (reccc supports ONNX opsets 13..23)" in result.stderr


def test_unwritable_output_is_a_usage_error(reccc_cli, tmp_path):
    result = reccc_cli(DLRM, "-o", tmp_path / "no" / "such" / "folder" / "m.so")
    assert result.code == 2 and "does not exist" in result.stderr


def test_inspect_reports_tables_and_parameters(reccc_cli):
    result = reccc_cli("inspect", DLRM, "--json")
    assert result.code == 0
    report = json.loads(result.stdout)
    assert report["ops"]["Gather"] == 4 and report["ops"]["Gemm"] == 5
    assert [(t["rows"], t["row_shape"], t["bytes"]) for t in report["embedding_tables"]] == [(1000, [16], 64000)] * 4
    assert report["inputs"][0] == {"name": "dense", "dtype": "float32", "shape": ["batch", 13]}
    assert report["parameter_bytes"] == sum(numpy_helper.to_array(t).nbytes for t in onnx.load(DLRM).graph.initializer)
    text = reccc_cli("inspect", DLRM)
    assert text.code == 0 and "embedding tables: 4" in text.stdout and "cat_3" in text.stdout


def test_inspect_of_a_missing_file(reccc_cli, tmp_path):
    result = reccc_cli("inspect", tmp_path / "none.onnx")
    assert result.code == 2 and "none.onnx: no such file" in result.stderr


@pytest.mark.parametrize("command", [[], ["inspect"]])
def test_help_for_every_command(command):
    result = subprocess.run([sys.executable, "-m", "reccc", *command, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("usage: reccc")
    assert ("--target" in result.stdout) == (command == [])
    assert ("--json" in result.stdout) == (command == ["inspect"])


def test_installed_script_runs(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "reccc")
    result = subprocess.run([script, str(DLRM), "-o", str(tmp_path / "m.so")], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stderr) == (0, "")
    feeds = random_inputs(Model.from_onnx(onnx.load(DLRM)), batch=2)
    assert np.all(np.isfinite(reccc.load(tmp_path / "m.so").run(feeds)["ctr"]))
