"""Notebook 05: every repair of every case side by side against the truth, and ``<run>/report/``.

Sources, in the order the tables show them: the noisy input, the two classical baselines
(:mod:`baselines`, computed here), stage 1 (each class's M^ref on its own), stage 2 (L^ref) and
stage 3 (the unified model's decoded map). Sources a run has not produced yet are left out.

``report/`` receives ``scores.csv`` (case × class × source against the truth, :mod:`core.scores`),
``checks.csv`` (anatomical checks per case and source), the figures and
``summary.md`` (per-class table, check rates, timings). The scoring runs through :mod:`stages.shards`
(``workers=K`` processes, ``shard=i/n`` of a SLURM array): a case whose part is written under the
same parameters and source files is not scored again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from nearfix_lib.core.io import LoadedCase, write_text
from nearfix_lib.core.metrics import Reference
from nearfix_lib.core.scores import (
    anatomy_checks,
    check_rates,
    component_counts_of,
    pivot,
    read_scores,
    score_labels,
    score_masks,
    scores_frame,
)
from nearfix_lib.core.workspace import Run, _read_labels, repair_audit, report_dir, stage1_dir, stage3_dir, stage_labels
from nearfix_lib.repair.baselines import BASELINES, run_baseline
from nearfix_lib.stages import shards, stage2
from nearfix_lib.stages.prepare import prepared_cases

SOURCES = ("noisy", *BASELINES, "stage1", "stage2", "stage3")
STAGE2_SOURCES = ("noisy", "stage1", "stage2")  # scored against the truth by stage 2 already


def label_maps(run: Run, case: LoadedCase, skip: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The case's full label maps: noisy, baselines, stage 2 and stage 3 (those that exist, but ``skip``)."""
    maps = {"noisy": case.label.array}
    for name in BASELINES:
        maps[name] = run_baseline(name, case.label.array, run.table, case.label.spacing, run.params.baselines)
    for name in ("stage2", "stage3"):
        if name in skip:
            continue
        labels = _read_labels(stage_labels(run, name, case.case_id))
        if labels is not None:
            maps[name] = labels
    return maps


def score_case(run: Run, case: LoadedCase, maps: dict[str, np.ndarray],
               known: shards.Rows | None = None) -> tuple[list[dict], list[dict]]:
    """Per source and class against the truth (stage 1: each class mask alone); checks per label map.
    ``known``: rows already computed by stage 2 (its current part, :data:`STAGE2_SOURCES`), taken
    as they are instead of scoring those sources again."""
    spacing = case.label.spacing
    truth = Reference(case.truth.array, spacing, run.table)  # what the truth alone gives, once for all sources
    rows, checks = [], []
    for source in SOURCES:
        if known and source in STAGE2_SOURCES:
            rows += [r for r in known["scores"] if r["source"] == source]
            checks += [r for r in known["checks"] if r["source"] == source]
        elif source == "stage1":
            masks = stage2.original_masks(run, case.case_id, truth.labels.shape)
            rows += score_masks(case.case_id, source, "truth", masks, truth, spacing, run.table) if masks else []
        elif source in maps:
            scored = score_labels(case.case_id, source, "truth", maps[source], truth, spacing, run.table)
            counts = component_counts_of(scored, source)
            checks.append({"case": case.case_id, "source": source,
                           **anatomy_checks(maps[source], spacing, run.table, counts)})
            rows += scored
    return rows, checks


def report_case(run: Run, case_id: str, state: None) -> shards.Rows:
    """One case of :data:`CASES`: every source against the truth (no rows for a case without one).
    Stage 2 scored the noisy input, stage 1 and stage 2 on the same truth: where its part for the case
    is current, those rows are taken from it (half the scoring of a real case)."""
    case = run.load(case_id, with_image=False)
    if case.truth is None:
        return {"scores": [], "checks": []}
    known = shards.current_rows(run, stage2.CASES, case_id)
    known = known if known and known.get("scores") else None  # a stage 2 without the truth scored nothing
    maps = label_maps(run, case, skip=STAGE2_SOURCES if known else ())
    scores, checks = score_case(run, case, maps, known)
    return {"scores": scores, "checks": checks}


def report_stamp(run: Run, case_id: str) -> dict:
    """What a case's scores depend on: the baselines' parameters and the files of the stages' maps."""
    files = [stage1_dir(run, cls.key) / "masks" / f"{case_id}.nii.gz" for cls in run.table]
    files += [stage_labels(run, name, case_id) for name in ("stage2", "stage3")]
    return {"baselines": dataclasses.asdict(run.params.baselines), "classes": run.table.keys,
            "files": {str(f.relative_to(run.dir)): shards.file_stamp(f) for f in files}}


def write_report(run: Run, rows: shards.Rows) -> tuple[pd.DataFrame, pd.DataFrame]:
    tables = shards.write_tables(report_dir(run), rows)
    return tables["scores"], tables["checks"]


CASES = shards.CaseStage("report", ("scores", "checks"), report_case, write_report, stamp=report_stamp,
                         cases=prepared_cases)


def run_compare(run: Run, progress: bool = True, *, workers: int = 1,
                shard: shards.Shard | str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every case that has a truth (or a shard's share; ``workers`` processes); write
    ``report/scores.csv`` and ``report/checks.csv`` once every case is done (else empty tables)."""
    tables = shards.run_stage(run, CASES, workers, shard, progress)
    return tables if tables is not None else (scores_frame([]), pd.DataFrame())


def timings(run: Run) -> pd.DataFrame:
    """Wall-clock seconds of the fits (from their logs) and of decoding a case with F_Θ."""
    rows = []
    for cls in run.table:
        log = stage1_dir(run, cls.key) / "ckpt" / "log.csv"
        if log.is_file():
            rows.append({"step": f"stage 1 fit, {cls.key}", "seconds": pd.read_csv(log)["seconds"].sum()})
    log = stage3_dir(run) / "ckpt" / "log.csv"
    if log.is_file():
        rows.append({"step": "stage 3 fit", "seconds": pd.read_csv(log)["seconds"].sum()})
    decoded = read_scores(stage3_dir(run))
    if len(decoded):
        rows.append({"step": "stage 3 decode, per case", "seconds": decoded["decode_s"].mean()})
    return pd.DataFrame(rows, columns=["step", "seconds"])


AUDIT_MEASURES = {"audit_fit_dice": "fit Dice", "audit_dropped": "dropped", "audit_added": "added",
                  "audit_skeleton_kept": "centre line kept", "audit_keep_cut": "keep cut",
                  "edge_decided": "CT edge decided", "edge_contrast_noise": "CT contrast / noise",
                  "path_joined": "pieces joined on the CT", "path_added": "path voxels",
                  "path_dark_dropped": "voxels dark on the CT",
                  "anatomy_unattached_voxels": "unattached voxels",
                  "anatomy_origin_split_voxels": "join voxels between origins", "anatomy_split_voxels": "join voxels",
                  "anatomy_enclosed_voxels": "voxels inside chambers or the aorta",
                  "anatomy_yielded_voxels": "input voxels left to other classes"}


def audit_summary(audit: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 1's audit (:func:`~nearfix_lib.core.workspace.repair_audit`) per class — cases, the
    measures' means, how many cases were flagged and how many kept their input — and the flagged cases."""
    if audit.empty:
        return pd.DataFrame(), pd.DataFrame()
    per_class = audit.groupby("class", sort=False).agg(
        cases=("case", "nunique"),
        # a run repaired before a measure existed lacks its column
        **{name: (col, "mean") for col, name in AUDIT_MEASURES.items() if col in audit.columns},
        flagged=("audit_flagged", "sum"), kept_input=("audit_kept_input", "sum"))
    flagged = audit[audit["audit_flagged"]][["class", "case", "audit_reasons", "audit_kept_input"]]
    return per_class, flagged.rename(columns={"audit_reasons": "why", "audit_kept_input": "input kept"})


def _audit_section(run: Run) -> list[str]:
    per_class, flagged = audit_summary(repair_audit(run))
    if per_class.empty:
        return []
    listed = flagged.to_markdown(index=False) if len(flagged) else "No case was flagged."
    return ["## Repair audit: stage 1 against its own input (no truth needed)", "",
            "Means over cases: fit Dice against the input, input voxels dropped and voxels added (shares of "
            "the input), the input's centre line kept (thin classes), the cut above which M^ref kept an input "
            "voxel (classes with `stage1.anchor`; above `keep_above` where `max_volume_ratio` raised it), "
            "the share of the boundary band whose voxels the CT decided and its half contrast over its noise "
            "(classes with `stage1.ct_edge`; near 0: the CT was too faint and the field's boundary stayed), "
            "the voxels `stage1.anatomy` took: of pieces away from the classes the class lies on, and of "
            "joins over another class that parted its trees (between two of their origins, then where it had "
            "too few pieces); cases flagged by `stage1.audit`.", "",
            per_class.round(3).to_markdown(), "", listed, ""]


def write_summary(run: Run, scores: pd.DataFrame, checks: pd.DataFrame, figures: list[str]) -> Path:
    """``report/summary.md``: per-class Dice and HD95 by source, check rates, stage 1's audit,
    timings, figures."""
    parts = [f"# nearfix report: {run.params.run.name}", "",
             f"{scores['case'].nunique()} cases with ground truth; mean over cases.", "",
             "## Dice against the truth", "", pivot(scores, "dice").round(3).to_markdown(), "",
             "## HD95 (mm) against the truth", "", pivot(scores, "hd95").round(2).to_markdown(), "",
             "## Component-count error (|count - expected|)", "",
             pivot(scores, "comp_error").round(2).to_markdown(), "",
             "## Anatomical checks (share of cases)", "", check_rates(checks).round(2).to_markdown(), "",
             *_audit_section(run),
             "## Timings", "", timings(run).round(1).to_markdown(index=False), "",
             "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return write_text(report_dir(run) / "summary.md", "\n".join(parts) + "\n")


