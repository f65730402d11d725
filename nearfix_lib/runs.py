"""A run is a folder: resolved params, code version, data, skipped cases and every result.

``start_run`` is the first call of every notebook. It resolves the run folder
(``outputs/<run.name>`` unless ``run.run_dir`` says otherwise), records ``params.yaml`` and the
code version, generates the phantom data set into ``<run>/phantom`` when no data root is given
(so the user's data root is only ever read), discovers the cases and keeps the list of skipped
cases that every stage appends to. Re-running a notebook on the same folder resumes: stages
look for their outputs before recomputing them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import __version__
from .classes import ClassTable, load_table
from .io import (Case, InputError, LoadedCase, SkipList, discover_cases, load_case,
                 remove_stale_temporaries, write_text)
from .params import Params, project_root, resolve_path
from .phantom import write_dataset

SKIPPED_CSV = "skipped.csv"


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is checked."""
    import torch

    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA device is visible")
    torch.device(device)  # raises on a malformed name
    return device


def code_version() -> str:
    """Package version plus the git commit (and '+dirty') when run from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


@dataclass
class Run:
    params: Params
    dir: Path
    table: ClassTable
    data_root: Path
    cases: list[Case]
    skipped: SkipList = field(default_factory=SkipList)

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def iter_loaded(self, stage: str, with_image: bool = True,
                    with_truth: bool = True) -> Iterator[LoadedCase]:
        """Load the cases one by one; a bad case is recorded under ``stage`` and skipped.

        When not one case loads, ``skipped.csv`` is written and an :class:`InputError` names
        the data root: nothing downstream can run on an empty set.
        """
        loaded = 0
        for case in self.cases:
            try:
                yield load_case(case, self.table, with_image=with_image, with_truth=with_truth)
                loaded += 1
            except InputError as err:
                self.skipped.add(stage, case.case_id, err)
                print(f"skipped case {case.case_id}: {err}")
        if self.cases and not loaded:
            self.write_skipped()
            raise InputError(self.data_root, f"none of the {len(self.cases)} cases could be read "
                                             f"(each is listed in {self.path(SKIPPED_CSV)})")

    def load(self, case_id: str, with_image: bool = True, with_truth: bool = True) -> LoadedCase:
        """One case by id, read and validated (raises :class:`InputError`)."""
        case = next((c for c in self.cases if c.case_id == str(case_id)), None)
        if case is None:
            raise InputError(self.data_root, f"no case {case_id!r} in this run")
        return load_case(case, self.table, with_image=with_image, with_truth=with_truth)

    def usable_case_ids(self) -> list[str]:
        """The run's cases that no stage so far has skipped (this session's or ``skipped.csv``'s)."""
        bad = {case for _, case, _ in self.skipped.entries}
        bad |= {case for _, case, _ in SkipList.read(self.path(SKIPPED_CSV)).entries}
        return [c.case_id for c in self.cases if c.case_id not in bad]

    def example_case(self, requested: str = "") -> str:
        """The case a notebook's figures show: ``requested``, else the first usable case."""
        if requested:
            return str(requested)
        usable = self.usable_case_ids()
        if not usable:
            raise InputError(self.data_root, f"no usable case to show (all are listed in {self.path(SKIPPED_CSV)})")
        return usable[0]

    def write_skipped(self) -> Path:
        return self.skipped.write(self.path(SKIPPED_CSV))


def run_directory(params: Params) -> Path:
    root = project_root()
    if params.run.run_dir:
        return resolve_path(params.run.run_dir, root)
    return root / "outputs" / params.run.name


def open_run(run_dir: str | Path) -> Run:
    """An existing run, read-only: its recorded params, class table and cases (for viewers)."""
    from .params import params_from_yaml_text

    run_dir = Path(run_dir)
    meta = run_dir / "params.yaml"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: not a nearfix run folder (no params.yaml)")
    params = params_from_yaml_text(meta.read_text())
    root = project_root()
    table = load_table(params.data.classes, params.data.class_keys or None, root)
    data_root = resolve_path(params.data.data_root, root) if params.data.data_root else run_dir / "phantom"
    cases = discover_cases(data_root).cases
    return Run(params, run_dir.resolve(), table, data_root, cases[: params.data.max_cases or None])


def start_run(params: Params, progress: bool = True) -> Run:
    """Create/reuse the run folder, record params and version, find (or make) the data.

    Reusing a folder resumes the run: it says so, and removes the temporaries that writers
    killed mid-write left behind (see :func:`~nearfix_lib.io.remove_stale_temporaries`).
    Raises :class:`InputError` (one line) when the data root is missing or holds no usable case.
    """
    run_dir = run_directory(params)
    if (run_dir / "params.yaml").is_file():
        print(f"resuming the run in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    root = project_root()
    table = load_table(params.data.classes, params.data.class_keys or None, root)
    if params.data.data_root:
        data_root = resolve_path(params.data.data_root, root)
        if not data_root.is_dir():
            raise InputError(data_root, "data root does not exist")
    else:
        data_root = run_dir / "phantom"
    stale = remove_stale_temporaries(run_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of interrupted writes: "
              + ", ".join(str(p.relative_to(run_dir)) for p in stale[:5]) + (" …" if len(stale) > 5 else ""))
    write_text(run_dir / "params.yaml", params.to_yaml())
    write_text(run_dir / "version.txt", code_version() + "\n")
    if not params.data.data_root:
        write_dataset(data_root, params.data.phantom, table, progress=progress)
    discovery = discover_cases(data_root)
    run = Run(params, run_dir, table, data_root, discovery.cases)
    run.skipped.extend_problems("discover", discovery.problems)
    for problem in discovery.problems:
        print(f"problem: {problem}")
    if params.data.max_cases:
        run.cases = run.cases[: params.data.max_cases]
    run.write_skipped()
    if not run.cases:
        raise InputError(data_root, f"no usable case: every case was skipped (listed in {run.path(SKIPPED_CSV)})")
    return run
