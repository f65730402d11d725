"""Notebook 05: every repair of every case side by side against the truth, and ``<run>/report/``.

Sources, in the order the tables show them: the noisy input, the two classical baselines
(:mod:`baselines`, computed here), stage 1 (each class's M^ref on its own), stage 2 (L^ref) and
stage 3 (the unified model's decoded map). Sources a run has not produced yet are left out.

``report/`` receives ``scores.csv`` (case × class × source against the truth, :mod:`core.scores`),
``checks.csv`` (anatomical checks per case and source), the figures and
``summary.md`` (per-class table, check rates, timings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from nearfix_lib.core.io import LoadedCase, write_text
from nearfix_lib.core.scores import (
    anatomy_checks,
    check_rates,
    pivot,
    read_scores,
    score_labels,
    score_masks,
    write_scores,
)
from nearfix_lib.core.workspace import Run, _read_labels, report_dir, stage1_dir, stage3_dir, stage_labels
from nearfix_lib.repair.baselines import BASELINES, run_baseline
from nearfix_lib.stages.stage2 import original_masks

SOURCES = ("noisy", *BASELINES, "stage1", "stage2", "stage3")


def label_maps(run: Run, case: LoadedCase) -> dict[str, np.ndarray]:
    """The case's full label maps: noisy, baselines, stage 2 and stage 3 (those that exist)."""
    maps = {"noisy": case.label.array}
    for name in BASELINES:
        maps[name] = run_baseline(name, case.label.array, run.table, case.label.spacing, run.params.baselines)
    for name in ("stage2", "stage3"):
        labels = _read_labels(stage_labels(run, name, case.case_id))
        if labels is not None:
            maps[name] = labels
    return maps


def score_case(run: Run, case: LoadedCase, maps: dict[str, np.ndarray]) -> tuple[list[dict], list[dict]]:
    """Per source and class against the truth (stage 1: each class mask alone); checks per label map."""
    truth, spacing = case.truth.array, case.label.spacing
    rows, checks = [], []
    for source in SOURCES:
        if source == "stage1":
            masks = original_masks(run, case.case_id, truth.shape)
            rows += score_masks(case.case_id, source, "truth", masks, truth, spacing, run.table) if masks else []
        elif source in maps:
            rows += score_labels(case.case_id, source, "truth", maps[source], truth, spacing, run.table)
            checks.append({"case": case.case_id, "source": source, **anatomy_checks(maps[source], spacing, run.table)})
    return rows, checks


def run_compare(run: Run, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every case that has a truth; write ``report/scores.csv`` and ``report/checks.csv``."""
    from tqdm import tqdm

    rows, checks = [], []
    for case in tqdm(run.iter_loaded("report", with_image=False), total=len(run.cases), desc="compare",
                     disable=not progress, unit="case"):  # streamed: one case in memory at a time
        if case.truth is None:
            continue
        r, c = score_case(run, case, label_maps(run, case))
        rows += r
        checks += c
    run.write_skipped()
    scores, check_table = write_scores(report_dir(run), rows), pd.DataFrame(checks)
    if len(check_table):
        write_text(report_dir(run) / "checks.csv", check_table.to_csv(index=False))
    return scores, check_table


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


def write_summary(run: Run, scores: pd.DataFrame, checks: pd.DataFrame, figures: list[str]) -> Path:
    """``report/summary.md``: per-class Dice and HD95 by source, check rates, timings, figures."""
    parts = [f"# nearfix report: {run.params.run.name}", "",
             f"{scores['case'].nunique()} cases with ground truth; mean over cases.", "",
             "## Dice against the truth", "", pivot(scores, "dice").round(3).to_markdown(), "",
             "## HD95 (mm) against the truth", "", pivot(scores, "hd95").round(2).to_markdown(), "",
             "## Component-count error (|count - expected|)", "",
             pivot(scores, "comp_error").round(2).to_markdown(), "",
             "## Anatomical checks (share of cases)", "", check_rates(checks).round(2).to_markdown(), "",
             "## Timings", "", timings(run).round(1).to_markdown(index=False), "",
             "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return write_text(report_dir(run) / "summary.md", "\n".join(parts) + "\n")


