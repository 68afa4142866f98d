"""reccc's pytest plugin (entry point `pytest11`): golden-output tests in a user's suite.

    @pytest.mark.reccc_golden("model.onnx", golden="model.golden.npz", opt_level=2)
    def test_model_matches_golden():
        pass

compiles the model with reccc (keyword arguments are reccc.compile options), runs the artifact on
the golden inputs and fails the test with the per-output report when any output is outside the
tolerance (`atol=`, `rtol=` override it). Relative paths are relative to the test file. The
`reccc_compile` fixture compiles a model into the test's temporary folder and returns the artifact.
"""

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "reccc_golden(model, golden, atol=None, rtol=None, **compile_options): compile MODEL with reccc and "
        "check the artifact against the golden file GOLDEN (from 'reccc golden record')",
    )


@pytest.fixture
def reccc_compile(tmp_path: Path):
    """`reccc_compile(model, **options) -> Path`: compile into the test's temporary folder."""
    import reccc

    def compile_model(model: str | Path, **options) -> Path:
        artifact = tmp_path / f"{Path(model).stem}.so"
        reccc.compile(model, artifact, **options)
        return artifact

    return compile_model


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    result = yield
    marker = item.get_closest_marker("reccc_golden")
    if marker is not None:
        _check_golden(item, marker)
    return result


def _check_golden(item: pytest.Item, marker: pytest.Mark) -> None:
    import tempfile

    import reccc
    from reccc import golden

    options = dict(marker.kwargs)
    model = marker.args[0] if marker.args else options.pop("model")
    golden_file = options.pop("golden")
    atol, rtol = options.pop("atol", None), options.pop("rtol", None)
    here = Path(item.path).parent
    model_path, golden_path = here / model, here / golden_file
    with tempfile.TemporaryDirectory(prefix="reccc-golden-") as folder:
        artifact = Path(folder) / f"{model_path.stem}.so"
        reccc.compile(model_path, artifact, **options)
        checks, tolerance = golden.check(artifact, golden_path, atol, rtol)
        report = golden.format_report(model_path.name, golden_path.name, checks, tolerance)
    if not all(check.passed for check in checks):
        pytest.fail(f"golden check failed\n{report}", pytrace=False)
