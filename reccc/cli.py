"""The `reccc` command line.

    reccc MODEL.onnx [--target=x86] [-O2] [-o OUT]     compile (the default command)
    reccc inspect MODEL.onnx [--json]                  describe a model
    reccc golden record|check ...                      golden-output regression tests

Exit status: 0 ok, 1 compile failure, 2 bad usage or input. Errors are one line on stderr; -v adds
progress, TVM's own log and tracebacks.
"""

import argparse
import json
import sys
import traceback
from pathlib import Path

from reccc import __version__
from reccc.errors import ReccError, UsageError
from reccc.pipelines import EMBEDDING_FORMAT_CHOICES

class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as exit 2 through reccc's own one-line error path."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _compile_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="reccc",
        description="Compile an ONNX recommender model into a library for a target, through Apache TVM.",
        epilog="Other commands: 'reccc inspect MODEL', 'reccc golden record|check' (each has --help). "
        "Exit status: 0 ok, 1 compile failure, 2 bad usage or input.",
    )
    parser.add_argument("model", nargs="?", help="the ONNX model to compile")
    parser.add_argument("-o", "--output", help="output path (default: MODEL with .so, or .opt.onnx with --emit=onnx)")
    parser.add_argument(
        "--target", default="x86",
        help="'x86' (this host's CPU), 'arm' / 'arm:neon' / 'arm:sve' / 'arm:TVM_TAG' (aarch64 Linux, cross-compiled), "
        "'cuda' (NVIDIA sm_80) / 'cuda:sm_XX' (sm_75, sm_80, sm_86, sm_89, sm_90, sm_100, sm_120; needs nvcc), "
        "or a TVM target as JSON, e.g. '{\"kind\":\"llvm\",\"mcpu\":\"skylake-avx512\"}' (default: x86)",
    )
    parser.add_argument("-O", dest="opt_level", type=int, default=2, choices=range(4), metavar="{0,1,2,3}",
                        help="optimization level, as -O0 .. -O3 (default: -O2)")
    parser.add_argument("--passes", help="run exactly these passes, comma-separated, instead of the level's pipeline")
    parser.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="drop a pass from the pipeline (repeatable)")
    parser.add_argument("--emit", choices=("library", "onnx"), default="library",
                        help="'library': a shared library for reccc.load (default); 'onnx': the optimized graph as ONNX")
    parser.add_argument("--weights", choices=("embed", "external"), default="embed",
                        help="'embed': every weight inside the library (default; models up to 2 GiB); 'external': "
                        "constants of 1 MiB or more in OUTPUT.weights beside the library, memory-mapped by reccc.load "
                        "(models past 2 GiB need it; keep both files together)")
    parser.add_argument("--vm-exec", choices=("compiled", "bytecode"), default="compiled",
                        help="how the library runs the model's Relax function: 'compiled' to native code (default; "
                        "a few us less a call) or 'bytecode', interpreted, whose kernel calls tools/kernel_profile.py can time")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIM,...",
                        help="fix an input's symbolic dims, e.g. dense=64,13 (repeatable)")
    parser.add_argument("--index-check", choices=("error", "clamp"), default="error",
                        help="out-of-range embedding ids at run time: raise naming the input (default), or clamp into the table")
    parser.add_argument("--load-pass-plugin", action="append", default=[], metavar="MODULE",
                        help="import a module or .py file that registers passes (repeatable)")
    parser.add_argument("--prune-threshold", type=float, metavar="T",
                        help="lossy: zero FC weights with |w| < T (magnitude pruning); reports the sparsity reached")
    parser.add_argument("--prune-neurons", type=float, metavar="FRACTION",
                        help="lossy: remove this fraction of each hidden FC layer's neurons, lowest L2 norm first")
    parser.add_argument("--embedding-quant", choices=EMBEDDING_FORMAT_CHOICES,
                        help="lossy: store embedding tables of at least --embedding-quant-min-bytes as row-wise int8 or int4 "
                        "(scale and bias per row) or fp16, or auto: per table int8 or fp16, whichever a lookup reads fewer "
                        "cache lines of (fp16 for rows of up to 32 values); default: auto at -O3 (within 1%% of the "
                        "outputs' scale, else the tables stay fp32), none below")
    parser.add_argument("--embedding-quant-min-bytes", type=int, metavar="N",
                        help="quantize only tables of at least N bytes (default: 1048576)")
    parser.add_argument("--embedding-quant-table", action="append", default=[], metavar="NAME=FORMAT",
                        help="give one table (by initializer name) its own format: int8, int4, fp16, auto or none (repeatable)")
    parser.add_argument("--fc-precision", choices=("fp32", "bf16", "int8"),
                        help="lossy: run FC layers (Gemm/MatMul of a constant weight, 8 units or more) in int8 (per-unit "
                        "weight scales, per-row dynamic activation scales, int32 accumulation) or bf16 (fp32 accumulation); "
                        "default: fp32")
    parser.add_argument("--fc-precision-layer", action="append", default=[], metavar="NODE=PRECISION",
                        help="give one FC layer (by Gemm/MatMul node name) its own precision: int8, bf16 or fp32 (repeatable)")
    parser.add_argument("--accuracy-budget", type=float, metavar="ABS",
                        help="lossy passes: fail the build (exit 1, nothing written) if any output moves more than ABS "
                        "on the calibration batch; the deviation is always printed")
    parser.add_argument("--calibration", metavar="NPZ",
                        help="calibration inputs for the accuracy guard (default: 64 generated valid rows)")
    parser.add_argument("--tune-trials", type=int, metavar="N",
                        help="-O3: measure at most N candidate schedules in all (default: 256; 0 tunes nothing new "
                        "and builds from the tuning database's records)")
    parser.add_argument("--tune-time", type=float, metavar="SECONDS", dest="tune_seconds",
                        help="-O3: stop tuning after this many seconds (default: 600); whichever of "
                        "--tune-trials and --tune-time ends first")
    parser.add_argument("--tune-db", metavar="DIR",
                        help="-O3: the tuning database, shared by builds and reused across them "
                        "(default: $XDG_CACHE_HOME/reccc/tune, else ~/.cache/reccc/tune)")
    parser.add_argument("--tune-rpc", metavar="HOST:PORT",
                        help="-O3: measure candidates on the devices of this TVM RPC tracker (with --device-key)")
    parser.add_argument("--device-key", metavar="KEY", help="-O3 with --tune-rpc: the tracker's key of the devices to use")
    parser.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    parser.add_argument("--print-pipeline", action="store_true", help="print the passes that would run, and exit")
    parser.add_argument("--print-after", action="append", default=[], metavar="NAME|all",
                        help="print the graph after the named pass, or after every pass (repeatable)")
    parser.add_argument("--time-passes", action="store_true", help="report each pass's time and what it changed")
    parser.add_argument("--verify-each", action="store_true",
                        help="after every pass, check the outputs against the input model in onnxruntime")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress, timings, TVM's log, tracebacks on error")
    parser.add_argument("--version", action="version", version=f"reccc {__version__}")
    return parser


def _inspect_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reccc inspect", description="Describe an ONNX model: ops, inputs and outputs, embedding tables, parameter bytes.")
    parser.add_argument("model", help="the ONNX model")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on error")
    return parser


def _golden_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reccc golden", description="Record reference outputs once; check compiled artifacts against them.")
    commands = parser.add_subparsers(dest="golden_command", required=True, metavar="{record,check}", parser_class=_Parser)
    record = commands.add_parser(
        "record", help="run a model in onnxruntime and store its inputs and outputs",
        description="Run MODEL in onnxruntime and store inputs, outputs, the model's sha256 and the versions in a golden .npz.",
    )
    record.add_argument("model", help="the ONNX model")
    source = record.add_mutually_exclusive_group()
    source.add_argument("--inputs", metavar="NPZ", help="inputs as an .npz named by the model's inputs")
    source.add_argument("--generate", type=int, metavar="N", default=16,
                        help="generate a batch of N valid random inputs, ids in range for each table (default: 16)")
    record.add_argument("--seed", type=int, default=0, help="seed for --generate (default: 0)")
    record.add_argument("-o", "--output", required=True, help="the golden file to write (.npz)")
    record.add_argument("-v", "--verbose", action="store_true", help="tracebacks on error")
    check = commands.add_parser(
        "check", help="run an artifact on the stored inputs and compare with the stored outputs",
        description="Run ARTIFACT (a compiled .so or an .onnx) on the golden inputs and compare its outputs. "
        "Per output, it passes when |actual - expected| <= atol + rtol * max(1, max|expected|) everywhere. "
        "Exit 0 when every output passes, 1 when any fails, 2 on bad usage.",
    )
    check.add_argument("artifact", help="a .so written by reccc, or an .onnx model")
    check.add_argument("--golden", required=True, help="the golden file (.npz) from 'reccc golden record'")
    check.add_argument("--atol", type=float, help="absolute tolerance (default: 0, or as the artifact's build allows)")
    check.add_argument("--rtol", type=float, help="tolerance relative to max(1, max|expected|) (default: 1e-5 for lossless builds)")
    check.add_argument("--junit-xml", metavar="FILE", help="also write the result as JUnit XML, one testcase per output")
    check.add_argument("-v", "--verbose", action="store_true", help="tracebacks on error")
    return parser


def _run_golden(args: argparse.Namespace) -> int:
    from reccc import golden
    from reccc.errors import EmbeddingIndexError, ModelInputError

    if args.golden_command == "record":
        from reccc.sample_inputs import load_inputs

        inputs = load_inputs(args.inputs) if args.inputs else None
        if args.generate < 1:
            raise UsageError("--generate: N must be at least 1")
        from reccc.atomic_file import check_writable

        check_writable(args.output)
        golden.save(golden.record(args.model, inputs, batch=args.generate, seed=args.seed), args.output)
        return 0
    try:
        checks, tolerance = golden.check(args.artifact, args.golden, args.atol, args.rtol)
    except (ModelInputError, EmbeddingIndexError) as error:
        raise UsageError(f"{args.artifact}: the golden inputs do not fit it: {error}") from error
    print(golden.format_report(args.artifact, args.golden, checks, tolerance))
    if args.junit_xml:
        golden.write_junit_xml(args.junit_xml, args.artifact, checks, tolerance)
    return 0 if all(check.passed for check in checks) else 1


def _run_compile(args: argparse.Namespace) -> int:
    from reccc.compiler import CompileOptions, compile_model, pipeline
    from reccc.pass_manager import format_pass_report, registered_passes
    from reccc.plugins import PASS_GROUP, load_entry_points, load_pass_plugin

    for plugin in args.load_pass_plugin:
        load_pass_plugin(plugin)
    options = CompileOptions(
        target=args.target,
        opt_level=args.opt_level,
        passes=[p.strip() for p in args.passes.split(",") if p.strip()] if args.passes is not None else None,
        disabled_passes=args.disable_pass,
        emit=args.emit,
        index_check=args.index_check,
        weights=args.weights,
        vm_exec=args.vm_exec,
        print_after=args.print_after,
        verify_each=args.verify_each,
        prune_threshold=args.prune_threshold,
        prune_neurons=args.prune_neurons,
        embedding_quant=args.embedding_quant,
        embedding_quant_min_bytes=args.embedding_quant_min_bytes,
        embedding_quant_tables=_table_formats(args.embedding_quant_table),
        fc_precision=args.fc_precision,
        fc_precision_layers=_named_choices("--fc-precision-layer", args.fc_precision_layer, ("int8", "bf16", "fp32"), "layer"),
        accuracy_budget=args.accuracy_budget,
        calibration=args.calibration,
        input_shapes=_input_shapes(args.input_shape),
        tune_trials=args.tune_trials,
        tune_seconds=args.tune_seconds,
        tune_db=args.tune_db,
        tune_rpc=args.tune_rpc,
        device_key=args.device_key,
        tune_progress=args.verbose or sys.stderr.isatty(),
    )
    if args.list_passes:
        load_entry_points(PASS_GROUP)
        passes = registered_passes()
        width = max(map(len, passes), default=0) + 2
        for name, cls in passes.items():
            print(f"{name:<{width}}{'' if cls.lossless else '[lossy] '}{cls.summary}")
        return 0
    steps = pipeline(options)  # validates the pipeline flags before anything else
    if args.print_pipeline:
        print(",".join(str(step) for step in steps))
        return 0
    if args.model is None:
        raise UsageError("no input model (see 'reccc --help')")
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".opt.onnx" if args.emit == "onnx" else ".so")
    result = compile_model(args.model, output, options, show_tvm_log=args.verbose)
    if args.time_passes:
        print(format_pass_report(result.passes), file=sys.stderr)
    if args.verbose:
        size = result.output.stat().st_size
        parameters = f"parameters {result.passes[0].bytes_before} -> {result.passes[-1].bytes_after} bytes; " if result.passes else ""
        print(
            f"reccc: passes {result.pass_seconds * 1e3:.1f} ms, lowering {result.lowering_seconds:.2f} s; "
            f"{parameters}wrote {result.output} ({size} bytes)",
            file=sys.stderr,
        )
    return 0


def _table_formats(values: list[str]) -> dict[str, str]:
    """--embedding-quant-table NAME=FORMAT (repeatable) as {name: format}."""
    formats = {}
    for value in values:
        name, _, format = value.rpartition("=")
        if not name or format not in EMBEDDING_FORMAT_CHOICES:
            raise UsageError(f"--embedding-quant-table {value}: expected NAME=FORMAT with FORMAT one of {', '.join(EMBEDDING_FORMAT_CHOICES)}")
        if name in formats:
            raise UsageError(f"--embedding-quant-table {value}: table '{name}' is given twice")
        formats[name] = format
    return formats


def _named_choices(flag: str, values: list[str], choices: tuple[str, ...], what: str) -> dict[str, str]:
    """A repeatable NAME=CHOICE flag as {name: choice}."""
    chosen = {}
    for value in values:
        name, _, choice = value.rpartition("=")
        if not name or choice not in choices:
            raise UsageError(f"{flag} {value}: expected NAME=PRECISION with PRECISION one of {', '.join(choices)}")
        if name in chosen:
            raise UsageError(f"{flag} {value}: {what} '{name}' is given twice")
        chosen[name] = choice
    return chosen


def _input_shapes(values: list[str]) -> dict[str, list[int]]:
    """--input-shape NAME=DIM,DIM,... (repeatable) as {name: dims}."""
    shapes = {}
    for value in values:
        name, _, dims = value.partition("=")
        if not name or not dims:
            raise UsageError(f"--input-shape {value}: expected NAME=DIM,DIM,...")
        if name in shapes:
            raise UsageError(f"--input-shape {value}: input '{name}' is given twice")
        try:
            shapes[name] = [int(dim) for dim in dims.split(",")]
        except ValueError:
            raise UsageError(f"--input-shape {value}: dims must be integers") from None
    return shapes


def _run_inspect(args: argparse.Namespace) -> int:
    from reccc.inspection import format_report, model_report
    from reccc.ir import Model
    from reccc.model_file import read_model

    report = model_report(Model.from_onnx(read_model(args.model), args.model))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _printable(message: str) -> str:
    """Names from a hostile model may hold newlines or terminal escapes: an error stays one plain line."""
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in message)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        if argv and argv[0] == "inspect":
            return _run_inspect(_inspect_parser().parse_args(argv[1:]))
        if argv and argv[0] == "golden":
            return _run_golden(_golden_parser().parse_args(argv[1:]))
        return _run_compile(_compile_parser().parse_args(argv))
    except ReccError as error:
        if verbose:
            traceback.print_exc()
        print(f"reccc: error: {_printable(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("reccc: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug in reccc or TVM: still one line unless -v
        if verbose:
            traceback.print_exc()
        print(f"reccc: internal error: {type(error).__name__}: {_printable(str(error))} (rerun with -v for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
