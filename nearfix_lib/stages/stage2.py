"""Stage 2 on a run: fuse every case's stage-1 masks, apply the anatomical rules, audit, score.

Two grids per case, the same fusion on both (:func:`fusion.fuse_case`):

* the **original grid** — the stage-1 M^ref NIfTI masks, which stage 1 already evaluated on the
  original voxels (``stage1/<key>/masks``) → ``stage2/labels/<case>.nii.gz`` with the source
  affine and header: L^ref for the user;
* the **whole-heart ROI grid** of stage 3, only where stage 3 learns on it
  (``stage3.supervision: roi``; it learns on the original grid by default) — each class's stage-1
  field is evaluated there directly (through the affine chain, not by resampling masks),
  thresholded and cleaned like M^ref → ``stage2/roi/<case>.npz`` (``labels``, ``to_original``) and
  a NIfTI on the ROI grid's world affine (opens on top of the CT in any viewer). That evaluation
  is ten fields on up to 256^3 points: nine tenths of the stage's time on a real case, for a map
  nothing else reads.

A class the case has but stage 1 left without M^ref (``stage1.classes`` repairing a few classes,
or a case stage 1 skipped) is fused as the input gives it, on both grids, so that the repaired
classes keep the neighbours their rules need (``audit.csv`` rule ``input``); with
``stage2.unrepaired: absent`` it is left out (the scale benchmark's short runs: their stage 2
measures the repaired classes alone).

Also written: ``stage2/audit.csv`` (case × rule × class: components removed, voxels changed,
counts before/after), ``stage2/checks.csv`` (per case and class: components, at expected count,
attachment) and, when the truth exists, ``stage2/scores.csv`` (noisy, stage 1 and stage 2 against
the truth, :mod:`core.scores`). The cases run through :mod:`stages.shards` (``workers=K`` processes,
each loading the stage-1 fields once; ``shard=i/n`` of a SLURM array): a case whose part is written
under the same parameters and stage-1 fits is not recomputed (resume).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.io import InputError, LoadedCase, write_nifti, write_npz
from nearfix_lib.core.metrics import Reference
from nearfix_lib.core.scores import anatomy_checks, component_counts_of, score_labels, score_masks, scores_frame
from nearfix_lib.core.workspace import Run, case_dir, kept_inputs, prepared_dir, stage1_dir, stage1_fitted, stage2_dir
from nearfix_lib.field.decide import labels_in_box, threshold_decision
from nearfix_lib.field.sampling import interface_band
from nearfix_lib.repair.cleanup import clean_mask
from nearfix_lib.repair.fusion import FusionResult, fuse_case
from nearfix_lib.stages import shards
from nearfix_lib.stages.prepare import CaseCrops, load_crops_index, prepared_cases
from nearfix_lib.stages.runs import resolve_device
from nearfix_lib.stages.stage1 import ClassField, class_image, input_in_place, load_stage1_fields

# -- inputs ------------------------------------------------------------------------------------

def original_masks(run: Run, case_id: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The stage-1 M^ref of every class the case has, on its original grid."""
    masks = {}
    for cls in run.table:
        path = stage1_dir(run, cls.key) / "masks" / f"{case_id}.nii.gz"
        if path.is_file():
            mask = np.asarray(nib.load(str(path)).dataobj) > 0
            if mask.shape != tuple(shape):
                raise InputError(path, f"shape {mask.shape} differs from the case's {tuple(shape)}")
            masks[cls.key] = mask
    return masks


def roi_masks(run: Run, fields: dict[str, ClassField], crops: CaseCrops, device: str,
              heart_labels: np.ndarray, kept: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Each class's stage-1 field on the whole-heart ROI grid: its own decision (P >= ``threshold``; the
    anchor and the CT edge are M^ref's, on the original grid), cleaned like M^ref (``heart_labels``: the
    input on that grid, whose class boundaries seed the decode). The classes
    ``kept`` (stage 1's audit kept the case's input: :func:`~nearfix_lib.core.workspace.kept_inputs`)
    take the input on that grid as M^ref took it on the original one, not the field."""
    spacing = crops.heart_spacing
    masks = {}
    for key, f in fields.items():
        if crops.case_id not in f.index_of or key not in crops.class_boxes:
            continue
        p = run.params.stage1.for_class(key)
        if key in kept:
            expected = run.table[key].expected_components
            masks[key], _ = input_in_place(heart_labels == run.table[key].index, expected, spacing, p)
            continue
        image = class_image(run, crops.case_id, key, p.model, device) if p.model.appearance else None
        decided = labels_in_box(f.model, f.index_of[crops.case_id], crops.heart_grid, crops.class_boxes[key],
                                threshold_decision(p.threshold), p.decode, device, p.chunk_points,
                                seed=interface_band(heart_labels == run.table[key].index, 1), image=image)
        masks[key], _ = clean_mask(decided > 0, run.table[key].expected_components, spacing, p.cleanup)
    return masks


def unrepaired_inputs(table: ClassTable, masks: dict[str, np.ndarray], labels: np.ndarray,
                      unrepaired: str = "input") -> dict[str, np.ndarray]:
    """The input's mask of every class the case has but stage 1 left without an M^ref (a run whose
    ``stage1.classes`` repairs a few classes, or a case stage 1 skipped): fused as it is, so that
    the repaired classes keep the neighbours their rules need (the appendage and the veins must
    touch the atrium, the coronaries lie near the myocardium and aorta). None with ``unrepaired``
    ``absent`` (``stage2.unrepaired``)."""
    if unrepaired == "absent":
        return {}
    given = ((cls.key, labels == cls.index) for cls in table if cls.key not in masks)
    return {key: mask for key, mask in given if mask.any()}


# -- the stage -----------------------------------------------------------------------------------

def _write_roi(out: Path, crops: CaseCrops, result: FusionResult) -> None:
    write_npz(out / "roi" / f"{crops.case_id}.npz", labels=result.labels, to_original=crops.heart_grid.to_original)
    write_nifti(out / "roi" / f"{crops.case_id}.nii.gz", result.labels, crops.heart_grid.world_affine(crops.affine))


def needs_roi_grid(run: Run) -> bool:
    """Whether stage 2 also fuses on the whole-heart ROI grid: only stage 3's ``supervision: roi`` reads it."""
    return run.params.stage3.supervision == "roi"


def fuse_run_case(run: Run, case: LoadedCase, crops: CaseCrops, fields: dict[str, ClassField] | None,
                  device: str, kept: frozenset[str] = frozenset(),
                  ) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict]]:
    """Fuse one case on the original grid and, given the stage-1 ``fields``, on the ROI grid (``kept``:
    the classes whose input stage 1's audit kept), and write it; returns (L^ref original, stage-1
    masks, audit rows)."""
    out = stage2_dir(run)
    params = run.params.stage2
    masks = original_masks(run, case.case_id, case.label.shape)
    unrepaired = unrepaired_inputs(run.table, masks, case.label.array, params.unrepaired)
    result = fuse_case({**masks, **unrepaired}, run.table, case.label.spacing, params, shape=case.label.shape)
    write_nifti(out / "labels" / f"{case.case_id}.nii.gz", result.labels, case.label.affine, case.label.header)
    grids = [("original", result)]
    if fields is not None:
        with np.load(case_dir(prepared_dir(run), case.case_id) / "heart.npz") as z:
            heart_labels = z["labels"]  # the input on the heart grid, as prepare resampled it
        roi = roi_masks(run, fields, crops, device, heart_labels, kept)
        roi_result = fuse_case({**roi, **unrepaired_inputs(run.table, roi, heart_labels, params.unrepaired)},
                               run.table, crops.heart_spacing, params, shape=crops.heart_grid.shape)
        _write_roi(out, crops, roi_result)
        grids.append(("roi", roi_result))
    audit = [{"case": case.case_id, "grid": grid, **row} for grid, res in grids for row in res.audit_records()]
    audit += [{"case": case.case_id, "grid": "original", "rule": "absent", "key": k, "components_before": 0,
               "components_after": 0} for k in result.absent]
    audit += [{"case": case.case_id, "grid": "original", "rule": "input", "key": k} for k in unrepaired]
    return result.labels, masks, audit


@dataclass
class Stage2State:
    """What every case of a process needs: the device, the crops index and, for the ROI grid
    (:func:`needs_roi_grid`), the stage-1 fields."""

    device: str
    index: dict[str, CaseCrops]
    fields: dict[str, ClassField] | None
    kept: dict[str, frozenset[str]]  # per case, the classes whose input stage 1's audit kept


def stage2_setup(run: Run) -> Stage2State:
    device = resolve_device(run.params.run.device)
    roi = needs_roi_grid(run)
    fields = load_stage1_fields(run, device) if roi else None
    return Stage2State(device, load_crops_index(prepared_dir(run)), fields, kept_inputs(run) if roi else {})


def stage2_case(run: Run, case_id: str, state: Stage2State) -> shards.Rows:
    """One case of :data:`CASES`: fuse and write it; its audit, checks and (with truth) scores rows."""
    case = run.load(case_id, with_image=False)
    fused, masks, audit = fuse_run_case(run, case, state.index[case_id], state.fields, state.device,
                                        state.kept.get(case_id, frozenset()))
    spacing = case.label.spacing
    scores = score_against_truth(case, masks, fused, run.table) if case.truth is not None else []
    checks = [{"case": case_id, "source": source,
               **anatomy_checks(labels, spacing, run.table, component_counts_of(scores, source) or None)}
              for source, labels in (("noisy", case.label.array), ("stage2", fused))]
    return {"audit": audit, "checks": checks, "scores": scores}


def stage2_stamp(run: Run, case_id: str) -> dict:
    """What a case's result depends on: the parameters of prepare, stage 1 and 2, and the stage-1 fits."""
    p = run.params
    fits = {cls.key: [shards.file_stamp(stage1_dir(run, cls.key) / "ckpt" / name) for name in ("last.pt", "best.pt")]
            for cls in run.table}
    return {"params": {name: dataclasses.asdict(getattr(p, name)) for name in ("prepare", "stage1", "stage2")},
            "classes": run.table.keys, "fits": fits, "roi_grid": needs_roi_grid(run)}


def write_stage2(run: Run, rows: shards.Rows) -> dict[str, pd.DataFrame]:
    return shards.write_tables(stage2_dir(run), rows)


CASES = shards.CaseStage("stage2", ("audit", "checks", "scores"), stage2_case, write_stage2,
                         setup=stage2_setup, stamp=stage2_stamp, cases=prepared_cases)


def run_stage2(run: Run, progress: bool = True, *, workers: int = 1,
               shard: shards.Shard | str | None = None) -> dict[str, pd.DataFrame]:
    """Stage 2 for every case of the run (or a shard's share; ``workers`` processes); returns the
    audit, checks and (with truth) scores tables once every case is done (else empty tables)."""
    for name, keys in run.params.stage2.unknown_keys(run.table).items():
        print(f"stage2.{name}: {keys} are not classes of this run ({run.table.keys}); skipped")
    if not any(stage1_fitted(run, cls.key) for cls in run.table):
        raise ValueError(f"stage2: no finished stage-1 fit in {run.path('stage1')}; run 02_stage1 first")
    tables = shards.run_stage(run, CASES, workers, shard, progress)
    return tables if tables is not None else {"audit": pd.DataFrame(), "checks": pd.DataFrame(),
                                              "scores": scores_frame([])}


def score_against_truth(case: LoadedCase, masks: dict[str, np.ndarray], fused: np.ndarray,
                        table: ClassTable) -> list[dict]:
    """The noisy input, each stage-1 mask on its own (before fusion took voxels from it) and L^ref."""
    spacing = case.label.spacing
    truth = Reference(case.truth.array, spacing, table)  # what the truth alone gives, once for the three
    return (score_labels(case.case_id, "noisy", "truth", case.label.array, truth, spacing, table)
            + score_masks(case.case_id, "stage1", "truth", masks, truth, spacing, table)
            + score_labels(case.case_id, "stage2", "truth", fused, truth, spacing, table))


# -- summaries for the notebook ----------------------------------------------------------------------

def audit_summary(audit: pd.DataFrame) -> pd.DataFrame:
    """Per grid, rule and class: cases touched, components removed and voxels changed in total."""
    a = audit[~audit["rule"].isin(["absent", "input"])]  # not rules: classes without a mask, or from the input
    touched = a.assign(touched=(a["voxels_changed"] > 0).astype(int))
    counted = ["touched", "components_removed", "voxels_changed"]
    return touched.groupby(["grid", "rule", "key"], sort=False)[counted].sum()
