"""Fuzz reccc's front end on hostile model files: read_model, Model.from_onnx and the -O2 pass pipeline,
as `reccc MODEL --emit=onnx -O2` runs them (TVM lowering is too slow to fuzz).

The contract: every input either compiles or raises reccc.errors.ReccError. Any other exception, or a
crash, is a bug.

    python tools/fuzz_compile.py --mutations 500 --seed 0
        structured mutations of the testsuite models (drop, duplicate or insert a node, rewire an input,
        corrupt a dim, a dtype, an attribute, tensor data or the opset, move an initializer into a
        Constant node, change the outputs, truncate), drawn from a seeded generator; prints the outcomes
        and every bug, exits 1 if there was one. Needs no atheris.
    python tools/fuzz_compile.py --atheris [--structured] [LIBFUZZER_FLAGS] [CORPUS_DIR]
        coverage-guided fuzzing with atheris over the file's bytes, seeded with the testsuite models
        (added to CORPUS_DIR, or to a temporary corpus); --structured makes libFuzzer mutate with the
        structured mutator. A bug stops the run and libFuzzer saves the input as crash-*.

Both cap the process's address space (--memory-limit, default 6 GiB), so that a model that makes reccc
allocate without bound fails with MemoryError, a bug, instead of taking the machine's memory.
"""

import argparse
import collections
import io
import random
import resource
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

REPOSITORY = Path(__file__).resolve().parent.parent
MODELS_DIR = REPOSITORY / "testsuite" / "models"
# Dims, attribute and tensor values that find edge cases: empty, scalar, the int32 and int64 limits, negatives.
INTERESTING_INTS = (0, 1, 2, 3, -1, -2, 7, 64, 1000, 2**31 - 1, 2**31, 2**40, 2**63 - 1, -(2**63))
INTERESTING_FLOATS = (0.0, -1.0, 1e-30, 1e30, float("inf"), float("nan"))
# The ONNX types numpy has, for regenerating an initializer's data in another type.
NUMPY_TYPES = {
    TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32, TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.BOOL: np.bool_,
}
OPS = ("Relu", "Sigmoid", "Gemm", "MatMul", "Gather", "Concat", "Reshape", "Add", "Mul", "Transpose", "ReduceSum",
       "Unsqueeze", "Shape", "Identity", "Expand", "ConstantOfShape", "Tile", "Celu", "If", "Loop", "NoSuchOp")


@dataclass(frozen=True)
class Bug:
    """An input on which reccc raised something other than a ReccError."""

    seed_model: str
    mutations: tuple[str, ...]
    error: str  # type and message, one line
    where: str  # the innermost frame of the traceback in this repository, and the innermost of all
    data: bytes

    @property
    def signature(self) -> tuple[str, str]:
        return self.error.split(":")[0], self.where


def compile_bytes(data: bytes, folder: Path) -> str:
    """Compile `data` as a model file; returns the outcome ('ok' or the ReccError's class name) and lets any
    other exception propagate: that is a bug."""
    from reccc.compiler import CompileOptions, compile_model
    from reccc.errors import ReccError

    model = folder / "model.onnx"
    model.write_bytes(data)
    try:
        compile_model(model, folder / "model.opt.onnx", CompileOptions(opt_level=2, emit="onnx"), log=io.StringIO())
    except ReccError as error:
        return type(error).__name__
    return "ok"


# --- the structured mutator: each mutation edits a ModelProto in place and returns what it did ---------


def _pick(rng: random.Random, items):
    return items[rng.randrange(len(items))] if len(items) else None


def _drop_node(model: onnx.ModelProto, rng: random.Random) -> str:
    """Remove a node; half the time its consumers read its first input instead, so the graph stays well formed."""
    node = _pick(rng, model.graph.node)
    if node is None:
        return "drop node: none"
    bypass = rng.random() < 0.5 and node.input and node.output
    if bypass:
        for consumer in model.graph.node:
            consumer.input[:] = [node.input[0] if name == node.output[0] else name for name in consumer.input]
    model.graph.node.remove(node)
    return f"drop node '{node.name}'{' (bypassed)' if bypass else ''}"


def _duplicate_node(model: onnx.ModelProto, rng: random.Random) -> str:
    node = _pick(rng, model.graph.node)
    if node is None:
        return "duplicate node: none"
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    fresh = rng.random() < 0.5  # a copy with fresh outputs is valid dead code; one with the same outputs is not SSA
    if fresh:
        copy.output[:] = [f"{name}_dup" for name in copy.output]
    model.graph.node.insert(rng.randrange(len(model.graph.node) + 1), copy)
    return f"duplicate node '{node.name}'{' with fresh outputs' if fresh else ''}"


def _rewire_input(model: onnx.ModelProto, rng: random.Random) -> str:
    """Point a node input at another tensor: cycles, type and shape mismatches, undefined names."""
    node = _pick(rng, model.graph.node)
    if node is None or not node.input:
        return "rewire: none"
    names = [o for n in model.graph.node for o in n.output] + [t.name for t in model.graph.initializer]
    names += [i.name for i in model.graph.input] + ["", "no_such_tensor"]
    index = rng.randrange(len(node.input))
    node.input[index] = _pick(rng, names)
    return f"rewire input {index} of '{node.name}' to '{node.input[index]}'"


def _constant(model: onnx.ModelProto, rng: random.Random, values: np.ndarray, position: int) -> str:
    """Add `values` as an initializer or, half the time, a Constant node at `position`; returns its name."""
    name = f"fuzz_const_{len(model.graph.node)}_{rng.randrange(10**6)}"
    tensor = onnx.numpy_helper.from_array(values, name)
    if rng.random() < 0.5:
        model.graph.initializer.append(tensor)
    else:
        model.graph.node.insert(position, onnx.helper.make_node("Constant", [], [name], value=tensor, name=f"{name}_node"))
    return name


def _shape_values(rng: random.Random) -> np.ndarray:
    dims = rng.choice(([-1], [0, -1], [1, -1], [-1, 1], [2, -1], [1], [2, 1], [1, 1, 1], []))
    if rng.random() < 0.3:
        dims = [_pick(rng, INTERESTING_INTS) for _ in range(rng.randrange(4))]
    return np.array(dims, np.int64)


def _insert_op(model: onnx.ModelProto, rng: random.Random) -> str:
    """Put a new op between a tensor and one of its consumers: layout ops, casts, unary math, with
    constant operands that are sometimes edge values."""
    candidates = [(position, node, index) for position, node in enumerate(model.graph.node)
                  for index, name in enumerate(node.input) if name]
    if not candidates:
        return "insert op: none"
    position, node, index = _pick(rng, candidates)
    source, result = node.input[index], f"{node.input[index]}_fuzz{rng.randrange(10**6)}"
    op = rng.choice(("Cast", "Reshape", "Expand", "Tile", "Unsqueeze", "Squeeze", "Transpose", "Flatten", "Slice",
                     "Identity", "Relu", "Neg", "Sqrt", "Abs", "Softmax", "ReduceMean", "Gather"))
    attributes, operands = {}, [source]
    if op == "Cast":
        attributes["to"] = rng.choice((TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.FLOAT16,
                                       TensorProto.BOOL, TensorProto.DOUBLE, TensorProto.STRING))
    elif op in ("Reshape", "Expand"):
        operands.append(_constant(model, rng, _shape_values(rng), position))
    elif op in ("Tile", "Unsqueeze", "Squeeze", "ReduceMean", "Gather"):
        count = rng.randrange(4)
        values = [rng.choice((0, 1, 2, -1)) if op != "Tile" else rng.choice((1, 2, 0)) for _ in range(count)]
        operands.append(_constant(model, rng, np.array(values, np.int64), position))
    elif op == "Transpose":
        perm = list(range(rng.randrange(1, 5)))
        rng.shuffle(perm)
        attributes["perm"] = perm
    elif op in ("Flatten", "Softmax"):
        attributes["axis"] = rng.choice((0, 1, -1, 2))
    elif op == "Slice":
        for values in ([0], [rng.choice((1, -1, 2**31, 0))], [rng.choice((0, 1, -1))]):
            operands.append(_constant(model, rng, np.array(values, np.int64), position))
    new = onnx.helper.make_node(op, operands, [result], name=f"fuzz_{op}_{rng.randrange(10**6)}", **attributes)
    model.graph.node.insert(next(i for i, n in enumerate(model.graph.node) if n is node), new)
    node.input[index] = result
    return f"insert {op} before input {index} of '{node.name}'"


def _regenerated(tensor: TensorProto, dims: list[int], dtype: np.dtype) -> bool:
    """Give `tensor` data of these dims and dtype (random, or zeros), if small enough; False if not."""
    if any(dim < 0 for dim in dims) or np.prod(dims, dtype=np.float64) > 1e6:
        return False
    values = np.random.default_rng(len(tensor.raw_data)).standard_normal(dims).astype(dtype)
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    return True


def _shaped_values(model: onnx.ModelProto) -> list[tuple[str, onnx.TensorShapeProto]]:
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    return [(v.name, v.type.tensor_type.shape) for v in values if v.type.tensor_type.HasField("shape")]


def _corrupt_dim(model: onnx.ModelProto, rng: random.Random) -> str:
    """A dim of an initializer (its data regenerated to fit, half the time) or of a declared input/output
    shape: an edge value, a symbol, a dropped dim, or one less/more."""
    if rng.random() < 0.5 and model.graph.initializer:
        tensor = _pick(rng, model.graph.initializer)
        dims = list(tensor.dims)
        if not dims:
            dims.append(_pick(rng, INTERESTING_INTS))
        else:
            axis = rng.randrange(len(dims))
            dims[axis] = rng.choice([_pick(rng, INTERESTING_INTS), dims[axis] + rng.choice((-1, 1))])
        dtype = NUMPY_TYPES.get(tensor.data_type)
        if rng.random() < 0.5 and dtype is not None and _regenerated(tensor, dims, dtype):
            return f"initializer '{tensor.name}' regenerated with shape {dims}"
        tensor.dims[:] = dims
        return f"initializer '{tensor.name}' dims {dims}"
    shaped = [(name, shape) for name, shape in _shaped_values(model) if shape.dim]
    if not shaped:
        return "corrupt dim: none"
    name, shape = _pick(rng, shaped)
    axis = rng.randrange(len(shape.dim))
    choice = rng.randrange(4)
    if choice == 0:
        shape.dim[axis].dim_param = rng.choice(("batch", "other", ""))
    elif choice == 1:
        del shape.dim[axis]
    else:
        shape.dim[axis].dim_value = _pick(rng, INTERESTING_INTS)
    return f"value '{name}' dim {axis} corrupted ({choice})"


def _corrupt_dtype(model: onnx.ModelProto, rng: random.Random) -> str:
    """The dtype of an initializer (its data converted, half the time) or of a declared input/output."""
    dtype = rng.choice([*TensorProto.DataType.values(), 999])
    if rng.random() < 0.5 and model.graph.initializer:
        tensor = _pick(rng, model.graph.initializer)
        if rng.random() < 0.5 and dtype in NUMPY_TYPES and _regenerated(tensor, list(tensor.dims), NUMPY_TYPES[dtype]):
            return f"initializer '{tensor.name}' regenerated as {TensorProto.DataType.Name(dtype)}"
        tensor.data_type = dtype
        return f"initializer '{tensor.name}' dtype {dtype}"
    value = _pick(rng, [*model.graph.input, *model.graph.output, *model.graph.value_info])
    if value is None:
        return "corrupt dtype: none"
    value.type.tensor_type.elem_type = dtype
    return f"value '{value.name}' dtype {dtype}"


def _corrupt_attribute(model: onnx.ModelProto, rng: random.Random) -> str:
    nodes = [node for node in model.graph.node if node.attribute]
    node = _pick(rng, nodes)
    if node is None or rng.random() < 0.2:
        node = _pick(rng, model.graph.node)
        if node is None:
            return "corrupt attribute: none"
        name = rng.choice(("axis", "perm", "transA", "to", "keepdims", "bogus"))
        node.attribute.append(onnx.helper.make_attribute(name, _pick(rng, INTERESTING_INTS)))
        return f"add attribute '{name}' to '{node.name}'"
    attribute = _pick(rng, node.attribute)
    choice = rng.randrange(5)
    if choice == 0:
        node.attribute.remove(attribute)
    elif choice == 1:
        attribute.i = _pick(rng, INTERESTING_INTS)
    elif choice == 2:
        attribute.f = _pick(rng, INTERESTING_FLOATS)
    elif choice == 3:
        attribute.ints[:] = [_pick(rng, INTERESTING_INTS) for _ in range(rng.randrange(4))]
    else:
        attribute.type = rng.choice(list(onnx.AttributeProto.AttributeType.values()))
    return f"attribute '{attribute.name}' of '{node.name}' corrupted ({choice})"


def _corrupt_tensor_data(model: onnx.ModelProto, rng: random.Random) -> str:
    """Values of a small int64 initializer (shape, axes), or the length of an initializer's data."""
    tensor = _pick(rng, model.graph.initializer)
    if tensor is None:
        return "corrupt data: none"
    if tensor.data_type == TensorProto.INT64 and 0 < len(tensor.raw_data) <= 64 and len(tensor.raw_data) % 8 == 0:
        values = np.frombuffer(tensor.raw_data, np.int64).copy()
        values[rng.randrange(values.size)] = _pick(rng, INTERESTING_INTS)
        tensor.raw_data = values.tobytes()
        return f"initializer '{tensor.name}' values {values.tolist()}"
    data = bytes(tensor.raw_data)
    tensor.raw_data = data[: rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + bytes(rng.randrange(1, 9))
    return f"initializer '{tensor.name}' raw_data {len(data)} -> {len(tensor.raw_data)} bytes"


def _initializer_to_constant(model: onnx.ModelProto, rng: random.Random) -> str:
    tensor = _pick(rng, model.graph.initializer)
    if tensor is None:
        return "initializer to Constant: none"
    model.graph.initializer.remove(tensor)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [tensor.name], value=tensor, name=f"{tensor.name}_constant"))
    return f"initializer '{tensor.name}' as a Constant node"


def _change_outputs(model: onnx.ModelProto, rng: random.Random) -> str:
    """Make an intermediate tensor a graph output (typed or not), or drop an output."""
    if rng.random() < 0.3 and model.graph.output:
        dropped = _pick(rng, model.graph.output)
        model.graph.output.remove(dropped)
        return f"drop output '{dropped.name}'"
    name = _pick(rng, [output for node in model.graph.node for output in node.output])
    if name is None:
        return "add output: none"
    if rng.random() < 0.5:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    else:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    return f"output '{name}' added"


def _change_op(model: onnx.ModelProto, rng: random.Random) -> str:
    node = _pick(rng, model.graph.node)
    if node is None:
        return "change op: none"
    before, node.op_type = node.op_type, rng.choice(OPS)
    return f"node '{node.name}' {before} -> {node.op_type}"


def _corrupt_opset(model: onnx.ModelProto, rng: random.Random) -> str:
    model.opset_import[0].version = rng.choice((1, 12, 13, 18, 21, 23, 24, 99))
    model.ir_version = rng.choice((model.ir_version, 3, 7, 10, 99))
    return f"opset {model.opset_import[0].version}, ir_version {model.ir_version}"


MUTATIONS: tuple[Callable[[onnx.ModelProto, random.Random], str], ...] = (
    _drop_node, _duplicate_node, _rewire_input, _insert_op, _insert_op, _insert_op, _corrupt_dim, _corrupt_dtype,
    _corrupt_attribute, _corrupt_tensor_data, _initializer_to_constant, _change_outputs, _change_op, _corrupt_opset,
)


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, tuple[str, ...]]:
    """One to three structured mutations of the model `data`, or a truncation of it; with what was done."""
    if rng.random() < 0.08:
        cut = rng.randrange(len(data))
        return data[:cut], (f"truncate {len(data)} -> {cut} bytes",)
    model = onnx.ModelProto()
    model.ParseFromString(data)
    done = tuple(rng.choice(MUTATIONS)(model, rng) for _ in range(rng.randint(1, 3)))
    return model.SerializeToString(), done


def seed_models() -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in sorted(MODELS_DIR.glob("*.onnx"))}


def run_structured(mutations: int, seed: int, on_outcome: Callable[[str], None] = lambda outcome: None) -> list[Bug]:
    """`mutations` mutated testsuite models from random.Random(seed), each compiled; returns the bugs."""
    rng = random.Random(seed)
    seeds = seed_models()
    bugs = []
    with tempfile.TemporaryDirectory(prefix="reccc-fuzz-") as scratch:
        for _ in range(mutations):
            name = rng.choice(sorted(seeds))
            data, done = mutate(seeds[name], rng)
            try:
                outcome = compile_bytes(data, Path(scratch))
            except Exception as error:  # the contract is broken: record it and go on
                message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                bugs.append(Bug(name, done, message, _where(error), data))
                outcome = "bug"
            on_outcome(outcome)
    return bugs


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if frame.filename.startswith(str(REPOSITORY)) and frame.filename != __file__]
    return " / ".join(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in [*ours[-1:], frames[-1]])


def _atheris_main(argv: list[str], structured: bool) -> None:
    import atheris

    with atheris.instrument_imports(include=["reccc"]):
        from reccc.compiler import compile_model  # noqa: F401  (instrumented for coverage)

    scratch = Path(tempfile.mkdtemp(prefix="reccc-fuzz-"))
    corpus = next((Path(arg) for arg in argv[1:] if not arg.startswith("-")), None)
    if corpus is None:
        corpus = scratch / "corpus"
        argv.append(str(corpus))
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seed_models().items():
        (corpus / f"seed-{name}.onnx").write_bytes(data)

    def test_one_input(data: bytes) -> None:
        compile_bytes(data, scratch)

    def structured_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        try:
            mutated, _ = mutate(data, random.Random(seed))
        except Exception:  # not a parsable model any more: fall back to byte mutations
            return atheris.Mutate(data, max_size)
        return mutated[:max_size]

    atheris.Setup(argv, test_one_input, custom_mutator=structured_mutator if structured else None)
    atheris.Fuzz()


def limit_memory(gib: float) -> None:
    """Cap this process's address space: a hostile model that makes reccc allocate too much then fails with
    MemoryError (a bug) instead of driving the machine out of memory."""
    limit = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-limit", type=float, default=6, metavar="GIB", help="address-space cap (default 6 GiB)")
    parser.add_argument("--mutations", type=int, default=500, help="structured mode: how many mutated models (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="structured mode: the generator's seed (default 0)")
    parser.add_argument("--crash-dir", type=Path, help="structured mode: save each bug's input here")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided fuzzing with atheris; other flags go to libFuzzer")
    parser.add_argument("--structured", action="store_true", help="with --atheris: mutate with the structured mutator")
    args, rest = parser.parse_known_args()
    limit_memory(args.memory_limit)
    if args.atheris:
        _atheris_main([sys.argv[0], *rest], args.structured)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    outcomes = collections.Counter()
    bugs = run_structured(args.mutations, args.seed, on_outcome=lambda outcome: outcomes.update([outcome]))
    print(f"{sum(outcomes.values())} executions: " + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())))
    for signature, group in _grouped(bugs).items():
        print(f"bug x{len(group)}: {group[0].error}\n  at {signature[1]}\n  e.g. {group[0].seed_model}: {'; '.join(group[0].mutations)}")
    if args.crash_dir is not None:
        args.crash_dir.mkdir(parents=True, exist_ok=True)
        for index, bug in enumerate(bugs):
            (args.crash_dir / f"bug-{index}-{bug.seed_model}.onnx").write_bytes(bug.data)
    return 1 if bugs else 0


def _grouped(bugs: list[Bug]) -> dict[tuple[str, str], list[Bug]]:
    groups: dict[tuple[str, str], list[Bug]] = {}
    for bug in bugs:
        groups.setdefault(bug.signature, []).append(bug)
    return groups


if __name__ == "__main__":
    sys.exit(main())
