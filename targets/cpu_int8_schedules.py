"""int8 FC layers on x86 with AVX-512 VNNI: the uint8 x int8 products of passes/fc_quantization.py
run as vpdpbusd (64 multiply-adds an instruction, into int32), and their quantization kernels are
scheduled.

TVM's importer widens both MatMulInteger operands to int32 and its matmul is then an int32 x int32
loop (vpmulld, slower than fp32 FMAs). Two steps replace it:
- `select_vnni_matmuls` (on the imported Relax module, before legalization): each
  matmul(astype(x: uint8, int32), astype(W: constant int8, int32)) becomes a call of a kernel that
  reads x as it is and W packed as [N/16, K/4, 16, 4] int8 (16 units x 4 inputs per 64-byte row: the
  operand layout of vpdpbusd), zero-padded to whole 16 x 4 blocks; the rows are padded to the register
  tile inside the kernel. TVM's fusion then fuses the layer's epilogue (zero-point correction, scales,
  bias, activation) into it, as it does for a matmul.
- `apply_int8_schedules` (on the fused module, before the default CPU rules): those kernels are
  tensorized with vpdpbusd.512 in a register tile of ROWS rows x TILE_VECTORS x 16 units, one
  parallel loop over (column panel, row tile) so each thread keeps a panel's weights in L1, with the
  epilogue computed per tile while its sums are in registers. The activation quantization kernels
  are vectorized: each row's max and min in 16 lanes (max and min are exact in any order, so the
  codes stay those onnxruntime computes), the codes as one loop nest along the row.
The products are exact (vpdpbusd, unlike vpdpbusds, does not saturate: each uint8 x int8 product fits
16 bits and the sums are int32), so the artifact agrees with onnxruntime's run of the quantized
graph as the int32 path did.

TVM's own VNNI intrinsic (tvm.s_tir.tensor_intrin.x86) passes the operands as <16 x i32>, which the
LLVM in TVM 0.27 rejects (vpdpbusd.512 takes <64 x i8> there), so this module registers its own.
"""

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

VNNI_UNITS, VNNI_INPUTS = 16, 4  # one vpdpbusd: 16 int32 sums, each of 4 uint8 x int8 products
VNNI_INTRIN = "reccc_dot_16x4_u8i8i32_vnni"
VNNI_BLOCK = "matmul_vnni"
PAD_BLOCK = "matmul_vnni_rows"
# Register tile: ROWS x TILE_VECTORS accumulators of 16 int32 (16 of AVX-512's 32 registers), plus
# the weight vectors and the broadcast activation.
ROWS = 4
TILE_VECTORS = 4
DATA_PARALLEL, COMM_REDUCE = 0, 2  # IterVar.iter_type of a spatial and of a reduction block var


# TVM's description of the instruction (tvm.s_tir.tensor_intrin.x86), with the accumulators in a local
# buffer: the kernel keeps its tile of sums there across the reduction.
@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        four = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(four, 16), dtype="int8x64"),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc, _dot_16x4_vnni)


def has_vnni(target: tvm.target.Target) -> bool:
    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx512vnni", target))


def _round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


def pack_weight(weight: np.ndarray) -> np.ndarray:
    """int8 [K, N] as [N'/16, K'/4, 16, 4] (K', N' rounded up to 4 and 16, zeros in the padding):
    packed[p, q, u, i] = weight[4q + i, 16p + u]."""
    inputs, units = weight.shape
    padded = np.zeros((_round_up(inputs, VNNI_INPUTS), _round_up(units, VNNI_UNITS)), np.int8)
    padded[:inputs, :units] = weight
    return np.ascontiguousarray(
        padded.reshape(padded.shape[0] // VNNI_INPUTS, VNNI_INPUTS, padded.shape[1] // VNNI_UNITS, VNNI_UNITS).transpose(2, 0, 3, 1)
    )


def _vnni_matmul(x: te.Tensor, packed: te.Tensor, units: int) -> te.Tensor:
    """int32 [rows, units] = x (uint8 [rows, K]) @ the weight `packed` holds. The product runs on rows
    padded to ROWS and inputs padded to 4 (zeros, which the weight's zero padding multiplies), so the
    tensorized loops need no bounds checks."""
    rows, inputs = x.shape
    padded_rows, padded_inputs = _round_up(rows, ROWS), int(packed.shape[1]) * VNNI_INPUTS
    padded = te.compute(
        (padded_rows, padded_inputs),
        lambda i, k: tirx.if_then_else(tirx.all(i < rows, k < inputs), x[i, k], tirx.const(0, "uint8")),
        name=PAD_BLOCK,
    )
    k = te.reduce_axis((0, padded_inputs), name="k")
    product = te.compute(
        (padded_rows, int(packed.shape[0]) * VNNI_UNITS),
        lambda i, j: te.sum(
            padded[i, k].astype("int32") * packed[j // VNNI_UNITS, k // VNNI_INPUTS, j % VNNI_UNITS, k % VNNI_INPUTS].astype("int32"),
            axis=k,
        ),
        name=VNNI_BLOCK,
    )
    return te.compute((rows, units), lambda i, j: product[i, j], name="matmul_vnni_result")


@relax.expr_functor.mutator
class _SelectVnniMatmuls(relax.PyExprMutator):
    def __init__(self, module: tvm.IRModule):
        super().__init__(module)
        self.replaced = 0

    def _widened(self, expr, dtype: str):
        """The `dtype` tensor that `expr` widens to int32 (astype), else None."""
        if not isinstance(expr, relax.Var):
            return None
        value = self.lookup_binding(expr)
        if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.astype"))):
            return None
        source = value.args[0]
        info = source.ty
        return source if isinstance(info, relax.TensorType) and info.dtype == dtype and info.ndim == 2 else None

    def visit_call_(self, call):
        if not (call.op.same_as(tvm.ir.Op.get("relax.matmul")) and call.ty.dtype == "int32"):
            return super().visit_call_(call)
        x, weight = self._widened(call.args[0], "uint8"), self._widened(call.args[1], "int8")
        if x is None or not isinstance(weight, tvm.ir.GenericConst):
            return super().visit_call_(call)
        codes = weight.value.numpy()
        self.replaced += 1
        return self.builder_.call_te(
            _vnni_matmul, x, relax.const(pack_weight(codes), "int8"), codes.shape[1], primfunc_name_hint="matmul_vnni"
        )


def select_vnni_matmuls(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The imported module with its uint8 x constant int8 matmuls as VNNI kernels (see above);
    unchanged on a target without VNNI."""
    if not has_vnni(target):
        return module
    mutator = _SelectVnniMatmuls(module)
    main = mutator.visit_expr(module["main"])
    if not mutator.replaced:
        return module
    module = mutator.builder_.get()
    module["main"] = main
    # The int32 copies of the operands are read by nothing now.
    return relax.transform.DeadCodeElimination(["main"])(module)


def inline_into_output(schedule: s_tir.Schedule, keep: tuple[str, ...]) -> None:
    """Every data-parallel block but those named in `keep` inlined into its reader (the epilogue
    becomes one expression per output element; per-row values are loop-invariant there)."""
    for block in reversed(schedule.get_child_blocks(schedule.get_sblock("root"))):
        stmt = schedule.get(block)
        if stmt.name_hint in keep or any(var.iter_type != DATA_PARALLEL for var in stmt.iter_vars):
            continue
        try:
            schedule.compute_inline(block)
        except s_tir.ScheduleError:  # the output block
            continue


def vectorize_columns(schedule: s_tir.Schedule, loop, lanes: int) -> None:
    extent = schedule.get(loop).extent
    if isinstance(extent, tirx.IntImm):
        width = next((w for w in (lanes, lanes // 2, lanes // 4) if w > 1 and int(extent) % w == 0), None)
        if width is not None:
            _, vector = schedule.split(loop, factors=[None, width])
            schedule.vectorize(vector)


def _vnni_rule(schedule: s_tir.Schedule, lanes: int) -> bool:
    """A fused VNNI kernel: ROWS x (vectors x 16) accumulators kept in a local tile (registers) across
    the reduction, tensorized with vpdpbusd; the padded activation rows and the epilogue of each tile
    computed inside the tile's loop, while its sums are in registers."""
    try:
        block = schedule.get_sblock(VNNI_BLOCK)
    except s_tir.ScheduleError:
        return False
    inline_into_output(schedule, keep=(VNNI_BLOCK, PAD_BLOCK))
    outputs = [b for b in schedule.get_child_blocks(schedule.get_sblock("root")) if schedule.get(b).name_hint not in (VNNI_BLOCK, PAD_BLOCK)]
    rows, columns, reduction = schedule.get_loops(block)
    vectors = int(schedule.get(columns).extent) // VNNI_UNITS
    tile_vectors = max(v for v in range(1, TILE_VECTORS + 1) if vectors % v == 0)
    row_tiles, row = schedule.split(rows, factors=[None, ROWS])
    panels, vector, unit = schedule.split(columns, factors=[None, tile_vectors, VNNI_UNITS])
    steps, four = schedule.split(reduction, factors=[None, VNNI_INPUTS])
    schedule.reorder(panels, row_tiles, steps, row, vector, unit, four)
    # One parallel loop over (panel, row tile), panel-major: each thread takes a contiguous range, so
    # it runs a panel's weights (K x 64 bytes) over many row tiles while they stay in L1.
    tile = schedule.fuse(panels, row_tiles)
    accumulators = schedule.cache_write(block, 0, "local")
    schedule.compute_inline(accumulators)  # the epilogue reads the local tile
    for output in outputs:
        schedule.reverse_compute_at(output, tile)
        vectorize_columns(schedule, schedule.get_loops(output)[-1], lanes)
    schedule.compute_at(schedule.get_sblock(PAD_BLOCK), tile)
    schedule.parallel(tile)  # before tensorize: the tensorized update is no longer a reduction block
    init = schedule.decompose_reduction(block, steps)
    schedule.vectorize(schedule.get_loops(init)[-1])
    schedule.tensorize(unit, VNNI_INTRIN)
    schedule.unroll(row)
    schedule.unroll(vector)
    return True


def _row_range_rule(schedule: s_tir.Schedule, lanes: int) -> bool:
    """A kernel that is one max or min over the last axis of a [rows, K] input (an activation's range,
    per row): `lanes` partial results per row, each over every lanes-th element (a vector max / min
    per step), then reduced. Single-threaded, as the codes kernel: see _codes_rule."""
    blocks = schedule.get_child_blocks(schedule.get_sblock("root"))
    if len(blocks) != 1:
        return False
    block = blocks[0]
    stmt = schedule.get(block)
    kinds = [var.iter_type for var in stmt.iter_vars]
    if kinds != [DATA_PARALLEL, DATA_PARALLEL, COMM_REDUCE] or not isinstance(stmt.body.value, (tirx.Max, tirx.Min)):
        return False
    rows, _, reduction = schedule.get_loops(block)
    extent = schedule.get(reduction).extent
    if not isinstance(extent, tirx.IntImm) or int(extent) % lanes:
        return False
    _, lane = schedule.split(reduction, factors=[None, lanes])
    partial = schedule.rfactor(lane, factor_axis=2)
    schedule.compute_at(partial, rows)
    *_, lane, steps = schedule.get_loops(partial)  # compute_at put the lanes outside
    schedule.reorder(steps, lane)
    schedule.vectorize(lane)  # before decompose_reduction: vectorize refuses an update block apart from its init
    init = schedule.decompose_reduction(partial, steps)
    schedule.vectorize(schedule.get_loops(init)[-1])
    return True


def _codes_rule(schedule: s_tir.Schedule, lanes: int) -> bool:
    """The kernel writing an activation's uint8 codes (x / scale, rounded, + zero point, clipped,
    narrowed) from [rows, K] float32: one loop nest, vectorized along the rows. Single-threaded: these
    kernels stream a few hundred KB at batch 2048, and on the shared 2-core machine waking the second
    thread cost more than it saved at batch 64 and 2048 alike (whole-model medians, README)."""
    output = schedule.get(schedule.get_child_blocks(schedule.get_sblock("root"))[-1])
    if not (isinstance(output.body, tirx.BufferStore) and output.body.buffer.dtype == "uint8" and len(output.iter_vars) == 2):
        return False
    if any(var.iter_type != DATA_PARALLEL for block in schedule.get_child_blocks(schedule.get_sblock("root")) for var in schedule.get(block).iter_vars):
        return False
    inline_into_output(schedule, keep=())
    (block,) = schedule.get_child_blocks(schedule.get_sblock("root"))
    _, columns = schedule.get_loops(block)
    vectorize_columns(schedule, columns, lanes)
    return True


def apply_int8_schedules(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The VNNI kernels and the activation quantization kernels scheduled (see above); the other
    kernels are left to the default CPU rules. Unchanged on a target without VNNI."""
    if not has_vnni(target):
        return module
    lanes = 16  # AVX-512: 16 fp32 / int32 lanes
    updates = {}
    for symbol, function in module.functions.items():
        if not isinstance(function, tirx.PrimFunc):
            continue
        for rule in (_vnni_rule, _row_range_rule, _codes_rule):
            schedule = s_tir.Schedule(function)
            try:
                if rule(schedule, lanes):
                    updates[symbol] = schedule.mod["main"]
                    break
            except s_tir.ScheduleError:  # the kernel does not have the rule's form after all
                continue
    for symbol, function in updates.items():
        module[symbol] = function
    return module
