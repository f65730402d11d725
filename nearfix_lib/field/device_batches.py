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
from nearfix_lib.field.store import PROBABILITY_LEVELS, CaseStore
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
class DeviceTeacher:
    channel: int
    prob: torch.Tensor  # uint8 (R_i, R_j, R_k)
    from_heart: torch.Tensor  # float64 4x4


@dataclass
class DeviceCase:
    """One case's arrays on the device (see :class:`CaseStore` for their meaning)."""

    shape: tuple[int, int, int]
    labels: torch.Tensor  # uint8 (I, J, K)
    cumulative: torch.Tensor  # int32 (C, I*J), as stored
    band: torch.Tensor  # int32 (band_size,) flat indices, as stored
    teachers: list[DeviceTeacher]

    @property
    def nbytes(self) -> int:
        tensors = [self.labels, self.cumulative, self.band] + [t.prob for t in self.teachers]
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
        if self.store.spec.binary:  # stage 1's: the foreground as 0/1 labels, no class counts, no teachers
            foreground = _to_device(self.store.foreground(case).view(np.uint8), self.device)
            return DeviceCase(self.store.shape(case), foreground,
                              torch.zeros((0, 0), dtype=torch.int32, device=self.device),
                              _to_device(self.store.band(case), self.device), [])
        teachers = [DeviceTeacher(t.channel, _to_device(t.prob, self.device),
                                  torch.as_tensor(t.from_heart, dtype=torch.float64, device=self.device))
                    for t in self.store.teachers(case)]
        return DeviceCase(self.store.shape(case), _to_device(self.store.labels(case), self.device),
                          _to_device(self.store.cumulative(case), self.device),
                          _to_device(self.store.band(case), self.device), teachers)

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


def _case_stream(cache: DeviceCaseCache, seed: int, epoch: int,
                 case: int) -> tuple[DeviceCase, torch.Generator, torch.Tensor]:
    """A case's cached arrays, its (seed, epoch, case) generator on the device and its grid shape (float64)."""
    entry = cache[case]
    gen = torch.Generator(device=cache.device)
    gen.manual_seed(case_seed(seed, epoch, case))
    return entry, gen, torch.tensor(entry.shape, dtype=torch.float64, device=cache.device)


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


def _draw_class(case: DeviceCase, k: int, c: int, voxels: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 3) int64 cells drawn uniformly with replacement from class ``c`` (store row ``k``, ``voxels``
    of them, known on the host: no read-back): a rank among the class's voxels, its (i, j) row by binary
    search in the counts, its k by scanning that row (:func:`nearfix_lib.field.sampling._draw_class`)."""
    cumulative = case.cumulative[k]
    rank = torch.randint(0, voxels, (n,), generator=gen, device=cumulative.device, dtype=cumulative.dtype)
    row = torch.searchsorted(cumulative, rank, right=True)
    before = torch.where(row > 0, cumulative[(row - 1).clamp(min=0)], torch.zeros_like(row))
    hits = (case.labels.reshape(-1, case.shape[2])[row] == c).to(torch.int32)
    kk = torch.argmax((torch.cumsum(hits, dim=1) > (rank - before)[:, None]).to(torch.int8), dim=1)
    return torch.stack([row // case.shape[1], row % case.shape[1], kk], dim=1).to(torch.int64)


def cell_index(points: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(n, 3) int64 cells containing float32 normalised points, in float64 and clipped onto the grid
    (:func:`nearfix_lib.field.sampling.cell_index`)."""
    res = torch.tensor(shape, dtype=torch.float64, device=points.device)
    cells = torch.floor((points.to(torch.float64) + 1.0) * 0.5 * res).to(torch.int64)
    return torch.minimum(cells.clamp(min=0), res.to(torch.int64) - 1)


_CORNERS = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.int64)


def trilinear_zero_padded(grid: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Values (N,) float32 of a 3-D uint8 or float ``grid`` at normalised (i, j, k) float32 points: the
    8 corners of each point only, zero outside, in the float32 arithmetic of ``grid_sample``'s CPU kernel
    (:func:`nearfix_lib.field.unified.trilinear_zero_padded`, which this matches to float32 rounding:
    the corners are summed in another order). All 8 corners at once: a few large operations, not 8 x 12
    small ones, which is what a device (and the CPU's per-operation overhead) wants."""
    size = torch.tensor(grid.shape, dtype=torch.int64, device=points.device)
    x = ((points + 1.0) * size.to(torch.float32) - 1.0) / 2.0
    lower = torch.floor(x)
    upper_w, lower_w = lower + 1.0 - x, x - lower  # weights of the lower and of the upper corner
    w = torch.stack([upper_w, lower_w], dim=1)  # (N, 2 corners, 3 axes)
    weights = (w[:, None, None, :, 2] * w[:, None, :, None, 1]) * w[:, :, None, None, 0]  # (N, 2, 2, 2): i, j, k
    idx = lower.to(torch.int64)[:, None, :] + _CORNERS.to(points.device)  # (N, 8, 3)
    inside = ((idx >= 0) & (idx < size)).all(dim=2)
    idx = torch.where(inside[..., None], idx, 0)
    values = grid.reshape(-1)[(idx[..., 0] * size[1] + idx[..., 1]) * size[2] + idx[..., 2]].to(torch.float32)
    return (values * weights.reshape(-1, 8) * inside).sum(dim=1)


def teacher_values(teachers: Sequence[DeviceTeacher], points: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Soft targets (N, n_heads) at whole-heart-normalised float32 points; 0 outside a class ROI."""
    out = torch.zeros((len(points), n_heads), dtype=torch.float32, device=points.device)
    for t in teachers:
        inside = (points.to(torch.float64) @ t.from_heart[:3, :3].T + t.from_heart[:3, 3]).to(torch.float32)
        out[:, t.channel] = trilinear_zero_padded(t.prob, inside) * (1.0 / PROBABILITY_LEVELS)
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
        entry, gen, shape = _case_stream(self.cache, self.host.seed, epoch, case)
        counts = store.histogram(case)
        parts = [_cell_points(_draw_class(entry, k, c, int(counts[c]), p.positives_per_class, gen), shape, gen, jitter)
                 for k, c in enumerate(self.host.classes) if counts[c]]
        n_neg = self.host.points_per_case - p.positives_per_class * len(parts)
        band_size = store.band_size(case)
        n_band = (n_neg - n_neg // 2) if band_size else 0
        found = self.host.mined_count(case)
        n_mined = min(p.mined, n_band) if found else 0
        if n_band - n_mined:
            rows = torch.randint(0, band_size, (n_band - n_mined,), generator=gen, device=self.device)
            parts.append(_cell_points(_unravel(entry.band[rows].to(torch.int64), entry.shape), shape, gen, jitter))
        if n_mined:  # the pass's flat indices, mapped on the host and copied (int32: 4 bytes a voxel)
            flat = to_device(torch.from_numpy(np.array(self.host.mined_voxels.flat(case))), self.device)
            rows = torch.randint(0, found, (n_mined,), generator=gen, device=self.device)
            parts.append(_cell_points(_unravel(flat[rows].to(torch.int64), entry.shape), shape, gen, jitter))
        uniform = torch.rand((n_neg - n_band, 3), generator=gen, device=self.device, dtype=torch.float64)
        parts.append(uniform * 2.0 - 1.0)
        points = torch.cat(parts).to(torch.float32)
        cells = cell_index(points, entry.shape)
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
            entry, gen, shape = _case_stream(self.cache, self.host.seed, epoch, int(case))
            band_size = self.host.store.band_size(int(case))
            k = n_band if band_size else 0
            rows = torch.randint(0, max(band_size, 1), (k,), generator=gen, device=self.device)
            band = _cell_points(_unravel(entry.band[rows].to(torch.int64), entry.shape), shape, gen, p.jitter)
            uniform = torch.rand((n - k, 3), generator=gen, device=self.device, dtype=torch.float64) * 2.0 - 1.0
            case_points = torch.cat([band, uniform]).to(torch.float32)
            cells = cell_index(case_points, entry.shape)
            points.append(case_points)
            targets.append(entry.labels[cells[:, 0], cells[:, 1], cells[:, 2]].to(torch.float32))
        return torch.stack(points), torch.stack(targets)
