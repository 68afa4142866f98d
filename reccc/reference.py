"""onnxruntime as the reference executor, and the tolerance rule compiled outputs are held to."""

import numpy as np
import onnx
import onnxruntime as ort

# fp32 agreement: max |compiled - reference| <= FP32_TOLERANCE * max(1, max |reference|).
FP32_TOLERANCE = 1e-5


def reference_session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = reference_session(model)
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def max_abs_error(reference: np.ndarray, actual: np.ndarray) -> float:
    if reference.shape != actual.shape:
        return float("inf")
    if reference.size == 0:
        return 0.0
    difference = np.abs(reference.astype(np.float64) - actual.astype(np.float64))
    # NaN in the same place in both is agreement, not an error.
    both_nan = np.isnan(reference) & np.isnan(actual) if np.issubdtype(reference.dtype, np.floating) else False
    return float(np.max(np.where(both_nan, 0.0, np.nan_to_num(difference, nan=np.inf))))


def fp32_bound(reference: np.ndarray) -> float:
    scale = float(np.max(np.abs(reference))) if reference.size and np.issubdtype(reference.dtype, np.number) else 0.0
    return FP32_TOLERANCE * max(1.0, scale if np.isfinite(scale) else 1.0)


def agreement(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per output: (max abs error, allowed bound)."""
    return {name: (max_abs_error(ref, actual[name]), fp32_bound(ref)) for name, ref in reference.items()}
