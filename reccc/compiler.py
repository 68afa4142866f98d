"""The compile driver: read a model, run the pass pipeline, then write optimized ONNX or lower it
through a target into a library with its manifest. The CLI and `reccc.compile` both call `compile_model`."""

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import onnx

from reccc import __version__
from reccc.atomic_file import atomic_output, check_writable
from reccc.errors import UsageError
from reccc.index_guard import FLAGS_OUTPUT, INDEX_CHECK_MODES, guard_embedding_indices
from reccc.ir import Model
from reccc.manifest import Manifest, TensorSpec, write_manifest_source
from reccc.model_file import read_model, write_model
from reccc.native_output import silenced_output
from reccc.pass_manager import PassManager, PassRecord, Verifier, create_pass
from reccc.pipelines import PIPELINES, pipeline_for
from reccc.plugins import PASS_GROUP, load_entry_points
from reccc.reference import agreement, run_reference
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


@dataclass
class CompileResult:
    output: Path
    passes: list[PassRecord]
    pass_seconds: float
    lowering_seconds: float


def pass_names(options: CompileOptions) -> list[str]:
    load_entry_points(PASS_GROUP)
    if options.opt_level not in PIPELINES:
        raise UsageError(f"-O{options.opt_level}: optimization level must be 0, 1, 2 or 3")
    names = pipeline_for(options.opt_level, options.passes, options.disabled_passes)
    for name in names:
        create_pass(name)  # fails early, naming an unknown pass
    return names


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
    names = pass_names(options)
    check_writable(output)
    target = resolve_target(options.target) if options.emit == "library" else None
    source = read_model(model_path)
    model = Model.from_onnx(source, str(model_path))

    start = time.perf_counter()
    manager = PassManager(
        [create_pass(name) for name in names],
        print_after=options.print_after,
        verifier=_output_verifier(model, source) if options.verify_each else None,
        log=log or sys.stderr,
    )
    records = manager.run(model)
    pass_seconds = time.perf_counter() - start

    start = time.perf_counter()
    if options.emit == "onnx":
        write_model(model.to_onnx(), output)
        return CompileResult(Path(output), records, pass_seconds, 0.0)

    manifest_inputs, manifest_outputs = _interface(model)
    guards = guard_embedding_indices(model, options.index_check)
    with silenced_output(enabled=not show_tvm_log):
        executable = target.compile(model.to_onnx(), options.opt_level)
    manifest = Manifest(
        reccc_version=__version__,
        target=target.description(),
        opt_level=options.opt_level,
        passes=names,
        inputs=manifest_inputs,
        outputs=manifest_outputs,
        index_check=options.index_check,
        index_guards=guards,
        index_flags_output=FLAGS_OUTPUT if guards else None,
    )
    with tempfile.TemporaryDirectory(prefix="reccc-") as scratch, atomic_output(output) as temporary, silenced_output(
        enabled=not show_tvm_log
    ):
        target.export(executable, temporary, [write_manifest_source(manifest, Path(scratch))])
    return CompileResult(Path(output), records, pass_seconds, time.perf_counter() - start)


def _interface(model: Model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def spec(tensor) -> TensorSpec:
        shape = [d if isinstance(d, int) and d >= 0 else (d or f"{tensor.name}_dim{i}") for i, d in enumerate(tensor.shape or [])]
        return TensorSpec(tensor.name, str(np.dtype(tensor.dtype)), shape)

    return [spec(t) for t in model.graph.inputs], [spec(t) for t in model.graph.outputs]


def _output_verifier(model: Model, source: onnx.ModelProto) -> Verifier:
    """--verify-each: compare each intermediate model with the input model in onnxruntime on one
    random valid batch, within the fp32 tolerance."""
    feeds = random_inputs(model, batch=3, seed=0)
    reference = run_reference(source, feeds)

    def verify(candidate: onnx.ModelProto) -> str | None:
        for name, (error, bound) in agreement(reference, run_reference(candidate, feeds)).items():
            if not error <= bound:
                return f"output '{name}' differs by {error:.3g} (allowed {bound:.3g})"
        return None

    return verify
