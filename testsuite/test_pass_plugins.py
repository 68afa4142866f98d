"""Custom passes as users add them: the README's example plugin, --load-pass-plugin, entry points,
and what the manager does with a plugin pass that is broken."""

import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from conftest import model_path

README = Path(__file__).resolve().parent.parent / "README.md"
DLRM = model_path("dlrm")


def _readme_block(marker: str) -> str:
    """The fenced code block that follows `<!-- marker -->` in the README."""
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no code block marked {marker}"
    return match.group(1)


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    (folder / "my_passes.py").write_text(_readme_block("plugin-example"))
    (folder / "test_my_passes.py").write_text(_readme_block("plugin-example-test"))
    return folder


def test_readme_plugin_example_and_its_test_pass(example_plugin):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_passes.py"],
        cwd=example_plugin, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_readme_plugin_runs_from_the_command_line(reccc_cli, example_plugin, tmp_path):
    plugin = example_plugin / "my_passes.py"
    listed = reccc_cli(f"--load-pass-plugin={plugin}", "--list-passes")
    assert listed.code == 0 and "remove-identity" in listed.stdout
    out = tmp_path / "out.onnx"
    model = model_path("two_tower")  # its user_vector output is an Identity, which the pass must keep
    result = reccc_cli(model, f"--load-pass-plugin={plugin}", "--passes=remove-identity", "--verify-each", "--emit=onnx", "-o", out)
    assert result.code == 0, result.stderr
    assert [n.op_type for n in onnx.load(out).graph.node].count("Identity") == 1


_BROKEN_PLUGIN = '''
import numpy as np
import onnx_graphsurgeon as gs
from reccc.pass_manager import Pass, register_pass


@register_pass
class ZeroFirstWeight(Pass):
    name = "zero-first-weight"
    summary = "a wrong pass: zeroes the first Gemm's weight"

    def call(self, model):
        gemm = next(node for node in model.graph.nodes if node.op == "Gemm")
        weight = gemm.inputs[1]
        gemm.inputs[1] = gs.Constant(weight.name + "_zeroed", np.zeros_like(weight.values))
        return True


@register_pass
class Crashes(Pass):
    name = "crashes"
    summary = "a pass with a bug"

    def call(self, model):
        raise RuntimeError("boom")
'''


@pytest.fixture(scope="module")
def broken_plugin(tmp_path_factory):
    # One file for the module: the CLI runs in this process, and a plugin file is imported once per process.
    path = tmp_path_factory.mktemp("plugin") / "broken_passes.py"
    path.write_text(_BROKEN_PLUGIN)
    return path


def test_verify_each_names_the_pass_that_changes_outputs(reccc_cli, broken_plugin, tmp_path):
    result = reccc_cli(
        DLRM, f"--load-pass-plugin={broken_plugin}", "--passes=constant-folding,zero-first-weight,dead-code-elimination",
        "--verify-each", "-o", tmp_path / "m.so",
    )
    assert result.code == 1
    assert result.stderr.startswith("reccc: error: --verify-each: pass 'zero-first-weight' changed the model's outputs: output 'ctr'")
    assert not (tmp_path / "m.so").exists()


def test_a_crashing_pass_is_a_compile_error_without_traceback(reccc_cli, broken_plugin, tmp_path):
    result = reccc_cli(DLRM, f"--load-pass-plugin={broken_plugin}", "--passes=crashes", "-o", tmp_path / "m.so")
    assert (result.code, result.stderr) == (1, "reccc: error: pass 'crashes' failed: RuntimeError: boom\n")
    verbose = reccc_cli(DLRM, f"--load-pass-plugin={broken_plugin}", "--passes=crashes", "-v", "-o", tmp_path / "m.so")
    assert verbose.code == 1 and "Traceback" in verbose.stderr


@pytest.mark.parametrize(
    "spec, message",
    [("no_such_module_anywhere", "cannot import 'no_such_module_anywhere'"), ("/nowhere/p.py", "/nowhere/p.py: no such file")],
)
def test_bad_plugin_is_a_usage_error(reccc_cli, spec, message):
    result = reccc_cli(f"--load-pass-plugin={spec}", "--list-passes")
    assert result.code == 2 and message in result.stderr


def test_installed_plugin_registers_through_its_entry_point(tmp_path):
    site = tmp_path / "site"
    (site / "reccc_demo_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "reccc_demo_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: reccc-demo-plugin\nVersion: 1.0\n")
    (site / "reccc_demo_plugin-1.0.dist-info" / "entry_points.txt").write_text("[reccc.passes]\ndemo = reccc_demo_plugin\n")
    (site / "reccc_demo_plugin.py").write_text(_readme_block("plugin-example"))
    result = subprocess.run(
        [sys.executable, "-m", "reccc", "--list-passes"],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "remove-identity" in result.stdout and "constant-folding" in result.stdout
