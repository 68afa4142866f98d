"""ONNX → Relax → TVM executable, the lowering every TVM target shares.

The batch dim stays symbolic: from_onnx turns ONNX dim_params into Relax shape variables, so one
compiled artifact serves every batch size.
"""

import onnx
import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

from reccc.errors import CompileError, one_line

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


def to_relax(model: onnx.ModelProto) -> tvm.IRModule:
    check_supported_ops(model)
    try:
        return from_onnx(model, keep_params_in_input=False)
    except Exception as error:
        raise CompileError(f"TVM could not import the model: {one_line(error)}") from error


def _relu_propagating_nan(block_builder: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """ONNX Relu(NaN) is NaN; TOPI's max(x, 0) becomes LLVM's maxnum, which returns 0 for NaN."""

    def relu(x: te.Tensor) -> te.Tensor:
        zero = tirx.const(0, x.dtype)
        return te.compute(x.shape, lambda *i: tirx.Select(x(*i) < zero, zero, x(*i)), name="relu")

    return block_builder.call_te(relu, call.args[0], primfunc_name_hint="relu")


# Legalizations that replace TVM's where its numerics differ from ONNX's (checked against onnxruntime).
_ONNX_EXACT_LEGALIZATIONS = {"relax.nn.relu": _relu_propagating_nan}


def build(model: onnx.ModelProto, target: tvm.target.Target, opt_level: int) -> tvm.runtime.Executable:
    """Import and compile. From -O1 on, Relax-level legalization, constant folding (weight transposes
    of Gemm are folded here instead of running every call) and operator fusion run before TVM's build."""
    module = to_relax(model)
    try:
        with target:
            module = relax.transform.LegalizeOps(_ONNX_EXACT_LEGALIZATIONS)(module)
            if opt_level >= 1:
                module = relax.get_pipeline("zero")(module)
            return tvm.compile(module, target=target)
    except Exception as error:
        raise CompileError(f"TVM failed to compile the model: {one_line(error)}") from error
