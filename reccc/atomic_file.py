"""Write an output file atomically: readers see the old file or the whole new one, never a half-written one."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from reccc.errors import UsageError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is removed.

    The temporary file lives in the destination folder so the final rename never crosses file systems.
    """
    destination = Path(path)
    folder = destination.parent if str(destination.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{destination}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{destination}: output folder '{folder}' is not writable")
    if destination.is_dir():
        raise UsageError(f"{destination}: is a directory")
    fd, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=folder)
    os.close(fd)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.chmod(temporary_path, 0o644)
        os.replace(temporary_path, destination)
    finally:
        temporary_path.unlink(missing_ok=True)
