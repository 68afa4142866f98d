"""Silencing what native code (TVM's C++ logging, LLVM) writes straight to file descriptor 2.

reccc is quiet by default; -v leaves fd 2 alone so TVM's log is seen. reccc's own errors are printed
after the silenced region ends.
"""

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def silenced_stderr(enabled: bool) -> Iterator[None]:
    """While active (and `enabled`), what native code writes to fd 2 is discarded."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
