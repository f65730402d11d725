"""The base commit's in-memory stage-3 sampling and task (before the per-case store), kept verbatim
as the reference the store-backed code must reproduce: same seed, same points and labels, same fit.

Only the names differ (``Reference*``); the bodies are those of nearfix_lib/field/sampling.py
(``_LabelVolume``, ``ClassBalancedSampler``) and nearfix_lib/field/unified.py (``teacher_values``
through ``F.grid_sample``, ``class_fractions`` over maps, ``UnifiedTask``) at commit 482de3c.
Used by tests/test_store.py only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.config import BalancedSamplingParams, UnifiedLossParams
from nearfix_lib.core.geometry import Box, apply_affine, roi_grid, to_grid_sample_order
from nearfix_lib.core.metrics import dice
from nearfix_lib.field.infer import field_at_points, field_on_grid
from nearfix_lib.field.losses import distillation, latent_l2, per_head_weighted_bce
from nearfix_lib.field.sampling import (
    _cell_points,
    _CheckpointableRNG,
    _within,
    boundary_band,
    cell_index,
    dense_from_sparse,
    index_to_normalised,
    interface_band,
    mining_due,
    sparse_coordinates,
)
from nearfix_lib.field.train import unwrap
from nearfix_lib.field.unified import decode_priority, head_weights


@dataclass
class ReferenceTeacher:
    channel: int
    prob: torch.Tensor  # (1, 1, R, R, R) float16
    from_heart: np.ndarray


class _LabelVolume:
    """A label map (uint8) and, per class, cumulative voxel counts over its (i, j) rows.

    Uniform sampling over one class's voxels then needs no per-class coordinate list (12 bytes
    per voxel, several per case): draw a rank r among the class's voxels, find its row by binary
    search in the cumulative counts and its k by scanning that one row.
    """

    def __init__(self, labels: np.ndarray, classes: Sequence[int]):
        lab = np.asarray(labels)
        if lab.ndim != 3:
            raise ValueError(f"label maps must be 3-D, got shape {lab.shape}")
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"label maps must be integer, got {lab.dtype}")
        if lab.size and (lab.min() < 0 or lab.max() > 255):
            raise ValueError("label values must lie in 0..255")
        if not 0 < lab.size < 2**31:
            raise ValueError(f"label grids need 1 to 2**31 - 1 voxels (int32 counts), got {lab.size}")
        self.labels = np.array(lab, dtype=np.uint8, order="C")  # a copy: the counts must stay valid
        self.shape: tuple[int, int, int] = lab.shape  # type: ignore[assignment]
        rows = self.labels.reshape(-1, self.shape[2])
        self._cum: dict[int, np.ndarray] = {}
        for c in classes:
            cum = np.cumsum(np.count_nonzero(rows == c, axis=1), dtype=np.int64)
            if cum[-1] > 0:
                self._cum[int(c)] = cum.astype(np.int32)

    def present(self, c: int) -> bool:
        return c in self._cum

    def draw(self, c: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 3) int64 (i, j, k) of voxels drawn uniformly, with replacement, from class ``c``."""
        cum = self._cum[c]
        rank = rng.integers(0, int(cum[-1]), n)
        row = np.searchsorted(cum, rank, side="right")
        before = np.where(row > 0, cum[np.maximum(row - 1, 0)], 0)
        hits = self.labels.reshape(-1, self.shape[2])[row] == c
        k = np.argmax(np.cumsum(hits, axis=1) > (rank - before)[:, None], axis=1)
        i, j = np.divmod(row, self.shape[1])
        return np.stack([i, j, k], axis=1)

    def at(self, points: np.ndarray) -> np.ndarray:
        """Labels at the cells containing the normalised (N, 3) ``points``."""
        cells = cell_index(points, self.shape)
        return self.labels[cells[:, 0], cells[:, 1], cells[:, 2]]




class ReferenceSampler(_CheckpointableRNG):
    """Class-balanced points and integer labels for the unified multi-class fit.

    ``classes`` are the label values the model learns; label values not listed read as 0
    (background). Labels are label-map values, not channel numbers: the caller maps them onto
    its output channels through :attr:`classes`.
    """

    def __init__(self, label_maps: Sequence[np.ndarray], classes: Sequence[int],
                 params: BalancedSamplingParams, seed: int):
        super().__init__(seed)
        if len(label_maps) == 0:
            raise ValueError("ClassBalancedSampler needs at least one label map")
        self.classes = [int(c) for c in classes]
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be a non-empty list of distinct labels, got {classes}")
        if min(self.classes) < 1 or max(self.classes) > 255:
            raise ValueError(f"class labels must lie in 1..255, got {self.classes}")
        self.params = params
        self._lut = np.zeros(256, dtype=np.int64)
        self._lut[self.classes] = self.classes
        self._cases = [_LabelVolume(lab, self.classes) for lab in label_maps]
        self._bands = [sparse_coordinates(boundary_band(np.isin(case.labels, self.classes),
                                                        params.dilation_radius))
                       for case in self._cases]
        self._mined = [np.zeros((0, 3), dtype=np.int32) for _ in self._cases]

    def set_mined(self, case: int, coords: np.ndarray) -> None:
        """The voxels (M, 3) of case ``case`` that ``params.mined`` points per step come from (M = 0: none)."""
        self._mined[case] = _within(np.asarray(coords).reshape(-1, 3), self._cases[case].shape).astype(np.int32)

    def mined_count(self, case: int) -> int:
        return len(self._mined[case])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mined": list(self._mined)}  # set_mined replaces, never mutates

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "mined" in state:  # checkpoints from before mining have none
            if len(state["mined"]) != len(self._cases):
                raise ValueError(f"sampler state has mined voxels for {len(state['mined'])} cases, "
                                 f"not {len(self._cases)}")
            for case, coords in enumerate(state["mined"]):
                self.set_mined(case, coords)

    def __len__(self) -> int:
        return len(self._cases)

    @property
    def points_per_case(self) -> int:
        return self.params.positives_per_class * len(self.classes) + self.params.negatives

    def sample(self, case_indices: Sequence[int], epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Points (B, N, 3) float32, normalised (i, j, k), and labels (B, N) int64.

        ``N = positives_per_class * len(classes) + negatives`` for every case. Per case, in this
        order: ``positives_per_class`` points from each present class (in :attr:`classes` order),
        then the negatives — the nominal ones plus the slots of absent classes — with the larger
        half from the band around the union foreground and the rest uniform over the ROI (all
        uniform if the case has no foreground), ``mined`` of those band ones from the case's
        mined voxels once it has any. Every label is looked up at its returned point,
        so a "negative" in the band may well be foreground. ``epoch`` (1-based) only decides
        whether cell points are jittered (``jitter_epochs``); the class balance follows no schedule.
        """
        p = self.params
        jitter = p.jitter and (p.jitter_epochs == 0 or epoch <= p.jitter_epochs)
        n = self.points_per_case
        points = np.empty((len(case_indices), n, 3), dtype=np.float32)
        labels = np.empty((len(case_indices), n), dtype=np.int64)
        for b, case in enumerate(case_indices):
            volume, band = self._cases[case], self._bands[case]
            parts = [_cell_points(volume.draw(c, p.positives_per_class, self._rng), volume.shape,
                                  self._rng, jitter)
                     for c in self.classes if volume.present(c)]
            n_neg = n - p.positives_per_class * len(parts)
            n_band = (n_neg - n_neg // 2) if len(band) else 0
            mined = self._mined[case]
            n_mined = min(p.mined, n_band) if len(mined) else 0
            for cells, count in ((band, n_band - n_mined), (mined, n_mined)):
                if count:
                    picked = cells[self._rng.integers(0, len(cells), count)]
                    parts.append(_cell_points(picked, volume.shape, self._rng, jitter))
            parts.append(self._rng.uniform(-1.0, 1.0, (n_neg - n_band, 3)))
            points[b] = np.concatenate(parts, axis=0)
            labels[b] = self._lut[volume.at(points[b])]
        return points, labels


def reference_teacher_values(teachers: Sequence[ReferenceTeacher], points: np.ndarray, n_heads: int) -> np.ndarray:
    """Soft targets (N, n_heads) at whole-heart-normalised ``points`` (N, 3); 0 outside a class ROI.

    Trilinear, with the same voxel-centre convention as the feature grids (``align_corners=False``);
    a class ROI holds the class plus a margin, so 0 outside it is the teacher's own answer.
    """
    out = np.zeros((len(points), n_heads), dtype=np.float32)
    for t in teachers:
        q = torch.from_numpy(to_grid_sample_order(apply_affine(t.from_heart, points)).astype(np.float32))
        v = F.grid_sample(t.prob.float(), q.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="zeros",
                          align_corners=False)
        out[:, t.channel] = v.reshape(-1).numpy()
    return out




def reference_class_fractions(label_maps: Sequence[np.ndarray], indices: Sequence[int]) -> np.ndarray:
    """Voxel fraction f_c of each class over all maps (0 for a class absent everywhere)."""
    counts = np.zeros(256, dtype=np.float64)
    total = 0
    for lab in label_maps:
        counts += np.bincount(np.asarray(lab, dtype=np.uint8).ravel(), minlength=256)
        total += lab.size
    return counts[list(indices)] / max(total, 1)




class ReferenceTask:
    """Stage 3 for the fit loop: class-balanced points, per-head weighted BCE, distillation, prior.

    ``label_maps`` are the cases' L^ref on a lattice that tiles their whole-heart box (the original
    voxels inside it, or the ROI grid), so a map's own normalised coordinates are the model's;
    ``teachers[i]`` the stage-1 probabilities of case i (empty list: no distillation for that case).
    Validation: mean over cases and classes of the Dice of the decoded map against L^ref.
    """

    score_name = "dice"

    def __init__(self, label_maps: Sequence[np.ndarray], table: ClassTable, sampling: BalancedSamplingParams,
                 loss: UnifiedLossParams, seed: int, device: str,
                 teachers: Sequence[Sequence[ReferenceTeacher]] | None = None,
                 chunk_points: int = 262_144, thresholds: Sequence[float] | None = None):
        self.maps = [np.asarray(m, dtype=np.uint8) for m in label_maps]
        self.n_cases = len(self.maps)
        self.table = table
        self.indices = table.indices
        self.sampler = ReferenceSampler(self.maps, self.indices, sampling, seed)
        self.loss_params = loss
        self.alpha = head_weights(reference_class_fractions(self.maps, self.indices), loss)
        self.teachers = list(teachers) if teachers is not None else [[] for _ in self.maps]
        self.distill = loss.distill_weight > 0 and any(self.teachers)
        # per case, which heads have a teacher (fixed, so not rebuilt every step)
        self._has_teacher = np.zeros((self.n_cases, len(self.indices)), dtype=bool)
        for i, case_teachers in enumerate(self.teachers):
            self._has_teacher[i, [t.channel for t in case_teachers]] = True
        self.device = device
        self.chunk = chunk_points
        self.thresholds = np.full(len(self.indices), 0.5) if thresholds is None else np.asarray(thresholds)
        self._channel = np.zeros(256, dtype=np.int64) - 1
        self._channel[self.indices] = np.arange(len(self.indices))
        # where mining passes decode: the band around every class boundary of L^ref, at one bit per
        # voxel (its coordinates would take 12 bytes each, ~2 MB per case at 1.1 mm)
        self._interfaces = ([np.packbits(interface_band(m, sampling.dilation_radius), axis=None) for m in self.maps]
                            if sampling.mined else [])

    def batch(self, case_idx: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        points, labels = self.sampler.sample(list(case_idx), epoch)
        channel = self._channel[labels]
        targets = np.zeros((*labels.shape, len(self.indices)), dtype=np.float32)
        b, n = np.nonzero(channel >= 0)
        targets[b, n, channel[b, n]] = 1.0
        out = {"case": torch.as_tensor(np.asarray(case_idx), dtype=torch.long),
               "points": torch.from_numpy(points), "target": torch.from_numpy(targets)}
        if self.distill:
            out["teacher"] = torch.from_numpy(np.stack([reference_teacher_values(self.teachers[i], points[k],
                                                                                  len(self.indices))
                                                         for k, i in enumerate(case_idx)]))
            out["has_teacher"] = torch.from_numpy(self._has_teacher[np.asarray(case_idx)])
        return out

    def loss(self, model, batch):
        logits = model(batch["case"], batch["points"]).float()
        data = per_head_weighted_bce(logits, batch["target"], self.alpha)
        lat = latent_l2(unwrap(model).latents(batch["case"]))
        total = data + self.loss_params.latent_weight * lat
        parts = {"data": data.item(), "latent": lat.item()}
        if self.distill:
            weight = batch["has_teacher"][:, None, :].float() * self.alpha.to(logits)
            dist = distillation(logits, batch["teacher"], weight)
            total = total + self.loss_params.distill_weight * dist
            parts["distill"] = dist.item()
        return total, parts

    def before_epoch(self, model, epoch: int) -> None:
        """A mining pass when one is due after epoch - 1 (``sampling.mined``): decode each case on
        the band around its L^ref boundaries and give the sampler the voxels decoded wrong, grown
        by one voxel — the other side of a misplaced boundary, which the decoder must not overshoot into.

        Every process of a distributed fit runs it for every case on the same weights, so all
        ranks keep drawing the same global batch without exchanging the voxels.
        """
        if not mining_due(self.sampler.params, epoch - 1):
            return
        for i, ref in enumerate(self.maps):
            coords = sparse_coordinates(np.unpackbits(self._interfaces[i], count=ref.size).reshape(ref.shape))
            prob = field_at_points(model, i, index_to_normalised(coords, ref.shape), self.device, self.chunk)
            labels = decode_priority(prob, self.table, self.thresholds)
            wrong = coords[labels != ref[coords[:, 0], coords[:, 1], coords[:, 2]]]
            self.sampler.set_mined(i, sparse_coordinates(ndimage.binary_dilation(dense_from_sparse(wrong, ref.shape))))

    def probabilities(self, model, i: int) -> np.ndarray:
        box = Box((0, 0, 0), self.maps[i].shape)
        return field_on_grid(model, i, roi_grid(box, self.maps[i].shape), box, self.device, self.chunk)

    def evaluate(self, model, cases: Sequence[int]) -> dict[str, float]:
        scores = []
        for i in cases:
            ref = self.maps[i]
            labels = decode_priority(self.probabilities(model, i), self.table, self.thresholds)
            scores += [dice(labels == c, ref == c) for c in self.indices if (ref == c).any()]
        return {"dice": float(np.mean(scores))}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
