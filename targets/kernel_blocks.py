"""A fused kernel's blocks as the targets' schedule rules see them: the blocks under its root, a block
found by name, their iteration kinds, and its data-parallel stages inlined into the block that writes
the output."""

from collections.abc import Collection

import tvm_ffi
from tvm import s_tir, tirx

DATA_PARALLEL, COMM_REDUCE = 0, 2  # IterVar.iter_type of a spatial and of a reduction block var


def root_blocks(schedule: s_tir.Schedule) -> list:
    return schedule.get_child_blocks(schedule.get_sblock("root"))


def find_block(schedule: s_tir.Schedule, name: str):
    """The block named `name`, None if the kernel has none (the rules' test of what a kernel is)."""
    try:
        return schedule.get_sblock(name)
    except s_tir.ScheduleError:
        return None


def inline_into_output(schedule: s_tir.Schedule, keep: Collection[str]) -> None:
    """Every data-parallel block but those named in `keep` inlined into its reader (pad_einsum's copy
    of a padded result back included): the epilogue becomes one expression per output element, where
    per-row values are loop-invariant."""
    for block in reversed(root_blocks(schedule)):
        stmt = schedule.get(block)
        if stmt.name_hint in keep or any(var.iter_type != DATA_PARALLEL for var in stmt.iter_vars):
            continue
        try:
            schedule.compute_inline(block)
        except s_tir.ScheduleError:  # it writes the function's output
            continue


def inline_producers(function: tirx.PrimFunc) -> tirx.PrimFunc:
    """`function` with every block that can be inlined (not a reduction, not writing an output) inlined
    into its readers, producers first, each into readers still small. Each inlining rewrites the
    whole scope, so a kernel of many independent chains (a lookup kernel's tables, 12 blocks each for
    int8, meeting in a Concat) would cost the square of its blocks: each chain is inlined first in a
    scope of its own (chain_by_chain), then what is left of them into their meeting block."""
    schedule = s_tir.Schedule(_chain_by_chain(function))
    for block in root_blocks(schedule):
        try:
            schedule.compute_inline(block)
        except s_tir.ScheduleError:  # it writes an output, or it is a reduction
            continue
    return schedule.mod["main"]


def _chain_by_chain(function: tirx.PrimFunc) -> tirx.PrimFunc:
    """`function` with the producers of each chain inlined in a scope of the chain alone. A chain is a
    maximal set of root stages connected by the buffers the kernel allocates, not counting the stages
    that write an output (where chains meet); its last stages, whose buffers stages outside it read,
    stay."""
    root = function.body.block
    stages = list(root.body.seq) if isinstance(root.body, tirx.SeqStmt) else [root.body]
    allocated = set(root.alloc_buffers)
    reads, writes = zip(*(_accessed(stage) for stage in stages))
    writer = {buffer: index for index, written in enumerate(writes) for buffer in written & allocated}
    meeting = {index for index, written in enumerate(writes) if written - allocated}
    chain = list(range(len(stages)))  # union-find over the stages

    def find(index: int) -> int:
        while chain[index] != index:
            index = chain[index]
        return index

    for index in set(range(len(stages))) - meeting:
        for buffer in reads[index] & allocated:
            if writer.get(buffer) is not None and writer[buffer] not in meeting:
                chain[find(index)] = find(writer[buffer])
    chains: dict[int, list[int]] = {}
    for index in sorted(set(range(len(stages))) - meeting):
        chains.setdefault(find(index), []).append(index)
    replaced, dropped = {}, set()
    for members in chains.values():
        if len(members) < 2:
            continue
        touched = set().union(*(reads[index] | writes[index] for index in members))
        own = [buffer for buffer in root.alloc_buffers if buffer in touched]
        # the chain's own parameters only: each inlining's cost grows with the function's too
        alone = tirx.PrimFunc([param for param in function.params if param in touched],
                              s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], root.name_hint, tirx.SeqStmt([stages[i] for i in members]),
                                                                         alloc_buffers=own)),
                              function.ret_type, function.attrs)
        schedule = s_tir.Schedule(alone)
        read_outside = {buffer for index in set(range(len(stages))) - set(members) for buffer in reads[index]}
        for block in root_blocks(schedule):
            if not (_accessed(schedule.get(block))[1] & read_outside):
                try:
                    schedule.compute_inline(block)
                except s_tir.ScheduleError:
                    continue
        left = schedule.mod["main"].body.block
        dropped |= set(own) - set(left.alloc_buffers)
        replaced.update({index: [] for index in members[:-1]})
        replaced[members[-1]] = list(left.body.seq) if isinstance(left.body, tirx.SeqStmt) else [left.body]
    if not replaced:
        return function
    body = [stmt for index, stage in enumerate(stages) for stmt in replaced.get(index, [stage])]
    kept = [buffer for buffer in root.alloc_buffers if buffer not in dropped]
    return function.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], root.name_hint, body[0] if len(body) == 1 else tirx.SeqStmt(body),
                                                                       alloc_buffers=kept)))


def _accessed(stmt) -> tuple[set, set]:
    """The buffers the blocks in `stmt` read and write."""
    reads, writes = set(), set()

    def visit(block):
        reads.update(region.source for region in block.reads)
        writes.update(region.source for region in block.writes)

    tvm_ffi.structural_walk(stmt, [(s_tir.SBlock, visit)])
    return reads, writes
