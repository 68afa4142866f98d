"""Finding the FC layers that passes/fc_quantization.py writes in a module TVM's importer made, with
their operands, for the targets' selectors of their own FC kernels (cpu_dot_schedules,
cpu_amx_schedules, gpu_fc_schedules):
  int8  matmul(astype(codes: uint8, int32), astype(W: constant int8, int32))
  bf16  matmul(astype(astype(x: float32, bfloat16), float32), W), W a constant of bf16 numbers
and, for kernels that quantize their own input, the fp32 input an int8 layer's codes quantize
(FcOperands.quantized_input) and the codes computed from it as that graph does (uint8_codes).
"""

import ml_dtypes
import numpy as np
import tvm
from tvm import relax, te, tirx

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

    # The imported Cast of clip(v, 0, 255) to uint8 (its NaN / wrap-around handling): by op, the
    # argument holding v.
    _CAST_CHAIN = {"relax.astype": 0, "relax.bitwise_and": 0, "relax.where": 2}

    def quantized_input(self, codes) -> list | None:
        """[x, row max, row min] when `codes` are fc_quantization's quantization of a float32 x [rows, K]
        (its _quantize_rows, as the importer writes it), so that the kernel can compute them, and the
        row's scale and zero point with them, by the same operations: scale = max((relu(max) +
        relu(-min)) / 255, tiny), zero point = round(clip(relu(-min) / scale, 0, 255)), codes =
        clip(round(x / scale) + zero point, 0, 255). TVM then fuses what is left of the graph's own
        scale and zero point (read by the layer's epilogue) into the kernel."""
        expr = codes
        while (name := self._op_name(expr)) in self._CAST_CHAIN:
            expr = self.lookup_binding(expr).args[self._CAST_CHAIN[name]]
        shifted = self._clipped(expr, 0.0, 255.0)
        if self._bound(shifted, "relax.add") is None:
            return None
        rounded, zero_point = self.lookup_binding(shifted).args
        rounding = self._bound(rounded, "relax.round")
        division = None if rounding is None else self._bound(rounding.args[0], "relax.divide")
        if division is None:
            return None
        x, scale = division.args
        ranges = self._row_range(x, scale)
        if ranges is None or not self._zero_point(zero_point, ranges[2], scale):
            return None
        rows, inputs = dims(x)
        if dims(codes) != (rows, inputs) or not float_matrix(x):
            return None
        return [x, ranges[0], ranges[1]]

    def _op_name(self, expr) -> str | None:
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None

    def _scalar(self, expr) -> float | None:
        """A scalar constant operand's value, also through the importer's where(isnan(c), +-inf, c)."""
        if isinstance(expr, tvm.ir.GenericConst):
            value = expr.value.numpy()
            return float(value) if value.ndim == 0 else None
        where = self._bound(expr, "relax.where")
        return None if where is None else self._scalar(where.args[2])

    def _clipped(self, expr, low: float, high: float):
        """v when `expr` is clip(v, low, high) as the importer writes Clip (call_tir maximum, minimum)."""
        for kernel, bound in (("minimum", high), ("maximum", low)):
            call = self._bound(expr, "relax.call_tir")
            if call is None or not call.args[0].name_hint.startswith(kernel) or self._scalar(call.args[1].fields[1]) != bound:
                return None
            expr = call.args[1].fields[0]
        return expr

    def _reduced(self, expr, op: str, x):
        """The call when `expr` is op(x) over the last axis, kept."""
        call = self._bound(expr, op)
        if call is None or not call.args[0].same_as(x) or not call.attrs.keepdims or [int(a) for a in call.attrs.axis] not in ([-1], [1]):
            return None
        return call

    def _row_range(self, x, scale):
        """(max var, min var, relu(-min) var) of x when `scale` is max((relu(max) + relu(-min)) / 255, tiny)."""
        call = self._bound(scale, "relax.call_tir")
        if call is None or not call.args[0].name_hint.startswith("maximum") or self._scalar(call.args[1].fields[1]) != float(np.finfo(np.float32).tiny):
            return None
        spread = self._bound(call.args[1].fields[0], "relax.divide")
        if spread is None or self._scalar(spread.args[1]) != 255.0:
            return None
        total = self._bound(spread.args[0], "relax.add")
        if total is None:
            return None
        high, below = (self._bound(term, "relax.nn.relu") for term in total.args)
        negative = None if below is None else self._bound(below.args[0], "relax.negative")
        if high is None or negative is None:
            return None
        row_max, row_min = high.args[0], negative.args[0]
        if self._reduced(row_max, "relax.max", x) is None or self._reduced(row_min, "relax.min", x) is None:
            return None
        return row_max, row_min, total.args[1]

    def _zero_point(self, expr, below, scale) -> bool:
        """Whether `expr` is round(clip(below / scale, 0, 255))."""
        rounding = self._bound(expr, "relax.round")
        offset = None if rounding is None else self._clipped(rounding.args[0], 0.0, 255.0)
        division = None if offset is None else self._bound(offset, "relax.divide")
        return division is not None and division.args[0].same_as(below) and division.args[1].same_as(scale)


def dims(expr) -> tuple[int | str, ...]:
    return tuple(int(dim) if isinstance(dim, tirx.IntImm) else str(dim) for dim in expr.ty.shape)


def float_matrix(expr) -> bool:
    info = expr.ty
    return isinstance(info, relax.TensorType) and info.dtype == "float32" and info.ndim == 2


def uint8_codes(x: te.Tensor, row_max: te.Tensor, row_min: te.Tensor, stage_prefix: str):
    """x's uint8 codes in its rows' quantization, the rows' scale and zero point computed from their
    max and min, with the operations of fc_quantization's graph in its order (see
    FcOperands.quantized_input); a NaN's code is 0, as the imported Cast's. Scale and zero
    point are stages of their own, one value per row, named `stage_prefix` + scale / zero_point."""
    zero, levels = tirx.const(0, "float32"), tirx.const(255, "float32")

    def relu(value):
        return tirx.Select(value < zero, zero, value)

    def clip(value):
        return tirx.Select(value >= zero, tirx.Select(value <= levels, value, levels), zero)

    def below(i):
        return relu(-row_min[i, 0])

    tiny = tirx.const(np.finfo(np.float32).tiny, "float32")
    rows = x.shape[0]
    scale = te.compute((rows,), lambda i: tirx.max((relu(row_max[i, 0]) + below(i)) / levels, tiny), name=stage_prefix + "scale")
    zero_point = te.compute((rows,), lambda i: tirx.round(clip(below(i) / scale[i])), name=stage_prefix + "zero_point")
    return lambda i, k: clip(tirx.round(x[i, k] / scale[i]) + zero_point[i]).astype("uint8")
