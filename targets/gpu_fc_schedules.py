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
    Where the codes are fc_quantization's quantization of an fp32 input (FcOperands.quantized_input),
    the kernel computes them from the input and its rows' max and min, as the graph does: a layer
    is 3 kernels instead of 7 (launches dominate GPU time at these sizes), at the cost of each
    element recomputing its row's scale and zero point;
  - bf16 layer, matmul(astype(astype(x, bfloat16), float32), W) with W a constant of bf16 numbers,
    by a kernel that reads the fp32 x and rounds it to bf16 itself (to nearest even, as onnxruntime's
    Cast);
  with the weight stored transposed, [units, inputs] (int8, or bf16 as its uint16 bits): wmma's
  column-major B operand, so each unit's inputs are contiguous. TVM's fusion then fuses the layer's
  epilogue (zero-point correction, scales, bias, activation) into the kernel, as for a matmul.
- `TensorCoreFc`, a dlight rule tried before dlight's own, schedules those kernels: each thread block
  computes a tile of rows x units in warps of 16 x 16 fragments; per step of 16 (int8) or 32 (bf16) inputs,
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
from tvm.s_tir.tensor_intrin import cuda as cuda_intrinsics

from reccc.targets.cpu_dot_schedules import inline_into_output, shifted_codes_correction
from reccc.targets.fc_operands import FcOperands, uint8_codes

FRAGMENT = 16  # wmma's m, n and k
ACTIVATIONS, WEIGHTS = "tensor_core_activations", "tensor_core_weights"  # the operands' stages
WARP = 32
COPY_LANES = 4  # the most elements per vector load and store of the operands' copies into shared memory


@dataclass(frozen=True)
class TensorCoreProduct:
    """A tensor-core product: the FC precision it serves, its operands' type, its sums' type, the
    least SM version with it, TVM's names for its operands and sums in wmma intrinsics, and the
    operand tiles in shared memory: inputs per step, elements padding each row. wmma needs every
    fragment to start 32-byte aligned and rows a multiple of 16 bytes apart: bf16 steps of 32 inputs
    (fragments at bytes 0 and 32 of a row) in rows padded by 8 elements (80 bytes apart: the loads
    of consecutive rows start in other banks); int8 steps of 16 inputs (a fragment 16 bytes wide,
    rows 16 bytes apart, so a step's fragment is contiguous)."""

    precision: str
    operand: str
    accumulator: str
    min_sm: int
    operand_name: str
    accumulator_name: str
    inputs_per_step: int
    row_padding: int

    @property
    def block(self) -> str:
        return f"matmul_tensor_core_{self.precision}"

    def intrinsics(self) -> dict[str, str]:
        """The wmma intrinsics' names (A row-major, B column-major, both from shared memory; the sums
        stored to shared memory), registered on first use."""
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


INT8 = TensorCoreProduct("int8", "int8", "int32", 72, "s8", "s32", inputs_per_step=16, row_padding=0)
BF16 = TensorCoreProduct("bf16", "bfloat16", "float32", 80, "bf16", "f32", inputs_per_step=32, row_padding=8)
PRODUCTS = (INT8, BF16)


def sm_version(target: tvm.target.Target) -> int:
    """The target's SM version (sm_90a -> 90), 0 for a target that is not CUDA."""
    if target.kind.name != "cuda":
        return 0
    return int("".join(ch for ch in str(target.attrs["arch"]).removeprefix("sm_") if ch.isdigit()))


def target_products(target: tvm.target.Target) -> tuple[TensorCoreProduct, ...]:
    return tuple(product for product in PRODUCTS if sm_version(target) >= product.min_sm)


def _operand(activations: list[te.Tensor], product: TensorCoreProduct):
    """(i, k) -> the tensor cores' activation operand: an int8 layer's uint8 code c as the int8 c - 128,
    the code computed here from [x, row max, row min] where the selector found them (as the graph
    computes it: fc_operands.uint8_codes), else read; or the fp32 x rounded to bf16 (TVM's cast rounds
    to nearest even, as onnxruntime's Cast)."""
    if product.precision == "bf16":
        (x,) = activations
        return lambda i, k: x[i, k].astype("bfloat16")
    if len(activations) == 3:
        code = uint8_codes(*activations, stage_prefix="tensor_core_row_")
    else:
        (codes,) = activations
        code = lambda i, k: codes[i, k]  # noqa: E731
    return lambda i, k: tirx.reinterpret("int8", code(i, k) ^ tirx.const(0x80, "uint8"))


def _tensor_core_matmul(*operands: te.Tensor, product: TensorCoreProduct, activation_count: int) -> te.Tensor:
    """[rows, units] sums of the activations' operand (`activation_count` operands, see _operand) times
    `weight` ([units, inputs]: int8, or bf16's uint16 bits), plus `correction` per unit for shifted
    codes: operands = *activations, weight, *correction."""
    activation_operands, (weight, *correction) = operands[:activation_count], operands[activation_count:]
    rows, inputs = activation_operands[0].shape
    units = weight.shape[0]
    activations = te.compute((rows, inputs), _operand(list(activation_operands), product), name=ACTIVATIONS)
    weights = te.compute((units, inputs), lambda j, k: tirx.reinterpret(product.operand, weight[j, k]), name=WEIGHTS)
    k = te.reduce_axis((0, inputs), name="k")
    accumulator = product.accumulator
    sums = te.compute(
        (rows, units),
        lambda i, j: te.sum(activations[i, k].astype(accumulator) * weights[j, k].astype(accumulator), axis=k),
        name=product.block,
    )
    if not correction:
        return sums
    return te.compute((rows, units), lambda i, j: sums[i, j] + correction[0][j], name="tensor_core_corrected")


@relax.expr_functor.mutator
class _SelectTensorCoreMatmuls(relax.PyExprMutator, FcOperands):
    def __init__(self, module: tvm.IRModule, products: tuple[TensorCoreProduct, ...]):
        super().__init__(module)
        self.products = products
        self.replaced = 0

    def visit_call_(self, call):
        if not call.op.same_as(tvm.ir.Op.get("relax.matmul")):
            return super().visit_call_(call)
        for product in self.products:
            layer = (self.bf16_layer if product.precision == "bf16" else self.int8_layer)(call)
            if layer is None:
                continue
            x, weight = layer
            if product.precision == "bf16":
                activations = [x]
                constants = [relax.const(np.ascontiguousarray(weight.view(np.uint16).T), "uint16")]
            else:
                activations = self.quantized_input(x) or [x]
                constants = [relax.const(np.ascontiguousarray(weight.T), "int8"), relax.const(shifted_codes_correction(weight), "int32")]
            self.replaced += 1
            kernel = functools.partial(_tensor_core_matmul, product=product, activation_count=len(activations))
            return self.builder_.call_te(kernel, *activations, *constants, primfunc_name_hint=product.block)
        return super().visit_call_(call)


def select_tensor_core_matmuls(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The imported module with its int8 and bf16 layers as tensor-core kernels where the target's SM
    has the product (see above); unchanged otherwise."""
    products = target_products(target)
    if not products:
        return module
    mutator = _SelectTensorCoreMatmuls(module, products)
    main = mutator.visit_expr(module["main"])
    if not mutator.replaced:
        return module
    module = mutator.builder_.get()
    module["main"] = main
    # The widened copies of the operands are read by nothing now.
    return relax.transform.DeadCodeElimination(["main"])(module)


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
    for product in PRODUCTS:
        try:
            return product, schedule.get_sblock(product.block)
        except s_tir.ScheduleError:
            continue
    return None


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
