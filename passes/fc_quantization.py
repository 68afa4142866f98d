"""fc-quantization (lossy): run fully connected layers in bf16 or int8 (mixed precision).

A layer is a dense layer of reccc.passes.dense_layers (a Gemm with transA=0, or a MatMul, whose
weight is a constant float32 matrix and whose input is computed at run time) with no bias or a
constant one varying along the units only. Each gets `precision`, or its own from `layers` (by the
Gemm/MatMul node's name; "fp32" keeps it). The result is standard ONNX that onnxruntime runs, so it
stays the reference for the compiled artifact:

  int8   y = (MatMulInteger(xq, Wq) - zp·colsum(Wq)) · (sx·sw) + b      xq, sx, zp = DynamicQuantizeLinear(x)
         Wq: int8, symmetric per output unit (sw = max|W[:, j]| / 127, codes in [-127, 127]); x: uint8
         with one scale and zero point per row, computed at run time from the row's range
         (DynamicQuantizeLinear's rule applied per row; onnxruntime's quantize_dynamic uses one per
         tensor). The zero point is taken out of the int32 accumulator by its exact correction
         zp·colsum(Wq) rather than by MatMulInteger's a_zero_point input, so the product stays
         uint8 x int8, the operand shape of x86's VNNI vpdpbusd (reccc.targets.cpu_dot_schedules
         lowers it so). One activation read by several int8 layers is quantized once.
  bf16   y = Gemm/MatMul(bf16(x), bf16(W)) in fp32: weights stored as bfloat16 (half the bytes), the
         activation rounded to bfloat16 by Cast; both are widened back with Cast, so every product of
         two bf16 values is exact in fp32 and the sum accumulates in fp32, as AVX-512 BF16's vdpbf16ps
         does (reccc.targets.cpu_dot_schedules lowers it so where the target has it).

details() reports each layer's precision and the largest error its weight quantization introduced.
"""

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from reccc.errors import UsageError
from reccc.ir import Model
from reccc.pass_manager import Pass, register_pass
from reccc.passes.dense_layers import DenseLayer, dense_layer
from reccc.passes.patterns import fresh_name, new_constant, new_node, remove_node

PRECISIONS = ("bf16", "int8")
KEEP = "fp32"
INT8_MAX = 127  # symmetric codes: -127..127, so -W quantizes to -Wq
# Layers with fewer output units stay fp32 unless named: quantizing a row of the input costs about as
# much as a few units' dot products, so a narrow layer (a logit, a wide model's linear part) gains
# nothing, and its one scale per unit is the output's whole error.
MIN_UNITS = 8


@register_pass
class FcQuantization(Pass):
    name = "fc-quantization"
    summary = "run FC layers (Gemm/MatMul of a constant float32 weight, >= 8 units) in int8 (per-unit weight scales, per-row dynamic activation scales) or bf16; standard ONNX"
    lossless = False

    def __init__(self, precision: str = "int8", layers: Mapping[str, str] | None = None):
        if precision not in (*PRECISIONS, KEEP):
            raise ValueError(f"precision must be one of {', '.join((*PRECISIONS, KEEP))}, not {precision!r}")
        layers = dict(layers or {})
        for layer, choice in layers.items():
            if choice not in (*PRECISIONS, KEEP):
                raise ValueError(f"layer '{layer}': precision must be one of {', '.join((*PRECISIONS, KEEP))}, not {choice!r}")
        self.precision, self.layers = precision, layers

    def call(self, model: Model) -> bool:
        graph = model.graph
        layers = fc_layers(graph)
        unknown = sorted(set(self.layers) - {layer.node.name for layer in layers})
        if unknown:
            names = ", ".join(layer.node.name for layer in layers) or "none"
            raise UsageError(f"{self.name}: no FC layer named '{unknown[0]}' (the model's FC layers: {names})")
        quantized_inputs: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]] = {}
        changed = False
        for layer in layers:
            shape = f"{layer.fan_in}x{layer.units}"
            choice = self.layers.get(layer.node.name)
            if choice is None and layer.units < MIN_UNITS:
                self.note(f"{layer.name} {shape}: kept fp32 (fewer than {MIN_UNITS} units)")
                continue
            choice = choice or self.precision
            if choice == KEEP:
                self.note(f"{layer.name} {shape}: kept fp32")
                continue
            worst = _to_int8(graph, layer, quantized_inputs) if choice == "int8" else _to_bf16(graph, layer)
            self.note(f"{layer.name} {shape}: {choice}, max weight error {worst:.3g}")
            changed = True
        if changed:
            graph.cleanup()
            graph.toposort()
        return changed


def fc_layers(graph: gs.Graph) -> list[DenseLayer]:
    """The layers this pass can rewrite, in graph order: float32 weights and a known (row or no) bias."""
    found = []
    for node in graph.nodes:
        layer = dense_layer(graph, node)
        if layer is not None and layer.weight.dtype == np.float32 and layer.bias_known:
            found.append(layer)
    return found


def quantize_weight(incoming: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-unit int8 codes [fan_in, units] and float32 scales [units] of an effective weight
    (float64 [fan_in, units]); a unit of zeros gets scale 1."""
    peak = np.abs(incoming).max(axis=0)
    scales = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    codes = np.clip(np.rint(incoming / scales.astype(np.float64)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scales


def _variable(graph: gs.Graph, base: str, dtype) -> gs.Variable:
    return gs.Variable(fresh_name(graph, base), dtype=dtype)


def _to_int8(graph: gs.Graph, layer: DenseLayer, quantized_inputs: dict[int, tuple[gs.Tensor, gs.Tensor, gs.Tensor]]) -> float:
    node, name = layer.node, layer.node.name
    x, output = node.inputs[0], layer.output
    incoming = layer.incoming()
    codes, scales = quantize_weight(incoming)
    worst = float(np.abs(codes.astype(np.float64) * scales.astype(np.float64) - incoming).max())
    if id(x) not in quantized_inputs:
        quantized_inputs[id(x)] = _quantize_rows(graph, x)
    xq, x_scale, x_zero = quantized_inputs[id(x)]
    bias = layer.unit_bias().astype(np.float32) if layer.bias is not None else None
    for replaced in {id(n): n for n in (node, layer.bias_node) if n is not None}.values():
        remove_node(graph, replaced)

    def step(op: str, inputs: list[gs.Tensor], dtype, suffix: str, out: gs.Tensor | None = None, **attrs) -> gs.Tensor:
        out = out if out is not None else _variable(graph, f"{name}__{suffix}", dtype)
        new_node(graph, op, f"{name}__{suffix}", inputs, [out], **attrs)
        return out

    weight = new_constant(graph, f"{name}__weight_int8", codes)
    accumulator = step("MatMulInteger", [xq, weight], np.int32, "matmul_int8")
    column_sums = new_constant(graph, f"{name}__weight_column_sums", codes.astype(np.int32).sum(axis=0, dtype=np.int32))
    correction = step("Mul", [x_zero, column_sums], np.int32, "zero_point_correction")
    exact = step("Sub", [accumulator, correction], np.int32, "accumulator")
    widened = step("Cast", [exact], np.float32, "widen", to=onnx.TensorProto.FLOAT)
    rows = step("Mul", [widened, x_scale], np.float32, "input_scale")
    weight_scales = new_constant(graph, f"{name}__weight_scales", scales)
    if bias is None:
        step("Mul", [rows, weight_scales], np.float32, "dequantize", out=output)
    else:
        product = step("Mul", [rows, weight_scales], np.float32, "dequantize")
        step("Add", [product, new_constant(graph, f"{name}__bias", bias)], np.float32, "bias", out=output)
    return worst


def _quantize_rows(graph: gs.Graph, x: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
    """uint8 codes of `x` with one scale and zero point per row (last axis), as DynamicQuantizeLinear
    computes them for a whole tensor: range [min(lo, 0), max(hi, 0)] over 255 steps, zero point and
    codes rounded half to even. Returns codes, scales [..., 1] float32 and zero points [..., 1] int32.
    A row of zeros gets the smallest normal scale (codes 0) instead of dividing by zero."""
    base = x.name

    def step(op: str, inputs: list[gs.Tensor], dtype, suffix: str, **attrs) -> gs.Tensor:
        out = _variable(graph, f"{base}__{suffix}", dtype)
        new_node(graph, op, f"{base}__{suffix}", inputs, [out], **attrs)
        return out

    def const(suffix: str, value, dtype=np.float32) -> gs.Constant:
        return new_constant(graph, f"{base}__{suffix}", np.array(value, dtype=dtype))

    def reduce(op: str, suffix: str) -> gs.Tensor:
        if graph.opset >= 18:
            return step(op, [x, const(f"{suffix}_axes", [-1], np.int64)], np.float32, suffix, keepdims=1)
        return step(op, [x], np.float32, suffix, axes=[-1], keepdims=1)

    # Relu and Clip rather than Max/Min with a constant: TVM lowers a two-input Max to a broadcast, a
    # stack and a reduction, each a kernel of its own.
    zero, levels = const("zero", 0.0), const("levels", 255.0)
    high = step("Relu", [reduce("ReduceMax", "row_max")], np.float32, "high")  # max(hi, 0)
    below = step("Relu", [step("Neg", [reduce("ReduceMin", "row_min")], np.float32, "neg_min")], np.float32, "below")  # -min(lo, 0)
    spread = step("Div", [step("Add", [high, below], np.float32, "range"), levels], np.float32, "spread")
    scale = step("Clip", [spread, const("tiny", np.finfo(np.float32).tiny)], np.float32, "scale")
    offset = step("Div", [below, scale], np.float32, "offset")
    zero_point = step("Round", [step("Clip", [offset, zero, levels], np.float32, "offset_clipped")], np.float32, "zero_point")
    shifted = step("Add", [step("Round", [step("Div", [x, scale], np.float32, "scaled")], np.float32, "rounded"), zero_point],
                   np.float32, "shifted")
    codes = step("Cast", [step("Clip", [shifted, zero, levels], np.float32, "clipped")], np.uint8, "u8", to=onnx.TensorProto.UINT8)
    zero_int = step("Cast", [zero_point], np.int32, "zero_point_int32", to=onnx.TensorProto.INT32)
    return codes, scale, zero_int


def _to_bf16(graph: gs.Graph, layer: DenseLayer) -> float:
    import ml_dtypes  # onnx's dependency; numpy has no bfloat16

    node, name = layer.node, layer.node.name
    stored = layer.weight.astype(ml_dtypes.bfloat16)
    worst = float(np.abs(stored.astype(np.float64) - layer.weight.astype(np.float64)).max() * abs(layer.alpha))
    weight = _variable(graph, f"{name}__weight_fp32", np.float32)
    new_node(graph, "Cast", f"{name}__widen_weight", [new_constant(graph, f"{name}__weight_bf16", stored)], [weight],
             to=onnx.TensorProto.FLOAT)
    rounded = _variable(graph, f"{node.inputs[0].name}__bf16", ml_dtypes.bfloat16)
    new_node(graph, "Cast", f"{name}__round_input", [node.inputs[0]], [rounded], to=onnx.TensorProto.BFLOAT16)
    widened = _variable(graph, f"{node.inputs[0].name}__bf16_fp32", np.float32)
    new_node(graph, "Cast", f"{name}__widen_input", [rounded], [widened], to=onnx.TensorProto.FLOAT)
    node.inputs[0], node.inputs[1] = widened, weight
    return worst
