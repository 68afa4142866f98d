"""The accuracy guard around lossy passes, through the CLI: the deviation is always printed, a budget
fails the build with nothing written, --verify-each measures lossless passes after a lossy one
against the lossy result, and golden checks use the build's budget."""

import numpy as np
import pytest

from conftest import model_path

DLRM = model_path("dlrm")

_NUDGE_PLUGIN = '''
import numpy as np
import onnx_graphsurgeon as gs
from reccc.pass_manager import Pass, register_pass


@register_pass
class NudgeOutputBias(Pass):
    """A stand-in lossy pass: moves the last Gemm's bias by `delta`."""

    name = "nudge-output-bias"
    summary = "move the output layer's bias (a test's lossy pass)"
    lossless = False

    def __init__(self, delta=1e-3):
        self.delta = float(delta)

    def call(self, model):
        gemm = [node for node in model.graph.nodes if node.op == "Gemm"][-1]
        bias = gemm.inputs[2]
        gemm.inputs[2] = gs.Constant(bias.name + "_nudged", (bias.values + np.float32(self.delta)).astype(np.float32))
        return True

    def details(self):
        return [f"moved the output bias by {self.delta:g}"]
'''


@pytest.fixture(scope="module")
def nudge_plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("lossy") / "nudge_passes.py"
    path.write_text(_NUDGE_PLUGIN)
    return f"--load-pass-plugin={path}"


def _deviation(stderr: str) -> float:
    line = next(line for line in stderr.splitlines() if line.startswith("reccc: accuracy: "))
    return float(line.split("'ctr' max ")[1].split()[0])


def test_the_deviation_of_a_lossy_build_is_printed(reccc_cli, nudge_plugin, tmp_path):
    result = reccc_cli(DLRM, nudge_plugin, "--passes=constant-folding,nudge-output-bias,dead-code-elimination", "-o", tmp_path / "m.so")
    assert result.code == 0
    assert "reccc: accuracy: output deviation on 64 generated rows: 'ctr' max" in result.stderr and "(no budget set)" in result.stderr
    assert 1e-5 < _deviation(result.stderr) < 1e-3  # a sigmoid moves less than its input


def test_a_lossless_build_prints_no_accuracy_line(reccc_cli, tmp_path):
    assert reccc_cli(DLRM, "-O2", "-o", tmp_path / "m.so").stderr == ""


def test_exceeding_the_budget_fails_and_writes_nothing(reccc_cli, nudge_plugin, tmp_path):
    existing = tmp_path / "m.so"
    existing.write_bytes(b"older build")
    result = reccc_cli(DLRM, nudge_plugin, "--passes=nudge-output-bias", "--accuracy-budget=1e-5", "-o", existing)
    assert result.code == 1
    assert "reccc: error: accuracy budget exceeded: max output deviation" in result.stderr and "> 1e-05" in result.stderr
    assert existing.read_bytes() == b"older build"


def test_calibration_inputs_from_a_file(reccc_cli, nudge_plugin, tmp_path):
    rng = np.random.default_rng(5)
    batch = {"dense": rng.standard_normal((8, 13)).astype(np.float32)} | {
        f"cat_{i}": rng.integers(0, 1000, 8) for i in range(4)
    }
    np.savez(tmp_path / "calibration.npz", **batch)
    result = reccc_cli(DLRM, nudge_plugin, "--passes=nudge-output-bias", f"--calibration={tmp_path / 'calibration.npz'}",
                       "--emit=onnx", "-o", tmp_path / "m.onnx")
    assert result.code == 0 and f"deviation on calibration file {tmp_path / 'calibration.npz'}" in result.stderr


def test_verify_each_rebases_after_a_lossy_pass(reccc_cli, nudge_plugin, tmp_path):
    result = reccc_cli(DLRM, nudge_plugin, "--passes=nudge-output-bias,constant-folding,dead-code-elimination", "--verify-each",
                       "--emit=onnx", "-o", tmp_path / "m.onnx")
    assert result.code == 0, result.stderr


def test_time_passes_shows_a_pass_s_details(reccc_cli, nudge_plugin, tmp_path):
    result = reccc_cli(DLRM, nudge_plugin, "--passes=nudge-output-bias", "--time-passes", "--emit=onnx", "-o", tmp_path / "m.onnx")
    assert "    moved the output bias by 0.001" in result.stderr.splitlines()


def test_golden_check_of_a_lossy_build_uses_its_budget(reccc_cli, nudge_plugin, tmp_path):
    golden = model_path("dlrm").parent.parent / "golden" / "dlrm.golden.npz"
    assert reccc_cli(DLRM, nudge_plugin, "--passes=nudge-output-bias", "--accuracy-budget=1e-3", "-o", tmp_path / "m.so").code == 0
    result = reccc_cli("golden", "check", tmp_path / "m.so", "--golden", golden)
    assert result.code == 0 and "the build's accuracy budget (lossy passes: nudge-output-bias)" in result.stdout
    tight = reccc_cli("golden", "check", tmp_path / "m.so", "--golden", golden, "--rtol", "1e-6")
    assert tight.code == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--accuracy-budget=-1"], "--accuracy-budget: must be a non-negative number"),
        (["--prune-threshold=abc"], "argument --prune-threshold: invalid float value"),
        (["--passes=nudge-output-bias", "--calibration=/nowhere.npz"], "/nowhere.npz: no such inputs file"),
    ],
)
def test_guard_usage_errors(reccc_cli, nudge_plugin, tmp_path, flags, message):
    result = reccc_cli(DLRM, nudge_plugin, *flags, "-o", tmp_path / "m.so")
    assert result.code == 2 and message in result.stderr
