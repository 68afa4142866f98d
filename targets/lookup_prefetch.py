"""Software prefetch of the embedding rows a scheduled lookup kernel reads a few output rows later.

A lookup's row address is known only once its id is loaded, so the hardware prefetchers cannot run
ahead of random rows, and each row costs a miss to L3 or DRAM. A plain C gather of DeepFM's 64-byte
rows reaches 43% of the copy rate, 48-56% prefetching 16 to 32 lookups ahead
(tools/gather_ceiling.py). So before each vector loop that copies part of a gathered row, the kernel
prefetches the same part of the row that loop will read `ahead` output rows later, its id read from
that row (the last row's, past the end). Measured on the standard DeepFM (26 ids a row into a 1M x 16
fp32 table) at batch 2048, alternating builds: its lookup kernel 0.40 ms instead of 0.48, and 0.43
instead of 0.46 in a second run (prefetching 2 or 3 rows ahead there: 0.44); the standard DLRM's
256-byte rows were no faster (see MAX_ROW_BYTES).
"""

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from reccc.targets.tir_expressions import has_load, uses

# How many lookups ahead to prefetch: the C gather's best distance was 16 to 32.
LOOKUPS_AHEAD = 16
# Tables smaller than a core's L2 stay cached from call to call: prefetching them would only add work.
MIN_TABLE_BYTES = 2 << 20
# Rows of several cache lines are fetched line after line by the hardware's own prefetchers once the
# first misses: prefetching each line too made the standard DLRM's 256-byte rows no faster.
MAX_ROW_BYTES = 64


def _bytes(dtype, dims) -> int:
    """The size of a tensor of `dims`, 0 where a dim is symbolic."""
    size = tvm.DataType(dtype).bits // 8
    for dim in dims:
        size *= int(dim) if isinstance(dim, tirx.IntImm) else 0
    return size


def _prefetched(table) -> bool:
    """A table large enough to miss the caches, of rows of at most a cache line."""
    return _bytes(table.dtype, table.shape) >= MIN_TABLE_BYTES and 0 < _bytes(table.dtype, table.shape[1:]) <= MAX_ROW_BYTES


def _gathers(value) -> list:
    """The loads in `value` at an index that itself loads (a table's row at an id) from a table worth
    prefetching, one per table."""
    gathers, tables = [], []

    def visit(load):
        if any(has_load(index) for index in load.indices) and _prefetched(load.source) \
                and not any(load.source.same_as(table) for table in tables):
            gathers.append(load)
            tables.append(load.source)

    tvm_ffi.structural_walk(value, [(tvm.ir.TensorLoad, visit)])
    return gathers


def _substituted(expr, values: dict):
    return tvm_ffi.structural_map(expr, [(tirx.Var, lambda var: values.get(var, var))])


@dataclass(frozen=True)
class _Copy:
    """A vectorized loop whose body is one block storing a value that gathers rows worth prefetching."""

    loop: tirx.For
    enclosing: tuple  # the loops around it, within the row loop
    gathers: list  # (table, its indices in the loops' variables), one per table


def _vector_copies(stmt, enclosing: tuple = ()) -> list[_Copy]:
    if isinstance(stmt, tirx.For):
        body = stmt.body
        if stmt.kind == tirx.ForKind.VECTORIZED and isinstance(body, s_tir.SBlockRealize) and isinstance(body.block.body, tirx.BufferStore):
            bound = {var.var: value for var, value in zip(body.block.iter_vars, body.iter_values)}
            gathers = [(gather.source, [_substituted(index, bound) for index in gather.indices]) for gather in _gathers(body.block.body.value)]
            return [_Copy(stmt, enclosing, gathers)] if gathers else []
        return _vector_copies(body, (*enclosing, stmt))
    if isinstance(stmt, tirx.SeqStmt):
        return [copy for child in stmt.seq for copy in _vector_copies(child, enclosing)]
    if isinstance(stmt, s_tir.SBlockRealize):
        return _vector_copies(stmt.block.body, enclosing)
    if isinstance(stmt, tirx.IfThenElse):
        return [copy for branch in (stmt.then_case, stmt.else_case) if branch is not None for copy in _vector_copies(branch, enclosing)]
    return []


def _lookups(copy: _Copy) -> int:
    """How many rows the copy loop's gathers read in one iteration of the loops around it: the product
    of the static extents of those whose variable the ids are read at (a bag's or DeepFM's fields),
    not those running over the columns of one row."""
    ids = [index for _, indices in copy.gathers for index in indices if has_load(index)]
    lookups = 1
    for loop in copy.enclosing:
        if isinstance(loop.extent, tirx.IntImm) and any(uses(index, loop.loop_var) for index in ids):
            lookups *= int(loop.extent)
    return lookups


def prefetching_rows_ahead(function: tirx.PrimFunc) -> tirx.PrimFunc:
    """`function`, a lookup kernel whose outermost loop runs over the output's rows, with each of its
    vector loops that copy gathered rows preceded by a prefetch of their part of the rows `ahead` output
    rows later, `ahead` being enough rows for LOOKUPS_AHEAD lookups. Unchanged where there is no such loop."""
    root = function.body.block
    rows = root.body
    copies = _vector_copies(rows.body) if isinstance(rows, tirx.For) else []
    if not copies:
        return function
    ahead = max(1, -(-LOOKUPS_AHEAD // sum(map(_lookups, copies))))
    later_row = tirx.Min(rows.loop_var + tirx.const(ahead, rows.loop_var.ty.dtype), rows.min + rows.extent - 1)

    def with_prefetch(loop):
        copy = next((copy for copy in copies if loop.same_as(copy.loop)), None)
        if copy is None:
            return loop
        prefetches = []
        for table, indices in copy.gathers:
            later = [_substituted(index, {loop.loop_var: loop.min, rows.loop_var: later_row}) for index in indices]
            address = tirx.address_of(tirx.BufferLoad(table, later))
            # a read (0), to be kept in every cache level (3), of data (1)
            prefetches.append(tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, 0, 3, 1)))
        return tirx.SeqStmt([*prefetches, loop])

    body = tvm_ffi.structural_map(rows, [(tirx.For, with_prefetch)])
    return function.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], root.name_hint, body, alloc_buffers=root.alloc_buffers)))
