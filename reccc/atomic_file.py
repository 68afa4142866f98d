"""Write an output file atomically: readers see the old file or the whole new one, never a half-written one."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from reccc.errors import UsageError


def check_writable(path: str | os.PathLike) -> None:
    """Raise UsageError unless a file can be written at `path` (checked before any long work)."""
    destination = Path(path)
    folder = destination.parent
    if not folder.is_dir():
        raise UsageError(f"{destination}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{destination}: output folder '{folder}' is not writable")
    if destination.is_dir():
        raise UsageError(f"{destination}: is a directory")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is removed.

    The temporary file lives in the destination folder so the final rename never crosses file systems.
    """
    destination = Path(path)
    check_writable(destination)
    fd, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    os.close(fd)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.chmod(temporary_path, 0o644)
        os.replace(temporary_path, destination)
    finally:
        temporary_path.unlink(missing_ok=True)
