"""Batches drawn on the fit's device: class-balanced points, labels and teacher values (stage 3) and
band points with binary targets (stage 1), in torch.

:class:`~nearfix_lib.field.sampling.ClassBalancedSampler` draws on the host in numpy and reads each
case's arrays from the memory-mapped store; at the real case size that costs ~240 ms of CPU per step
of 8 cases, while a GPU step takes a few milliseconds, so the GPU would idle behind the host. Here the
same draws run as tensor operations on the fit's device:

* the arrays a batch reads (label crop, per-row class counts, band indices, stage-1 teachers) are
  copied to the device once per case and kept in a :class:`DeviceCaseCache` bounded in megabytes
  (least recently used cases leave first), through pinned host memory when the device is CUDA;
* each case's draws come from a ``torch.Generator`` on the device keyed by (seed, epoch, case),
  as the host sampler's streams are: any process draws any case alone and gets what every other
  process would, so a torchrun rank draws only its share of a batch and a resumed fit draws
  the same points with no generator state to carry;
* nothing is read back to the host while a batch is drawn (counts come from the store's metadata),
  so the host only queues work;
* the layout of a case's points, the label of the cell containing each float32 point and the
  zero-padded trilinear teacher values are those of the host path (:meth:`ClassBalancedSampler.sample`,
  :meth:`BandSampler.sample`, :func:`~nearfix_lib.field.unified.teacher_values`); only the random
  numbers differ, since torch's generators are not numpy's. So a fit's points depend on where its batches are built
  (``sampling.batches``), and, on the device, on the device's kind (CPU and CUDA generators differ).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nearfix_lib.core.config import BatchPlacement
from nearfix_lib.field.sampling import _JITTER_MARGIN, BandSampler, ClassBalancedSampler, bias_at_epoch
from nearfix_lib.field.store import PROBABILITY_LEVELS, CaseStore, Teacher
from nearfix_lib.field.train import to_device


def device_batches(params: BatchPlacement, device: str | torch.device) -> bool:
    """Whether a fit on ``device`` draws its batches there (``batches``: "auto" means on CUDA)."""
    return params.batches == "device" or (params.batches == "auto" and torch.device(device).type == "cuda")


def device_cache_mb(params: BatchPlacement, device: str | torch.device) -> float:
    """The cache budget: ``device_cache_mb``, else half the device's free memory (CUDA) or 2048 MB."""
    if params.device_cache_mb > 0:
        return float(params.device_cache_mb)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**21
    return 2048.0


def case_seed(seed: int, epoch: int, case: int) -> int:
    """A 63-bit seed for the (seed, epoch, case) stream, hashed by numpy's SeedSequence so that nearby
    keys give unrelated streams."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(case)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass
class DeviceTeachers:
    """A case's stage-1 teachers on the device, stacked so that one look-up reads them all: their uint8
    maps flattened one after another (``start`` where each begins, ``size`` its (i, j, k) shape), the
    affines from whole-heart-normalised to each ROI's normalised space, and the heads they teach."""

    channels: torch.Tensor  # int64 (T,)
    maps: torch.Tensor  # uint8 (sum of the maps' voxels,)
    start: torch.Tensor  # int64 (T,)
    size: torch.Tensor  # int64 (T, 3)
    from_heart: torch.Tensor  # float64 (T, 4, 4)

    @classmethod
    def stack(cls, teachers: Sequence[Teacher], device: torch.device) -> DeviceTeachers:
        """From the store's (memory-mapped) teachers, read once and copied to the device once."""
        sizes = np.array([t.prob.size for t in teachers], dtype=np.int64)
        parts = (np.array([t.channel for t in teachers], dtype=np.int64),
                 np.concatenate([np.asarray(t.prob).reshape(-1) for t in teachers]),
                 np.concatenate([[0], np.cumsum(sizes)[:-1]]),
                 np.array([t.prob.shape for t in teachers], dtype=np.int64),
                 np.array([t.from_heart for t in teachers], dtype=np.float64))
        return cls(*(to_device(torch.from_numpy(part), device) for part in parts))


@dataclass
class DeviceClasses:
    """What a case's class-balanced draws read, laid out so that one binary search serves all classes:
    ``ranks`` holds 0 and then, class after class, the class's cumulative voxel counts over the (i, j)
    rows (:meth:`CaseStore.cumulative`) plus the voxels of the classes before it, so that a rank among
    all classes' voxels finds its class's row. Per present class (store order): its store row, label
    value, voxels before it and voxel count."""

    ranks: torch.Tensor  # int32 (1 + C * I * J,)
    row: torch.Tensor  # int64 (P,)
    value: torch.Tensor  # int64 (P,)
    before: torch.Tensor  # int64 (P,)
    voxels: torch.Tensor  # float64 (P,)

    @classmethod
    def of(cls, cumulative: np.ndarray, classes: Sequence[int], device: torch.device) -> DeviceClasses:
        counts = np.asarray(cumulative[:, -1], dtype=np.int64)
        before = np.concatenate([[0], np.cumsum(counts)[:-1]])
        if counts.sum() >= 2**31:
            raise ValueError(f"a case of {counts.sum()} labelled voxels: more than int32 counts hold")
        ranks = np.concatenate([[0], (np.asarray(cumulative, dtype=np.int64) + before[:, None]).reshape(-1)])
        present = np.nonzero(counts)[0]
        parts = (torch.from_numpy(ranks.astype(np.int32)), torch.from_numpy(present),
                 torch.as_tensor(np.asarray(classes, dtype=np.int64)[present]), torch.from_numpy(before[present]),
                 torch.from_numpy(counts[present].astype(np.float64)))
        return cls(*(to_device(part, device) for part in parts))


@dataclass
class DeviceCase:
    """One case's arrays on the device (see :class:`CaseStore` for their meaning) and its grid's extent
    (float64, (3,)), kept there so that a step copies nothing to the device."""

    shape: tuple[int, int, int]
    extent: torch.Tensor
    labels: torch.Tensor  # uint8 (I, J, K)
    band: torch.Tensor  # int32 (band_size,) flat indices, as stored
    classes: DeviceClasses | None  # None: a binary store (stage 1's), no class draws
    teachers: DeviceTeachers | None  # None: no teachers (stage 1, or a case without any)

    @property
    def nbytes(self) -> int:
        tensors = [self.labels, self.band] + ([self.classes.ranks] if self.classes else []) + (
            [self.teachers.maps] if self.teachers else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A (memory-mapped) array read into memory and copied to ``device`` (:func:`train.to_device`)."""
    return to_device(torch.from_numpy(np.array(array, copy=True)), device)


class DeviceCaseCache:
    """Cases' arrays on the device, the most recently used ones kept within ``budget_mb``.

    With room for every case (an H200 holds ~1,000 real cases' arrays of ~80 MB each) every array
    crosses to the device once per fit; with less, a step copies the cases it lacks, which costs
    transfer time but never host memory beyond the case at hand. A case larger than the whole
    budget is still loaded, for the step that needs it, and dropped after.
    """

    def __init__(self, store: CaseStore, device: str | torch.device, budget_mb: float):
        self.store = store
        self.device = torch.device(device)
        self.budget = float(budget_mb) * 2**20
        self._cases: OrderedDict[int, DeviceCase] = OrderedDict()
        self._bytes = 0  # of the cases held
        self.loads = 0  # cases copied to the device so far (a budget too small shows here)

    def _load(self, case: int) -> DeviceCase:
        self.loads += 1
        shape = self.store.shape(case)
        extent = to_device(torch.tensor(shape, dtype=torch.float64), self.device)
        band = _to_device(self.store.band(case), self.device)
        if self.store.spec.binary:  # stage 1's: the foreground as 0/1 labels, no class counts, no teachers
            foreground = _to_device(self.store.foreground(case).view(np.uint8), self.device)
            return DeviceCase(shape, extent, foreground, band, None, None)
        stored = self.store.teachers(case)
        return DeviceCase(shape, extent, _to_device(self.store.labels(case), self.device), band,
                          DeviceClasses.of(self.store.cumulative(case), self.store.spec.classes, self.device),
                          DeviceTeachers.stack(stored, self.device) if stored else None)

    def __getitem__(self, case: int) -> DeviceCase:
        case = int(case)
        if case in self._cases:
            self._cases.move_to_end(case)
            return self._cases[case]
        entry = self._load(case)
        self._cases[case] = entry
        self._bytes += entry.nbytes
        while len(self._cases) > 1 and self._bytes > self.budget:
            self._bytes -= self._cases.popitem(last=False)[1].nbytes
        return entry

    def __len__(self) -> int:
        return len(self._cases)


def _case_stream(cache: DeviceCaseCache, seed: int, epoch: int, case: int) -> tuple[DeviceCase, torch.Generator]:
    """A case's cached arrays and its (seed, epoch, case) generator on the device."""
    entry = cache[case]
    gen = torch.Generator(device=cache.device)
    gen.manual_seed(case_seed(seed, epoch, case))
    return entry, gen


def _cell_points(cells: torch.Tensor, shape: torch.Tensor, gen: torch.Generator, jitter: bool) -> torch.Tensor:
    """Normalised float64 points inside integer cells (n, 3): uniform within the cell, or its centre
    (:func:`nearfix_lib.field.sampling._cell_points`)."""
    idx = cells.to(torch.float64)
    if jitter:
        offset = torch.rand(cells.shape, generator=gen, device=cells.device, dtype=torch.float64) - 0.5
        idx = idx + offset * (1.0 - 2.0 * _JITTER_MARGIN)
    return (2.0 * idx + 1.0) / shape - 1.0


def _unravel(flat: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    jk = shape[1] * shape[2]
    return torch.stack([flat // jk, (flat % jk) // shape[2], flat % shape[2]], dim=1)


def _draw_classes(classes: DeviceClasses, labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """(P * n, 3) int64 cells, ``n`` per present class in store order, each drawn uniformly with
    replacement from its class in the (I, J, K) ``labels``: a rank among the class's voxels, its (i, j)
    row by one binary search for all classes (:class:`DeviceClasses`), its k by scanning that row
    (:func:`nearfix_lib.field.sampling._draw_class`, one class at a time)."""
    _, n_j, n_k = labels.shape
    if n_k > torch.iinfo(torch.int16).max:
        raise ValueError(f"class draws count rows of up to 32,767 voxels in int16, got rows of {n_k}")
    draws = torch.rand((len(classes.voxels), n), generator=gen, device=labels.device, dtype=torch.float64)
    rank = ((draws * classes.voxels[:, None]).to(torch.int64) + classes.before[:, None]).reshape(-1)
    # ranks[at] <= rank < ranks[at + 1]: ``at`` is (store row) * I*J + the (i, j) row holding the voxel
    at = torch.searchsorted(classes.ranks, rank.to(torch.int32), right=True) - 1
    row = at - (classes.row * (labels.numel() // n_k)).repeat_interleave(n)
    within = rank - classes.ranks[at]  # its rank among the class's voxels of that row
    value = classes.value.repeat_interleave(n)
    # the first voxel where the row's running count of the class passes ``within``, by a binary search
    # per row (int16 counts: rows of up to 32,767 voxels; half the time of comparing whole rows)
    counts = torch.cumsum(labels.reshape(-1, n_k)[row] == value[:, None], dim=1, dtype=torch.int16)
    kk = torch.searchsorted(counts, within[:, None].to(torch.int16), right=True)[:, 0]
    return torch.stack([row // n_j, row % n_j, kk], dim=1)


def cell_index(points: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """(n, 3) int64 cells containing float32 normalised points, in float64 and clipped onto a grid of
    ``extent`` (float64 (3,)) cells (:func:`nearfix_lib.field.sampling.cell_index`)."""
    cells = torch.floor((points.to(torch.float64) + 1.0) * 0.5 * extent).to(torch.int64)
    return torch.minimum(cells.clamp(min=0), extent.to(torch.int64) - 1)


def stacked_trilinear(maps: torch.Tensor, start: torch.Tensor, size: torch.Tensor,
                      points: torch.Tensor) -> torch.Tensor:
    """Values (T, N) float32 of T grids stored flat one after another in ``maps`` (grid t begins at
    ``start[t]`` and has the (i, j, k) shape ``size[t]``), each at its own normalised float32 points
    (T, 3, N): the 8 corners of each point only, zero outside, in the float32 arithmetic of
    ``grid_sample``'s CPU kernel (:func:`nearfix_lib.field.unified.trilinear_zero_padded`, which this
    matches to float32 rounding: the corners are summed in another order).

    All grids and all 8 corners in a few large operations, laid out with the points last so that
    every operation runs over contiguous rows: on a GPU the host only launches them (a case's ten
    teachers one by one took ten times the launches), and on the CPU the contiguous layout ran ~2x
    faster than a point-major one with broadcast corner axes."""
    shape = size[:, :, None]  # (T, 3, 1)
    x = ((points + 1.0) * shape.to(torch.float32) - 1.0) / 2.0
    lower = torch.floor(x)
    lo = lower.to(torch.int64)
    # per axis the lower and the upper corner (T, 2, 3, N) and their weights, 0 for a corner off the
    # grid: a product with one off-grid axis is then 0, as grid_sample's zero padding wants
    corner = torch.stack([lo, lo + 1], dim=1)
    w = torch.stack([lower + 1.0 - x, x - lower], dim=1) * ((corner >= 0) & (corner < shape[:, None]))
    corner = torch.minimum(corner.clamp(min=0), shape[:, None] - 1)  # a readable voxel where the weight is 0
    weights = (w[:, None, None, :, 2] * w[:, None, :, None, 1]) * w[:, :, None, None, 0]  # (T, 2, 2, 2, N): i, j, k
    # each axis's share of the flat index first (T, 2, N), then two broadcast sums over all 8 corners
    stride_j = size[:, 2, None, None]
    along_i = start[:, None, None] + corner[:, :, 0] * (size[:, 1, None, None] * stride_j)
    flat = along_i[:, :, None, None] + (corner[:, :, 1] * stride_j)[:, None, :, None] + corner[:, None, None, :, 2]
    values = maps[flat].to(torch.float32)
    return (values * weights).reshape(len(size), 8, -1).sum(dim=1)


def teacher_values(teachers: DeviceTeachers | None, points: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Soft targets (N, n_heads) at whole-heart-normalised float32 points; 0 outside a class ROI."""
    out = torch.zeros((len(points), n_heads), dtype=torch.float32, device=points.device)
    if teachers is not None:
        affine = teachers.from_heart
        inside = (affine[:, :3, :3] @ points.T.to(torch.float64) + affine[:, :3, 3:]).to(torch.float32)  # (T, 3, N)
        values = stacked_trilinear(teachers.maps, teachers.start, teachers.size, inside)
        out[:, teachers.channels] = values.T * (1.0 / PROBABILITY_LEVELS)
    return out


class DeviceBalancedSampler:
    """:class:`ClassBalancedSampler`'s draws, made on ``device`` from the cases' cached arrays.

    It shares the host sampler's parameters, classes and mined voxels (set by the mining pass on
    the host), so that a fit switches between host and device batches without other changes.
    """

    def __init__(self, host: ClassBalancedSampler, store: CaseStore, device: str | torch.device, cache_mb: float):
        self.host = host
        self.cache = DeviceCaseCache(store, device, cache_mb)
        self.device = self.cache.device
        lut = np.zeros(256, dtype=np.int64)
        lut[host.classes] = host.classes
        self._lut = torch.from_numpy(lut).to(self.device)

    def sample_case(self, case: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, DeviceCase]:
        """One case's points (N, 3) float32 and labels (N,) int64, in the host sampler's layout, and its
        cached arrays (for the teacher look-up)."""
        p = self.host.params
        jitter = p.jitter and (p.jitter_epochs == 0 or epoch <= p.jitter_epochs)
        store = self.host.store
        entry, gen = _case_stream(self.cache, self.host.seed, epoch, case)
        shape = entry.extent
        classes = entry.classes  # a label store's: the classes the case has, counted on the host at load
        present = 0 if classes is None else len(classes.voxels)
        parts = []
        if classes is not None and present:
            parts.append(_cell_points(_draw_classes(classes, entry.labels, p.positives_per_class, gen),
                                      shape, gen, jitter))
        n_neg = self.host.points_per_case - p.positives_per_class * present
        band_size = store.band_size(case)
        n_band = (n_neg - n_neg // 2) if band_size else 0
        found = self.host.mined_count(case)
        n_mined = min(p.mined, n_band) if found else 0
        if n_band - n_mined:
            rows = torch.randint(0, band_size, (n_band - n_mined,), generator=gen, device=self.device)
            parts.append(_cell_points(_unravel(entry.band[rows].to(torch.int64), entry.shape), shape, gen, jitter))
        if n_mined:  # the pass's flat indices, mapped on the host and copied (int32: 4 bytes a voxel)
            flat = to_device(torch.from_numpy(np.array(self.host.mined_flat(case))), self.device)
            rows = torch.randint(0, found, (n_mined,), generator=gen, device=self.device)
            parts.append(_cell_points(_unravel(flat[rows].to(torch.int64), entry.shape), shape, gen, jitter))
        uniform = torch.rand((n_neg - n_band, 3), generator=gen, device=self.device, dtype=torch.float64)
        parts.append(uniform * 2.0 - 1.0)
        points = torch.cat(parts).to(torch.float32)
        cells = cell_index(points, shape)
        labels = self._lut[entry.labels[cells[:, 0], cells[:, 1], cells[:, 2]].to(torch.int64)]
        return points, labels, entry


class DeviceBandSampler:
    """:class:`~nearfix_lib.field.sampling.BandSampler`'s draws (stage 1: band and uniform points, binary
    targets), made on ``device`` from the cases' cached foreground and band."""

    def __init__(self, host: BandSampler, store: CaseStore, device: str | torch.device, cache_mb: float):
        self.host = host
        self.cache = DeviceCaseCache(store, device, cache_mb)
        self.device = self.cache.device

    def sample(self, case_indices: Sequence[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Points (B, N, 3) float32 and targets (B, N) float32, in the host sampler's layout: per case
        the band points first (``bias_at_epoch`` of them; none for an empty band), then uniform ones."""
        p = self.host.params
        n = p.points_per_case
        n_band = int(round(bias_at_epoch(p, epoch) * n))
        points, targets = [], []
        for case in case_indices:
            entry, gen = _case_stream(self.cache, self.host.seed, epoch, int(case))
            shape = entry.extent
            band_size = self.host.store.band_size(int(case))
            k = n_band if band_size else 0
            rows = torch.randint(0, max(band_size, 1), (k,), generator=gen, device=self.device)
            band = _cell_points(_unravel(entry.band[rows].to(torch.int64), entry.shape), shape, gen, p.jitter)
            uniform = torch.rand((n - k, 3), generator=gen, device=self.device, dtype=torch.float64) * 2.0 - 1.0
            case_points = torch.cat([band, uniform]).to(torch.float32)
            cells = cell_index(case_points, shape)
            points.append(case_points)
            targets.append(entry.labels[cells[:, 0], cells[:, 1], cells[:, 2]].to(torch.float32))
        return torch.stack(points), torch.stack(targets)
