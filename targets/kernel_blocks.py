"""A fused kernel's blocks as the targets' schedule rules see them: the blocks under its root, a block
found by name, their iteration kinds, and its data-parallel stages inlined into the block that writes
the output."""

from collections.abc import Collection

from tvm import s_tir

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
