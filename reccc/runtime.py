"""Loading and running a compiled reccc artifact: `reccc.load("model.so").run({...})`.

Inputs are checked against the artifact's manifest before they reach compiled code, so a wrong name,
dtype, rank or batch size raises a ModelInputError naming the input instead of crashing the process.
"""

import platform
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reccc import host_cpu, huge_pages
from reccc.errors import EmbeddingIndexError, ModelInputError, UsageError
from reccc.manifest import IndexGuard, Manifest, TensorSpec, read_manifest
from reccc.weights_file import map_weights


# TVM takes a numpy array without a copy only at this alignment of its data.
TVM_ALIGNMENT = 64
# CPU inputs from this size on are viewed by the kernels instead of copied into kept buffers (a copy
# of 1 MiB costs about what a whole call at batch 64 does).
HOST_VIEW_BYTES = 2**20


def load(path: str | Path) -> "CompiledModel":
    """Load an artifact written by `reccc MODEL -o path` for a target this machine can run. Its kernels
    run on TVM_NUM_THREADS threads, which reccc sets to every core unless it is set (reccc/__init__.py)."""
    return CompiledModel(Path(path))


class CompiledModel:
    def __init__(self, path: Path):
        import tvm  # deferred: importing TVM takes a second, and `reccc --help` needs none of it
        import tvm_ffi

        self.path = path
        self.manifest: Manifest = read_manifest(path)
        _check_host_arch(self.manifest, path)
        host_cpu.prepare_to_run(self.manifest.cpu_flags, path)  # before the library: AMX needs the process's request
        self._device = _device_for(self.manifest, path)
        self._vm = huge_pages.virtual_machine(path, self._device)
        self._main = self._vm["main"]
        # A Relax VM runs one call at a time: concurrent calls corrupt its registers and crash the process.
        self._vm_lock = threading.Lock()
        self._on_cpu = self._device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        # On the CPU a large input (and a weights file's array) is viewed through DLPack and an output is
        # copied out of its DLPack view (Tensor.numpy() costs ~7 us an output, the view and copy well
        # under 1); a GPU copies both ways.
        self._to_tensor = tvm.runtime.from_dlpack if self._on_cpu else lambda array: tvm.runtime.tensor(array, self._device)
        self._empty_tensor = tvm.runtime.empty
        # Inputs are copied into buffers kept from the last call of the same shape. On a GPU, allocating
        # them anew costs a cudaMalloc and a cudaFree per input and call (a DLRM with 9 inputs on an
        # H200: 1.18 ms a call at batch 1 before, 0.47 after). On the CPU a copy into a kept buffer
        # costs 0.3 us for a small input, where viewing numpy's memory costs 2-4 us (TVM's DLPack import,
        # its alignment check, and an aligned copy where numpy's alignment is not TVM's): the standard
        # DLRM's 9 inputs took 20 us of a 0.15 ms call at batch 1. Inputs of HOST_VIEW_BYTES or more
        # are viewed, not copied (where aligned).
        # The feeds of the last call, by input in the manifest's order; a call whose inputs have the
        # same shapes and dtypes matches the manifest as that one did, and skips the checks.
        self._feeds: dict[str, _Feed] | None = None
        self._input_checks = _InputChecks(self.manifest.inputs)
        self._to_numpy = _copy_of_host_tensor if self._on_cpu else lambda tensor: tensor.numpy()
        # The index guard's flags are only tested: on the CPU through a view, not a copy.
        self._flags_of = _host_view if self._on_cpu else lambda tensor: tensor.numpy()
        self._guarded = self.manifest.index_flags_output is not None
        self._output_names = [spec.name for spec in self.manifest.outputs]
        self._one_result = len(self._output_names) + self._guarded == 1
        # TVM's result array by index without its __getitem__'s Python (a length call and index checks):
        # 0.36 instead of 0.86 us an element.
        self._result = tvm_ffi.get_global_func("ffi.ArrayGetItem")
        # --weights=external: main's parameters after the inputs, views of the mapped weights file.
        weights = map_weights(path, self.manifest.weights) if self.manifest.weights is not None else []
        self._weights = [self._as_tensor(array) for array in weights]

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.manifest.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.manifest.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; returns the graph's outputs by name. Safe to call from several threads: the calls
        take turns (load the artifact once per thread to run them in parallel)."""
        if inputs.keys() != self._input_checks.names:
            self._input_checks.arrays(inputs)  # raises naming the unknown or missing input
        with self._vm_lock:
            tensors = self._fed_as_last_call(inputs)
            if tensors is None:
                arrays = self._input_checks.arrays(inputs)
                self._feeds = {name: self._feed_for(array) for name, array in arrays.items()}
                tensors = self._fed_as_last_call(arrays)
            results = self._main(*tensors, *self._weights)
            if self._one_result:
                return {self._output_names[0]: self._to_numpy(results)}
            outputs = {name: self._to_numpy(self._result(results, index)) for index, name in enumerate(self._output_names)}
            if self._guarded:
                flags = self._flags_of(self._result(results, len(self._output_names)))
                if flags is not None and np.count_nonzero(flags):  # 0.3 us, where flags.any() takes 1
                    guard = next(guard for guard, flag in zip(self.manifest.index_guards, flags) if flag > 0)
                    raise EmbeddingIndexError(_index_error_message(guard, self._input_checks.arrays(inputs)))
        return outputs

    def _fed_as_last_call(self, inputs: Mapping[str, np.ndarray]) -> list | None:
        """The inputs as TVM tensors, fed as in the last call, if each is a numpy array of that call's
        shape and dtype (then they match the manifest, checked in that call); else None."""
        if self._feeds is None:
            return None
        tensors = []
        for name, feed in self._feeds.items():
            array = inputs[name]
            if type(array) is not np.ndarray or array.shape != feed.shape or array.dtype != feed.dtype:
                return None
            if feed.view is not None:
                feed.view[...] = array
                tensors.append(feed.tensor)
            elif feed.tensor is not None:
                if array.size:
                    feed.tensor.copyfrom(array)
                tensors.append(feed.tensor)
            else:
                tensors.append(self._as_tensor(np.ascontiguousarray(array)))
        return tensors

    def _feed_for(self, array: np.ndarray) -> "_Feed":
        """How an input of this shape and dtype reaches the kernels: copied into a buffer kept for the
        calls that follow (on the CPU through a numpy view of it), or on the CPU, from HOST_VIEW_BYTES
        on, viewed where it is."""
        if self._on_cpu and array.nbytes >= HOST_VIEW_BYTES:
            return _Feed(array.shape, array.dtype, None, None)
        tensor = self._empty_tensor(array.shape, str(array.dtype), self._device)
        # None on a GPU, or for a dtype numpy's DLPack import lacks (bfloat16): TVM's own copy then
        return _Feed(array.shape, array.dtype, _host_view(tensor) if self._on_cpu else None, tensor)

    def _as_tensor(self, array: np.ndarray):
        """The input as a TVM tensor viewing numpy memory: the array itself when TVM accepts its
        alignment, else an aligned numpy copy. (tvm.runtime.tensor's own copy costs ~30 us an input,
        more than the whole model at small batches.)"""
        if array.size == 0:  # numpy's DLPack view of an empty array fails TVM's alignment and stride checks
            return self._empty_tensor(array.shape, str(array.dtype), self._device)
        if array.ctypes.data % TVM_ALIGNMENT:
            array = _aligned_copy(array)
        return self._to_tensor(array)


@dataclass(frozen=True)
class _Feed:
    """An input's shape and dtype in the last call, and its buffer kept for the next (a numpy view of
    it, where numpy can view it), or no buffer where the input is viewed in place."""

    shape: tuple[int, ...]
    dtype: np.dtype
    view: np.ndarray | None
    tensor: object | None


def _check_host_arch(manifest: Manifest, path: Path) -> None:
    """A CPU artifact built for another ISA (a cross-compiled one) cannot load here: say so, not dlopen."""
    arch = str(manifest.target.get("mtriple", "")).split("-")[0]
    if manifest.target.get("kind") == "llvm" and arch and arch != platform.machine():
        raise UsageError(
            f"{path}: built for {manifest.target['mtriple']}, and this host is {platform.machine()}: "
            f"run it on an {arch} machine (README: Cross-compilation and deployment)"
        )


def _device_for(manifest: Manifest, path: Path):
    """The device the artifact's kernels run on: a CUDA artifact's on GPU 0 (its target kind says so)."""
    import tvm

    if manifest.target.get("kind") != "cuda":
        return tvm.cpu()
    device = tvm.cuda(0)
    if device.exist:
        return device
    why_not = load_tvm_cuda_runtime()
    device = tvm.cuda(0)
    if not device.exist:
        raise UsageError(
            f"{path}: built for CUDA ({manifest.target.get('arch')}) and needs a CUDA GPU with its driver; "
            f"this process sees none{f' ({why_not})' if why_not else ''}"
        )
    return device


def load_tvm_cuda_runtime() -> str | None:
    """Load TVM's CUDA runtime library (libtvm_runtime_cuda.so); returns why it did not load, if not.
    A full TVM loads it at import and swallows its failure; a runtime-only TVM (TVM_USE_RUNTIME_LIB=1,
    or a deployment without libtvm_compiler.so, 100 MB lighter) does not load it at all."""
    import tvm
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_folder = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_folder], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as error:  # FileNotFoundError is an OSError
        return f"TVM's CUDA runtime library did not load: {error}"
    return None


def _host_view(tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor, or None for a dtype numpy's DLPack import lacks (bfloat16)."""
    try:
        return np.from_dlpack(tensor)
    except RuntimeError:
        return None


def _copy_of_host_tensor(tensor) -> np.ndarray:
    """A numpy copy of a CPU tensor. Not the view itself: an output may be one of the model's constants,
    which the caller must not be able to change."""
    try:
        return np.from_dlpack(tensor).copy()
    except RuntimeError:  # a dtype numpy's DLPack import lacks (bfloat16): TVM's own conversion knows it
        return tensor.numpy()


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    raw = np.empty(array.nbytes + TVM_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % TVM_ALIGNMENT
    copy = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


class _InputChecks:
    """The checks of a call's inputs against the manifest's specs (names, dtypes, ranks, static sizes,
    symbolic sizes agreeing across inputs), prepared once: they run on every call, where a few
    microseconds are a tenth of a small model's time."""

    def __init__(self, specs: list[TensorSpec]):
        self._names = [spec.name for spec in specs]
        self.names = set(self._names)
        # Per input: its spec, numpy dtype, rank, and (axis, dim, whether the dim is a static size).
        self._checks = [
            (spec, np.dtype(spec.dtype), len(spec.shape), tuple((axis, dim, isinstance(dim, int)) for axis, dim in enumerate(spec.shape)))
            for spec in specs
        ]

    def arrays(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs as numpy arrays, by name in the specs' order, once each matches its spec; else a
        ModelInputError naming the first input and dim that does not."""
        if inputs.keys() != self.names:
            unknown = sorted(set(inputs) - self.names)
            if unknown:
                raise ModelInputError(f"unknown input '{unknown[0]}' (the model's inputs are: {', '.join(self._names)})")
            missing = [name for name in self._names if name not in inputs]
            raise ModelInputError(f"missing input '{missing[0]}' (the model's inputs are: {', '.join(self._names)})")
        bound: dict[str, tuple[int, str]] = {}  # symbolic dim -> (size, input that fixed it)
        arrays = {}
        for spec, dtype, rank, dims in self._checks:
            array = inputs[spec.name]
            if type(array) is not np.ndarray:
                array = np.asarray(array)
            if array.dtype != dtype:
                raise ModelInputError(f"input '{spec.name}' has dtype {array.dtype}, expected {spec.dtype}")
            if array.ndim != rank:
                raise ModelInputError(
                    f"input '{spec.name}' has rank {array.ndim} (shape {array.shape}), expected rank {rank} "
                    f"(shape {_shape_text(spec.shape)})"
                )
            shape = array.shape
            for axis, dim, static in dims:
                size = shape[axis]
                if static:
                    if size != dim:
                        raise ModelInputError(
                            f"input '{spec.name}' has size {size} in dim {axis}, expected {dim} (shape {_shape_text(spec.shape)})"
                        )
                elif (first := bound.setdefault(dim, (size, spec.name)))[0] != size:
                    raise ModelInputError(f"input '{spec.name}' has {dim}={size} in dim {axis}, but input '{first[1]}' has {dim}={first[0]}")
            arrays[spec.name] = array
        return arrays


def _shape_text(shape: list[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _index_error_message(guard: IndexGuard, arrays: dict[str, np.ndarray]) -> str:
    valid = f"valid ids are {-guard.rows}..{guard.rows - 1}"
    if guard.direct_input is not None:
        ids = arrays[guard.direct_input]
        bad = np.argwhere((ids < -guard.rows) | (ids >= guard.rows))
        where = tuple(int(i) for i in bad[0]) if len(bad) else ()
        value = ids[where] if len(bad) else "?"
        return (
            f"input '{guard.direct_input}': id {value} at {list(where)} is out of range for embedding table "
            f"'{guard.table}' with {guard.rows} rows ({valid})"
        )
    sources = ", ".join(f"'{name}'" for name in guard.source_inputs) or "constants"
    return (
        f"Gather node '{guard.node}': ids computed from input {sources} are out of range for embedding table "
        f"'{guard.table}' with {guard.rows} rows ({valid})"
    )
