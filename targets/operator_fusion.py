"""Relax operator fusion as reccc runs it: TVM's zero pipeline (legalize, annotate op patterns, fold
constants, fuse, merge the fused PrimFuncs) with embedding lookups made fusable.

TVM marks every gather (`take`) PrimFunc opaque, because its loads are indexed by loaded ids, so
FuseOps leaves each lookup a kernel of its own that writes the gathered rows to memory, and the
dequantizing casts, scales and pooling of a compressed table run as separate kernels reading them
back. A gather is a data-parallel computation: each output element is one load. Marked so, it fuses
with what consumes it, and a quantized lookup (gather, dequantize,
pool) becomes one kernel that reads each stored row once.
"""

import tvm
from tvm import relax, s_tir, tirx

OP_PATTERN_BROADCAST = 1  # tvm::relax::OpPatternKind::kBroadcast
OP_PATTERN_OPAQUE = 8


def reads_at_loaded_index(block) -> bool:
    """Whether `block` reads a buffer at an index it loads from another (a gather)."""
    return any(_has_load(extent.min) for read in block.reads for extent in read.region)


def _has_load(expr) -> bool:
    if isinstance(expr, tvm.ir.TensorLoad):
        return True
    children = [getattr(expr, field) for field in ("a", "b", "value", "condition", "true_value", "false_value") if hasattr(expr, field)]
    children += list(getattr(expr, "args", ()))
    return any(_has_load(child) for child in children if isinstance(child, tirx.Expr))


def is_gather(function: tirx.PrimFunc) -> bool:
    """One data-parallel block that reads a buffer at an index it loads (TOPI's take)."""
    schedule = s_tir.Schedule(function)
    blocks = schedule.get_child_blocks(schedule.get_sblock("root"))
    if len(blocks) != 1:
        return False
    block = schedule.get(blocks[0])
    if block.init is not None or any(var.iter_type != tirx.IterVar.DataPar for var in block.iter_vars):
        return False
    return reads_at_loaded_index(block)


def is_concatenation(symbol: tvm.ir.GlobalVar) -> bool:
    return symbol.name_hint.startswith("concatenate")  # as LegalizeOps names relax.concat's PrimFuncs


@tvm.transform.module_pass(opt_level=0, name="AnnotateLookupFusion")
def annotate_lookup_fusion(module: tvm.IRModule, _context) -> tvm.IRModule:
    """Gathers become broadcast-like (each output element reads one element of each input; FuseOps
    fuses such producers into a reduction, which it does not for injective ones, and a pooled lookup
    is a gather into a reduction). Concatenations become opaque, so that they do not pull the lookups
    they join into one kernel that picks its source per element: each table's lookup stays a kernel
    of its own (a row loop over a contiguous vector loop), and the concatenation a plain copy."""
    updates = {}
    for symbol, function in module.functions.items():
        if not isinstance(function, tirx.PrimFunc):
            continue
        pattern = int(function.attrs.get("op_pattern", OP_PATTERN_OPAQUE))
        if pattern == OP_PATTERN_OPAQUE and is_gather(function):
            updates[symbol] = function.with_attr("op_pattern", OP_PATTERN_BROADCAST)
        elif is_concatenation(symbol):
            updates[symbol] = function.with_attr("op_pattern", OP_PATTERN_OPAQUE)
    for symbol, function in updates.items():
        module[symbol] = function
    return module


def fuse_operators() -> tvm.transform.Pass:
    """TVM's zero pipeline with gathers fusable (without its tuning-database step)."""
    return tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            annotate_lookup_fusion,
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ],
        name="reccc.FuseOperators",
    )
