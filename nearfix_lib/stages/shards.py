"""Splitting a run's cases over processes (``workers=K``) and over SLURM array tasks (``shard=i/n``).

A per-case stage (prepare, the stage-1 repair, stage 2, stage-3 decoding, the report) is a
:class:`CaseStage`: ``work(run, case_id, state)`` computes one case and returns its
rows per table; ``setup(run)`` builds, once per process, what every case needs (stage 2: the
stage-1 fields); ``stamp(run, case_id)`` says what a case's result depends on (parameters, the
files it reads); ``write(run, rows)`` writes the stage's tables from every case's rows.

:func:`run_cases` computes the selected cases, each one's rows written atomically as soon as it
is done to ``<stage folder>/parts/<case>.json``::

    {"case": "12", "stamp": {...}, "tables": {"scores": [row, ...], "checks": [...], ...}}
    {"case": "13", "stamp": {...}, "error": "<file>: <problem>"}      (a case that failed)

A case whose part holds tables under the current stamp is not computed again: a killed run or a
requeued SLURM task resumes at case granularity; a changed parameter or input file (another
stamp) makes the case stale, and a failed case is tried again. :func:`merge` reads the parts in
the run's case order and writes the tables, or, while a case has no current part, writes
nothing and names the missing cases. The tables always come from the parts, so one process, K
worker processes and n shards write the same bytes.

``--shard i/n`` takes every n-th case of the run's case list (natural order of the ids) starting
at i, 0 <= i < n: a SLURM array ``--array=0-(n-1)`` passes ``--shard
$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``. Every task tries the merge when its share is
done, so the last task to finish writes the tables; ``nearfix merge STAGE --run-dir D`` does it
again, or lists what is missing (``jobs/slurm_array.sh``).

Workers are started with ``spawn`` (safe with torch and CUDA): each opens the run folder
(:func:`~nearfix_lib.core.workspace.open_run`) and runs ``setup`` once, and uses cores // K CPU
threads (never more than ``OMP_NUM_THREADS`` where it is set). Spawn imports a script's main
module again in every worker, so a script (not a notebook, not ``nearfix run``) that passes
``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from nearfix_lib.core.io import InputError, return_large_blocks, threads_per_worker, write_json, write_text
from nearfix_lib.core.scores import write_scores
from nearfix_lib.core.workspace import SKIPPED_CSV, Run, open_run, part_path, parts_dir

Rows = dict[str, list[dict]]  # table name -> its rows
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class Shard:
    """Task ``index`` of ``count``: every ``count``-th case of the run, starting at ``index`` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: expected i/n with 0 <= i < n (a SLURM array "
                             "--array=0-(n-1) passes $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")

    @classmethod
    def parse(cls, text: str | Shard) -> Shard:
        """``"i/n"`` (``"3/8"``: the fourth of eight tasks)."""
        if isinstance(text, Shard):
            return text
        try:
            index, count = (int(t) for t in str(text).split("/"))
        except ValueError:
            raise ValueError(f"shard {text!r}: expected i/n, e.g. 0/4 (0 <= i < n)") from None
        return cls(index, count)

    def select(self, case_ids: Sequence[str]) -> list[str]:
        """This shard's cases, in the order given (the run's case order)."""
        return list(case_ids)[self.index::self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class CaseSkipped(Exception):
    """A case the stage cannot do, with the one-line reason (no traceback is printed)."""


@dataclass(frozen=True)
class CaseStage:
    """A per-case stage. The functions are module-level (worker processes import them by name)."""

    name: str  # the stage in skipped.csv; its folder (workspace.stage_dir) holds parts/
    tables: tuple[str, ...]  # what a part holds, in the order the tables are written
    work: Callable[[Run, str, Any], Rows]  # (run, case id, setup's state) -> rows per table
    write: Callable[[Run, Rows], Any]  # every case's rows, in case order -> the stage's tables
    setup: Callable[[Run], Any] | None = None  # once per process, before its first case
    stamp: Callable[[Run, str], Any] | None = None  # JSON-able: what a case's result depends on
    # the run's cases this stage computes, in the run's order (default: all); the stages after
    # prepare take the prepared ones, so a case prepare skipped is not listed again by every stage
    cases: Callable[[Run], list[str]] | None = None


def stage_cases(run: Run, stage: CaseStage) -> list[str]:
    """The case ids ``stage`` computes, in the run's case order."""
    return stage.cases(run) if stage.cases else [c.case_id for c in run.cases]


def as_shard(shard: Shard | str | None) -> Shard | None:
    return None if shard is None or shard == "" else Shard.parse(shard)


def file_stamp(path: Path) -> list[int] | None:
    """``[mtime_ns, size]`` of a file a case's result depends on, ``None`` when it is absent."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return None
    return [st.st_mtime_ns, st.st_size]


def as_stored(stamp: Any) -> Any:
    """A stamp as a part stores it (JSON: tuples become lists, other objects strings), to compare with one read back."""
    return json.loads(json.dumps(stamp, default=str))


def _stamp(run: Run, stage: CaseStage, case_id: str) -> Any:
    return as_stored(stage.stamp(run, case_id) if stage.stamp else None)


def read_part(run: Run, stage: CaseStage, case_id: str) -> dict | None:
    """A case's part, or ``None`` when there is none (or it cannot be read)."""
    try:
        part = json.loads(part_path(run, stage.name, case_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return part if isinstance(part, dict) else None


def current_rows(run: Run, stage: CaseStage, case_id: str) -> Rows | None:
    """A case's rows from its part when that part is current (written under the stamp the case would
    get now, without an error): what a later stage may take instead of computing them again."""
    part = read_part(run, stage, case_id)
    if part is None or "tables" not in part or part.get("stamp") != _stamp(run, stage, case_id):
        return None
    return part["tables"]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def compute_case(run: Run, stage: CaseStage, state: Any, case_id: str, stamp: Any) -> str | None:
    """One case: its rows (or its error) written as its part; returns the error message or ``None``."""
    try:
        tables = stage.work(run, case_id, state)
    except Exception as err:  # one case's problem: recorded, the other cases go on
        if isinstance(err, (InputError, CaseSkipped)):
            message = _one_line(str(err))
        else:
            traceback.print_exc()
            message = _one_line(f"{type(err).__name__}: {err}")
        write_json(part_path(run, stage.name, case_id), {"case": case_id, "stamp": stamp, "error": message})
        return message
    unknown = set(tables) - set(stage.tables)
    if unknown:
        raise ValueError(f"{stage.name}: case {case_id} returned tables {sorted(unknown)} not in {stage.tables}")
    write_json(part_path(run, stage.name, case_id), {"case": case_id, "stamp": stamp, "tables": tables})
    return None


# -- worker processes -------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}  # in a worker process: its run, stage and setup's state


@contextmanager
def thread_variables(threads: int) -> Iterator[None]:
    """Processes (workers, notebook kernels) started inside the block use ``threads`` CPU threads:
    they read these variables before they import torch or numpy."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: str(threads) for k in THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_worker(run_dir: str, stage: CaseStage, threads: int) -> None:
    return_large_blocks()
    torch = sys.modules.get("torch")  # imported with the stage's module when the stage uses it
    if torch is not None:
        torch.set_num_threads(threads)
    _WORKER.clear()
    _WORKER.update(run=open_run(run_dir), stage=stage)


def _worker_case(case_id: str, stamp: Any) -> str | None:
    run, stage = _WORKER["run"], _WORKER["stage"]
    if "state" not in _WORKER:  # a failing setup is no case's problem: it stops the run
        _WORKER["state"] = stage.setup(run) if stage.setup else None
    return compute_case(run, stage, _WORKER["state"], case_id, stamp)


# -- running and merging ------------------------------------------------------------------------------

def run_cases(run: Run, stage: CaseStage, workers: int = 1, shard: Shard | str | None = None,
              progress: bool = True) -> dict[str, str]:
    """Compute the cases of ``shard`` (all when ``None``) that have no current part, in this
    process or in ``workers`` processes; returns the failed cases' messages by case id.

    A failed case is printed and added to ``run.skipped`` under the stage's name; the others go on.
    """
    from tqdm import tqdm

    shard = as_shard(shard)
    ids = stage_cases(run, stage)
    selected = shard.select(ids) if shard else ids
    stamps = {cid: _stamp(run, stage, cid) for cid in selected}
    todo = []
    for cid in selected:
        part = read_part(run, stage, cid)
        if not (part and "tables" in part and part.get("stamp") == stamps[cid]):
            todo.append(cid)
    label = f"{stage.name} shard {shard}" if shard else stage.name
    if len(todo) < len(selected):
        print(f"{label}: {len(selected) - len(todo)} of {len(selected)} cases already done "
              f"(parts in {parts_dir(run, stage.name)}); computing {len(todo)}")
    failed: dict[str, str] = {}

    def record(cid: str, message: str | None) -> None:
        if message is not None:
            failed[cid] = message
            run.skipped.add(stage.name, cid, message)
            print(f"skipped case {cid}: {message}")

    bar = dict(total=len(todo), desc=label, disable=not progress or not todo, unit="case")
    if workers <= 1 or len(todo) <= 1:
        state, ready = None, False
        for cid in tqdm(todo, **bar):
            if not ready:  # only when a case is left to compute
                state, ready = (stage.setup(run) if stage.setup else None), True
            record(cid, compute_case(run, stage, state, cid, stamps[cid]))
        return failed
    threads = threads_per_worker(workers)
    with thread_variables(threads), ProcessPoolExecutor(
            min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(str(run.dir), stage, threads)) as pool:
        futures = {pool.submit(_worker_case, cid, stamps[cid]): cid for cid in todo}
        try:
            for future in tqdm(as_completed(futures), **bar):
                record(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return failed


def _collect(run: Run, stage: CaseStage) -> tuple[Rows, list[tuple[str, str, str]], list[str]]:
    """Every case's part in the run's case order: (rows per table, failed cases, missing cases)."""
    rows: Rows = {name: [] for name in stage.tables}
    failed, missing = [], []
    for cid in stage_cases(run, stage):
        part = read_part(run, stage, cid)
        if part is None or part.get("stamp") != _stamp(run, stage, cid) or not ("tables" in part or "error" in part):
            missing.append(cid)
        elif "error" in part:
            failed.append((stage.name, cid, str(part["error"])))
        else:
            for name, table_rows in part["tables"].items():
                rows[name] += table_rows
    return rows, failed, missing


def missing_cases(run: Run, stage: CaseStage) -> list[str]:
    """The run's cases without a current part (not computed yet, or under another stamp)."""
    return _collect(run, stage)[2]


def merge(run: Run, stage: CaseStage) -> Any | None:
    """Write the stage's tables from every case's part, in the run's case order; returns them.

    A case without a current part (not computed yet, or computed under another stamp) is
    missing: then nothing is written, the missing cases are named, and ``None`` is returned.
    Failed cases are the stage's rows of ``skipped.csv`` (rewritten here, whichever task ran them).
    """
    rows, failed, missing = _collect(run, stage)
    n = len(stage_cases(run, stage))
    if missing:
        shown = ", ".join(missing[:10]) + (" …" if len(missing) > 10 else "")
        print(f"{stage.name}: {len(missing)} of {n} cases missing (ids {shown}): run the missing shards "
              f"or `nearfix merge {stage.name} --run-dir {run.dir}` once they are done; no table written")
        return None
    run.skipped.entries = [e for e in run.skipped.entries if e[0] != stage.name] + failed
    run.write_skipped(replace=[stage.name])
    if n and len(failed) == n:
        raise InputError(run.data_root, f"{stage.name}: none of the {n} cases could be processed "
                                        f"(each is listed in {run.path(SKIPPED_CSV)})")
    return stage.write(run, rows)


def run_stage(run: Run, stage: CaseStage, workers: int = 1, shard: Shard | str | None = None,
              progress: bool = True) -> Any | None:
    """:func:`run_cases`, then :func:`merge`: the tables when every case of the run is done (always
    without a shard; with one, when this task finished last), else ``None``."""
    run_cases(run, stage, workers, shard, progress)
    return merge(run, stage)


def write_tables(folder: Path, rows: Rows) -> dict[str, pd.DataFrame]:
    """Each table as ``<folder>/<name>.csv`` (``scores`` through :func:`~core.scores.write_scores`);
    returns them. A table without rows is not written."""
    out = {}
    for name, table_rows in rows.items():
        if name == "scores":
            out[name] = write_scores(folder, table_rows)
            continue
        out[name] = pd.DataFrame(table_rows)
        if len(out[name]):
            write_text(Path(folder) / f"{name}.csv", out[name].to_csv(index=False))
    return out
