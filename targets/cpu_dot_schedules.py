"""FC layers on the CPUs' vector dot-product instructions, for the layers of passes/fc_quantization.py
that AMX (cpu_amx_schedules.py) did not take:
- x86 with AVX-512: int8 on VNNI's vpdpbusd (16 int32 sums, each of 4 uint8 x int8 products: 64
  multiply-adds an instruction), bf16 on AVX512-BF16's vdpbf16ps (16 fp32 sums, each of 2 bf16
  products: 32);
- aarch64: int8 on the dot-product extension's sdot (4 int32 sums, each of 4 int8 x int8 products:
  16), bf16 on the BF16 extension's bfdot (4 fp32 sums, each of 2 bf16 products: 8).
With their int8 layers' quantization of their inputs.

TVM's importer widens both MatMulInteger operands to int32 (an int32 x int32 loop: vpmulld, slower
than fp32 FMAs), and its BF16 legalization drops the activations' rounding and computes the bf16
layers with fp32 activations and the weight widened to fp32 (no faster than fp32). Two steps replace
both:
- `select_dot_matmuls` (on the imported Relax module, before legalization) replaces each
  - int8 layer, matmul(astype(x: uint8, int32), astype(W: constant int8, int32)), by a kernel that
    reads the uint8 codes as they are;
  - bf16 layer, matmul(astype(astype(x, bfloat16), float32), W) with W a constant of bf16 numbers, by
    a kernel that reads the fp32 x and rounds it to bf16 itself (to nearest even, as onnxruntime's
    Cast);
  with W packed as [N/u, K/g, u, g] (u units x g inputs per vector register, u = 16 (AVX-512) or 4
  (NEON), g = 4 int8 or 2 bf16: the instruction's second operand), zero-padded to whole blocks and
  to the register tile's columns. sdot multiplies signed bytes only: its kernel reads each code c as
  the int8 c - 128 (its top bit flipped) and adds 128 x the unit's weight sum back to the sums, which
  is exact. TVM's fusion then fuses the layer's epilogue (bias, activation) into the kernel, as it
  does for a matmul. An fc_quantization layer, whose codes quantize an fp32 input per row and whose
  int32 sums are then dequantized, is replaced whole, from its fp32 input to its dequantized output
  (fc_operands.FcLayerSelector), by two kernels instead of the graph's seven (max, min, three per-row
  kernels of scale and zero point, the codes, the product): one computes each row's scale and zero
  point from its max and min (fc_operands.row_parameters), the other the input's codes, then the
  product, dequantized in its epilogue, with the graph's operations in its order. (The DLRM-style
  and DeepFM-style int8 models ran 14% to 20% faster at batch 1, 64 and 2048 on an AVX-512 VNNI
  core; in the epilogue the importer's Cast of the zero point to int32 had made the bundled DLRM's
  build take 12 s instead of 4.)
- `apply_dot_schedules` (on the fused module, before the default CPU rules) tensorizes those kernels
  in the fp32 matmuls' register tile (cpu_schedules.default_tile: 4 rows x 3-6 vectors of units),
  one parallel loop over (column panel, row tile) so each thread keeps a panel's weights in
  L1, the tile's activation rows copied (bf16: rounded) into a zero-padded tile, and the epilogue
  computed per tile while its sums are in registers; an fc_quantization layer's kernel writes its
  input's codes first, vectorized along the rows and parallel over them (computed per tile instead,
  once per column panel, they made the models up to 20% slower at batch 2048; single-threaded, 6% to
  11% slower at 2048, 2 to 5 us faster at batch 1). The row-parameters kernels (these layers' and
  AMX's) are parallel over the rows, each row's max and min a vector reduction in the target's lanes
  (max and min are exact in any order, so the codes stay those onnxruntime computes): the int8
  DLRM-style model 12% faster at batch 2048 than with them single-threaded, the DeepFM-style one 7%.
  A kernel whose parallel loops run little work runs on the calling thread instead, below a number
  of rows it branches on (cpu_schedules.serial_below_min_work, as for the fp32 kernels): the int8
  DLRM-style model 17% faster at batch 1 and 5% at 64, the DeepFM-style one 11% at batch 1.
The products are exact and accumulate in int32 (vpdpbusd, unlike vpdpbusds, does not saturate: each
uint8 x int8 product fits 16 bits; so does sdot) or in fp32 (vdpbf16ps and bfdot flush denormal
inputs and results and may round a pair's sum otherwise than two fp32 additions), so the artifact agrees
with onnxruntime's run of the rewritten graph exactly (int8) or to the fp32 bound of the summation
order (bf16).

TVM's own VNNI intrinsic (tvm.s_tir.tensor_intrin.x86) passes the operands as <16 x i32>, which the
LLVM in TVM 0.27 rejects (vpdpbusd.512 takes <64 x i8> there), so this module registers its own.
vdpbf16ps and bfdot take <32 x bfloat> / <8 x bfloat> operands, which TIR cannot express (TVM's BF16
legalization turns every bfloat16 value into fp32 or uint16 before code generation), so their
intrinsics call an LLVM function that bitcasts i32 vectors to bfloat ones, linked into the kernel's
module (`pragma_import_llvm`) and inlined there.
"""

import functools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from reccc.targets.cpu_schedules import default_tile, serial_below_min_work, total_parallel_work, vector_lanes, vectorized_reduction
from reccc.targets.fc_operands import (
    ROW_PARAMETERS, ROW_STAGE, FcLayerSelector, dequantized, select_fc_layers, shifted, shifted_codes_correction, uint8_code,
)
from reccc.targets.kernel_blocks import find_block, inline_into_output, root_blocks

DOT_BLOCK = "matmul_dot_{}"  # by product: matmul_dot_int8, matmul_dot_bf16
PAD_BLOCK = "matmul_dot_rows"
CODES_BLOCK = "matmul_dot_codes"  # an fc_quantization layer's kernel's codes of its input


@dataclass(frozen=True)
class DotProduct:
    """A vector dot-product instruction: the FC precision it serves, the kernel's operand types (the
    bf16 ones as their bits, which TVM leaves alone), the accumulator, inputs per 32-bit group, sums
    per instruction (one vector register of them), the tensor intrinsic's name, the instruction's
    LLVM intrinsic, LLVM's target feature."""

    precision: str
    activation: str
    weight: str
    accumulator: str
    group: int
    units: int
    intrinsic: str
    instruction: str
    feature: str

    @property
    def block(self) -> str:
        return DOT_BLOCK.format(self.precision)

    @property
    def shifts_codes(self) -> bool:
        """Whether the instruction takes the uint8 codes as signed bytes (code - 128)."""
        return self.activation == "int8"


VNNI = DotProduct("int8", "uint8", "int8", "int32", 4, 16, "reccc_dot_16x4_u8i8i32_vnni", "llvm.x86.avx512.vpdpbusd.512", "avx512vnni")
AVX512_BF16 = DotProduct("bf16", "uint16", "uint16", "float32", 2, 16, "reccc_dot_16x2_bf16f32_avx512",
                         "llvm.x86.avx512bf16.dpbf16ps.512", "avx512bf16")
NEON_SDOT = DotProduct("int8", "int8", "int8", "int32", 4, 4, "reccc_dot_4x4_i8i8i32_sdot", "llvm.aarch64.neon.sdot.v4i32.v16i8", "dotprod")
NEON_BFDOT = DotProduct("bf16", "uint16", "uint16", "float32", 2, 4, "reccc_dot_4x2_bf16f32_bfdot", "llvm.aarch64.neon.bfdot.v4f32.v8bf16", "bf16")
PRODUCTS = (VNNI, AVX512_BF16, NEON_SDOT, NEON_BFDOT)


def widened(value, dtype: str, accumulator: str):
    """A `dtype` operand element (bf16: its uint16 bits) as the accumulator's type."""
    if dtype == "uint16":
        value = tirx.reinterpret("bfloat16", value)
    return value.astype(accumulator)


def _description(product: DotProduct):
    """The instruction's computation, with the accumulators in a local buffer: the kernel keeps its
    tile of sums there across the reduction."""
    group, units, activation, weight, accumulator = product.group, product.units, product.activation, product.weight, product.accumulator

    @T.prim_func(s_tir=True)
    def description(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (group,), activation, offset_factor=1)
        B = T.match_buffer(b, (units, group), weight, offset_factor=1)
        C = T.match_buffer(c, (units,), accumulator, offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:units], A[0:group], B[0:units, 0:group])
            T.writes(C[0:units])
            for i, k in T.grid(units, group):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + widened(A[vk], activation, accumulator) * widened(B[vi, vk], weight, accumulator)

    return description


def _int8_dot(product: DotProduct):
    """The implementation of an int8 product: the broadcast quad of activation bytes and the weights as
    byte vectors, into the instruction (TVM's own VNNI intrinsic passes <16 x i32>, which TVM 0.27's
    LLVM rejects)."""
    units, activation = product.units, product.activation
    quads, sums, bytes_ = f"{activation}x4", f"int32x{units}", f"int8x{4 * units}"

    @T.prim_func(s_tir=True)
    def implementation(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), activation, offset_factor=1)
        B = T.match_buffer(b, (units, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (units,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:units], A[0:4], B[0:units, 0:4])
            T.writes(C[0:units])
            four = T.reinterpret(A.vload([0], quads), dtype="int32")
            C[T.ramp(T.int32(0), 1, units)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(product.instruction),
                C.vload([0], dtype=sums),
                T.reinterpret(T.broadcast(four, units), dtype=bytes_),  # LLVM's operand type, whatever A's sign
                B.vload([0, 0], dtype=bytes_),
                dtype=sums,
            )

    return implementation


def _bf16_dot_llvm(function: str, intrinsic: str, sums: int) -> str:
    """LLVM IR of `function`: the bf16 dot-product `intrinsic` on `sums` fp32 sums, with its bf16
    operands passed as i32 vectors (pairs of bf16)."""
    wide, pairs, bf16 = f"<{sums} x float>", f"<{sums} x i32>", f"<{2 * sums} x bfloat>"
    return f"""
declare {wide} @{intrinsic}({wide}, {bf16}, {bf16})
define linkonce_odr {wide} @{function}({wide} %sums, {pairs} %a, {pairs} %b) alwaysinline {{
  %activations = bitcast {pairs} %a to {bf16}
  %weights = bitcast {pairs} %b to {bf16}
  %result = call {wide} @{intrinsic}({wide} %sums, {bf16} %activations, {bf16} %weights)
  ret {wide} %result
}}
"""


def _bf16_dot(product: DotProduct):
    """The implementation of a bf16 product: the broadcast pair of activations and the weights, as i32
    vectors, through the LLVM function (see the module's docstring)."""
    units = product.units
    function = f"{product.intrinsic}_llvm"
    llvm_ir = _bf16_dot_llvm(function, product.instruction, units)
    sums, pairs = f"float32x{units}", f"int32x{units}"

    @T.prim_func(s_tir=True)
    def implementation(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "uint16", offset_factor=1)
        B = T.match_buffer(b, (units, 2), "uint16", offset_factor=1)
        C = T.match_buffer(c, (units,), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:units], A[0:2], B[0:units, 0:2])
            T.writes(C[0:units])
            with T.attr(0, "pragma_import_llvm", llvm_ir):
                pair = T.reinterpret(A.vload([0], "uint16x2"), dtype="int32")
                C[T.ramp(T.int32(0), 1, units)] = T.call_pure_extern(
                    sums, function, C.vload([0], dtype=sums), T.broadcast(pair, units),
                    T.reinterpret(B.vload([0, 0], dtype=f"uint16x{2 * units}"), dtype=pairs),
                )

    return implementation


def tensor_intrinsic(product: DotProduct) -> str:
    """The name of the product's tensor intrinsic, registered on first use (parsing its TVMScript takes
    about 0.1 s, which a build for a target without the product should not pay at import)."""
    try:
        TensorIntrin.get(product.intrinsic)
    except ValueError:
        implementation = _bf16_dot(product) if product.precision == "bf16" else _int8_dot(product)
        TensorIntrin.register(product.intrinsic, _description(product), implementation)
    return product.intrinsic


def has_dot_product(target: tvm.target.Target, product: DotProduct) -> bool:
    return target.kind.name == "llvm" and bool(codegen.target_has_features(product.feature, target))


def _round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


def pack_weight(weight: np.ndarray, product: DotProduct) -> np.ndarray:
    """[K, N] (int8, or bf16 as its uint16 bits) as [N'/u, K'/g, u, g] (u the product's units, g its
    group), with K' rounded up to g and N' to whole register tiles of units, zeros in the padding:
    packed[p, q, v, i] = weight[g*q + i, u*p + v]."""
    inputs, units = weight.shape
    group, lanes = product.group, product.units
    padded = np.zeros((_round_up(inputs, group), _round_up(units, default_tile(units, lanes).vectors * lanes)), weight.dtype)
    padded[:inputs, :units] = weight
    return np.ascontiguousarray(padded.reshape(-1, group, padded.shape[1] // lanes, lanes).transpose(2, 0, 3, 1))


def bf16_bits(x: te.Tensor):
    """(i, k) -> the bits of x[i, k] rounded to bfloat16 to nearest even, as onnxruntime's Cast rounds
    (a NaN stays a NaN). Written out: TVM's BF16 legalization would keep the fp32 value."""

    def bits_of(i, k):
        bits = tirx.reinterpret("uint32", x[i, k])
        rounded = (bits + (tirx.const(0x7FFF, "uint32") + ((bits >> 16) & tirx.const(1, "uint32")))) >> 16
        return tirx.Select(x[i, k] != x[i, k], (bits >> 16) | tirx.const(0x40, "uint32"), rounded).astype("uint16")

    return bits_of


def zero_padded(bits_of, rows, inputs, shape: tuple[int, int], dtype: str, name: str) -> te.Tensor:
    """A [rows, inputs] operand, element (i, k) given by `bits_of`, zero-padded to `shape`."""
    zero = tirx.const(0, dtype)

    def element(i, k):
        if int(inputs) == shape[1]:
            return bits_of(i, k)
        # A select of an in-bounds read, not an if_then_else: TVM vectorizes the loop only so.
        return tirx.Select(k < inputs, bits_of(i, tirx.min(k, inputs - 1)), zero)

    return te.compute(shape, lambda i, k: tirx.if_then_else(i < rows, element(i, k), zero), name=name)


def _activation_bits(x: te.Tensor, product: DotProduct):
    """(i, k) -> the product's activation operand for x[i, k]: the fp32 x rounded to bf16, the uint8
    code as it is, or the code as the signed byte code - 128 (its top bit flipped)."""
    if product.precision == "bf16":
        return bf16_bits(x)
    if product.shifts_codes:
        return lambda i, k: shifted(x[i, k])
    return lambda i, k: x[i, k]


def _dot_sums(x: te.Tensor, packed: te.Tensor, units: int, product: DotProduct) -> te.Tensor:
    """The sums of x (uint8 codes, or fp32 rounded to bf16 here) times the weight `packed` holds (of
    the codes less 128 where the product shifts them), on rows padded to the register tile and inputs
    padded to the group (zeros, which the weight's zero padding multiplies), so the tensorized loops
    need no bounds checks: [rows', units']."""
    rows, inputs = x.shape
    group, lanes = product.group, product.units
    shape = (_round_up(rows, default_tile(units, lanes).rows), int(packed.shape[1]) * group)
    padded = zero_padded(_activation_bits(x, product), rows, inputs, shape, product.activation, PAD_BLOCK)
    k = te.reduce_axis((0, shape[1]), name="k")
    accumulator = product.accumulator
    return te.compute(
        (shape[0], int(packed.shape[0]) * lanes),
        lambda i, j: te.sum(
            widened(padded[i, k], product.activation, accumulator)
            * widened(packed[j // lanes, k // group, j % lanes, k % group], product.weight, accumulator),
            axis=k,
        ),
        name=product.block,
    )


def _dot_matmul(x: te.Tensor, packed: te.Tensor, *correction: te.Tensor, units: int, product: DotProduct) -> te.Tensor:
    """[rows, units] sums of x times the weight `packed` holds, plus `correction` per unit where the
    product shifts the codes."""
    sums = _dot_sums(x, packed, units, product)
    return te.compute((x.shape[0], units), lambda i, j: sums[i, j] + correction[0][j] if correction else sums[i, j], name="matmul_dot_result")


def _quantizing_dot_layer(x: te.Tensor, parameters: te.Tensor, packed: te.Tensor, column_sums: te.Tensor, weight_scales: te.Tensor,
                          units: int, product: DotProduct) -> te.Tensor:
    """fc_quantization's int8 layer from its fp32 input x to its dequantized output (before the bias),
    given its rows' scale and zero point (`parameters`, fc_operands.row_parameters): x's codes as the
    graph computes them (CODES_BLOCK), their products with the weight `packed` holds, then the
    graph's dequantization (fc_operands.dequantized)."""
    codes = te.compute(x.shape, lambda i, k: uint8_code(x[i, k], parameters[i, 0], parameters[i, 1]), name=CODES_BLOCK)
    sums = _dot_sums(codes, packed, units, product)
    return dequantized(sums, parameters, column_sums, weight_scales, code_shift=128 if product.shifts_codes else 0)


@relax.expr_functor.mutator
class _SelectDotMatmuls(FcLayerSelector):
    replaces_quantizing_layers = True

    def kernel_call(self, product: DotProduct, x, weight: np.ndarray) -> relax.Expr:
        bits = weight.view(np.uint16) if product.precision == "bf16" else weight
        constants = [relax.const(pack_weight(bits, product), product.weight)]
        if product.shifts_codes:
            constants.append(relax.const(shifted_codes_correction(weight), "int32"))
        kernel = functools.partial(_dot_matmul, units=weight.shape[1], product=product)
        return self.builder_.call_te(kernel, x, *constants, primfunc_name_hint=product.block)

    def quantizing_int8_call(self, product: DotProduct, x, parameters, weight: np.ndarray, column_sums: np.ndarray,
                             weight_scales: np.ndarray) -> relax.Expr:
        constants = [pack_weight(weight, product), column_sums, weight_scales]
        kernel = functools.partial(_quantizing_dot_layer, units=weight.shape[1], product=product)
        return self.builder_.call_te(kernel, x, parameters, *map(relax.const, constants), primfunc_name_hint=product.block + "_quantizing")


def target_products(target: tvm.target.Target) -> tuple[DotProduct, ...]:
    """The dot products `target` has."""
    return tuple(product for product in PRODUCTS if has_dot_product(target, product))


def select_dot_matmuls(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The imported module with its int8 and bf16 layers as dot-product kernels where the target has the
    instruction (see above); unchanged on a target with neither."""
    return select_fc_layers(_SelectDotMatmuls, module, target_products(target))[0]


def sums_and_rows_per(schedule: s_tir.Schedule, block, loop, outputs: list, pad_block: str, lanes: int) -> None:
    """`block`'s sums kept in a local buffer that the epilogue (`outputs`) reads, and the epilogue and
    the padded activation rows (`pad_block`) computed per iteration of `loop`, vectorized along their
    rows: each tile's rows are padded (rounded, quantized) just before its product and its sums leave
    through the epilogue while in registers or L1."""
    schedule.compute_inline(schedule.cache_write(block, 0, "local"))
    for output in outputs:
        schedule.reverse_compute_at(output, loop)
        vectorize_columns(schedule, schedule.get_loops(output)[-1], lanes)
    pad = schedule.get_sblock(pad_block)
    schedule.compute_at(pad, loop)
    vectorize_columns(schedule, schedule.get_loops(pad)[-1], lanes)


def vectorize_columns(schedule: s_tir.Schedule, loop, lanes: int) -> None:
    extent = schedule.get(loop).extent
    if isinstance(extent, tirx.IntImm):
        width = next((w for w in (lanes, lanes // 2, lanes // 4) if w > 1 and int(extent) % w == 0), None)
        if width is not None:
            _, vector = schedule.split(loop, factors=[None, width])
            schedule.vectorize(vector)


def _dot_product(schedule: s_tir.Schedule, products: tuple[DotProduct, ...]) -> tuple[DotProduct, s_tir.schedule.SBlockRV] | None:
    """The product (of `products`, the target's) and block of the schedule's dot-product kernel, None
    if it is no such kernel."""
    return next(((product, block) for product in products if (block := find_block(schedule, product.block)) is not None), None)


def _dot_rule(schedule: s_tir.Schedule, parallel: bool, lanes: int, products: tuple[DotProduct, ...]) -> bool:
    """A fused dot-product kernel: a register tile of accumulators (default_tile) kept in a local
    buffer across the reduction, tensorized with the product's instruction; the padded (rounded)
    activation rows and the epilogue of each tile computed inside the tile's loop, while its sums are
    in registers. Its loops over rows and tiles `parallel` or not."""
    found = _dot_product(schedule, products)
    if found is None:
        return False
    product, block = found
    stages = (product.block, PAD_BLOCK, CODES_BLOCK)
    inline_into_output(schedule, keep=stages)
    outputs = [b for b in root_blocks(schedule) if schedule.get(b).name_hint not in stages]
    codes = find_block(schedule, CODES_BLOCK)
    if codes is not None:  # an fc_quantization layer's kernel: its input's codes first, parallel over the rows
        vectorize_columns(schedule, schedule.get_loops(codes)[-1], lanes)
        if parallel:
            schedule.parallel(schedule.get_loops(codes)[0])
    rows, columns, reduction = schedule.get_loops(block)
    # The packed weight's units are whole tiles of the layer's own tile (see pack_weight), and so that
    # tile is also theirs.
    tile = default_tile(int(schedule.get(columns).extent), product.units)
    row_tiles, row = schedule.split(rows, factors=[None, tile.rows])
    panels, vector, unit = schedule.split(columns, factors=[None, tile.vectors, product.units])
    steps, group = schedule.split(reduction, factors=[None, product.group])
    schedule.reorder(panels, row_tiles, steps, row, vector, unit, group)
    # One parallel loop over (panel, row tile), panel-major: each thread takes a contiguous range, so
    # it runs a panel's weights (K x 64 bytes a vector) over many row tiles while they stay in L1.
    tiles = schedule.fuse(panels, row_tiles)
    sums_and_rows_per(schedule, block, tiles, outputs, PAD_BLOCK, lanes)
    if parallel:
        schedule.parallel(tiles)  # before tensorize: the tensorized update is no longer a reduction block
    init = schedule.decompose_reduction(block, steps)
    schedule.vectorize(schedule.get_loops(init)[-1])
    schedule.tensorize(unit, tensor_intrinsic(product))
    schedule.unroll(row)
    schedule.unroll(vector)
    return True


def _row_parameters_rule(schedule: s_tir.Schedule, parallel: bool, lanes: int) -> bool:
    """The kernel of an int8 layer's row quantization parameters (fc_operands.row_parameters; AMX's
    layers' and these), row by row, the rows `parallel` or not: the row's max and min, each a
    vectorized reduction (cpu_schedules.vectorized_reduction), then its scale and zero point. (Their buffers stay
    global: in `local` scope, the int8 DLRM-style model's parallel ones took 0.16 instead of 0.04 ms
    for a 2048 x 64 input, slower than one thread.)"""
    output = find_block(schedule, ROW_PARAMETERS)
    if output is None:
        return False
    inline_into_output(schedule, keep=(ROW_PARAMETERS,))
    rows = schedule.get_loops(output)[0]
    if parallel:
        schedule.parallel(rows)  # before the reductions come under it: parallel refuses a decomposed one
    for name in ("min", "max"):
        reduction = schedule.get_sblock(ROW_STAGE + name)
        if not vectorized_reduction(schedule, reduction, lanes, at=rows):
            schedule.compute_at(reduction, rows)
    return True


def apply_dot_schedules(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The dot-product kernels and the kernels of the int8 layers' row quantization parameters (these
    layers' and AMX's) scheduled (see above), those of little work on the calling thread
    (cpu_schedules.serial_below_min_work, counting every parallel loop of a kernel); the other
    kernels are left to the default CPU rules."""
    products = target_products(target)
    lanes = vector_lanes(target)
    updates = {}
    for symbol, function in module.functions.items():
        if not isinstance(function, tirx.PrimFunc):
            continue
        rules = [functools.partial(_row_parameters_rule, lanes=lanes)]
        if products:
            rules.append(functools.partial(_dot_rule, lanes=lanes, products=products))
        for rule in rules:
            scheduled = serial_below_min_work(
                function,
                lambda parallel, _rows, function=function, rule=rule: _scheduled(function, functools.partial(rule, parallel=parallel)),
                total_parallel_work,
            )
            if scheduled is not None:
                break
        if scheduled is not None:
            updates[symbol] = scheduled
    for symbol, function in updates.items():
        module[symbol] = function
    return module


def _scheduled(function: tirx.PrimFunc, rule) -> tirx.PrimFunc | None:
    """`function` scheduled by `rule` (schedule -> whether it applies), None where it does not."""
    schedule = s_tir.Schedule(function)
    try:
        return schedule.mod["main"] if rule(schedule) else None
    except s_tir.ScheduleError:  # the kernel does not have the rule's form after all
        return None
