"""Golden-output regression testing as CI users run it: `reccc golden record|check`, tolerances,
JUnit XML, and the pytest plugin. The bundled models' golden files live in testsuite/golden/
(rewrite with: reccc golden record testsuite/models/M.onnx --generate 16 --seed 0 -o testsuite/golden/M.golden.npz)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from reccc import golden
from reccc.pipelines import PIPELINES
from reccc.reference import run_reference

from conftest import TESTSUITE_MODELS, model_path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.golden.npz"


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_every_bundled_model_compiled_for_x86_matches_its_golden_file(reccc_cli, compiled, name):
    result = reccc_cli("golden", "check", compiled(name), "--golden", golden_path(name))
    assert result.code == 0, result.stdout
    assert f"fp32, lossless build (-O2: {', '.join(PIPELINES[2])})" in result.stdout
    outputs = [o.name for o in onnx.load(model_path(name)).graph.output]
    assert result.stdout.splitlines()[-1] == f"{len(outputs)} passed, 0 failed"


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_golden_files_are_current(name):
    """The stored outputs are still what onnxruntime computes from the bundled model and stored inputs."""
    stored = golden.load(golden_path(name))
    assert stored.meta["model_sha256"] == golden.file_sha256(model_path(name))
    assert stored.meta["inputs"] == {"generated": {"batch": 16, "seed": 0}}
    fresh = run_reference(onnx.load(model_path(name)), stored.inputs)
    for output, expected in stored.outputs.items():
        np.testing.assert_allclose(fresh[output], expected, rtol=1e-6, atol=1e-7)


def test_an_onnx_model_can_be_checked_too(reccc_cli):
    result = reccc_cli("golden", "check", model_path("deepfm"), "--golden", golden_path("deepfm"))
    assert result.code == 0 and "fp32 (an ONNX model)" in result.stdout


def test_record_from_given_inputs(reccc_cli, tmp_path):
    inputs = {"feat_ids": np.array([[0, 1, 2, 3, 4], [299, -1, 5, 7, 9]], np.int64)}
    np.savez(tmp_path / "batch.npz", **inputs)
    result = reccc_cli("golden", "record", model_path("deepfm"), "--inputs", tmp_path / "batch.npz", "-o", tmp_path / "g.npz")
    assert (result.code, result.stderr) == (0, "")
    stored = golden.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(stored.inputs["feat_ids"], inputs["feat_ids"])
    np.testing.assert_array_equal(stored.outputs["prob"], run_reference(onnx.load(model_path("deepfm")), inputs)["prob"])
    assert stored.meta["inputs"] == {"given": True} and stored.meta["reccc_version"] and stored.meta["onnxruntime_version"]


def _nudged_model(tmp_path: Path, delta: float) -> Path:
    """The DLRM model with one weight, the output layer's bias, moved by `delta`."""
    model = onnx.load(model_path("dlrm"))
    last_gemm = [node for node in model.graph.node if node.op_type == "Gemm"][-1]
    weight = next(init for init in model.graph.initializer if init.name == last_gemm.input[2])
    values = numpy_helper.to_array(weight).copy()
    values[0] += delta
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    path = tmp_path / "dlrm_nudged.onnx"
    onnx.save(model, path)
    return path


def test_a_weight_moved_by_1e_3_fails_the_check(reccc_cli, tmp_path):
    assert reccc_cli(_nudged_model(tmp_path, 1e-3), "-o", tmp_path / "nudged.so").code == 0
    result = reccc_cli("golden", "check", tmp_path / "nudged.so", "--golden", golden_path("dlrm"), "--junit-xml", tmp_path / "j.xml")
    assert result.code == 1
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("ctr"))
    assert row.endswith("FAIL") and result.stdout.splitlines()[-1] == "0 passed, 1 failed"
    suite = ElementTree.parse(tmp_path / "j.xml").getroot()
    assert (suite.get("tests"), suite.get("failures")) == ("1", "1")
    assert "max abs error" in suite.find("testcase/failure").get("message")


def test_a_weight_moved_within_fp32_noise_passes(reccc_cli, tmp_path):
    assert reccc_cli(_nudged_model(tmp_path, 1e-7), "-o", tmp_path / "nudged.so").code == 0
    assert reccc_cli("golden", "check", tmp_path / "nudged.so", "--golden", golden_path("dlrm")).code == 0


def test_explicit_tolerances_override_the_default(reccc_cli, tmp_path):
    assert reccc_cli(_nudged_model(tmp_path, 1e-3), "-o", tmp_path / "nudged.so").code == 0
    result = reccc_cli("golden", "check", tmp_path / "nudged.so", "--golden", golden_path("dlrm"), "--atol", "1e-2")
    assert result.code == 0 and "<= 0.01 + 0 * max(1, max|expected|) [given]" in result.stdout


def test_junit_xml_of_a_passing_check(reccc_cli, compiled, tmp_path):
    result = reccc_cli("golden", "check", compiled("two_tower"), "--golden", golden_path("two_tower"), "--junit-xml", tmp_path / "j.xml")
    assert result.code == 0
    suite = ElementTree.parse(tmp_path / "j.xml").getroot()
    assert [case.get("name") for case in suite.iter("testcase")] == ["score", "user_vector"]
    assert suite.get("failures") == "0" and suite.find("testcase/failure") is None


def test_shape_and_missing_output_mismatches_fail(reccc_cli, compiled, tmp_path):
    stored = golden.load(golden_path("dlrm"))
    outputs = {"ctr": stored.outputs["ctr"][:, :0], "extra": np.zeros(3, np.float32)}
    golden.save(golden.Golden(stored.inputs, outputs, stored.meta), tmp_path / "bad.npz")
    result = reccc_cli("golden", "check", compiled("dlrm"), "--golden", tmp_path / "bad.npz")
    assert result.code == 1
    assert "shape [16, 1], expected [16, 0]" in result.stdout and "missing from the artifact's outputs" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["record", "MODEL", "--inputs", "x.npz", "--generate", "4", "-o", "g.npz"], "not allowed with argument"),
        (["record", "MODEL"], "the following arguments are required: -o/--output"),
        (["record", "MODEL", "--inputs", "nowhere.npz", "-o", "g.npz"], "nowhere.npz: no such inputs file"),
        (["check", "MODEL", "--golden", "nowhere.npz"], "nowhere.npz: no such golden file"),
        (["check", "MODEL", "--golden", "MODEL"], "not a reccc golden file"),
        (["check", "missing.so", "--golden", "GOLDEN"], "missing.so: no such file"),
        (["check", "WRONG_MODEL", "--golden", "GOLDEN"], "the golden inputs do not fit it: onnxruntime: Required inputs"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_golden_usage_errors_exit_2(reccc_cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    substitutions = {"MODEL": str(model_path("dlrm")), "GOLDEN": str(golden_path("dlrm")), "WRONG_MODEL": str(model_path("deepfm"))}
    result = reccc_cli("golden", *[substitutions.get(arg, arg) for arg in args])
    assert result.code == 2 and message in result.stderr and result.stderr.count("\n") == 1


_LOSSY_PLUGIN = '''
from reccc.pass_manager import Pass, register_pass


@register_pass
class PretendLossy(Pass):
    name = "pretend-lossy"
    summary = "reports a change it does not make, and declares itself lossy"
    lossless = False

    def call(self, model):
        return True
'''


def test_artifacts_of_lossy_builds_need_explicit_tolerances(reccc_cli, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lossy")
    (folder / "lossy_passes.py").write_text(_LOSSY_PLUGIN)
    artifact = folder / "m.so"
    assert reccc_cli(model_path("dlrm"), f"--load-pass-plugin={folder / 'lossy_passes.py'}", "--passes=pretend-lossy", "-o", artifact).code == 0
    result = reccc_cli("golden", "check", artifact, "--golden", golden_path("dlrm"))
    assert result.code == 2 and "cannot vouch are lossless (pretend-lossy) and no accuracy budget; give --atol" in result.stderr
    assert reccc_cli("golden", "check", artifact, "--golden", golden_path("dlrm"), "--rtol", "1e-4").code == 0


def test_O3_artifact_whose_tables_stayed_fp32_is_checked_as_lossless(reccc_cli, tmp_path):
    """-O3's embedding quantization leaves the bundled model's small tables alone: nothing lossy happened."""
    artifact = tmp_path / "m.so"
    flags = ["-O3", "--tune-trials=0", f"--tune-db={tmp_path / 'tune'}"]
    assert reccc_cli(model_path("dlrm"), *flags, "-o", artifact).code == 0
    result = reccc_cli("golden", "check", artifact, "--golden", golden_path("dlrm"))
    assert result.code == 0 and "fp32, lossless build (-O3" in result.stdout


_USER_TEST = '''
import pytest


@pytest.mark.reccc_golden("dlrm.onnx", golden="dlrm.golden.npz", opt_level=1)
def test_dlrm_matches_golden():
    pass


def test_compile_fixture(reccc_compile):
    import reccc

    model = reccc.load(reccc_compile("dlrm.onnx", opt_level=0))
    assert model.output_names == ["ctr"]
'''


def _user_suite(folder: Path, golden_file: Path) -> Path:
    shutil.copy(model_path("dlrm"), folder / "dlrm.onnx")
    shutil.copy(golden_file, folder / "dlrm.golden.npz")
    (folder / "test_user.py").write_text(_USER_TEST)
    return folder


def _pytest(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=folder, capture_output=True, text=True, check=False,
    )


def test_pytest_plugin_passes_a_matching_model(tmp_path):
    result = _pytest(_user_suite(tmp_path, golden_path("dlrm")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_pytest_plugin_fails_with_the_report(tmp_path):
    stored = golden.load(golden_path("dlrm"))
    moved = golden.Golden(stored.inputs, {"ctr": stored.outputs["ctr"] + np.float32(1e-3)}, stored.meta)
    golden.save(moved, tmp_path / "moved.npz")
    result = _pytest(_user_suite(tmp_path, tmp_path / "moved.npz"))
    assert result.returncode == 1
    assert "golden check failed" in result.stdout and "0 passed, 1 failed" in result.stdout
    assert "1 failed, 1 passed" in result.stdout


def test_golden_meta_is_json_with_provenance():
    meta = golden.load(golden_path("dlrm")).meta
    assert set(meta) == {"format_version", "model", "model_sha256", "inputs", "reccc_version", "onnxruntime_version"}
    json.dumps(meta)
