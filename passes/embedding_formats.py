"""Compressed embedding-table formats: how a float table [rows, dim] is stored, and the standard ONNX
ops that read a lookup back as float32, so onnxruntime still runs (and checks) the quantized graph.

- int8: row-wise asymmetric, as FBGEMM's fused 8-bit rowwise format: each row's values are uint8
  codes q with value = q * scale + bias, scale = (max - min) / 255 and bias = min of that row, so the
  error of a value is at most scale / 2. Codes are a uint8 [rows, dim] table; scale and bias an fp32
  [rows, 2] table beside it, so a lookup reads its row's codes and one 8-byte pair.
- int4: the same with 16 levels (scale = (max - min) / 15) and an fp16 scale and bias, as FBGEMM's
  4-bit format. Two rows share their bytes: byte c of packed row k holds column c of row 2k in its
  low nibble and of row 2k + 1 in its high nibble. A lookup reads one contiguous packed row and
  picks its nibble with a factor per row (1 or 1/16), so unpacking needs no Concat or Reshape and
  the codes are read with the same vector loads as int8's. The error bound is scale / 2 plus the
  fp16 rounding of scale and bias.
- fp16: the table as float16; lookups Cast back to float32.

A lookup is `Gather(table, ids)` along axis 0 with any ids shape; its replacement computes the same
shape [*ids.shape, dim] in float32. The TVM lowering groups the gathers and the dequantizing ops of a
lookup into one kernel (reccc.targets.lookup_fusion).
"""

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from reccc.passes.patterns import fresh_name, new_constant, new_node

FORMATS = ("int8", "int4", "fp16")
FP16_MAX = float(np.finfo(np.float16).max)
CACHE_LINE_BYTES = 64


@dataclass
class EncodedTable:
    format: str
    arrays: dict[str, np.ndarray]  # role ("codes", "scale_bias", "values") -> stored array

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())


def unsupported_reason(table: np.ndarray, format: str) -> str | None:
    """Why `table` cannot be stored in `format`, or None."""
    if table.ndim != 2 or table.shape[1] == 0:
        return f"shape {list(table.shape)} is not [rows, dim]"
    if not np.isfinite(table).all():
        return "it holds NaN or Inf"
    if format == "fp16" and np.abs(table).max(initial=0) > FP16_MAX:
        return f"values beyond fp16's range (|x| > {FP16_MAX:g})"
    if format == "int4" and (np.abs(table).max(initial=0) > FP16_MAX / 2):
        return "values beyond the range an fp16 scale and bias can describe"
    return None


def encode(table: np.ndarray, format: str) -> EncodedTable:
    table = table.astype(np.float32, copy=False)
    if format == "fp16":
        return EncodedTable(format, {"values": table.astype(np.float16)})
    levels = 255 if format == "int8" else 15
    low, high = _row_ranges(table)
    scale_type = np.float32 if format == "int8" else np.float16
    bias = low.astype(scale_type)
    # A constant row has no range: any scale decodes code 0 to the bias exactly.
    exact_scale = np.where(high > low, (high - low) / levels, 1.0)
    scale = exact_scale.astype(scale_type)
    # Rounded down, the stored scale would not reach the row's max with the top code: round it up.
    scale = np.where(scale < exact_scale, np.nextafter(scale, scale_type(np.inf)), scale).astype(scale_type)
    codes = table - bias[:, None].astype(np.float32)
    codes /= scale[:, None].astype(np.float32)
    codes = np.clip(np.rint(codes, out=codes), 0, levels, out=codes).astype(np.uint8)
    scale_bias = np.stack([scale, bias], axis=1)
    if format == "int4":
        codes = _pack_row_pairs(codes)
    return EncodedTable(format, {"codes": codes, "scale_bias": scale_bias})


# Rows this narrow get their min and max from transposed blocks: numpy reduces a row's short last axis
# one row at a time (22 ms for 100k rows of 16 floats), and an axis of a block's rows whole vectors at
# a time (1.6 ms, the transposes included); from about 256 floats a row the plain reduction is faster.
_BLOCKED_RANGES_MAX_DIM = 128
_RANGES_BLOCK_BYTES = 256 * 1024


def _row_ranges(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's min and max (exact in any order)."""
    rows, dim = table.shape
    if dim > _BLOCKED_RANGES_MAX_DIM:
        return table.min(axis=1), table.max(axis=1)
    low, high = np.empty(rows, table.dtype), np.empty(rows, table.dtype)
    step = max(1, _RANGES_BLOCK_BYTES // (table.itemsize * dim))
    for start in range(0, rows, step):
        block = np.ascontiguousarray(table[start:start + step].T)
        block.min(axis=0, out=low[start:start + step])
        block.max(axis=0, out=high[start:start + step])
    return low, high


def cache_lines_per_lookup(table: np.ndarray, format: str) -> float:
    """The cache lines one lookup of `table` stored in `format` reads on average: for each stored array,
    its row's lines, a row of b bytes straddling a line boundary at a share (b - gcd(b, 64)) / 64 of
    the rows (arrays start on a line: TVM aligns them to 64 bytes)."""
    stored = encode(table[:2], format).arrays.values()  # two rows have the layout of all (int4 pairs them)
    row_bytes = [int(array.itemsize * np.prod(array.shape[1:], dtype=np.int64)) for array in stored]
    return sum(1 + (b - np.gcd(b, CACHE_LINE_BYTES)) / CACHE_LINE_BYTES for b in row_bytes)


def decode(encoded: EncodedTable) -> np.ndarray:
    """The float32 table a lookup of `encoded` reads (what the emitted ops compute, row by row)."""
    if encoded.format == "fp16":
        return encoded.arrays["values"].astype(np.float32)
    codes = encoded.arrays["codes"].astype(np.float32)
    if encoded.format == "int4":
        rows = encoded.arrays["scale_bias"].shape[0]
        divisor = np.where(np.arange(rows) % 2, 16.0, 1.0)[:, None]
        shifted = np.floor(codes[np.arange(rows) // 2] / divisor)
        codes = shifted - np.floor(shifted / 16) * 16
    scale_bias = encoded.arrays["scale_bias"].astype(np.float32)
    return codes * scale_bias[:, 0:1] + scale_bias[:, 1:2]


def _pack_row_pairs(codes: np.ndarray) -> np.ndarray:
    """Rows 2k and 2k + 1 of 4-bit `codes` in the low and high nibbles of packed row k."""
    if codes.shape[0] % 2:
        codes = np.concatenate([codes, np.zeros((1, codes.shape[1]), codes.dtype)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def emit_lookup(graph: gs.Graph, encoded: EncodedTable, stored: dict[str, gs.Constant], ids: gs.Tensor, output: gs.Variable, name: str) -> None:
    """Append ops computing `output` = the float32 rows of the table at `ids`, from its `stored`
    constants (by role, as in encoded.arrays). `name` prefixes the new nodes."""
    ops = _Emitter(graph, name)
    if encoded.format == "fp16":
        ops.node("Cast", [ops.node("Gather", [stored["values"], ids], axis=0)], output=output, to=onnx.TensorProto.FLOAT)
        return
    if encoded.format == "int4":
        codes = _unpack_row_pair(ops, stored["codes"], ids, rows=stored["scale_bias"].values.shape[0])
    else:
        codes = ops.node("Cast", [ops.node("Gather", [stored["codes"], ids], axis=0)], to=onnx.TensorProto.FLOAT)
    scale_bias = ops.node("Gather", [stored["scale_bias"], ids], axis=0)
    if encoded.format == "int4":
        scale_bias = ops.node("Cast", [scale_bias], to=onnx.TensorProto.FLOAT)
    scale, bias = ops.slice_last(scale_bias, 0, 1), ops.slice_last(scale_bias, 1, 2)
    ops.node("Add", [ops.node("Mul", [codes, scale]), bias], output=output)


def _unpack_row_pair(ops: "_Emitter", packed: gs.Constant, ids: gs.Tensor, rows: int) -> gs.Variable:
    """The float codes of rows `ids` from row-pair packed int4 (see the module's docstring). Ids are
    first brought into [0, rows) as Gather reads them (negative ids count from the end); ids outside
    the table, which onnxruntime rejects, read the nearest row, as the compiled index guard's clamp."""
    dtype = ids.dtype if ids.dtype is not None else np.int64
    zero, two = ops.constant("zero", np.array(0, dtype)), ops.constant("two", np.array(2, dtype))
    wrapped = ops.node("Where", [ops.node("Less", [ids, zero]), ops.node("Add", [ids, ops.constant("rows", np.array(rows, dtype))]), ids])
    row = ops.node("Clip", [wrapped, zero, ops.constant("last_row", np.array(rows - 1, dtype))])
    pair = ops.node("Div", [row, two])
    high = ops.node("Cast", [ops.node("Sub", [row, ops.node("Mul", [pair, two])])], to=onnx.TensorProto.FLOAT)
    # Multiplying by 1 or 1/16 (powers of two: exact) instead of dividing by 1 or 16 keeps a
    # division out of the per-value work.
    sixteenth, sixteen = ops.constant("sixteenth", np.array(1 / 16, np.float32)), ops.constant("sixteen", np.array(16, np.float32))
    shift = ops.node("Sub", [ops.constant("one", np.array(1, np.float32)), ops.node("Mul", [high, ops.constant("fifteen_sixteenths", np.array(15 / 16, np.float32))])])
    shift = ops.node("Unsqueeze", [shift, ops.constant("last_axis", np.array([-1], np.int64))])
    packed_rows = ops.node("Cast", [ops.node("Gather", [packed, pair], axis=0)], to=onnx.TensorProto.FLOAT)
    shifted = ops.node("Floor", [ops.node("Mul", [packed_rows, shift])])
    return ops.node("Sub", [shifted, ops.node("Mul", [ops.node("Floor", [ops.node("Mul", [shifted, sixteenth])]), sixteen])])


class _Emitter:
    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix = graph, prefix

    def node(self, op: str, inputs: list[gs.Tensor], output: gs.Variable | None = None, **attrs) -> gs.Variable:
        if output is None:
            output = gs.Variable(fresh_name(self.graph, f"{self.prefix}__{op.lower()}"))
        new_node(self.graph, op, f"{self.prefix}__{op.lower()}", inputs, [output], **attrs)
        return output

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return new_constant(self.graph, f"{self.prefix}__{base}", values)

    def slice_last(self, tensor: gs.Tensor, start: int, end: int) -> gs.Variable:
        bounds = [self.constant(role, np.array([value], np.int64)) for role, value in (("start", start), ("end", end), ("axis", -1))]
        return self.node("Slice", [tensor, *bounds])
