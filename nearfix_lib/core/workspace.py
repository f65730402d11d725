"""The run folder: every path a stage writes or a viewer reads, and the read-only view of a run.

One module owns the layout, so a stage that writes ``stage2/labels/<case>.nii.gz`` and the viewer
that reads it cannot drift apart, and the viewers (``viz``) read the stages' outputs from disk
without importing the stages::

    outputs/<run>/
      params.yaml  version.txt  skipped.csv
      phantom/                          (generated data root when params give none)
      prepared/crops.json  prepared/<case>/{crop.json,heart.npz,class_<key>.npz}  prepared/parts/
      inspection/{cases,components,…,scores}.csv
      stage1/<key>/{ckpt,prob,masks}/  stage1/<key>/scores.csv
      stage1/<key>/prob/<case>.npy      (uint8 probabilities on the class ROI grid: stage 3's teacher)
      stage1/<key>/cases/<case>/        (the class fit's per-case store: the ROI mask, its band)
      stage2/{labels,roi,parts}/  stage2/{audit,checks,scores}.csv
      stage3/{ckpt,labels,new_cases,parts}/  stage3/unified.pt  stage3/{scores,distillation}.csv
      stage3/cases/<case>/              (the fit's per-case store: labels, sampling tables, teachers)
      stage3/no_distill/                (the fit without teachers: checkpoints, unified.pt, parts/, scores.csv)
      report/parts/  report/{scores,checks}.csv  report/summary.md  notebooks/

Every ``scores.csv`` has the one long format of :mod:`nearfix_lib.core.scores`. A per-case stage
(``stages.shards``) keeps each case's table rows in ``<stage folder>/parts/<case>.json`` until
they are merged into its tables.

:func:`open_run` opens an existing run read-only (viewers); ``stages.runs.start_run`` creates or
resumes one (notebooks).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pandas as pd

from nearfix_lib.core.classes import ClassTable, load_table
from nearfix_lib.core.config import Params, params_from_yaml_text, project_root, resolve_path
from nearfix_lib.core.io import Case, InputError, LoadedCase, SkipList, discover_cases, load_case
from nearfix_lib.core.scores import read_scores

SKIPPED_CSV = "skipped.csv"


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

    def write_skipped(self, replace: Iterable[str] = ()) -> Path:
        """``skipped.csv``: this session's rows, and the other stages' rows already there (see
        :meth:`SkipList.write`; ``replace`` names stages whose old rows go even without a new one)."""
        return self.skipped.write(self.path(SKIPPED_CSV), replace)


def run_directory(params: Params) -> Path:
    root = project_root()
    if params.run.run_dir:
        return resolve_path(params.run.run_dir, root)
    return root / "outputs" / params.run.name


def data_root_of(params: Params, run_dir: Path) -> Path:
    """The data root a run reads: the params' ``data.data_root``, else the phantom the run generated."""
    return resolve_path(params.data.data_root, project_root()) if params.data.data_root else Path(run_dir) / "phantom"


def open_run(run_dir: str | Path, discover: bool = True) -> Run:
    """An existing run, read-only: its recorded params, class table and cases (for viewers).

    ``discover=False`` leaves the case list empty and does not need the data: what reads only the
    run's own results (experiment pages) works on a copied run folder too.
    """
    run_dir = Path(run_dir)
    meta = run_dir / "params.yaml"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: not a nearfix run folder (no params.yaml)")
    params = params_from_yaml_text(meta.read_text())
    root = project_root()
    table = load_table(params.data.classes, params.data.class_keys or None, root)
    data_root = data_root_of(params, run_dir)
    cases = discover_cases(data_root).cases[: params.data.max_cases or None] if discover else []
    return Run(params, run_dir.resolve(), table, data_root, cases)


# -- the stages' folders ---------------------------------------------------------------------------

def inspection_dir(run: Run) -> Path:
    return run.path("inspection")


def prepared_dir(run: Run) -> Path:
    return run.path("prepared")


def case_dir(prepared_root: Path, case_id: str) -> Path:
    return Path(prepared_root) / str(case_id)


def stage1_dir(run: Run, key: str) -> Path:
    return run.path("stage1", key)


def stage1_fitted(run: Run, key: str) -> bool:
    """Whether class ``key``'s stage-1 fit finished (its last checkpoint is written at the end)."""
    return (stage1_dir(run, key) / "ckpt" / "last.pt").is_file()


def stage1_probabilities(run: Run, key: str, case_id: str) -> Path:
    """Class ``key``'s probabilities of a case on its class ROI grid (``prepared`` crops give the grid),
    uint8 in 1/255 steps as an uncompressed ``.npy``: written by the repair, mapped by stage 3."""
    return stage1_dir(run, key) / "prob" / f"{case_id}.npy"


def stage1_cases_dir(run: Run, key: str) -> Path:
    """The per-case store the fit of class ``key`` reads (``field.store``): one folder per case id."""
    return stage1_dir(run, key) / "cases"


def stage2_dir(run: Run) -> Path:
    return run.path("stage2")


def stage3_dir(run: Run) -> Path:
    return run.path("stage3")


def stage3_cases_dir(run: Run) -> Path:
    """The per-case store stage 3 fits from (``field.store``): one folder per case id."""
    return run.path("stage3", "cases")


def report_dir(run: Run) -> Path:
    return run.path("report")


def decode_dir(run: Run, source: str = "stage3") -> Path:
    """Where a unified model of stage 3 keeps its artifact ``unified.pt`` and its decoding's parts and
    ``scores.csv``: ``stage3/`` for the deliverable (source ``stage3``), ``stage3/<source>/`` for a
    comparison fit (``no_distill``, beside that fit's checkpoints)."""
    return stage3_dir(run) if source == "stage3" else stage3_dir(run) / source


def stage_dir(run: Run, stage: str) -> Path:
    """A stage's folder by the name ``skipped.csv`` gives the stage: ``prepare`` -> ``prepared/``,
    ``stage1-<key>`` -> ``stage1/<key>/``, ``decode`` -> ``stage3/``, ``decode-<source>`` ->
    ``stage3/<source>/`` (:func:`decode_dir`), any other (``stage2``, ``stage3``, ``report``) -> ``<name>/``."""
    if stage == "prepare":
        return prepared_dir(run)
    if stage.startswith("stage1-"):
        return stage1_dir(run, stage[len("stage1-"):])
    if stage == "decode":
        return decode_dir(run)
    if stage.startswith("decode-"):
        return decode_dir(run, stage[len("decode-"):])
    return run.path(stage)


def parts_dir(run: Run, stage: str) -> Path:
    """Where a per-case stage keeps one part file per case until they are merged (``stages.shards``)."""
    return stage_dir(run, stage) / "parts"


def part_path(run: Run, stage: str, case_id: str) -> Path:
    return parts_dir(run, stage) / f"{case_id}.json"


def file_signature(run: Run, path: Path) -> list:
    """What identifies an input file of a run without reading it: its path in the run, size and
    modification time (a store's ``source``: a case whose inputs kept their signature is not rewritten)."""
    st = Path(path).stat()
    return [str(Path(path).relative_to(run.dir)), st.st_size, st.st_mtime_ns]


def stage_labels(run: Run, stage: str, case_id: str) -> Path:
    """The full label map a stage wrote for a case on its original grid (``stage2`` or ``stage3``)."""
    return run.path(stage, "labels", f"{case_id}.nii.gz")


# -- what viewers read ------------------------------------------------------------------------------

def _read_labels(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    img = cast(nib.Nifti1Image, nib.load(str(path)))  # nib.load is typed as returning the base class
    return np.asarray(img.dataobj).astype(np.uint8)


def case_view(run: Run, case_id: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """What the figures and the browser show of one case: noisy, stage2, stage3 (and truth), CT."""
    case = run.load(case_id)
    maps = {"noisy": case.label.array}
    for stage in ("stage2", "stage3"):
        labels = _read_labels(stage_labels(run, stage, case_id))
        if labels is not None:
            maps[stage] = labels
    if case.truth is not None:
        maps["truth"] = case.truth.array
    return maps, case.image.array if case.image is not None else None


def repair_audit(run: Run, case_id: str | None = None) -> pd.DataFrame:
    """Stage 1's audit of every repaired class, of one case or all: M^ref's score rows against the
    input it was fitted to, whose ``audit_*`` columns say how far the repair departs from it and
    whether it was flagged (:mod:`nearfix_lib.repair.audit`). Needs no ground truth."""
    frames = []
    for key in run.table.keys:
        scores = read_scores(stage1_dir(run, key))
        if "audit_flagged" in scores.columns:
            frames.append(scores[(scores["source"] == "stage1") & (scores["reference"] == "noisy")])
    audit = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["case", "class", "audit_flagged"])
    for flag in ("audit_flagged", "audit_kept_input"):
        if flag in audit.columns:
            audit[flag] = audit[flag].astype(bool)
    return audit if case_id is None else audit[audit["case"] == str(case_id)].reset_index(drop=True)


def kept_inputs(run: Run) -> dict[str, frozenset[str]]:
    """Per case, the classes whose M^ref stage 1's audit replaced by the input (``audit_kept_input``).

    The audit judged the field of such a case unable to hold its input, so nothing downstream may
    learn that class of that case from it: stage 3 withholds its teacher, and stage 2's ROI-grid
    masks take the input there too. Empty before stage 1 has scored (no ``scores.csv``)."""
    audit = repair_audit(run)
    if "audit_kept_input" not in audit.columns:
        return {}
    out: dict[str, set[str]] = {}
    for case, key in audit.loc[audit["audit_kept_input"], ["case", "class"]].itertuples(index=False):
        out.setdefault(str(case), set()).add(str(key))
    return {case: frozenset(keys) for case, keys in out.items()}
