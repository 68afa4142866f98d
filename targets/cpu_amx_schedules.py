"""bf16 and int8 FC layers on x86 with AMX (Intel Sapphire Rapids and later): the products of
passes/fc_quantization.py run on the tile unit, tdpbf16ps (bf16 pairs into fp32) and tdpbusd
(uint8 x int8 quads into int32), 16 x 16 sums x 32 bf16 or 64 int8 inputs an instruction.

Two steps, as for the dot-product kernels (cpu_dot_schedules.py), on targets with amx-bf16 / amx-int8:
- `select_amx_matmuls` (on the imported Relax module, before legalization) replaces each
  - bf16 layer, matmul(astype(astype(x, bfloat16), float32), W) with W a constant whose values are
    bf16 numbers, by a kernel that reads the fp32 x and rounds it to bf16 itself, and W packed as
    [N/16, K/2, 16, 2] bf16;
  - int8 layer, matmul(astype(codes: uint8, int32), astype(W: constant int8, int32)), by a kernel that
    reads the codes and W packed as [N/16, K/4, 16, 4] int8; and an fc_quantization layer, whose codes
    quantize an fp32 input per row and whose int32 sums are then dequantized, whole, from its fp32
    input to its dequantized output (fc_operands.FcLayerSelector), by two kernels: one computes each
    row's scale and zero point from its max and min (fc_operands.row_parameters, one pass over the
    input), the other quantizes the input as it pads it, multiplies, and dequantizes, with the graph's
    operations in its order. (Where the kernel computed the row parameters itself and fusion put the
    graph's dequantization in its epilogue, inlining the importer's float-to-int32 Cast of the zero
    point, whose selects each repeat their operand, made an expression that took TVM's simplifier
    16 s a layer: the bundled DLRM took 95 s to build in int8, and takes 4 s.)
  that layout is AMX's for the second operand (a tile row holds 16 units x one 32-bit group of
  inputs), zero-padded to whole 64-byte rows of inputs and 16 units. Rounding or quantizing inside the
  kernel saves a kernel per layer and a pass over its input. TVM's fusion fuses the rest of the
  layer's epilogue (bias, activation) into the kernel.
- `apply_amx_schedules` (on the fused module) runs each AMX kernel parallel over 32-row tiles (the
  row-parameters kernels are cpu_dot_schedules' to schedule, as for its own int8 layers). A row
  tile's activation rows are rounded or quantized into a zero-padded copy, then one tensor intrinsic
  configures the tiles (once: ldtilecfg is costly) and, block by block of 32 units (2 x 2
  accumulator tiles, 2 activation and 2 weight tiles: AMX's 8 tile registers), runs the block's
  whole reduction in tile registers and stores its sums; the epilogue runs on the row tile's sums
  while they are in L1.

The products are exact and accumulate in fp32 (bf16; the instruction flushes denormals) or int32
(int8, exactly, as vpdpbusd), so the artifact agrees with onnxruntime's run of the rewritten graph to
the fp32 bound (bf16: accumulation order) or as the VNNI kernels do (int8).

Linux gives a process AMX's tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM), else the
first tile instruction raises SIGILL: `CPU_FLAGS` go into the artifact's manifest, and reccc.load
checks them and makes the request before it loads the library. These kernels are not auto-tuned.
"""

import functools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from reccc.targets.cpu_dot_schedules import bf16_bits, sums_and_rows_per, vectorize_columns, widened, zero_padded
from reccc.targets.fc_operands import FcLayerSelector, dequantized, select_fc_layers, uint8_code
from reccc.targets.kernel_blocks import find_block, inline_into_output, root_blocks

TILE_ROWS, TILE_BYTES = 16, 64  # the largest tile: 16 rows of 64 bytes
TILE_UNITS = TILE_BYTES // 4  # 16 fp32 / int32 sums in a row of an accumulator tile
ROW_TILES = 2  # accumulator tiles stacked along the rows of a block
MAX_COLUMN_TILES = 2  # and side by side along its units: 2 x 2 + 2 activation + 2 weight tiles = 8
BLOCK_ROWS = ROW_TILES * TILE_ROWS
AMX_BLOCK = "matmul_amx_{}"  # by product: matmul_amx_bf16, matmul_amx_int8
PAD_BLOCK = "matmul_amx_rows"
# The CPU flags (Linux /proc/cpuinfo names) an artifact with these kernels needs; amx_tile is the one
# whose state the process must request.
CPU_FLAGS = {"bf16": ("amx_tile", "amx_bf16"), "int8": ("amx_tile", "amx_int8")}


@dataclass(frozen=True)
class AmxProduct:
    """One of AMX's dot products: operand and accumulator types, inputs per 32-bit group, instruction."""

    precision: str
    activation_bits: str  # the kernel's copy of the activations: TVM would widen a bfloat16 one to fp32
    weight: str
    accumulator: str
    group: int  # inputs per 32-bit group of a tile row
    instruction: str
    feature: str  # LLVM's target feature

    @property
    def step(self) -> int:
        """Inputs one tile row of activations holds: the reduction per instruction."""
        return TILE_BYTES // (4 // self.group)


BF16 = AmxProduct("bf16", "uint16", "bfloat16", "float32", 2, "llvm.x86.tdpbf16ps", "amx-bf16")
INT8 = AmxProduct("int8", "uint8", "int8", "int32", 4, "llvm.x86.tdpbusd", "amx-int8")


def has_amx(target: tvm.target.Target, product: AmxProduct) -> bool:
    return target.kind.name == "llvm" and bool(codegen.target_has_features(["amx-tile", product.feature], target))


def _round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


def pack_weight(weight: np.ndarray, product: AmxProduct) -> np.ndarray:
    """[K, N] as [N'/16, K'/g, 16, g] (g inputs a group; K', N' rounded up to a tile row of inputs and
    to 16 units, zeros in the padding): packed[p, q, u, i] = weight[g*q + i, 16*p + u]."""
    inputs, units = weight.shape
    padded = np.zeros((_round_up(inputs, product.step), _round_up(units, TILE_UNITS)), weight.dtype)
    padded[:inputs, :units] = weight
    groups = padded.shape[0] // product.group
    return np.ascontiguousarray(padded.reshape(groups, product.group, -1, TILE_UNITS).transpose(2, 0, 3, 1))


def _column_tiles(packed_units: int) -> int:
    return MAX_COLUMN_TILES if packed_units % (MAX_COLUMN_TILES * TILE_UNITS) == 0 else 1


def _intrinsic(product: AmxProduct, inputs: int, panels: int, column_tiles: int) -> str:
    """The name of the tensor intrinsic for one row tile (BLOCK_ROWS rows, `panels` blocks of
    ROW_TILES x column_tiles accumulator tiles) over `inputs` padded inputs, registered on first use:
    its description is the row tile's reduction, its implementation the tile program (the tiles
    configured once; per block, sums loaded from the row tile's accumulators, inputs / step
    instructions per tile, sums stored back)."""
    name = f"reccc_amx_{product.precision}_{panels}x{ROW_TILES}x{column_tiles}_k{inputs}"
    try:
        TensorIntrin.get(name)
        return name
    except ValueError:
        pass
    rows, units, group = BLOCK_ROWS, panels * column_tiles * TILE_UNITS, product.group
    packed_panels, panel_units = panels * column_tiles, column_tiles * TILE_UNITS
    bits, weight, accumulator = product.activation_bits, product.weight, product.accumulator
    steps, tiles = inputs // product.step, ROW_TILES * column_tiles
    sum_bytes, row_bytes = 4, TILE_BYTES
    element = TILE_BYTES // product.step  # bytes of one activation input

    @T.prim_func(s_tir=True)
    def description(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (rows, inputs), bits, offset_factor=1)
        B = T.match_buffer(b, (packed_panels, inputs // group, TILE_UNITS, group), weight, offset_factor=1)
        C = T.match_buffer(c, (rows, units), accumulator, offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:rows, 0:units], A[0:rows, 0:inputs], B[0:packed_panels, 0:inputs // group, 0:TILE_UNITS, 0:group])
            T.writes(C[0:rows, 0:units])
            for i, j, k in T.grid(rows, units, inputs):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + widened(A[vi, vk], product.activation_bits, accumulator) * T.cast(
                        B[vj // TILE_UNITS, vk // group, vj % TILE_UNITS, vk % group], accumulator
                    )

    # Tiles: accumulators 0 .. tiles-1 (row tile r, column tile c: r * column_tiles + c), activations
    # from 4, weights from 6; every tile configured as 16 rows of 64 bytes.
    @T.prim_func(s_tir=True)
    def implementation(a: T.handle, b: T.handle, c: T.handle) -> None:
        a_stride = T.int32()
        c_stride = T.int32()
        A = T.match_buffer(a, (rows, inputs), bits, offset_factor=1, strides=[a_stride, 1])
        B = T.match_buffer(b, (packed_panels, inputs // group, TILE_UNITS, group), weight, offset_factor=1)
        C = T.match_buffer(c, (rows, units), accumulator, offset_factor=1, scope="local", strides=[c_stride, 1])
        with T.sblock("root"):
            T.reads(C[0:rows, 0:units], A[0:rows, 0:inputs], B[0:packed_panels, 0:inputs // group, 0:TILE_UNITS, 0:group])
            T.writes(C[0:rows, 0:units])
            config = T.alloc_buffer((64,), "uint8", scope="local")
            for byte in T.vectorized(64):
                config[byte] = T.uint8(0)
            config[0] = T.uint8(1)  # palette 1
            for tile in T.unroll(8):
                config[16 + 2 * tile] = T.uint8(row_bytes)  # bytes per row (little-endian u16)
                config[48 + tile] = T.uint8(TILE_ROWS)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(config[0])))
            for p in range(panels):
                for t in T.unroll(tiles):
                    T.evaluate(T.call_llvm_intrin(
                        "void", "llvm.x86.tileloadd64", T.Cast("uint8", t),
                        T.address_of(C[t // column_tiles * TILE_ROWS, p * panel_units + t % column_tiles * TILE_UNITS]),
                        T.Cast("int64", c_stride * sum_bytes),
                    ))
                for step in range(steps):
                    for r in T.unroll(ROW_TILES):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", T.Cast("uint8", 4 + r),
                            T.address_of(A[r * TILE_ROWS, step * product.step]), T.Cast("int64", a_stride * element),
                        ))
                    for u in T.unroll(column_tiles):
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", T.Cast("uint8", 6 + u),
                            T.address_of(B[p * column_tiles + u, step * TILE_ROWS, 0, 0]), T.int64(row_bytes),
                        ))
                    for t in T.unroll(tiles):
                        T.evaluate(T.call_llvm_intrin(
                            "void", product.instruction, T.Cast("uint8", t), T.Cast("uint8", 4 + t // column_tiles),
                            T.Cast("uint8", 6 + t % column_tiles),
                        ))
                for t in T.unroll(tiles):
                    T.evaluate(T.call_llvm_intrin(
                        "void", "llvm.x86.tilestored64", T.Cast("uint8", t),
                        T.address_of(C[t // column_tiles * TILE_ROWS, p * panel_units + t % column_tiles * TILE_UNITS]),
                        T.Cast("int64", c_stride * sum_bytes),
                    ))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    TensorIntrin.register(name, description, implementation)
    return name


def _amx_sums(bits_of, rows, inputs, packed: te.Tensor, product: AmxProduct) -> te.Tensor:
    """The sums of a [rows, inputs] activation operand (element (i, k) given by `bits_of`: its bits, or
    the fp32 input's code) times the weight `packed` holds, on rows padded to BLOCK_ROWS and inputs
    padded to the packed weight's (zeros, which its zero padding multiplies): [rows', units']."""
    shape = (_round_up(rows, BLOCK_ROWS), int(packed.shape[1]) * product.group)
    padded = zero_padded(bits_of, rows, inputs, shape, product.activation_bits, PAD_BLOCK)
    k = te.reduce_axis((0, shape[1]), name="k")
    group = product.group
    return te.compute(
        (shape[0], int(packed.shape[0]) * TILE_UNITS),
        lambda i, j: te.sum(
            widened(padded[i, k], product.activation_bits, product.accumulator)
            * packed[j // TILE_UNITS, k // group, j % TILE_UNITS, k % group].astype(product.accumulator),
            axis=k,
        ),
        name=AMX_BLOCK.format(product.precision),
    )


def _amx_matmul(x: te.Tensor, packed: te.Tensor, units: int, product: AmxProduct) -> te.Tensor:
    """[rows, units] sums of x (bf16: fp32, rounded to bf16 here; int8: uint8 codes) times the weight
    `packed` holds."""
    rows, inputs = x.shape
    sums = _amx_sums(bf16_bits(x) if product is BF16 else lambda i, k: x[i, k], rows, inputs, packed, product)
    return te.compute((rows, units), lambda i, j: sums[i, j], name="matmul_amx_result")


def _quantizing_amx_layer(x: te.Tensor, parameters: te.Tensor, packed: te.Tensor, column_sums: te.Tensor, weight_scales: te.Tensor) -> te.Tensor:
    """fc_quantization's int8 layer from its fp32 input x to its dequantized output (before the bias),
    given its rows' scale and zero point (`parameters`, fc_operands.row_parameters): x's codes as the
    graph computes them, their products with the weight `packed` holds, then the graph's
    dequantization (fc_operands.dequantized)."""
    rows, inputs = x.shape
    sums = _amx_sums(lambda i, k: uint8_code(x[i, k], parameters[i, 0], parameters[i, 1]), rows, inputs, packed, INT8)
    return dequantized(sums, parameters, column_sums, weight_scales, code_shift=0)


@relax.expr_functor.mutator
class _SelectAmxMatmuls(FcLayerSelector):
    """A bf16 layer's kernel rounds the fp32 x itself; an int8 layer's reads its codes, and an
    fc_quantization layer's quantizes its fp32 input itself (see FcLayerSelector)."""

    replaces_quantizing_layers = True

    def kernel_call(self, product: AmxProduct, x, weight: np.ndarray) -> relax.Expr:
        packed = relax.const(pack_weight(weight, product), product.weight)
        kernel = functools.partial(_amx_matmul, units=weight.shape[1], product=product)
        return self.builder_.call_te(kernel, x, packed, primfunc_name_hint=AMX_BLOCK.format(product.precision))

    def quantizing_int8_call(self, product: AmxProduct, x, parameters, weight: np.ndarray, column_sums: np.ndarray,
                             weight_scales: np.ndarray) -> relax.Expr:
        constants = [pack_weight(weight, product), column_sums, weight_scales]
        return self.builder_.call_te(
            _quantizing_amx_layer, x, parameters, *map(relax.const, constants), primfunc_name_hint=AMX_BLOCK.format(product.precision) + "_quantizing"
        )


def select_amx_matmuls(module: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, list[str]]:
    """The imported module with its bf16 and int8 layers as AMX kernels where the target has the
    product (see above), and the CPU flags those kernels need (none if none was selected)."""
    module, products = select_fc_layers(_SelectAmxMatmuls, module, tuple(product for product in (BF16, INT8) if has_amx(target, product)))
    return module, sorted({flag for product in products for flag in CPU_FLAGS[product.precision]})


def _amx_product(schedule: s_tir.Schedule) -> AmxProduct | None:
    """The product of the schedule's AMX kernel, None if it is no such kernel."""
    return next((product for product in (BF16, INT8) if find_block(schedule, AMX_BLOCK.format(product.precision)) is not None), None)


def is_amx_kernel(function: tirx.PrimFunc) -> bool:
    return _amx_product(s_tir.Schedule(function)) is not None


def _amx_rule(schedule: s_tir.Schedule, product: AmxProduct, lanes: int) -> None:
    """A fused AMX kernel, per row tile of BLOCK_ROWS rows: the padded activation rows, one tile program
    (tensorized) for all its sums (in a local buffer of the row tile), then its epilogue."""
    name = AMX_BLOCK.format(product.precision)
    block = schedule.get_sblock(name)
    inline_into_output(schedule, keep=(name, PAD_BLOCK))
    outputs = [b for b in root_blocks(schedule) if schedule.get(b).name_hint not in (name, PAD_BLOCK)]
    rows, columns, reduction = schedule.get_loops(block)
    column_tiles = _column_tiles(int(schedule.get(columns).extent))
    inputs = int(schedule.get(reduction).extent)
    panels = int(schedule.get(columns).extent) // (column_tiles * TILE_UNITS)
    row_tiles, row = schedule.split(rows, factors=[None, BLOCK_ROWS])
    sums_and_rows_per(schedule, block, row_tiles, outputs, PAD_BLOCK, lanes)
    schedule.parallel(row_tiles)
    init = schedule.decompose_reduction(block, row)
    vectorize_columns(schedule, schedule.get_loops(init)[-1], lanes)
    schedule.tensorize(row, _intrinsic(product, inputs, panels, column_tiles))


def apply_amx_schedules(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The AMX kernels scheduled (see above); the other kernels are left to the other rules."""
    if not any(has_amx(target, product) for product in (BF16, INT8)):
        return module
    lanes = 16
    updates = {}
    for symbol, function in module.functions.items():
        if not isinstance(function, tirx.PrimFunc):
            continue
        schedule = s_tir.Schedule(function)
        product = _amx_product(schedule)
        if product is not None:
            _amx_rule(schedule, product, lanes)
            updates[symbol] = schedule.mod["main"]
    for symbol, function in updates.items():
        module[symbol] = function
    return module
