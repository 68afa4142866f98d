"""ONNX → Relax → TVM executable, the lowering every TVM target shares.

The batch dim stays symbolic: from_onnx turns ONNX dim_params into Relax shape variables, so one
compiled artifact serves every batch size.
"""

from collections.abc import Callable, Sequence

import numpy as np
import onnx
import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

from reccc.errors import CompileError, one_line
from reccc.targets.lookup_fusion import fuse_operators
from reccc.targets.weight_panels import pack_constant_weights

# Ops the importer handles outside its convert map.
_IMPORTER_BUILTIN_OPS = {"Constant", "If"}


def check_supported_ops(model: onnx.ModelProto) -> None:
    """Raise one CompileError listing every op TVM's importer lacks, with the nodes that use it."""
    supported = set(_get_convert_map()) | _IMPORTER_BUILTIN_OPS
    unsupported: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in supported:
            unsupported.setdefault(node.op_type, []).append(node.name or "<unnamed>")
    if unsupported:
        listed = "; ".join(f"{op} (nodes: {', '.join(nodes)})" for op, nodes in sorted(unsupported.items()))
        raise CompileError(f"unsupported ops: {listed}")


def to_relax(model: onnx.ModelProto, constants: Sequence[np.ndarray] = ()) -> tvm.IRModule:
    """The model imported, its initializers as constants, and its last graph inputs bound to `constants`:
    TVM's importer gives the same module for a weight given either way (reccc.weights_inputs)."""
    check_supported_ops(model)
    try:
        module = from_onnx(model, keep_params_in_input=False)
    except Exception as error:
        raise CompileError(f"TVM could not import the model: {one_line(error)}") from error
    if not constants:
        return module
    params = module["main"].params
    bound = relax.transform.BindParams(
        "main", {param: tvm.runtime.tensor(np.ascontiguousarray(values)) for param, values in zip(params[-len(constants):], constants)}
    )(module)
    # the importer counts every graph input as one of the model's own (num_input), the bound ones too
    bound["main"] = bound["main"].with_attr("num_input", len(params) - len(constants))
    return bound


def _relu_propagating_nan(block_builder: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """ONNX Relu(NaN) is NaN; TOPI's max(x, 0) becomes LLVM's maxnum, which returns 0 for NaN."""

    def relu(x: te.Tensor) -> te.Tensor:
        zero = tirx.const(0, x.dtype)
        return te.compute(x.shape, lambda *i: tirx.Select(x(*i) < zero, zero, x(*i)), name="relu")

    return block_builder.call_te(relu, call.args[0], primfunc_name_hint="relu")


def bindings_as_written(function: relax.Function) -> dict:
    """Each variable of `function`'s body and the value it is bound to, as written: what a mutator
    matching the importer's bindings looks up, where its builder's lookup_binding would give its own
    replacements of the bindings it has visited."""
    return {binding.var: binding.value for block in function.body.blocks for binding in block.bindings}


class BoundCalls:
    """For a PyExprMutator: the operator call a variable is bound to (its lookup_binding)."""

    def _bound(self, expr, op: str):
        """The call of `op` that `expr` is bound to, else None."""
        if not isinstance(expr, relax.Var):
            return None
        value = self.lookup_binding(expr)
        return value if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get(op)) else None


@relax.expr_functor.mutator
class _StaticDimReads(relax.PyExprMutator, BoundCalls):
    """take(shape_to_tensor(shape_of(x)), k) of an x whose shape is static, as the constant dim k.

    TVM's importer writes Gather's negative-index wrap-around so, reading the table's row count; left
    to FoldConstant, each table costs two kernels built and run at compile time (about 40 ms: 1.1 s of
    a 26-table DLRM's build)."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(tvm.ir.Op.get("relax.take")) or not isinstance(call.args[1], tvm.ir.GenericConst):
            return call
        dims = self._static_shape(call.args[0])
        index = call.args[1].value.numpy()
        if dims is None or index.ndim != 0 or not 0 <= int(index) < len(dims):  # every take mode agrees there
            return call
        return relax.const(dims[int(index)], call.ty.dtype)

    def _static_shape(self, expr) -> list[int] | None:
        """The dims of x when `expr` is bound to shape_to_tensor(shape_of(x)) and they are all static."""
        tensor = self._bound(expr, "relax.shape_to_tensor")
        shape = None if tensor is None else self._bound(tensor.args[0], "relax.shape_of")
        if shape is None:
            return None
        dims = shape.args[0].ty.shape
        return [int(dim) for dim in dims] if dims is not None and all(isinstance(dim, tirx.IntImm) for dim in dims) else None


def fold_static_dim_reads(module: tvm.IRModule) -> tvm.IRModule:
    """A copy of the module with _StaticDimReads' dims as constants, and what only they read removed."""
    folded = module.clone()
    folded["main"] = _StaticDimReads(module).visit_expr(module["main"])
    return relax.transform.DeadCodeElimination(["main"])(folded)


def without_repeated_work(module: tvm.IRModule) -> tvm.IRModule:
    """The imported module with its static dim reads folded (fold_static_dim_reads) and each value
    computed once (Relax's CSE): the importer writes Gather's wrap-around of negative ids per Gather,
    so a quantized table's codes and scale/bias gathers wrapped the same ids twice (3 of its lookup's
    15 blocks). What the build runs from -O1 on, before legalization."""
    return relax.transform.EliminateCommonSubexpr()(fold_static_dim_reads(module))


# Legalizations that replace TVM's where its numerics differ from ONNX's (checked against onnxruntime).
_ONNX_EXACT_LEGALIZATIONS = {"relax.nn.relu": _relu_propagating_nan}


def _buffer_reads(expr) -> set[int] | None:
    """Constant indices of the buffer loads in a shape expression; None if it holds anything else."""
    if isinstance(expr, (tirx.IntImm, tirx.Var)):
        return set()
    if isinstance(expr, tvm.ir.TensorLoad):  # what tirx.BufferLoad builds
        if len(expr.indices) != 1 or not isinstance(expr.indices[0], tirx.IntImm):
            return None
        return {int(expr.indices[0])}
    if isinstance(expr, (tirx.Add, tirx.Sub, tirx.Mul, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max)):
        left, right = _buffer_reads(expr.a), _buffer_reads(expr.b)
        return None if left is None or right is None else left | right
    return None


@tvm.transform.module_pass(opt_level=0, name="SortShapeFunctionStores")
def _sort_shape_function_stores(module: tvm.IRModule, _context) -> tvm.IRModule:
    """Make builds reproducible. VMShapeLower emits the independent stores of a shape function (heap
    slot = expression of input slots) in an order taken from a pointer-keyed map, so it changes from
    process to process; sorting them by slot changes nothing else. Functions whose stores read slots
    they also write are left alone."""
    updates = {}
    for symbol, function in module.functions.items():
        if not (isinstance(function, tirx.PrimFunc) and symbol.name_hint.startswith("shape_func")):
            continue
        if not isinstance(function.body, tirx.SeqStmt):
            continue
        stores = list(function.body.seq)
        if not all(isinstance(s, tirx.BufferStore) and len(s.indices) == 1 and isinstance(s.indices[0], tirx.IntImm) for s in stores):
            continue
        reads = [_buffer_reads(s.value) for s in stores]
        written = {int(s.indices[0]) for s in stores}
        if any(r is None or r & written for r in reads):
            continue
        ordered = sorted(stores, key=lambda s: int(s.indices[0]))
        updates[symbol] = function.with_body(tirx.SeqStmt(ordered))
    for symbol, function in updates.items():
        module[symbol] = function
    return module


@tvm.transform.module_pass(opt_level=0, name="ShapeFunctionsNoAlias")
def _shape_functions_noalias(module: tvm.IRModule, _context) -> tvm.IRModule:
    """Keep every kernel's `noalias` pointers. TVM 0.27's LLVM codegen gives all functions of a module
    the `tirx.noalias` setting of the one whose name sorts last (observed: removing or renaming
    functions flips all of them). VMShapeLower's shape function lacks the attribute, so in a module
    where it sorts last (no kernel named after "shape_func", e.g. no `take`), LLVM had to assume that
    every kernel's buffers alias: it kept the matmul accumulators in memory, 2x slower. Its one buffer
    is the VM's shape heap, which aliases nothing."""
    updates = {
        symbol: function.with_attr("tirx.noalias", True)
        for symbol, function in module.functions.items()
        if isinstance(function, tirx.PrimFunc) and symbol.name_hint.startswith("shape_func") and len(function.params) == 1
    }
    for symbol, function in updates.items():
        module[symbol] = function
    return module


def _without_kernel_argument_checks() -> tvm.transform.PassContext:
    """The current pass context, with TIR's assertions left out: those of each kernel's packed-call
    wrapper, which check every argument's type, dtype, shape and strides on each call. Their only
    caller is the model's Relax VM function, which passes the tensors it allocated itself from shapes
    it checked at its entry (VM builtins, kept), after reccc's runtime checked the inputs against the
    manifest; written for each of a DLRM's 80 lookup arguments they took LLVM 3.3 s of a 26-table
    model's 11.7 s build, and cost every call."""
    current = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(
        opt_level=current.opt_level, required_pass=list(current.required_pass), disabled_pass=list(current.disabled_pass),
        instruments=list(current.instruments), config={**dict(current.config), "tirx.disable_assert": True},
    )


def build(
    model: onnx.ModelProto,
    target: tvm.target.Target,
    opt_level: int,
    schedule: Callable[[tvm.IRModule, tvm.target.Target], tvm.IRModule] | None = None,
    bind_kernels: Callable[[tvm.IRModule, tvm.target.Target], tvm.IRModule] | None = None,
    select_kernels: Callable[[tvm.IRModule, tvm.target.Target], tvm.IRModule] | None = None,
    vm_exec: str = "compiled",
    constants: Sequence[np.ndarray] = (),
) -> tvm.runtime.Executable:
    """Import and compile. From -O1 on, Relax-level legalization, constant folding (weight transposes
    of Gemm are folded here instead of running every call) and operator fusion (one kernel per embedding
    lookup, see lookup_fusion.py) run before TVM's build;
    from -O2 on, the target's default `schedule` rules, after which the constant weights of the matmul
    kernels they mark are stored in panels (weight_panels.py). `bind_kernels` then maps, at every level, the
    kernels no rule scheduled onto the device's threads (GPU targets need it). `select_kernels`, from -O2
    on, replaces operators by the target's own kernels before legalization (CPUs: AMX and dot-product FC layers).
    The model's Relax function runs as `vm_exec` says (reccc.target.VM_EXEC_MODES). `constants` are the
    values of the model's last graph inputs (to_relax)."""
    module = to_relax(model, constants)
    try:
        with target:
            if opt_level >= 1:
                module = without_repeated_work(module)
            if opt_level >= 2 and select_kernels is not None:
                module = select_kernels(module, target)
            module = relax.transform.LegalizeOps(_ONNX_EXACT_LEGALIZATIONS)(module)
            if opt_level >= 1:
                module = fuse_operators()(module)
            if opt_level >= 2 and schedule is not None:
                module = pack_constant_weights(schedule(module, target))
            if bind_kernels is not None:  # at every level: an unbound GPU kernel would be built as host code
                module = bind_kernels(module, target)
            pipeline = tvm.transform.Sequential(
                [relax.pipeline.default_build_pipeline(), _sort_shape_function_stores, _shape_functions_noalias]
            )
            with _without_kernel_argument_checks():
                return relax.build(module, target, relax_pipeline=pipeline, exec_mode=vm_exec)
    except Exception as error:
        raise CompileError(f"TVM failed to compile the model: {one_line(error)}") from error
