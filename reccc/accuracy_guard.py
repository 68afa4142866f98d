"""The accuracy guard of lossy passes: measure how far the optimized model's outputs move from the
input model's on a calibration batch, report it, and fail the build when it exceeds the budget.

The calibration batch is the user's (`--calibration inputs.npz`, named by the model's inputs) or
CALIBRATION_ROWS generated valid rows (ids in range for each table). Both models run in
onnxruntime: lowering through TVM is lossless, so this is the artifact's deviation too.
"""

from dataclasses import dataclass

import onnx

from reccc.errors import CompileError
from reccc.ir import Model
from reccc.reference import ReferenceOutputs
from reccc.sample_inputs import load_inputs, random_inputs

CALIBRATION_ROWS = 64
CALIBRATION_SEED = 1234


@dataclass(frozen=True)
class AccuracyReport:
    deviations: dict[str, tuple[float, float]]  # output -> (max, mean) absolute deviation
    budget: float | None
    source: str  # where the calibration batch came from

    @property
    def max_deviation(self) -> float:
        return max((worst for worst, _ in self.deviations.values()), default=0.0)

    @property
    def exceeded(self) -> bool:
        return self.budget is not None and not self.max_deviation <= self.budget

    def summary(self) -> str:
        outputs = ", ".join(f"'{name}' max {worst:.3g} mean {mean:.3g}" for name, (worst, mean) in self.deviations.items())
        budget = "no budget set" if self.budget is None else f"budget {self.budget:g}"
        return f"accuracy: output deviation on {self.source}: {outputs} ({budget})"

    def as_manifest_entry(self) -> dict:
        return {"budget": self.budget, "max_abs_deviation": self.max_deviation, "calibration": self.source}


def calibration_reference(model: Model, source: onnx.ModelProto, calibration_file: str | None) -> tuple[ReferenceOutputs, str]:
    """The input model's outputs on the calibration batch, and a description of the batch."""
    if calibration_file is not None:
        return ReferenceOutputs(source, load_inputs(calibration_file)), f"calibration file {calibration_file}"
    feeds = random_inputs(model, CALIBRATION_ROWS, seed=CALIBRATION_SEED)
    return ReferenceOutputs(source, feeds), f"{CALIBRATION_ROWS} generated rows"


def measure(reference: ReferenceOutputs, source_description: str, optimized: onnx.ModelProto, budget: float | None) -> AccuracyReport:
    try:
        deviations = reference.deviation(optimized)
    except Exception as error:
        raise CompileError(f"accuracy guard: onnxruntime failed on the optimized model: {error}") from error
    return AccuracyReport(deviations, budget, source_description)
