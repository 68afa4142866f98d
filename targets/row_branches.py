"""A kernel whose body branches on its rows (the batch): schedules of one function, each run for a
range of rows, joined under one root block. The rules branch so between a serial and a parallel
schedule and between a one-row GEMV and the register tile (cpu_schedules), and -O3 between the
schedules that win below and above a batch (batch_dispatch)."""

import tvm
from tvm import s_tir


def symbolic_rows(function: tvm.tirx.PrimFunc) -> tvm.tirx.Var | None:
    """The one symbolic dim of the function's buffers (the batch), if there is exactly one."""
    dims = {dim for param in function.params for dim in (getattr(param, "shape", None) or ()) if isinstance(dim, tvm.tirx.Var)}
    return dims.pop() if len(dims) == 1 else None


def branching(function: tvm.tirx.PrimFunc, branches: tvm.tirx.IfThenElse) -> tvm.tirx.PrimFunc:
    """`function` with `branches`, bodies of schedules of it, as its body. Both are schedules of the
    same function: the same parameters, so either body runs in it. Relax's analyses want a kernel's
    body to be one root block, and loops and buffers no rule replaced are the same objects in both:
    the branches go under one root block that allocates each buffer once, and ConvertSSA gives loop
    variables defined twice their own."""
    allocated = []

    def without_root(stmt):
        if isinstance(stmt, tvm.tirx.IfThenElse):
            return tvm.tirx.IfThenElse(stmt.condition, without_root(stmt.then_case), without_root(stmt.else_case))
        assert isinstance(stmt, s_tir.SBlockRealize) and stmt.block.name_hint == "root", stmt
        allocated.extend(b for b in stmt.block.alloc_buffers if not any(b.same_as(a) for a in allocated))
        return stmt.block.body

    body = without_root(branches)
    root = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body, alloc_buffers=allocated))
    return s_tir.transform.ConvertSSA()(tvm.IRModule({"main": function.with_body(root)}))["main"]
