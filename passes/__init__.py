"""reccc's built-in pass library. Importing it registers every pass (see the `reccc.passes` entry point)."""

from reccc.passes import constant_folding, dead_code_elimination  # noqa: F401  (imported to register)
