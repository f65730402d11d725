"""Two cheap classical repairs of a noisy label map, to measure the implicit repair against.

If a Gaussian blur or a morphological closing fixed the labels as well as three stages of
implicit models, the models would not be worth their GPU hours; the report puts all of them
side by side on the same cases.

* :func:`gaussian_argmax` — every class's indicator (background included) is smoothed with a
  Gaussian of ``sigma_mm`` (anisotropic in voxels, isotropic in millimetres) and each voxel takes
  the class with the largest smoothed value: stair-cases round off, islands and holes smaller
  than about the kernel vanish, thin structures thinner than it vanish too.
* :func:`closing_largest` — per class, a binary closing with a ball of ``radius_mm`` (bridges small
  gaps, fills small holes and dents), then the class table's expected number of largest
  components; the classes are fused by the table's priority, as stage 2 does.

Both keep the input's shape and never write; the caller saves with the source affine.
"""

from __future__ import annotations

from collections.abc import Sequence

import edt
import numpy as np
from scipy import ndimage

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.config import BaselineParams
from nearfix_lib.core.geometry import Box, bounding_box
from nearfix_lib.core.io import threads_per_worker
from nearfix_lib.repair.cleanup import keep_largest_components


def _check(labels: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3-D label map, got shape {labels.shape}")
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
    return labels, spacing


def _work_box(labels: np.ndarray, margin_vox: np.ndarray) -> Box | None:
    """The foreground's bounding box grown by ``margin_vox``: nothing outside it can change."""
    box = bounding_box(labels > 0)
    if box is None:
        return None
    lo = tuple(max(0, int(a - m)) for a, m in zip(box.lo, margin_vox))
    hi = tuple(min(int(s), int(b + m)) for b, m, s in zip(box.hi, margin_vox, labels.shape))
    return Box(lo, hi)  # type: ignore[arg-type]


def gaussian_argmax(labels: np.ndarray, table: ClassTable, spacing: Sequence[float], sigma_mm: float) -> np.ndarray:
    """Per-class Gaussian smoothing of the one-hot map, then argmax (background competes too).

    Works class by class with a running maximum, so memory is three volumes, not one per class.
    Each class is smoothed over its own box grown by more than the kernel's reach (``truncate`` 4
    sigma): outside it the smoothed value is exactly 0 and cannot win, and inside it every term of
    the separable sums is what the whole volume gives (the terms outside are zeros either way), so
    the result is the whole-volume one to the bit at a fraction of the work (a real case's classes
    fill a tenth of its heart box each).
    """
    labels, spacing = _check(labels, spacing)
    sigma = sigma_mm / spacing
    reach = np.ceil(4 * sigma) + 1
    box = _work_box(labels, reach)
    out = np.zeros(labels.shape, dtype=np.uint8)
    if box is None:
        return out
    crop = labels[box.slices]
    best = ndimage.gaussian_filter((crop == 0).astype(np.float32), sigma, mode="nearest")
    winner = np.zeros(crop.shape, dtype=np.uint8)
    for cls in table:
        own = _work_box((crop == cls.index).astype(np.uint8), reach)
        if own is None:
            continue
        smoothed = ndimage.gaussian_filter((crop[own.slices] == cls.index).astype(np.float32), sigma, mode="nearest")
        best_here, winner_here = best[own.slices], winner[own.slices]  # views: written through
        better = smoothed > best_here
        winner_here[better] = cls.index
        best_here[better] = smoothed[better]
    out[box.slices] = winner
    return out


def _squared_offsets(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """The squared lengths (mm^2) of the voxel offsets in the box holding the ball, centred, in the one
    float64 arithmetic :func:`ball` and :func:`within_ball` share."""
    half = np.floor(radius_mm / spacing).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids)


def ball(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """A structuring element: the voxels within ``radius_mm`` of the centre (anisotropic in voxels)."""
    return _squared_offsets(radius_mm, spacing) <= radius_mm ** 2


# Relative width of the band around the ball's rim where the EDT's float32 squared distances are not
# trusted to decide (their error is ~1e-6 relative): voxels there are decided offset by offset.
_RIM_BAND = 1e-4


def within_ball(feature: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """The voxels that have a voxel of ``feature`` at an offset in ``ball(radius_mm, spacing)``:
    ``binary_dilation(feature, ball)``, at the cost of one Euclidean distance transform whatever
    the radius (a ball of 3 mm at 0.35 mm holds ~1,900 voxels, and the dilation visits each of
    them per voxel), on the cores this process may use.

    The squared distance decides every voxel but those whose distance lies within a relative
    ``_RIM_BAND`` of the radius: offsets exactly on the rim (4 x 0.75 mm = 3 mm) are common, and
    the EDT's float32 may put them on either side. Those voxels are in the dilation when a feature
    voxel lies at one of the ball's offsets near its rim, measured in the ball's own arithmetic, so
    the two agree to the voxel.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if not feature.any():
        return np.zeros(feature.shape, dtype=bool)
    r2 = radius_mm ** 2
    band = _RIM_BAND * r2
    d2 = edt.edtsq(~feature, anisotropy=tuple(spacing), black_border=False, parallel=threads_per_worker(1))
    inside = d2 < r2 - band
    unsure = np.argwhere((d2 >= r2 - band) & (d2 <= r2 + band))
    if len(unsure):
        length2 = _squared_offsets(radius_mm, spacing)
        half = (np.asarray(length2.shape) - 1) // 2
        # a feature voxel in the ball of an unsure voxel is at least r2 - 2 band away (the EDT's
        # error is far below the band): only the ball's offsets that far out need looking at
        rim = np.argwhere((length2 <= r2) & (length2 >= r2 - 2 * band)) - half
        shape = np.asarray(feature.shape)
        hit = np.zeros(len(unsure), dtype=bool)
        for offset in rim:
            source = unsure - offset
            valid = np.all((source >= 0) & (source < shape), axis=1)
            hit[valid] |= feature[tuple(source[valid].T)]
        inside[tuple(unsure[hit].T)] = True
    return inside


def close_with_ball(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """``binary_closing(mask, ball(radius_mm, spacing), border_value=0)`` through :func:`within_ball`:
    dilation, then erosion as the complement of the dilated complement (outside the array counts as
    background, as ``border_value=0`` has it: a one-voxel frame of it is added for the erosion)."""
    dilated = np.pad(within_ball(mask, radius_mm, spacing), 1)
    return ~within_ball(~dilated, radius_mm, spacing)[1:-1, 1:-1, 1:-1]


def closing_largest(labels: np.ndarray, table: ClassTable, spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """Per class: closing with a ball of ``radius_mm``, then the expected number of largest components;
    fused by the table's priority (as :func:`~nearfix_lib.repair.fusion.fuse_priority`, lowest first).

    Each class is worked on its own box grown by the ball's reach, inside the foreground's box: the
    closed mask and its components lie there, so this is the whole-volume result without a
    whole-volume mask per class (ten of them are 720 MB for a real case).
    """
    labels, spacing = _check(labels, spacing)
    margin = np.floor(radius_mm / spacing).astype(int) + 1  # the ball's half extent, and one
    out = np.zeros(labels.shape, dtype=np.uint8)
    region = _work_box(labels, margin)
    if region is None:
        return out
    crop, fused = labels[region.slices], out[region.slices]  # a view: written through
    for cls in reversed(table.by_priority()):  # lowest priority first, so winners overwrite
        mask = crop == cls.index
        box = _work_box(mask.astype(np.uint8), margin)
        if box is None:
            continue
        own = mask[box.slices]
        kept = keep_largest_components(close_with_ball(own, radius_mm, spacing) | own, cls.expected_components)
        fused[box.slices][kept] = cls.index
    return out


BASELINES = {"gaussian": "Gaussian smoothing of the one-hot map + argmax",
             "closing": "closing + expected largest components, priority fusion"}


def run_baseline(name: str, labels: np.ndarray, table: ClassTable, spacing: Sequence[float],
                 params: BaselineParams) -> np.ndarray:
    if name == "gaussian":
        return gaussian_argmax(labels, table, spacing, params.gaussian_sigma_mm)
    if name == "closing":
        return closing_largest(labels, table, spacing, params.closing_radius_mm)
    raise ValueError(f"unknown baseline {name!r}; known: {list(BASELINES)}")
