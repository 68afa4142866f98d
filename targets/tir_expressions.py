"""What a TIR expression reads, as the targets' schedule rules ask it: its loads, whether it loads at
all (an index that does is a gather's), whether it uses a variable."""

import tvm
import tvm_ffi
from tvm import tirx


def loads(expr) -> list:
    """The loads in `expr` (those in other loads' indices included)."""
    found = []
    tvm_ffi.structural_walk(expr, [(tvm.ir.TensorLoad, found.append)])
    return found


def has_load(expr) -> bool:
    return bool(loads(expr))


def uses(expr, var: tirx.Var) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, [(tirx.Var, lambda each: found.append(each) if each.same_as(var) else None)])
    return bool(found)
