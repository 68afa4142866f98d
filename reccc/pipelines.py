"""The pass pipeline of each optimization level, by pass name, and where opt-in lossy passes go."""

from collections.abc import Mapping
from dataclasses import dataclass, field

from reccc.errors import UsageError

# -O1: lossless cleanup. Embedding rows read only by constant ids go before constant folding (which
# would fold those lookups away whole); canonicalization follows folding, which exposes constant
# weights and static shapes; dead neurons and dead nodes go last.
_CLEANUP = (
    "remove-no-ops",
    "prune-unreadable-embedding-rows",
    "constant-folding",
    "canonicalize-shape-chains",
    "fold-transpose-into-gemm",
    "matmul-add-to-gemm",
    "fold-batchnorm",
    "merge-reshapes",
    "remove-id-casts",
    "dedupe-initializers",
    "prune-dead-neurons",
    "dead-code-elimination",
)
# -O2 adds the rewrites that trade one form for a faster one (and TVM's default schedules).
_FAST = (*_CLEANUP[:-1], "concat-fc-fusion", "dead-code-elimination")

# Import legalization: rewrites of forms that exporters write and TVM's importer cannot read. They are
# not optimizations, so they run first at every level, -O0 included (README: Exported-model corpus).
# Each rewrite gives onnx's shape inference static dims that the others read (what follows a Squeeze
# without axes or an undecided If has unknown shapes), so squeezes and shape operands run again after
# If resolution, and batch arithmetic (which reads ranks) runs only after it; GRUs are unrolled last, when
# their sequence lengths are as static as legalization makes them.
IMPORT_LEGALIZATION = (
    "reject-baked-dims",
    "legalize-embedding-bags",
    "explicit-squeeze-axes",
    "static-shape-operands",
    "resolve-static-ifs",
    "legalize-batch-arithmetic",
    "explicit-squeeze-axes",
    "static-shape-operands",
    "legalize-gru",
)

PIPELINES: dict[int, tuple[str, ...]] = {
    level: (*IMPORT_LEGALIZATION, *passes) for level, passes in {0: (), 1: _CLEANUP, 2: _FAST, 3: _FAST}.items()
}

# Opt-in lossy passes with one parameter, by the CompileOptions field that requests them and the parameter it sets.
LOSSY_PASS_OPTIONS: dict[str, tuple[str, str]] = {
    "prune_threshold": ("magnitude-pruning", "threshold"),
    "prune_neurons": ("neuron-pruning", "fraction"),
}
EMBEDDING_QUANTIZATION = "embedding-quantization"
# What --embedding-quant and --embedding-quant-table accept: the pass's formats, its per-table choice
# between int8 and fp16 (reccc.passes.embedding_quantization), and fp32 tables.
EMBEDDING_FORMAT_CHOICES = ("int8", "int4", "fp16", "auto", "none")
# The embedding-table format each level uses when the user does not choose one.
DEFAULT_EMBEDDING_FORMAT: dict[int, str | None] = {0: None, 1: None, 2: None, 3: "auto"}
FC_QUANTIZATION = "fc-quantization"
# The FC layer precision each level uses when the user does not choose one (None: fp32, no pass). None
# at -O3 either: bf16 / int8 layers are faster only on x86 with AMX (int8 also with VNNI), and a level's
# default is the same for every target, chosen before the target is known (README: Mixed-precision FC
# layers).
DEFAULT_FC_PRECISION: dict[int, str | None] = {0: None, 1: None, 2: None, 3: None}

# Lossy passes run before the first of these (cleanup that can exploit what they zeroed), else last.
_LOSSY_PASSES_BEFORE = ("prune-dead-neurons", "dead-code-elimination")


@dataclass(frozen=True)
class PipelineStep:
    name: str
    params: dict = field(default_factory=dict)

    def __str__(self) -> str:
        """As --print-pipeline shows it, after LLVM's `pass<param=value>`."""
        if not self.params:
            return self.name
        return f"{self.name}<{';'.join(f'{key}={_param_text(value)}' for key, value in sorted(self.params.items()))}>"


def _param_text(value) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{key}:{item}" for key, item in value.items())
    return str(value)


def pipeline_for(opt_level: int, explicit: list[str] | None, disabled: list[str], lossy: list[PipelineStep]) -> list[PipelineStep]:
    """The passes to run: `explicit` (--passes) if given, else the level's pipeline, minus `disabled`,
    plus the `lossy` passes requested by options, at their place."""
    if opt_level not in PIPELINES:
        raise UsageError(f"-O{opt_level}: optimization level must be 0, 1, 2 or 3")
    names = list(explicit) if explicit is not None else list(PIPELINES[opt_level])
    unknown_disabled = [name for name in disabled if name not in names]
    if unknown_disabled:
        raise UsageError(f"--disable-pass: '{unknown_disabled[0]}' is not in the pipeline ({', '.join(names) or 'empty'})")
    steps = [PipelineStep(name) for name in names if name not in disabled]
    position = next((i for i, step in enumerate(steps) if step.name in _LOSSY_PASSES_BEFORE), len(steps))
    return steps[:position] + list(lossy) + steps[position:]
