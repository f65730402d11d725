"""Regions of interest, grids and the affine chain that ties every array to the original image.

One convention, written once:

* **Axis order.** Arrays are indexed (i, j, k) in NIfTI voxel order, exactly as nibabel loads
  them. Points are rows (i, j, k) in that same order — never (x, y, z) of a plotting library and
  never ``nonzero()`` output re-interpreted in another order.
* **Original voxel space** of a case: continuous coordinates whose integers are voxel centres.
  The case affine maps it to world millimetres.
* **ROI** (:class:`Box`): an integer half-open voxel range ``[lo, hi)`` of the original grid; it
  covers the continuous box ``[lo - 0.5, hi - 0.5]`` (voxel edges).
* **ROI-normalised space**: that continuous box mapped onto ``[-1, 1]^3``, axis by axis. An
  implicit model is queried here, so a model fitted on an R^3 crop can be evaluated on any grid
  over the same box — the R^3 grid, or the original voxels directly — by composing affines.
* **Grid** (:class:`Grid`): a voxel lattice with ``to_original``, the 4x4 affine from its own
  voxel indices to original voxel coordinates. Its world affine is ``case_affine @ to_original``.
  An R^3 grid over a box puts its voxel centres at the centres of R equal cells of the box
  (``align_corners=False`` semantics of ``torch.nn.functional.grid_sample``).

``torch.nn.functional.grid_sample`` reads the last axis of its sampling grid as (W, H, D), i.e.
(k, j, i) for a volume stored (i, j, k): use :func:`to_grid_sample_order` at that boundary and
nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Triple = tuple[int, int, int]


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along axes 0, 1, 2."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 3) points through a 4x4 affine."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ affine[:3, :3].T + affine[:3, 3]


def to_grid_sample_order(points):
    """Reverse the last axis: (i, j, k) -> (k, j, i), the order ``grid_sample`` expects."""
    return points[..., [2, 1, 0]]


# -- boxes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Box:
    """Half-open voxel range ``[lo, hi)`` of an original grid."""

    lo: Triple
    hi: Triple

    def __post_init__(self) -> None:
        if any(h <= lo for lo, h in zip(self.lo, self.hi)):
            raise ValueError(f"empty box lo={self.lo} hi={self.hi}")

    @property
    def shape(self) -> Triple:
        return tuple(int(h - lo) for lo, h in zip(self.lo, self.hi))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(lo, h) for lo, h in zip(self.lo, self.hi))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        """Plain ints (a box found by numpy holds numpy ints, which YAML and torch's safe loader refuse)."""
        return {"lo": [int(v) for v in self.lo], "hi": [int(v) for v in self.hi]}

    @classmethod
    def from_dict(cls, d: dict) -> Box:
        return cls(tuple(int(v) for v in d["lo"]), tuple(int(v) for v in d["hi"]))  # type: ignore[arg-type]


def bounding_box(mask: np.ndarray) -> Box | None:
    """Tight box of the True voxels, or None for an empty mask."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        if hit.size == 0:
            return None
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    return Box(tuple(lo), tuple(hi))  # type: ignore[arg-type]


def expand_box(box: Box, margin: float, shape: Sequence[int], spacing: Sequence[float] | None = None,
               unit: str = "mm") -> Box:
    """Grow a box by ``margin`` (mm, converted per axis with ``spacing``, or voxels), clipped."""
    if unit == "mm":
        if spacing is None:
            raise ValueError("a margin in mm needs the voxel spacing")
        pad = np.ceil(margin / np.asarray(spacing, dtype=np.float64) - 1e-9).astype(int)
    elif unit == "vox":
        pad = np.full(3, int(np.ceil(margin)))
    else:
        raise ValueError(f"margin unit must be 'mm' or 'vox', got {unit!r}")
    lo = np.maximum(np.asarray(box.lo) - pad, 0)
    hi = np.minimum(np.asarray(box.hi) + pad, np.asarray(shape))
    return Box(tuple(int(v) for v in lo), tuple(int(v) for v in hi))  # type: ignore[arg-type]


def roi_box(mask: np.ndarray, margin: float, spacing: Sequence[float], unit: str = "mm") -> Box | None:
    """Bounding box of ``mask`` plus a margin, clipped to the volume; None if the mask is empty."""
    box = bounding_box(mask)
    return None if box is None else expand_box(box, margin, mask.shape, spacing, unit)


# -- the affine chain -------------------------------------------------------------------------

def normalised_to_original(box: Box) -> np.ndarray:
    """4x4 affine: ROI-normalised [-1, 1]^3 -> original voxel coordinates."""
    size = np.asarray(box.shape, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = np.diag(size / 2.0)
    out[:3, 3] = np.asarray(box.lo, dtype=np.float64) - 0.5 + size / 2.0
    return out


def original_to_normalised(box: Box) -> np.ndarray:
    return np.linalg.inv(normalised_to_original(box))


def normalised_to_world(box: Box, case_affine: np.ndarray) -> np.ndarray:
    return np.asarray(case_affine, dtype=np.float64) @ normalised_to_original(box)


@dataclass(frozen=True)
class Grid:
    """A voxel lattice tied to the original grid by ``to_original`` (grid index -> original voxel)."""

    shape: Triple
    to_original: np.ndarray

    def world_affine(self, case_affine: np.ndarray) -> np.ndarray:
        return np.asarray(case_affine, dtype=np.float64) @ self.to_original

    def index_points(self) -> np.ndarray:
        """(N, 3) voxel indices of the lattice in C order (i slowest), matching ``reshape``."""
        axes = [np.arange(n, dtype=np.float64) for n in self.shape]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)

    def original_points(self) -> np.ndarray:
        return apply_affine(self.to_original, self.index_points())

    def normalised_points(self, box: Box) -> np.ndarray:
        """Where each lattice voxel centre lies in ``box``'s ROI-normalised coordinates."""
        return apply_affine(original_to_normalised(box) @ self.to_original, self.index_points())

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "to_original": np.asarray(self.to_original).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        return cls(tuple(int(v) for v in d["shape"]), np.asarray(d["to_original"], dtype=np.float64))  # type: ignore[arg-type]


def original_grid(shape: Sequence[int]) -> Grid:
    """The case's own voxel lattice (its map to original voxels is the identity by definition)."""
    return Grid(tuple(int(s) for s in shape), np.eye(4))  # type: ignore[arg-type]


def roi_grid(box: Box, resolution: int | Sequence[int]) -> Grid:
    """An R^3 (or R_i x R_j x R_k) lattice whose cells tile ``box`` evenly."""
    res = np.broadcast_to(np.asarray(resolution, dtype=np.int64), (3,))
    if np.any(res < 1):
        raise ValueError(f"resolution must be positive, got {resolution}")
    # grid index g -> normalised n = -1 + (2 g + 1) / R
    grid_to_norm = np.eye(4)
    grid_to_norm[:3, :3] = np.diag(2.0 / res)
    grid_to_norm[:3, 3] = -1.0 + 1.0 / res
    return Grid(tuple(int(r) for r in res), normalised_to_original(box) @ grid_to_norm)  # type: ignore[arg-type]


# -- resampling and paste-back -------------------------------------------------------------------

def resample(array: np.ndarray, grid: Grid, order: int, cval: float = 0.0) -> np.ndarray:
    """Values of an original-grid ``array`` at ``grid``'s voxel centres.

    ``order=0`` (nearest) for label maps — classes are never blended; ``order=1`` for CT.
    Points outside the array take ``cval``; points on the half-voxel rim of the volume take the
    edge voxel, as they lie inside its cell.
    """
    src = np.asarray(array)
    out_dtype = src.dtype if order == 0 else np.float32
    data = src if order == 0 else src.astype(np.float32, copy=False)
    res = ndimage.affine_transform(data, grid.to_original, output_shape=grid.shape, order=order,
                                   mode="nearest", prefilter=False, output=out_dtype)
    outside = _outside_mask(grid, np.asarray(src.shape))
    if outside is not None:
        res[outside] = cval
    return res


def _outside_mask(grid: Grid, shape: np.ndarray) -> np.ndarray | None:
    """Lattice voxels whose centre falls outside the source volume's cells, if any do."""
    lin = grid.to_original
    if not np.allclose(lin[:3, :3], np.diag(np.diag(lin[:3, :3]))):
        pts = apply_affine(lin, grid.index_points())
        bad = np.any((pts < -0.5) | (pts > shape - 0.5), axis=1)
        return bad.reshape(grid.shape) if bad.any() else None
    masks = []
    for axis in range(3):
        coords = lin[axis, axis] * np.arange(grid.shape[axis]) + lin[axis, 3]
        masks.append((coords < -0.5) | (coords > shape[axis] - 0.5))
    if not any(m.any() for m in masks):
        return None
    return masks[0][:, None, None] | masks[1][None, :, None] | masks[2][None, None, :]


def resample_mask(mask: np.ndarray, grid: Grid) -> np.ndarray:
    """A binary mask on ``grid`` by linear interpolation thresholded at 0.5.

    Down-sampling with nearest neighbour drops or breaks thin structures (coronary arteries)
    depending on where the lattice happens to fall; the interpolated occupancy is the fairer
    reading of "is this point inside".
    """
    return resample(np.asarray(mask, dtype=np.float32), grid, order=1) >= 0.5


def paste_back(roi_array: np.ndarray, grid: Grid, box: Box, original_shape: Sequence[int],
               order: int = 0, fill: float = 0) -> np.ndarray:
    """Put an array defined on ``grid`` (an ROI lattice over ``box``) back on the original grid.

    Only original voxels inside ``box`` are sampled (every one of them lies inside the lattice's
    cells); the rest is ``fill``. Labels use ``order=0``.
    """
    src = np.asarray(roi_array)
    out_dtype = src.dtype if order == 0 else np.float32
    shift = np.eye(4)
    shift[:3, 3] = box.lo
    to_grid = np.linalg.inv(grid.to_original) @ shift  # box-local original voxel -> grid index
    data = src if order == 0 else src.astype(np.float32, copy=False)
    inner = ndimage.affine_transform(data, to_grid, output_shape=box.shape, order=order,
                                     mode="nearest", prefilter=False, output=out_dtype)
    out = np.full(tuple(int(s) for s in original_shape), fill, dtype=out_dtype)
    out[box.slices] = inner
    return out
