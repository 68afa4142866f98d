"""Two schedules of one kernel, picked per call by the batch: the Relax program calls the large-batch
kernel when the rows reach a threshold and the original kernel below it.

A tile that wins at large batches (more rows per register tile, fewer loads of the weights) pads a
batch of 1 to more rows than a small tile does; -O3 measures both (targets/tuning.py) and, where each
wins in its own range, keeps both. The call sites become `if rows >= threshold: large(...) else
kernel(...)` in the Relax function, which the VM evaluates on the shape it already knows.
"""

import tvm
from tvm import relax, tirx

CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def dispatch_by_rows(module: tvm.IRModule, large_kernels: dict[str, tirx.PrimFunc], rows: int) -> tvm.IRModule:
    """`module` with each of `large_kernels` added (as "<kernel>_large") and every call of a PrimFunc
    named in it whose result has one symbolic dim (the batch) calling its large kernel instead when
    that dim is at least `rows`. The Relax functions lose their dataflow blocks (a branch cannot sit
    in one); the build pipeline removes them anyway."""
    if not large_kernels:
        return module
    builder = relax.BlockBuilder(module)
    large_vars = {kernel: builder.add_func(large, f"{kernel}_large") for kernel, large in large_kernels.items()}
    module = relax.transform.ToNonDataflow()(builder.get())

    @relax.expr_functor.mutator
    class Dispatch(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            call = binding.value
            if not (isinstance(call, relax.Call) and call.op.same_as(CALL_TIR) and call.args[0].name_hint in large_vars):
                super().visit_var_binding_(binding)
                return
            symbolic = [dim for dim in binding.var.ty.shape if not isinstance(dim, tirx.IntImm)]
            if len(symbolic) != 1:
                super().visit_var_binding_(binding)
                return
            call = self.visit_expr(call)
            large_call = relax.Call(call.op, [large_vars[call.args[0].name_hint], *call.args[1:]], call.attrs, call.ty_args)
            branch = relax.If(relax.expr.prim_value(symbolic[0] >= rows), relax.SeqExpr([], large_call), relax.SeqExpr([], call))
            self.set_var_remap(binding.var, self.builder_.emit(branch, name_hint=binding.var.name))

    dispatch = Dispatch(module)
    for symbol, function in list(module.functions.items()):
        if isinstance(function, relax.Function):
            module[symbol] = dispatch.visit_expr(function)
    return module
