"""Silencing what TVM writes while it compiles: C++ logging and LLVM straight to file descriptor 2,
importer diagnostics printed to stdout.

reccc is quiet by default; -v leaves both alone so TVM's log is seen. reccc's own errors are printed
after the silenced region ends.
"""

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def silenced_output(enabled: bool) -> Iterator[None]:
    """While active (and `enabled`), whatever is written to fds 1 and 2 is discarded."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(os.devnull, "wb") as sink:
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
