"""Training points for the implicit auto-decoders: where they are queried and what they should say.

An implicit model is never fitted on the dense grid: every step queries a few thousand points
per case. Uniform points alone spend almost all of them deep inside or far outside the shape,
where the answer is trivial; the shape lives in a thin band around its surface. So a fraction of
the points (the *bias*, on a schedule over the epochs) comes from that band, the rest from the
whole ROI so that no spurious blob far from the surface goes unpunished.

Conventions (see :mod:`nearfix_lib.core.geometry`):

* Arrays and points are (i, j, k). Voxel indices come from :func:`sparse_coordinates`
  (``np.argwhere``), normalised points are (i, j, k) as well; only the model reorders them for
  ``grid_sample``. An asymmetric grid is never transposed here.
* A grid of shape (R_i, R_j, R_k) tiles ROI-normalised ``[-1, 1]^3``: index g has its centre at
  ``n = -1 + (2 g + 1) / R`` and its cell covers ``[-1 + 2 g / R, -1 + 2 (g + 1) / R)``.
  :func:`normalised_to_index` is the exact inverse of :func:`index_to_normalised` (integers are
  voxel centres, as in original voxel space), so the cell containing a point is
  ``floor(index + 0.5)``, which is what :func:`cell_index` returns.
* A point's target is the value of the voxel whose cell contains it (nearest neighbour), never
  an interpolation: the labels are binary and the noise we repair is at voxel scale.

Data are kept compact: band voxels as int32 (i, j, k) rows, label maps as uint8 with per-row class
counts instead of per-class voxel lists, binary masks as one bit per voxel. Neither sampler holds its
cases' arrays: both read them from the per-case store on disk (:mod:`nearfix_lib.field.store`; what
each needs of it is a :class:`MaskStore` or a :class:`LabelStore`) one case of a batch at a time, so
their memory does not grow with the number of cases. Every sampler draws from one
``np.random.Generator(np.random.PCG64(seed))`` whose state is checkpointed, so an interrupted fit
resumes with exactly the points it would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from scipy import ndimage

from nearfix_lib.core.config import BalancedSamplingParams, SamplingParams
from nearfix_lib.core.geometry import bounding_box

# Jittered points stay this fraction of a cell away from the cell's faces: a point exactly on a
# face (or rounded onto it when cast to float32) would belong to the neighbouring voxel, and its
# target would silently come from there. 1e-3 of a cell is far above float32 resolution in
# [-1, 1] for any grid below ~30000 voxels per axis, and far below anything a model can resolve.
_JITTER_MARGIN = 1e-3


# -- parameters (their dataclasses live in core.config) ------------------------------------------

def mining_due(params: BalancedSamplingParams, epoch: int) -> bool:
    """Whether a mining pass runs after ``epoch`` (1-based)."""
    return (params.mined > 0 and epoch >= max(params.mine_from_epoch, 1)
            and (epoch - params.mine_from_epoch) % params.mine_interval == 0)


def bias_at_epoch(params: SamplingParams, epoch: int) -> float:
    """Fraction of band points at ``epoch`` (1-based): the schedule, else the fixed ratio."""
    if epoch < 1:
        raise ValueError(f"epochs are 1-based, got {epoch}")
    if not params.bias_schedule:
        return float(params.sampling_bias_ratio)
    for last_epoch, ratio in params.bias_schedule:
        if epoch <= last_epoch:
            return float(ratio)
    return float(params.bias_schedule[-1][1])


# -- geometry of the band -------------------------------------------------------------------------

def _ball(radius: int) -> np.ndarray:
    """Offsets d with |d| <= radius (Euclidean), as a structuring element."""
    r = np.arange(-radius, radius + 1)
    d2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    return d2 <= radius * radius


def boundary_band(mask: np.ndarray, radius: int, border_is_surface: bool = True) -> np.ndarray:
    """Voxels within ``radius`` (ball) of the surface: ``dilate(M, r) & ~erode(M, r)``.

    Outside the array counts as background for the erosion, so a mask cut by the ROI border has
    band there too: a surface the model must learn to place (a cropped vessel ends at the border
    of its ROI in every case alike). With ``border_is_surface`` false it counts as foreground: where
    the array's border cuts the mask there is no surface (the CT edge: a vessel leaving the scan has no
    edge there to find). The work is done on the mask's bounding box grown by ``radius``, which gives
    the same result as the full array in a fraction of the time.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"boundary_band needs a 3-D mask, got shape {mask.shape}")
    if radius < 1:
        raise ValueError(f"band radius must be >= 1 voxel, got {radius}")
    out = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask)
    if box is None:
        return out
    lo = np.maximum(np.asarray(box.lo) - radius, 0)
    hi = np.minimum(np.asarray(box.hi) + radius, mask.shape)
    window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    crop = mask[window]
    ball = _ball(radius)
    grown = ndimage.binary_dilation(crop, structure=ball)
    # where the crop is not clipped by the array, the mask lies ``radius`` inside it: the value beyond the
    # crop reaches no mask voxel's erosion, and it stands for the array's outside only where clipped
    shrunk = ndimage.binary_erosion(crop, structure=ball, border_value=0 if border_is_surface else 1)
    out[window] = grown & ~shrunk
    return out


def interface_band(labels: np.ndarray, radius: int) -> np.ndarray:
    """Voxels within ``radius`` (ball) of a change of label: every class boundary, on both sides.

    Once a multi-class decoder has learnt the shapes, its errors lie here, apart from detached
    blobs far from any boundary (which validation shows), so the mining pass decodes only these.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"interface_band needs a 3-D label map, got shape {labels.shape}")
    if radius < 1:
        raise ValueError(f"band radius must be >= 1 voxel, got {radius}")
    if radius == 1:
        return _face_changes(labels)
    ball = _ball(radius)
    return ndimage.maximum_filter(labels, footprint=ball) != ndimage.minimum_filter(labels, footprint=ball)


def _face_changes(labels: np.ndarray) -> np.ndarray:
    """:func:`interface_band` of radius 1 (the ball is a voxel and its six faces' neighbours): both sides
    of every pair of face neighbours that differ. The same voxels as the two filters, six times faster
    (0.4 s against 2.6 s on a real case's heart box), and every seeded decode computes it."""
    band = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        lower = tuple(slice(None, -1) if a == axis else slice(None) for a in range(labels.ndim))
        upper = tuple(slice(1, None) if a == axis else slice(None) for a in range(labels.ndim))
        change = labels[lower] != labels[upper]
        band[lower] |= change
        band[upper] |= change
    return band


# -- index <-> normalised coordinates --------------------------------------------------------------

def _grid_shape(shape: Sequence[int] | int) -> np.ndarray:
    res = np.broadcast_to(np.asarray(shape, dtype=np.float64), (3,))
    if np.any(res < 1):
        raise ValueError(f"grid shape must be positive, got {shape}")
    return res


def index_to_normalised(idx: np.ndarray, shape: Sequence[int] | int) -> np.ndarray:
    """Continuous (i, j, k) voxel coordinates (integers = centres) -> ROI-normalised points."""
    res = _grid_shape(shape)
    return (2.0 * np.asarray(idx, dtype=np.float64) + 1.0) / res - 1.0


def normalised_to_index(points: np.ndarray, shape: Sequence[int] | int) -> np.ndarray:
    """ROI-normalised (i, j, k) points -> continuous voxel coordinates (integers = centres)."""
    res = _grid_shape(shape)
    return ((np.asarray(points, dtype=np.float64) + 1.0) * res - 1.0) / 2.0


def cell_index(points: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Integer (i, j, k) of the voxel whose cell contains each point, clipped onto the grid.

    Clipping puts the closed upper face ``n = 1`` (and anything beyond the box) into the edge
    voxel, matching how ``grid_sample`` with border padding reads a point there.
    """
    res = _grid_shape(shape)
    cells = np.floor((np.asarray(points, dtype=np.float64) + 1.0) * 0.5 * res).astype(np.int64)
    return np.clip(cells, 0, res.astype(np.int64) - 1)


def lookup(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Values of ``mask`` at the cells containing ``points`` (..., 3), shaped like ``points[..., 0]``."""
    mask = np.asarray(mask)
    pts = np.asarray(points)
    cells = cell_index(pts.reshape(-1, 3), mask.shape)
    return mask[cells[:, 0], cells[:, 1], cells[:, 2]].reshape(pts.shape[:-1])


def sparse_coordinates(mask: np.ndarray) -> np.ndarray:
    """(N, 3) int32 (i, j, k) rows of the True voxels, in C order: a volume as a coordinate list."""
    return np.argwhere(np.asarray(mask, dtype=bool)).astype(np.int32)


def _within(coords: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``coords`` (N, 3), refused if a row lies outside a volume of ``shape``."""
    if coords.size and (coords.min() < 0 or np.any(coords.max(axis=0) >= np.asarray(shape))):
        raise ValueError(f"coordinates outside a volume of shape {tuple(shape)}")
    return coords


def dense_from_sparse(coords: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The bool volume of ``shape`` that is True exactly at the (i, j, k) rows ``coords``."""
    shape = tuple(int(s) for s in shape)
    coords = _within(np.asarray(coords, dtype=np.int64).reshape(-1, 3), shape)
    out = np.zeros(shape, dtype=bool)
    out[coords[:, 0], coords[:, 1], coords[:, 2]] = True
    return out


def _cell_points(cells: np.ndarray, shape: Sequence[int], rng: np.random.Generator,
                 jitter: bool) -> np.ndarray:
    """Normalised points inside the given cells: uniform within each cell, or at its centre."""
    offset = (rng.random(cells.shape) - 0.5) * (1.0 - 2.0 * _JITTER_MARGIN) if jitter else 0.0
    return index_to_normalised(cells + offset, shape)


# -- compact per-case storage ------------------------------------------------------------------------

def _draw_class(rows: np.ndarray, cumulative: np.ndarray, c: int, n: int, rng: np.random.Generator,
                shape: Sequence[int]) -> np.ndarray:
    """(n, 3) int64 (i, j, k) of voxels drawn uniformly, with replacement, from class ``c``.

    ``rows`` is the label map as (I*J, K) rows and ``cumulative`` the class's cumulative voxel
    counts over them: draw a rank r among the class's voxels, find its row by binary search in
    the counts and its k by scanning that one row. No per-class coordinate list (12 bytes per
    voxel, several per case) is needed, and only the rows drawn are read.
    """
    rank = rng.integers(0, int(cumulative[-1]), n)
    row = np.searchsorted(cumulative, rank, side="right")
    before = np.where(row > 0, cumulative[np.maximum(row - 1, 0)], 0)
    hits = rows[row] == c
    k = np.argmax(np.cumsum(hits, axis=1) > (rank - before)[:, None], axis=1)
    i, j = np.divmod(row, shape[1])
    return np.stack([i, j, k], axis=1)


class MaskStore(Protocol):
    """Where :class:`BandSampler` reads its cases (a binary ``field.store.CaseStore``): small facts
    in memory, arrays opened per call (memory-mapped) and dropped by the caller after use."""

    @property
    def dilation_radius(self) -> int: ...

    def __len__(self) -> int: ...

    def shape(self, case: int) -> tuple[int, int, int]: ...

    def band_size(self, case: int) -> int: ...

    def band_at(self, case: int, rows: np.ndarray) -> np.ndarray: ...

    def foreground(self, case: int) -> np.ndarray: ...

    def foreground_at(self, case: int, cells: np.ndarray) -> np.ndarray: ...


class LabelStore(Protocol):
    """Where :class:`ClassBalancedSampler` reads its cases (a label ``field.store.CaseStore``), as
    :class:`MaskStore` but with the label crop and its class counts instead of foreground bits."""

    @property
    def classes(self) -> tuple[int, ...]: ...

    @property
    def dilation_radius(self) -> int: ...

    def __len__(self) -> int: ...

    def shape(self, case: int) -> tuple[int, int, int]: ...

    def present(self, case: int, c: int) -> bool: ...

    def band_size(self, case: int) -> int: ...

    def labels(self, case: int) -> np.ndarray: ...

    def cumulative(self, case: int) -> np.ndarray: ...

    def band_at(self, case: int, rows: np.ndarray) -> np.ndarray: ...


# -- samplers ------------------------------------------------------------------------------------------

class _CaseStreams:
    """The draws for one case at one epoch come from their own PCG64 stream, keyed by (seed, epoch,
    case), not from one stream that every case of every batch advances in turn.

    A case is drawn once per epoch (the fit takes a permutation of the cases), so every key is
    used once. Any process can draw any case's points alone and gets what every other process
    would: a torchrun rank samples (and maps) only its own share of a batch's cases, and K ranks
    give the points of one; a resumed fit draws the same points with no generator state to carry.
    """

    STREAMS = "per (seed, epoch, case)"

    def __init__(self, seed: int):
        self.seed = int(seed)

    def rng(self, epoch: int, case: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, int(epoch), int(case)]))

    def state_dict(self) -> dict:
        """Plain picklable data that :meth:`load_state_dict` checks (the streams need no state)."""
        return {"streams": self.STREAMS}

    def load_state_dict(self, state: dict) -> None:
        if state.get("streams") != self.STREAMS:
            raise ValueError("the checkpoint's sampler drew every case from one stream (a fit started before "
                             "per-case streams): it cannot resume with the same points; start it again")


class BandSampler(_CaseStreams):
    """Surface-biased points and binary targets for per-class fits over many cases.

    Each case lives on its own ROI grid (any shape; cases may differ) in a :class:`MaskStore`,
    one bit per voxel, with the band around its foreground. Per case the sampler keeps nothing: a
    batch maps the band and the bits of each of its cases while it draws from them, reads the bits
    of the drawn cells only, and lets them go.
    """

    def __init__(self, store: MaskStore, params: SamplingParams, seed: int):
        super().__init__(seed)
        if len(store) == 0:
            raise ValueError("BandSampler needs at least one case")
        if store.dilation_radius != params.sampling_dilation_radius:
            raise ValueError(f"the store's band has radius {store.dilation_radius}, the sampling "
                             f"{params.sampling_dilation_radius}: rebuild the store")
        self.params = params
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def mask(self, case: int) -> np.ndarray:
        """The case's binary mask, bool (I, J, K), decoded from the store (in memory)."""
        return self.store.foreground(case)

    def sample(self, case_indices: Sequence[int], epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Points (B, N, 3) float32, normalised (i, j, k), and targets (B, N) float32 in {0, 1}.

        Per case the first ``round(ratio * N)`` points come from the band (``ratio`` from
        :func:`bias_at_epoch`) and the rest are uniform over ``[-1, 1]^3``; the order is not
        shuffled, because the loss is a mean over points and a fixed layout lets callers tell
        the two groups apart. A case with an empty band draws all N points uniformly. Targets are
        looked up at the float32 points returned, so they always agree with :func:`lookup`.
        """
        n = self.params.points_per_case
        n_band = int(round(bias_at_epoch(self.params, epoch) * n))
        points = np.empty((len(case_indices), n, 3), dtype=np.float32)
        targets = np.empty((len(case_indices), n), dtype=np.float32)
        for b, case in enumerate(case_indices):
            rng = self.rng(epoch, case)
            shape, band_size = self.store.shape(case), self.store.band_size(case)
            k = n_band if band_size else 0
            cells = (self.store.band_at(case, rng.integers(0, band_size, k)) if k  # mapped for this call only
                     else np.zeros((0, 3), dtype=np.int64))
            points[b, :k] = _cell_points(cells, shape, rng, self.params.jitter)
            points[b, k:] = rng.uniform(-1.0, 1.0, (n - k, 3))
            targets[b] = self.store.foreground_at(case, cell_index(points[b], shape))  # mapped for this call only
        return points, targets


class MinedCases(Protocol):
    """Where a mining pass's voxels are kept (:class:`~nearfix_lib.field.store.MinedVoxels`, on disk):
    per case a count and the flat indices, and the pass a checkpoint names."""

    def count(self, case: int) -> int: ...

    def flat(self, case: int) -> np.ndarray: ...

    def state(self) -> dict: ...

    def load_state(self, state: dict) -> None: ...


class ClassBalancedSampler(_CaseStreams):
    """Class-balanced points and integer labels for the unified multi-class fit.

    The cases live in a :class:`LabelStore`, their mined voxels in ``mined``
    (:class:`~nearfix_lib.field.store.MinedVoxels`, on disk; needed when ``params.mined`` > 0): a
    batch maps the label crop, the cumulative class counts, the band and the mined voxels of each
    of its cases while it draws from them, and lets them go. ``store.classes`` are the label values the
    model learns; label values not listed read as 0 (background). Labels are label-map values, not
    channel numbers: the caller maps them onto its output channels through :attr:`classes`.
    """

    def __init__(self, store: LabelStore, params: BalancedSamplingParams, seed: int,
                 mined: MinedCases | None = None):
        super().__init__(seed)
        if len(store) == 0:
            raise ValueError("ClassBalancedSampler needs at least one case")
        if params.mined and mined is None:
            raise ValueError("sampling.mined > 0 needs a MinedVoxels folder for the mining passes")
        self.classes = [int(c) for c in store.classes]
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be a non-empty list of distinct labels, got {self.classes}")
        if min(self.classes) < 1 or max(self.classes) > 255:
            raise ValueError(f"class labels must lie in 1..255, got {self.classes}")
        if store.dilation_radius != params.dilation_radius:
            raise ValueError(f"the store's band has radius {store.dilation_radius}, the sampling "
                             f"{params.dilation_radius}: rebuild the store")
        self.params = params
        self.store = store
        self._lut = np.zeros(256, dtype=np.int64)
        self._lut[self.classes] = self.classes
        self.mined_voxels = mined

    def mined_count(self, case: int) -> int:
        """How many voxels of case ``case`` the last mining pass found (0 before one)."""
        return self.mined_voxels.count(case) if self.mined_voxels is not None else 0

    def mined_flat(self, case: int) -> np.ndarray:
        """Flat indices of case ``case``'s mined voxels; read only where :meth:`mined_count` is positive."""
        if self.mined_voxels is None:
            raise RuntimeError("no mining pass has run: mined_count is 0 for every case")
        return self.mined_voxels.flat(case)

    def state_dict(self) -> dict:
        """The streams' seed and which mining pass the draws come from (its voxels stay on disk)."""
        return {**super().state_dict(), **(self.mined_voxels.state() if self.mined_voxels is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.mined_voxels is not None:
            self.mined_voxels.load_state(state)

    def __len__(self) -> int:
        return len(self.store)

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
            rng = self.rng(epoch, case)
            shape = self.store.shape(case)
            volume = self.store.labels(case)  # mapped for this case only
            cumulative = self.store.cumulative(case)
            rows = volume.reshape(-1, shape[2])
            parts = [_cell_points(_draw_class(rows, cumulative[k], c, p.positives_per_class, rng, shape),
                                  shape, rng, jitter)
                     for k, c in enumerate(self.classes) if self.store.present(case, c)]
            n_neg = n - p.positives_per_class * len(parts)
            band_size = self.store.band_size(case)
            n_band = (n_neg - n_neg // 2) if band_size else 0
            found = self.mined_count(case)
            n_mined = min(p.mined, n_band) if found else 0
            if n_band - n_mined:
                picked = self.store.band_at(case, rng.integers(0, band_size, n_band - n_mined))
                parts.append(_cell_points(picked, shape, rng, jitter))
            if n_mined:  # mapped for this case only, like the store's arrays
                flat = self.mined_flat(case)[rng.integers(0, found, n_mined)]
                parts.append(_cell_points(np.stack(np.unravel_index(flat, shape), axis=-1), shape, rng, jitter))
            parts.append(rng.uniform(-1.0, 1.0, (n_neg - n_band, 3)))
            points[b] = np.concatenate(parts, axis=0)
            cells = cell_index(points[b], shape)
            labels[b] = self._lut[volume[cells[:, 0], cells[:, 1], cells[:, 2]]]
            del volume, cumulative, rows  # unmapped before the next case
        return points, labels
