"""Finding the FC layers that passes/fc_quantization.py writes in a module TVM's importer made, with
their operands, for the targets' selectors of their own FC kernels (cpu_dot_schedules,
cpu_amx_schedules, gpu_fc_schedules):
  int8  matmul(astype(codes: uint8, int32), astype(W: constant int8, int32))
  bf16  matmul(astype(astype(x: float32, bfloat16), float32), W), W a constant of bf16 numbers
"""

import ml_dtypes
import numpy as np
import tvm
from tvm import relax

from reccc.targets.relax_lowering import BoundCalls


class FcOperands(BoundCalls):
    """The operands of the FC layers passes/fc_quantization.py writes, as the importer writes them,
    found from a Relax matmul call: for the layer-selecting mutators (a PyExprMutator's lookup_binding)."""

    def _narrowed(self, expr, wide: str, narrow: str):
        """The `narrow` 2-D tensor that `expr` (`wide`) is an astype of, else None."""
        call = self._bound(expr, "relax.astype")
        if call is None or call.ty.dtype != wide:
            return None
        info = call.args[0].ty
        return call.args[0] if isinstance(info, relax.TensorType) and info.dtype == narrow and info.ndim == 2 else None

    def _constant_matrix(self, expr) -> np.ndarray | None:
        """The values of a constant [K, N] operand: a constant, or one transposed or cast."""
        if isinstance(expr, tvm.ir.GenericConst):
            value = expr.value.numpy()
            return value if value.ndim == 2 else None
        transpose = self._bound(expr, "relax.permute_dims")
        if transpose is not None and [int(a) for a in transpose.attrs.axes] == [1, 0]:
            value = self._constant_matrix(transpose.args[0])
            return None if value is None else value.T
        cast = self._bound(expr, "relax.astype")
        if cast is not None:
            value = self._constant_matrix(cast.args[0])
            return None if value is None else value.astype(cast.ty.dtype)
        return None

    def bf16_layer(self, call):
        """(fp32 x, bf16 weight) of matmul(astype(astype(x, bf16), f32), W), W a constant of bf16 numbers."""
        if call.ty.dtype != "float32":
            return None
        rounded = self._narrowed(call.args[0], "float32", "bfloat16")
        source = None if rounded is None else self._bound(rounded, "relax.astype")
        if source is None or source.args[0].ty.dtype != "float32":
            return None
        weight = self._constant_matrix(call.args[1])
        if weight is None or weight.dtype != np.float32:
            return None
        stored = weight.astype(ml_dtypes.bfloat16)
        # Only a weight of bf16 numbers: rounding another would change the layer.
        if not np.array_equal(stored.astype(np.float32), weight, equal_nan=True):
            return None
        return source.args[0], stored

    def int8_layer(self, call):
        """(uint8 codes, int8 weight) of matmul(astype(codes: uint8, int32), astype(W: constant int8, int32))."""
        if call.ty.dtype != "int32":
            return None
        codes, weight = self._narrowed(call.args[0], "int32", "uint8"), self._narrowed(call.args[1], "int32", "int8")
        if codes is None or not isinstance(weight, tvm.ir.GenericConst):
            return None
        return codes, weight.value.numpy()
