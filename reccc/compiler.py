"""The compile driver: read a model, run the pass pipeline, then write optimized ONNX or lower it
through a target into a library with its manifest. The CLI and `reccc.compile` both call `compile_model`."""

import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from reccc import __version__
from reccc.atomic_file import atomic_output, check_writable
from reccc.accuracy_guard import AccuracyReport, calibration_reference, measure
from reccc.errors import CompileError, UsageError
from reccc.index_guard import FLAGS_OUTPUT, INDEX_CHECK_MODES, guard_embedding_indices
from reccc.ir import Model
from reccc.manifest import Manifest, TensorSpec, write_manifest_source
from reccc.model_file import read_model, write_model
from reccc.native_output import silenced_output
from reccc.pass_manager import PassManager, PassRecord, create_pass
from reccc.pipelines import LOSSY_PASS_OPTIONS, PipelineStep, pipeline_for
from reccc.plugins import PASS_GROUP, load_entry_points
from reccc.reference import ReferenceOutputs
from reccc.sample_inputs import random_inputs
from reccc.target import resolve_target

EMIT_KINDS = ("library", "onnx")


@dataclass
class CompileOptions:
    target: str = "x86"
    opt_level: int = 2
    passes: list[str] | None = None  # run exactly these instead of the level's pipeline
    disabled_passes: list[str] = field(default_factory=list)
    emit: str = "library"
    index_check: str = "error"
    print_after: list[str] = field(default_factory=list)
    verify_each: bool = False
    # Opt-in lossy passes (see pipelines.LOSSY_PASS_OPTIONS) and the accuracy guard they run under.
    prune_threshold: float | None = None
    prune_neurons: float | None = None
    accuracy_budget: float | None = None
    calibration: str | None = None  # .npz of inputs; default: generated valid rows
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)  # input name -> static shape


@dataclass
class CompileResult:
    output: Path
    passes: list[PassRecord]
    pass_seconds: float
    lowering_seconds: float
    accuracy: AccuracyReport | None  # measured when a lossy pass ran


def pipeline(options: CompileOptions) -> list[PipelineStep]:
    """The passes `options` ask for, checked: unknown names and bad parameters fail here, before any work."""
    load_entry_points(PASS_GROUP)
    lossy = {option: getattr(options, option) for option in LOSSY_PASS_OPTIONS}
    steps = pipeline_for(options.opt_level, options.passes, options.disabled_passes, lossy)
    for step in steps:
        create_pass(step.name, **step.params)
    return steps


def compile_model(
    model_path: str | Path,
    output: str | Path,
    options: CompileOptions,
    log: TextIO | None = None,
    show_tvm_log: bool = False,
) -> CompileResult:
    """`log` receives --print-after output (default: stderr); TVM's native log is shown only if asked for."""
    if options.emit not in EMIT_KINDS:
        raise UsageError(f"--emit: must be one of {', '.join(EMIT_KINDS)}, not '{options.emit}'")
    if options.index_check not in INDEX_CHECK_MODES:
        raise UsageError(f"--index-check: must be one of {', '.join(INDEX_CHECK_MODES)}, not '{options.index_check}'")
    if options.accuracy_budget is not None and not options.accuracy_budget >= 0:
        raise UsageError(f"--accuracy-budget: must be a non-negative number, not {options.accuracy_budget}")
    steps = pipeline(options)
    check_writable(output)
    target = resolve_target(options.target) if options.emit == "library" else None
    source = read_model(model_path)
    model = Model.from_onnx(source, str(model_path))
    if options.input_shapes:
        _fix_input_shapes(model, options.input_shapes)

    log = log or sys.stderr
    passes = [create_pass(step.name, **step.params) for step in steps]
    guarded = any(not each.lossless for each in passes)
    if guarded:
        calibration, calibration_source = calibration_reference(model, source, options.calibration)
    start = time.perf_counter()
    manager = PassManager(
        passes,
        print_after=options.print_after,
        verify_against=ReferenceOutputs(source, random_inputs(model, batch=3, seed=0)) if options.verify_each else None,
        log=log,
    )
    records = manager.run(model)
    pass_seconds = time.perf_counter() - start
    accuracy = None
    if guarded:
        accuracy = measure(calibration, calibration_source, model.to_onnx(), options.accuracy_budget)
        print(f"reccc: {accuracy.summary()}", file=log)
        if accuracy.exceeded:
            raise CompileError(
                f"accuracy budget exceeded: max output deviation {accuracy.max_deviation:.3g} > {options.accuracy_budget:g}; nothing written"
            )

    start = time.perf_counter()
    if options.emit == "onnx":
        write_model(model.to_onnx(), output)
        return CompileResult(Path(output), records, pass_seconds, 0.0, accuracy)

    manifest_inputs, manifest_outputs = _interface(model)
    guards = guard_embedding_indices(model, options.index_check)
    with silenced_output(enabled=not show_tvm_log):
        executable = target.compile(model.to_onnx(), options.opt_level)
    manifest = Manifest(
        reccc_version=__version__,
        target=target.description(),
        opt_level=options.opt_level,
        passes=[str(step) for step in steps],
        inputs=manifest_inputs,
        outputs=manifest_outputs,
        index_check=options.index_check,
        index_guards=guards,
        index_flags_output=FLAGS_OUTPUT if guards else None,
        accuracy=None if accuracy is None else accuracy.as_manifest_entry(),
    )
    with tempfile.TemporaryDirectory(prefix="reccc-") as scratch, atomic_output(output) as temporary, silenced_output(
        enabled=not show_tvm_log
    ):
        target.export(executable, temporary, [write_manifest_source(manifest, Path(scratch))])
    return CompileResult(Path(output), records, pass_seconds, time.perf_counter() - start, accuracy)


def _fix_input_shapes(model: Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """--input-shape: each shape must fit its input's rank, static dims and the other given shapes."""
    inputs = {tensor.name: tensor for tensor in model.graph.inputs}
    symbols: dict[str, tuple[int, str]] = {}  # symbolic dim -> (size, the input that fixed it)
    for name, dims in shapes.items():
        flag = f"--input-shape {name}={','.join(map(str, dims))}"
        if name not in inputs:
            raise UsageError(f"{flag}: the model has no input '{name}' (its inputs are: {', '.join(inputs)})")
        if not all(isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 for dim in dims):
            raise UsageError(f"{flag}: dims must be positive integers")
        declared = inputs[name].shape
        if declared is not None and len(declared) != len(dims):
            raise UsageError(f"{flag}: input '{name}' has rank {len(declared)} (shape {list(declared)}), not {len(dims)}")
        for axis, (dim, size) in enumerate(zip(declared or (), dims)):
            if isinstance(dim, int) and dim >= 0 and dim != size:
                raise UsageError(f"{flag}: dim {axis} of input '{name}' is {dim} in the model")
            if isinstance(dim, str):
                fixed, first = symbols.setdefault(dim, (size, name))
                if fixed != size:
                    raise UsageError(f"{flag}: dim '{dim}' of input '{name}' is {fixed} in input '{first}'")
    try:
        model.set_input_shapes(shapes)
    except UsageError as error:
        raise UsageError(f"--input-shape: {error}") from error


def _interface(model: Model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def spec(tensor) -> TensorSpec:
        shape = [d if isinstance(d, int) and d >= 0 else (d or f"{tensor.name}_dim{i}") for i, d in enumerate(tensor.shape or [])]
        return TensorSpec(tensor.name, str(np.dtype(tensor.dtype)), shape)

    return [spec(t) for t in model.graph.inputs], [spec(t) for t in model.graph.outputs]
