"""reccc: an optimizing compiler for ONNX recommender models, lowered through Apache TVM.

Public API: `reccc.compile(model, output, ...)` and `reccc.load(artifact).run(inputs)`.
"""

import os

__version__ = "0.1.0"

# TVM sizes a thread's pool once, when that thread first runs a parallel kernel: TVM_NUM_THREADS
# threads, else one per two cores on x86, and TVM 0.27 cannot grow it later (runtime.config_threadpool
# only lowers the count in use). Set before reccc runs any TVM code, so that every pool the process
# starts, compiling or serving, and the subprocesses that measure -O3's candidates, use every core, as
# onnxruntime does. A TVM_NUM_THREADS already set wins.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

__all__ = ["__version__", "compile", "load"]


def compile(model, output, **options):  # noqa: A001  (the natural name, as in re.compile)
    """Compile `model` (an .onnx path) to `output`; `options` are reccc.compiler.CompileOptions fields."""
    from reccc.compiler import CompileOptions, compile_model

    return compile_model(model, output, CompileOptions(**options))


def load(path):
    """Load a compiled artifact; see reccc.runtime.CompiledModel."""
    from reccc.runtime import load as load_artifact

    return load_artifact(path)
