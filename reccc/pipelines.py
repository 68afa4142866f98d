"""The pass pipeline of each optimization level, by pass name."""

from reccc.errors import UsageError

PIPELINES: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("dead-code-elimination",),
    2: ("constant-folding", "dead-code-elimination"),
    3: ("constant-folding", "dead-code-elimination"),
}


def pipeline_for(opt_level: int, explicit: list[str] | None, disabled: list[str]) -> list[str]:
    """The pass names to run: `explicit` (--passes) if given, else the level's pipeline, minus `disabled`."""
    names = list(explicit) if explicit is not None else list(PIPELINES[opt_level])
    unknown_disabled = [name for name in disabled if name not in names]
    if unknown_disabled:
        raise UsageError(f"--disable-pass: '{unknown_disabled[0]}' is not in the pipeline ({', '.join(names) or 'empty'})")
    return [name for name in names if name not in disabled]
