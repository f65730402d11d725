"""Connected-component clean-up of a repaired binary mask (stage 1's M^ref, one class at a time).

A decoder with limited capacity repairs the shape but can leave small detached blobs where the
field crosses the threshold by accident, or split off a thin tip. The class table says how many
26-connected components a clean case has (two for the aorta inside a cardiac field of view, two
coronary trees, ...), so the clean-up keeps at most that many of the largest and can also drop
fragments by absolute volume (mm^3, so the rule means the same at any spacing) or relative to
the largest component. It never empties a non-empty mask: the largest component always stays,
whatever the rules say, because an empty class is a worse error than an oversized one. For a
thin vessel the clean-up can first join pieces across short gaps (:func:`bridge_voxels`; stage 2
uses the same tubes on the fused map), since a broken coronary is one tree, not several.

Components are ranked by size, ties broken by their first voxel in C order ((i, j, k)
lexicographic), so the result never depends on the labelling order of ``cc3d``. All work is done
on the mask's bounding box, which gives the same components (and the same enclosed cavities) as
the full array at a fraction of the cost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import cc3d
import edt
import fill_voids
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from nearfix_lib.core.config import CleanupParams
from nearfix_lib.core.geometry import Box, bounding_box, expand_box
from nearfix_lib.repair.ct_path import tree_pieces


@dataclass
class CleanupReport:
    """What :func:`clean_mask` changed, for the per-case metrics table.

    ``removed_components``/``removed_voxels`` count the components dropped by the rules;
    ``components_after`` is counted on the result, so it also reflects components merged by
    bridging or hole filling (an island inside a filled cavity); ``components_before`` is
    counted on the thresholded input, before bridging.
    """

    components_before: int
    components_after: int
    removed_components: int
    removed_voxels: int
    filled_voxels: int
    bridged_voxels: int = 0


@dataclass
class _Components:
    """Components of a mask inside its bounding box, with their size ranking."""

    box: Box
    labels: np.ndarray  # cc3d labels of the box crop, 0 = background
    sizes: np.ndarray  # voxels of component id + 1
    ranking: np.ndarray  # component ids (0-based) from largest to smallest, ties by first voxel

    def mask_of(self, keep: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """The full-size bool mask of the components flagged in ``keep`` (0-based ids)."""
        out = np.zeros(tuple(shape), dtype=bool)
        out[self.box.slices] = np.concatenate([[False], keep])[self.labels]
        return out


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 3:
        raise ValueError(f"clean-up needs a 3-D mask, got shape {mask.shape}")
    return mask


def _components(mask: np.ndarray, connectivity: int) -> _Components | None:
    """Label ``mask`` inside its bounding box; None for an empty mask."""
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    box = bounding_box(mask)
    if box is None:
        return None
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask[box.slices]),
                                          connectivity=connectivity, return_N=True)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    # C-order position of each component's first voxel: the crop preserves the (i, j, k)
    # lexicographic order of the full volume, so this tie-break is the full volume's
    fg = np.flatnonzero(flat)
    first = np.full(n + 1, flat.size, dtype=np.int64)
    np.minimum.at(first, flat[fg], fg)
    ranking = np.lexsort((first[1:], -sizes))
    return _Components(box, labels, sizes, ranking)


def keep_largest_components(mask: np.ndarray, n: int, connectivity: int = 26) -> np.ndarray:
    """The ``n`` (>= 1) largest components of ``mask``; equal sizes ranked by first voxel."""
    if n < 1:
        raise ValueError(f"keep at least one component, got n={n}")
    mask = _as_mask(mask)
    comps = _components(mask, connectivity)
    if comps is None:
        return mask.copy()
    keep = np.zeros(comps.sizes.size, dtype=bool)
    keep[comps.ranking[:n]] = True
    return comps.mask_of(keep, mask.shape)


def drop_small_components(mask: np.ndarray, min_voxels: int, connectivity: int = 26) -> np.ndarray:
    """``mask`` without components of fewer than ``min_voxels`` voxels; the largest always stays."""
    mask = _as_mask(mask)
    comps = _components(mask, connectivity)
    if comps is None:
        return mask.copy()
    keep = comps.sizes >= min_voxels
    keep[comps.ranking[0]] = True
    return comps.mask_of(keep, mask.shape)


def _near_main(comps: _Components, main: np.ndarray, others: np.ndarray, spacing: np.ndarray,
               max_mm: float) -> np.ndarray:
    """For each component in ``others``: is it connected to ``main`` by a chain of hops <= ``max_mm``?

    Transitive on purpose: a coronary cut by several gaps is a chain of pieces, each near the
    next but not all near the two main trees. Islands far from every piece never join.
    """
    near = np.zeros(others.size, dtype=bool)
    if max_mm <= 0 or others.size == 0:
        return near
    kept = np.zeros(comps.sizes.size + 1, dtype=bool)
    kept[main + 1] = True
    while True:
        dist = edt.edt(np.ascontiguousarray(~kept[comps.labels]), anisotropy=tuple(spacing), black_border=False)
        closest = np.asarray(ndimage.minimum(dist, labels=comps.labels, index=others + 1))
        grown = (closest <= max_mm) & ~near
        if not grown.any():
            return near
        near |= grown
        kept[others[grown] + 1] = True


def _surface_points(cc: np.ndarray, n: int) -> list[np.ndarray]:
    """Per component, the (k, 3) indices of its voxels with a background face neighbour."""
    fg = cc > 0
    surf = fg & ~ndimage.binary_erosion(fg, border_value=0)
    idx = np.argwhere(surf)
    comp = cc[surf]
    order = np.argsort(comp, kind="stable")
    bounds = np.searchsorted(comp[order], np.arange(1, n + 2))
    return [idx[order[bounds[c]:bounds[c + 1]]] for c in range(n)]


def _segment_voxels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Voxels (m, 3) on the straight segment from voxel a to voxel b, ends included, 26-connected."""
    steps = int(np.abs(b - a).max()) + 1
    t = np.linspace(0.0, 1.0, max(steps, 2))[:, None]
    return np.unique(np.rint(a + t * (b - a)).astype(np.int64), axis=0)


def bridge_voxels(mask: np.ndarray, n_main: int, spacing: Sequence[float], max_gap_mm: float,
                  radius_vox: int) -> np.ndarray:
    """Tubes (bool, ``mask``'s shape) joining the pieces of ``mask`` to its ``n_main`` largest.

    A segmenter breaks thin vessels into pieces and a repair of their surfaces keeps the gaps.
    Prim's algorithm grows the main pieces: among the pieces not yet joined, the one closest to
    the joined set (surface voxel to surface voxel, in mm) is joined by a straight segment between
    those two voxels, while that distance is at most ``max_gap_mm``; farther pieces stay apart.
    The segments are thickened by ``radius_vox`` face-neighbour steps (0: a one-voxel line),
    clipped to the array. The result may overlap ``mask``; callers take ``& ~mask`` for the new voxels.
    """
    mask = _as_mask(mask)
    comps = _components(mask, 26)
    if comps is None:
        return np.zeros(mask.shape, dtype=bool)
    return _tubes(comps, mask.shape, n_main, np.asarray(spacing, dtype=np.float64), max_gap_mm, radius_vox)


def _tubes(comps: _Components, shape: Sequence[int], n_main: int, spacing: np.ndarray, max_gap_mm: float,
           radius_vox: int) -> np.ndarray:
    """:func:`bridge_voxels` on components already labelled (the clean-up has them at hand)."""
    out = np.zeros(tuple(shape), dtype=bool)
    n = comps.sizes.size
    if n <= n_main or max_gap_mm <= 0:
        return out
    surfaces = _surface_points(comps.labels, n)
    trees = [cKDTree(s * spacing) for s in surfaces]
    joined = set(comps.ranking[:n_main].tolist())
    segments = []
    while len(joined) < n:
        joined_points = np.concatenate([surfaces[i] for i in sorted(joined)])
        best = (np.inf, -1, None, None)
        for j in sorted(set(range(n)) - joined):
            d, nearest = trees[j].query(joined_points * spacing)
            k = int(np.argmin(d))
            if d[k] < best[0]:
                best = (float(d[k]), j, joined_points[k], surfaces[j][nearest[k]])
        gap, j, a, b = best
        if gap > max_gap_mm:
            break
        segments.append(_segment_voxels(a, b) + np.asarray(comps.box.lo))  # full-array indices
        joined.add(j)
    if not segments:
        return out
    # segments lie in the components' box; the tubes need radius_vox more on every side
    lo = np.maximum(np.asarray(comps.box.lo) - radius_vox, 0)
    hi = np.minimum(np.asarray(comps.box.hi) + radius_vox, shape)
    window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    local = np.zeros(tuple(hi - lo), dtype=bool)
    local[tuple((np.concatenate(segments) - lo).T)] = True
    if radius_vox > 0:
        local = ndimage.binary_dilation(local, structure=ndimage.generate_binary_structure(3, 1),
                                        iterations=radius_vox)
    out[window] = local
    return out


def joined_through(mask: np.ndarray, joiner: np.ndarray) -> np.ndarray:
    """``mask`` plus every 26-connected piece of ``joiner`` outside it that touches two or more of its
    components: where ``joiner`` (a field's own decision) connects pieces that ``mask`` holds apart,
    its voxels in between join them; what only widens one piece, or lies apart from every piece,
    is not added. Both masks are boolean and of one shape."""
    mask, joiner = _as_mask(mask), _as_mask(joiner)
    if mask.shape != joiner.shape:
        raise ValueError(f"joined_through: mask {mask.shape} and joiner {joiner.shape} differ in shape")
    box = bounding_box(mask | joiner)
    if box is None:
        return mask.copy()
    sl = box.slices
    pieces, n_pieces = cc3d.connected_components(mask[sl], connectivity=26, return_N=True)
    if n_pieces < 2:
        return mask.copy()
    gaps = cc3d.connected_components(joiner[sl] & ~mask[sl], connectivity=26, out_dtype=np.uint32)
    labels = pieces.astype(np.uint32)
    labels[gaps > 0] = gaps[gaps > 0] + np.uint32(n_pieces)  # pieces 1..n, gap pieces above: one label image
    # pieces never touch pieces, nor gap pieces each other (each set is its own components), so every
    # edge joins a piece and a gap piece, the larger label, once: its count is the pieces it touches
    touched = Counter(max(edge) for edge in cc3d.region_graph(labels, connectivity=26))
    joining = [gap for gap, n in touched.items() if n >= 2]
    out = mask.copy()
    if joining:
        out[sl] |= np.isin(labels, np.asarray(joining, dtype=np.uint32))
    return out


def clean_mask(mask: np.ndarray, expected: int, spacing: Sequence[float],
               params: CleanupParams) -> tuple[np.ndarray, CleanupReport]:
    """Apply the clean-up rules (26-connectivity) to one class's binary mask.

    ``expected`` is the class's expected component count (``LabelClass.expected_components``),
    ``spacing`` the voxel size in mm along (i, j, k). The rules combine: a component survives if
    it passes every enabled rule, and the largest survives regardless. Hole filling, if enabled,
    runs last on what survived. Returns a bool mask of the input's shape and a report.
    """
    mask = _as_mask(mask)
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
    if (params.keep_expected or params.bridge_gap_mm > 0) and expected < 1:
        raise ValueError(f"expected component count must be >= 1, got {expected}")
    comps = _components(mask, 26)
    if comps is None:
        return mask.copy(), CleanupReport(0, 0, 0, 0, 0)
    n_input = int(comps.sizes.size)
    bridged = 0
    if params.bridge_gap_mm > 0:
        tubes = _tubes(comps, mask.shape, expected, spacing, params.bridge_gap_mm, params.bridge_radius_vox) & ~mask
        bridged = int(tubes.sum())
        if bridged:
            mask = mask | tubes
            comps = _components(mask, 26)

    sizes = comps.sizes
    keep = np.ones(sizes.size, dtype=bool)
    if params.min_component_mm3 > 0:
        keep &= sizes * float(np.prod(spacing)) >= params.min_component_mm3
    if params.min_fraction_of_largest > 0:
        keep &= sizes >= params.min_fraction_of_largest * sizes.max()
    if params.keep_expected:
        beyond = comps.ranking[expected:]
        near = _near_main(comps, comps.ranking[:expected], beyond, spacing, params.keep_near_mm)
        keep[beyond[~near]] = False
    keep[comps.ranking[0]] = True
    out = comps.mask_of(keep, mask.shape)

    n_after = int(keep.sum())
    filled = 0
    if params.fill_holes:
        crop = out[comps.box.slices]
        solid = fill_voids.fill(np.ascontiguousarray(crop), in_place=False)
        filled = int(solid.sum() - crop.sum())
        if filled:
            out[comps.box.slices] = solid
            n_after = int(cc3d.connected_components(solid, connectivity=26, return_N=True)[1])
    report = CleanupReport(components_before=n_input, components_after=n_after,
                           removed_components=int((~keep).sum()),
                           removed_voxels=int(sizes[~keep].sum()), filled_voxels=filled, bridged_voxels=bridged)
    return out, report


def drop_unattached(mask: np.ndarray, attached: np.ndarray) -> tuple[np.ndarray, int]:
    """``mask`` without its components that hold no voxel of ``attached`` (where the class may lie: within
    its attachment distance of the classes it lies on); the largest stays whatever it touches, as in
    :func:`clean_mask`. A coronary piece far from the heart's surface and the aorta is an island of the
    segmenter, not a vessel (stage 2's distance rule, on the input's labels). Returns the mask and the
    voxels it dropped."""
    mask, attached = _as_mask(mask), _as_mask(attached)
    if mask.shape != attached.shape:
        raise ValueError(f"drop_unattached: mask {mask.shape} and attached {attached.shape} differ in shape")
    comps = _components(mask, 26)
    if comps is None:
        return mask.copy(), 0
    touching = np.zeros(comps.sizes.size + 1, dtype=bool)
    touching[np.unique(comps.labels[attached[comps.box.slices]])] = True
    keep = touching[1:]
    keep[comps.ranking[0]] = True
    return comps.mask_of(keep, mask.shape), int(comps.sizes[~keep].sum())


def drop_enclosed(mask: np.ndarray, enclosing: Sequence[tuple[np.ndarray, float]], expected: int, min_voxels: int = 1,
                  roots: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``mask`` without its pieces beyond the ``expected`` trees (:func:`~nearfix_lib.repair.ct_path.tree_pieces`)
    whose surroundings (two face steps out, the mask left out) lie more than its share in one region of
    ``enclosing`` ((voxels, share) pairs). The coronaries' regions: the input's voxels of the classes they
    do not lie on (a coronary runs on the heart's surface, in fat, the myocardium or beside the aorta, and a
    blob the segmenter put inside a chamber's labels is none of it), and the aorta's own, which they touch
    but never run inside (a coronary leaves it at its ostium, and a blob inside its labels is its blood; at
    the ostium a tree's stub has the aorta on one side only, so its share is its own). A piece under
    ``min_voxels`` (the clean-up's smallest volume) is left to the clean-up, which bridges or drops it: a
    few voxels' surroundings are their neighbourhood's, not a shape's (on a tuning case a 12-voxel stretch
    inside the myocardium's labels, taken, cost 0.021 Dice). Returns the mask and the voxels it dropped."""
    mask = _as_mask(mask)
    regions = [(_as_mask(region), float(share)) for region, share in enclosing]
    if any(region.shape != mask.shape for region, _ in regions):
        raise ValueError(f"drop_enclosed: mask {mask.shape} and regions {[r.shape for r, _ in regions]} "
                         "differ in shape")
    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    if n <= expected or expected < 1 or not regions:
        return mask.copy(), 0
    trees = set(tree_pieces(labels, expected, roots).tolist())
    out, dropped = mask.copy(), 0
    for piece, box in zip(range(1, n + 1), cc3d.statistics(labels)["bounding_boxes"][1:]):
        if piece in trees:
            continue
        grown = expand_box(Box(tuple(s.start for s in box), tuple(s.stop for s in box)), 2, mask.shape,
                           unit="vox").slices
        own = labels[grown] == piece
        if np.count_nonzero(own) < min_voxels:
            continue
        shell = ndimage.binary_dilation(own, iterations=2) & ~mask[grown]  # face steps
        if shell.any() and any(region[grown][shell].mean() > share for region, share in regions):
            out[grown] &= ~own
            dropped += int(own.sum())
    return out, dropped


def _parting_cut(labels: np.ndarray, join: int, n_pieces: int) -> np.ndarray:
    """The voxels of gap piece ``join`` (in ``labels``: pieces 1..n_pieces, gap pieces above) that part the
    pieces it touches: each of its voxels goes to the piece it reaches first inside the join (a geodesic
    Voronoi partition, :func:`skimage.segmentation.watershed` on a flat image), and the voxels with a
    neighbour of another piece's share are the cut, a layer about two voxels thick across the join
    where it is equally far from the pieces (the middle of the aorta between two ostia), not all of it."""
    from skimage.segmentation import watershed

    box = bounding_box(labels == join)
    lo = np.maximum(np.asarray(box.lo) - 2, 0)
    hi = np.minimum(np.asarray(box.hi) + 2, labels.shape)
    window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # the join and a rim: all the cut needs
    local = labels[window]
    inside = local == join
    cube = np.ones((3, 3, 3), bool)
    beside = ndimage.binary_dilation(inside, structure=cube) & (local > 0) & (local <= n_pieces)
    region = inside | beside  # the join and the pieces' voxels it touches, their seeds
    share = watershed(np.zeros(local.shape, np.uint8), np.where(beside, local, 0).astype(np.int32),
                      mask=region, connectivity=3)
    big = np.iinfo(np.int32).max
    highest = ndimage.maximum_filter(np.where(region, share, 0), footprint=cube, mode="constant", cval=0)
    lowest = ndimage.minimum_filter(np.where(region, share, big), footprint=cube, mode="constant", cval=big)
    cut = np.zeros(labels.shape, dtype=bool)
    cut[window] = inside & (highest != lowest)
    return cut


def _joins_over(crop: np.ndarray, over: np.ndarray) -> tuple[np.ndarray, int, list[int]]:
    """One label image of ``crop``: its pieces off ``over`` (1..n) and the pieces of ``crop & over`` above
    them, with those of the latter that touch two or more of the former (the joins)."""
    rest, n_rest = cc3d.connected_components(crop & ~over, connectivity=26, return_N=True)
    joins = cc3d.connected_components(crop & over, connectivity=26, out_dtype=np.uint32)
    labels = rest.astype(np.uint32)
    labels[joins > 0] = joins[joins > 0] + np.uint32(n_rest)  # one label image, as in joined_through
    touched = Counter(max(edge) for edge in cc3d.region_graph(labels, connectivity=26))
    return labels, n_rest, sorted(j for j, n in touched.items() if n >= 2)


def split_at_origins(mask: np.ndarray, others: np.ndarray, origins: np.ndarray,
                     min_voxels: int) -> tuple[np.ndarray, int]:
    """``mask`` with each piece that reaches ``origins`` on both sides of a join over ``others`` parted
    there. ``origins`` is where each of the class's components arises, at one place (voxels touching the
    aorta: a coronary tree leaves it at its own ostium), so a piece that reaches them on both sides of a
    stretch the input gives another class is two trees a repair joined — over the aortic root between
    the ostia. :func:`split_joins` sees such a join only while the mask has too few pieces; a fragment
    or a false piece elsewhere makes up the count and hides it. A join's cut (:func:`_parting_cut`)
    goes where it parts its piece in exactly two, each of at least ``min_voxels`` and each reaching
    ``origins``; of the cuts found, the one whose smaller side is largest, until none is left. A tree
    whose own stretch the segmenter gave a neighbour parts into a side by the aorta and one away from
    it (its distal part): that join stays. Returns the mask and the voxels removed."""
    mask, others, origins = _as_mask(mask), _as_mask(others), _as_mask(origins)
    if not mask.shape == others.shape == origins.shape:
        raise ValueError(f"split_at_origins: mask {mask.shape}, others {others.shape} and origins "
                         f"{origins.shape} differ in shape")
    box = bounding_box(mask)
    if box is None:
        return mask.copy(), 0
    crop = np.ascontiguousarray(mask[box.slices])
    over, near = crop & others[box.slices], origins[box.slices]
    removed = 0
    while True:
        pieces = cc3d.connected_components(crop, connectivity=26)
        windows = cc3d.statistics(pieces)["bounding_boxes"]  # each piece's slices: a join is parted there
        labels, n_rest, joins = _joins_over(crop, over)
        on_join = labels > n_rest
        piece_of = dict(zip(labels[on_join].tolist(), pieces[on_join].tolist()))  # a join lies in one piece
        best, best_side = None, min_voxels - 1
        for join in joins:
            cut = _parting_cut(labels, join, n_rest)
            window = windows[piece_of[join]]
            piece = pieces[window] == piece_of[join]
            sides, n = cc3d.connected_components(piece & ~cut[window], connectivity=26, return_N=True)
            if n != 2:
                continue
            side = int(np.bincount(sides.ravel())[1:].min())
            if side > best_side and np.count_nonzero(np.bincount(sides[near[window]], minlength=3)[1:]) == 2:
                best, best_side = cut, side
        if best is None:
            break
        crop = crop & ~best
        over &= crop
        removed += int(best.sum())
    out = mask.copy()
    out[box.slices] = crop
    return out, removed


def split_joins(mask: np.ndarray, others: np.ndarray, expected: int, min_voxels: int) -> tuple[np.ndarray, int]:
    """``mask`` with fewer than ``expected`` components parted where it crosses ``others`` (voxels the
    input gives another class): two coronary trees are separate, and a repair that joins them does so
    through a neighbour's voxels (the aorta between the ostia, a swapped patch of myocardium). Each
    26-connected piece of ``mask & others`` that touches two or more pieces of the rest is a join, and
    its cut (:func:`_parting_cut`) the layer across it halfway between those pieces: the join's other
    voxels are often the vessel itself, which a segmenter gave its neighbour. While the mask has fewer
    than ``expected`` components, of the cuts that give at most ``expected`` components, each of at
    least ``min_voxels``, the one whose smallest piece is largest goes: the trees part, not a tree and
    a stub. A join whose cut parts the mask into more stays. Returns the mask and the voxels removed."""
    mask, others = _as_mask(mask), _as_mask(others)
    if mask.shape != others.shape:
        raise ValueError(f"split_joins: mask {mask.shape} and others {others.shape} differ in shape")
    box = bounding_box(mask)
    if box is None or expected < 2:
        return mask.copy(), 0
    crop = np.ascontiguousarray(mask[box.slices])
    over = crop & others[box.slices]
    n_now = cc3d.connected_components(crop, connectivity=26, return_N=True)[1]
    removed = 0
    while n_now < expected:
        labels, n_rest, joins = _joins_over(crop, over)
        best, best_piece = None, min_voxels - 1
        for join in joins:
            cut = _parting_cut(labels, join, n_rest)
            parted = crop & ~cut
            cc, n = cc3d.connected_components(parted, connectivity=26, return_N=True)
            piece = int(np.bincount(cc.ravel())[1:].min())
            if n_now < n <= expected and piece > best_piece:  # the trees, not a tree and a stub
                best, best_piece = (cut, parted, n), piece
        if best is None:
            break
        cut, crop, n_now = best
        removed += int(cut.sum())
        over = over & crop
    out = mask.copy()
    out[box.slices] = crop
    return out, removed
