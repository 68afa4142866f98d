"""-O3: MetaSchedule auto-tuning of the hot kernels, on top of the -O2 default schedules.

The fused module (as -O2 schedules it) is split into kernels: its PrimFuncs, structurally equal ones
counted as one with their calls added up. Kernels are ranked by estimated cost, (FLOPs + bytes moved)
× calls, at TUNING_BATCH rows for every symbolic dim; the ones making up HOT_SHARE of the total are
tuned, each with a share of --tune-trials proportional to its cost, in slices of SLICE_TRIALS so
that --tune-time is checked often.

MetaSchedule cannot tune symbolic shapes, so a kernel is tuned specialized to TUNING_BATCH rows and
its best schedule is replayed on the symbolic kernel: a tile decision on a symbolic loop becomes a
split with an open outer factor (predicated for the last rows). The target may offer alternatives of
its own rules besides (other register tiles of its matmul rule, which pad the batch instead). Each
candidate runs against the kernel's -O2 schedule at COMPARE_BATCHES rows, on the same runner. Below
DISPATCH_ROWS and from it on, separately: of the candidates at least as fast as -O2 at each measured
batch in the range, the one with the smallest sum of time ratios is used there. Where the two ranges
choose differently, the kernel branches on its rows between the two at run time
(targets/batch_dispatch.py). So -O3 is never slower than -O2 where measured. Kernels that are not
hot keep their -O2 schedules. Measuring candidates needs a budget: with --tune-trials 0 only the verdicts already in
the database are used.

Kernels that read integer ids (gathers, and whatever fusion put with them) are not tuned and keep
their -O2 schedules: MetaSchedule's runner fills every argument with random bits, out-of-range ids
crash its worker, and these kernels are bound by memory, where tuning gains little.
Nor are the kernels the target says to keep (`keep`: x86's AMX kernels, whose tile instructions
need a permission MetaSchedule's runner processes lack).

Records and verdicts persist in the tuning database (targets/tuning_db.py): a kernel with as many
records as its share of trials is not tuned again, and a verdict is not measured again, so a rebuild
from the same database measures nothing and gives the same library.
"""

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx

from reccc.errors import one_line
from reccc.target import TuningOptions
from reccc.targets.batch_dispatch import dispatch_by_rows
from reccc.targets.tuning_db import SharedTuningDatabase

TUNING_BATCH = 64
COMPARE_BATCHES = (1, TUNING_BATCH, 1024)
# Batches from this many rows on may run another schedule than smaller ones: between the compare
# batches 64 and 1024, near where a taller register tile's padding stops mattering.
DISPATCH_ROWS = 256
HOT_SHARE = 0.9
SLICE_TRIALS = 16
RPC_SESSION_TIMEOUT_S = 60
# MetaSchedule's evolutionary search, smaller than its defaults (population 512, 4 generations): with
# slices of SLICE_TRIALS, its search time otherwise outweighs the measuring on a few cores.
SEARCH = {"population_size": 128, "init_min_unmeasured": 32, "genetic_num_iters": 2}

Schedule = Callable[[tvm.IRModule, tvm.target.Target], tvm.IRModule]
# A target's own alternative schedules of a kernel, labelled: (label, scheduled PrimFunc).
Alternatives = Callable[[tirx.PrimFunc, tvm.target.Target], list[tuple[str, tirx.PrimFunc]]]
DEFAULT = "default"
METASCHEDULE = "metaschedule"


@dataclass
class Kernel:
    """One workload: structurally equal PrimFuncs of the module (named by the first), its calls, and
    the symbolic dims set to the batch when it is measured."""

    functions: list[str]
    symbolic: tirx.PrimFunc
    symbols: list[tirx.Var]
    calls: int
    cost: float = 0.0
    trials: int = 0  # its share of --tune-trials
    chosen: tirx.PrimFunc | None = None  # the schedule that replaces -O2's, if one does
    chosen_large: tirx.PrimFunc | None = None  # the schedule from DISPATCH_ROWS rows on, if another
    verdict: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.functions[0]

    def at_batch(self, rows: int) -> tirx.PrimFunc:
        return _specialize(self.symbolic, self.symbols, rows)

    @property
    def compare_batches(self) -> tuple[int, ...]:
        return COMPARE_BATCHES if self.symbols else (TUNING_BATCH,)  # a static kernel has one size

    def workload(self) -> tvm.IRModule:
        return _standalone(self.at_batch(TUNING_BATCH))


def _no_alternatives(function: tirx.PrimFunc, target: tvm.target.Target) -> list[tuple[str, tirx.PrimFunc]]:
    return []


def _keep_none(function: tirx.PrimFunc) -> bool:
    return False


def tuned_schedules(options: TuningOptions, default: Schedule, alternatives: Alternatives = _no_alternatives,
                    keep: Callable[[tirx.PrimFunc], bool] = _keep_none) -> Schedule:
    """The -O3 schedule pass: `default` (the -O2 rules), with each hot kernel's MetaSchedule tuning or
    one of the target's `alternatives` where that is faster; kernels for which `keep` is true keep
    `default`'s schedule."""

    def schedule(module: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
        kernels = _kernels(module, keep)
        scheduled = default(tvm.IRModule(dict(module.functions), attrs=module.attrs), target)
        with tempfile.TemporaryDirectory(prefix="reccc-tune-") as work_dir:
            _TuningSession(options, _with_cores(target), Path(work_dir), alternatives).run(kernels, scheduled)
        large_kernels = {}
        for kernel in kernels:
            for name in kernel.functions:
                if kernel.chosen is not None:
                    scheduled[name] = kernel.chosen
                if kernel.chosen_large is not None:
                    large_kernels[name] = kernel.chosen_large
        return dispatch_by_rows(scheduled, large_kernels, DISPATCH_ROWS)

    return schedule


class _TuningSession:
    def __init__(self, options: TuningOptions, target: tvm.target.Target, work_dir: Path, alternatives: Alternatives):
        from tvm.s_tir import meta_schedule as ms

        self.options, self.target, self.work_dir, self.alternatives = options, target, work_dir, alternatives
        self.shared = SharedTuningDatabase(options.database)
        self.shared.copy_into(work_dir)
        self.database = ms.database.JSONDatabase(work_dir=str(work_dir))
        self.progress = _ProgressLine(options.progress)
        self.start = time.monotonic()
        self.measured = 0  # candidates measured by this build
        self.compared = 0  # kernels timed against their -O2 schedule by this build
        self._tools = None  # builder, runner and cost model: started only when something is measured

    def run(self, kernels: list[Kernel], scheduled: tvm.IRModule) -> None:
        hot = _hot_kernels(kernels, self.options.trials)
        for number, kernel in enumerate(hot, 1):
            self._tune(kernel, f"[{number}/{len(hot)}] {kernel.name}")
            self.shared.publish(self.work_dir)
        for number, kernel in enumerate(hot, 1):
            self._choose(kernel, scheduled[kernel.name], f"[{number}/{len(hot)}] {kernel.name}")
        used: dict[str, int] = {}
        for kernel in hot:
            use = kernel.verdict.get("use", DEFAULT)
            if "use_from_rows" in kernel.verdict:
                use = f"{use} below {DISPATCH_ROWS} rows and {kernel.verdict['use_from_rows']} from there"
            used[use] = used.get(use, 0) + 1
        listed = ", ".join(f"{label} for {count}" for label, count in sorted(used.items()) if label != DEFAULT) or "none"
        self.progress.note(
            f"reccc: tuning: {len(hot)} hot kernels of {len(kernels)}; measured {self.measured} candidates and "
            f"{self.compared} comparisons with -O2 in {self.elapsed():.0f} s; schedules used instead of -O2's: {listed}"
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _tune(self, kernel: Kernel, label: str) -> None:
        from tvm.s_tir import meta_schedule as ms

        workload = kernel.workload()
        done = len(self.database.get_top_k(self.database.commit_workload(workload), kernel.trials))
        while done < kernel.trials and self.elapsed() < self.options.seconds and self.measured < self.options.trials:
            self.progress.update(f"reccc: tuning {label}: {done}/{kernel.trials} trials, {self.elapsed():.0f}/{self.options.seconds:.0f} s")
            size = min(SLICE_TRIALS, kernel.trials - done, self.options.trials - self.measured)
            builder, runner, cost_model = self._measuring_tools()
            contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [ms.ExtractedTask(kernel.name, workload, self.target, [workload], 1)], str(self.work_dir),
                strategy=ms.search_strategy.EvolutionarySearch(**SEARCH), seed=done,
            )
            before = len(self.database)
            try:
                ms.tune_tasks(
                    tasks=contexts, task_weights=[1.0], work_dir=str(self.work_dir), max_trials_global=size,
                    max_trials_per_task=size, num_trials_per_iter=size, builder=builder, runner=runner,
                    database=self.database, cost_model=cost_model, task_scheduler="round-robin",
                )
            except Exception as error:  # a MetaSchedule failure costs this kernel its tuning, not the build
                self.progress.note(f"reccc: tuning {kernel.name} failed, it keeps its -O2 schedule: {one_line(error)}")
                return
            measured = len(self.database) - before
            if measured == 0:  # the search space is exhausted
                return
            self.measured += measured
            done = len(self.database.get_top_k(self.database.commit_workload(workload), kernel.trials))

    def _choose(self, kernel: Kernel, default: tirx.PrimFunc, label: str) -> None:
        """Measure the candidates (MetaSchedule's best record replayed on the symbolic kernel, the
        target's alternatives) against `default` (the -O2 schedule); keep the best that is never slower."""
        candidates = self.alternatives(kernel.symbolic, self.target)
        records = self.database.get_top_k(self.database.commit_workload(kernel.workload()), 1)
        if records:
            try:
                candidates.insert(0, (METASCHEDULE, _replay(records[0].trace, kernel.symbolic)))
            except Exception as error:  # a schedule that does not carry over to the symbolic kernel
                self.progress.note(f"reccc: tuning {kernel.name}: MetaSchedule's schedule does not replay on the symbolic kernel: {one_line(error)}")
        if not candidates:
            return
        key = _verdict_key([function for _, function in candidates], default, self.target, kernel.compare_batches)
        verdict = self.shared.verdict(key)
        if verdict is None:
            if self.options.trials == 0 or self.elapsed() >= self.options.seconds:
                return  # no budget to measure: -O2's schedule stays
            self.progress.update(f"reccc: tuning {label}: comparing {len(candidates)} schedules with -O2 at batch {', '.join(map(str, kernel.compare_batches))}")
            verdict = self._compare(kernel, candidates, default)
            self.compared += 1
            self.shared.record_verdict(key, verdict)
        kernel.verdict = verdict
        schedules = dict(candidates)
        kernel.chosen = schedules.get(verdict["use"])
        if "use_from_rows" in verdict:
            kernel.chosen_large = {**schedules, DEFAULT: default}[verdict["use_from_rows"]]

    def _compare(self, kernel: Kernel, candidates: list[tuple[str, tirx.PrimFunc]], default: tirx.PrimFunc) -> dict:
        from tvm.s_tir import meta_schedule as ms

        builder, runner, _ = self._measuring_tools()
        functions = [default, *(function for _, function in candidates)]
        built = builder.build([ms.builder.BuilderInput(_standalone(f), self.target) for f in functions])
        inputs = [
            ms.runner.RunnerInput(result.artifact_path, _device_type(self.target), ms.arg_info.ArgInfo.from_prim_func(kernel.at_batch(rows)))
            for result in built if not result.error_msg
            for rows in kernel.compare_batches
        ]
        seconds = iter(_median_seconds(future.result()) for future in runner.run(inputs))
        count = len(kernel.compare_batches)
        times_us = [[next(seconds) * 1e6 for _ in range(count)] if not result.error_msg else None for result in built]
        for result in built:
            if not result.error_msg:
                shutil.rmtree(Path(result.artifact_path).parent, ignore_errors=True)
        default_us, measured = times_us[0], dict(zip((label for label, _ in candidates), times_us[1:]))
        batches = kernel.compare_batches
        verdict = {"use": DEFAULT, "batches": list(batches), "default_us": default_us, "candidates_us": measured}
        if default_us is None:
            return verdict
        small = [i for i, rows in enumerate(batches) if rows < DISPATCH_ROWS]
        large = [i for i, rows in enumerate(batches) if rows >= DISPATCH_ROWS]
        if not small or not large:  # a static kernel, or one range measured: one schedule for all
            verdict["use"] = _fastest_never_slower(measured, default_us, range(len(batches)))
            return verdict
        verdict["use"] = _fastest_never_slower(measured, default_us, small)
        use_large = _fastest_never_slower(measured, default_us, large)
        if use_large != verdict["use"]:
            verdict["use_from_rows"] = use_large
        return verdict

    def _measuring_tools(self):
        from tvm.s_tir import meta_schedule as ms

        if self._tools is None:
            cores = int(self.target.attrs["num-cores"])
            evaluator = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=30)
            if self.options.rpc_tracker is None:
                runner = ms.runner.LocalRunner(evaluator_config=evaluator)
            else:
                host, port = self.options.rpc_tracker
                config = ms.runner.RPCConfig(host, port, self.options.device_key, session_timeout_sec=RPC_SESSION_TIMEOUT_S)
                runner = ms.runner.RPCRunner(config, evaluator)
            builder = _in_process_builder()
            self._tools = (builder, runner, ms.cost_model.CostModel.create("xgb", num_tuning_cores=cores))
        return self._tools


def _fastest_never_slower(measured: dict[str, list[float] | None], default_us: list[float], batches) -> str:
    """The candidate at least as fast as the default at each of `batches` (indices) with the smallest
    sum of time ratios there, or DEFAULT."""
    ratios = {
        label: sum(us[i] / default_us[i] for i in batches)
        for label, us in measured.items() if us is not None and all(us[i] <= default_us[i] for i in batches)
    }
    return min(ratios, key=ratios.get) if ratios else DEFAULT


def _standalone(function: tirx.PrimFunc) -> tvm.IRModule:
    """A kernel as a module of its own, exported as "main" (the module's PrimFuncs are private)."""
    return tvm.IRModule({"main": function.with_attr("global_symbol", "main")})


def _kernels(module: tvm.IRModule, keep: Callable[[tirx.PrimFunc], bool] = _keep_none) -> list[Kernel]:
    """The module's PrimFuncs but those kept or reading ids as workloads (structurally equal ones
    merged), with their estimated cost."""
    calls = _call_counts(module)
    kernels: list[Kernel] = []
    for symbol in sorted(module.functions, key=lambda symbol: symbol.name_hint):
        function = module[symbol]
        if not isinstance(function, tirx.PrimFunc):
            continue
        symbols = _symbolic_dims(function)
        if symbols is None or _reads_ids(function) or keep(function):
            continue
        same = next((kernel for kernel in kernels if tvm_ffi.structural_equal(kernel.symbolic, function)), None)
        if same is not None:
            same.functions.append(symbol.name_hint)
            same.calls += calls.get(symbol.name_hint, 0)
        else:
            kernels.append(Kernel([symbol.name_hint], function, symbols, calls.get(symbol.name_hint, 0)))
    for kernel in kernels:
        try:
            kernel.cost = kernel.calls * _work(kernel.at_batch(TUNING_BATCH))
        except Exception:  # noqa: BLE001  (a kernel TVM cannot specialize is not tuned: cost 0 keeps it cold)
            kernel.cost = 0.0
    return kernels


def _call_counts(module: tvm.IRModule) -> dict[str, int]:
    """How often the Relax functions call each PrimFunc."""
    from tvm import relax

    counts: dict[str, int] = {}

    def visit(node) -> None:
        if isinstance(node, relax.Call):
            for argument in node.args:
                if isinstance(argument, tvm.ir.GlobalVar):
                    counts[argument.name_hint] = counts.get(argument.name_hint, 0) + 1

    for function in module.functions.values():
        if isinstance(function, relax.Function):
            relax.analysis.post_order_visit(function, visit)
    return counts


def _symbolic_dims(function: tirx.PrimFunc) -> list[tirx.Var] | None:
    """The symbolic dims of the parameters' shapes; None if a dim is an expression, which the
    specialization cannot set."""
    symbols: list[tirx.Var] = []
    for parameter in function.params:
        for dim in _shape(parameter):
            if isinstance(dim, tirx.IntImm):
                continue
            if not isinstance(dim, tirx.Var):
                return None
            if not any(dim.same_as(known) for known in symbols):
                symbols.append(dim)
    return symbols


def _reads_ids(function: tirx.PrimFunc) -> bool:
    return any(_shape(p) and not str(p.dtype).startswith(("float", "bfloat")) for p in function.params)


def _shape(parameter) -> list:
    try:
        return list(parameter.shape)
    except (AttributeError, TypeError):  # a scalar parameter
        return []


def _specialize(function: tirx.PrimFunc, symbols: list[tirx.Var], rows: int) -> tirx.PrimFunc:
    if not symbols:
        return function
    static = {}
    for parameter in function.params:
        shape = _shape(parameter)
        if any(any(dim.same_as(symbol) for symbol in symbols) for dim in shape):
            dims = [tirx.IntImm(str(dim.ty.dtype), rows) if any(dim.same_as(s) for s in symbols) else dim for dim in shape]
            static[parameter] = tirx.decl_buffer(dims, parameter.dtype, name=parameter.name)
    return function.specialize(static)


def _work(function: tirx.PrimFunc) -> float:
    """Estimated cost of one call: FLOPs plus bytes of its arguments."""
    try:
        flops = s_tir.analysis.estimate_tir_flops(tvm.IRModule({"main": function}))
    except Exception:  # noqa: BLE001  (TVM cannot count some loop nests; count their bytes only)
        flops = 0.0
    moved = 0
    for parameter in function.params:
        shape = _shape(parameter)
        if shape:
            moved += math.prod(int(dim) for dim in shape) * tvm.runtime.DataType(str(parameter.dtype)).bits // 8
    return float(flops) + moved


def _hot_kernels(kernels: list[Kernel], trials: int) -> list[Kernel]:
    """The costliest kernels making up HOT_SHARE of the cost, each given its share of `trials`."""
    ranked = sorted((kernel for kernel in kernels if kernel.cost > 0), key=lambda kernel: (-kernel.cost, kernel.name))
    total = sum(kernel.cost for kernel in ranked)
    hot: list[Kernel] = []
    for kernel in ranked:
        if sum(k.cost for k in hot) >= HOT_SHARE * total:
            break
        hot.append(kernel)
    covered = sum(kernel.cost for kernel in hot)
    shares = [trials * kernel.cost / covered for kernel in hot]
    for kernel, share in zip(hot, shares):
        kernel.trials = int(share)
    # The trials left by rounding down go to the largest remainders.
    left = trials - sum(kernel.trials for kernel in hot)
    for index in sorted(range(len(hot)), key=lambda i: (int(shares[i]) - shares[i], i))[:left]:
        hot[index].trials += 1
    return hot


def _with_cores(target: tvm.target.Target) -> tvm.target.Target:
    """MetaSchedule needs the target's core count."""
    import psutil

    config = dict(target.export())
    config.setdefault("num-cores", psutil.cpu_count(logical=False) or psutil.cpu_count())
    return tvm.target.Target(config)


def _in_process_builder():
    """MetaSchedule's LocalBuilder starts a new pool of worker processes for every batch of candidates,
    which took 40 s on a loaded 2-core machine for builds that take 0.1 s; this builder compiles in
    the compiling process (a candidate that crashes LLVM would take the build with it)."""
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for candidate in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(candidate.mod, candidate.target, None)), None))
                except Exception as error:  # noqa: BLE001  (a candidate that does not build is a failed trial)
                    results.append(BuilderResult(None, one_line(error)))
            return results

    return InProcessBuilder()


def _device_type(target: tvm.target.Target) -> str:
    return "cuda" if target.kind.name == "cuda" else "cpu"


def _median_seconds(result) -> float:
    if result.error_msg is not None or not result.run_secs:
        return math.inf
    return float(np.median([float(s) for s in result.run_secs]))


def _verdict_key(candidates: list[tirx.PrimFunc], default: tirx.PrimFunc, target: tvm.target.Target, batches: tuple[int, ...]) -> str:
    text = json.dumps([[candidate.script() for candidate in candidates], default.script(), str(target), list(batches)])
    return hashlib.sha256(text.encode()).hexdigest()


class _SymbolicReplay:
    """A schedule that replays a trace tuned at a static batch on the symbolic kernel: a tile decision
    for a loop whose extent is symbolic leaves its outermost factor open (None)."""

    def __init__(self, schedule: s_tir.Schedule):
        self._schedule = schedule

    def __getattr__(self, name: str):
        return getattr(self._schedule, name)

    def sample_perfect_tile(self, loop, n: int, max_innermost_factor: int, decision: list[int]):
        if not isinstance(self._schedule.get(loop).extent, tirx.IntImm):
            return [None, *decision[1:]]
        return self._schedule.sample_perfect_tile(loop=loop, n=n, max_innermost_factor=max_innermost_factor, decision=decision)


def _replay(trace, function: tirx.PrimFunc) -> tirx.PrimFunc:
    schedule = s_tir.Schedule(tvm.IRModule({"main": function}))
    namespace = {"sch": _SymbolicReplay(schedule), "T": tvm.script.tirx}
    for statement in trace.as_python(remove_postproc=False):
        exec(statement, namespace)  # noqa: S102  (TVM's own rendering of the record's instructions)
    return schedule.mod["main"]


class _ProgressLine:
    """One line on a terminal, rewritten in place; one line per update elsewhere (with -v)."""

    def __init__(self, stream: TextIO | None):
        self.stream = stream
        self.in_place = stream is not None and stream.isatty()
        self.width = 0

    def update(self, text: str) -> None:
        if self.stream is None:
            return
        if self.in_place:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (a warning, the summary)."""
        if self.stream is None:
            return
        if self.in_place and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.stream.write(text + "\n")
        self.stream.flush()
