"""The scores table: how good a label map is, in the one long format every stage writes.

Each stage scores what it produced and writes ``<stage>/scores.csv`` through :func:`write_scores`;
every summary a notebook, report or experiment page shows is :func:`pivot` of such a table. One row
per (case, class, source, reference):

* ``source`` — the label map being scored: ``noisy`` (the input labels), a baseline
  (``gaussian``, ``majority``, …), ``stage1`` (a class's M^ref on its own, before fusion),
  ``stage2`` (L^ref), ``stage3`` (decoded by F_Θ), ``no_distill`` (F_Θ fitted without teachers);
* ``reference`` — what it is scored against: ``truth`` (the phantom's clean labels), ``noisy``
  (stage 1's fitting target) or ``lref`` (stage 3's distillation target, stage 2's output);
* the metrics (:data:`METRICS`): Dice, HD95, ASSD and NSD in mm, voxel and 26-connected component
  counts of both maps, the class's expected component count, whether the source has it
  (``at_expected``) and by how much it misses it (``comp_error``); then any columns a stage adds
  (``decode_s``, the cleanup's voxel counts).

The anatomical checks (component counts at expected, attachment rules) of whole label maps are the
second table every stage shares: :func:`anatomy_checks` per map, :func:`check_rates` per source.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.io import write_text
from nearfix_lib.core.metrics import (
    Reference,
    attachment_report,
    case_report,
    component_counts,
    mask_box,
    mask_components,
    union_box,
)

KEYS = ("case", "class", "source", "reference")
METRICS = ("dice", "hd95", "assd", "nsd", "n_vox", "n_vox_ref", "n_comp", "n_comp_ref", "expected",
           "at_expected", "comp_error")
SCORES_FILE = "scores.csv"


def score_labels(case_id: str, source: str, reference: str, labels: np.ndarray, ref: np.ndarray | Reference,
                 spacing: Sequence[float], table: ClassTable, **extra) -> list[dict]:
    """Every class of label map ``labels`` against label map ``ref``: one row per class. ``ref`` may be
    a :class:`~nearfix_lib.core.metrics.Reference`, built once for a case whose truth scores several maps."""
    rows = case_report(labels, ref, spacing, table).to_dict("records")
    return [_row(case_id, source, reference, r, extra) for r in rows]


def score_masks(case_id: str, source: str, reference: str, masks: Mapping[str, np.ndarray],
                ref: np.ndarray | Reference, spacing: Sequence[float], table: ClassTable, **extra) -> list[dict]:
    """Per-class binary masks (stage 1's overlap, so they are no label map) against label map ``ref``.

    One row per class of ``table``; a class without a mask scores as an empty mask. Each class is
    scored on the box of its mask and its reference voxels (found for every class in one pass over
    ``ref``): the scores are those of the whole volume, at the cost of the class's size.
    """
    truth = Reference.of(ref, spacing, table)
    rows = []
    for cls in table:
        mask = masks.get(cls.key)
        mask = np.zeros(truth.labels.shape, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != truth.labels.shape:
            raise ValueError(f"mask of {cls.key}: shape {mask.shape} differs from the reference's {truth.labels.shape}")
        box = union_box(mask_box(mask), truth.boxes[cls.key]) or (slice(0, 1),) * 3
        own = mask[box]
        record = {**truth.class_scores(own, box, cls.key),
                  "n_comp": mask_components(own),
                  "n_comp_ref": truth.components[cls.key], "expected": cls.expected_components}
        rows.append(_row(case_id, source, reference, record, extra))
    return rows


def _row(case_id: str, source: str, reference: str, record: dict, extra: dict) -> dict:
    record = dict(record)
    key = record.pop("key")
    return {"case": case_id, "class": key, "source": source, "reference": reference, **record,
            "at_expected": float(record["n_comp"] == record["expected"]),
            "comp_error": abs(record["n_comp"] - record["expected"]), **extra}


def scores_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows as a table, columns in the canonical order (keys, metrics, then any extra columns)."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return pd.DataFrame(columns=[*KEYS, *METRICS])
    first = [c for c in (*KEYS, *METRICS) if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def write_scores(folder: str | Path, rows: Iterable[dict]) -> pd.DataFrame:
    """``<folder>/scores.csv`` (atomically); returns the table. Nothing is written for no rows."""
    frame = scores_frame(rows)
    if len(frame):
        write_text(Path(folder) / SCORES_FILE, frame.to_csv(index=False))
    return frame


def read_scores(folder: str | Path) -> pd.DataFrame:
    """A stage's ``scores.csv`` (an empty table when the stage scored nothing)."""
    path = Path(folder) / SCORES_FILE
    return pd.read_csv(path, dtype={"case": str}) if path.is_file() else scores_frame([])


def pivot(scores: pd.DataFrame, values: str | Sequence[str] = "dice", columns: str | Sequence[str] = "source",
          **where: str) -> pd.DataFrame:
    """Means over cases: one row per class, one column per value of ``columns`` (per metric first
    when ``values`` names several), on the rows where each ``where`` column has the given value.

    Rows and columns keep the order they first appear in (the table's class order, the stages'
    source order); several column levels are joined by spaces (``"dice truth stage3"``). NaNs
    (e.g. HD95 of an empty map) are skipped in the means.
    """
    for column, value in where.items():
        scores = scores[scores[column] == value]
    values = [values] if isinstance(values, str) else list(values)
    columns = [columns] if isinstance(columns, str) else list(columns)
    classes = list(dict.fromkeys(scores["class"]))
    mean = scores.groupby(["class", *columns], sort=False)[values].mean()
    if not columns:
        return mean.reindex(classes)
    wide = mean.unstack(columns)
    groups = list(dict.fromkeys(scores[columns].itertuples(index=False, name=None)))
    order = [(v, *g) for v in values for g in groups]
    wide = wide.reindex(index=classes, columns=pd.MultiIndex.from_tuples(order))
    wide.columns = [" ".join(map(str, c if len(values) > 1 else c[1:])) for c in order]
    wide.index.name = "class"
    return wide


# -- anatomical checks -----------------------------------------------------------------------------

def anatomy_checks(labels: np.ndarray, spacing: Sequence[float], table: ClassTable,
                   counts: Mapping[str, int] | None = None) -> dict[str, float]:
    """Per class: component count and whether it is the expected one; per attachment rule: share attached.
    ``counts``: the map's component counts where they are known already (its score rows' ``n_comp``)."""
    out: dict[str, float] = {}
    if counts is None:
        counts = component_counts(labels, table)
    for key, n in ((c.key, counts[c.key]) for c in table):
        out[f"{key} components"] = n
        out[f"{key} at expected"] = float(n == table[key].expected_components)
    for row in attachment_report(labels, spacing, table):
        out[f"{row['key']} attached"] = row["frac_attached"]
    return out


def check_rates(checks: pd.DataFrame) -> pd.DataFrame:
    """Share of cases passing each check (at expected count, attached): checks as rows, sources as columns."""
    cols = [c for c in checks.columns if c.endswith(("at expected", "attached"))]
    return checks.groupby("source", sort=False)[cols].mean().T


def component_counts_of(rows: Iterable[dict], source: str) -> dict[str, int]:
    """The ``n_comp`` of each class in the score rows of ``source`` (what :func:`anatomy_checks` takes)."""
    return {r["class"]: int(r["n_comp"]) for r in rows if r["source"] == source}
