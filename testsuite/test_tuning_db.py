"""The shared tuning database's merge (targets/tuning_db.py), without MetaSchedule: processes publishing
at the same time lose no record, renumber records to the shared workload lines, store a record once,
and readers copying the files meanwhile see whole files only."""

import json
import multiprocessing
from pathlib import Path

from reccc.targets.tuning_db import RECORDS, WORKLOADS, SharedTuningDatabase

PROCESSES = 4
ROUNDS = 25
SHARED_WORKLOAD = '{"shared": true}'


def _workload(process: int) -> str:
    return json.dumps({"process": process})


def _record(process: int, round_: int) -> list:
    return [["trace", process, round_], [1e-6 * (round_ + 1)]]


def _publisher(shared: str, work: str, process: int) -> None:
    """Tune into a private copy as a build does: each round adds one record of the process's own
    workload and one of the workload all processes share, then publishes. The private workload file
    lists the two in an order of the process's own, so its numbers differ from the shared file's."""
    database, work_dir = SharedTuningDatabase(Path(shared)), Path(work)
    workloads = [_workload(process), SHARED_WORKLOAD] if process % 2 else [SHARED_WORKLOAD, _workload(process)]
    own, common = workloads.index(_workload(process)), workloads.index(SHARED_WORKLOAD)
    (work_dir / WORKLOADS).write_text("".join(f"{w}\n" for w in workloads))
    lines = []
    for round_ in range(ROUNDS):
        lines += [json.dumps([own, _record(process, round_)]), json.dumps([common, _record(-process - 1, round_)])]
        (work_dir / RECORDS).write_text("".join(f"{line}\n" for line in lines))
        database.publish(work_dir)


def _reader(shared: str, work: str, errors) -> None:
    """Copy the shared files while the publishers write; every copy must parse whole."""
    database, work_dir = SharedTuningDatabase(Path(shared)), Path(work)
    for _ in range(4 * ROUNDS):
        database.copy_into(work_dir)
        for name in (WORKLOADS, RECORDS):
            if (work_dir / name).exists():
                try:
                    [json.loads(line) for line in (work_dir / name).read_text().splitlines()]
                except ValueError as error:
                    errors.put(f"{name}: {error}")


def test_concurrent_publishers_lose_nothing_and_store_each_record_once(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    context = multiprocessing.get_context("fork")  # the children run only the pure-Python merge
    errors = context.Queue()
    folders = [tmp_path / f"work{i}" for i in range(PROCESSES + 1)]
    for folder in folders:
        folder.mkdir()
    processes = [context.Process(target=_publisher, args=(str(shared), str(folders[i]), i)) for i in range(PROCESSES)]
    processes.append(context.Process(target=_reader, args=(str(shared), str(folders[-1]), errors)))
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * len(processes)
    assert errors.empty(), errors.get()

    workloads = (shared / WORKLOADS).read_text().splitlines()
    assert sorted(workloads) == sorted([SHARED_WORKLOAD, *map(_workload, range(PROCESSES))])
    stored = [(workloads[number], json.dumps(record)) for number, record in map(json.loads, (shared / RECORDS).read_text().splitlines())]
    expected = [
        (workload, json.dumps(_record(origin, round_)))
        for process in range(PROCESSES)
        for workload, origin in ((_workload(process), process), (SHARED_WORKLOAD, -process - 1))
        for round_ in range(ROUNDS)
    ]
    assert sorted(stored) == sorted(expected)  # each exactly once, under the workload it was tuned for
