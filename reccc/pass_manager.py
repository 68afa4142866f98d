"""Passes, their registry, and the manager that runs a pipeline of them with instrumentation.

A pass is a small class with a declared contract (`requires` / `call` / `ensures`, after onnx-ir's
PassBase); `call` mutates the model in place and returns whether it changed anything. Passes register
themselves with @register_pass; built-in ones and plugins arrive through reccc.plugins.
"""

import abc
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TextIO

import onnx

from reccc.errors import CompileError, UsageError
from reccc.ir import Model
from reccc.reference import ReferenceOutputs

_REGISTRY: dict[str, type["Pass"]] = {}


class Pass(abc.ABC):
    """One graph transformation. Every pass maps valid ONNX to valid ONNX."""

    name: ClassVar[str]
    summary: ClassVar[str]  # the contract in one line, shown by --list-passes
    lossless: ClassVar[bool] = True  # lossless passes must keep outputs within fp32 tolerance

    def requires(self, model: Model) -> None:
        """Raise CompileError if `model` is not a graph this pass can run on."""

    @abc.abstractmethod
    def call(self, model: Model) -> bool:
        """Transform `model` in place; return True if anything changed."""

    def ensures(self, model: Model) -> None:
        """Raise CompileError if the pass left the model breaking its promise."""

    def details(self) -> list[str]:
        """Lines saying what the last call did beyond node and byte counts (decisions, sparsity), for
        --time-passes: what `call` recorded with `note`."""
        return list(self.__dict__.get("_notes", ()))

    def note(self, line: str) -> None:
        self.__dict__.setdefault("_notes", []).append(line)

    def __call__(self, model: Model) -> bool:
        self._notes: list[str] = []
        self.requires(model)
        changed = self.call(model)
        self.ensures(model)
        return changed


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make `cls` available to pipelines and --passes under `cls.name`."""
    if not getattr(cls, "name", None) or not getattr(cls, "summary", None):
        raise TypeError(f"{cls.__qualname__} must set the class attributes 'name' and 'summary'")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise UsageError(f"pass '{cls.name}' is registered twice ({existing.__module__} and {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    return dict(sorted(_REGISTRY.items()))


def create_pass(name: str, **params) -> Pass:
    """An instance of the pass registered as `name`; `params` are its constructor's keyword arguments."""
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UsageError(f"unknown pass '{name}' (known passes: {known})")
    try:
        return _REGISTRY[name](**params)
    except (TypeError, ValueError) as error:
        raise UsageError(f"pass '{name}': bad parameters {params}: {error}") from error


@dataclass(frozen=True)
class PassRecord:
    """What one pass did, for --time-passes."""

    name: str
    seconds: float
    changed: bool
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    details: list[str]


class PassManager:
    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        print_after: Sequence[str] = (),
        verify_against: ReferenceOutputs | None = None,
        log: TextIO | None = None,
    ):
        self.passes = list(passes)
        self.print_after = set(print_after)
        self.verify_against = verify_against
        self.log = log or sys.stderr

    def run(self, model: Model) -> list[PassRecord]:
        records = []
        for each in self.passes:
            nodes_before, bytes_before = len(model.graph.nodes), model.parameter_bytes()
            start = time.perf_counter()
            try:
                changed = each(model)
            except (CompileError, UsageError):
                raise
            except Exception as error:
                raise CompileError(f"pass '{each.name}' failed: {type(error).__name__}: {error}") from error
            seconds = time.perf_counter() - start
            records.append(
                PassRecord(
                    each.name, seconds, changed, nodes_before, len(model.graph.nodes), bytes_before, model.parameter_bytes(),
                    each.details(),
                )
            )
            if self.print_after & {each.name, "all"}:
                self.log.write(f"; *** IR after {each.name} ***\n{onnx.printer.to_text(model.to_onnx().graph)}\n")
            if self.verify_against is not None:
                self._verify(each, model.to_onnx())
        return records


    def _verify(self, each: Pass, proto: onnx.ModelProto) -> None:
        """--verify-each: a lossless pass must keep the outputs within the fp32 bound; a lossy pass's
        effect is the accuracy guard's to measure, and later passes are compared with its result."""
        if not each.lossless:
            self.verify_against.rebase(proto)
            return
        problem = self.verify_against.fp32_violation(proto)
        if problem is not None:
            raise CompileError(f"--verify-each: pass '{each.name}' changed the model's outputs: {problem}")


def format_pass_report(records: Sequence[PassRecord]) -> str:
    """The --time-passes table."""
    width = max([len("total"), *(len(r.name) for r in records)]) + 2
    lines = [f"{'pass':<{width}}{'ms':>9}  {'changed':<8}{'nodes':>15}{'parameter bytes':>28}"]
    for r in records:
        lines.append(
            f"{r.name:<{width}}{r.seconds * 1e3:>9.2f}  {'yes' if r.changed else 'no':<8}"
            f"{f'{r.nodes_before}->{r.nodes_after}':>15}{f'{r.bytes_before}->{r.bytes_after}':>28}"
        )
        lines += [f"    {detail}" for detail in r.details]
    total = sum(r.seconds for r in records)
    lines.append(f"{'total':<{width}}{total * 1e3:>9.2f}")
    return "\n".join(lines)
