"""The unified model F_Θ(z_i, p): one auto-decoder, C independent sigmoid heads, one latent per case.

This module is the user's deliverable and everything needed to use it without the run folder:

* :class:`UnifiedTask` — what stage 3 fits (class-balanced points on the whole-heart ROI,
  per-head inverse-frequency BCE against L^ref, optional distillation from the stage-1
  probabilities, latent prior), for the shared fit loop, reading the cases from their store on
  disk (:mod:`nearfix_lib.field.store`);
* :func:`decode_priority` — the decision rule: walk the classes by priority, the first with
  P_c >= t_c wins, else background; :func:`fit_thresholds` chooses t_c on the training cases;
* :class:`UnifiedModel` — the artifact ``unified.pt`` (weights, latents keyed by case id, class
  table, priorities, thresholds, per-case geometry): ``UnifiedModel.load(path).decode(case_id)``
  returns a case's 10-class map on its original grid with nothing else on disk, and
  :meth:`UnifiedModel.fit_case` fits the latent of a new case's noisy labels with F_Θ frozen.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.config import BalancedSamplingParams, DecodeParams, ModelParams, TrainParams, UnifiedLossParams
from nearfix_lib.core.geometry import (
    Box,
    Grid,
    apply_affine,
    normalised_to_original,
    original_to_normalised,
    resample,
    roi_grid,
)
from nearfix_lib.core.io import atomic_path
from nearfix_lib.core.metrics import dice
from nearfix_lib.field.decide import Decision, labels_on_grid
from nearfix_lib.field.device_batches import DeviceBalancedSampler, device_batches, device_cache_mb
from nearfix_lib.field.device_batches import teacher_values as device_teacher_values
from nearfix_lib.field.infer import field_at_points, field_on_grid, grid_chunks, original_box_grid
from nearfix_lib.field.losses import distillation, inverse_frequency_weights, latent_l2, per_head_weighted_bce
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.refine import CaseField, read_edited_latents
from nearfix_lib.field.sampling import (
    ClassBalancedSampler,
    dense_from_sparse,
    index_to_normalised,
    interface_band,
    mining_due,
    sparse_coordinates,
)
from nearfix_lib.field.store import PROBABILITY_LEVELS, CaseStore, MinedVoxels, StoreSpec, Teacher, write_store
from nearfix_lib.field.train import fit, unwrap

ARTIFACT_FORMAT = "nearfix-unified"
ARTIFACT_VERSION = 1


def edits_path(artifact: str | Path) -> Path:
    """The edits file beside an artifact (``unified.pt`` -> ``unified.edits.pt``): the latents a
    person edited, kept apart so that the artifact (and every result stamped with it) stays as fitted."""
    artifact = Path(artifact)
    return artifact.with_name(f"{artifact.stem}.edits{artifact.suffix}")


def teacher_affine(heart_box: Box, class_box: Box) -> np.ndarray:
    return original_to_normalised(class_box) @ normalised_to_original(heart_box)


_CORNERS = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.int64)


def trilinear_zero_padded(grid: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Values (N,) float32 of a 3-D ``grid`` at ROI-normalised (i, j, k) ``points`` (N, 3).

    What ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` returns, read
    from the 8 corner voxels of each point only: a memory-mapped grid is never read whole. The
    arithmetic follows grid_sample's CPU kernel in float32 (unnormalise, floor, weights as
    ``(upper - x)`` and ``(x - lower)`` multiplied k, j, i, corners summed with i slowest), so the
    values agree to the last bits.
    """
    q = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    size = np.asarray(grid.shape, dtype=np.int64)
    x = ((q + np.float32(1)) * size.astype(np.float32) - np.float32(1)) / np.float32(2)
    lower = np.floor(x)
    weights = (lower + np.float32(1) - x, x - lower)  # of the lower and the upper corner, per axis
    lo = lower.astype(np.int64)
    out = np.zeros(len(q), dtype=np.float32)
    for corner in _CORNERS:
        idx = lo + corner
        at = np.nonzero(np.all((idx >= 0) & (idx < size), axis=1))[0]
        if not len(at):
            continue
        w = (weights[corner[2]][at, 2] * weights[corner[1]][at, 1]) * weights[corner[0]][at, 0]
        out[at] += np.asarray(grid[idx[at, 0], idx[at, 1], idx[at, 2]], dtype=np.float32) * w
    return out


def teacher_values(teachers: Sequence[Teacher], points: np.ndarray, n_heads: int) -> np.ndarray:
    """Soft targets (N, n_heads) at whole-heart-normalised ``points`` (N, 3); 0 outside a class ROI.

    Trilinear, with the same voxel-centre convention as the feature grids (``align_corners=False``);
    a class ROI holds the class plus a margin, so 0 outside it is the teacher's own answer. Only the
    8 corners of each point are read from a teacher's grid (:func:`trilinear_zero_padded`).
    """
    out = np.zeros((len(points), n_heads), dtype=np.float32)
    for t in teachers:  # interpolating the uint8 steps and scaling after is interpolating the probabilities
        steps = trilinear_zero_padded(t.prob, apply_affine(t.from_heart, points).astype(np.float32))
        out[:, t.channel] = steps * np.float32(1.0 / PROBABILITY_LEVELS)
    return out


def class_fractions(histograms: Iterable[np.ndarray], indices: Sequence[int]) -> np.ndarray:
    """Voxel fraction f_c of each class over all cases (0 for a class absent everywhere), from each
    case's voxel counts per label value 0..255 (``CaseStore.histogram``): no label map is read."""
    counts = np.zeros(256, dtype=np.int64)
    for h in histograms:
        counts += np.asarray(h, dtype=np.int64)
    return counts[list(indices)] / max(int(counts.sum()), 1)


def head_weights(fractions: np.ndarray, params: UnifiedLossParams) -> torch.Tensor:
    """alpha_c per head, mean 1. A class absent from every map has no frequency: it only ever sees
    negatives, and gets the smallest weight of the present classes (enough to keep its head at 0)."""
    n = len(fractions)
    present = fractions > 0
    if params.class_weights == "uniform" or not present.any():
        return torch.ones(n)
    alpha = torch.zeros(n)
    alpha[torch.from_numpy(present)] = inverse_frequency_weights(fractions[present] ** params.class_weight_power)
    alpha[torch.from_numpy(~present)] = alpha[torch.from_numpy(present)].min()
    return alpha * n / alpha.sum()


class UnifiedTask:
    """Stage 3 for the fit loop: class-balanced points, per-head weighted BCE, distillation, prior.

    The cases are a :class:`CaseStore` (``field.store``): each one's L^ref on a lattice that tiles
    its whole-heart box (the original voxels inside it, or the ROI grid), so a map's own normalised
    coordinates are the model's, and the stage-1 probabilities of its classes (none: no
    distillation for that case). The task keeps O(1) per case in memory; a batch, a validation or
    a mining pass maps the arrays of the cases it works on and releases them.
    Validation: mean over cases and classes of the Dice of the decoded map against L^ref.
    """

    score_name = "dice"

    def __init__(self, store: CaseStore, table: ClassTable, sampling: BalancedSamplingParams,
                 loss: UnifiedLossParams, seed: int, device: str, chunk_points: int = 262_144,
                 thresholds: Sequence[float] | None = None, decoding: DecodeParams | None = None,
                 mining_dir: str | Path | None = None):
        if list(store.classes) != list(table.indices):
            raise ValueError(f"the store holds classes {list(store.classes)}, the table {table.indices}")
        if sampling.mined and not store.spec.interfaces:
            raise ValueError("mining needs the store's interface bits: build it with interfaces=True")
        self.store = store
        self.n_cases = len(store)
        self.table = table
        self.indices = table.indices
        # the mining passes' voxels, on disk: beside the checkpoints (stage 3) or beside the store
        mining_dir = Path(mining_dir) if mining_dir is not None else store.root.with_name(store.root.name + "_mined")
        mined = MinedVoxels(mining_dir, store.case_ids) if sampling.mined else None
        self.sampler = ClassBalancedSampler(store, sampling, seed, mined)
        self.loss_params = loss
        # on the fit's device once: a host tensor would cross (and block) at every step
        self.alpha = head_weights(class_fractions((store.histogram(i) for i in range(self.n_cases)), self.indices),
                                  loss).to(device)
        # per case, which heads have a teacher (fixed, so not rebuilt every step)
        self._has_teacher = np.zeros((self.n_cases, len(self.indices)), dtype=bool)
        for i in range(self.n_cases):
            self._has_teacher[i, store.teacher_channels(i)] = True
        self.distill = loss.distill_weight > 0 and bool(self._has_teacher.any())
        self.device = device
        self.chunk = chunk_points
        self.thresholds = np.full(len(self.indices), 0.5) if thresholds is None else np.asarray(thresholds)
        self.decoding = decoding or DecodeParams()  # the validation's label maps
        self._channel = torch.full((256,), -1, dtype=torch.int64)
        self._channel[list(self.indices)] = torch.arange(len(self.indices))
        self.device_sampler = (DeviceBalancedSampler(self.sampler, store, device, device_cache_mb(sampling, device))
                               if device_batches(sampling, device) else None)
        if self.device_sampler is not None:  # where its labels are: not copied there every step
            self._channel = self._channel.to(self.device_sampler.device)

    def batch(self, case_idx: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        """The step's points, one-hot targets and teacher values for these cases: drawn on the host
        (CPU tensors) or, with device batches (``sampling.batches``), on the fit's device."""
        case_idx = np.asarray(case_idx)
        heads = len(self.indices)
        teacher = None
        if self.device_sampler is not None:
            drawn = [self.device_sampler.sample_case(int(i), epoch) for i in case_idx]
            points = torch.stack([p for p, _, _ in drawn])
            labels = torch.stack([lab for _, lab, _ in drawn])
            if self.distill:
                teacher = torch.stack([device_teacher_values(entry.teachers, p, heads) for p, _, entry in drawn])
        else:
            host_points, host_labels = self.sampler.sample(list(case_idx), epoch)
            points, labels = torch.from_numpy(host_points), torch.from_numpy(host_labels)
            if self.distill:  # each case's teachers mapped while it is looked up
                teacher = torch.from_numpy(np.stack([teacher_values(self.store.teachers(i), host_points[k], heads)
                                                     for k, i in enumerate(case_idx)]))
        channel = self._channel[labels]
        heads_at = torch.arange(heads, device=channel.device)  # one_hot would check its input: a device sync
        # the case indices and teacher flags stay host tensors: the step moves them without blocking
        # (train.to_device), where a host array put on a GPU here would wait for the device's queue
        out = {"case": torch.as_tensor(case_idx, dtype=torch.long), "points": points,
               "target": (channel.unsqueeze(-1) == heads_at).to(torch.float32)}  # label values off the table: 0
        if teacher is not None:
            out["teacher"] = teacher
            out["has_teacher"] = torch.from_numpy(self._has_teacher[case_idx])
        return out

    def loss(self, model, batch):
        logits = model(batch["case"], batch["points"]).float()
        data = per_head_weighted_bce(logits, batch["target"], self.alpha)
        lat = latent_l2(unwrap(model).latents(batch["case"]))
        total = data + self.loss_params.latent_weight * lat
        parts = {"data": data.detach(), "latent": lat.detach()}
        if self.distill:
            weight = batch["has_teacher"][:, None, :].float() * self.alpha
            dist = distillation(logits, batch["teacher"], weight)
            total = total + self.loss_params.distill_weight * dist
            parts["distill"] = dist.detach()
        return total, parts

    def before_epoch(self, model, epoch: int) -> None:
        """A mining pass when one is due after epoch - 1 (``sampling.mined``): decode each case on
        the band around its L^ref boundaries and give the sampler the voxels decoded wrong, grown
        by one voxel — the other side of a misplaced boundary, which the decoder must not overshoot into.

        Every process of a distributed fit runs it for every case on the same weights, so whichever
        rank draws a case later draws it from the same mined voxels, without exchanging them.
        """
        if not mining_due(self.sampler.params, epoch - 1):
            return

        def wrong_grown(i: int) -> np.ndarray:
            coords = sparse_coordinates(self.store.interfaces(i))
            shape = self.store.shape(i)
            prob = field_at_points(model, i, index_to_normalised(coords, shape), self.device, self.chunk)
            labels = decode_priority(prob, self.table, self.thresholds)
            ref = self.store.labels(i)  # mapped for this case only
            wrong = coords[labels != ref[coords[:, 0], coords[:, 1], coords[:, 2]]]
            del ref
            return np.flatnonzero(ndimage.binary_dilation(dense_from_sparse(wrong, shape)))

        self.sampler.mined_voxels.write_pass(epoch - 1, (wrong_grown(i) for i in range(self.n_cases)))

    def checkpointed(self) -> None:
        """The fit loop wrote the checkpoint a resume starts from: mining passes before it go."""
        if self.sampler.mined_voxels is not None:
            self.sampler.mined_voxels.checkpointed()

    def _grid(self, i: int) -> tuple[Grid, Box]:
        """Case i's supervision grid (its stored label crop's voxels) and the box it spans."""
        shape = self.store.shape(i)
        box = Box((0, 0, 0), shape)
        return roi_grid(box, shape), box

    def probabilities(self, model, i: int) -> np.ndarray:
        return field_on_grid(model, i, *self._grid(i), self.device, self.chunk)

    def probability_slabs(self, model, i: int) -> Iterator[tuple[slice, np.ndarray]]:
        """Case i's probabilities slab by slab (axis 0): (slab, (rows, J, K, heads)), never the whole map
        (ten float32 heads over a real case's box: 2 GB)."""
        grid, box = self._grid(i)
        for slab, prob in grid_chunks(model, i, grid, box, self.device, self.chunk):
            yield slab, prob.reshape(slab.stop - slab.start, *grid.shape[1:], -1)

    def evaluate(self, model, cases: Sequence[int]) -> dict[str, float]:
        scores, decision = [], priority_decision(self.table, self.thresholds)
        for i in cases:
            ref = self.store.labels(i)  # mapped for this case only; its boundaries seed the decode
            labels = labels_on_grid(model, i, *self._grid(i), decision, self.decoding, self.device, self.chunk,
                                    seed=interface_band(ref, 1))
            scores += [dice(labels == c, ref == c) for c in self.indices if self.store.present(i, c)]
            del ref
        return {"dice": float(np.mean(scores))}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


# -- the decision rule --------------------------------------------------------------------------

def decode_priority(prob: np.ndarray, table: ClassTable, thresholds: Sequence[float]) -> np.ndarray:
    """Label map from head probabilities (..., C) in table order: the first class by priority with
    P_c >= t_c wins, else background."""
    if prob.shape[-1] != len(table):
        raise ValueError(f"{prob.shape[-1]} heads for a table of {len(table)} classes")
    labels = np.zeros(prob.shape[:-1], dtype=np.uint8)
    channel = {c.key: k for k, c in enumerate(table)}
    for cls in reversed(table.by_priority()):  # lowest priority first; winners overwrite
        k = channel[cls.key]
        labels[prob[..., k] >= thresholds[k]] = cls.index
    return labels


def priority_decision(table: ClassTable, thresholds: Sequence[float]) -> Decision:
    """:func:`decode_priority` as a decision of ``field.decide`` (dense or coarse to fine)."""
    return Decision(lambda prob: decode_priority(prob, table, thresholds), tuple(float(t) for t in thresholds))


class ThresholdCounts:
    """Per class and candidate threshold t: |P_c >= t|, |(P_c >= t) & ref == c| and |ref == c|, summed
    over cases one at a time, so choosing t_c holds counts, not every case's probability map."""

    def __init__(self, table: ClassTable, candidates: Sequence[float]):
        self.table = table
        self.candidates = np.asarray(sorted(candidates, key=lambda t: abs(t - 0.5)), dtype=np.float64)
        self.predicted = np.zeros((len(table), len(self.candidates)), dtype=np.int64)
        self.overlap = np.zeros_like(self.predicted)
        self.reference = np.zeros(len(table), dtype=np.int64)

    def add(self, prob: np.ndarray, ref: np.ndarray) -> None:
        """One case: head probabilities (..., C) in table order and its reference label map."""
        for k, cls in enumerate(self.table):
            inside = ref == cls.index
            self.reference[k] += int(np.count_nonzero(inside))
            for j, t in enumerate(self.candidates):
                above = prob[..., k] >= t
                self.predicted[k, j] += int(np.count_nonzero(above))
                self.overlap[k, j] += int(np.count_nonzero(above & inside))

    def best(self) -> np.ndarray:
        """Per class the candidate with the best pooled Dice (ties: the one closest to 0.5)."""
        size = self.predicted + self.reference[:, None]
        dice_ = np.where(size > 0, 2.0 * self.overlap / np.maximum(size, 1), 0.0)
        return self.candidates[np.argmax(dice_ > dice_.max(axis=1, keepdims=True) - 1e-12, axis=1)]


def fit_thresholds(pairs: Iterable[tuple[np.ndarray, np.ndarray]], table: ClassTable,
                   candidates: Sequence[float]) -> np.ndarray:
    """Per class, the t_c among ``candidates`` with the best Dice of P_c >= t_c against ref == c,
    pooled over the cases, from (probabilities, reference) pairs produced one case at a time."""
    counts = ThresholdCounts(table, candidates)
    for prob, ref in pairs:
        counts.add(prob, ref)
    return counts.best()


# -- the artifact -------------------------------------------------------------------------------

@dataclass
class CaseGeometry:
    """Where a case's whole-heart ROI lies in its original image."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    heart_box: Box
    heart_grid: Grid

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "affine": np.asarray(self.affine).tolist(),
                "heart_box": self.heart_box.to_dict(), "heart_grid": self.heart_grid.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> CaseGeometry:
        return cls(tuple(d["shape"]), np.asarray(d["affine"], dtype=np.float64), Box.from_dict(d["heart_box"]),
                   Grid.from_dict(d["heart_grid"]))


@dataclass
class UnifiedModel:
    """F_Θ with its latent table keyed by case id, the class convention and the decision rule."""

    model: ImplicitField
    model_params: ModelParams
    table: ClassTable
    case_ids: list[str]
    thresholds: np.ndarray
    geometry: dict[str, CaseGeometry]
    device: str = "cpu"
    chunk_points: int = 262_144
    extra_latents: dict[str, torch.Tensor] = field(default_factory=dict)  # cases fitted after training
    decoding: DecodeParams = field(default_factory=DecodeParams)  # how decode() makes its label maps
    # latents a person edited (field.refine), read from the artifact's edits file; they decode instead
    # of the fitted ones, which stay in the artifact untouched (an edit can always be undone)
    edited_latents: dict[str, torch.Tensor] = field(default_factory=dict)

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        payload = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
                   "model_params": dataclasses.asdict(self.model_params),
                   "state_dict": {k: v.cpu() for k, v in self.model.state_dict().items()},
                   "case_ids": list(self.case_ids), "classes": self.table.to_records(),
                   "priority": [c.key for c in self.table.by_priority()],
                   "thresholds": {c.key: float(t) for c, t in zip(self.table, self.thresholds)},
                   "geometry": {cid: g.to_dict() for cid, g in self.geometry.items()},
                   "extra_latents": {k: v.cpu() for k, v in self.extra_latents.items()},
                   "decoding": dataclasses.asdict(self.decoding)}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", edits: bool = True) -> UnifiedModel:
        """The artifact at ``path``, with the latents edited in napari (:func:`edits_path`) unless
        ``edits=False`` (the decoding stage: its maps are the model's own)."""
        # the artifact is tensors and plain types only (see save), so the safe loader reads it
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{path}: not a nearfix unified-model artifact")
        table = ClassTable.from_records(d["classes"])
        params = ModelParams(**d["model_params"])
        model = ImplicitField(len(d["case_ids"]), params, n_heads=len(table))
        model.load_state_dict(d["state_dict"])
        model.to(device).eval()
        edited = read_edited_latents(edits_path(path)) if edits else {}
        return cls(model, params, table, [str(c) for c in d["case_ids"]],
                   np.asarray([d["thresholds"][c.key] for c in table]),
                   {cid: CaseGeometry.from_dict(g) for cid, g in d["geometry"].items()}, device,
                   extra_latents=dict(d.get("extra_latents", {})),
                   decoding=DecodeParams(**d.get("decoding", {})),  # artifacts before 2026-12 hold none
                   edited_latents={cid: e["latent"] for cid, e in edited.items()})

    # -- decoding ----------------------------------------------------------------------------
    def _latent(self, case_id: str) -> tuple[int, torch.Tensor | None]:
        case_id = str(case_id)
        for latents in (self.edited_latents, self.extra_latents):
            if case_id in latents:
                return 0, latents[case_id].to(self.device)
        if case_id not in self.case_ids:
            raise KeyError(f"case {case_id!r} is not in the model (known: {self.case_ids + list(self.extra_latents)})")
        return self.case_ids.index(case_id), None

    def _decoding(self, case_id: str, grid: str) -> tuple[int, torch.Tensor | None, CaseGeometry, Grid]:
        """(table index, free latent, geometry, the grid decoded: the ROI grid or the heart box's voxels)."""
        if grid not in ("original", "roi"):
            raise ValueError(f"grid must be 'original' or 'roi', got {grid!r}")
        index, latent = self._latent(case_id)
        geo = self.geometry[str(case_id)]
        return index, latent, geo, geo.heart_grid if grid == "roi" else original_box_grid(geo.heart_box)

    def probabilities(self, case_id: str, grid: str = "original") -> np.ndarray:
        """Head probabilities (..., C): on the ROI grid, or on the original voxels of the heart box
        (``grid="original"``: the box's shape, at ``geometry[case_id].heart_box`` of the case's volume)."""
        index, latent, geo, on = self._decoding(case_id, grid)
        return field_on_grid(self.model, index, on, geo.heart_box, self.device, self.chunk_points, latent=latent)

    def decode(self, case_id: str, grid: str = "original", seed_labels: np.ndarray | None = None) -> np.ndarray:
        """The case's label map (uint8, class indices of :attr:`table`) on the ROI grid or on the case's
        original grid (background outside the heart box), decided chunk by chunk: no probability
        map of the box is held (ten float32 heads: 2 GB for a real case's box). ``seed_labels``, a label
        map of the case on its original grid (its L^ref, or the labels a new case was fitted to): the
        coarse-to-fine decode refines every cell its class boundaries cross (``field.decide``)."""
        index, latent, geo, on = self._decoding(case_id, grid)
        seed = None
        if seed_labels is not None:
            near = (np.asarray(seed_labels)[geo.heart_box.slices] if grid == "original"
                    else resample(np.asarray(seed_labels), geo.heart_grid, order=0))
            seed = interface_band(near, 1)
        labels = labels_on_grid(self.model, index, on, geo.heart_box, priority_decision(self.table, self.thresholds),
                                self.decoding, self.device, self.chunk_points, latent=latent, seed=seed)
        if grid == "roi":
            return labels
        out = np.zeros(geo.shape, dtype=np.uint8)
        out[geo.heart_box.slices] = labels
        return out

    def latent(self, case_id: str) -> torch.Tensor:
        """The case's code (1, D) as it decodes now: edited, fitted after training, or from the table."""
        index, latent = self._latent(case_id)
        if latent is None:
            latent = self.model.latents.embedding.weight[index:index + 1]
        return latent.detach().cpu().float().clone()

    def case_field(self, case_id: str) -> CaseField:
        """The case as an interactive edit sees it (:mod:`~nearfix_lib.field.refine`): F_Θ frozen, its
        code free, on its original voxels inside the heart box."""
        geo = self.geometry[str(case_id)]
        return CaseField(self.model, self.latent(case_id), geo.heart_box, geo.affine, tuple(geo.shape),  # type: ignore[arg-type]
                         priority_decision(self.table, self.thresholds), tuple(self.table.indices), self.decoding,
                         self.device, self.chunk_points)

    # -- new cases ---------------------------------------------------------------------------
    def fit_case(self, case_id: str, heart_labels: np.ndarray, geometry: CaseGeometry, sampling: BalancedSamplingParams,
                 loss: UnifiedLossParams, train: TrainParams, out_dir: Path, seed: int = 0,
                 progress: bool = False) -> torch.Tensor:
        """Fit z for an unseen case's (noisy) labels on its whole-heart box (supervision grid), F_Θ frozen.

        The same fit loop as every stage, on a copy of F_Θ with a one-case latent table whose
        latent is the only trainable parameter (initialised at the mean of the training latents);
        the latent is stored under ``case_id`` and decodes like a training case.
        """
        frozen = copy.deepcopy(self.model).cpu()
        solo = ImplicitField(1, self.model_params, n_heads=len(self.table))
        state = {k: v for k, v in frozen.state_dict().items() if not k.startswith("latents.")}
        solo.load_state_dict(state, strict=False)
        with torch.no_grad():
            solo.latents.embedding.weight.copy_(frozen.latents.embedding.weight.mean(dim=0, keepdim=True))
        for name, p in solo.named_parameters():
            p.requires_grad_(name.startswith("latents."))
        # no mining: these labels are noisy, and chasing the voxels decoded "wrong" would fit the noise
        sampling = dataclasses.replace(sampling, mined=0)
        store = write_store(Path(out_dir) / "cases", [heart_labels],
                            StoreSpec(tuple(self.table.indices), sampling.dilation_radius, interfaces=False),
                            case_ids=[str(case_id)])
        task = UnifiedTask(store, self.table, sampling,
                           dataclasses.replace(loss, distill_weight=0.0),
                           seed, self.device, chunk_points=self.chunk_points, thresholds=self.thresholds,
                           decoding=self.decoding)
        fit(solo, task, train, out_dir, device=self.device, seed=seed, progress=progress,
            extra={"case_id": str(case_id), "latent_only": True})
        z = solo.latents.embedding.weight.detach()[:1].clone()
        self.extra_latents[str(case_id)] = z.cpu()
        self.geometry[str(case_id)] = geometry
        return z
