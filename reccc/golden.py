"""Golden outputs: reference outputs recorded once from onnxruntime, and the check of an artifact
against them that CI runs on every build (`reccc golden`, the pytest plugin).

A golden file is an .npz holding the inputs (`input/NAME`), onnxruntime's outputs (`output/NAME`)
and `meta`, a JSON string: the model's sha256, how the inputs were made, reccc's and onnxruntime's
versions.

Tolerance rule, per output: |actual - expected| <= atol + rtol * max(1, max |expected|) everywhere,
NaN matching NaN.
"""

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import onnxruntime

from reccc import __version__
from reccc.atomic_file import atomic_output
from reccc.errors import ModelInputError, UsageError, one_line
from reccc.ir import Model
from reccc.model_file import read_model
from reccc.reference import FP32_TOLERANCE, abs_error, output_scale, run_reference
from reccc.sample_inputs import random_inputs

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Golden:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    meta: dict


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str  # why these values, printed in the report


@dataclass(frozen=True)
class OutputCheck:
    name: str
    max_abs_error: float
    max_rel_error: float  # max abs error / max(1, max |expected|)
    worst_index: tuple[int, ...] | None
    expected: float | None  # at the worst element
    actual: float | None
    bound: float
    problem: str | None  # a missing output or a shape mismatch

    @property
    def passed(self) -> bool:
        return self.problem is None and self.max_abs_error <= self.bound


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record(model_path: str | Path, inputs: dict[str, np.ndarray] | None = None, batch: int = 16, seed: int = 0) -> Golden:
    """Run the model in onnxruntime on `inputs`, or on generated valid inputs (ids in range) of `batch` rows."""
    proto = read_model(model_path)
    if inputs is None:
        inputs = random_inputs(Model.from_onnx(proto, str(model_path)), batch, seed)
        source = {"generated": {"batch": batch, "seed": seed}}
    else:
        source = {"given": True}
    try:
        outputs = run_reference(proto, inputs)
    except Exception as error:  # onnxruntime names the offending input in its message
        raise UsageError(f"{model_path}: onnxruntime cannot run the model on these inputs: {error}") from error
    meta = {
        "format_version": FORMAT_VERSION,
        "model": Path(model_path).name,
        "model_sha256": file_sha256(model_path),
        "inputs": source,
        "reccc_version": __version__,
        "onnxruntime_version": onnxruntime.__version__,
    }
    return Golden(dict(inputs), outputs, meta)


def save(golden: Golden, path: str | Path) -> None:
    arrays = {f"input/{name}": value for name, value in golden.inputs.items()}
    arrays |= {f"output/{name}": value for name, value in golden.outputs.items()}
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.savez_compressed(file, meta=np.array(json.dumps(golden.meta, sort_keys=True)), **arrays)


def load(path: str | Path) -> Golden:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file}: no such golden file")
    try:
        with np.load(file, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            inputs = {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith("input/")}
            outputs = {key.split("/", 1)[1]: data[key] for key in data.files if key.startswith("output/")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise UsageError(f"{file}: not a reccc golden file ({error})") from error
    if meta.get("format_version") != FORMAT_VERSION or not outputs:
        raise UsageError(f"{file}: not a reccc golden file of format {FORMAT_VERSION}")
    return Golden(inputs, outputs, meta)


def default_tolerance(artifact: str | Path) -> Tolerance:
    """Tight for what the artifact's manifest shows was built losslessly; ONNX files are held to the same."""
    if Path(artifact).suffix == ".onnx":
        return Tolerance(0.0, FP32_TOLERANCE, "fp32 (an ONNX model)")
    from reccc.manifest import read_manifest
    from reccc.pass_manager import registered_passes
    from reccc.plugins import PASS_GROUP, load_entry_points

    load_entry_points(PASS_GROUP)
    manifest = read_manifest(artifact)
    passes = registered_passes()
    names = [step.split("<")[0] for step in manifest.passes]  # steps may carry parameters: name<key=value>
    lossy = [name for name in names if name not in passes or not passes[name].lossless]
    # The build measured its accuracy iff a lossy pass changed the model (-O3's default embedding
    # quantization leaves small tables alone): without a measurement the build is lossless.
    if lossy and manifest.accuracy is not None:
        budget = (manifest.accuracy or {}).get("budget")
        if budget is None:
            raise UsageError(
                f"{artifact}: built with passes reccc cannot vouch are lossless ({', '.join(lossy)}) and no accuracy budget; "
                "give --atol and --rtol"
            )
        return Tolerance(budget, FP32_TOLERANCE, f"the build's accuracy budget (lossy passes: {', '.join(lossy)})")
    return Tolerance(0.0, FP32_TOLERANCE, f"fp32, lossless build (-O{manifest.opt_level}: {', '.join(manifest.passes) or 'no passes'})")


def run_artifact(artifact: str | Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a compiled .so through reccc.load, or an .onnx through onnxruntime."""
    if Path(artifact).suffix == ".onnx":
        model = read_model(artifact)
        try:
            return run_reference(model, inputs)
        except Exception as error:  # onnxruntime's own input checks (names, dtypes, shapes)
            raise ModelInputError(f"onnxruntime: {one_line(error)}") from error
    from reccc.runtime import load as load_artifact

    return load_artifact(artifact).run(inputs)


def compare(golden: Golden, actual: dict[str, np.ndarray], tolerance: Tolerance) -> list[OutputCheck]:
    checks = []
    for name, expected in golden.outputs.items():
        scale = output_scale(expected)
        bound = tolerance.atol + tolerance.rtol * scale
        if name not in actual:
            checks.append(OutputCheck(name, float("inf"), float("inf"), None, None, None, bound, "missing from the artifact's outputs"))
            continue
        value = actual[name]
        if value.shape != expected.shape:
            problem = f"shape {list(value.shape)}, expected {list(expected.shape)}"
            checks.append(OutputCheck(name, float("inf"), float("inf"), None, None, None, bound, problem))
            continue
        errors = abs_error(expected, value)
        error = float(np.max(errors)) if errors.size else 0.0
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(errors), errors.shape)) if errors.size else None
        checks.append(
            OutputCheck(
                name, error, error / scale, worst,
                None if worst is None else float(expected[worst]),
                None if worst is None else float(value[worst]),
                bound, None,
            )
        )
    return checks


def format_report(artifact: str | Path, golden_path: str | Path, checks: list[OutputCheck], tolerance: Tolerance) -> str:
    lines = [
        f"{artifact} vs {golden_path}",
        f"tolerance: |actual - expected| <= {tolerance.atol:g} + {tolerance.rtol:g} * max(1, max|expected|) [{tolerance.reason}]",
        f"  {'output':<20}{'max abs err':>13}{'max rel err':>13}{'allowed':>11}  {'worst element (expected -> actual)':<40}result",
    ]
    for check in checks:
        if check.problem is not None:
            lines.append(f"  {check.name:<20}{'':>13}{'':>13}{check.bound:>11.3g}  {check.problem:<40}FAIL")
            continue
        worst = "-" if check.worst_index is None else f"{list(check.worst_index)}: {check.expected:.6g} -> {check.actual:.6g}"
        lines.append(
            f"  {check.name:<20}{check.max_abs_error:>13.3g}{check.max_rel_error:>13.3g}{check.bound:>11.3g}  {worst:<40}"
            f"{'pass' if check.passed else 'FAIL'}"
        )
    failed = sum(not check.passed for check in checks)
    lines.append(f"{len(checks) - failed} passed, {failed} failed")
    return "\n".join(lines)


def write_junit_xml(path: str | Path, artifact: str | Path, checks: list[OutputCheck], tolerance: Tolerance) -> None:
    """One testcase per output, in the JUnit XML that CI systems read."""
    suite = ElementTree.Element(
        "testsuite", name="reccc-golden", tests=str(len(checks)), failures=str(sum(not c.passed for c in checks)), errors="0"
    )
    for check in checks:
        case = ElementTree.SubElement(suite, "testcase", classname=f"reccc.golden.{Path(artifact).name}", name=check.name)
        if not check.passed:
            message = check.problem or f"max abs error {check.max_abs_error:.3g} > {check.bound:.3g} at {list(check.worst_index or ())}"
            failure = ElementTree.SubElement(case, "failure", message=message)
            failure.text = f"tolerance: atol {tolerance.atol:g}, rtol {tolerance.rtol:g} ({tolerance.reason})"
    with atomic_output(path) as temporary:
        ElementTree.ElementTree(suite).write(temporary, encoding="utf-8", xml_declaration=True)


def check(artifact: str | Path, golden_path: str | Path, atol: float | None = None, rtol: float | None = None) -> tuple[list[OutputCheck], Tolerance]:
    """Run `artifact` on the golden inputs and compare; tolerances default from the artifact (see default_tolerance)."""
    golden = load(golden_path)
    if atol is None and rtol is None:
        tolerance = default_tolerance(artifact)
    else:
        tolerance = Tolerance(atol or 0.0, rtol or 0.0, "given")
    return compare(golden, run_artifact(artifact, golden.inputs), tolerance), tolerance
