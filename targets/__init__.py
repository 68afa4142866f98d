"""reccc's built-in targets. Importing it registers them (see the `reccc.targets` entry point)."""

from reccc.targets import arm, cuda, x86  # noqa: F401  (imported to register)
