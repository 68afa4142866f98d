"""Scalar constants written into the kernels that read them, instead of passed to them as tensors.

TVM's ONNX importer builds an op with a constant operand through TOPI (`emit_te`), so a 0-d constant
(a Clip's bounds, the row count Gather's id wrap-around adds) reaches its kernel as a tensor argument,
read through a load wherever it is used. In a lookup kernel that is three such arguments per table:
a 26-table DLRM's had 53 of its 132 arguments, each load of them a term the TIR simplifier could not
fold, and each argument one more for every call to unpack. Relax ops legalize a 0-d constant operand as
an immediate already (LegalizeOps); this does the same for the kernels the importer built.
"""

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _scalar(argument, param) -> tirx.Expr | None:
    """The immediate of a 0-d numeric constant argument given for the 0-d buffer `param`, else None."""
    if not isinstance(argument, tvm.ir.GenericConst) or len(param.shape) != 0:
        return None
    value = argument.value.numpy()
    if value.ndim != 0 or value.dtype.kind not in "iuf" or str(value.dtype) != str(param.dtype):
        return None
    return tirx.const(value.item(), str(value.dtype))


def _with_immediates(function: tirx.PrimFunc, immediates: dict[int, tirx.Expr]) -> tirx.PrimFunc:
    """`function` without the 0-d buffer parameters at the positions of `immediates`, each load of one
    replaced by its value (and dropped from the blocks' read regions)."""
    replaced = [(function.params[position], value) for position, value in immediates.items()]

    def value_of(buffer) -> tirx.Expr | None:
        return next((value for param, value in replaced if param.same_as(buffer)), None)

    def load(node):
        value = value_of(node.source)
        return node if value is None else value

    def block(node):
        reads = [region for region in node.reads if value_of(region.source) is None]
        if len(reads) == len(node.reads):
            return node
        return s_tir.SBlock(node.iter_vars, reads, node.writes, node.name_hint, node.body, node.init, node.alloc_buffers,
                            node.match_buffers, node.annotations)

    body = tvm_ffi.structural_map(function.body, [(tvm.ir.TensorLoad, load), (s_tir.SBlock, block)])
    params = [param for position, param in enumerate(function.params) if position not in immediates]
    return tirx.PrimFunc(params, body, function.ret_type, function.attrs)


@relax.expr_functor.mutator
class _ScalarArguments(relax.PyExprMutator):
    def __init__(self, module: tvm.IRModule):
        super().__init__(module)
        self.module = module
        self.specialized: dict[tuple, tvm.ir.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(_CALL_TIR):
            return call
        callee = self.module.functions.get(call.args[0])
        arguments = list(call.args[1].fields)
        if not isinstance(callee, tirx.PrimFunc):
            return call
        immediates = {position: value for position, value in enumerate(map(_scalar, arguments, callee.params)) if value is not None}
        if not immediates:
            return call
        key = (call.args[0], tuple((position, value.value) for position, value in immediates.items()))
        if key not in self.specialized:
            self.specialized[key] = self.builder_.add_func(_with_immediates(callee, immediates), call.args[0].name_hint)
        kept = [argument for position, argument in enumerate(arguments) if position not in immediates]
        return relax.Call(call.op, [self.specialized[key], relax.Tuple(kept), *call.args[2:]], call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="InlineScalarConstants")
def inline_scalar_constants(module: tvm.IRModule, _context) -> tvm.IRModule:
    """Every `call_tir` with 0-d numeric constant arguments calls a copy of its kernel with those
    constants written in (one copy per kernel and values); kernels no call reads any more are removed."""
    rewriter = _ScalarArguments(module)
    for symbol, function in list(module.functions.items()):
        if isinstance(function, relax.Function):
            rewriter.builder_.update_func(symbol, rewriter.visit_expr(function))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.finalize())
