"""FC layers of passes/fc_quantization.py on NVIDIA tensor cores, through CUDA's warp matrix functions
(wmma, 16 x 16 x 16 tiles), from -O2 on:
- int8 layers on the integer tensor cores (IMMA; int8 wmma needs sm_72, every named arch has it):
  int8 x int8 products summed in int32;
- bf16 layers on the bf16 ones (HMMA.BF16; sm_80 and later): bf16 x bf16 products summed in fp32.

TVM's importer widens both MatMulInteger operands to int32, and a bf16 layer is an fp32 matmul of
widened operands: dlight then schedules both as CUDA-core loops (IMAD, FFMA). Two steps replace them:
- `select_tensor_core_matmuls` (on the imported Relax module, before legalization) replaces each
  - int8 layer, matmul(astype(codes: uint8, int32), astype(W: constant int8, int32)), by a kernel
    that takes each uint8 code c as the int8 c - 128 (its top bit flipped: the tensor cores' int8
    wmma multiplies two signed operands) and adds 128 x each unit's weight sum back, which is exact.
    An fc_quantization layer, whose codes quantize an fp32 input per row and whose int32 sums are
    then dequantized (FcOperands.dequantized_int8_layer), is replaced whole, from its fp32 input to
    its dequantized output, by two kernels instead of the graph's seven (launches dominate GPU time
    at these sizes): one computes each row's scale and zero point from its max and min (a warp a
    row: RowParameters), the other quantizes the input as it copies it into shared memory, multiplies
    on the tensor cores and dequantizes on the way out, with the graph's operations in its order.
    (In one kernel, the dequantizing epilogue would read per-row values computed in the kernel,
    which TVM's reverse_compute_inline refuses and compute_at / reverse_compute_at cannot order.)
  - bf16 layer, matmul(astype(astype(x, bfloat16), float32), W) with W a constant of bf16 numbers,
    by a kernel that reads the fp32 x and rounds it to bf16 itself (to nearest even, as onnxruntime's
    Cast);
  with the weight stored transposed, [units, inputs] (int8, or bf16 as its uint16 bits): wmma's
  column-major B operand, so each unit's inputs are contiguous. TVM's fusion then fuses the layer's
  epilogue (the rest of the dequantization, bias, activation) into the kernel, as for a matmul.
- `TensorCoreFc`, a dlight rule tried before dlight's own, schedules those kernels: each thread block
  computes a tile of rows x units in warps of 16 x 16 fragments; per step of 64 (int8) or 32 (bf16) inputs,
  the block's threads copy the tile's activation rows (int8: shifted; bf16: rounded) and weight rows into
  shared memory, zero-padded to whole tiles (a batch of 1 runs as 32 rows), the warps load them into
  fragments and multiply-accumulate; the sums leave through dynamic shared memory (in static shared
  memory beside the operand tiles, TVM 0.27 may merge a bf16 and an fp32 buffer and fail in
  LowerIntrin), the epilogue computed on the way to the output.
The int8 products are exact and their int32 sums too, so an int8 layer agrees with onnxruntime's run
of the rewritten graph bit for bit before its fp32 epilogue; bf16 products are exact in fp32 and
summed in fp32 in the tensor core's order (the fp32 bound of the summation order).

dlight has tensor-core rules for fp16 and int8 (none for bf16), padding every layer to 128 x 128
tiles; its int8 one also fails to build in TVM 0.27 (InjectSoftwarePipeline: GetWmmaFragmentSize
finds no fragment info for the pipelined shared-memory copies), so this rule does not pipeline.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir import TensorIntrin, dlight
from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers

from reccc.targets.fc_operands import (
    ROW_PARAMETERS, ROW_STAGE, FcLayerSelector, dequantized, select_fc_layers, shifted, shifted_codes_correction, uint8_code,
)
from reccc.targets.kernel_blocks import find_block, inline_into_output

FRAGMENT = 16  # wmma's m, n and k
ACTIVATIONS, WEIGHTS = "tensor_core_activations", "tensor_core_weights"  # the operands' stages
ROWS_PER_BLOCK = 8  # rows a thread block reduces, a warp each (RowParameters; gpu_schedules.RowReduction)
WARP = 32
COPY_LANES = 4  # the most elements per vector load and store of the operands' copies into shared memory


@dataclass(frozen=True)
class TensorCoreProduct:
    """A tensor-core product: the FC precision it serves, its operands' type, its sums' type, the
    least SM version with it, TVM's names for its operands and sums in wmma intrinsics, and the
    operand tiles in shared memory: inputs per step, elements padding each row, whether a step is
    stored as panels of 16 inputs ([input // 16][row][input % 16]). wmma needs every fragment to
    start 32-byte aligned and rows a multiple of 16 bytes apart: bf16 steps of 32 inputs (fragments
    at bytes 0 and 32 of a row) in rows padded by 8 elements (80 bytes apart: the loads of
    consecutive rows start in other banks); int8 steps of 64 inputs in panels (a fragment is 16
    bytes wide, so in plain rows every other one would start misaligned; in a panel its 16 rows are
    contiguous). Each step ends in a barrier, which the kernel waits on with nothing in flight (it
    does not pipeline): on an H200 the standard DLRM took 0.19 / 0.22 ms at batch 64 / 2048 in
    64-input steps, 0.21 / 0.23 in 128-input ones and 0.21 / 0.24 in 16-input ones."""

    precision: str
    operand: str
    accumulator: str
    min_sm: int
    operand_name: str
    accumulator_name: str
    inputs_per_step: int
    row_padding: int
    panels: bool

    @property
    def block(self) -> str:
        return f"matmul_tensor_core_{self.precision}"

    def intrinsics(self) -> dict[str, str]:
        """The wmma intrinsics' names (A row-major, B column-major, both from shared memory; the sums
        stored to shared memory), registered on first use."""
        # Imported here: importing TVM's tensor intrinsics parses every target's (about 15 s), which
        # only a build with tensor-core layers needs, not every process that imports the targets.
        from tvm.s_tir.tensor_intrin import cuda as cuda_intrinsics

        names = {
            "load_a": f"wmma_load_16x16x16_{self.operand_name}_a_shared",
            "load_b": f"wmma_load_16x16x16_{self.operand_name}_b_trans_shared",
            "compute": f"wmma_sync_16x16x16_{self.operand_name}{self.operand_name}{self.accumulator_name}_trans",
            "init": f"wmma_fill_16x16x16_{self.accumulator_name}",
            "store": f"wmma_store_16x16x16_{self.accumulator_name}_shared_dyn",
        }
        generators = {
            "load_a": lambda: cuda_intrinsics.get_wmma_load_intrin(16, 16, 16, self.operand, "shared", False, False),
            "load_b": lambda: cuda_intrinsics.get_wmma_load_intrin(16, 16, 16, self.operand, "shared", True, True),
            "compute": lambda: cuda_intrinsics.get_wmma_sync_intrin(16, 16, 16, self.operand, self.accumulator, True),
        }
        for role, name in names.items():
            try:
                TensorIntrin.get(name)
            except ValueError:  # TVM registers int8's and the fills and stores; bf16's operands are new
                TensorIntrin.register(name, *generators[role]())
        return names


INT8 = TensorCoreProduct("int8", "int8", "int32", 72, "s8", "s32", inputs_per_step=64, row_padding=0, panels=True)
BF16 = TensorCoreProduct("bf16", "bfloat16", "float32", 80, "bf16", "f32", inputs_per_step=32, row_padding=8, panels=False)
PRODUCTS = (INT8, BF16)


def sm_version(target: tvm.target.Target) -> int:
    """The target's SM version (sm_90a -> 90), 0 for a target that is not CUDA."""
    if target.kind.name != "cuda":
        return 0
    return int("".join(ch for ch in str(target.attrs["arch"]).removeprefix("sm_") if ch.isdigit()))


def target_products(target: tvm.target.Target) -> tuple[TensorCoreProduct, ...]:
    return tuple(product for product in PRODUCTS if sm_version(target) >= product.min_sm)


def _tensor_core_sums(operand, rows, inputs, weight: te.Tensor, product: TensorCoreProduct) -> te.Tensor:
    """[rows, units] sums of the activation operand ((i, k) -> value, staged as ACTIVATIONS) times
    `weight` ([units, inputs]: int8, or bf16's uint16 bits), on the tensor cores (`product.block`)."""
    units = weight.shape[0]
    activations = te.compute((rows, inputs), operand, name=ACTIVATIONS)
    weights = te.compute((units, inputs), lambda j, k: tirx.reinterpret(product.operand, weight[j, k]), name=WEIGHTS)
    k = te.reduce_axis((0, inputs), name="k")
    accumulator = product.accumulator
    return te.compute(
        (rows, units),
        lambda i, j: te.sum(activations[i, k].astype(accumulator) * weights[j, k].astype(accumulator), axis=k),
        name=product.block,
    )


def _tensor_core_matmul(x: te.Tensor, weight: te.Tensor, *correction: te.Tensor, product: TensorCoreProduct) -> te.Tensor:
    """The layer's matmul: bf16, the fp32 x rounded to bf16 (TVM's cast rounds to nearest even, as
    onnxruntime's Cast); int8, uint8 codes x as they are, shifted, and `correction` added back per unit."""
    rows, inputs = x.shape
    if product.precision == "bf16":
        return _tensor_core_sums(lambda i, k: x[i, k].astype("bfloat16"), rows, inputs, weight, product)
    sums = _tensor_core_sums(lambda i, k: shifted(x[i, k]), rows, inputs, weight, product)
    return te.compute((rows, weight.shape[0]), lambda i, j: sums[i, j] + correction[0][j], name="tensor_core_corrected")


def _quantizing_int8_layer(x: te.Tensor, parameters: te.Tensor, weight: te.Tensor, column_sums: te.Tensor, weight_scales: te.Tensor) -> te.Tensor:
    """fc_quantization's int8 layer from its fp32 input x to its dequantized output (before the bias),
    given its rows' scale and zero point (`parameters`, fc_operands.row_parameters): x's codes as the
    graph computes them, shifted, their products with `weight` ([units, inputs]) on the tensor cores,
    then the graph's dequantization (fc_operands.dequantized)."""
    rows, inputs = x.shape
    sums = _tensor_core_sums(lambda i, k: shifted(uint8_code(x[i, k], parameters[i, 0], parameters[i, 1])), rows, inputs, weight, INT8)
    return dequantized(sums, parameters, column_sums, weight_scales, code_shift=128)


@relax.expr_functor.mutator
class _SelectTensorCoreMatmuls(FcLayerSelector):
    replaces_quantizing_layers = True

    def quantizing_int8_call(self, product: TensorCoreProduct, x, parameters, weight: np.ndarray, column_sums: np.ndarray,
                             weight_scales: np.ndarray) -> relax.Expr:
        constants = [np.ascontiguousarray(weight.T), column_sums, weight_scales]
        return self.builder_.call_te(
            _quantizing_int8_layer, x, parameters, *map(relax.const, constants), primfunc_name_hint=f"{product.block}_quantizing"
        )

    def kernel_call(self, product: TensorCoreProduct, x, weight: np.ndarray) -> relax.Expr:
        if product.precision == "bf16":
            constants = [relax.const(np.ascontiguousarray(weight.view(np.uint16).T), "uint16")]
        else:
            constants = [relax.const(np.ascontiguousarray(weight.T), "int8"), relax.const(shifted_codes_correction(weight), "int32")]
        kernel = functools.partial(_tensor_core_matmul, product=product)
        return self.builder_.call_te(kernel, x, *constants, primfunc_name_hint=product.block)


def select_tensor_core_matmuls(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The imported module with its int8 and bf16 layers as tensor-core kernels where the target's SM
    has the product (see above); unchanged otherwise."""
    return select_fc_layers(_SelectTensorCoreMatmuls, module, target_products(target))[0]


@dataclass(frozen=True)
class WarpTile:
    """A thread block's warps (rows x units) and each warp's fragments (rows x units)."""

    warp_rows: int
    warp_units: int
    fragment_rows: int
    fragment_units: int

    @property
    def warps(self) -> int:
        return self.warp_rows * self.warp_units

    @property
    def rows(self) -> int:
        return FRAGMENT * self.warp_rows * self.fragment_rows

    @property
    def units(self) -> int:
        return FRAGMENT * self.warp_units * self.fragment_units


def warp_tile(units: int) -> WarpTile:
    """2 x 2 warps of 1 x 2 fragments: 32 rows x 64 units a block, fewer units for a narrow layer
    (padding a 16-unit layer to 64 would quadruple its work)."""
    if units <= FRAGMENT:
        return WarpTile(2, 1, 1, 1)
    if units <= 2 * FRAGMENT:
        return WarpTile(2, 2, 1, 1)
    return WarpTile(2, 2, 1, 2)


def _product_of(schedule: s_tir.Schedule) -> tuple[TensorCoreProduct, s_tir.schedule.SBlockRV] | None:
    return next(((product, block) for product in PRODUCTS if (block := find_block(schedule, product.block)) is not None), None)


class RowParameters(dlight.ScheduleRule):
    """The kernel of an int8 layer's row quantization parameters (fc_operands.row_parameters): a warp per row,
    ROWS_PER_BLOCK rows a block; its max and its min, each with the warp's threads stepping along the
    row together (coalesced reads) and a warp-shuffle reduction, then the row's scale and zero point."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        schedule = s_tir.Schedule(func)
        output = find_block(schedule, ROW_PARAMETERS)
        if output is None:
            return None
        inline_into_output(schedule, keep=(ROW_PARAMETERS,))
        rows, parameters = schedule.get_loops(output)
        row_blocks, row = schedule.split(rows, factors=[None, ROWS_PER_BLOCK])
        _, lane = schedule.split(parameters, factors=[None, WARP])
        schedule.bind(row_blocks, "blockIdx.x")
        schedule.bind(row, "threadIdx.y")
        schedule.bind(lane, "threadIdx.x")
        for name in ("min", "max"):
            reduction = schedule.get_sblock(ROW_STAGE + name)
            schedule.compute_at(reduction, row)
            schedule.set_scope(reduction, 0, "local")
            _, lane = schedule.split(schedule.get_loops(reduction)[-1], factors=[None, WARP])
            schedule.bind(lane, "threadIdx.x")
        return schedule


class TensorCoreFc(dlight.ScheduleRule):
    """The tensor-core FC kernels (see the module's docstring); declines every other kernel."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not target_products(target):
            return None
        schedule = s_tir.Schedule(func)
        found = _product_of(schedule)
        if found is None:
            return None
        product, block = found
        intrinsics = product.intrinsics()
        # The per-row stages (the graph's scale and zero point read by the epilogue, the kernel's own
        # for the codes) are recomputed where they are read: a few operations an element, against a
        # loop of their own over the rows that no thread would run.
        inline_into_output(schedule, keep=(ACTIVATIONS, WEIGHTS))
        _, columns, inputs = schedule.get_loops(block)
        tile = warp_tile(int(schedule.get(columns).extent))
        # Operand rows are `inputs` elements long: a vector copy must not straddle a row's end, and its
        # address must be aligned to the vector (CUDA faults on a misaligned vector load).
        lanes = math.gcd(COPY_LANES, int(schedule.get(inputs).extent))
        schedule.pad_einsum(block, [tile.rows, tile.units, product.inputs_per_step])
        rows, columns, inputs = schedule.get_loops(block)
        rows, fragment_row = schedule.split(rows, factors=[None, FRAGMENT])
        columns, fragment_column = schedule.split(columns, factors=[None, FRAGMENT])
        inputs, fragment_input = schedule.split(inputs, factors=[None, FRAGMENT])
        schedule.reorder(rows, columns, inputs, fragment_row, fragment_column, fragment_input)
        fragment = schedule.blockize(fragment_row)

        row_tiles, warp_row, row = schedule.split(rows, factors=[None, tile.warp_rows, tile.fragment_rows])
        column_tiles, warp_column, column = schedule.split(columns, factors=[None, tile.warp_units, tile.fragment_units])
        steps, step = schedule.split(inputs, factors=[None, product.inputs_per_step // FRAGMENT])
        schedule.reorder(row_tiles, column_tiles, warp_row, warp_column, steps, step, row, column)
        schedule.bind(row_tiles, "blockIdx.y")
        schedule.bind(column_tiles, "blockIdx.x")
        warp = schedule.fuse(warp_row, warp_column)
        schedule.bind(warp, "threadIdx.y")

        for operand in (0, 1):
            staged = schedule.cache_read(fragment, operand, "shared")
            schedule.compute_at(staged, steps)
            if product.panels:
                schedule.transform_layout(staged, ("write", 0), lambda row, k: (k // FRAGMENT, row, k % FRAGMENT))
            self._copy_by_threads(schedule, staged, tile.warps, lanes)
            if product.row_padding:
                schedule.storage_align(staged, 0, axis=-2, factor=product.inputs_per_step, offset=product.row_padding)
            auto_inline_producers(schedule, staged)
        loads = [schedule.cache_read(fragment, 0, "wmma.matrix_a"), schedule.cache_read(fragment, 1, "wmma.matrix_b")]
        for load in loads:
            schedule.compute_at(load, step)

        staged_sums = schedule.cache_write(fragment, 0, "shared.dyn")
        sums = schedule.cache_write(fragment, 0, "wmma.accumulator")
        schedule.reverse_compute_at(sums, warp)
        schedule.reverse_compute_at(staged_sums, warp)
        sum_rows, sum_columns = schedule.get_loops(sums)[-2:]
        sum_row_tiles, sum_row = schedule.split(sum_rows, factors=[None, FRAGMENT])
        sum_column_tiles, sum_column = schedule.split(sum_columns, factors=[None, FRAGMENT])
        schedule.reorder(sum_row_tiles, sum_column_tiles, sum_row, sum_column)

        init = schedule.decompose_reduction(fragment, steps)
        for load, role in zip(loads, ("load_a", "load_b")):
            load_rows, load_columns = schedule.get_loops(load)[-2:]
            load_row_tiles, load_row = schedule.split(load_rows, factors=[None, FRAGMENT])
            load_column_tiles, load_column = schedule.split(load_columns, factors=[None, FRAGMENT])
            schedule.reorder(load_row_tiles, load_column_tiles, load_row, load_column)
            schedule.tensorize(load_row, intrinsics[role])
        schedule.tensorize(schedule.get_loops(schedule.get_child_blocks(init)[0])[-2], intrinsics["init"])
        schedule.tensorize(sum_row, intrinsics["store"])
        schedule.tensorize(schedule.get_loops(block)[-3], intrinsics["compute"])

        # The epilogue, computed as the sums go from shared memory to the output.
        auto_inline_consumer_chain(schedule, staged_sums)
        fused = schedule.fuse(*schedule.get_loops(staged_sums)[-2:])
        _, lane = schedule.split(fused, factors=[None, WARP])
        schedule.bind(lane, "threadIdx.x")
        return schedule

    @staticmethod
    def _copy_by_threads(schedule: s_tir.Schedule, staged, warps: int, lanes: int) -> None:
        """The tile's copy into shared memory dealt out to the block's threads, `lanes` elements each."""
        fused = schedule.fuse(*schedule.get_loops(staged)[-2:])
        _, warp, lane, vector = schedule.split(fused, factors=[None, warps, WARP, lanes])
        schedule.bind(warp, "threadIdx.y")
        schedule.bind(lane, "threadIdx.x")
        schedule.vectorize(vector)
