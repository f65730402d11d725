"""Stage 1: per-class shape-only NeAR repair of every case's mask of one class.

For class c, every case that has it contributes its ROI mask (prepared on ``class_resolution^3``)
and one latent z_{i,c}. An auto-decoder F_c(z_{i,c}, p) is fitted to all of them — all cases are
both training and validation set, because the goal is the repaired masks, not generalisation;
the decoder's limited capacity is what keeps the noise out. Then, per case, F_c is evaluated

* on the ROI grid — probabilities saved as uint8 (1/255 steps) for distillation in stage 3, and
* directly on the original voxels inside the class ROI (through the affine chain), thresholded,
  cleaned per class (expected number of largest components, minimum size) and written as a
  NIfTI mask with the source affine and header: M^ref_{i,c}.

Outputs, in ``<run>/stage1/<key>/``: ``cases/<case>/`` (the per-case store the fit reads, written
once per case, see :mod:`nearfix_lib.field.store`), ``ckpt/{best,last}.pt``, ``ckpt/log.csv``,
``prob/<case>.npy``, ``masks/<case>.nii.gz``, ``scores.csv`` (:mod:`core.scores`). Re-running resumes
an interrupted fit; a finished fit is loaded, not retrained.

Multi-GPU, one class: ``torchrun --nproc_per_node=K -m nearfix_lib.stages.stage1 --params P --class LV``
runs :func:`fit_class` under DistributedDataParallel (the notebook's code path; ``train.cases_per_batch``
must split evenly over the K processes), then the K processes write M^ref, each a share of the cases.
``jobs/torchrun_stage1.sh`` is the SLURM form, one array task per class, with ``--fit-only``: the
masks of every class are then written per case by ``nearfix run repair`` (:data:`REPAIR`, a
per-case stage: ``--workers K``, ``--shard i/n``), which reads each case once for all classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import edt
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from nearfix_lib.core.classes import ClassTable, class_centre, load_table
from nearfix_lib.core.config import (
    AnchorParams,
    ModelParams,
    RepairAnatomyParams,
    SamplingParams,
    Stage1Params,
    load_params,
    project_root,
)
from nearfix_lib.core.geometry import Box, expand_box, roi_grid
from nearfix_lib.core.io import LoadedCase, Volume, write_nifti, write_npy
from nearfix_lib.core.metrics import Reference, dice
from nearfix_lib.core.scores import score_labels, score_masks, scores_frame, write_scores
from nearfix_lib.core.workspace import (
    Run,
    case_dir,
    file_signature,
    prepared_dir,
    stage1_cases_dir,
    stage1_dir,
    stage1_fitted,
    stage1_probabilities,
)
from nearfix_lib.field.decide import Decision, labels_on_grid, threshold_bits_decision, threshold_decision
from nearfix_lib.field.device_batches import DeviceBandSampler, device_batches, device_cache_mb
from nearfix_lib.field.infer import field_on_grid, original_box_grid
from nearfix_lib.field.losses import build_loss, latent_l2
from nearfix_lib.field.models import ImplicitField, appearance_input
from nearfix_lib.field.sampling import BandSampler, MaskStore, interface_band
from nearfix_lib.field.store import (
    CaseStore,
    StoreSpec,
    is_complete,
    quantise_probability,
    rank_rotation,
    write_case,
    write_store,
)
from nearfix_lib.field.train import (
    FitResult,
    distributed_rank_world,
    fit,
    init_distributed_from_env,
    load_checkpoint,
    load_for_inference,
    unwrap,
)
from nearfix_lib.repair.audit import Audit, audit_repair
from nearfix_lib.repair.cleanup import (
    CleanupReport,
    clean_mask,
    drop_enclosed,
    drop_unattached,
    joined_through,
    split_at_origins,
    split_joins,
)
from nearfix_lib.repair.ct_edge import EdgeReport, snap_to_edge
from nearfix_lib.repair.ct_path import PathReport, drop_dark_pieces, join_along_lumen
from nearfix_lib.stages import shards
from nearfix_lib.stages.prepare import CaseCrops, load_crops_index, prepared_cases
from nearfix_lib.stages.runs import resolve_device, start_run


class Stage1Task:
    """Biased point sampling on the ROI masks; BCE (or per-class loss) + lambda ||z||^2.

    The masks are read from a store (:func:`write_mask_store`, or :func:`load_stage1_data`'s
    ``stage1/<key>/cases/``) one case at a time, so the task's memory does not grow with the number
    of cases; so are the appearance branch's CT crops (:class:`CaseImages`, when ``model.appearance``
    is on), read for the batch's cases only.
    """

    score_name = "dice"

    def __init__(self, store: MaskStore, params: Stage1Params, seed: int, device: str,
                 images: CaseImages | None = None):
        self.n_cases = len(store)
        self.sampler = BandSampler(store, params.sampling, seed)
        self.device_sampler = (DeviceBandSampler(self.sampler, store, device, device_cache_mb(params.sampling, device))
                               if device_batches(params.sampling, device) else None)
        self.data_loss = build_loss(params.loss)
        self.latent_weight = params.loss.latent_weight
        self.decision = threshold_decision(params.threshold)
        self.decoding = params.decode
        self.chunk = params.chunk_points
        self.device = device
        self.images = images

    def batch(self, case_idx: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        """The step's points and binary targets: drawn on the host, or on the fit's device
        (``sampling.batches``, :class:`~nearfix_lib.field.device_batches.DeviceBandSampler`)."""
        if self.device_sampler is not None:
            points, targets = self.device_sampler.sample(list(case_idx), epoch)
        else:
            host_points, host_targets = self.sampler.sample(list(case_idx), epoch)
            points, targets = torch.from_numpy(host_points), torch.from_numpy(host_targets)
        out = {"case": torch.as_tensor(np.asarray(case_idx), dtype=torch.long),  # moved by the step, unblocking
               "points": points, "target": targets}
        if self.images is not None:
            out["image"] = self.images.batch(case_idx)
        return out

    def loss(self, model, batch):
        logits = model(batch["case"], batch["points"], batch.get("image"))[..., 0].float()
        data = self.data_loss(logits, batch["target"])
        lat = latent_l2(unwrap(model).latents(batch["case"]))
        return data + self.latent_weight * lat, {"data": data.detach(), "latent": lat.detach()}

    def image_of(self, i: int) -> torch.Tensor | None:
        return None if self.images is None else self.images.batch([i]).to(self.device)

    def evaluate(self, model, cases: Sequence[int]) -> dict[str, float]:
        """Dice of the thresholded full ROI-grid reconstruction against the input mask."""
        scores = []
        for i in cases:
            mask = self.sampler.mask(i)
            box = Box((0, 0, 0), mask.shape)
            decided = labels_on_grid(model, i, roi_grid(box, mask.shape), box, self.decision, self.decoding,
                                     self.device, self.chunk, image=self.image_of(i),
                                     seed=interface_band(mask, 1))
            scores.append(dice(decided > 0, mask))
        return {"dice": float(np.mean(scores))}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


IMAGE_FILE = "image.npy"  # a case's CT crop in its store folder (appearance branch: the learned encoder)


def appearance_file(model: ModelParams) -> str:
    """The name of a case's appearance input in its store folder: the learned encoder reads the CT crop
    (``image.npy``), the intensity branch its smoothings, named by their sigmas (others are others' files)."""
    if model.appearance_kind == "intensity":
        return "intensity_" + "_".join(f"{s:g}" for s in model.appearance_sigmas) + ".npy"
    return IMAGE_FILE


class CaseImages:
    """The appearance branch's inputs (:func:`~nearfix_lib.field.models.appearance_input`), one ``.npy``
    per case on disk (``stage1/<key>/cases/<case>/``), read for the cases asked for: ``4 R^3`` bytes
    per case and channel (8 MB at 128^3) would otherwise be held for every case of the fit."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.load(self.paths[i], mmap_mode="r", allow_pickle=False)

    def batch(self, cases: Sequence[int]) -> torch.Tensor:
        """(B, C, R, R, R) float32 inputs of ``cases``, in that order."""
        return torch.stack([_channels_first(self[int(i)]) for i in cases])


def _channels_first(stored: np.ndarray) -> torch.Tensor:
    """A stored appearance input as the branch reads it: (C, R, R, R) float32 (the encoder's crop is
    stored (R, R, R), as its stores have held it)."""
    features = np.asarray(stored, dtype=np.float32)
    return torch.from_numpy(features[None] if features.ndim == 3 else features)


@dataclass
class Stage1Data:
    """The cases of one class: ids (latent order), geometry, the store of their ROI masks on disk
    (``stage1/<key>/cases/``), the cases without the class (and CT crops for the appearance branch)."""

    key: str
    case_ids: list[str]
    crops: list[CaseCrops]
    store: CaseStore
    images: CaseImages | None
    absent: list[str]


def normalise_ct(image: np.ndarray) -> np.ndarray:
    """HU clipped to [-1000, 1000] and scaled to [-1, 1]: the CT branch's input range."""
    return np.clip(np.asarray(image, dtype=np.float32), -1000.0, 1000.0) / 1000.0


def store_spec(sampling: SamplingParams) -> StoreSpec:
    """A stage-1 store: each case's class mask (labels 0/1, foreground: class 1) as one bit per voxel,
    and the band the sampler draws from, of the sampling's radius."""
    return StoreSpec((1,), sampling.sampling_dilation_radius, interfaces=False, binary=True)


def write_mask_store(root: str | Path, masks: Sequence[np.ndarray], sampling: SamplingParams,
                     case_ids: Sequence[str] | None = None) -> CaseStore:
    """A stage-1 store of masks given in memory (tests, benchmarks); a run's comes from :func:`load_stage1_data`."""
    return write_store(root, [np.asarray(m, dtype=np.uint8) for m in masks], store_spec(sampling), case_ids=case_ids)


def load_stage1_data(run: Run, key: str, params: Stage1Params, with_images: bool = False) -> Stage1Data:
    """Every case that has class ``key``, its prepared ROI mask written to the store
    ``stage1/<key>/cases/<case>/`` once (a case whose store matches its ``class_<key>.npz`` is not
    rewritten) and opened from there: nothing per case stays in memory but its crop geometry and the
    store's small metadata. With ``with_images`` each case's appearance input (its normalised CT crop,
    or the crop's smoothings: :func:`appearance_file`, :class:`CaseImages`) is written beside its mask
    and read from there.

    Under torchrun every process runs this before the fit, each from its own offset
    (:func:`~nearfix_lib.field.store.rank_rotation`), so the K processes build the store in parallel.
    ``params`` are the class's (:func:`class_fit_params`): the band radius is part of the store.
    """
    prepared = prepared_dir(run)
    index = load_crops_index(prepared)
    spec, root = store_spec(params.sampling), stage1_cases_dir(run, key)
    present = [cid for cid, c in index.items() if key in c.class_boxes]
    image_file = appearance_file(params.model)
    for cid in rank_rotation(present):
        path = case_dir(prepared, cid) / f"class_{key}.npz"
        source = {"mask": file_signature(run, path)}
        rewrite = not is_complete(root / cid, spec, source)
        if rewrite:
            with np.load(path) as z:
                write_case(root / cid, z["mask"].astype(np.uint8), spec, source=source)
        if with_images and (rewrite or not (root / cid / image_file).is_file()):
            write_npy(root / cid / image_file, _appearance_crop(path, cid, params.model))
    images = CaseImages([root / cid / image_file for cid in present]) if with_images else None
    absent = [cid for cid in index if cid not in present]
    return Stage1Data(key, present, [index[cid] for cid in present], CaseStore(root, present, spec), images, absent)


def _ct_crop(path: Path, case_id: str) -> np.ndarray:
    with np.load(path) as z:
        if "image" not in z.files:
            raise ValueError(f"{path}: no CT crop for the appearance branch (stage1.model.appearance): case "
                             f"{case_id} has no image, or was prepared before the branch was on (run prepare "
                             f"again); without CT images set the class's model.appearance: false")
        return normalise_ct(z["image"])


def _appearance_crop(path: Path, case_id: str, model: ModelParams) -> np.ndarray:
    """The appearance branch's input for one case as stored: the encoder's crop (R, R, R) in float32, as
    its stores have held it; the intensity branch's smoothings in float16 (half the disk; 0.5 HU steps)."""
    features = appearance_input(model, _ct_crop(path, case_id))
    return features[0] if model.appearance_kind == "encoder" else features.astype(np.float16)


def build_model(n_cases: int, params: Stage1Params) -> ImplicitField:
    return ImplicitField(n_cases, params.model, n_heads=1)


def class_fit_params(run: Run, key: str, params: Stage1Params) -> Stage1Params:
    """What class ``key``'s fit runs with: ``params`` (the stage's) with the class's own overrides merged
    in and its sampling band sized for its class grid
    (:meth:`~nearfix_lib.core.config.Stage1Params.band_on_grid`); the band is part of the class's store."""
    return params.for_class(key).band_on_grid(run.params.prepare.class_resolution_for(key))


def fit_class(run: Run, key: str, params: Stage1Params, progress: bool = True,
              epochs: int | None = None) -> tuple[ImplicitField, Stage1Data, FitResult]:
    """Fit F_c on every case that has class ``key`` (resumes from ``ckpt/last.pt``; under torchrun: DDP).

    ``params`` are the stage's parameters; the class's are made from them here (:func:`class_fit_params`).
    """
    params = class_fit_params(run, key, params)
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


def repair_decision(params: Stage1Params) -> Decision:
    """The cuts of a class field the repair reads, in one decode: bit 0 P >= ``threshold`` (the field's
    own decision) and, with ``anchor`` on, bit 1 P >= ``keep_above``, bit 2 P >= ``add_above`` and, with
    its ``max_volume_ratio``, bits 3.. P >= each of its ``keep_steps``."""
    anchor = params.anchor
    if not anchor.enabled:
        return threshold_bits_decision((params.threshold,))
    keep_above, *steps = anchor.keep_cuts()  # their bits: _keep_bit
    return threshold_bits_decision((params.threshold, keep_above, anchor.add_above, *steps))


def _keep_bit(n: int) -> int:
    """The bit of :func:`repair_decision`'s labels for the anchor's ``n``-th keep cut
    (``AnchorParams.keep_cuts``): bit 1 for ``keep_above``, bits 3.. for its steps (bit 2 is ``add_above``)."""
    return 2 if n == 0 else 4 << n


def foreign_voxels(labels: np.ndarray, key: str, table: ClassTable) -> np.ndarray:
    """Where the input ``labels`` give a voxel to a class that class ``key`` neither is nor lies on (its
    ``attach_to``): what ``anchor.add_over_foreign: false`` keeps the field from adding."""
    cls = table[key]
    targets = cls.attachment.targets if cls.attachment else ()
    own = [cls.index, 0] + [table[t].index for t in targets if t in table.keys]  # a subset table may lack them
    return ~np.isin(labels, own)


@dataclass
class BoxAnatomy:
    """What the input's label map says around a class inside its box, for M^ref's rules: ``foreign``
    (:func:`foreign_voxels`: where the anchor adds nothing), ``neighbours`` (the other classes' labels,
    0 elsewhere: where ``ct_path`` finds its walls; :attr:`others`, any of them, where
    ``anatomy.split_joins`` looks for joins), ``attached`` (within the class's attachment distance of
    the classes it lies on: where ``anatomy.drop_unattached`` keeps pieces; None for a class without a
    distance rule, or none of whose targets the input holds) and ``origins`` (at or beside the voxels of
    the classes its components arise from, ``anatomy.split_origins``; None where none is named or held) and
    ``within`` (by key, the voxels of each class of ``anatomy.enclosed_by`` the box holds: classes it
    touches but never runs inside) and ``yielded`` (the input's voxels of the classes of
    ``anatomy.yield_to``, which M^ref leaves to them; None where none is named or held)."""

    foreign: np.ndarray
    neighbours: np.ndarray
    attached: np.ndarray | None = None
    origins: np.ndarray | None = None
    within: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    yielded: np.ndarray | None = None

    @property
    def others(self) -> np.ndarray:
        return self.neighbours > 0

    def enclosing(self, rules: RepairAnatomyParams) -> list[tuple[np.ndarray, float]]:
        """The regions a piece beyond the trees must not lie inside, each with its share
        (:func:`~nearfix_lib.repair.cleanup.drop_enclosed`): the foreign classes at ``enclosed_share``
        (where on), each class of ``enclosed_by`` the box holds at its own."""
        regions = [(self.foreign, rules.enclosed_share)] if rules.enclosed_share > 0 else []
        return regions + [(self.within[key], share) for key, share in rules.enclosed_by.items() if key in self.within]


def box_anatomy(labels: np.ndarray, box: Box, key: str, table: ClassTable, spacing: Sequence[float],
                rules: RepairAnatomyParams | None = None) -> BoxAnatomy:
    """:class:`BoxAnatomy` of class ``key``'s ``box`` from the whole input label map ``labels``: a target
    just outside the box still holds a piece inside it (distances on the box grown by the reach), and so
    does an origin class (``rules.split_origins``: keys; those the table lacks are ignored, as in
    ``rules.enclosed_by``) one voxel outside it."""
    rules = rules if rules is not None else RepairAnatomyParams()
    crop = labels[box.slices]
    cls = table[key]
    others = (crop != cls.index) & (crop != 0)
    attached = None
    att = cls.attachment
    if att is not None and att.max_mm > 0:
        reach = np.ceil(att.max_mm / np.asarray(spacing, dtype=np.float64)).astype(int) + 1
        lo = np.maximum(np.asarray(box.lo) - reach, 0)
        hi = np.minimum(np.asarray(box.hi) + reach, labels.shape)
        targets = np.isin(labels[tuple(slice(a, b) for a, b in zip(lo, hi))], [table[t].index for t in att.targets])
        if targets.any():
            dist = edt.edt(np.ascontiguousarray(~targets), anisotropy=tuple(map(float, spacing)), black_border=False)
            attached = dist[_within(box, lo)] <= att.max_mm * (1.0 + 1e-6)
    within = {k: crop == table[k].index for k in rules.enclosed_by if k in table.keys}
    yield_to = [table[k].index for k in rules.yield_to if k in table.keys and k != key]
    yielded = np.isin(crop, yield_to) if yield_to else None  # no pass over the box for the classes without
    return BoxAnatomy(foreign_voxels(crop, key, table), np.where(others, crop, 0), attached,
                      _beside(labels, box, [table[k].index for k in rules.split_origins if k in table.keys]),
                      {k: voxels for k, voxels in within.items() if voxels.any()},
                      yielded if yielded is not None and yielded.any() else None)


def _beside(labels: np.ndarray, box: Box, indices: Sequence[int]) -> np.ndarray | None:
    """Inside ``box``: the voxels of ``labels`` with one of ``indices`` or a 26-neighbour that has one
    (None where none is listed or present)."""
    if not indices:
        return None
    grown = expand_box(box, 1, labels.shape, unit="vox")
    found = np.isin(labels[grown.slices], indices)
    if not found.any():
        return None
    return ndimage.binary_dilation(found, structure=np.ones((3, 3, 3), bool))[_within(box, grown.lo)]


def _within(box: Box, lo: Sequence[int]) -> tuple[slice, ...]:
    """``box``'s slices inside an array cut from a larger grid at corner ``lo`` (a box grown around it)."""
    return tuple(slice(int(a - g), int(b - g)) for a, b, g in zip(box.lo, box.hi, lo))


def anchored_mask(given: np.ndarray, bits: np.ndarray, anchor: AnchorParams,
                  foreign: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The input where the field's P reaches the keep cut, plus the voxels where P >= ``add_above``
    (``bits``: :func:`repair_decision`'s; without ``anchor.add_over_foreign``, none of ``foreign``:
    :func:`foreign_voxels`). The keep cut is ``keep_above`` or, where that leaves the mask over
    ``max_volume_ratio`` times the input's voxels, the first of ``keep_steps`` that does not (the last
    if none). Returns the mask and its keep cut."""
    added = bits & 4 > 0
    if foreign is not None and not anchor.add_over_foreign:
        added &= ~foreign
    limit = anchor.max_volume_ratio * np.count_nonzero(given)
    cuts = anchor.keep_cuts()
    for n in range(len(cuts)):
        mask = (given & (bits & _keep_bit(n) > 0)) | added
        if anchor.max_volume_ratio <= 0 or np.count_nonzero(mask) <= limit:
            break
    return mask, cuts[n]


def input_in_place(given: np.ndarray, expected: int, spacing: Sequence[float],
                   params: Stage1Params) -> tuple[np.ndarray, CleanupReport | None]:
    """What takes a field's place where the audit kept the input (``audit.action``): the input mask
    as it is (``keep_input``; no clean-up report) or through the class's clean-up (``clean_input``, and
    ``repair_input`` here: its CT and anatomy rules are M^ref's, on the original grid, as they are for a
    field the audit passed). Stage 2's ROI-grid masks read it, and M^ref where the action is not
    ``repair_input``, so the two grids follow the same verdict."""
    if params.audit.action in ("clean_input", "repair_input"):
        return clean_mask(given, expected, spacing, params.cleanup)
    return given, None


@dataclass
class AnatomyReport:
    """What ``stage1.anatomy`` took from M^ref: voxels of pieces away from the classes it lies on
    (``drop_unattached``), of joins between two origins (``split_origins``) and of joins of too few
    pieces (``split_joins``), all over other classes, of pieces inside classes it does not lie on
    (``enclosed_share``) or never runs inside (``enclosed_by``), and the input's voxels of the classes it
    leaves them (``yield_to``)."""

    unattached_voxels: int = 0
    origin_split_voxels: int = 0
    split_voxels: int = 0
    enclosed_voxels: int = 0  # pieces inside a chamber or the aorta (enclosed_share, enclosed_by), before the clean-up
    yielded_voxels: int = 0  # the input's voxels of the classes of yield_to, left to them (last)

    def columns(self) -> dict:
        return {f"anatomy_{k}": v for k, v in dataclasses.asdict(self).items()}


class MRef(NamedTuple):
    """A class box's M^ref (:func:`mref_of`) and what made it: the clean-up's report (of the mask
    returned; ``keep_input`` cleans nothing and keeps the field's), the audit (of the field's own
    decision), where ``ct_edge`` moved its boundary, the CT's report, and where ``anatomy`` and
    ``ct_path`` are on, their reports (else None)."""

    mask: np.ndarray
    cleanup: CleanupReport
    audit: Audit
    edge: EdgeReport | None = None
    anatomy: AnatomyReport | None = None
    path: PathReport | None = None

    def columns(self) -> dict:
        """The per-case columns of M^ref's score rows: the clean-up's removed and bridged voxels,
        ``audit_*``, ``edge_*``, ``path_*`` and ``anatomy_*`` (a report added here reaches the scores as it is)."""
        edge = self.edge.columns() if self.edge is not None else {}
        anatomy = self.anatomy.columns() if self.anatomy is not None else {}
        path = self.path.columns() if self.path is not None else {}
        return {"cleanup_removed_voxels": self.cleanup.removed_voxels,
                "cleanup_bridged_voxels": self.cleanup.bridged_voxels,
                **self.audit.columns(), **edge, **path, **anatomy}


def mref_of(given: np.ndarray, bits: np.ndarray, expected: int, spacing: Sequence[float],
            params: Stage1Params, around: BoxAnatomy | None = None, ct: np.ndarray | None = None) -> MRef:
    """M^ref of a class box from its input mask ``given`` and the field's decode ``bits``
    (:func:`repair_decision`): the field's own decision, cleaned and audited against the input; a
    flagged case takes ``audit.action`` (``repair_input``: the input in the field's place through every
    rule below), the others the anchor where it is on (``around``: the box's
    :func:`box_anatomy`; its ``foreign`` voxels for ``anchor.add_over_foreign``), less, with
    ``ct_path.drop_dark`` on, the pieces the CT shows darker than the trees' surroundings (before the
    clean-up's bridges), with ``ct_edge`` on,
    its boundary where the box's CT ``ct`` shows the edge (:mod:`~nearfix_lib.repair.ct_edge`; then the
    clean-up again), with ``anatomy`` on, the table's anatomy held (:func:`held_to_anatomy`), and with
    ``ct_path`` on, pieces left apart joined along the CT's lumen to the trees, never through a class as
    bright as it (:mod:`~nearfix_lib.repair.ct_path`), and last, with ``anatomy.yield_to``, the input's
    voxels of those classes left to them (:func:`_without`). A case whose input the audit kept with
    ``keep_input`` or ``clean_input`` keeps it as the audit says: the CT moves no boundary there."""
    foreign = around.foreign if around is not None else None
    neighbours = around.neighbours if around is not None else np.zeros(given.shape, np.int16)
    roots = around.origins if around is not None else None  # the pieces that reach them are the trees
    decided = bits & 1 > 0
    repaired, report = clean_mask(decided, expected, spacing, params.cleanup)
    audit = audit_repair(given, repaired, params.audit)  # can the field hold its input at all?
    without_field = audit.kept_input and params.audit.action == "repair_input"
    if audit.kept_input and not without_field:
        repaired, cleaned = input_in_place(given, expected, spacing, params)
        return MRef(repaired, cleaned if cleaned is not None else report, audit)  # keep_input: the field's report
    if without_field:  # the rules below, on the input where the field's decision would be
        decided = given
    elif params.anchor.enabled:  # the input where the field is unsure, the field where it is sure
        decided, keep_cut = anchored_mask(given, bits, params.anchor, foreign)
        audit = dataclasses.replace(audit, keep_cut=keep_cut)
        if params.anchor.join:  # the pieces the field's own decision connects, connected through it
            decided = joined_through(decided, repaired)
    dark = 0
    if params.ct_path.enabled and params.ct_path.drop_dark:  # before the clean-up's bridges tie them on
        decided, dark = drop_dark_pieces(decided, _needs_ct(ct, "ct_path"), neighbours, expected, spacing,
                                         params.ct_path, roots)
    enclosed = 0
    enclosing = around.enclosing(params.anatomy) if around is not None else []
    if enclosing:  # the same, for blobs inside a chamber or the aorta
        decided, enclosed = drop_enclosed(decided, enclosing, expected, params.cleanup.min_component_voxels(spacing),
                                          roots)
    if params.anchor.enabled or without_field or dark or enclosed:
        repaired, report = clean_mask(decided, expected, spacing, params.cleanup)
    edge = None
    if params.ct_edge.enabled:
        blocked = None if around is None else around.foreign if params.ct_edge.into_attached else around.others
        allowed = np.ones(repaired.shape, dtype=bool) if blocked is None else ~blocked
        snapped, edge = snap_to_edge(repaired, _needs_ct(ct, "ct_edge"), allowed, spacing, params.ct_edge)
        repaired, report = clean_mask(snapped, expected, spacing, params.cleanup)
    # the anatomy before the paths: these join pieces to the expected largest, which must be trees
    repaired, anatomy = held_to_anatomy(repaired, expected, spacing, params, around)
    if enclosed:
        anatomy = dataclasses.replace(anatomy or AnatomyReport(), enclosed_voxels=enclosed)
    path = None
    if params.ct_path.enabled:  # after the edge: its pieces' ends lie on the lumen
        repaired, path = join_along_lumen(repaired, _needs_ct(ct, "ct_path"), neighbours, expected, spacing,
                                          params.ct_path, roots)
        path.dark_dropped = dark
    if around is not None and around.yielded is not None:  # last: no clean-up fills them back
        yielded = repaired & around.yielded
        if yielded.any():
            repaired = _without(repaired, around.yielded, expected, spacing, params)
        anatomy = dataclasses.replace(anatomy or AnatomyReport(), yielded_voxels=int(np.count_nonzero(yielded)))
    return MRef(repaired, report, audit, edge, anatomy, path)


def _without(mask: np.ndarray, taken: np.ndarray, expected: int, spacing: Sequence[float],
             params: Stage1Params) -> np.ndarray:
    """``mask`` less ``taken``, then the pieces that cut off dropped by the class's component rules
    (its clean-up without bridges or hole filling: a vessel's groove taken out of a wall can leave a
    sliver of wall beside it on its own, and filling would put the vessel back)."""
    rules = dataclasses.replace(params.cleanup, bridge_gap_mm=0.0, fill_holes=False)
    return clean_mask(mask & ~taken, expected, spacing, rules)[0]


def _needs_ct(ct: np.ndarray | None, rule: str) -> np.ndarray:
    if ct is None:
        raise ValueError(f"stage1.{rule} is on: M^ref needs the class box's CT")
    return ct


def held_to_anatomy(mask: np.ndarray, expected: int, spacing: Sequence[float], params: Stage1Params,
                    around: BoxAnatomy | None) -> tuple[np.ndarray, AnatomyReport | None]:
    """``mask`` with ``stage1.anatomy``'s rules applied on the input's labels ``around`` it (None: off,
    or no labels to read): pieces away from the classes it lies on go, then joins over other classes
    parted, between two origins (:func:`~nearfix_lib.repair.cleanup.split_at_origins`) and of too few
    pieces (:func:`~nearfix_lib.repair.cleanup.split_joins`); a side under the clean-up's smallest
    volume does not count as a piece."""
    rules = params.anatomy
    if around is None or not (rules.drop_unattached or rules.split_origins or rules.split_joins):
        return mask, None
    report = AnatomyReport()
    if rules.drop_unattached and around.attached is not None:
        mask, report.unattached_voxels = drop_unattached(mask, around.attached)
    min_voxels = params.cleanup.min_component_voxels(spacing)
    if rules.split_origins and around.origins is not None:
        mask, report.origin_split_voxels = split_at_origins(mask, around.others, around.origins, min_voxels)
    if rules.split_joins:
        mask, report.split_voxels = split_joins(mask, around.others, expected, min_voxels)
    return mask, report


def repair_case(model: ImplicitField, i: int, crops: CaseCrops, label: Volume, run: Run, key: str,
                expected: int, params: Stage1Params, device: str,
                image: torch.Tensor | None = None, ct: Volume | None = None) -> tuple[np.ndarray, dict]:
    """Probabilities on the ROI grid (saved: stage 3's teacher, every voxel), then M^ref on the original
    grid (``stage1.decode``: coarse to fine by default; NIfTI, returned), audited against the input
    (:mod:`~nearfix_lib.repair.audit`; a flagged case keeps its input where ``audit.action`` says so)
    and, where ``stage1.anchor`` is on, held to the input where the field is unsure (``ct``: the case's
    CT, for ``stage1.ct_edge``). Returns the mask and the columns of its score rows (:meth:`MRef.columns`)."""
    box, grid, out = crops.class_boxes[key], crops.class_grids[key], stage1_dir(run, key)
    prob_roi = field_on_grid(model, i, grid, box, device, params.chunk_points, image=image)[..., 0]
    write_npy(stage1_probabilities(run, key, crops.case_id), quantise_probability(prob_roi))
    given = label.array[box.slices] == run.table[key].index  # the box holds every input voxel of the class
    bits = labels_on_grid(model, i, original_box_grid(box), box, repair_decision(params), params.decode, device,
                          params.chunk_points, image=image, seed=interface_band(given, 1))
    around = box_anatomy(label.array, box, key, run.table, crops.spacing, params.anatomy)
    made = mref_of(given, bits, expected, crops.spacing, params, around,
                   ct.array[box.slices] if ct is not None else None)
    mask = np.zeros(crops.shape, dtype=bool)
    mask[box.slices] = made.mask
    write_nifti(out / "masks" / f"{crops.case_id}.nii.gz", mask.astype(np.uint8), label.affine, label.header)
    return mask, made.columns()


# -- the repair: a per-case stage over the fitted classes ---------------------------------------------
#
# Fitting is per class (every case at once); repairing is per case. The repair reads a case once
# and writes M^ref of every fitted class it holds, so a run of 1,000 cases reads each label map
# (and its truth) once, not once per class; its cases split over processes and SLURM array tasks
# like the other per-case stages (stages.shards). Two stages share the functions below: REPAIR,
# every class of the run (``nearfix run repair``; parts in stage1/parts/), and class_repair(key),
# one class (the per-class notebook 02_stage1; parts in stage1/<key>/parts/).

@dataclass
class ClassField:
    """A fitted stage-1 model and the cases (by id) its latent table holds."""

    model: torch.nn.Module
    index_of: dict[str, int]


def load_stage1_fields(run: Run, device: str, keys: Sequence[str] | None = None) -> dict[str, ClassField]:
    """Every class (of ``keys``, default all) whose stage-1 fit finished, ready for inference."""
    params = run.params.stage1
    fields = {}
    for key in keys if keys is not None else run.table.keys:
        if not stage1_fitted(run, key):
            continue
        p, ckpt_dir = params.for_class(key), stage1_dir(run, key) / "ckpt"
        ids = load_checkpoint(ckpt_dir / "last.pt")["extra"]["case_ids"]
        model = build_model(len(ids), p)
        load_for_inference(model, ckpt_dir, p.train.select, device)
        fields[key] = ClassField(model, {str(c): i for i, c in enumerate(ids)})
    return fields


def repaired_classes(run: Run, keys: Sequence[str] | None) -> tuple[str, ...]:
    """The classes a repair stage writes: ``keys``, else ``stage1.classes``, else every class of the run."""
    return tuple(keys) if keys else tuple(run.params.stage1.classes or run.table.keys)


@dataclass
class RepairState:
    """What every case of a process needs: the device, the crops index and the fitted fields."""

    device: str
    index: dict[str, CaseCrops]
    fields: dict[str, ClassField]


def repair_setup(run: Run, keys: Sequence[str] | None = None) -> RepairState:
    wanted = repaired_classes(run, keys)
    device = resolve_device(run.params.run.device)
    fields = load_stage1_fields(run, device, wanted)
    unfitted = [k for k in wanted if k not in fields]
    if unfitted:
        raise ValueError(f"stage1 repair: class(es) {unfitted} have no finished fit in {run.path('stage1')}; "
                         "fit them first (notebook 02_stage1 or `nearfix stage1 --class KEY`)")
    return RepairState(device, load_crops_index(prepared_dir(run)), fields)


def class_image(run: Run, case_id: str, key: str, model: ModelParams, device: str) -> torch.Tensor:
    """The appearance branch's input for the case, (1, C, R, R, R) on the class ROI grid: what its fit read
    from the store (:func:`load_stage1_data`), made again from the prepared crop only where the store
    lacks it, so a repair neither smooths the CT once more nor reads other values than the fit did."""
    stored = stage1_cases_dir(run, key) / case_id / appearance_file(model)
    crop = (np.load(stored, allow_pickle=False) if stored.is_file()
            else _appearance_crop(case_dir(prepared_dir(run), case_id) / f"class_{key}.npz", case_id, model))
    return _channels_first(crop)[None].to(device)


def repair_work(run: Run, case_id: str, state: RepairState, keys: Sequence[str] | None = None) -> shards.Rows:
    """One case: M^ref of every fitted class it has (the case is read once), and their scores.

    A class already repaired under the same fit and parameters, by either repair stage (the
    notebook's per-class one or the all-class one), keeps its masks and rows: running ``nearfix run
    repair`` after the class notebooks, or refitting one class, recomputes only what changed.
    """
    crops = state.index[case_id]
    rows: list[dict] = []
    todo = []
    every_class_part = shards.read_part(run, REPAIR, case_id)  # read once for all the case's classes
    for key in repaired_classes(run, keys):
        if case_id not in state.fields[key].index_of:
            continue
        done = repaired_rows(run, case_id, key, every_class_part)
        if done is None:
            todo.append(key)
        else:
            rows += done
    if not todo:
        return {"scores": rows}
    params_of = {key: run.params.stage1.for_class(key) for key in todo}
    reads_ct = any(p.mref_reads_ct for p in params_of.values())
    case = run.load(case_id, with_image=reads_ct)  # header, input, truth (and CT), once for every class
    for key, params in params_of.items():
        field = state.fields[key]
        image = class_image(run, case_id, key, params.model, state.device) if params.model.appearance else None
        repaired, report = repair_case(field.model, field.index_of[case_id], crops, case.label, run,
                                       key, run.table[key].expected_components, params, state.device, image,
                                       case.image if params.mref_reads_ct else None)
        rows += score_case(case, run.table, key, repaired, report)
    order = {key: n for n, key in enumerate(repaired_classes(run, keys))}
    return {"scores": sorted(rows, key=lambda r: order[r["class"]])}  # stable: a class's rows keep their order


def repaired_rows(run: Run, case_id: str, key: str, every_class_part: dict | None) -> list[dict] | None:
    """Class ``key``'s score rows of a case that either repair stage's part (``every_class_part``: the
    all-class one, already read) holds under the current fit and parameters, while its mask and
    probabilities are on disk; ``None`` when it must be computed."""
    out = stage1_dir(run, key)
    if not ((out / "masks" / f"{case_id}.nii.gz").is_file() and stage1_probabilities(run, key, case_id).is_file()):
        return None
    want = shards.as_stored(repair_stamp(run, case_id, (key,)))
    for part in (every_class_part, shards.read_part(run, class_repair(key), case_id)):
        stamp = part.get("stamp") if part and "tables" in part else None
        if (isinstance(stamp, dict) and stamp.get("prepare") == want["prepare"]
                and stamp.get("classes", {}).get(key) == want["classes"][key]):
            return [r for r in part["tables"]["scores"] if r["class"] == key]
    return None


def repair_stamp(run: Run, case_id: str, keys: Sequence[str] | None = None) -> dict:
    """What a case's masks depend on: the prepare parameters and, per class, its parameters and fit."""
    def fit_files(key: str) -> list:
        return [shards.file_stamp(stage1_dir(run, key) / "ckpt" / name) for name in ("last.pt", "best.pt")]

    return {"prepare": dataclasses.asdict(run.params.prepare),
            "classes": {key: {"params": dataclasses.asdict(run.params.stage1.for_class(key)), "fit": fit_files(key)}
                        for key in repaired_classes(run, keys)}}


def write_repair(run: Run, rows: shards.Rows, keys: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Each class's ``stage1/<key>/scores.csv`` from the cases' rows (in the run's case order)."""
    return {key: write_scores(stage1_dir(run, key), [r for r in rows["scores"] if r["class"] == key])
            for key in repaired_classes(run, keys)}


REPAIR = shards.CaseStage("stage1", ("scores",), repair_work, write_repair, setup=repair_setup, stamp=repair_stamp,
                          cases=prepared_cases)


def class_repair(key: str) -> shards.CaseStage:
    """The repair of one class (parts in ``stage1/<key>/parts/``): what a class's notebook runs."""
    only = (key,)
    return shards.CaseStage(f"stage1-{key}", ("scores",), partial(repair_work, keys=only),
                            partial(write_repair, keys=only), setup=partial(repair_setup, keys=only),
                            stamp=partial(repair_stamp, keys=only), cases=prepared_cases)


def repair_class(run: Run, key: str, progress: bool = True, *, workers: int = 1,
                 shard: shards.Shard | str | None = None) -> pd.DataFrame:
    """M^ref of class ``key`` for every case that has it, from the selected checkpoint; its scores
    table once every case is done (with ``shard``: when this task finished last, else empty)."""
    tables = shards.run_stage(run, class_repair(key), workers, shard, progress)
    return tables[key] if tables is not None else scores_frame([])


def repair_run(run: Run, progress: bool = True, *, workers: int = 1,
               shard: shards.Shard | str | None = None) -> dict[str, pd.DataFrame] | None:
    """M^ref of every fitted class of every case, each case read once (``nearfix run repair``)."""
    return shards.run_stage(run, REPAIR, workers, shard, progress)


def score_case(case: LoadedCase, table: ClassTable, key: str, repaired: np.ndarray, counts: dict) -> list[dict]:
    """M^ref against the noisy input it was fitted to and, where present, it and the input against the
    truth; M^ref's rows carry ``counts`` (:func:`repair_case`'s record, :meth:`MRef.columns`)."""
    only, noisy, spacing = table.subset([key]), case.label.array, case.label.spacing
    rows = score_masks(case.case_id, "stage1", "noisy", {key: repaired}, noisy, spacing, only, **counts)
    if case.truth is not None:
        truth = Reference(case.truth.array, spacing, only)
        rows += score_labels(case.case_id, "noisy", "truth", noisy, truth, spacing, only)
        rows += score_masks(case.case_id, "stage1", "truth", {key: repaired}, truth, spacing, only, **counts)
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
    """Command line for torchrun: fit one class (DDP when WORLD_SIZE > 1), then write its M^ref, the
    cases shared out over the processes (``--fit-only``: leave the masks to ``nearfix run repair``)."""
    ap = argparse.ArgumentParser(prog=prog, description="stage 1: fit one class's field and write its "
                                 "repaired masks (torchrun-ready)")
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--device", default="")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--class", dest="cls", help="class key or label index, e.g. LV or 3")
    which.add_argument("--list", action="store_true", help="print the classes the run fits, one per line "
                       "(what --nth counts; jobs/submit_all.sh sizes its array with it), and exit")
    which.add_argument("--nth", type=int, help="the nth class the run fits, 0-based (stage1.classes, else the "
                       "class table's order), e.g. $SLURM_ARRAY_TASK_ID")
    ap.add_argument("--fit-only", action="store_true", help="fit only; write the masks of every class later "
                    "with `nearfix run repair` (each case read once for all classes)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    params = load_params(args.params, run_dir=args.run_dir, device=args.device)
    if args.list:
        table = load_table(params.data.classes, params.data.class_keys or None, project_root())
        print("\n".join(params.stage1.classes or table.keys))
        return 0
    run = start_run(params, progress=False)
    fitted = run.params.stage1.classes or run.table.keys
    if args.nth is not None and not 0 <= args.nth < len(fitted):
        ap.error(f"--nth {args.nth}: the run fits {len(fitted)} classes ({', '.join(map(str, fitted))})")
    key = run.table.resolve(args.cls if args.nth is None else fitted[args.nth]).key
    fit_class(run, key, run.params.stage1, progress=not args.no_progress)
    if not args.fit_only:
        rank, world = distributed_rank_world()
        stage = class_repair(key)
        shards.run_cases(run, stage, shard=shards.Shard(rank, world), progress=not args.no_progress)
        if world > 1:
            torch.distributed.barrier()  # every rank's cases are written before rank 0 merges
        if rank == 0 and shards.merge(run, stage) is not None:
            print(f"stage1 {key}: wrote {stage1_dir(run, key) / 'masks'} and {stage1_dir(run, key) / 'scores.csv'}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
