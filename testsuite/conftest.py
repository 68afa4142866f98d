"""Shared fixtures: the bundled models, compiled artifacts of them, an in-process CLI runner, and the
CUDA tools (cuda_code.py)."""

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from cuda_code import cuobjdump, nvcc  # noqa: F401  (fixtures of the CUDA tests)
from hypothesis import settings

import reccc
from reccc.cli import main
from reccc.ir import Model
from reccc.reference import agreement, run_reference
from reccc.sample_inputs import random_inputs

# CI explores the same examples on every run, so a landing never hinges on a lucky draw; developers'
# runs keep drawing new ones (and hypothesis replays the failures they find).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

MODELS_DIR = Path(__file__).resolve().parent / "models"
TESTSUITE_MODELS = ("dlrm", "wide_and_deep", "two_tower", "deepfm")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def reccc_cli(capfd):
    """Run `reccc ARGS...` in this process; returns exit code and what it printed (fd level, so TVM's too)."""

    def run(*args) -> CliResult:
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return CliResult(code, out, err)

    return run


def model_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.onnx"


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """Artifacts of the bundled models at -O2 for x86, compiled once per test session (per worker)."""
    cache: dict[tuple, Path] = {}

    def get(name: str, **options) -> Path:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp("artifacts") / f"{name}.so"
            reccc.compile(model_path(name), path, **options)
            cache[key] = path
        return cache[key]

    return get


def assert_matches_onnxruntime(model_file: Path, run, batch: int, seed: int = 0) -> None:
    """Run `run(feeds)` on random valid inputs and compare every output with onnxruntime (fp32 bound)."""
    proto = onnx.load(model_file)
    feeds = random_inputs(Model.from_onnx(proto), batch, seed)
    actual = run(feeds)
    expected = run_reference(proto, feeds)
    assert list(actual) == list(expected)
    for name, (error, bound) in agreement(expected, actual).items():
        assert error <= bound, f"{model_file.name} output '{name}' at batch {batch}: error {error} > {bound}"
