"""-O3's persistent tuning database: one folder that builds share, in MetaSchedule's JSON format plus
reccc's verdicts (whether a tuned kernel beat the -O2 schedule).

Builds never tune into the shared files directly. A build copies them into its private work folder
(under a shared lock), MetaSchedule appends to the copy, and `publish` merges the new records back
under an exclusive lock, rewriting each file atomically (temp file + rename). So builds running at
the same time see whole files only, and none loses another's records. MetaSchedule's record lines
name their workload by its line number in the workload file, which differs between copies: the
merge renumbers them.
"""

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
VERDICTS = "verdicts.json"
LOCK = ".lock"


class SharedTuningDatabase:
    def __init__(self, folder: Path):
        self.folder = folder

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with open(self.folder / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def copy_into(self, work_dir: Path) -> None:
        """Copy MetaSchedule's files into `work_dir`, where a JSONDatabase then opens them."""
        with self._locked(exclusive=False):
            for name in (WORKLOADS, RECORDS):
                if (self.folder / name).exists():
                    shutil.copyfile(self.folder / name, work_dir / name)

    def publish(self, work_dir: Path) -> None:
        """Merge the records in `work_dir` that the shared files lack."""
        own_workloads, own_records = _read(work_dir)
        if not own_records:
            return
        with self._locked(exclusive=True):
            workloads, records = _read(self.folder)
            index = {workload: number for number, workload in enumerate(workloads)}
            known = {(workloads[number], record) for number, record in records}
            added = False
            for number, record in own_records:
                workload = own_workloads[number]
                if (workload, record) in known:
                    continue
                if workload not in index:
                    index[workload] = len(workloads)
                    workloads.append(workload)
                records.append((index[workload], record))
                known.add((workload, record))
                added = True
            if added:
                _write_atomically(self.folder / WORKLOADS, "".join(f"{w}\n" for w in workloads))
                _write_atomically(self.folder / RECORDS, "".join(f"[{n},{r}]\n" for n, r in records))

    def verdict(self, key: str) -> dict | None:
        with self._locked(exclusive=False):
            return _read_verdicts(self.folder).get(key)

    def record_verdict(self, key: str, verdict: dict) -> None:
        with self._locked(exclusive=True):
            verdicts = _read_verdicts(self.folder)
            verdicts[key] = verdict
            _write_atomically(self.folder / VERDICTS, json.dumps(verdicts, indent=1, sort_keys=True) + "\n")


def _read(folder: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """Workload lines as text, and records as (workload number, record JSON in compact form)."""
    workloads, records = [], []
    if (folder / WORKLOADS).exists():
        workloads = [line.strip() for line in (folder / WORKLOADS).read_text().splitlines() if line.strip()]
    if (folder / RECORDS).exists():
        for line in (folder / RECORDS).read_text().splitlines():
            if line.strip():
                number, record = json.loads(line)
                records.append((number, json.dumps(record, separators=(",", ":"))))
    return workloads, records


def _read_verdicts(folder: Path) -> dict:
    path = folder / VERDICTS
    return json.loads(path.read_text()) if path.exists() else {}


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
