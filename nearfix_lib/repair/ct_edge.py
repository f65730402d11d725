"""A repaired class's boundary placed where the CT shows the edge (stage 1's M^ref, ``stage1.ct_edge``).

Why: a coronary 2-6 voxels wide has most of its voxels at its boundary, and that is where an automatic
label errs. A field fitted to such labels learns where their boundary tends to lie, not where the
lumen ends; the CT shows it. In a contrast-filled vessel the lumen's edge lies where the intensity is
halfway between the lumen and what surrounds it (the half-maximum criterion of CT vessel measurement:
a blurred step crosses its midpoint at the step). So, within ``band_vox`` voxels of the repaired
boundary, a voxel is in where the CT is above the local midpoint between the lumen's mean (the
repaired mask) and its surroundings' mean (a two-voxel shell outside it, the other classes' voxels
left out). Both means are local, Gaussian-weighted over ``window_mm`` (normalised convolution), since
the contrast falls along a tree and differs between a proximal segment beside fat and a distal one on
the myocardium; one threshold per case would cut the distal vessels away.

Which lumen level (``lumen_level``): a vessel 2-4 voxels wide is mostly its partial-volume rim, voxels
part lumen, part fat, whose CT lies between the two. Their mean, over the whole mask, is well below the
lumen's, so the midpoint is too low and the edge is placed outside the lumen: on the tuning seeds such
repairs held up to 1.3 x the truth's voxels. ``core`` reads the lumen's level from the mask's voxels at or
above its local mean instead (its core, the rim left out). Whether the CT is clear enough is still asked
of the whole mask's contrast: selecting the brighter voxels raises their mean by about 0.8 of the noise,
which on a faint CT would pass the gate on the noise alone.

Where the CT cannot place the edge, the repair's boundary stays: where the local half contrast is
below ``min_contrast_noise`` times the CT's noise (a faint distal branch, a poorly enhanced scan), a
voxel's side of the midpoint is the noise's, not the anatomy's. The noise is the robust spread (MAD) of
differences between voxels 1 mm apart in the shell: beyond a typical scanner's blur, so neighbours'
correlation does not hide it; the tissue edges it crosses make it, if anything, an over-estimate, and
the gate errs towards leaving the repair alone.

Only the band changes: which vessels there are, and how they connect, stays the repair's (the class's
clean-up runs again afterwards, in :func:`nearfix_lib.stages.stage1.mref_of`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nearfix_lib.core.config import CTEdgeParams
from nearfix_lib.field.sampling import boundary_band

SHELL_VOX = 2  # the surroundings: this many voxels outside the mask (the lumen's partial-volume rim and beyond)
NOISE_STEP_MM = 1.0  # voxels this far apart for the noise: beyond a CT's blur, their noise is independent
EDGE_PREFIX = "edge_"  # the scores' columns of EdgeReport
_FACE = ndimage.generate_binary_structure(3, 1)


@dataclass
class EdgeReport:
    """What :func:`snap_to_edge` changed, for the per-case scores (``edge_*`` columns): users without a
    truth read there whether the CT placed the boundary (``decided``) and how clearly (``contrast_noise``)."""

    added: int  # voxels the CT put in
    removed: int  # voxels the CT took out
    decided: float  # share of the band's voxels where the CT was clear enough to decide
    contrast_noise: float  # the median over the mask of the local half contrast / noise

    def columns(self) -> dict:
        return {f"{EDGE_PREFIX}{name}": value for name, value in dataclasses.asdict(self).items()}


def noise_level(ct: np.ndarray, region: np.ndarray, spacing: Sequence[float]) -> float:
    """The CT's noise (HU, a standard deviation) in ``region``: the MAD of differences between voxels
    :data:`NOISE_STEP_MM` apart along the finest axis, both in the region, scaled to one voxel's spread."""
    axis = int(np.argmin(spacing))
    step = max(1, round(NOISE_STEP_MM / float(spacing[axis])))
    ahead, behind = [slice(None)] * 3, [slice(None)] * 3
    ahead[axis], behind[axis] = slice(step, None), slice(None, -step)
    pairs = region[tuple(ahead)] & region[tuple(behind)]  # empty where the axis is no longer than the step
    if not pairs.any():
        return float("nan")
    diffs = ct[tuple(ahead)][pairs].astype(np.float64) - ct[tuple(behind)][pairs]
    return float(1.4826 * np.median(np.abs(diffs - np.median(diffs))) / np.sqrt(2.0))


def local_mean(ct: np.ndarray, where: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    """The Gaussian-weighted mean of ``ct`` over the voxels ``where``, at every voxel (normalised
    convolution; NaN where the window, truncated at 4 sigma, holds none of them)."""
    weight = ndimage.gaussian_filter(where.astype(np.float32), sigma_vox, mode="constant")
    total = ndimage.gaussian_filter(np.where(where, ct, 0).astype(np.float32), sigma_vox, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def lumen_core_level(ct: np.ndarray, mask: np.ndarray, whole: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    """The lumen's local level from its core: the Gaussian-weighted mean of ``ct`` over the voxels of
    ``mask`` at or above ``whole`` (the local mean over all of ``mask``), where the window holds such a
    voxel; else ``whole``."""
    core = local_mean(ct, mask & (ct >= whole), sigma_vox)
    return np.where(np.isfinite(core), core, whole)


def surroundings(mask: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The voxels within :data:`SHELL_VOX` face steps outside ``mask`` that ``allowed`` lets it reach:
    where a lumen's surroundings are measured (its partial-volume rim and beyond, other classes left out)."""
    return ndimage.binary_dilation(mask, _FACE, iterations=SHELL_VOX) & ~mask & allowed


def snap_to_edge(mask: np.ndarray, ct: np.ndarray, allowed: np.ndarray, spacing: Sequence[float],
                 params: CTEdgeParams) -> tuple[np.ndarray, EdgeReport]:
    """``mask`` with its boundary band (``params.band_vox`` voxels either side, within ``allowed``: the
    voxels the class may hold) decided by the CT ``ct`` (same grid) where it is clear enough; elsewhere
    as it was. A mask the CT cannot judge (empty, no surroundings, no noise estimate) comes back unchanged."""
    mask = np.asarray(mask, dtype=bool)
    unchanged = EdgeReport(0, 0, 0.0, float("nan"))
    if not mask.any():
        return mask, unchanged
    ct = np.asarray(ct, dtype=np.float32)
    allowed = np.asarray(allowed, dtype=bool) | mask
    shell = surroundings(mask, allowed)
    noise = noise_level(ct, shell, spacing)
    if not shell.any() or not noise > 0:
        return mask, unchanged
    sigma = [params.window_mm / float(s) for s in spacing]
    whole, around = local_mean(ct, mask, sigma), local_mean(ct, shell, sigma)
    half_contrast = 0.5 * (whole - around)
    clear = half_contrast >= params.min_contrast_noise * noise  # NaN (no lumen or surroundings near): False
    lumen = whole if params.lumen_level == "mask" else lumen_core_level(ct, mask, whole, sigma)
    band = boundary_band(mask, params.band_vox, border_is_surface=False) & allowed
    decided = band & clear
    snapped = np.where(decided, ct > lumen - 0.5 * (lumen - around), mask)
    inside = half_contrast[mask]
    inside = inside[np.isfinite(inside)]  # NaN: no surroundings within the window
    return snapped, EdgeReport(added=int(np.count_nonzero(snapped & ~mask)),
                               removed=int(np.count_nonzero(mask & ~snapped)),
                               decided=float(np.count_nonzero(decided) / max(np.count_nonzero(band), 1)),
                               contrast_noise=float(np.median(inside) / noise) if inside.size else float("nan"))
