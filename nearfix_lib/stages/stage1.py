"""Stage 1: per-class shape-only NeAR repair of every case's mask of one class.

For class c, every case that has it contributes its ROI mask (prepared on ``class_resolution^3``)
and one latent z_{i,c}. An auto-decoder F_c(z_{i,c}, p) is fitted to all of them — all cases are
both training and validation set, because the goal is the repaired masks, not generalisation;
the decoder's limited capacity is what keeps the noise out. Then, per case, F_c is evaluated

* on the ROI grid — probabilities saved as float16 for distillation in stage 3, and
* directly on the original voxels inside the class ROI (through the affine chain), thresholded,
  cleaned per class (expected number of largest components, minimum size) and written as a
  NIfTI mask with the source affine and header: M^ref_{i,c}.

Outputs, in ``<run>/stage1/<key>/``: ``cases/<case>/`` (the per-case store the fit reads, written
once per case, see :mod:`nearfix_lib.field.store`), ``ckpt/{best,last}.pt``, ``ckpt/log.csv``,
``prob/<case>.npz``, ``masks/<case>.nii.gz``, ``scores.csv`` (:mod:`core.scores`). Re-running resumes
an interrupted fit; a finished fit is loaded, not retrained.

Multi-GPU, one class: ``torchrun --nproc_per_node=K -m nearfix_lib.stages.stage1 --params P --class LV``
runs :func:`fit_class` under DistributedDataParallel (the notebook's code path; ``train.cases_per_batch``
must split evenly over the K processes), then rank 0 writes M^ref. ``jobs/torchrun_stage1.sh`` is
the SLURM form, one array task per class.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from nearfix_lib.core.classes import ClassTable, class_centre
from nearfix_lib.core.config import SamplingParams, Stage1Params, load_params
from nearfix_lib.core.geometry import Box, roi_grid
from nearfix_lib.core.io import LoadedCase, Volume, load_case, write_nifti, write_npz
from nearfix_lib.core.metrics import dice
from nearfix_lib.core.scores import score_labels, score_masks, write_scores
from nearfix_lib.core.workspace import Run, case_dir, file_signature, prepared_dir, stage1_cases_dir, stage1_dir
from nearfix_lib.field.infer import field_on_grid, original_box_grid
from nearfix_lib.field.losses import build_loss, latent_l2
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.sampling import BandSampler, LabelStore
from nearfix_lib.field.store import CaseStore, StoreSpec, is_complete, rank_rotation, write_case, write_store
from nearfix_lib.field.train import (
    FitResult,
    distributed_rank_world,
    fit,
    init_distributed_from_env,
    load_for_inference,
    unwrap,
)
from nearfix_lib.repair.cleanup import clean_mask
from nearfix_lib.stages.prepare import CaseCrops, load_crops_index
from nearfix_lib.stages.runs import resolve_device, start_run


class Stage1Task:
    """Biased point sampling on the ROI masks; BCE (or per-class loss) + lambda ||z||^2.

    The masks are read from a store (:func:`write_mask_store`, or :func:`load_stage1_data`'s
    ``stage1/<key>/cases/``) one case at a time, so the task's memory does not grow with the number
    of cases. Known limit: the appearance branch's CT crops (``images``, only when
    ``model.appearance`` is on; it is off by default) are held in memory, ``4 R^3`` bytes per case.
    """

    score_name = "dice"

    def __init__(self, store: LabelStore, params: Stage1Params, seed: int, device: str,
                 images: list[np.ndarray] | None = None):
        self.n_cases = len(store)
        self.sampler = BandSampler(store, params.sampling, seed)
        self.data_loss = build_loss(params.loss)
        self.latent_weight = params.loss.latent_weight
        self.threshold = params.threshold
        self.chunk = params.chunk_points
        self.device = device
        self.images = None if images is None else torch.stack(
            [torch.as_tensor(im, dtype=torch.float32)[None] for im in images])

    def batch(self, case_idx: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        points, targets = self.sampler.sample(list(case_idx), epoch)
        out = {"case": torch.as_tensor(np.asarray(case_idx), dtype=torch.long),
               "points": torch.from_numpy(points), "target": torch.from_numpy(targets)}
        if self.images is not None:
            out["image"] = self.images[out["case"]]
        return out

    def loss(self, model, batch):
        logits = model(batch["case"], batch["points"], batch.get("image"))[..., 0].float()
        data = self.data_loss(logits, batch["target"])
        lat = latent_l2(unwrap(model).latents(batch["case"]))
        return data + self.latent_weight * lat, {"data": data.item(), "latent": lat.item()}

    def image_of(self, i: int) -> torch.Tensor | None:
        return None if self.images is None else self.images[i:i + 1].to(self.device)

    def evaluate(self, model, cases: Sequence[int]) -> dict[str, float]:
        """Dice of the thresholded full ROI-grid reconstruction against the input mask."""
        scores = []
        for i in cases:
            mask = self.sampler.mask(i)
            box = Box((0, 0, 0), mask.shape)
            prob = field_on_grid(model, i, roi_grid(box, mask.shape), box, self.device, self.chunk,
                                 image=self.image_of(i))[..., 0]
            scores.append(dice(prob >= self.threshold, mask))
        return {"dice": float(np.mean(scores))}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


@dataclass
class Stage1Data:
    """The cases of one class: ids (latent order), geometry, the store of their ROI masks on disk
    (``stage1/<key>/cases/``), the cases without the class (and CT crops for the appearance branch)."""

    key: str
    case_ids: list[str]
    crops: list[CaseCrops]
    store: CaseStore
    images: list[np.ndarray] | None
    absent: list[str]


def normalise_ct(image: np.ndarray) -> np.ndarray:
    """HU clipped to [-1000, 1000] and scaled to [-1, 1]: the CT branch's input range."""
    return np.clip(np.asarray(image, dtype=np.float32), -1000.0, 1000.0) / 1000.0


def store_spec(sampling: SamplingParams) -> StoreSpec:
    """A stage-1 store: each case's class mask as labels 0/1 (foreground: class 1) and the band
    the sampler draws from, of the sampling's radius."""
    return StoreSpec((1,), sampling.sampling_dilation_radius, interfaces=False)


def write_mask_store(root: str | Path, masks: Sequence[np.ndarray], sampling: SamplingParams,
                     case_ids: Sequence[str] | None = None) -> CaseStore:
    """A stage-1 store of masks given in memory (tests, benchmarks); a run's comes from :func:`load_stage1_data`."""
    return write_store(root, [np.asarray(m, dtype=np.uint8) for m in masks], store_spec(sampling), case_ids=case_ids)


def load_stage1_data(run: Run, key: str, params: Stage1Params, with_images: bool = False) -> Stage1Data:
    """Every case that has class ``key``, its prepared ROI mask written to the store
    ``stage1/<key>/cases/<case>/`` once (a case whose store matches its ``class_<key>.npz`` is not
    rewritten) and opened from there: nothing per case stays in memory but its crop geometry and the
    store's small metadata (and the CT crops when ``with_images``).

    Under torchrun every process runs this before the fit, each from its own offset
    (:func:`~nearfix_lib.field.store.rank_rotation`), so the K processes build the store in parallel.
    ``params`` are the class's (``Stage1Params.for_class``): the band radius is part of the store.
    """
    prepared = prepared_dir(run)
    index = load_crops_index(prepared)
    spec, root = store_spec(params.sampling), stage1_cases_dir(run, key)
    present = [cid for cid, c in index.items() if key in c.class_boxes]
    for cid in rank_rotation(present):
        path = case_dir(prepared, cid) / f"class_{key}.npz"
        source = {"mask": file_signature(run, path)}
        if not is_complete(root / cid, spec, source):
            with np.load(path) as z:
                write_case(root / cid, z["mask"].astype(np.uint8), spec, source=source)
    images = [_ct_crop(case_dir(prepared, cid) / f"class_{key}.npz", cid) for cid in present] if with_images else None
    absent = [cid for cid in index if cid not in present]
    return Stage1Data(key, present, [index[cid] for cid in present], CaseStore(root, present, spec), images, absent)


def _ct_crop(path: Path, case_id: str) -> np.ndarray:
    with np.load(path) as z:
        if "image" not in z.files:
            raise ValueError(f"stage1: the appearance branch needs CT crops; prepare with "
                             f"prepare.class_images: true (case {case_id} has none)")
        return normalise_ct(z["image"])


def build_model(n_cases: int, params: Stage1Params) -> ImplicitField:
    return ImplicitField(n_cases, params.model, n_heads=1)


def fit_class(run: Run, key: str, params: Stage1Params, progress: bool = True,
              epochs: int | None = None) -> tuple[ImplicitField, Stage1Data, FitResult]:
    """Fit F_c on every case that has class ``key`` (resumes from ``ckpt/last.pt``; under torchrun: DDP).

    ``params`` are the stage's parameters; the class's own overrides are applied here.
    """
    params = params.for_class(key)
    device = init_distributed_from_env(resolve_device(run.params.run.device))
    data = load_stage1_data(run, key, params, with_images=params.model.appearance)
    for cid in data.absent:
        run.skipped.add(f"stage1-{key}", cid, f"class {key} absent from the labels")
    run.write_skipped()
    if not data.case_ids:
        raise ValueError(f"stage1: no case has class {key}")
    torch.manual_seed(run.params.run.seed)
    model = build_model(len(data.case_ids), params)
    task = Stage1Task(data.store, params, run.params.run.seed, device, data.images)
    extra = {"key": key, "case_ids": data.case_ids, "params": run.params.to_dict()}
    result = fit(model, task, params.train, stage1_dir(run, key) / "ckpt", device=device,
                 seed=run.params.run.seed, progress=progress, extra=extra, epochs=epochs)
    return model, data, result


def repair_case(model: ImplicitField, i: int, crops: CaseCrops, label: Volume, out: Path, key: str,
                expected: int, params: Stage1Params, device: str,
                image: torch.Tensor | None = None) -> tuple[np.ndarray, dict]:
    """Probabilities on the ROI grid (saved), then M^ref on the original grid (NIfTI, returned)."""
    box, grid = crops.class_boxes[key], crops.class_grids[key]
    prob_roi = field_on_grid(model, i, grid, box, device, params.chunk_points, image=image)[..., 0]
    write_npz(out / "prob" / f"{crops.case_id}.npz", prob=prob_roi.astype(np.float16),
              to_original=grid.to_original, box_lo=np.asarray(box.lo), box_hi=np.asarray(box.hi))
    prob = field_on_grid(model, i, original_box_grid(box), box, device, params.chunk_points, image=image)[..., 0]
    cleaned, report = clean_mask(prob >= params.threshold, expected, crops.spacing, params.cleanup)
    mask = np.zeros(crops.shape, dtype=bool)
    mask[box.slices] = cleaned
    write_nifti(out / "masks" / f"{crops.case_id}.nii.gz", mask.astype(np.uint8), label.affine, label.header)
    return mask, dataclasses.asdict(report)


def repair_class(run: Run, key: str, params: Stage1Params, model: ImplicitField, data: Stage1Data,
                 progress: bool = True) -> pd.DataFrame:
    """Write M^ref for every case of the class from the selected checkpoint; its scores table."""
    from tqdm import tqdm

    params = params.for_class(key)
    device = resolve_device(run.params.run.device)
    out = stage1_dir(run, key)
    load_for_inference(model, out / "ckpt", params.train.select, device)
    cls = run.table[key]
    cases = {c.case_id: c for c in run.cases}
    rows = []
    for i, (cid, crops) in enumerate(tqdm(list(zip(data.case_ids, data.crops)), desc=f"repair {key}",
                                          disable=not progress, unit="case")):
        case = load_case(cases[cid], run.table, with_image=False)  # read once: header, input, truth
        image = None if data.images is None else torch.as_tensor(data.images[i])[None, None].to(device)
        repaired, report = repair_case(model, i, crops, case.label, out, key, cls.expected_components, params,
                                       device, image)
        rows += score_case(case, run.table, key, repaired, report)
    return write_scores(out, rows)


def score_case(case: LoadedCase, table: ClassTable, key: str, repaired: np.ndarray, cleanup: dict) -> list[dict]:
    """M^ref against the noisy input it was fitted to and, where present, it and the input against the truth."""
    only, noisy, spacing = table.subset([key]), case.label.array, case.label.spacing
    counts = {"cleanup_removed_voxels": cleanup["removed_voxels"], "cleanup_bridged_voxels": cleanup["bridged_voxels"]}
    rows = score_masks(case.case_id, "stage1", "noisy", {key: repaired}, noisy, spacing, only, **counts)
    if case.truth is not None:
        rows += score_labels(case.case_id, "noisy", "truth", noisy, case.truth.array, spacing, only)
        rows += score_masks(case.case_id, "stage1", "truth", {key: repaired}, case.truth.array, spacing, only, **counts)
    return rows


def example_maps(run: Run, key: str, case_id: str) -> tuple[dict[str, np.ndarray], np.ndarray | None, tuple]:
    """Class-only label maps (noisy, stage1, truth if any), the CT and the class centre."""
    case = run.load(case_id)
    idx = run.table[key].index
    repaired = np.asarray(nib.load(str(stage1_dir(run, key) / "masks" / f"{case_id}.nii.gz")).dataobj) > 0
    maps = {"noisy": np.where(case.label.array == idx, idx, 0).astype(np.uint8),
            "stage1": (repaired * idx).astype(np.uint8)}
    if case.truth is not None:
        maps["truth"] = np.where(case.truth.array == idx, idx, 0).astype(np.uint8)
    image = case.image.array if case.image is not None else None
    return maps, image, class_centre(maps["noisy"], run.table, key)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Command line for torchrun: fit one class (DDP when WORLD_SIZE > 1); rank 0 then writes M^ref."""
    ap = argparse.ArgumentParser(prog=prog, description="stage 1: fit one class's field and write its "
                                 "repaired masks (torchrun-ready)")
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--device", default="")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--class", dest="cls", help="class key or label index, e.g. LV or 3")
    which.add_argument("--nth", type=int, help="the nth class the run fits, 0-based (stage1.classes, else the "
                       "class table's order), e.g. $SLURM_ARRAY_TASK_ID")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    run = start_run(load_params(args.params, run_dir=args.run_dir, device=args.device), progress=False)
    fitted = run.params.stage1.classes or run.table.keys
    if args.nth is not None and not 0 <= args.nth < len(fitted):
        ap.error(f"--nth {args.nth}: the run fits {len(fitted)} classes ({', '.join(map(str, fitted))})")
    key = run.table.resolve(args.cls if args.nth is None else fitted[args.nth]).key
    params = run.params.stage1
    model, data, _ = fit_class(run, key, params, progress=not args.no_progress)
    if distributed_rank_world()[0] == 0:
        repair_class(run, key, params, model, data, progress=not args.no_progress)
        print(f"stage1 {key}: wrote {stage1_dir(run, key) / 'masks'} and {stage1_dir(run, key) / 'scores.csv'}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
