"""Crop and resample every case onto the fixed-size grids the implicit models are fitted on.

For each case: the whole-heart ROI (bounding box of all classes + margin) resampled to
``heart_resolution^3`` (labels nearest, CT linear) for stage 3, and per class the class ROI
(bounding box of that class + margin) resampled to ``class_resolution^3`` (interpolated
occupancy, see :func:`geometry.resample_mask`) for stage 1. The crop parameters — boxes and
grid-to-original affines, plus the case's shape and affine — go to ``prepared/<case>/crop.json``
and, for the whole data set, ``prepared/crops.json``: later stages read geometry from there and
never guess it. A case whose crop.json records the same parameters is not redone (resume).

The cases run through :mod:`stages.shards` (``workers=K`` processes, ``shard=i/n`` of a SLURM
array); each case's crop parameters are its part, merged into ``crops.json`` in case order.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.config import PrepareParams
from nearfix_lib.core.geometry import Box, Grid, resample, resample_mask, roi_box, roi_grid, voxel_spacing
from nearfix_lib.core.io import LoadedCase, write_json, write_nifti, write_npz
from nearfix_lib.core.workspace import Run, case_dir, prepared_dir
from nearfix_lib.stages import shards

if TYPE_CHECKING:
    import pandas as pd

AIR_HU = -1024.0


@dataclass
class CaseCrops:
    """Geometry of one prepared case (what ``crop.json`` holds)."""

    case_id: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    heart_box: Box
    heart_grid: Grid
    class_boxes: dict[str, Box]
    class_grids: dict[str, Grid]
    missing: list[str]

    @property
    def spacing(self) -> np.ndarray:
        return voxel_spacing(self.affine)

    @property
    def heart_spacing(self) -> np.ndarray:
        """Voxel size (mm) of the whole-heart ROI grid."""
        return voxel_spacing(self.heart_grid.world_affine(self.affine))

    def to_dict(self, params: PrepareParams) -> dict:
        return {
            "case_id": self.case_id,
            "params": dataclasses.asdict(params),
            "shape": list(self.shape),
            "affine": np.asarray(self.affine).tolist(),
            "spacing_mm": self.spacing.tolist(),
            "heart": {"box": self.heart_box.to_dict(), "grid": self.heart_grid.to_dict()},
            "classes": {k: {"box": self.class_boxes[k].to_dict(), "grid": self.class_grids[k].to_dict()}
                        for k in self.class_boxes},
            "missing": list(self.missing),
        }

    @classmethod
    def from_dict(cls, d: dict) -> CaseCrops:
        return cls(
            case_id=d["case_id"], shape=tuple(d["shape"]), affine=np.asarray(d["affine"], dtype=np.float64),
            heart_box=Box.from_dict(d["heart"]["box"]), heart_grid=Grid.from_dict(d["heart"]["grid"]),
            class_boxes={k: Box.from_dict(v["box"]) for k, v in d["classes"].items()},
            class_grids={k: Grid.from_dict(v["grid"]) for k, v in d["classes"].items()},
            missing=list(d["missing"]),
        )


def image_classes(run: Run) -> tuple[str, ...]:
    """The classes whose CT crop prepare writes: every class with ``prepare.class_images``, else those
    whose stage-1 model reads the CT (``stage1.model.appearance``, e.g. the coronaries' per-class override)."""
    keys = tuple(run.table.keys)
    return keys if run.params.prepare.class_images else run.params.stage1.field_ct_readers(keys)


def _is_done(folder: Path, params: PrepareParams, images: tuple[str, ...] = ()) -> bool:
    meta = folder / "crop.json"
    if not meta.is_file():
        return False
    try:
        d = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    if d.get("params") != dataclasses.asdict(params) or d.get("image_classes", []) != list(images):
        return False
    needed = ["heart.npz"] + [f"class_{k}.npz" for k in d.get("classes", {})]
    return all((folder / n).is_file() for n in needed)


def prepare_case(case: LoadedCase, table: ClassTable, params: PrepareParams, prepared_root: Path,
                 images: tuple[str, ...] = ()) -> CaseCrops:
    """Crop/resample one validated case and write its arrays and crop.json (resumable); ``images``: the
    classes whose CT crop is written too (:func:`image_classes`), where the case has a CT."""
    folder = case_dir(prepared_root, case.case_id)
    if _is_done(folder, params, images):
        return CaseCrops.from_dict(json.loads((folder / "crop.json").read_text()))
    labels = case.label.array
    spacing = case.label.spacing
    heart_box = roi_box(labels > 0, params.heart_margin, spacing, params.margin_unit)
    if heart_box is None:  # read_label already refuses empty maps; keep the guard explicit
        raise ValueError(f"case {case.case_id}: empty label map")
    heart_grid = roi_grid(heart_box, params.heart_resolution)
    heart = {"labels": resample(labels, heart_grid, order=0), "to_original": heart_grid.to_original}
    if params.save_image and case.image is not None:
        # whole HU as int16: what a figure shows, at half the bytes of float32 and cheap to compress
        heart["image"] = np.rint(resample(case.image.array, heart_grid, order=1, cval=AIR_HU)).astype(np.int16)
    write_npz(folder / "heart.npz", **heart)
    # the same ROI labels as NIfTI on the ROI grid's own world affine: opens in napari or any
    # viewer exactly on top of the original image
    write_nifti(folder / "heart_labels.nii.gz", heart["labels"], heart_grid.world_affine(case.label.affine))

    boxes, grids, missing = {}, {}, []
    for cls in table:
        mask = labels == cls.index
        box = roi_box(mask, params.class_margin, spacing, params.margin_unit)
        if box is None:
            missing.append(cls.key)
            continue
        grid = roi_grid(box, params.class_resolution_for(cls.key))
        boxes[cls.key], grids[cls.key] = box, grid
        arrays = {"mask": resample_mask(mask, grid), "to_original": grid.to_original}
        if cls.key in images and case.image is not None:
            arrays["image"] = resample(case.image.array, grid, order=1, cval=AIR_HU).astype(np.float16)
        write_npz(folder / f"class_{cls.key}.npz", **arrays)
    crops = CaseCrops(case.case_id, case.label.shape, case.label.affine, heart_box, heart_grid,
                      boxes, grids, missing)
    write_json(folder / "crop.json", {**crops.to_dict(params), "image_classes": list(images)})  # last: the case is done
    return crops


def prepare_case_part(run: Run, case_id: str, state: None) -> shards.Rows:
    """One case of :data:`CASES`: read, prepare (resumable), its crop parameters as the part."""
    case = run.load(case_id, with_truth=False)
    crops = prepare_case(case, run.table, run.params.prepare, prepared_dir(run), image_classes(run))
    return {"crops": [crops.to_dict(run.params.prepare)]}


def prepare_stamp(run: Run, case_id: str) -> dict:
    return {**dataclasses.asdict(run.params.prepare), "image_classes": list(image_classes(run))}


def write_prepared(run: Run, rows: shards.Rows) -> list[CaseCrops]:
    """``prepared/crops.json`` from every case's crop parameters; returns them."""
    params = run.params.prepare
    write_json(prepared_dir(run) / "crops.json", {"params": dataclasses.asdict(params),
                                                  "cases": {d["case_id"]: d for d in rows["crops"]}})
    return [CaseCrops.from_dict(d) for d in rows["crops"]]


CASES = shards.CaseStage("prepare", ("crops",), prepare_case_part, write_prepared, stamp=prepare_stamp)


def prepare_run(run: Run, progress: bool = True, *, workers: int = 1,
                shard: shards.Shard | str | None = None) -> list[CaseCrops]:
    """Prepare every valid case of a run (or a shard's share; ``workers`` processes); bad cases are
    listed in the run's skipped.csv. Returns every case's crops once all are done, else ``[]``."""
    return shards.run_stage(run, CASES, workers, shard, progress) or []


def load_case_arrays(prepared_root: Path, case_id: str) -> tuple[dict, dict]:
    """The prepared arrays of a case: heart ROI (labels, image?) and per-class ROI masks."""
    folder = case_dir(prepared_root, case_id)
    with np.load(folder / "heart.npz") as z:
        heart = {k: z[k] for k in z.files}
    masks = {}
    for path in sorted(folder.glob("class_*.npz")):
        with np.load(path) as z:
            masks[path.stem[len("class_"):]] = z["mask"]
    return heart, masks


def write_crops_index(prepared_root: Path, crops: list[CaseCrops], params: PrepareParams) -> Path:
    """All cases' crop parameters in one JSON file (what stage 1 and stage 3 read)."""
    return write_json(Path(prepared_root) / "crops.json",
                      {"params": dataclasses.asdict(params),
                       "cases": {c.case_id: c.to_dict(params) for c in crops}})


def load_crops_index(prepared_root: Path) -> dict[str, CaseCrops]:
    d = json.loads((Path(prepared_root) / "crops.json").read_text())
    return {cid: CaseCrops.from_dict(v) for cid, v in d["cases"].items()}


def prepared_cases(run: Run) -> list[str]:
    """The run's cases that prepare wrote, in the run's order: what every later per-case stage computes
    (a case prepare skipped is listed once, by prepare, in ``skipped.csv``)."""
    path = prepared_dir(run) / "crops.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run is not prepared; run 01_prepare (or nearfix run prepare) first")
    done = load_crops_index(prepared_dir(run))
    return [c.case_id for c in run.cases if c.case_id in done]


def roi_table(crops: list[CaseCrops], params: PrepareParams) -> pd.DataFrame:
    """One row per case and ROI: box size in voxels and mm, and the resampling factor."""
    import pandas as pd

    rows = []
    for c in crops:
        entries = [("heart", c.heart_box, params.heart_resolution)]
        entries += [(k, b, params.class_resolution_for(k)) for k, b in c.class_boxes.items()]
        for name, box, res in entries:
            size_mm = np.asarray(box.shape) * c.spacing
            rows.append({"case": c.case_id, "roi": name,
                         "box_vox": "x".join(map(str, box.shape)),
                         "box_mm": "x".join(f"{v:.0f}" for v in size_mm),
                         "grid": f"{res}^3",
                         "mm_per_grid_voxel": float(np.max(size_mm / res))})
    return pd.DataFrame(rows)
