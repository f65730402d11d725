"""Label maps from fitted fields: every voxel (dense), or coarse to fine.

A label map only changes near surfaces, yet a dense decode evaluates the field at every voxel
of a box: 18 M points for a real case's heart box, 11 M for its coronary box. The coarse-to-fine
decode (the multiresolution extraction of Occupancy Networks, Mescheder et al., CVPR 2019,
generalised to any decision rule over several heads) evaluates a lattice every ``coarse_step``
voxels first. A cell of that lattice whose eight corners decide the same label, each with every
head at least ``margin`` (in logits) away from its threshold, is settled: its voxels take that
label unevaluated. Every other cell, and every cell next to one (so a thin vessel passing
between confident corners is still looked at from both sides), is split in eight, and the
split repeats down to single voxels, where every voxel still open is evaluated exactly. The
cost follows the surface area, not the volume.

The result is a heuristic of the dense decode, not a proof: a structure that fits inside one
cell and leaves every corner of it and of its neighbours confident is lost. ``coarse_step``
and ``margin`` bound that risk (``tests/test_decide.py`` measures thin tubes against dense),
and ``mode: dense`` keeps the exact decode. Where the caller knows where structures are
expected (the input labels the field was fitted to), it passes their boundaries as ``seed``:
every cell holding a seed voxel is refined at every level and every seed voxel is evaluated, so no
structure of the input can hide inside confident cells, however small its box (at the demo's 2.2 mm
an appendage is a 16 x 13 x 11 box, two coarse cells across, and without a seed whole appendages were
lost). Only the seed voxels themselves, not every voxel of their cells: at 1.1 mm that took the
evaluated share from 15 % to 22 % of the heart box's voxels.

Evaluated points are the voxel centres the dense decode uses, through the same affine in the
same precision, so every voxel evaluated here carries the dense decode's own label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from nearfix_lib.core.config import DecodeParams
from nearfix_lib.core.geometry import Box, Grid, apply_affine, original_to_normalised
from nearfix_lib.field.infer import encode_case, grid_within_box, probabilities_at, reduced_on_grid

_LOGIT_CLIP = 1e-7  # float32 sigmoids saturate to 0 or 1; a clipped logit is still far from any threshold


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _LOGIT_CLIP, 1.0 - _LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Decision:
    """How head probabilities become labels: ``labels`` maps (n, heads) to (n,) uint8, and
    ``thresholds`` are the values a confident point keeps its distance from: one per head, or
    several on a single head (:func:`threshold_bits_decision`)."""

    labels: Callable[[np.ndarray], np.ndarray]
    thresholds: tuple[float, ...]

    def distance(self, prob: np.ndarray) -> np.ndarray:
        """(n,) how far, in logits, the head nearest to its threshold lies from it (a single head: from
        the nearest of its thresholds)."""
        return np.min(np.abs(_logit(prob) - _logit(np.asarray(self.thresholds))), axis=-1)


def threshold_decision(threshold: float, value: int = 1) -> Decision:
    """One head: label ``value`` where P >= threshold, else 0 (a stage-1 class field; ``value`` its
    class index where the labels are shown among the other classes)."""
    return Decision(lambda prob: np.where(prob[:, 0] >= threshold, value, 0).astype(np.uint8), (float(threshold),))


def threshold_bits_decision(thresholds: Sequence[float]) -> Decision:
    """One head cut at several thresholds in one decode: bit ``i`` of a voxel's label is set where
    P >= ``thresholds[i]`` (up to eight). Stage 1 reads its field at its threshold and, for a repair
    anchored to its input, at the anchor's two; a cell is settled only far from all of them."""
    cuts = np.asarray(thresholds, dtype=np.float64)
    if not 1 <= cuts.size <= 8:
        raise ValueError(f"threshold_bits_decision: 1 to 8 thresholds, got {cuts.size}")
    weights = (1 << np.arange(cuts.size)).astype(np.uint8)

    def labels(prob: np.ndarray) -> np.ndarray:
        # compared in the probabilities' precision, as threshold_decision's scalar is
        return ((prob[:, :1] >= cuts.astype(prob.dtype)) * weights).sum(axis=1).astype(np.uint8)

    return Decision(labels, tuple(float(t) for t in cuts))


def labels_on_grid(model: torch.nn.Module, case_index: int, grid: Grid, box: Box, decision: Decision,
                   params: DecodeParams, device: str = "cpu", chunk_points: int = 262_144,
                   image: torch.Tensor | None = None, latent: torch.Tensor | None = None,
                   seed: np.ndarray | None = None) -> np.ndarray:
    """``decision`` at every voxel centre of ``grid`` (uint8, ``grid.shape``), dense or coarse to fine
    (``params.mode``; ``auto``: dense on CUDA). ``box`` is the ROI the model's normalised space refers
    to; ``latent`` (1, D) replaces the table entry, ``image`` feeds an appearance model; ``seed`` (bool,
    ``grid.shape``, e.g. ``sampling.interface_band(input_labels, 1)``: where its labels change) marks
    voxels whose cells are always refined."""
    return decode_spent(model, case_index, grid, box, decision, params, device, chunk_points, image, latent,
                        seed)[0]


def decode_spent(model: torch.nn.Module, case_index: int, grid: Grid, box: Box, decision: Decision,
                 params: DecodeParams, device: str = "cpu", chunk_points: int = 262_144,
                 image: torch.Tensor | None = None, latent: torch.Tensor | None = None,
                 seed: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, int]]:
    """:func:`labels_on_grid` and the points the model was run on, per lattice spacing in voxels (where
    the cost goes: the first pass, each halving, the voxels themselves; dense: every voxel at 1)."""
    if params.mode_on(device) == "dense":
        labels = reduced_on_grid(model, case_index, grid, box, decision.labels, np.uint8, device, chunk_points,
                                 image=image, latent=latent)
        return labels, {1: labels.size}
    if seed is not None and np.shape(seed) != tuple(grid.shape):
        raise ValueError(f"decode seed of shape {np.shape(seed)} for a grid of {tuple(grid.shape)}")
    runner = _CoarseToFine(model, case_index, grid, box, decision, params, device, chunk_points, image, latent,
                           seed)
    return runner.run(), runner.evaluated


def labels_in_box(model: torch.nn.Module, case_index: int, grid: Grid, box: Box, decision: Decision,
                  params: DecodeParams, device: str = "cpu", chunk_points: int = 262_144,
                  seed: np.ndarray | None = None, image: torch.Tensor | None = None) -> np.ndarray:
    """:func:`labels_on_grid` on an axis-aligned ``grid``, evaluated only where it lies inside ``box``
    (a class field knows nothing outside its ROI); 0 elsewhere. ``seed`` is on the whole ``grid``;
    ``image`` feeds an appearance model (its crop on the box's own grid)."""
    out = np.zeros(grid.shape, dtype=np.uint8)
    sub = grid_within_box(grid, box)
    if sub is not None:
        lo, sub_grid = sub
        inside = tuple(slice(a, a + n) for a, n in zip(lo, sub_grid.shape))
        out[inside] = labels_on_grid(model, case_index, sub_grid, box, decision, params, device, chunk_points,
                                     image=image, seed=None if seed is None else np.asarray(seed)[inside])
    return out


def _first_step(step: int, shape: Sequence[int]) -> int:
    """The coarse step, halved while a single cell would already cover the whole grid."""
    while step > 1 and step >= max(shape):
        step //= 2
    return step


def _corners(cells: np.ndarray) -> list[tuple[slice, ...]]:
    """The eight views of a lattice (cells + 1 per axis) that hold each cell's corners."""
    n = cells.shape
    return [tuple(slice(o, o + m) for o, m in zip(offset, n)) for offset in np.ndindex(2, 2, 2)]


class _CoarseToFine:
    """One grid's decode. Lattice arrays span a virtual grid of ``cells * step + 1`` voxels per
    axis (so cells tile it evenly); a virtual voxel past the grid's end is evaluated at the last
    real voxel of its row, so every evaluated value is a real voxel's."""

    def __init__(self, model, case_index, grid, box, decision, params, device, chunk_points, image, latent, seed):
        self.model, self.decision, self.params = model, decision, params
        self.device, self.chunk = device, chunk_points
        self.shape = np.asarray(grid.shape)
        self.to_norm = original_to_normalised(box) @ grid.to_original
        self.encoded = encode_case(model, case_index, device, image, latent)
        self.step = _first_step(int(params.coarse_step), grid.shape)
        self.cells = -(-self.shape // self.step)
        lattice = tuple(int(v) for v in self.cells * self.step + 1)
        self.label = np.zeros(lattice, dtype=np.uint8)
        self.distance = np.zeros(lattice, dtype=np.float16)  # logits from the nearest threshold
        self.known = np.zeros(lattice, dtype=bool)
        self.painted = np.zeros(tuple(int(v) for v in self.cells * self.step), dtype=np.uint8)
        self.seed = None  # the seed voxels, on the painted (virtual) grid
        if seed is not None and np.any(seed):
            self.seed = np.zeros(self.painted.shape, dtype=bool)
            self.seed[tuple(slice(0, int(n)) for n in self.shape)] = seed
        self.evaluated: dict[int, int] = {}  # points the model was run on, per lattice spacing

    def _evaluate(self, points: np.ndarray, spacing: int) -> None:
        """Evaluate the lattice points where ``points`` (a bool lattice of that ``spacing``) is True, a
        group of planes of at most ``chunk`` points at a time: their coordinates are never listed all at
        once (an untrained field is unsure everywhere, and 50 M points' coordinates alone take 3.6 GB)."""
        counts = np.count_nonzero(points.reshape(len(points), -1), axis=1)
        start = 0
        while start < len(points):
            stop, total = start + 1, int(counts[start])
            while stop < len(points) and total + counts[stop] <= self.chunk:
                total += int(counts[stop])
                stop += 1
            if total:
                self._evaluate_at((np.argwhere(points[start:stop]) + (start, 0, 0)) * spacing)
            start = stop
        self.evaluated[spacing] = self.evaluated.get(spacing, 0) + int(counts.sum())

    @torch.no_grad()
    def _evaluate_at(self, virtual: np.ndarray) -> None:
        real = np.minimum(virtual, self.shape - 1).astype(np.float64)
        for start in range(0, len(virtual), self.chunk):
            stop = start + self.chunk
            points = apply_affine(self.to_norm, real[start:stop]).astype(np.float32)
            prob = probabilities_at(self.model, self.encoded, points, self.device)
            at = tuple(virtual[start:stop].T)
            self.label[at] = self.decision.labels(prob)
            self.distance[at] = np.minimum(self.decision.distance(prob), np.finfo(np.float16).max)
            self.known[at] = True

    def _sure(self, at: tuple[slice, ...], step: int) -> np.ndarray:
        """Which points of the lattice ``at`` may vouch for cells of ``step`` voxels: those at least
        ``margin * step / coarse_step`` logits from every threshold. The margin shrinks with the cell,
        as the change a field with bounded slope can make across it does; a constant one would
        refine a band of the same width in millimetres at every voxel size."""
        return self.distance[at] >= self.params.margin * step / self.step

    def _seeded(self, step: int) -> np.ndarray | bool:
        """Which cells of ``step`` voxels hold a seed voxel (False: no seed)."""
        if self.seed is None:
            return False
        c0, c1, c2 = (n // step for n in self.seed.shape)
        return self.seed.reshape(c0, step, c1, step, c2, step).any(axis=(1, 3, 5))

    def _paint(self, settled: np.ndarray, labels: np.ndarray, step: int) -> None:
        """Give every voxel of the ``settled`` cells (half-open, ``step`` wide) its cell's label."""
        c0, c1, c2 = settled.shape
        blocks = self.painted.reshape(c0, step, c1, step, c2, step)
        np.copyto(blocks, labels[:, None, :, None, :, None], where=settled[:, None, :, None, :, None])

    def _refine(self, step: int, children: np.ndarray, guarded: np.ndarray) -> None:
        """Fill the lattice of spacing step/2 over the ``children`` cells. Above the last level every
        new point is evaluated. On the last one (the voxels) a new point is evaluated where the points
        it lies between (its edge's two ends, its face's four corners or its cell's eight, at most
        sqrt(3) voxels away) differ in label or are unsure, where it belongs to a ``guarded`` cell, or
        where it is a seed voxel; anywhere else it takes their common label. (Between coarser points a
        thin vessel can hide from all of them: ``tests/test_decide.py`` has one.)"""
        coarse = (slice(None, None, step),) * 3
        fine = (slice(None, None, step // 2),) * 3
        new = _lattice_of(children) & ~self.known[fine]
        if step > 2:
            self._evaluate(new, step // 2)
            return
        ambiguous, inherited = _midpoints(self.label[coarse], self._sure(coarse, step))
        evaluate = new & (ambiguous | _lattice_of(guarded))
        if self.seed is not None:
            evaluate[:-1, :-1, :-1] |= new[:-1, :-1, :-1] & self.seed
        infer = new & ~evaluate
        label, distance, known = self.label[fine], self.distance[fine], self.known[fine]  # views
        label[infer] = inherited[infer]
        distance[infer] = np.inf
        known[infer] = True
        self._evaluate(evaluate, step // 2)

    def run(self) -> np.ndarray:
        step = self.step
        self._evaluate(np.ones_like(self.known[(slice(None, None, step),) * 3]), step)
        active = np.ones(tuple(int(v) for v in self.cells), dtype=bool)
        while step > 1:
            at = (slice(None, None, step),) * 3
            label, sure = self.label[at], self._sure(at, step)
            corners = _corners(active)
            first = label[corners[0]]
            agree = np.ones_like(active)
            for view in corners:
                agree &= (label[view] == first) & sure[view]
            seeded = active & self._seeded(step)
            unsure = active & ~agree | seeded
            # and the neighbours, every new point evaluated: a thin structure can pass between the
            # confident corners of one coarse cell
            reopen = unsure
            if step >= self.params.guard_from_step and unsure.any():
                reopen = ndimage.maximum_filter(unsure, size=3, mode="constant")
            self._paint(active & ~reopen, first, step)
            active = _children(reopen)
            self._refine(step, active, _children(reopen & ~unsure))
            step //= 2
        n0, n1, n2 = (int(v) for v in self.shape)
        return np.where(self.known[:n0, :n1, :n2], self.label[:n0, :n1, :n2], self.painted[:n0, :n1, :n2])


def _children(cells: np.ndarray) -> np.ndarray:
    """Each cell's eight halves."""
    return cells.repeat(2, 0).repeat(2, 1).repeat(2, 2)


def _lattice_of(cells: np.ndarray) -> np.ndarray:
    """The lattice points (cells + 1 per axis) that are a corner of one of ``cells``."""
    points = np.zeros(tuple(n + 1 for n in cells.shape), dtype=bool)
    for view in _corners(cells):
        points[view] |= cells
    return points


def _midpoints(label: np.ndarray, sure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """On the lattice of half the spacing (2n - 1 per axis for n points): whether each new point's
    parents (the two, four or eight coarse points it is the middle of) differ in label or are
    unsure, and their first one's label. Points of the coarse lattice itself: False, their label."""
    n = label.shape
    ambiguous = np.zeros(tuple(2 * m - 1 for m in n), dtype=bool)
    inherited = np.zeros(ambiguous.shape, dtype=np.uint8)
    inherited[::2, ::2, ::2] = label
    for odd in np.ndindex(2, 2, 2):
        if not any(odd):
            continue
        target = tuple(slice(1, None, 2) if o else slice(0, None, 2) for o in odd)
        parents = [tuple(slice(d, d + m - 1) if o else slice(None) for o, d, m in zip(odd, shift, n))
                   for shift in np.ndindex(*(2 if o else 1 for o in odd))]
        first = label[parents[0]]
        agree = sure[parents[0]].copy()
        for view in parents[1:]:
            agree &= (label[view] == first) & sure[view]
        ambiguous[target] = ~agree
        inherited[target] = first
    return ambiguous, inherited
