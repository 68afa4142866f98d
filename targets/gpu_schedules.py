"""reccc's default GPU schedules (-O2 and up): reccc's rules for the int8 and bf16 FC layers
(gpu_fc_schedules: the tensor-core kernels, the int8 layers' row quantization parameters), dlight's rules for matmuls, matrix-vector products and reductions, reccc's own
rules for embedding gathers and for the row reductions dlight's decline, and dlight's Fallback for
the rest. dlight tries
the rules in this order on every kernel and keeps the first that applies.

Only Fallback fits a gather: it fuses all output axes and deals them out 1024 threads a block, so a
batch-1 lookup of a 64-wide row launches 1024 threads for 64 elements, and every element is one
scalar load. GatherRows gives each thread block a chunk of rows, THREADS_PER_BLOCK threads: up to a
warp along the embedding dim (threadIdx.x), so a warp reads contiguous table memory, the rest over
rows (threadIdx.y); each thread loads up to 16 bytes at once. It applies to any kernel that, after
inlining, is one data-parallel block reading a table at a row loaded from another buffer, with the
table's last axis as the block's last axis: take, and a gather with its elementwise epilogue (a
dequantizing gather: cast and scale).
"""

import math
import re

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func

from reccc.targets.gpu_fc_schedules import ROWS_PER_BLOCK, WARP, RowParameters, TensorCoreFc
from reccc.targets.tir_expressions import loads, uses

THREADS_PER_BLOCK = 256
LOAD_BYTES = 16  # the widest load a CUDA thread issues


def _column_offset(index, axis: tirx.Var) -> int | None:
    """c where `index` is `axis` + c (a Concat of gathers shifts the columns), else None."""
    if index.same_as(axis):
        return 0
    if isinstance(index, (tirx.Add, tirx.Sub)) and index.a.same_as(axis) and isinstance(index.b, tirx.IntImm):
        return int(index.b) if isinstance(index, tirx.Add) else -int(index.b)
    return None


def _is_gather(block: s_tir.SBlock) -> bool:
    """The block loads from a table at a row read from memory, along the block's last axis."""
    last_axis = block.iter_vars[-1].var
    for load in loads(block.body):
        if len(load.indices) < 2:
            continue
        *rows, column = load.indices
        if _column_offset(column, last_axis) is not None and any(loads(row) for row in rows):
            return True
    return False


def _vector_lanes(block: s_tir.SBlock, width: int) -> int:
    """Elements per load and store: a power of two dividing the row width, at most LOAD_BYTES, and
    keeping every access along the last axis aligned (CUDA faults on a misaligned vector load): each
    such buffer's row length and column offset must be multiples of it. Accesses that do not follow
    the last axis one to one get scalar code."""
    last_axis = block.iter_vars[-1].var
    output = block.writes[0].source
    lanes = max(1, LOAD_BYTES // tvm.DataType(output.dtype).itemsize)
    for load in loads(block.body):
        if not load.indices:
            continue
        *rows, column = load.indices
        offset = _column_offset(column, last_axis)
        row_length = load.source.shape[-1] if load.source.shape else None
        if any(uses(row, last_axis) for row in rows) or (offset is None and uses(column, last_axis)):
            return 1
        if offset is not None:
            if not isinstance(row_length, tirx.IntImm):
                return 1
            lanes = math.gcd(lanes, int(row_length), offset, LOAD_BYTES // tvm.DataType(load.source.dtype).itemsize)
    return math.gcd(lanes, width)


def _inlined_blocks(func, target: tvm.target.Target) -> tuple[s_tir.Schedule | None, list]:
    """A GPU kernel's schedule with its data-parallel producers inlined, and its blocks left (None, []
    for a function that is not a kernel dlight can analyze)."""
    if not isinstance(func, tirx.PrimFunc) or "gpu" not in target.keys:
        return None, []
    schedule = s_tir.Schedule(func)
    blocks = normalize_prim_func(schedule)
    if blocks is None:
        return None, []
    return schedule, dlight.try_inline(schedule, blocks)


class GatherRows(dlight.ScheduleRule):
    """One thread block per chunk of rows; threads along the embedding dim, vector loads."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool) -> s_tir.Schedule | None:
        schedule, blocks = _inlined_blocks(func, target)
        if schedule is None:
            return None
        if len(blocks) != 1 or not blocks[0].is_injective():
            return None
        block = blocks[0].block_rv
        loops = schedule.get_loops(block)
        width = schedule.get(loops[-1]).extent if loops else None
        if len(loops) < 2 or not isinstance(width, tirx.IntImm) or not _is_gather(schedule.get(block)):
            return None
        lanes = _vector_lanes(schedule.get(block), int(width))
        vectors = int(width) // lanes
        threads_x = min(vectors, WARP)
        rows = schedule.fuse(*loops[:-1])
        row_chunks, row = schedule.split(rows, factors=[None, max(1, THREADS_PER_BLOCK // threads_x)])
        if lanes > 1:
            columns, vector = schedule.split(loops[-1], factors=[None, lanes])
            schedule.vectorize(vector)
        else:
            columns = loops[-1]
        column_steps, column = schedule.split(columns, factors=[None, threads_x])
        schedule.reorder(row_chunks, row, column_steps, column)
        schedule.bind(row_chunks, "blockIdx.x")
        schedule.bind(row, "threadIdx.y")
        schedule.bind(column, "threadIdx.x")
        return schedule


class RowReduction(dlight.ScheduleRule):
    """A reduction along the last axis of the rows it reads, at least a warp long (a row's max, min or
    sum: the activation range of an int8 layer quantized by the graph's own operations): a warp per row, its threads stepping along the row together (coalesced reads), then a
    shuffle across the warp; ROWS_PER_BLOCK rows a block. dlight's reduction rules decline these
    kernels, and Fallback gave each thread a whole row: serial, uncoalesced reads, accumulated in
    global memory (an int8 DLRM spent 2 ms of its 2.2 at batch 2048 in them on an H200)."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool) -> s_tir.Schedule | None:
        schedule, blocks = _inlined_blocks(func, target)
        if schedule is None:
            return None
        if len(blocks) != 1 or not re.fullmatch(r"S+R", blocks[0].dom_kind()):
            return None
        block = blocks[0].block_rv
        reduced = schedule.get(block).iter_vars[-1]
        if not isinstance(reduced.dom.extent, tirx.IntImm) or int(reduced.dom.extent) < WARP:
            return None  # a warp would idle on a short reduction (a bag of a few lookups)
        if not any(load.indices and _column_offset(load.indices[-1], reduced.var) is not None for load in loads(schedule.get(block).body)):
            return None  # lanes stepping along the reduction would not read consecutive elements
        loops = schedule.get_loops(block)
        spatial = len(loops) - 1
        rows = schedule.fuse(*loops[:spatial])
        reduction = loops[-1]
        row_blocks, row = schedule.split(rows, factors=[None, ROWS_PER_BLOCK])
        steps, lane = schedule.split(reduction, factors=[None, WARP])
        schedule.reorder(row_blocks, row, steps, lane)
        schedule.bind(row_blocks, "blockIdx.x")
        schedule.bind(row, "threadIdx.y")
        schedule.bind(lane, "threadIdx.x")
        return schedule


class Declining(dlight.ScheduleRule):
    """`rule`, where its analysis failing on a kernel means it does not apply to it. dlight's GEMV
    asserts on a gather fused with its pooling sum (the table's row index is data-dependent) instead
    of declining, and ApplyDefaultSchedule lets that end the whole build."""

    def __init__(self, rule: dlight.ScheduleRule):
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        try:
            return self.rule.apply(func, target, tunable)
        except (AssertionError, s_tir.ScheduleError):
            return None


def apply_default_schedules(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    dlight_rules = [dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction()]
    rules = [TensorCoreFc(), RowParameters(), *map(Declining, dlight_rules), GatherRows(), RowReduction(), dlight.gpu.Fallback()]
    return dlight.ApplyDefaultSchedule(*rules)(module)


def bind_unscheduled(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Every kernel no rule scheduled (all of them below -O2) gets Fallback's thread binding: a kernel
    left unbound would be built as host code reading device memory."""
    return dlight.ApplyDefaultSchedule(dlight.gpu.Fallback())(module)
