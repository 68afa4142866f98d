"""-O3 auto-tuning (MetaSchedule) with tiny budgets: outputs still match onnxruntime, records persist in
the tuning database and are reused without measuring, builds running at the same time share the
database, builds from it are reproducible, and tuning runs through an RPC tracker.

Each tuning build pays MetaSchedule's one-time start (about 30 s here: it parses TVM's tensor
intrinsics), so the builds are few and each checks several things."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm

import reccc
from reccc.targets import cpu_schedules, relax_lowering, tuning
from reccc.targets.tuning_db import RECORDS, VERDICTS, WORKLOADS
from reccc.targets.x86 import host_cpu

from conftest import assert_matches_onnxruntime, model_path

MODEL = model_path("dlrm")
# One trial, and time enough for it (the budget that ends first stops tuning) on a loaded machine;
# fp32 tables (not -O3's default int8), so that outputs are held to onnxruntime's fp32 bound.
TINY = ["--tune-trials", "1", "--tune-time", "600", "--embedding-quant", "none"]
FAILED_RUN_S = 1e9  # MetaSchedule records a failed candidate with a run time of 1e10 s


def _reccc_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reccc", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(database: Path) -> list[list]:
    return [json.loads(line) for line in (database / RECORDS).read_text().splitlines()]


def _measured(records: list[list]) -> list[list]:
    """Records of candidates that ran (their first field is the list of run times)."""
    return [record for record in records if max(record[1][1]) < FAILED_RUN_S]


def _database_bytes(database: Path) -> dict[str, bytes]:
    return {name: (database / name).read_bytes() for name in (WORKLOADS, RECORDS, VERDICTS)}


def test_concurrent_builds_share_the_database_and_rebuilds_reuse_it(tmp_path, reccc_cli):
    database = tmp_path / "tune"
    builds = [
        _reccc_process(MODEL, "-O3", *TINY, "--tune-db", database, "-o", tmp_path / f"concurrent{i}.so", "-v") for i in range(2)
    ]
    measured = 0
    for build in builds:
        _, stderr = build.communicate(timeout=600)
        assert build.returncode == 0, stderr[-2000:]
        measured += int(re.search(r"reccc: tuning: .*; measured (\d+) candidates", stderr).group(1))

    # The builds' records were merged into whole lines. How many there are depends on timing: a build
    # that starts after the other has published finds its trial there and measures none, and two
    # builds whose same first candidate fails store that one record once. (test_tuning_db.py checks
    # that concurrent merges lose nothing.)
    workloads = (database / WORKLOADS).read_text().splitlines()
    records = _records(database)
    assert all(json.loads(line) for line in workloads)
    assert all(0 <= number < len(workloads) for number, _ in records)
    assert 1 <= len(records) <= measured
    assert _measured(records)  # at least one candidate ran (one may fail to build)
    verdicts = json.loads((database / VERDICTS).read_text())
    assert verdicts
    for verdict in verdicts.values():
        # Each verdict timed -O2's schedule and the candidates, and chose, below DISPATCH_ROWS and from
        # there on, one never slower than -O2 in that range.
        assert verdict["candidates_us"] and all(len(us) == len(verdict["batches"]) for us in verdict["candidates_us"].values() if us)
        small = [rows < tuning.DISPATCH_ROWS for rows in verdict["batches"]]
        for use, in_range in ((verdict["use"], small), (verdict.get("use_from_rows", verdict["use"]), [not s for s in small])):
            timings = verdict["default_us"] if use == "default" else verdict["candidates_us"][use]
            assert all(t <= d for t, d, measured in zip(timings, verdict["default_us"], in_range) if measured)
    # The matmul kernels were measured with the x86 target's other register tiles too.
    assert any(label.startswith("tile ") for verdict in verdicts.values() for label in verdict["candidates_us"])

    for i in range(2):
        model = reccc.load(tmp_path / f"concurrent{i}.so")
        for batch in (1, 7, 64):
            assert_matches_onnxruntime(MODEL, model.run, batch)

    # A rebuild with the same budget finds every kernel's trials and verdict in the database: it
    # measures nothing and changes nothing there. Two processes building from it give the same bytes.
    before = _database_bytes(database)
    rebuild = reccc_cli(MODEL, "-O3", *TINY, "--tune-db", database, "-o", tmp_path / "rebuild.so", "-v")
    assert rebuild.code == 0, rebuild.stderr
    assert "measured 0 candidates and 0 comparisons with -O2" in rebuild.stderr
    assert _database_bytes(database) == before
    processes = [_reccc_process(MODEL, "-O3", *TINY, "--tune-db", database, "-o", tmp_path / f"process{i}.so") for i in range(2)]
    assert [process.wait(timeout=300) for process in processes] == [0, 0]
    assert (tmp_path / "process0.so").read_bytes() == (tmp_path / "process1.so").read_bytes()

    _check_replayed_records(database, tmp_path)


def test_alternative_matmul_tiles_compute_what_the_kernel_computes(tmp_path):
    """-O3's other register tiles for each matmul kernel of the fused module, at batch sizes their
    tiles do not divide."""
    fused = []
    relax_lowering.build(onnx.load(MODEL), host_cpu().tvm_target(), 2, lambda module, _: fused.append(module) or module)
    checked = 0
    for kernel in tuning._kernels(fused[0]):
        for label, alternative in cpu_schedules.matmul_tile_alternatives(kernel.symbolic, host_cpu().tvm_target()):
            for rows in (1, 7, 13):
                expected, actual = (_run_kernel(function, kernel, rows) for function in (kernel.symbolic, alternative))
                np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=f"{kernel.name}, {label}, {rows} rows")
            checked += 1
    assert checked >= 2 * len(cpu_schedules.ALTERNATIVE_MATMUL_TILES)


def _check_replayed_records(database: Path, scratch: Path) -> None:
    """Tiny budgets rarely beat -O2, so the artifacts above may use no tuned kernel: check here that
    every stored record, replayed on its symbolic kernel, computes what the kernel computes, at batch
    sizes its tiles do not divide. The kernels are those of the fused module the x86 target schedules."""
    from tvm.s_tir import meta_schedule as ms

    reccc.compile(MODEL, scratch / "optimized.onnx", opt_level=3, emit="onnx")
    fused = []
    relax_lowering.build(onnx.load(scratch / "optimized.onnx"), host_cpu().tvm_target(), 2, lambda module, _: fused.append(module) or module)
    records = ms.database.JSONDatabase(work_dir=str(database))
    checked = 0
    for kernel in tuning._kernels(fused[0]):
        best = records.get_top_k(records.commit_workload(kernel.workload()), 1)
        if not best:
            continue
        replayed = tuning._replay(best[0].trace, kernel.symbolic)
        for rows in (1, 7):
            expected, actual = (_run_kernel(function, kernel, rows) for function in (kernel.symbolic, replayed))
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked >= 1


def _run_kernel(function, kernel, rows: int) -> np.ndarray:
    library = tvm.compile(tuning._standalone(function), target=host_cpu().tvm_target())
    generator = np.random.default_rng(0)
    arguments = [
        tvm.runtime.tensor(generator.standard_normal([int(d) for d in parameter.shape]).astype(str(parameter.dtype)))
        for parameter in kernel.at_batch(rows).params
    ]
    library["main"](*arguments)
    return arguments[-1].numpy()


def test_tuning_through_an_rpc_tracker(tmp_path, reccc_cli):
    """A tracker and two RPC servers on loopback, started and stopped here."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = []
    try:
        servers = [
            rpc.Server("127.0.0.1", port=9300, port_end=9400, key="reccc-test", tracker_addr=("127.0.0.1", tracker.port), silent=True)
            for _ in range(2)
        ]
        database = tmp_path / "tune"
        result = reccc_cli(
            MODEL, "-O3", *TINY, "--tune-db", database,
            "--tune-rpc", f"127.0.0.1:{tracker.port}", "--device-key", "reccc-test", "-o", tmp_path / "rpc.so", "-v",
        )
        assert result.code == 0, result.stderr[-2000:]
        assert _measured(_records(database)), "no candidate ran on the RPC servers"
        assert_matches_onnxruntime(MODEL, reccc.load(tmp_path / "rpc.so").run, 7)
    finally:
        for server in servers:
            server.terminate()
        tracker.terminate()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-O2", "--tune-trials", "4"], "--tune-trials: tuning options need -O3"),
        (["-O3", "--emit=onnx", "--tune-time", "5"], "--tune-time: tuning options need -O3"),
        (["-O3", "--tune-trials", "-1"], "--tune-trials: must be a non-negative integer"),
        (["-O3", "--tune-time", "-5"], "--tune-time: must be a non-negative number"),
        (["-O3", "--tune-rpc", "127.0.0.1:9190"], "--tune-rpc and --device-key go together"),
        (["-O3", "--device-key", "board"], "--tune-rpc and --device-key go together"),
        (["-O3", "--tune-rpc", "localhost", "--device-key", "board"], "--tune-rpc localhost: expected HOST:PORT"),
        (["-O3", "--tune-rpc", "host:99999", "--device-key", "board"], "expected HOST:PORT"),
    ],
)
def test_tuning_flags_usage_errors(reccc_cli, tmp_path, flags, message):
    result = reccc_cli(MODEL, *flags, "-o", tmp_path / "out.so")
    assert result.code == 2
    assert message in result.stderr
    assert not (tmp_path / "out.so").exists()


def test_tune_db_that_is_a_file_is_a_usage_error(reccc_cli, tmp_path):
    (tmp_path / "file").write_text("")
    result = reccc_cli(MODEL, "-O3", "--tune-db", tmp_path / "file", "-o", tmp_path / "out.so")
    assert result.code == 2
    assert "--tune-db" in result.stderr


def test_default_tune_db_is_in_the_user_cache(monkeypatch, tmp_path):
    from reccc.compiler import default_tune_db

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_tune_db() == tmp_path / "reccc" / "tune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_tune_db() == Path.home() / ".cache" / "reccc" / "tune"
