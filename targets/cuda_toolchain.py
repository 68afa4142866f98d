"""What TVM needs to emit CUDA device code on a machine without a GPU.

TVM's CUDA codegen hands its kernels to libtvm_runtime_cuda.so, which wraps the compiled binary in a
CUDA module. That library links libcuda.so.1 (the driver), so where no driver is installed TVM's
import fails to load it, swallows the error, and a CUDA build silently embeds CUDA C source instead
of device code. reccc loads the library itself: against the real driver when there is one, else
against a stub libcuda.so.1 that exports the driver symbols the library imports (every one returns
CUDA_ERROR_NO_DEVICE; nothing calls them while compiling). The stub is generated and compiled once
into reccc's cache directory.
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm_ffi
from tvm.base import _LOADED_LIBS
from tvm_ffi.libinfo import load_lib_ctypes

from reccc.errors import CompileError, one_line

DRIVER_SONAME = "libcuda.so.1"
CUDART_SONAME = "libcudart.so.13"  # the CUDA runtime API version apache-tvm 0.27's wheel links
# Registered by libtvm_runtime_cuda.so once it is loaded.
CUDA_RUNTIME_PROBE = "device_api.cuda"
CUDA_ERROR_NO_DEVICE = 100


def check_nvcc(arch: str) -> None:
    """nvcc must be on PATH (TVM runs it by name) and know `arch`; else a CompileError saying so."""
    if shutil.which("nvcc") is None:
        raise CompileError("the CUDA target needs nvcc (the CUDA toolkit) on PATH to compile device code")
    try:
        listing = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise CompileError(f"nvcc --list-gpu-code failed: {one_line(error)}") from error
    known = listing.split()
    if arch not in known:
        raise CompileError(f"this nvcc cannot compile for {arch} (it knows {', '.join(known)})")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reccc"


def _runtime_library_path() -> Path:
    return Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"


def _driver_symbols(library: Path) -> list[str]:
    """The driver API functions `library` imports: its undefined, unversioned cu* symbols (the
    CUDA runtime's cuda* symbols carry a libcudart version)."""
    try:
        listing = subprocess.run(
            ["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise CompileError(f"cannot list the driver symbols of {library} with nm: {one_line(error)}") from error
    symbols = re.findall(r"^\s+U (cu[A-Z]\w*)$", listing, flags=re.MULTILINE)
    if not symbols:
        raise CompileError(f"{library} imports no CUDA driver symbols; cannot build a stub {DRIVER_SONAME}")
    return sorted(symbols)


def stub_driver(library: Path) -> Path:
    """The stub libcuda.so.1 for `library`, built on first use (keyed by the symbols it must export)."""
    symbols = _driver_symbols(library)
    source = "".join(f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for name in symbols)
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    stub = cache_dir() / f"libcuda-stub-{key}" / DRIVER_SONAME
    if stub.exists():
        return stub
    stub.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=stub.parent) as scratch:
        source_file = Path(scratch) / "libcuda_stub.c"
        source_file.write_text(source)
        built = Path(scratch) / DRIVER_SONAME
        command = ["gcc", "-shared", "-fPIC", f"-Wl,-soname,{DRIVER_SONAME}", "-o", str(built), str(source_file)]
        try:
            subprocess.run(command, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            raise CompileError(f"cannot build the stub {DRIVER_SONAME} with gcc: {one_line(detail)}") from error
        os.replace(built, stub)  # atomic: concurrent builds each install a complete file
    return stub


def _load_driver(library: Path) -> None:
    """Make a libcuda.so.1 resident, so the dynamic loader resolves the runtime's dependency on it."""
    try:
        ctypes.CDLL(DRIVER_SONAME, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(stub_driver(library)), mode=ctypes.RTLD_GLOBAL)


def _load_cuda_runtime_api() -> None:
    """The library also links libcudart; where the loader does not find it, use the one next to nvcc."""
    try:
        ctypes.CDLL(CUDART_SONAME, mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    toolkit = Path(shutil.which("nvcc") or "nvcc").resolve().parent.parent
    for candidate in (toolkit / "lib64" / CUDART_SONAME, toolkit / "lib" / CUDART_SONAME):
        if candidate.exists():
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            return


def ensure_cuda_runtime() -> None:
    """Load libtvm_runtime_cuda.so if TVM's import could not; raise CompileError if it still cannot."""
    if tvm_ffi.get_global_func(CUDA_RUNTIME_PROBE, allow_missing=True) is not None:
        return
    library = _runtime_library_path()
    _load_driver(library)
    _load_cuda_runtime_api()
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[library.parent], mode="RTLD_LOCAL"
        )
    except (OSError, RuntimeError) as error:
        raise CompileError(f"cannot load TVM's CUDA runtime {library.name}: {one_line(error)}") from error
