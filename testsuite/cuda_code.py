"""What the CUDA tests share: nvcc and cuobjdump (fixtures: skipped where missing, except under CI,
whose machine must have them) and an artifact's device code as cuobjdump shows it."""

import importlib.metadata
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reccc.targets.cuda_device_code import find_fatbins


def missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing on CI, whose machine must have it")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="session")
def nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        missing("nvcc (the CUDA toolkit, on PATH)")
    return path


@pytest.fixture(scope="session")
def cuobjdump() -> Path:
    """cuobjdump from the PyPI package nvidia-cuda-cuobjdump (reccc's test extra)."""
    try:
        files = importlib.metadata.files("nvidia-cuda-cuobjdump") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [Path(file.locate()) for file in files if file.name == "cuobjdump"]
    if not found:
        missing("cuobjdump (pip package nvidia-cuda-cuobjdump)")
    return found[0]


def objdump(cuobjdump: Path, fatbin: Path, *flags: str) -> str:
    return subprocess.run([str(cuobjdump), *flags, str(fatbin)], capture_output=True, text=True, check=True).stdout


def extract_fatbin(artifact: Path, into: Path) -> Path:
    fatbins = find_fatbins(artifact.read_bytes())
    assert len(fatbins) == 1, f"{artifact.name}: {len(fatbins)} fatbins"
    path = into / f"{artifact.stem}.fatbin"
    path.write_bytes(fatbins[0].data)
    return path
