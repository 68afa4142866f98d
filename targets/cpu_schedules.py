"""reccc's default CPU schedules (-O2 and up): rules applied to the fused kernels of the Relax module,
the way dlight's rules are applied for GPUs. TVM's own CPU pipeline leaves every kernel as naive,
single-threaded scalar loops; these rules make the hot ones parallel and vectorized.

Rules, each tried on every fused PrimFunc and skipped where its pattern does not fit:
- matmul: the reduction block "matmul" (C[i, j] += A[i, k] * W[k, j], from Gemm / MatMul with
  the weight transpose already folded) and its epilogue (bias, activation: the data-parallel blocks
  fused after it) become one loop nest, parallel over tiles of rows: each thread runs its tiles of
  rows through every panel of W, read in order. Each (row tile, column panel) pair keeps a
  register tile of accumulators (`default_tile`: 4 rows x 4 vectors of columns, or the 5, 6 or 3
  vectors that pad fewer of W's columns; -O3 measures ALTERNATIVE_MATMUL_TILES against it on the hot
  kernels) across the whole reduction, one vector instruction per vector of the tile, copies its
  rows of A into a tile padded to whole tiles first (so that no predicate enters the inner loop),
  and runs the epilogue on its accumulators before writing them: one parallel region a kernel, and
  neither A nor C passes through memory a second time. The batch stays a Relax shape variable;
  batches of fewer rows than the tile run a branch scheduled with GEMV_TILE instead (one row, twice
  the columns), which does not multiply padding rows, and a batch of one tile of rows a branch
  parallel over the panels (so that both threads work).
  Where W's columns are whole panels, the kernel is marked for W to be stored panel by panel when
  compiled (weight_panels.py), each panel one contiguous stream.
- narrow matmul: a matmul of fewer columns than a vector (a CTR model's last layer) computes each
  row's columns as vectorized dot products along its inputs, per row of its epilogue, instead.
- lookup: a kernel that gathers (an embedding lookup with its dequantization and pooling, or the
  lookups a concatenation joins) is inlined into its output block: parallel over rows, vectorized
  along the row (a concatenation's: one loop per source, _copy_segments).
- concatenation: parallel over rows, one loop per source (_copy_segments).
Vector width comes from the target: 16 fp32 lanes with AVX-512, 8 with AVX2, 4 with SSE and NEON; with
SVE, the vector length the target declares ("vector-width"), else SVE's minimum of 128 bits (4 lanes).
"""

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import s_tir
from tvm.target import codegen

from reccc.targets import weight_panels
from reccc.targets.kernel_blocks import DATA_PARALLEL, find_block, inline_into_output, inline_producers, root_blocks
from reccc.targets.lookup_fusion import reads_at_loaded_index
from reccc.targets.lookup_prefetch import prefetching_rows_ahead
from reccc.targets.row_branches import branching, symbolic_rows
from reccc.targets.tir_expressions import loads



@dataclass(frozen=True)
class MatmulTile:
    """A matmul's register tile: `rows` rows of A times `vectors` vectors of W's columns, all of whose
    accumulators stay in registers (rows x vectors of the 32 AVX-512 / NEON registers, plus the
    vectors of W and a broadcast of A)."""

    rows: int
    vectors: int

    @property
    def label(self) -> str:
        return f"tile {self.rows}x{self.vectors}"


DEFAULT_TILE_ROWS = 4
# A register tile's vectors of columns, by preference: the first of those padding fewest of W's columns
# to whole panels. A padded weight is copied on every call, and its padding columns are multiplied:
# DeepFM's 400-unit layers (25 vectors) with 5 vectors ran at 269 GFLOP/s instead of 221 with 4 (whose
# 64-column panels pad to 448) at batch 2048, 147 instead of 114 at 64, and in 11 us instead of 31 at 4.
TILE_VECTORS = (4, 5, 6, 3)
# A batch of 1 in a 4-row tile multiplied 3 rows of padding: one row (a GEMV, bound by reading W)
# with 8 vectors took 6 us instead of 11 on a 576 x 512 layer here, 1 x 4 took 8.
GEMV_TILE = MatmulTile(1, 8)
# Taller tiles load each W vector for more rows (6x4 measured 10% faster than 4x4 on a 2048x576x512
# layer here, 4x4 fastest at batch 1): no one tile is best for every layer, batch and machine, so -O3
# measures these on the hot kernels (targets/tuning.py).
ALTERNATIVE_MATMUL_TILES = (MatmulTile(6, 4), MatmulTile(8, 2), MatmulTile(12, 2), MatmulTile(4, 2))
# A kernel whose parallel loop runs fewer innermost statements than this (about 2 us on one core here)
# runs on the calling thread: waking the other threads costs 0.5-0.9 us a kernel. Measured one-row FC
# layers, one thread against two: 96 x 256 1.0 us against 1.7, 256 x 64 0.7 against 1.2, 512 x 256
# (131k statements) 3.6 against 3.0.
PARALLEL_MIN_WORK = 48 * 1024


def default_tile(columns: int, lanes: int) -> MatmulTile:
    return _padding_fewest(columns, lanes, [MatmulTile(DEFAULT_TILE_ROWS, vectors) for vectors in TILE_VECTORS])


def _padding_fewest(columns: int, lanes: int, tiles: list[MatmulTile]) -> MatmulTile:
    """The first of `tiles` among those padding the fewest of W's `columns` to whole panels."""
    return min(tiles, key=lambda tile: _padded_columns(columns, lanes, tile))  # min keeps the first of equals


def vector_lanes(target: tvm.target.Target) -> int:
    """fp32 lanes of the target's widest vector unit."""
    if codegen.target_has_features("avx512f", target):
        return 16
    if codegen.target_has_features("avx2", target):
        return 8
    if codegen.target_has_features("sve", target):
        # An SVE machine's vector length is its own (128 to 2048 bits). Fixed-length code may count on
        # more than the 128-bit minimum only when the target says how long (e.g. "vector-width": 256 for
        # Neoverse V1); LLVM's answer otherwise is 128.
        return max(4, codegen.llvm_get_vector_width(target) // 32)
    return 4


def vectorized_reduction(schedule: s_tir.Schedule, block, lanes: int, at) -> bool:
    """`block` (at the root: a reduction over its last loop) as `lanes` partial results per output
    element, each over every lanes-th step (one vector operation per step), then reduced; both
    computed per iteration of `at` (a loop over the rows of the block's reader). False, and the block
    left as it is, where the reduction's extent is not a multiple of `lanes`. (A max or min is exact
    in any order; a sum is reassociated, as any vectorized dot product is.)"""
    reduction = schedule.get_loops(block)[-1]
    extent = schedule.get(reduction).extent
    if not isinstance(extent, tvm.tirx.IntImm) or int(extent) % lanes:
        return False
    _, lane = schedule.split(reduction, factors=[None, lanes])
    partial = schedule.rfactor(lane, factor_axis=len(schedule.get(block).iter_vars) - 1)
    schedule.compute_at(block, at)
    schedule.compute_at(partial, at)
    *_, lane, steps = schedule.get_loops(partial)  # compute_at put the lanes outside
    schedule.reorder(steps, lane)
    schedule.vectorize(lane)  # before decompose_reduction: vectorize refuses an update block apart from its init
    init = schedule.decompose_reduction(partial, steps)
    schedule.vectorize(schedule.get_loops(init)[-1])
    return True


def _matmul_block(schedule: s_tir.Schedule):
    """The block C[i, j] += A[i, k] * W[k, j] of a matmul kernel (3 loops, the columns static), or None."""
    block = find_block(schedule, "matmul")
    if block is None:
        return None
    loops = schedule.get_loops(block)
    if len(loops) != 3 or not isinstance(schedule.get(loops[1]).extent, tvm.tirx.IntImm):
        return None
    return block


def _matmul_columns(block, schedule: s_tir.Schedule) -> int:
    return int(schedule.get(schedule.get_loops(block)[1]).extent)


def _is_narrow(schedule: s_tir.Schedule, block, lanes: int) -> bool:
    """A matmul of fewer columns than a vector whose inputs are a whole number of vectors."""
    inputs = schedule.get(schedule.get_loops(block)[-1]).extent
    return _matmul_columns(block, schedule) < lanes and isinstance(inputs, tvm.tirx.IntImm) and int(inputs) % lanes == 0


def _narrow_matmul_rule(schedule: s_tir.Schedule, lanes: int, parallel: bool = True) -> bool:
    """A matmul of fewer columns than a vector (a CTR model's last layer, one logit a row): each
    row's columns are dot products along its inputs (vectorized_reduction), computed per row of the
    epilogue, the rows parallel or not. The register tile would pad the columns to a whole vector
    (16 times the work for one column) and copy the padded weight on every call."""
    block = _matmul_block(schedule)
    if block is None or not _is_narrow(schedule, block, lanes):
        return False
    inline_into_output(schedule, keep={"matmul"})
    if len(root_blocks(schedule)) == 1:  # no epilogue: a block that writes the output gives the rows' loop
        schedule.cache_write(block, 0, "global")
    (output,) = [b for b in root_blocks(schedule) if schedule.get(b).name_hint != "matmul"]
    rows = schedule.get_loops(output)[0]
    if parallel:
        schedule.parallel(rows)
    return vectorized_reduction(schedule, block, lanes, at=rows)


def _matmul_rule(schedule: s_tir.Schedule, lanes: int, tile: MatmulTile | None = None, parallel: bool = True,
                 rows_outer: bool = True) -> MatmulTile | None:
    """Schedules a matmul kernel with `tile`, by default `default_tile` for its columns, and returns
    the tile; None for other kernels. With `rows_outer`, each thread takes whole tiles of rows and runs
    them through every panel of W, which it streams in order: a tile's rows of A are padded once for
    all panels, and W's panels, packed contiguous, are read sequentially. Otherwise the loop over panels
    is outside the rows', fused with it: the threads then split the panels when there is one tile of
    rows (the GEMV's one row). Rows outside, measured alone at batch 2048: 96->256 + ReLU 300 instead
    of 211 GFLOP/s, 13->512 205 instead of 119, 512->256 312 instead of 270, 416->400 300 instead of
    279; the same at batch 64."""
    block = _matmul_block(schedule)
    if block is None:
        return None
    columns = _matmul_columns(block, schedule)
    tile = tile or default_tile(columns, lanes)
    panel = _panel(columns, lanes, tile)
    # Pad the (symbolic) rows to a multiple of the tile, and the columns to a multiple of the panel:
    # a split that does not divide guards every element with a predicate, which costs 2-3x here.
    schedule.pad_einsum(block, [tile.rows, panel if columns % panel else 1, 1])
    matmul = schedule.get(block)
    rows_source = next(read.source for read in matmul.reads if not read.source.same_as(matmul.writes[0].source))  # A
    padded_rows = [b for b in _input_pads(schedule, matmul) if schedule.get(b).writes[0].source.same_as(rows_source)]
    other_pads = [b for b in _input_pads(schedule, matmul) if not schedule.get(b).writes[0].source.same_as(rows_source)]
    kept = {schedule.get(b).name_hint for b in [block, *padded_rows, *other_pads]}
    inline_into_output(schedule, kept)
    outputs = [b for b in root_blocks(schedule) if schedule.get(b).name_hint not in kept]
    rows, columns, reduction = schedule.get_loops(block)
    row_tiles, row = schedule.split(rows, factors=[None, tile.rows])
    panels, column = schedule.split(columns, factors=[None, panel])
    if rows_outer:
        schedule.reorder(row_tiles, panels, reduction, row, column)
        outer, tile_loop = row_tiles, panels
    else:
        schedule.reorder(panels, row_tiles, reduction, row, column)
        outer = tile_loop = schedule.fuse(panels, row_tiles)
    schedule.compute_inline(schedule.cache_write(block, 0, "local"))  # the epilogue reads the accumulators
    for output in outputs:
        schedule.reverse_compute_at(output, tile_loop)
        _vectorize(schedule, schedule.get_loops(output)[-1], lanes)
    for pad in padded_rows:
        schedule.compute_at(pad, outer)
        _vectorize(schedule, schedule.get_loops(pad)[-1], lanes)
    for pad in other_pads:  # the weight's columns padded to whole panels: once a call, at the root
        _vectorize(schedule, schedule.get_loops(pad)[-1], lanes)
    if parallel:
        schedule.parallel(outer)
    # One vector instruction per vector of the tile: vectorized whole, a panel of 5 vectors is one LLVM
    # vector of 80 lanes, which LLVM widens to 128 before splitting; the kernel ran 40x slower.
    vectors, lane = schedule.split(column, factors=[None, lanes])
    schedule.vectorize(lane)
    schedule.unroll(vectors)
    schedule.unroll(row)
    init = schedule.decompose_reduction(block, reduction)  # last: vectorize refuses an update block apart from its init
    schedule.vectorize(schedule.get_loops(init)[-1])
    return tile


def _panel(columns: int, lanes: int, tile: MatmulTile) -> int:
    """The columns one register tile covers: its vectors, or all columns rounded up to a vector."""
    return min(tile.vectors * lanes, -(-columns // lanes) * lanes)


def _padded_columns(columns: int, lanes: int, tile: MatmulTile) -> int:
    panel = _panel(columns, lanes, tile)
    return -(-columns // panel) * panel


def _weight_in_panels(function: tvm.tirx.PrimFunc, scheduled: tvm.tirx.PrimFunc, lanes: int, tile: MatmulTile) -> tvm.tirx.PrimFunc:
    """`scheduled` (the matmul kernel `function` with `tile`) marked for its weight to be stored in
    `tile`'s panels (weight_panels.py), where W [K, N] is read as it is (not padded to whole panels)."""
    unscheduled = s_tir.Schedule(function)
    block = _matmul_block(unscheduled)
    columns = _matmul_columns(block, unscheduled)
    panel = _panel(columns, lanes, tile)
    matmul = unscheduled.get(block)
    _, column, reduction = (var.var for var in matmul.iter_vars)

    def is_weight(read) -> bool:  # read as W[k, j]
        return len(read.region) == 2 and read.region[0].min.same_as(reduction) and read.region[1].min.same_as(column)

    weight = next((read.source for read in matmul.reads if is_weight(read)), None)
    if columns % panel or weight is None:
        return scheduled
    return weight_panels.mark(scheduled, weight, panel)


def _input_pads(schedule: s_tir.Schedule, matmul) -> list:
    """pad_einsum's copies of the matmul's inputs into padded buffers (not the copy of its padded
    result back, which the epilogue inlines)."""
    padded_result = matmul.writes[0].source
    return [
        block for block in root_blocks(schedule)
        if schedule.get(block).name_hint.endswith("_pad") and not any(read.source.same_as(padded_result) for read in schedule.get(block).reads)
    ]


def _with_small_batch_branches(function: tvm.tirx.PrimFunc, scheduled: tvm.tirx.PrimFunc, lanes: int, tile: MatmulTile, parallel: bool,
                               max_rows: int | None) -> tvm.tirx.PrimFunc:
    """`scheduled` (the matmul kernel `function` with `tile`, rows outside), where batches of fewer rows
    than the tile run `function` scheduled with one row (GEMV_TILE), and, in a parallel kernel, batches
    of one tile of rows run it with the panels outside, so that the threads split them (rows outside,
    one tile of rows is one thread's: the 576->512 layer at 4 rows 19 instead of 12 us): one kernel,
    branching on its (symbolic) rows; where the rows are static, or at most `max_rows`, only the
    schedules for those rows."""
    unscheduled = s_tir.Schedule(function)
    block = _matmul_block(unscheduled)
    rows = unscheduled.get(unscheduled.get_loops(block)[0]).extent
    fewest = int(rows) if isinstance(rows, tvm.tirx.IntImm) else 0
    most = int(rows) if isinstance(rows, tvm.tirx.IntImm) else max_rows
    branches = []  # (rows below which it runs, schedule), fewest rows first
    if tile.rows > GEMV_TILE.rows and fewest < tile.rows:
        # The most vectors, up to GEMV_TILE's, among those padding the fewest of W's columns to whole panels
        # (a padded weight is copied on every call, which at one row costs more than the product): 192
        # columns take 6 vectors, not 8; DeepFM's 400 take 5 (its whole call at batch 1: 0.20 ms instead of
        # 0.33 with 7, whose panels padded W to 448 columns as the 4 x 4 tile's do).
        gemv_tile = _padding_fewest(_matmul_columns(block, unscheduled), lanes,
                                    [MatmulTile(GEMV_TILE.rows, vectors) for vectors in range(GEMV_TILE.vectors, 0, -1)])
        gemv = s_tir.Schedule(function)
        _matmul_rule(gemv, lanes, gemv_tile, parallel, rows_outer=False)
        branches.append((tile.rows, gemv.mod["main"]))
    if parallel and fewest < 2 * tile.rows:
        panels_outside = s_tir.Schedule(function)
        _matmul_rule(panels_outside, lanes, tile, parallel, rows_outer=False)
        branches.append((2 * tile.rows, panels_outside.mod["main"]))
    if most is not None:  # the schedules of more rows than that never run
        last = next((index for index, (below, _) in enumerate(branches) if most < below), None)
        if last is not None:
            branches, scheduled = branches[:last], branches[last][1]
    if not branches:
        return scheduled
    body = scheduled.body
    for below, schedule in reversed(branches):
        body = tvm.tirx.IfThenElse(rows < below, schedule.body, body)
    return branching(scheduled, body)


def _lookups_inlined(function: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc | None:
    """A kernel of embedding lookups (a gather with its id fix-up, dequantization and pooling, grouped
    by targets/lookup_fusion.py) with every block inlined into the one writing the output, so that each
    stored row is read once, straight into it; None for any other kernel. Done once for the kernel's
    serial and parallel schedules, table by table (kernel_blocks.inline_producers): the 313 blocks of
    a 26-table int8 DLRM's lookups took 0.37 s so, 0.63 s in the kernel's one scope."""
    schedule = s_tir.Schedule(function)
    if not any(reads_at_loaded_index(schedule.get(block)) for block in root_blocks(schedule)):
        return None
    return inline_producers(function)


def _lookup_schedule(inlined: tvm.tirx.PrimFunc, lanes: int, parallel: bool) -> tvm.tirx.PrimFunc | None:
    """An inlined lookup kernel (_lookups_inlined) with its output parallel over its outermost loop and
    vectorized over the innermost spatial one (the row's columns), with any pooling reduction moved
    outside the columns so that each step reads a whole row into the output row. None where a
    schedule primitive refuses."""
    schedule = s_tir.Schedule(inlined)
    try:
        for block in root_blocks(schedule):
            loops = schedule.get_loops(block)
            kinds = [var.iter_type for var in schedule.get(block).iter_vars]
            if len(loops) != len(kinds) or len(loops) < 2:
                continue
            spatial = [loop for loop, kind in zip(loops, kinds) if kind == DATA_PARALLEL]
            reduction = [loop for loop, kind in zip(loops, kinds) if kind != DATA_PARALLEL]
            if len(spatial) < 2:
                continue
            if reduction:
                schedule.reorder(*spatial[:-1], *reduction, spatial[-1])
            if parallel:
                schedule.parallel(spatial[0])
            if not _copy_segments(schedule, block, spatial[-1], lanes):
                _vectorize(schedule, spatial[-1], lanes)
            if reduction:  # last: parallel and vectorize refuse a reduction's update block once its init is apart
                schedule.decompose_reduction(block, reduction[0])
    except s_tir.ScheduleError:
        return None
    return prefetching_rows_ahead(schedule.mod["main"])


def _concatenation_rule(schedule: s_tir.Schedule, symbol: str, lanes: int, parallel: bool = True) -> bool:
    """A concatenation picks its source by column: partitioned at the boundaries, each segment of a row is a plain copy loop."""
    if not symbol.startswith("concatenate"):
        return False
    for block in root_blocks(schedule):
        outer, *inner = schedule.get_loops(block)
        if parallel:
            schedule.parallel(outer)
        if inner and not _copy_segments(schedule, block, inner[-1], lanes):
            for loop in inner:
                schedule.annotate(loop, "pragma_loop_partition_hint", 1)
    return True


_IF_THEN_ELSE = tvm.ir.Op.get("prim.if_then_else")


def _concatenated_sources(block: s_tir.SBlock) -> list[tuple[int, tvm.ir.Expr]] | None:
    """(first column, value) of each source of a concatenation along its last axis, in column order:
    TOPI's concatenate picks the source of a column c by a chain if_then_else(start <= c, source,
    ...), latest start first. None for any other block."""
    column = block.iter_vars[-1].var
    value = block.body.value if isinstance(block.body, tvm.tirx.BufferStore) else None
    later = []
    while isinstance(value, tvm.ir.Call) and value.op.same_as(_IF_THEN_ELSE):
        condition = value.args[0]
        if not (isinstance(condition, tvm.tirx.LE) and isinstance(condition.a, tvm.tirx.IntImm) and condition.b.same_as(column)):
            return None
        later.append((int(condition.a), value.args[1]))
        value = value.args[2]
    sources = [(0, value), *reversed(later)]
    starts = [start for start, _ in sources]
    return sources if later and starts == sorted(set(starts)) else None


def _copy_segments(schedule: s_tir.Schedule, block, loop, lanes: int) -> bool:
    """`loop`, the columns of a concatenation `block` (whose sources, inlined, may be gathers), split
    into one loop per source, of vectors where every source's columns are a whole number of them,
    each loop's copy of the block computing its source alone (the lowering's simplifier would find it
    too, but walking every copy's whole chain took it 1.2 s for a 26-table DLRM's lookups): a
    row's segment is a contiguous copy (a table's row, for a lookup). False, and nothing changed,
    where the block is no such concatenation or its columns are not a constant number."""
    sources = _concatenated_sources(schedule.get(block))
    extent = schedule.get(loop).extent
    if sources is None or not isinstance(extent, tvm.tirx.IntImm):
        return False
    bounds = [start for start, _ in sources] + [int(extent)]
    width = _vector_width(lanes, bounds) or 1
    if width > 1:
        loop, _ = schedule.split(loop, factors=[None, width])
    # The last segment's length is inferred (loop_partition refuses factors that add up to the extent).
    lengths = [(end - start) // width for start, end in zip(bounds, bounds[1:-1])]
    for start, segment in zip(bounds, schedule.loop_partition(loop, factors=[*lengths, None])):
        (copy,) = schedule.get_child_blocks(segment)
        stmt = schedule.get(copy)  # the copy's own block variables: loop_partition may rename them
        store = tvm.tirx.BufferStore(stmt.body.buffer, dict(_concatenated_sources(stmt))[start], stmt.body.indices)
        # its reads are the block's of the buffers its source loads: each copy keeping all of them made
        # a 26-table lookup kernel 20x the text, which TIR's lowering took 1.75 s instead of 1.05 over
        loaded = {load.source for load in loads(store.value)}
        reads = [region for region in stmt.reads if region.source in loaded]
        alone = s_tir.SBlock(stmt.iter_vars, reads, stmt.writes, stmt.name_hint, store, stmt.init, stmt.alloc_buffers,
                             stmt.match_buffers, stmt.annotations)
        schedule.state.replace(schedule.get_sref(copy), alone, {stmt: alone})
        if width > 1:
            schedule.vectorize(schedule.get_loops(copy)[-1])
    return True


def _vector_width(lanes: int, extents: list[int]) -> int | None:
    """The widest of a full, half or quarter vector (of more than one lane) that divides every extent."""
    return next((w for w in (lanes, lanes // 2, lanes // 4) if w > 1 and all(e % w == 0 for e in extents)), None)


def _vectorize(schedule: s_tir.Schedule, loop, lanes: int) -> None:
    extent = schedule.get(loop).extent
    if not isinstance(extent, tvm.tirx.IntImm):
        return
    width = _vector_width(lanes, [int(extent)])
    if width is not None:
        _, vector = schedule.split(loop, factors=[None, width])
        schedule.vectorize(vector)


def schedule_function(function: tvm.tirx.PrimFunc, symbol: str, lanes: int, tile: MatmulTile | None = None) -> tvm.tirx.PrimFunc | None:
    """The scheduled function, or None when no rule applies (or a rule's preconditions fail). A
    matmul's register tile is `tile`, by default `default_tile` for its columns. Small work runs on
    the calling thread (serial_below_min_work)."""
    lookups = _lookups_inlined(function)
    if lookups is not None:
        return serial_below_min_work(function, lambda parallel, _: _lookup_schedule(lookups, lanes, parallel))
    return serial_below_min_work(function, lambda parallel, max_rows: _scheduled(function, symbol, lanes, tile, parallel, max_rows))


def serial_below_min_work(function: tvm.tirx.PrimFunc, scheduled: Callable[[bool, int | None], tvm.tirx.PrimFunc | None],
                          work_of: Callable | None = None) -> tvm.tirx.PrimFunc | None:
    """`function` as `scheduled(parallel, max_rows)` schedules it (parallel or not; for any rows, or
    at most max_rows), with as many rows as keep its parallel loops' work (`work_of` the scheduled
    body, by default the first parallel loop's: _parallel_work) below PARALLEL_MIN_WORK run on the
    calling thread alone: chosen when compiled where the rows are known then, else branched on at run
    time. None where `scheduled` gives None."""
    parallel = scheduled(True, None)
    work = (work_of or _parallel_work)(parallel.body) if parallel is not None else None
    if work is None:
        return parallel
    if isinstance(work, tvm.tirx.IntImm):
        return scheduled(False, None) if int(work) < PARALLEL_MIN_WORK else parallel
    rows = symbolic_rows(function)
    serial_rows = _most_rows_below(work, rows, PARALLEL_MIN_WORK) if rows is not None else 0
    if serial_rows == 0:
        return parallel
    serial = scheduled(False, serial_rows)
    return branching(parallel, tvm.tirx.IfThenElse(rows <= serial_rows, serial.body, parallel.body))


def _scheduled(function: tvm.tirx.PrimFunc, symbol: str, lanes: int, tile: MatmulTile | None, parallel: bool,
               max_rows: int | None = None) -> tvm.tirx.PrimFunc | None:
    """`function` scheduled by the first rule that applies, parallel or not, for any rows or (a matmul)
    at most `max_rows`."""
    schedule = s_tir.Schedule(function)
    try:
        if _narrow_matmul_rule(schedule, lanes, parallel):
            return schedule.mod["main"]
        tile = _matmul_rule(schedule, lanes, tile, parallel)
        if tile is not None:
            return _weight_in_panels(function, _with_small_batch_branches(function, schedule.mod["main"], lanes, tile, parallel, max_rows),
                                     lanes, tile)
        if not _concatenation_rule(schedule, symbol, lanes, parallel):
            return None
    except s_tir.ScheduleError:
        return None
    return schedule.mod["main"]


def _most_rows_below(work: tvm.ir.Expr, rows: tvm.tirx.Var, limit: int) -> int:
    """The most rows (up to 2^20) whose `work` (an expression of `rows`, growing with them) stays below `limit`."""

    def work_at(n: int) -> int:
        analyzer = tvm.sym.Analyzer()
        analyzer.bind(rows, tvm.tirx.IntImm(str(rows.ty.dtype), n))
        value = analyzer.simplify(work)
        return int(value) if isinstance(value, tvm.tirx.IntImm) else limit

    low, high = 0, 1  # work_at(low) < limit (or low is 0); find high with work_at(high) >= limit
    while work_at(high) < limit and high < 1 << 20:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if work_at(middle) < limit else (low, middle)
    return low


def _parallel_work(stmt) -> tvm.ir.Expr | None:
    """The innermost statements the first parallel loop in `stmt` runs, all its iterations together
    (its extent times its body's static count); None if there is no parallel loop or its body's loops
    are not static."""
    loop = _first_parallel_loop(stmt)
    inner = _static_work(loop.body) if loop is not None else None
    if inner is None:
        return None
    if isinstance(loop.extent, tvm.tirx.IntImm):
        return tvm.tirx.IntImm(str(loop.extent.ty.dtype), int(loop.extent) * inner)
    return loop.extent * inner


def total_parallel_work(stmt) -> tvm.ir.Expr | None:
    """The innermost statements all parallel loops in `stmt` run (_parallel_work of each, summed): for
    a kernel of several parallel regions one after the other; None if there is none or a body's loops
    are not static."""
    works = [_parallel_work(loop) for loop in _parallel_loops(stmt)]
    if not works or None in works:
        return None
    return tvm.sym.Analyzer().simplify(sum(works[1:], works[0]))


def _first_parallel_loop(stmt) -> tvm.tirx.For | None:
    loops = _parallel_loops(stmt)
    return loops[0] if loops else None


def _parallel_loops(stmt) -> list[tvm.tirx.For]:
    """The parallel loops of `stmt`, in order (not those inside one: TVM does not nest them)."""
    if isinstance(stmt, tvm.tirx.For) and stmt.kind == tvm.tirx.ForKind.PARALLEL:
        return [stmt]
    if isinstance(stmt, tvm.tirx.SeqStmt):
        children = list(stmt.seq)
    elif isinstance(stmt, tvm.tirx.IfThenElse):
        children = [stmt.then_case, stmt.else_case]
    elif isinstance(stmt, s_tir.SBlockRealize):
        children = [stmt.block]
    else:
        children = [getattr(stmt, "body", None)]
    return [loop for child in children if child is not None for loop in _parallel_loops(child)]


def _static_work(stmt) -> int | None:
    """How many innermost statements (stores) `stmt` runs, if its loops are static."""
    if isinstance(stmt, tvm.tirx.For):
        inner = _static_work(stmt.body)
        return int(stmt.extent) * inner if isinstance(stmt.extent, tvm.tirx.IntImm) and inner is not None else None
    if isinstance(stmt, tvm.tirx.SeqStmt):
        counts = [_static_work(child) for child in stmt.seq]
        return None if None in counts else sum(counts)
    if isinstance(stmt, tvm.tirx.IfThenElse):
        counts = [_static_work(branch) for branch in (stmt.then_case, stmt.else_case) if branch is not None]
        return None if None in counts else max(counts)
    if isinstance(stmt, s_tir.SBlockRealize):
        return _static_work(stmt.block)
    body = getattr(stmt, "body", None)
    return 1 if body is None else _static_work(body)


def apply_default_schedules(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    lanes = vector_lanes(target)
    updates = {}
    for symbol, function in module.functions.items():
        if isinstance(function, tvm.tirx.PrimFunc):
            scheduled = schedule_function(function, symbol.name_hint, lanes)
            if scheduled is not None:
                updates[symbol] = scheduled
    for symbol, function in updates.items():
        module[symbol] = function
    return module


def matmul_tile_alternatives(function: tvm.tirx.PrimFunc, target: tvm.target.Target) -> list[tuple[str, tvm.tirx.PrimFunc]]:
    """A matmul kernel scheduled with each of ALTERNATIVE_MATMUL_TILES (labelled) that pads no more of
    its weight's columns than its default tile does, for -O3 to measure against its default schedule;
    nothing for other kernels. A tile padding more copies the padded weight on every call, where the
    default's weight is stored in panels, and measured alone it misjudged the model: on DeepFM's
    400-column layers the 12x2 and 6x4 tiles measured 3% and 15% faster at 1024 rows and, chosen from
    256 rows on, made the model 15% slower at batch 2048 (10.95 against 9.39 ms)."""
    schedule, lanes = s_tir.Schedule(function), vector_lanes(target)
    block = _matmul_block(schedule)
    if block is None or _is_narrow(schedule, block, lanes):
        return []
    columns = _matmul_columns(block, schedule)
    least = _padded_columns(columns, lanes, default_tile(columns, lanes))
    tiles = [tile for tile in ALTERNATIVE_MATMUL_TILES if _padded_columns(columns, lanes, tile) <= least]
    scheduled = ((tile.label, schedule_function(function, "", lanes, tile)) for tile in tiles)
    return [(label, function) for label, function in scheduled if function is not None]
