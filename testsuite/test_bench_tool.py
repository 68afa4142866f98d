"""tools/bench.py as a user runs it: a report with the machine's limits, timings against onnxruntime,
rated hot kernels and a chart. Timings are not checked (tests do not time); their presence and the
agreement with onnxruntime are."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import model_path

REPO = Path(__file__).resolve().parent.parent


def test_bench_writes_a_report_with_limits_rated_kernels_and_a_chart(tmp_path):
    report_path = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), str(model_path("dlrm")), "--levels", "2", "--batches", "1,64",
         "--repeat", "3", "--no-plain-tvm", "--json", str(report_path)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(report_path.read_text())
    assert report["limits"]["copy_bytes_per_s"] > 1e8 and report["limits"]["sgemm_flops_per_s"] > 1e8
    [model] = report["models"]
    assert model["model"]["name"] == "dlrm" and [b["batch"] for b in model["batches"]] == [1, 64]
    for batch in model["batches"]:
        assert batch["agrees"] and batch["lossy_builds"] == []
        assert set(batch["allowed_error"]) == {"reccc_O2"}  # per engine; the VM call returns no outputs
        assert set(batch["ratio_to_onnxruntime"]) == {"reccc_O2", "reccc_O2_vm_call"}
        assert all(engine["calls_per_run"] >= 1 for engine in batch["engines"].values())
        hot = batch["hot_kernels"]["reccc_O2"]
        assert hot and sum(kernel["share"] for kernel in hot) <= 1.0
    # At batch 64 the dlrm's widest layer (64 x 80 -> 64) is among the hot kernels, rated in GFLOP/s.
    matmuls = [k for k in model["batches"][1]["hot_kernels"]["reccc_O2"] if "gflops" in k]
    assert matmuls and all(k["gflops"] > 0 and k["flops"] % (2 * 64) == 0 for k in matmuls)
    # Lookups are rated at every batch, however small their share: their bandwidth is a target of its own.
    for batch in model["batches"]:
        assert any(k.get("gathered_gb_per_s", 0) > 0 for k in batch["hot_kernels"]["reccc_O2"])
    assert report_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_work_comes_from_the_argument_shapes():
    sys.path.insert(0, str(REPO / "tools"))
    from kernel_profile import _work

    assert _work("fused_matmul3_add_relu", [(2048, 576), (576, 512), (512,), (2048, 512)]) == {"flops": 2 * 2048 * 512 * 576}
    int8_layer = [(64, 1), (64, 1), (), (), (), (), (64, 448), (16, 112, 16, 4), (256,), (256,), (256,), (64, 256)]
    assert _work("fused_quantize_matmul_amx_int8_add_relu", int8_layer) == {"flops": 2 * 64 * 256 * 448}
    assert _work("take1", [(100, 64), (2048,), (2048, 64)]) == {"gathered_elements": 2048 * 64}
    assert _work("fused_concatenate", [(8, 4), (8, 4), (8, 8)]) == {}


def test_a_lossy_build_is_allowed_its_accuracy_budget_and_a_lossless_one_fp32s_tolerance():
    sys.path.insert(0, str(REPO / "tools"))
    import numpy as np
    from bench import Engine, errors_against_onnxruntime

    engines = [Engine("onnxruntime", None), Engine("reccc_O2", None), Engine("reccc_O3", None), Engine("reccc_O3_vm_call", None, returns_outputs=False)]
    results = {"onnxruntime": {"ctr": np.array([0.5], np.float32)}, "reccc_O2": {"ctr": np.array([0.5], np.float32)},
               "reccc_O3": {"ctr": np.array([0.505], np.float32)}}
    errors, allowed = errors_against_onnxruntime(engines, results, budgets={"reccc_O3": 0.01})
    assert set(errors) == set(allowed) == {"reccc_O2", "reccc_O3"}
    assert allowed["reccc_O3"] == {"ctr": 0.01} and errors["reccc_O3"]["ctr"] == pytest.approx(0.005, abs=1e-6)
    assert 0 < allowed["reccc_O2"]["ctr"] < 1e-4 and errors["reccc_O2"]["ctr"] == 0


def test_fc_precision_results_of_another_target_go_to_their_own_file():
    """tools/bench_fc_precision.py --target: this CPU's results keep fc_precision.json, a target's go
    beside them under its CPU's (or its own) name, so that a run for a CPU without AMX overwrites none."""
    sys.path.insert(0, str(REPO / "tools"))
    from bench_fc_precision import _suffix

    assert _suffix("x86") == ""
    assert _suffix('{"kind": "llvm", "mcpu": "cooperlake"}') == "-cooperlake"
    assert _suffix('{"kind": "llvm", "mtriple": "x86_64-linux-gnu"}') == "-llvm"
    assert _suffix("arm:raspberry-pi/4b-aarch64") == "-arm-raspberry-pi-4b-aarch64"


def test_a_repetition_is_as_many_calls_as_take_repetition_s_timed_together(monkeypatch):
    """On a clock that each call advances by STEP (a binary fraction, so that the clock's sums are
    exact): enough calls a repetition to last REPETITION_S, each repetition timing a call at their mean."""
    sys.path.insert(0, str(REPO / "tools"))
    import bench

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls = []

    step = 2**-10  # about 1 ms

    def run():
        calls.append(1)
        clock[0] += step

    engine = bench.Engine("fake", run, returns_outputs=False)
    bench.warm_up(engine)
    assert engine.calls == math.ceil(bench.REPETITION_S / step) == 11
    calls.clear()
    bench.time_interleaved([engine], repeat=4)
    assert len(calls) == 4 * 11 and engine.seconds == [step] * 4 and engine.timed_s == 4 * 11 * step


def test_the_gather_ceiling_gathers_the_rows_of_its_ids(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gather_ceiling
    finally:
        sys.path.remove(str(REPO / "tools"))
    binary = gather_ceiling.build(tmp_path)
    # the program checks the rows it gathered against the table and exits 1 where they differ
    for prefetch in gather_ceiling.PREFETCH_DISTANCES:
        assert gather_ceiling.gather_seconds(binary, rows=5000, dim=16, lookups=3000, threads=2, prefetch=prefetch, repeats=3) > 0
    usage = subprocess.run([str(binary), "10"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    rows, dim, gathered = gather_ceiling.lookup_shape("deepfm", {"fields": 26, "rows": 1000, "dim": 16}, batch=4)
    assert (rows, dim, gathered) == (1000, 16, 104)
