"""Pieces of a broken tree joined along the CT's lumen (stage 1's M^ref, ``stage1.ct_path``).

Why: where a segmenter lost a stretch of vessel, its label has a gap, and a field fitted to such labels
keeps it (the clean-up's straight bridges close the short ones, ``cleanup.bridge_gap_mm``). On a
coarse, anisotropic grid a tree is left in pieces 15-30 mm apart, each a true stretch of vessel,
while the contrast-filled lumen between them is in plain sight in the CT: in the worst case of the
robustness matrix's 0.9 x 0.9 x 1.2 mm tuning seeds, 1,282 of the vessel's 2,650 voxels were missing
from the repair, all but 5 of them above the lumen's midpoint in the CT, and 82 % of them given to
another class by the input (the myocardium 61 %, the right ventricle 16 %; docs/method.md). Following
that lumen is the classical minimal-path way to trace a coronary between two points; here its ends
are the pieces of the repair.

How: a voxel is lumen where the CT is above the midpoint between the mask's median and its
surroundings' (the two-voxel shell of :mod:`~nearfix_lib.repair.ct_edge`, other classes left out).
A path's cost is its length in mm, each mm outside the lumen counting ``off_lumen_weight`` times.
A class the input gives voxels to is a wall where its median CT is above that midpoint (a blood
pool, as bright as a lumen; two trees meet only through the aorta); a darker one (the myocardium)
is not, and its bright voxels are the vessel it swallowed. Prim's algorithm grows the trees — the
pieces that reach where the class arises (``roots``: each coronary tree leaves the aorta), largest
first, else the largest pieces, ``expected`` in all: the cheapest path from the joined set to a piece not yet joined
(:class:`skimage.graph.MCP_Geometric`) is taken while its cost is at most ``max_cost_mm``, with the
lumen within the tree's diameter of it that the lumen connects to it (a minimal path runs along one
side of a vessel), unless that would join two of those largest pieces: two trees stay two. A CT
whose lumen does not clear its noise by ``min_contrast_noise`` (a poorly enhanced scan) joins nothing.

The same CT tells a stretch of vessel from a segmenter's blob in fat or lung (``drop_dark``): a piece
beyond the trees whose median CT lies below the trees' surroundings (``dark_level`` of the lumen's
contrast over them) holds no lumen at all, and it goes before the clean-up's bridges tie it to a tree.
On the robustness matrix's tuning seeds every such island of the input was at -0.22 to -5.4 of that
contrast and every true stretch at -0.03 or above; one island of 171 voxels, 17 mm from the vessel,
bridged to a tree put the repair's HD95 at 7.9 mm over its input's 2.4 (docs/method.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import cc3d
import edt
import numpy as np
from scipy import ndimage
from skimage.graph import MCP_Geometric

from nearfix_lib.core.config import CTPathParams
from nearfix_lib.repair.ct_edge import noise_level, surroundings

PATH_PREFIX = "path_"  # the scores' columns of PathReport
_FACE = ndimage.generate_binary_structure(3, 1)


@dataclass
class PathReport:
    """What :func:`join_along_lumen` did, for the per-case scores (``path_*`` columns): how many pieces
    it joined to the tree, the voxels it added, and the lumen's half contrast over the CT's noise (NaN:
    nothing to join, or no surroundings to measure); and the voxels :func:`drop_dark_pieces` took away."""

    joined: int = 0
    added: int = 0
    contrast_noise: float = float("nan")
    dark_dropped: int = 0  # voxels of the pieces drop_dark_pieces took away (before the clean-up)

    def columns(self) -> dict:
        return {f"{PATH_PREFIX}{name}": value for name, value in dataclasses.asdict(self).items()}


def tree_radius_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """A thin class's typical radius in mm: twice its volume over its surface area (a tube's r = 2V/A),
    the area counted as the voxel faces between the mask and the rest, which overcount a tube's by
    4/pi (the mean of |cos| + |sin| of a boundary's angle in its cross-section)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    area = 0.0
    for axis in range(3):
        padded = np.pad(mask, [(1, 1) if a == axis else (0, 0) for a in range(3)]).astype(np.int8)
        area += np.count_nonzero(np.diff(padded, axis=axis)) * float(np.prod(np.delete(spacing, axis)))
    return 2.0 * np.count_nonzero(mask) * float(np.prod(spacing)) / area * 4.0 / np.pi if area else 0.0


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, _FACE, border_value=0)


def lumen_like(ct: np.ndarray, neighbours: np.ndarray, midpoint: float) -> np.ndarray:
    """Where ``neighbours`` (the input's labels of the other classes, 0 elsewhere) gives a voxel to a
    class whose median CT is above the lumen's ``midpoint``: a blood pool, as bright as the lumen, in
    which the CT cannot tell a vessel from its neighbour."""
    values = np.unique(neighbours[neighbours > 0])
    bright = [v for v in values if np.median(ct[neighbours == v]) > midpoint]
    return np.isin(neighbours, bright)


def _widened(path: np.ndarray, lumen: np.ndarray, spacing: Sequence[float], reach_mm: float) -> np.ndarray:
    """The voxels ``path`` ((m, 3) indices) and the ``lumen`` within ``reach_mm`` of it that connect to
    it through the lumen: a minimal path runs along one side of a vessel, and the vessel is the lumen
    around it, not the bright specks nearby."""
    reach = np.ceil(reach_mm / np.asarray(spacing, dtype=np.float64)).astype(int) + 1
    lo = np.maximum(path.min(axis=0) - reach, 0)
    hi = np.minimum(path.max(axis=0) + reach + 1, lumen.shape)
    window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    on_path = np.zeros(tuple(hi - lo), dtype=bool)
    on_path[tuple((path - lo).T)] = True
    near = edt.edt(np.ascontiguousarray(~on_path), anisotropy=tuple(map(float, spacing)), black_border=False)
    grown = cc3d.connected_components(on_path | ((near <= reach_mm) & lumen[window]), connectivity=26)
    out = np.zeros(lumen.shape, dtype=bool)
    out[window] = np.isin(grown, np.unique(grown[on_path]))
    return out


def tree_pieces(labels: np.ndarray, expected: int, roots: np.ndarray | None = None) -> np.ndarray:
    """The labels of the ``expected`` pieces of ``labels`` (components 1..n) that are trees: those holding
    a voxel of ``roots`` first, then the others, each group largest first. A tree's largest piece is not
    always its root's: where the segmenter broke a tree near its ostium, a distal stretch can outgrow
    it, and taking the two largest pieces then takes one tree twice and grows the other into it."""
    sizes = np.bincount(labels.ravel())[1:]
    rooted = np.zeros(sizes.size, dtype=bool)
    if roots is not None:
        rooted[np.unique(labels[roots & (labels > 0)]) - 1] = True
    order = np.lexsort((np.arange(sizes.size), -sizes, ~rooted))  # rooted first, then larger, then lower label
    return order[:expected] + 1


def lumen_contrast(ct: np.ndarray, mask: np.ndarray, allowed: np.ndarray,
                   spacing: Sequence[float]) -> tuple[float, float, float] | None:
    """The CT's median in ``mask`` (the lumen), in its surroundings that ``allowed`` lets it reach
    (:func:`~nearfix_lib.repair.ct_edge.surroundings`) and the CT's noise there; None where there are no
    surroundings or no noise to measure."""
    shell = surroundings(mask, allowed)
    if not shell.any():
        return None
    noise = noise_level(ct, shell, spacing)
    if not noise > 0:
        return None
    return float(np.median(ct[mask])), float(np.median(ct[shell])), noise


def drop_dark_pieces(mask: np.ndarray, ct: np.ndarray, neighbours: np.ndarray, expected: int,
                     spacing: Sequence[float], params: CTPathParams,
                     roots: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``mask`` (bool) without its pieces beyond the ``expected`` trees (:func:`tree_pieces`) whose median CT
    is below the trees' surroundings' by more than ``params.dark_level`` of the lumen's contrast over them:
    a blob the segmenter put in fat or lung is no contrast-filled lumen, and the clean-up's bridges would
    tie it to a tree. The CT decides only where the lumen's half contrast clears its noise by
    ``dark_min_contrast_noise`` (a stricter gate than the paths'); ``neighbours`` (the input's other
    classes) is left out of the surroundings. Returns the mask and the voxels taken away."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    if n <= expected or expected < 1:
        return mask, 0
    ct = np.asarray(ct, dtype=np.float32)
    mains = tree_pieces(labels, expected, roots)
    measured = lumen_contrast(ct, np.isin(labels, mains), (neighbours == 0) | mask, spacing)
    if measured is None:
        return mask, 0
    lumen_hu, around_hu, noise = measured
    if 0.5 * (lumen_hu - around_hu) < params.dark_min_contrast_noise * noise:
        return mask, 0
    others = np.setdiff1d(np.arange(1, n + 1), mains)
    medians = np.asarray(ndimage.median(ct, labels, others), dtype=np.float64)
    dark = others[medians < around_hu + params.dark_level * (lumen_hu - around_hu)]
    if dark.size == 0:
        return mask, 0
    gone = np.isin(labels, dark)
    return mask & ~gone, int(np.count_nonzero(gone))


def join_along_lumen(mask: np.ndarray, ct: np.ndarray, neighbours: np.ndarray, expected: int,
                     spacing: Sequence[float], params: CTPathParams,
                     roots: np.ndarray | None = None) -> tuple[np.ndarray, PathReport]:
    """``mask`` (bool) with its pieces beyond its ``expected`` trees joined to them along the CT's
    lumen (``ct``, same grid), never through the voxels ``neighbours`` (the input's labels of the other
    classes, 0 where none) gives to a class as bright as the lumen (:func:`lumen_like`): a darker class
    (the myocardium) may hide a stretch of vessel the segmenter gave it, and its bright voxels are that
    stretch. The trees are the pieces holding a voxel of ``roots`` (where the class arises; None: none
    known), largest first, then the largest others (:func:`tree_pieces`). Returns the mask and a
    :class:`PathReport`; a mask of at most ``expected`` pieces, or one whose CT shows no clear lumen,
    comes back unchanged."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != ct.shape or mask.shape != neighbours.shape:
        raise ValueError(f"join_along_lumen: mask {mask.shape}, ct {ct.shape}, neighbours {neighbours.shape} "
                         "differ in shape")
    allowed = (neighbours == 0) | mask
    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    if n <= expected or expected < 1:
        return mask, PathReport()
    ct = np.asarray(ct, dtype=np.float32)
    measured = lumen_contrast(ct, mask, allowed, spacing)
    if measured is None:
        return mask, PathReport()
    lumen_hu, around_hu, noise = measured
    half = 0.5 * (lumen_hu - around_hu)
    report = PathReport(contrast_noise=half / noise)
    if half < params.min_contrast_noise * noise:
        return mask, report
    lumen = ct > lumen_hu - half
    allowed |= ~lumen_like(ct, np.where(mask, 0, neighbours), lumen_hu - half)
    costs = np.where(allowed, np.where(lumen, 1.0, params.off_lumen_weight), -1.0)  # negative: impassable
    radius = tree_radius_mm(mask, spacing)
    mains = tree_pieces(labels, expected, roots)
    seeds = tuple(np.array([np.argwhere(labels == m)[0] for m in mains]).T)  # a voxel of each tree
    out, trees = mask.copy(), labels  # trees: the components of out
    pending = set(range(1, n + 1)) - set(mains.tolist())
    mcp = MCP_Geometric(costs, sampling=tuple(map(float, spacing)))  # find_costs starts afresh on each call
    while pending:
        joined = np.isin(trees, trees[seeds])
        ends = _surface(np.isin(labels, sorted(pending)))
        cumulative, _ = mcp.find_costs(np.argwhere(_surface(joined)), np.argwhere(ends), find_all_ends=False)
        reached = np.where(ends, cumulative, np.inf)
        end = np.unravel_index(int(np.argmin(reached)), reached.shape)
        if not reached[end] <= params.max_cost_mm:
            break
        candidate = out | _widened(np.asarray(mcp.traceback(end)), lumen & allowed, spacing, 2.0 * radius)
        parts = cc3d.connected_components(candidate, connectivity=26)
        if np.unique(parts[seeds]).size < mains.size:  # the path, or its widening, would join two trees
            pending.discard(int(labels[end]))  # it stays in the mask as it was, apart
            continue
        now_joined = {int(p) for p in np.unique(labels[np.isin(parts, parts[seeds])])} & pending
        if not now_joined:  # cannot happen with a 26-connected path; never loop on it
            pending.discard(int(labels[end]))
            continue
        report.joined += len(now_joined)
        pending -= now_joined
        out, trees = candidate, parts
    report.added = int(np.count_nonzero(out & ~mask))
    return out, report
