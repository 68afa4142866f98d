"""The compile driver: read a model, run the pass pipeline, then write optimized ONNX or lower it
through a target into a library with its manifest. The CLI and `reccc.compile` both call `compile_model`."""

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import onnx

from reccc import __version__
from reccc.atomic_file import atomic_output, check_writable
from reccc.accuracy_guard import AccuracyReport, calibration_reference, measure
from reccc.errors import CompileError, UsageError
from reccc.external_data import inlined
from reccc.index_guard import FLAGS_OUTPUT, INDEX_CHECK_MODES, guard_embedding_indices
from reccc.ir import Model, tensor_dtype
from reccc.manifest import Manifest, TensorSpec, write_manifest_source
from reccc.model_file import read_model, write_model
from reccc.native_output import silenced_output
from reccc.pass_manager import PassManager, PassRecord, create_pass, registered_passes
from reccc.pipelines import (
    DEFAULT_EMBEDDING_FORMAT,
    DEFAULT_FC_PRECISION,
    EMBEDDING_QUANTIZATION,
    FC_QUANTIZATION,
    LOSSY_PASS_OPTIONS,
    PipelineStep,
    pipeline_for,
)
from reccc.plugins import PASS_GROUP, load_entry_points
from reccc.reference import ReferenceOutputs, output_scale
from reccc.sample_inputs import random_inputs
from reccc.target import VM_EXEC_MODES, TuningOptions, resolve_target
from reccc.weights_file import weights_path, write_weights
from reccc.weights_inputs import check_embeddable, lift_weights, values_to_bind, weights_to_write

EMIT_KINDS = ("library", "onnx")
WEIGHTS_MODES = ("embed", "external")  # --weights
# The accuracy budget of -O3's default embedding quantization, as a fraction of the outputs' scale
# (max(1, max |output|)): for a probability, 0.01.
DEFAULT_BUDGET_FRACTION = 1e-2
# What each default quantization stores, and the flag that chooses it, for the message when it is dropped.
_DEFAULT_FALLBACK = {EMBEDDING_QUANTIZATION: ("embedding tables", "--embedding-quant"), FC_QUANTIZATION: ("FC layers", "--fc-precision")}
# -O3's default tuning budget: whichever ends first. About 10 minutes on 2 cores for a DLRM-style model.
DEFAULT_TUNE_TRIALS = 256
DEFAULT_TUNE_SECONDS = 600.0


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
    # Embedding-table format: int8, int4, fp16, auto or none; None means the level's default (auto at -O3,
    # under DEFAULT_BUDGET_FRACTION when no budget is given). Tables below the size stay fp32;
    # `embedding_quant_tables` gives single tables (by initializer name) their own format or none.
    embedding_quant: str | None = None
    embedding_quant_min_bytes: int | None = None
    embedding_quant_tables: Mapping[str, str] = field(default_factory=dict)
    # FC layer precision: fp32, bf16 or int8; None means the level's default (DEFAULT_FC_PRECISION, under
    # the same default budget). `fc_precision_layers` gives single layers (by node name) their own.
    fc_precision: str | None = None
    fc_precision_layers: Mapping[str, str] = field(default_factory=dict)
    accuracy_budget: float | None = None
    calibration: str | None = None  # .npz of inputs; default: generated valid rows
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)  # input name -> static shape
    # -O3 auto-tuning; None means the default (given below -O3 they are a usage error).
    tune_trials: int | None = None
    tune_seconds: float | None = None
    tune_db: str | None = None  # default: default_tune_db()
    tune_rpc: str | None = None  # HOST:PORT of a TVM RPC tracker
    device_key: str | None = None
    tune_progress: bool = False  # show the updating progress line on stderr
    # "embed": every weight in the library; "external": constants of at least 1 MiB in a file beside it
    # (reccc.weights_inputs, reccc.weights_file), which models past 2 GiB need.
    weights: str = "embed"
    vm_exec: str = "compiled"  # reccc.target.VM_EXEC_MODES


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
    lossy = [
        PipelineStep(name, {parameter: getattr(options, option)})
        for option, (name, parameter) in LOSSY_PASS_OPTIONS.items()
        if getattr(options, option) is not None
    ]
    quantization = _embedding_quantization(options)
    if quantization is not None:
        lossy.append(quantization)
    fc = _fc_quantization(options)
    if fc is not None:
        lossy.append(fc)
    steps = pipeline_for(options.opt_level, options.passes, options.disabled_passes, lossy)
    for step in steps:
        create_pass(step.name, **step.params)
    return steps


def _embedding_quantization(options: CompileOptions) -> PipelineStep | None:
    """The embedding-quantization step the options ask for (or the level's default), if any."""
    chosen = options.embedding_quant
    format = chosen if chosen is not None else (None if options.passes is not None else DEFAULT_EMBEDDING_FORMAT[options.opt_level])
    if format in (None, "none"):
        if options.embedding_quant_tables or options.embedding_quant_min_bytes is not None:
            flag = "--embedding-quant-table" if options.embedding_quant_tables else "--embedding-quant-min-bytes"
            raise UsageError(f"{flag}: embedding tables are not quantized in this build (use --embedding-quant=int8|int4|fp16|auto, or -O3)")
        return None
    params = {"format": format}
    if options.embedding_quant_min_bytes is not None:
        params["min_bytes"] = options.embedding_quant_min_bytes
    if options.embedding_quant_tables:
        params["tables"] = dict(options.embedding_quant_tables)
    return PipelineStep(EMBEDDING_QUANTIZATION, params)


def _fc_quantization(options: CompileOptions) -> PipelineStep | None:
    """The fc-quantization step the options ask for (or the level's default), if any."""
    chosen = options.fc_precision
    precision = chosen if chosen is not None else (None if options.passes is not None else DEFAULT_FC_PRECISION[options.opt_level])
    if precision is None and options.fc_precision_layers:
        precision = "fp32"  # only the named layers change
    if precision is None or (precision == "fp32" and not options.fc_precision_layers):
        return None
    params = {"precision": precision}
    if options.fc_precision_layers:
        params["layers"] = dict(options.fc_precision_layers)
    return PipelineStep(FC_QUANTIZATION, params)


def _is_default_quantization(options: CompileOptions, step: PipelineStep) -> bool:
    """A lossy step the level chose, not the user: it runs under the default budget and is dropped
    (not failed) when it exceeds it."""
    return (step.name == EMBEDDING_QUANTIZATION and options.embedding_quant is None) or (
        step.name == FC_QUANTIZATION and options.fc_precision is None and not options.fc_precision_layers
    )


def _lossy_change(records: list[PassRecord]) -> bool:
    """Whether a lossy pass changed the model: then the accuracy guard measures the effect."""
    passes = registered_passes()
    return any(record.changed and not passes[record.name].lossless for record in records)


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
    if options.weights not in WEIGHTS_MODES:
        raise UsageError(f"--weights: must be one of {', '.join(WEIGHTS_MODES)}, not '{options.weights}'")
    if options.vm_exec not in VM_EXEC_MODES:
        raise UsageError(f"--vm-exec: must be one of {', '.join(VM_EXEC_MODES)}, not '{options.vm_exec}'")
    if options.weights != "embed" and options.emit != "library":
        raise UsageError("--weights=external: only a library output has a weights file (the ONNX output keeps its weights)")
    if options.accuracy_budget is not None and not options.accuracy_budget >= 0:
        raise UsageError(f"--accuracy-budget: must be a non-negative number, not {options.accuracy_budget}")
    steps = pipeline(options)
    tuning = tuning_options(options)
    check_writable(output)
    if options.weights == "external":
        check_writable(weights_path(Path(output)))
    target = resolve_target(options.target) if options.emit == "library" else None
    source = read_model(model_path)
    log = log or sys.stderr
    model, records, pass_seconds = _optimize(source, str(model_path), steps, options, log)
    accuracy = None
    if _lossy_change(records):
        calibration, description = calibration_reference(model_before_passes(source, str(model_path), options), source, options.calibration)
        defaulted = [step for step in steps if _is_default_quantization(options, step)]
        budget = options.accuracy_budget
        if budget is None and defaulted:
            budget = DEFAULT_BUDGET_FRACTION * max(output_scale(values) for values in calibration.outputs.values())
        accuracy = measure(calibration, description, model.to_onnx(), budget)
        print(f"reccc: {accuracy.summary()}", file=log)
        # Only -O3's default quantizations run under a budget the user did not set: drop them rather than
        # fail, the last one first (FC layers, then embedding tables), until the rest fits; what is left
        # is then measured without a budget (the user chose it).
        while accuracy.exceeded and options.accuracy_budget is None and defaulted:
            dropped = defaulted.pop()
            what, flag = _DEFAULT_FALLBACK[dropped.name]
            print(f"reccc: -O{options.opt_level}: {what} kept fp32: quantizing them exceeds the default budget "
                  f"(choose with {flag} and --accuracy-budget)", file=log)
            steps = [step for step in steps if step != dropped]
            model, records, pass_seconds = _optimize(source, str(model_path), steps, options, log)
            if not _lossy_change(records):
                accuracy = None
                break
            accuracy = measure(calibration, description, model.to_onnx(), budget if defaulted else None)
            print(f"reccc: {accuracy.summary()}", file=log)
        if accuracy is not None and accuracy.exceeded:
            raise CompileError(
                f"accuracy budget exceeded: max output deviation {accuracy.max_deviation:.3g} > {budget:g}; nothing written"
            )

    start = time.perf_counter()
    if options.emit == "onnx":
        write_model(inlined(model.to_onnx(), f"{model_path}: --emit=onnx"), output)
        return CompileResult(Path(output), records, pass_seconds, 0.0, accuracy)

    manifest_inputs, manifest_outputs = _interface(model)
    guards = guard_embedding_indices(model, options.index_check)
    with _progress_stream(options.tune_progress and tuning is not None) as progress, silenced_output(enabled=not show_tvm_log):
        tuning = dataclasses.replace(tuning, progress=progress) if tuning is not None else None
        lowered, lifted = lift_weights(model)
        if options.weights == "external":
            weights, constants = weights_to_write(lifted), []
        else:
            check_embeddable(lowered, lifted, str(model_path))
            weights, constants = [], values_to_bind(lifted)
        # a mapped table that only a subgraph reads, or that is an output, is still in the graph
        lowered = inlined(lowered, f"{model_path}: --weights={options.weights}", "; build with --weights=external" if options.weights == "embed" else "")
        executable = target.compile(lowered, options.opt_level, tuning, options.vm_exec, constants)
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
        cpu_flags=target.cpu_flags(),
    )
    # With --weights=external both files are written, or neither: the library's temporary file is renamed
    # last, and a library always names the weights it was built with (a stale pair is refused at load).
    with contextlib.ExitStack() as outputs:
        temporary = outputs.enter_context(atomic_output(output))
        if options.weights == "external":
            weights_file = weights_path(Path(output))
            manifest = dataclasses.replace(manifest, weights=write_weights(weights, outputs.enter_context(atomic_output(weights_file)), weights_file.name))
        scratch = outputs.enter_context(tempfile.TemporaryDirectory(prefix="reccc-"))
        with silenced_output(enabled=not show_tvm_log):
            target.export(executable, temporary, [write_manifest_source(manifest, Path(scratch))])
    return CompileResult(Path(output), records, pass_seconds, time.perf_counter() - start, accuracy)


def model_before_passes(source: onnx.ModelProto, path: str, options: CompileOptions) -> Model:
    """The input model as the passes receive it: read, with --input-shape applied."""
    model = Model.from_onnx(source, path)
    if options.input_shapes:
        _fix_input_shapes(model, options.input_shapes)
    return model


def _optimize(source: onnx.ModelProto, path: str, steps: list[PipelineStep], options: CompileOptions, log: TextIO) -> tuple[Model, list[PassRecord], float]:
    """Run the pass pipeline on a fresh copy of `source`: the optimized model, what each pass did, seconds taken."""
    model = model_before_passes(source, path, options)
    start = time.perf_counter()
    manager = PassManager(
        [create_pass(step.name, **step.params) for step in steps],
        print_after=options.print_after,
        verify_against=ReferenceOutputs(source, random_inputs(model, batch=3, seed=0)) if options.verify_each else None,
        log=log,
    )
    records = manager.run(model)
    return model, records, time.perf_counter() - start


def default_tune_db() -> Path:
    """The per-user tuning database: $XDG_CACHE_HOME/reccc/tune, else ~/.cache/reccc/tune."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "reccc" / "tune"


def tuning_options(options: CompileOptions) -> TuningOptions | None:
    """-O3's tuning options, checked; None below -O3, where the tuning flags are a usage error."""
    given = {
        "--tune-trials": options.tune_trials, "--tune-time": options.tune_seconds, "--tune-db": options.tune_db,
        "--tune-rpc": options.tune_rpc, "--device-key": options.device_key,
    }
    if options.opt_level < 3 or options.emit != "library":
        flags = [flag for flag, value in given.items() if value is not None]
        if flags:
            raise UsageError(f"{flags[0]}: tuning options need -O3 and a library output")
        return None
    trials = DEFAULT_TUNE_TRIALS if options.tune_trials is None else options.tune_trials
    seconds = DEFAULT_TUNE_SECONDS if options.tune_seconds is None else options.tune_seconds
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise UsageError(f"--tune-trials: must be a non-negative integer, not {trials}")
    if not seconds >= 0:
        raise UsageError(f"--tune-time: must be a non-negative number of seconds, not {seconds}")
    if (options.tune_rpc is None) != (options.device_key is None):
        raise UsageError("--tune-rpc and --device-key go together: the tracker and the key of its devices")
    tracker = _tracker_address(options.tune_rpc) if options.tune_rpc is not None else None
    database = Path(options.tune_db) if options.tune_db is not None else default_tune_db()
    try:
        database.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--tune-db {database}: cannot create the folder: {error.strerror}") from error
    if not os.access(database, os.R_OK | os.W_OK | os.X_OK):
        raise UsageError(f"--tune-db {database}: the folder is not writable")
    return TuningOptions(trials, float(seconds), database, tracker, options.device_key)


def _tracker_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--tune-rpc {value}: expected HOST:PORT of a TVM RPC tracker")
    return host, int(port)


@contextlib.contextmanager
def _progress_stream(enabled: bool) -> Iterator[TextIO | None]:
    """stderr for the tuning progress line, kept open while TVM's own output is silenced."""
    if not enabled:
        yield None
        return
    sys.stderr.flush()
    with os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1) as stream:
        yield stream


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
        return TensorSpec(tensor.name, str(tensor_dtype(tensor)), shape)

    return [spec(t) for t in model.graph.inputs], [spec(t) for t in model.graph.outputs]
