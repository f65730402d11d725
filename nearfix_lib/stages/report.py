"""Notebook 05: every repair of every case side by side against the truth, and ``<run>/report/``.

Sources, in the order the tables show them: the noisy input, the two classical baselines
(:mod:`baselines`, computed here), stage 1 (each class's M^ref on its own), stage 2 (L^ref) and
stage 3 (the unified model's decoded map). Sources a run has not produced yet are left out.

``report/`` receives ``metrics.csv`` (case × class × source: Dice, HD95, ASSD, NSD, component
count and error), ``checks.csv`` (anatomical checks per case and source), the figures and
``summary.md`` (per-class table, check rates, timings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from nearfix_lib.core.io import LoadedCase, write_text
from nearfix_lib.core.workspace import Run, _read_labels, report_dir, stage1_dir, stage3_dir, stage_labels
from nearfix_lib.repair.baselines import BASELINES, run_baseline
from nearfix_lib.stages.stage2 import anatomy_checks, original_masks, score_maps, score_stage1

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
            rows += score_stage1(case, run.table, masks) if masks else []
        elif source in maps:
            rows += score_maps(case.case_id, {source: maps[source]}, truth, spacing, run.table)
            checks.append({"case": case.case_id, "source": source, **anatomy_checks(maps[source], spacing, run.table)})
    for row in rows:
        row["comp_error"] = abs(row["n_comp"] - row["expected"])
    return rows, checks


def run_compare(run: Run, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every case that has a truth; write ``report/metrics.csv`` and ``report/checks.csv``."""
    from tqdm import tqdm

    rows, checks = [], []
    for case in tqdm(list(run.iter_loaded("report", with_image=False)), desc="compare", disable=not progress,
                     unit="case"):
        if case.truth is None:
            continue
        r, c = score_case(run, case, label_maps(run, case))
        rows += r
        checks += c
    run.write_skipped()
    metrics, check_table = pd.DataFrame(rows), pd.DataFrame(checks)
    if len(metrics):
        write_text(report_dir(run) / "metrics.csv", metrics.to_csv(index=False))
        write_text(report_dir(run) / "checks.csv", check_table.to_csv(index=False))
    return metrics, check_table


def per_class_table(metrics: pd.DataFrame, value: str = "dice") -> pd.DataFrame:
    """Classes as rows, sources as columns, mean ``value`` over cases."""
    mean = metrics.groupby(["key", "source"], sort=False)[value].mean().unstack("source")
    return mean[[s for s in SOURCES if s in mean.columns]]


def check_rates(checks: pd.DataFrame) -> pd.DataFrame:
    """Share of cases passing each check (at expected count, attached), per source."""
    cols = [c for c in checks.columns if c.endswith(("at expected", "attached"))]
    rates = checks.groupby("source", sort=False)[cols].mean().T
    return rates[[s for s in SOURCES if s in rates.columns]]


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
    m = stage3_dir(run) / "metrics.csv"
    if m.is_file():
        rows.append({"step": "stage 3 decode, per case", "seconds": pd.read_csv(m)["decode_s"].mean()})
    return pd.DataFrame(rows, columns=["step", "seconds"])


def write_summary(run: Run, metrics: pd.DataFrame, checks: pd.DataFrame, figures: list[str]) -> Path:
    """``report/summary.md``: per-class Dice and HD95 by source, check rates, timings, figures."""
    parts = [f"# nearfix report: {run.params.run.name}", "",
             f"{metrics['case'].nunique()} cases with ground truth; mean over cases.", "",
             "## Dice against the truth", "", per_class_table(metrics, "dice").round(3).to_markdown(), "",
             "## HD95 (mm) against the truth", "", per_class_table(metrics, "hd95").round(2).to_markdown(), "",
             "## Component-count error (|count - expected|)", "",
             per_class_table(metrics, "comp_error").round(2).to_markdown(), "",
             "## Anatomical checks (share of cases)", "", check_rates(checks).round(2).to_markdown(), "",
             "## Timings", "", timings(run).round(1).to_markdown(index=False), "",
             "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return write_text(report_dir(run) / "summary.md", "\n".join(parts) + "\n")


