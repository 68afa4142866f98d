"""The aarch64 targets: artifacts cross-compiled through the CLI run on the aarch64 TVM runtime (under
qemu, set up by tools/arm_emulator.sh) and agree with onnxruntime on this host.

Without the emulator (or the cross toolchain it installs) these tests skip, naming the setup script;
under CI (the CI variable set) they fail instead, since CI's tools/test.sh sets the emulator up.
Emulated runs say nothing about speed: nothing here is timed.
"""

import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import reccc
from reccc.errors import UsageError
from reccc.manifest import read_manifest
from reccc.reference import agreement, run_reference
from reccc.targets import cpu_schedules, relax_lowering
from reccc.targets.arm import ArmTarget, NEON, SVE

from conftest import TESTSUITE_MODELS, assert_matches_onnxruntime, model_path

REPO = Path(__file__).resolve().parents[1]
EMULATOR = Path(os.environ.get("RECCC_AARCH64_ROOT", REPO / ".cache" / "aarch64")) / "python"
RUNNER = Path(__file__).resolve().parent / "aarch64_runner.py"
CROSS_LINKER = "aarch64-linux-gnu-g++"
EM_AARCH64 = 183  # ELF e_machine
RUN_TIMEOUT_S = 600  # a first request includes qemu's start and the runtime's import (seconds each)
# A JSON target with a known SVE vector length: Neoverse V1's 256 bits, 8 fp32 lanes.
NEOVERSE_V1 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1", "vector-width": 256}


def _require(available: bool, missing: str) -> None:
    if available:
        return
    message = f"{missing}: set it up with `bash tools/arm_emulator.sh` (as root)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI's tools/test.sh runs it, so it should be there")
    pytest.skip(message)


@pytest.fixture
def cross_toolchain() -> None:
    _require(shutil.which(CROSS_LINKER) is not None, f"the aarch64 cross toolchain ({CROSS_LINKER}) is not installed")


class Aarch64Runner:
    """aarch64_runner.py under qemu, started once and fed one artifact run at a time."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.log = scratch / "runner.log"
        self.requests = 0
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [str(EMULATOR), str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
            )

    def run(self, artifact: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.requests += 1
        inputs, outputs = self.scratch / f"in{self.requests}.npz", self.scratch / f"out{self.requests}.npz"
        np.savez(inputs, **feeds)
        request = {"artifact": str(artifact), "inputs": str(inputs), "outputs": str(outputs)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], RUN_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"the aarch64 runner did not answer for {artifact.name}; its log: {self.log.read_text()[-2000:]}")
        answer = json.loads(line)
        assert answer.get("ok"), f"{artifact.name} under qemu: {answer['error']}"
        with np.load(outputs) as result:
            return dict(result)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="session")
def aarch64(tmp_path_factory):
    """Runs artifacts on the emulated aarch64 runtime; qemu starts once per test session (per worker)."""
    _require(EMULATOR.is_file(), f"the aarch64 emulator ({EMULATOR}) is not set up")
    _require(shutil.which(CROSS_LINKER) is not None, f"the aarch64 cross toolchain ({CROSS_LINKER}) is not installed")
    runner = Aarch64Runner(tmp_path_factory.mktemp("aarch64"))
    yield runner
    runner.close()


def _elf_machine(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[18:20], "little")


def _compile(reccc_cli, name: str, target: str, output: Path) -> Path:
    result = reccc_cli(model_path(name), f"--target={target}", "-O2", "-o", output)
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    return output


def _disassembly(path: Path) -> str:
    return subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", str(path)], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_arm_artifact_runs_on_aarch64_and_matches_onnxruntime(reccc_cli, tmp_path, aarch64, name):
    artifact = _compile(reccc_cli, name, "arm", tmp_path / f"{name}.so")
    assert _elf_machine(artifact) == EM_AARCH64
    manifest = read_manifest(artifact)
    assert manifest.target["mtriple"] == "aarch64-linux-gnu" and "+neon" in str(manifest.target["mattr"])
    for batch in (1, 7, 64):
        assert_matches_onnxruntime(model_path(name), lambda feeds: aarch64.run(artifact, feeds), batch, seed=batch)


def test_arm_sve_artifact_has_sve_code_and_matches_onnxruntime(reccc_cli, tmp_path, aarch64):
    neon = _compile(reccc_cli, "dlrm", "arm:neon", tmp_path / "neon.so")
    sve = _compile(reccc_cli, "dlrm", "arm:sve", tmp_path / "sve.so")
    assert "+sve" in str(read_manifest(sve).target["mattr"])
    # ptrue sets an SVE predicate: SVE code is there, and only where SVE was asked for.
    assert "ptrue" in _disassembly(sve) and "ptrue" not in _disassembly(neon)
    for batch in (1, 7):  # qemu's `-cpu max` (the emulator's) implements SVE
        assert_matches_onnxruntime(model_path("dlrm"), lambda feeds: aarch64.run(sve, feeds), batch, seed=batch)


def test_aarch64_tvm_target_json_cross_compiles_and_runs(reccc_cli, tmp_path, aarch64):
    artifact = _compile(reccc_cli, "two_tower", json.dumps(NEOVERSE_V1), tmp_path / "v1.so")
    assert _elf_machine(artifact) == EM_AARCH64
    target = read_manifest(artifact).target
    assert target["mcpu"] == "neoverse-v1" and target["vector-width"] == 256
    for batch in (1, 7):
        assert_matches_onnxruntime(model_path("two_tower"), lambda feeds: aarch64.run(artifact, feeds), batch, seed=batch)


def test_tvm_device_tag_target_cross_compiles_and_runs(reccc_cli, tmp_path, aarch64):
    artifact = _compile(reccc_cli, "wide_and_deep", "arm:raspberry-pi/4b-aarch64", tmp_path / "rpi4.so")
    target = read_manifest(artifact).target
    assert (target["mtriple"], target["mcpu"]) == ("aarch64-linux-gnu", "cortex-a72")
    assert_matches_onnxruntime(model_path("wide_and_deep"), lambda feeds: aarch64.run(artifact, feeds), batch=7)


def test_arm_build_is_reproducible(tmp_path, cross_toolchain):
    # Separate processes, as a build system runs them; the cross linker must not add anything variable.
    for name in ("a.so", "b.so"):
        command = [sys.executable, "-m", "reccc", str(model_path("deepfm")), "--target=arm:sve", "-o", str(tmp_path / name)]
        subprocess.run(command, check=True)
    assert (tmp_path / "a.so").read_bytes() == (tmp_path / "b.so").read_bytes()


def test_vector_width_follows_neon_and_sve(cross_toolchain):
    def lanes(config: dict) -> int:
        return cpu_schedules.vector_lanes(ArmTarget(config).tvm_target())

    assert lanes(NEON) == 4  # NEON: 128-bit vectors
    assert lanes({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}) == 4
    assert lanes(SVE) == 4  # SVE of unknown length: its 128-bit minimum
    assert lanes(NEOVERSE_V1) == 8  # SVE whose length the target declares


def test_arm_schedules_vectorize_the_matmul_kernels(cross_toolchain):
    target = ArmTarget(NEON).tvm_target()
    with target:
        fused = relax.get_pipeline("zero")(relax_lowering.to_relax(onnx.load(model_path("dlrm"))))
    module = cpu_schedules.apply_default_schedules(fused, target)
    kernels = [f.script() for symbol, f in module.functions.items() if "matmul" in symbol.name_hint]
    assert kernels and all("T.parallel" in text and "T.vectorized" in text for text in kernels)


def test_loading_an_aarch64_artifact_on_this_host_names_both(reccc_cli, tmp_path, cross_toolchain):
    if os.uname().machine == "aarch64":
        pytest.skip("this host is aarch64: the artifact loads here")
    artifact = _compile(reccc_cli, "deepfm", "arm", tmp_path / "deepfm.so")
    with pytest.raises(UsageError, match=r"built for aarch64-linux-gnu, and this host is x86_64: run it on an aarch64 machine"):
        reccc.load(artifact)
    result = reccc_cli("golden", "check", artifact, "--golden", Path(__file__).parent / "golden" / "deepfm.golden.npz")
    assert result.code == 2 and "built for aarch64-linux-gnu" in result.stderr and result.stderr.count("\n") == 1


def test_missing_cross_toolchain_is_a_usage_error(reccc_cli, tmp_path, monkeypatch):
    if os.uname().machine == "aarch64":
        pytest.skip("this host is aarch64: it links with its own g++")
    monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-g++ on it
    result = reccc_cli(model_path("deepfm"), "--target=arm", "-o", tmp_path / "m.so")
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert "aarch64-linux-gnu-g++" in result.stderr and "g++-aarch64-linux-gnu" in result.stderr
    assert not (tmp_path / "m.so").exists()


@pytest.mark.parametrize(
    "target, message",
    [
        ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "bogus-key": 1}', "TVM rejects"),
        ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "native"}', '"mcpu": "native" means this host\'s CPU'),
    ],
)
def test_bad_aarch64_targets_are_usage_errors(reccc_cli, tmp_path, cross_toolchain, target, message):
    if "native" in target and os.uname().machine == "aarch64":
        pytest.skip("this host is aarch64: native names its CPU")
    result = reccc_cli(model_path("deepfm"), f"--target={target}", "-o", tmp_path / "m.so")
    assert result.code == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_arm_at_O3_says_tuning_is_not_supported(reccc_cli, tmp_path, cross_toolchain):
    result = reccc_cli(model_path("deepfm"), "--target=arm", "-O3", "-o", tmp_path / "m.so")
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert "auto-tuning for aarch64 is not supported yet; build with -O2" in result.stderr
    assert not (tmp_path / "m.so").exists()


DOT_INSTRUCTION = {"int8": "sdot", "bf16": "bfdot"}


def _compile_rewritten(reccc_cli, source: Path, target: str, precision: str, folder: Path) -> tuple[Path, Path]:
    """The artifact and the rewritten graph (--emit=onnx) of `source` built with --fc-precision."""
    outputs = (folder / "m.so", folder / "m.onnx")
    for output, emit in zip(outputs, ("library", "onnx")):
        result = reccc_cli(source, f"--target={target}", f"--fc-precision={precision}", f"--emit={emit}", "-o", output)
        assert result.code == 0, result.stderr
    return outputs


def _dot_kernels(path: Path, precision: str) -> list[str]:
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return [line for line in symbols.splitlines() if f"matmul_dot_{precision}" in line]


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_arm_fc_layers_run_on_the_dot_product_extensions(reccc_cli, tmp_path, aarch64, precision):
    """Neoverse V1 has the dot-product and BF16 extensions: each int8 / bf16 layer of the DLRM is one
    kernel whose product is sdot (the codes as signed bytes, 128 x the weight sums added back) or bfdot
    (the activations rounded to bf16), and the artifact, run under qemu, agrees with onnxruntime's run
    of the rewritten graph at batches that are and are not multiples of the 4-row tile."""
    artifact, graph = _compile_rewritten(reccc_cli, model_path("dlrm"), json.dumps(NEOVERSE_V1), precision, tmp_path)
    assert len(_dot_kernels(artifact, precision)) == 4
    assert f"\t{DOT_INSTRUCTION[precision]}\t" in _disassembly(artifact)
    for batch in (1, 7, 64):
        assert_matches_onnxruntime(graph, lambda feeds: aarch64.run(artifact, feeds), batch, seed=batch)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("fan_in, units", [(13, 20), (30, 72)])
def test_arm_dot_product_layer_of_any_shape(reccc_cli, tmp_path, aarch64, precision, fan_in, units):
    """Inputs not a multiple of the group and units not a multiple of 4 or of the tile are zero-padded
    in the kernel: without a bias the int8 layer equals onnxruntime's run exactly (the shifted codes'
    correction included), bf16 within the fp32 bound."""
    rng = np.random.default_rng(fan_in)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "one_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", fan_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", units])],
        [numpy_helper.from_array(rng.standard_normal((fan_in, units)).astype(np.float32), "W")],
    )
    source = tmp_path / "fc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    artifact, rewritten = _compile_rewritten(reccc_cli, source, json.dumps(NEOVERSE_V1), precision, tmp_path)
    assert len(_dot_kernels(artifact, precision)) == 1
    for batch in (1, 5):
        x = (rng.standard_normal((batch, fan_in)) * 4).astype(np.float32)
        actual, expected = aarch64.run(artifact, {"x": x})["y"], run_reference(onnx.load(rewritten), {"x": x})["y"]
        if precision == "int8":
            np.testing.assert_array_equal(actual, expected)
        else:
            for _, (error, bound) in agreement({"y": expected}, {"y": actual}).items():
                assert error <= bound, (batch, error, bound)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_arm_target_without_the_extensions_keeps_the_plain_product(reccc_cli, tmp_path, cross_toolchain, precision):
    """`arm` (ARMv8-A with NEON only) has neither extension: no dot-product kernel, no sdot / bfdot."""
    artifact, _ = _compile_rewritten(reccc_cli, model_path("dlrm"), "arm", precision, tmp_path)
    assert not _dot_kernels(artifact, precision) and f"\t{DOT_INSTRUCTION[precision]}\t" not in _disassembly(artifact)
