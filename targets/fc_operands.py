"""Finding the FC layers that passes/fc_quantization.py writes in a module TVM's importer made, with
their operands, and replacing them by a target's own FC kernels (FcLayerSelector, the base of the
selectors in cpu_dot_schedules, cpu_amx_schedules and gpu_fc_schedules):
  int8  matmul(astype(codes: uint8, int32), astype(W: constant int8, int32))
  bf16  matmul(astype(astype(x: float32, bfloat16), float32), W), W a constant of bf16 numbers
and, for kernels that quantize their own input, the fp32 input an int8 layer's codes quantize
(FcOperands.quantized_input) with the int8 layer dequantizing their products
(FcOperands.dequantized_int8_layer), and the kernels' parts of that layer as its graph computes them
(row_parameters, uint8_code, dequantized); and
for kernels whose products take the uint8 codes c as the signed bytes c - 128 (shifted), what those
products lack (shifted_codes_correction).
"""

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import tvm
from tvm import relax, te, tirx

from reccc.targets.relax_lowering import BoundCalls, bindings_as_written


@dataclass(frozen=True)
class QuantizedInput:
    """fc_quantization's per-row quantization of a float32 x [rows, K], as the importer writes it: the
    Relax expressions of x and of the scale and (float) zero point computed from its rows' max and
    min."""

    x: relax.Expr
    scale: relax.Expr
    zero_point: relax.Expr


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

    # The imported Cast of a float v to an integer type (its NaN and infinity handling, its
    # wrap-around): by op, the argument holding v.
    _CAST_CHAIN = {"relax.astype": 0, "relax.bitwise_and": 0, "relax.floor_mod": 0, "relax.where": 2}

    def _cast_source(self, expr):
        """v when `expr` is the imported Cast of v (or v itself)."""
        while (name := self._op_name(expr)) in self._CAST_CHAIN:
            expr = self.lookup_binding(expr).args[self._CAST_CHAIN[name]]
        return expr

    def quantized_input(self, codes) -> QuantizedInput | None:
        """The quantization of x when `codes` are fc_quantization's codes of a float32 x [rows, K] (its
        _quantize_rows, as the importer writes it), so that a kernel can compute them, and the row's
        scale and zero point with them, by the same operations: scale = max((relu(max) + relu(-min)) /
        255, tiny), zero point = round(clip(relu(-min) / scale, 0, 255)), codes = clip(round(x /
        scale) + zero point, 0, 255)."""
        shifted = self._clipped(self._cast_source(codes), 0.0, 255.0)
        if self._bound(shifted, "relax.add") is None:
            return None
        rounded, zero_point = self.lookup_binding(shifted).args
        rounding = self._bound(rounded, "relax.round")
        division = None if rounding is None else self._bound(rounding.args[0], "relax.divide")
        if division is None:
            return None
        x, scale = division.args
        below = self._below_row_min(x, scale)
        if below is None or not self._zero_point(zero_point, below, scale):
            return None
        rows, inputs = dims(x)
        if dims(codes) != (rows, inputs) or not float_matrix(x):
            return None
        return QuantizedInput(x, scale, zero_point)

    def dequantized_int8_layer(self, call) -> tuple[QuantizedInput, np.ndarray, np.ndarray, np.ndarray] | None:
        """(x's quantization, int8 weight [K, N], its column sums [N], weight scales [N]) when `call` is the dequantized
        output (before the bias) of an int8 layer as fc_quantization writes it:
            multiply(multiply(astype(subtract(M, multiply(int32(zero point), column sums)), float32),
                   scale), weight scales)
        where M is the layer's matmul (int8_layer) of codes that are x's quantization (quantized_input)
        with that scale and zero point, and the column sums are the weight's."""
        if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.multiply"))):
            return None
        scaled = self._bound(call.args[0], "relax.multiply")
        widened = None if scaled is None else self._bound(scaled.args[0], "relax.astype")
        exact = None if widened is None or widened.ty.dtype != "float32" else self._bound(widened.args[0], "relax.subtract")
        matmul = None if exact is None else self._bound(exact.args[0], "relax.matmul")
        layer = None if matmul is None else self.int8_layer(matmul)
        correction = None if layer is None else self._bound(exact.args[1], "relax.multiply")
        if correction is None:
            return None
        codes, weight = layer
        quantized = self.quantized_input(codes)
        zero_point = correction.args[0]
        units = weight.shape[1]
        column_sums, weight_scales = self._vector(correction.args[1], "int32", units), self._vector(call.args[1], "float32", units)
        if quantized is None or column_sums is None or weight_scales is None or zero_point.ty.dtype != "int32":
            return None
        if not self._cast_source(zero_point).same_as(quantized.zero_point) or not scaled.args[1].same_as(quantized.scale):
            return None
        if not np.array_equal(column_sums, weight_column_sums(weight)):
            return None
        return quantized, weight, column_sums, weight_scales

    @staticmethod
    def _vector(expr, dtype: str, length: int) -> np.ndarray | None:
        """The values of a constant 1-D operand of `dtype` and `length`."""
        if not isinstance(expr, tvm.ir.GenericConst):
            return None
        value = expr.value.numpy()
        return value if value.dtype == np.dtype(dtype) and value.shape == (length,) else None

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

    def _below_row_min(self, x, scale):
        """The relu(-min) var when `scale` is max((relu(max) + relu(-min)) / 255, tiny), max and min those
        of x's rows."""
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
        return total.args[1]

    def _zero_point(self, expr, below, scale) -> bool:
        """Whether `expr` is round(clip(below / scale, 0, 255))."""
        rounding = self._bound(expr, "relax.round")
        offset = None if rounding is None else self._clipped(rounding.args[0], 0.0, 255.0)
        division = None if offset is None else self._bound(offset, "relax.divide")
        return division is not None and division.args[0].same_as(below) and division.args[1].same_as(scale)


class FcLayerSelector(relax.PyExprMutator, FcOperands):
    """Replaces each FC layer of a precision among `products` (objects with a `precision`, "int8" or
    "bf16", tried in order) by `kernel_call(product, x, weight)`, x and weight as int8_layer and
    bf16_layer give them; and where `replaces_quantizing_layers`, each int8 layer as fc_quantization
    writes it (dequantized_int8_layer) whole, from its fp32 input x to its dequantized output, by a
    kernel of its rows' quantization parameters (row_parameters) and
    `quantizing_int8_call(product, x, parameters, weight, column_sums, weight_scales)`: a kernel quantizing x
    itself. (The layer's matmul, replaced when visited, and the graph's quantization of x are then
    read by nothing.) A target's selector subclasses it with its calls, decorated by
    @relax.expr_functor.mutator, and runs through `select_fc_layers`."""

    replaces_quantizing_layers = False

    def __init__(self, module: tvm.IRModule, products: tuple):
        super().__init__(module)
        self.products = products
        self.selected: set = set()  # the products of the replacements
        self._written = bindings_as_written(module["main"])

    def lookup_binding(self, var: relax.Var) -> relax.Expr | None:
        return self._written.get(var)

    def kernel_call(self, product, x, weight: np.ndarray) -> relax.Expr:
        raise NotImplementedError

    def quantizing_int8_call(self, product, x, parameters: relax.Expr, weight: np.ndarray, column_sums: np.ndarray,
                             weight_scales: np.ndarray) -> relax.Expr:
        raise NotImplementedError

    def visit_call_(self, call):
        int8 = next((product for product in self.products if product.precision == "int8"), None)
        layer = self.dequantized_int8_layer(call) if self.replaces_quantizing_layers and int8 is not None else None
        if layer is not None:
            quantized, *constants = layer
            self.selected.add(int8)
            parameters = self.builder_.emit(self.builder_.call_te(row_parameters, quantized.x, primfunc_name_hint=ROW_PARAMETERS))
            return self.quantizing_int8_call(int8, quantized.x, parameters, *constants)
        if call.op.same_as(tvm.ir.Op.get("relax.matmul")):
            for product in self.products:
                layer = (self.bf16_layer if product.precision == "bf16" else self.int8_layer)(call)
                if layer is not None:
                    self.selected.add(product)
                    return self.kernel_call(product, *layer)
        return super().visit_call_(call)


def select_fc_layers(selector: type, module: tvm.IRModule, products: tuple) -> tuple[tvm.IRModule, set]:
    """`module` with its FC layers replaced by `selector` (an FcLayerSelector) for `products`, and the
    products of the replacements; the module unchanged where none was."""
    if not products:
        return module, set()
    mutator = selector(module, products)
    main = mutator.visit_expr(module["main"])
    if not mutator.selected:
        return module, set()
    module = mutator.builder_.get()
    module["main"] = main
    # The widened copies of the operands are read by nothing now.
    return relax.transform.DeadCodeElimination(["main"])(module), mutator.selected


def weight_column_sums(weight: np.ndarray) -> np.ndarray:
    """Each unit's sum of an int8 weight [K, N] (int32, exact): what fc_quantization's zero-point
    correction multiplies."""
    return weight.astype(np.int32).sum(axis=0, dtype=np.int32)


def shifted_codes_correction(weight: np.ndarray) -> np.ndarray:
    """What a product of codes taken as signed bytes (code - 128) lacks, per unit: 128 x the unit's
    weight sum (int32, exact)."""
    return 128 * weight_column_sums(weight)


def shifted(code):
    """A uint8 code c as the signed byte c - 128 (its top bit flipped): the operand of products that
    multiply signed bytes only (sdot, the tensor cores' int8 wmma)."""
    return tirx.reinterpret("int8", code ^ tirx.const(0x80, "uint8"))


def dims(expr) -> tuple[int | str, ...]:
    return tuple(int(dim) if isinstance(dim, tirx.IntImm) else str(dim) for dim in expr.ty.shape)


def float_matrix(expr) -> bool:
    info = expr.ty
    return isinstance(info, relax.TensorType) and info.dtype == "float32" and info.ndim == 2


# The kernel of an int8 layer's rows' quantization parameters (row_parameters): its output block, and
# the prefix of its stages' names (max, min, scale, zero_point).
ROW_PARAMETERS, ROW_STAGE = "fc_row_parameters", "fc_row_"
_ZERO, _LEVELS = tirx.const(0, "float32"), tirx.const(255, "float32")


def _clipped_to_levels(value):
    """clip(value, 0, 255), a NaN to 0 (as the imported Cast of a NaN gives)."""
    return tirx.Select(value >= _ZERO, tirx.Select(value <= _LEVELS, value, _LEVELS), _ZERO)


def uint8_code(value, scale, zero_point):
    """An fp32 value's uint8 code in its row's quantization: clip(round(value / scale) + zero point, 0,
    255), as fc_quantization's graph computes it."""
    return _clipped_to_levels(tirx.round(value / scale) + zero_point).astype("uint8")


def row_parameters(x: te.Tensor) -> te.Tensor:
    """[rows, 2]: each row's scale and (float) zero point in fc_quantization's quantization of x,
    computed from the row's max and min with the operations of its graph in its order (see
    FcOperands.quantized_input), in stages named ROW_STAGE + max, min, scale, zero_point."""
    rows, inputs = x.shape

    def reduced(combine, name: str) -> te.Tensor:
        k = te.reduce_axis((0, inputs), name="k")
        return te.compute((rows,), lambda i: combine(x[i, k], axis=k), name=ROW_STAGE + name)

    def relu(value):
        return tirx.Select(value < _ZERO, _ZERO, value)

    row_max, row_min = reduced(te.max, "max"), reduced(te.min, "min")
    tiny = tirx.const(np.finfo(np.float32).tiny, "float32")
    scale = te.compute((rows,), lambda i: tirx.max((relu(row_max[i]) + relu(-row_min[i])) / _LEVELS, tiny), name=ROW_STAGE + "scale")
    zero_point = te.compute(
        (rows,), lambda i: tirx.round(_clipped_to_levels(relu(-row_min[i]) / scale[i])), name=ROW_STAGE + "zero_point"
    )
    return te.compute((rows, 2), lambda i, c: tirx.Select(c == 0, scale[i], zero_point[i]), name=ROW_PARAMETERS)


def dequantized(sums: te.Tensor, parameters: te.Tensor, column_sums: te.Tensor, weight_scales: te.Tensor, code_shift: int) -> te.Tensor:
    """fc_quantization's dequantization of an int8 layer's products, in its graph's order: (MatMulInteger's
    sums - zero point x column sum) as fp32, times the row's scale, times the unit's; `sums` (at least
    [rows, units]) are the products of the codes less `code_shift` (a kernel's products may take the
    uint8 code c as the signed byte c - 128), so MatMulInteger's are sums + code_shift x column sum, and
    the int32 correction is (code_shift - zero point) x column sum: exact (int32 sums wrap around alike
    in any order). `parameters` are the rows' (row_parameters)."""
    rows, units = parameters.shape[0], column_sums.shape[0]
    shift = tirx.const(code_shift, "int32")
    return te.compute(
        (rows, units),
        lambda i, j: (sums[i, j] + (shift - parameters[i, 1].astype("int32")) * column_sums[j]).astype("float32")
        * parameters[i, 0] * weight_scales[j],
        name="fc_dequantized",
    )
