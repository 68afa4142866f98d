"""reccc: an optimizing compiler for ONNX recommender models, lowered through Apache TVM.

Public API: `reccc.compile(model, output, ...)` and `reccc.load(artifact).run(inputs)`.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "compile", "load"]


def compile(model, output, **options):  # noqa: A001  (the natural name, as in re.compile)
    """Compile `model` (an .onnx path) to `output`; `options` are reccc.compiler.CompileOptions fields."""
    from reccc.compiler import CompileOptions, compile_model

    return compile_model(model, output, CompileOptions(**options))


def load(path):
    """Load a compiled artifact; see reccc.runtime.CompiledModel."""
    from reccc.runtime import load as load_artifact

    return load_artifact(path)
