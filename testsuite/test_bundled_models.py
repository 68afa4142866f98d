"""The bundled models are what tools/testmodels.py builds, so regenerating them changes nothing silently."""

import sys
from pathlib import Path

import pytest

from conftest import TESTSUITE_MODELS, model_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import testmodels  # noqa: E402


@pytest.mark.parametrize("name", TESTSUITE_MODELS)
def test_bundled_model_is_reproducible(name):
    assert testmodels.TESTSUITE[name]().SerializeToString() == model_path(name).read_bytes()
