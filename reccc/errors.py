"""The exceptions reccc raises, and the process exit code each one maps to.

Compiler conventions: exit 1 is a compile failure, exit 2 bad usage or bad input.
Run-time errors of a compiled model are ordinary Python exceptions (ValueError / IndexError
subclasses) so callers can catch them without knowing reccc.
"""


class ReccError(Exception):
    """Base of every error reccc reports to a user as one clear line."""

    exit_code = 1


class UsageError(ReccError):
    """Bad command-line usage or bad input: a missing, corrupt or unsupported model, a bad flag."""

    exit_code = 2


class CompileError(ReccError):
    """The input was fine but compiling it failed (a pass broke the model, TVM failed)."""

    exit_code = 1


class ModelInputError(ValueError):
    """A compiled model was called with inputs that do not match its manifest."""


class EmbeddingIndexError(IndexError):
    """An embedding id was outside its table's rows (with --index-check=error)."""


def one_line(error: BaseException) -> str:
    """An exception's message as one line: its first paragraph with whitespace collapsed, without the
    '==> Context' trailer ONNX's checker appends."""
    text = str(error).split("==> Context")[0].strip()
    paragraph = text.split("\n\n")[0]
    return " ".join(paragraph.split()) or type(error).__name__
