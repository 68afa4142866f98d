"""onnxruntime as the reference executor, and the tolerance rule compiled outputs are held to."""

import numpy as np
import onnx
import onnxruntime as ort

from reccc.external_data import inlined

# fp32 agreement: max |compiled - reference| <= FP32_TOLERANCE * max(1, max |reference|).
FP32_TOLERANCE = 1e-5


def reference_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """onnxruntime with its graph optimizations off: the reference is ONNX's semantics, and the
    optimizers have bugs of their own (ORT 1.32's fails to load a valid model whose Gemm output is
    both a graph output and transposed by a dead node)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    data = inlined(model, "running the model in onnxruntime (the reference)").SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = reference_session(model)
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def abs_error(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Elementwise |actual - reference| in float64; NaN in both is agreement (0), NaN in one is inf."""
    difference = np.abs(reference.astype(np.float64) - actual.astype(np.float64))
    both_nan = np.isnan(reference) & np.isnan(actual) if np.issubdtype(reference.dtype, np.floating) else False
    return np.where(both_nan, 0.0, np.nan_to_num(difference, nan=np.inf))


def max_abs_error(reference: np.ndarray, actual: np.ndarray) -> float:
    if reference.shape != actual.shape:
        return float("inf")
    return float(np.max(abs_error(reference, actual))) if reference.size else 0.0


def output_scale(reference: np.ndarray) -> float:
    """max(1, max |reference|) over finite values: what relative tolerances are relative to."""
    if not reference.size or not np.issubdtype(reference.dtype, np.number):
        return 1.0
    finite = np.abs(reference[np.isfinite(reference)]) if np.issubdtype(reference.dtype, np.floating) else np.abs(reference)
    return max(1.0, float(np.max(finite))) if finite.size else 1.0


def fp32_bound(reference: np.ndarray) -> float:
    return FP32_TOLERANCE * output_scale(reference)


def agreement(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per output: (max abs error, allowed bound)."""
    return {name: (max_abs_error(ref, actual[name]), fp32_bound(ref)) for name, ref in reference.items()}


class ReferenceOutputs:
    """onnxruntime's outputs of a model on fixed inputs, which later versions of the model are compared with."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
        self.feeds = feeds
        self.outputs = run_reference(model, feeds)

    def rebase(self, model: onnx.ModelProto) -> None:
        """Compare with `model` from now on (after a lossy pass, whose effect is measured separately)."""
        self.outputs = run_reference(model, self.feeds)

    def deviation(self, model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
        """Per output: (max, mean) absolute deviation of `model`'s outputs from the reference's."""
        actual = run_reference(model, self.feeds)
        result = {}
        for name, expected in self.outputs.items():
            if actual[name].shape != expected.shape:
                result[name] = (float("inf"), float("inf"))
                continue
            errors = abs_error(expected, actual[name])
            result[name] = (float(errors.max()), float(errors.mean())) if errors.size else (0.0, 0.0)
        return result

    def fp32_violation(self, model: onnx.ModelProto) -> str | None:
        """A description of the first output of `model` outside the fp32 bound, or None."""
        for name, (error, _) in self.deviation(model).items():
            bound = fp32_bound(self.outputs[name])
            if not error <= bound:
                return f"output '{name}' differs by {error:.3g} (allowed {bound:.3g})"
        return None
