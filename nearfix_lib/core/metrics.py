"""Evaluation of label maps: overlap, surface distances, topology, attachment and smoothness.

Everything here answers one question about a repaired label map: is it closer to the truth
(overlap and surface distances against a reference), is it anatomically plausible (component
counts, attachment of appendages and vessels to the structures they grow from) and is its
surface smooth (noisy labels have ragged surfaces that a good repair removes)?

Conventions
-----------
* Arrays are indexed (i, j, k) in NIfTI voxel order; ``spacing`` holds the voxel sizes in mm
  along axes 0, 1, 2 and may be anisotropic. All distances are in mm.
* Classes are never hard-coded: functions take a :class:`~nearfix_lib.core.classes.ClassTable`.
* In pairs, ``a`` is the prediction and ``b`` the reference.
* Surface voxels are ``mask & ~erosion(mask)`` with the 6-connected (face) structuring element;
  the space outside the array counts as background, so a mask touching the array border has
  surface there. Surface distances run between voxel centres: the anisotropic EDT of the
  complement of the other surface, or, for few surface voxels in a large box, an exact k-d
  tree query on the voxel centres in mm (same distances, cost following the voxel count).
* ``hd95`` is the symmetric 95th-percentile Hausdorff distance in the MONAI convention:
  ``max(P95(d(a->b)), P95(d(b->a)))`` with numpy's linearly interpolated percentile, i.e. the
  percentile is taken per direction, not over the pooled distances.
* ``assd`` is the mean of all directed surface distances pooled from both sides (each surface
  voxel counts once), ``nsd`` the normalised surface Dice at tolerance ``tol_mm`` counted in
  surface voxels: ``(#a within tol of b + #b within tol of a) / (#surf a + #surf b)``.
* Empty masks: both empty -> dice 1, hd95 0, assd 0, nsd 1 (nothing to find, nothing
  found). Exactly one empty -> dice 0, nsd 0, hd95 and assd ``nan`` (a distance to nothing is
  undefined; a finite placeholder would bias the means). Tables therefore aggregate with
  nan-skipping means (:func:`nearfix_lib.core.scores.pivot`); Dice counts the miss.
* Components are 26-connected, as in :attr:`LabelClass.expected_components`.

Every heavy step runs on crops (bounding boxes, plus one voxel where a neighbourhood is
needed), so the cost follows the extent of the structures, not of the volume: a 256x256x200
ten-class case with compact classes takes well under a second on one core, about 1.5 s with
scattered islands; only pathological maps where every class is spread over the whole volume
(random blobs or noise) take 10-15 s, dominated by two EDTs of the full volume per class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict

import cc3d
import edt
import numpy as np
import pandas as pd
from scipy import ndimage, sparse
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.geometry import bounding_box
from nearfix_lib.core.io import threads_per_worker

__all__ = [
    "BinaryScores",
    "ClassScores",
    "AttachmentRow",
    "dice",
    "hd95",
    "assd",
    "nsd",
    "binary_scores",
    "per_class_scores",
    "component_counts",
    "at_expected_fraction",
    "attachment_report",
    "mesh_dihedral_angles",
    "taubin_smooth",
    "surface_roughness",
    "case_report",
    "Reference",
]


class BinaryScores(TypedDict):
    """Overlap and surface scores of one prediction/reference pair (see module conventions)."""

    dice: float
    hd95: float
    assd: float
    nsd: float


class ClassScores(BinaryScores):
    """One row of :func:`per_class_scores`: the pair scores of a class plus its voxel counts,
    which tell an empty prediction (``n_vox == 0``) from an empty reference in a table."""

    key: str
    n_vox: int
    n_vox_ref: int


class AttachmentRow(TypedDict):
    """One row of :func:`attachment_report`.

    ``max_dist_mm`` is the largest, over the class's components, of each component's smallest
    distance to the targets: the distance the worst-placed component would have to close. It
    is only computed for distance rules (``max_mm > 0``; ``nan`` for contact rules and absent
    classes; ``inf`` when the targets are absent, the distance to an empty set).
    """

    key: str
    targets: str
    max_mm: float
    n_components: int
    n_attached: int
    frac_attached: float
    max_dist_mm: float


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Validated spacing: three positive finite floats (a silent 2-vector would broadcast)."""
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing!r}")
    return sp  # the len() check above narrows sp to three floats


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two 3-D arrays of the same shape, got {a.shape} and {b.shape}")


def mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels, or None when there are none (three ``any`` reductions:
    an eighth of the time of ``find_objects`` on a real volume)."""
    box = bounding_box(mask)
    return None if box is None else box.slices


def union_box(s: tuple[slice, ...] | None, t: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    """The smallest box holding both (either may be None: no voxels)."""
    if s is None:
        return t
    if t is None:
        return s
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(s, t))


def _grow(box: tuple[slice, ...], shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` widened by one voxel on every side, clipped to the array."""
    return tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, shape))


def _surface(m: np.ndarray) -> np.ndarray:
    """Surface voxels ``mask & ~erode6(mask)``, everything outside the array being background.

    Set voxels of the outermost layer are surface by that convention; the inner ones are
    surface unless all six face neighbours are set. Written with shifted views instead of
    ``ndimage.binary_erosion``: same result (border_value 0), faster, and because the border
    convention is built in, a mask cropped to its bounding box needs no padding.
    """
    c = (slice(1, -1),) * 3
    interior = (m[c] & m[:-2, 1:-1, 1:-1] & m[2:, 1:-1, 1:-1] & m[1:-1, :-2, 1:-1]
                & m[1:-1, 2:, 1:-1] & m[1:-1, 1:-1, :-2] & m[1:-1, 1:-1, 2:])
    surf = m.copy()
    surf[c] &= ~interior
    return surf


# The k-d tree is taken only where its worst case costs less than the EDT, whose cost is fixed:
# ~40 ns per voxel of the crop. A query costs ~1.3 us per point near the other surface but up to
# ~60 us far inside a large one (measured on a real-size case whose decoded map flooded the volume
# with one class: 0.85 M surface points, 62 s by k-d tree against 5 s for the two EDTs), so a point
# is priced as the EDT of 1,500 voxels: scattered islands in a whole-volume box still go to the tree.
_KDTREE_VOXELS_PER_POINT = 1500.0


def prefer_kdtree(n_points: int, n_voxels: int) -> bool:
    """Whether a k-d tree on ``n_points`` surface voxels beats the EDT of a crop of ``n_voxels``."""
    return n_points * _KDTREE_VOXELS_PER_POINT < n_voxels


def _nearest_distances(query: np.ndarray, sources: np.ndarray, spacing: tuple[float, float, float],
                       kept_edt: Callable[[], np.ndarray] | None = None) -> np.ndarray:
    """Distance (mm) from every True voxel of ``query`` (C order) to the nearest of ``sources``.

    ``sources`` must be non-empty and hold every source voxel that matters (the caller's crop
    contains them all). Normally an anisotropic EDT of ``~sources`` over the crop (``kept_edt``
    returns it where the caller keeps one: a :class:`Reference`'s); when the voxels are few for
    the size of the crop (scattered islands of a noisy label stretch a class's box over the whole
    volume) a k-d tree on the voxel centres in mm gives the same distances at a cost that follows
    the number of voxels, not the size of the box.
    """
    if prefer_kdtree(int(np.count_nonzero(query)) + int(np.count_nonzero(sources)), query.size):
        sp = np.asarray(spacing)
        tree = cKDTree(np.argwhere(sources) * sp)
        return tree.query(np.argwhere(query) * sp)[0]
    # on the cores this process may use: each voxel's distance is exact whatever the split
    dist = kept_edt() if kept_edt is not None else edt.edt(~sources, anisotropy=spacing, black_border=False,
                                                           parallel=threads_per_worker(1))
    return dist[query].astype(np.float64)


def _empty_pair_scores(na: int, nb: int) -> BinaryScores:
    if na == 0 and nb == 0:
        return BinaryScores(dice=1.0, hd95=0.0, assd=0.0, nsd=1.0)
    return BinaryScores(dice=0.0, hd95=float("nan"), assd=float("nan"), nsd=0.0)


def _cropped_pair_scores(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float],
                         tol_mm: float, kept_edt_of_b: Callable[[], np.ndarray] | None = None) -> BinaryScores:
    """Scores of two masks cropped to (at least) their union bounding box.

    Outside the box both masks are empty, so the surfaces are those of the full array
    (:func:`_surface` treats the outside as background) and every surface voxel lies in the
    crop: distances computed within the crop are exact. ``kept_edt_of_b``: see :func:`_nearest_distances`.
    """
    na, nb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    if na == 0 or nb == 0:
        return _empty_pair_scores(na, nb)
    inter = int(np.count_nonzero(a & b))
    sa, sb = _surface(a), _surface(b)
    d_ab = _nearest_distances(sa, sb, spacing, kept_edt_of_b)
    d_ba = _nearest_distances(sb, sa, spacing)
    # the EDT is float32: compare against the tolerance with a float32-sized slack so a
    # distance that is exactly tol_mm is not lost to rounding
    tol = tol_mm * (1.0 + 1e-6)
    return BinaryScores(
        dice=2.0 * inter / (na + nb),
        hd95=float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))),
        assd=float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size)),
        nsd=float((np.count_nonzero(d_ab <= tol) + np.count_nonzero(d_ba <= tol))
                  / (d_ab.size + d_ba.size)),
    )


# --------------------------------------------------------------------------------------------
# binary pairs
# --------------------------------------------------------------------------------------------

def binary_scores(a: np.ndarray, b: np.ndarray, spacing: Sequence[float],
                  nsd_tol_mm: float = 1.0) -> BinaryScores:
    """Dice, hd95, assd and nsd of prediction ``a`` against reference ``b`` in one pass.

    One function for all four because they share the crop, the surfaces and the two
    nearest-distance computations; the single-metric functions below are thin wrappers.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _check_pair(a, b)
    sp = _spacing(spacing)
    box = union_box(mask_box(a), mask_box(b))
    if box is None:
        return _empty_pair_scores(0, 0)
    return _cropped_pair_scores(a[box], b[box], sp, nsd_tol_mm)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2|a & b| / (|a| + |b|)``; 1.0 when both masks are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _check_pair(a, b)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (MONAI convention, see module doc)."""
    return binary_scores(a, b, spacing)["hd95"]


def assd(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm, pooled over both surfaces."""
    return binary_scores(a, b, spacing)["assd"]


def nsd(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], tol_mm: float = 1.0) -> float:
    """Normalised surface Dice: fraction of surface voxels within ``tol_mm`` of the other."""
    return binary_scores(a, b, spacing, nsd_tol_mm=tol_mm)["nsd"]


# --------------------------------------------------------------------------------------------
# multi-class
# --------------------------------------------------------------------------------------------

def class_boxes(labels: np.ndarray, table: ClassTable) -> dict[str, tuple[slice, ...] | None]:
    """Bounding box of every class in one pass over the volume (``ndimage.find_objects``)."""
    found = ndimage.find_objects(labels, max_label=table.max_index)
    return {c.key: found[c.index - 1] for c in table}


def _shifted(box: tuple[slice, ...] | None, origin: tuple[slice, ...]) -> tuple[slice, ...] | None:
    """A box found in the crop ``origin`` of an array, in the array's coordinates."""
    if box is None:
        return None
    return tuple(slice(b.start + o.start, b.stop + o.start) for b, o in zip(box, origin))


def _boxes_in_foreground(labels: np.ndarray, table: ClassTable) -> tuple[tuple[slice, ...] | None, dict]:
    """The foreground's box and every class's box (array coordinates), found on the foreground's
    crop: a real case's heart fills a quarter of its volume."""
    fg = mask_box(labels > 0)
    if fg is None:
        return None, {c.key: None for c in table}
    return fg, {k: _shifted(b, fg) for k, b in class_boxes(labels[fg], table).items()}


def _foreground_components(labels: np.ndarray, foreground: tuple[slice, ...] | None,
                           table: ClassTable) -> dict[str, int]:
    """:func:`component_counts` on the foreground's box: the labelling costs what the volume it is given costs."""
    return component_counts(labels[foreground or (slice(0, 1),) * 3], table)


class Reference:
    """A reference label map that several maps are scored against: a case's truth, against the noisy
    input, both baselines and every stage. What depends on the reference alone is computed once, when
    first asked for: its class boxes and component counts and, per class, the distance (mm) to the
    class's surface over a box that grows to hold each scored map's box of that class. One
    :class:`Reference` per case; :func:`per_class_scores` and :func:`case_report` take it in place of
    the array, with the same results.
    """

    def __init__(self, labels: np.ndarray, spacing: Sequence[float], table: ClassTable) -> None:
        self.labels = np.asarray(labels)
        if self.labels.ndim != 3:
            raise ValueError(f"expected a 3-D reference label map, got shape {self.labels.shape}")
        self.spacing = _spacing(spacing)
        self.table = table
        self._layout: tuple[tuple[slice, ...] | None, dict[str, tuple[slice, ...] | None]] | None = None
        self._components: dict[str, int] | None = None
        self._distance: dict[str, tuple[tuple[slice, ...], np.ndarray]] = {}

    @classmethod
    def of(cls, ref: np.ndarray | Reference, spacing: Sequence[float], table: ClassTable) -> Reference:
        """``ref`` itself when it is one (its spacing must be ``spacing``), else a new one."""
        if not isinstance(ref, Reference):
            return cls(ref, spacing, table)
        if ref.spacing != _spacing(spacing):
            raise ValueError(f"reference spacing {ref.spacing} differs from the scores' {tuple(spacing)}")
        return ref

    def _foreground_and_boxes(self) -> tuple[tuple[slice, ...] | None, dict[str, tuple[slice, ...] | None]]:
        if self._layout is None:
            self._layout = _boxes_in_foreground(self.labels, self.table)
        return self._layout

    @property
    def boxes(self) -> dict[str, tuple[slice, ...] | None]:
        return self._foreground_and_boxes()[1]

    @property
    def components(self) -> dict[str, int]:
        """26-connected component count of every class of the reference's table."""
        if self._components is None:
            self._components = _foreground_components(self.labels, self._foreground_and_boxes()[0], self.table)
        return self._components

    def class_scores(self, a: np.ndarray, box: tuple[slice, ...], key: str, tol_mm: float = 1.0) -> ClassScores:
        """Scores of ``a``, a map's voxels of class ``key`` within ``box`` (array coordinates; it holds
        the map's and the reference's voxels of the class), against the reference's."""
        b = self.labels[box] == self.table[key].index
        scores = _cropped_pair_scores(a, b, self.spacing, tol_mm, lambda: self._distance_to_surface(key, box))
        return ClassScores(key=key, **scores, n_vox=int(np.count_nonzero(a)), n_vox_ref=int(np.count_nonzero(b)))

    def _distance_to_surface(self, key: str, box: tuple[slice, ...]) -> np.ndarray:
        """Distance (mm, float32) to class ``key``'s surface on ``box``: a view of the EDT kept for the
        class, computed again on a larger box when ``box`` reaches out of it. The class's surface
        lies in every such box, so each voxel's distance is the whole volume's."""
        held = self._distance.get(key)
        if held is None or any(b.start < h.start or b.stop > h.stop for b, h in zip(box, held[0])):
            region = box if held is None else union_box(held[0], box)
            assert region is not None
            surface = _surface(self.labels[region] == self.table[key].index)
            dist = edt.edt(~surface, anisotropy=self.spacing, black_border=False, parallel=threads_per_worker(1))
            held = self._distance[key] = (region, dist)
        region, dist = held
        return dist[tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, region))]


def per_class_scores(pred_labels: np.ndarray, ref_labels: np.ndarray | Reference, spacing: Sequence[float],
                     table: ClassTable, nsd_tol_mm: float = 1.0) -> list[ClassScores]:
    """One row per class of ``table`` (in table order): pair scores and voxel counts.

    Each class is cropped to the union of its boxes in both maps, found for all classes in
    one pass per map, so the cost follows the size of the structures, not of the volume.
    ``ref_labels`` may be a :class:`Reference` (the same reference scored against several maps).
    """
    ref = Reference.of(ref_labels, spacing, table)
    pred_labels = np.asarray(pred_labels)
    _check_pair(pred_labels, ref.labels)
    return _class_rows(pred_labels, _boxes_in_foreground(pred_labels, table)[1], ref, table, nsd_tol_mm)


def _class_rows(pred_labels: np.ndarray, boxes_p: dict[str, tuple[slice, ...] | None], ref: Reference,
                table: ClassTable, nsd_tol_mm: float) -> list[ClassScores]:
    """:func:`per_class_scores` with the prediction's class boxes found already."""
    rows: list[ClassScores] = []
    for c in table:
        box = union_box(boxes_p[c.key], ref.boxes[c.key])
        if box is None:
            rows.append(ClassScores(key=c.key, **_empty_pair_scores(0, 0), n_vox=0, n_vox_ref=0))
        else:
            rows.append(ref.class_scores(pred_labels[box] == c.index, box, c.key, nsd_tol_mm))
    return rows


# --------------------------------------------------------------------------------------------
# components and attachment
# --------------------------------------------------------------------------------------------

def mask_components(mask: np.ndarray) -> int:
    """Number of 26-connected components of a binary mask (0 for an empty one)."""
    mask = np.asarray(mask, dtype=bool)
    return int(cc3d.connected_components(mask, connectivity=26, return_N=True)[1]) if mask.any() else 0


def component_counts(labels: np.ndarray, table: ClassTable) -> dict[str, int]:
    """Number of 26-connected components of every class of ``table``.

    One multi-label ``cc3d`` call labels the components of every label value at once (voxels
    of different values never connect); each component is then mapped back to its value.
    This is several times faster than one binary call per class, even on cropped boxes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3-D label map, got shape {labels.shape}")
    cc, n = cc3d.connected_components(labels, connectivity=26, return_N=True)
    value_of = np.zeros(n + 1, dtype=np.int64)
    value_of[cc.ravel()] = labels.ravel()
    counts = np.bincount(value_of[1:][value_of[1:] > 0], minlength=table.max_index + 1)
    return {c.key: int(counts[c.index]) for c in table}


def at_expected_fraction(counts: Sequence[dict[str, int]], table: ClassTable) -> dict[str, float]:
    """Per class, the fraction of cases whose component count equals the expected count.

    ``counts`` holds one :func:`component_counts` result per case; ``nan`` with no cases.
    """
    out: dict[str, float] = {}
    for c in table:
        hits = [case[c.key] == c.expected_components for case in counts]
        out[c.key] = float(np.mean(hits)) if hits else float("nan")
    return out


_NEIGHBOURS_26 = [d for d in np.ndindex(3, 3, 3) if d != (1, 1, 1)]  # offsets + 1


def _touching(cc: np.ndarray, n_comp: int, targets: np.ndarray) -> np.ndarray:
    """Per component 1..n_comp: has one of its voxels a target among its 26 neighbours?

    The same as dilating each component by a 3x3x3 cube and intersecting with the targets,
    but it only visits the class's voxels. ``cc`` and ``targets`` cover the class's box grown
    by one voxel, so every neighbour inside the array is inside them; the zero ring added
    here stands for the outside.
    """
    t = np.pad(targets, 1)
    inside = cc > 0
    i, j, k = np.nonzero(inside)
    hit = np.zeros(i.size, dtype=bool)
    for di, dj, dk in _NEIGHBOURS_26:
        hit |= t[i + di, j + dj, k + dk]
    return np.bincount(cc[inside][hit], minlength=n_comp + 1)[1:] > 0


def _closest_approach(cc: np.ndarray, n_comp: int, targets: np.ndarray,
                      spacing: tuple[float, float, float]) -> np.ndarray:
    """Per component 1..n_comp: smallest centre-to-centre distance (mm) to any target voxel.

    ``cc`` and ``targets`` cover a box holding the class and every target voxel. Only the
    surfaces take part: the closest pair of voxels between two disjoint sets always lies on
    both surfaces (from an interior voxel a face neighbour of the same set is closer), which
    keeps the k-d tree small when that path is taken.
    """
    comp_surface = _surface(cc > 0)
    d = _nearest_distances(comp_surface, _surface(targets), spacing)
    return np.asarray(ndimage.minimum(d, labels=cc[comp_surface], index=np.arange(1, n_comp + 1)),
                      dtype=np.float64)


def attachment_report(labels: np.ndarray, spacing: Sequence[float],
                      table: ClassTable) -> list[AttachmentRow]:
    """How many components of each class with an attachment rule satisfy it.

    Contact rules (``max_mm == 0``): a component is attached when one of its voxels has a
    target voxel among its 26 neighbours (the component dilated by a 3x3x3 cube meets the
    targets). Distance rules: a component is attached when its smallest centre-to-centre
    distance to the union of the targets is at most ``max_mm``.
    Absent class: 0 components, ``frac_attached`` nan. Absent targets: none attached.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3-D label map, got shape {labels.shape}")
    sp = _spacing(spacing)
    boxes = class_boxes(labels, table)
    rows: list[AttachmentRow] = []
    for c in table:
        rule = c.attachment
        if rule is None:
            continue
        contact = rule.max_mm == 0
        target_box: tuple[slice, ...] | None = None
        for t in rule.targets:
            target_box = union_box(target_box, boxes[t])
        n_comp, n_att, max_dist = 0, 0, float("nan")
        box = boxes[c.key]
        if box is not None:
            # contact: the class box plus the ring its components can touch;
            # distance: everything the closest approach can involve
            region = _grow(box, labels.shape) if contact else union_box(box, target_box)
            sub = labels[region]
            cc, n_comp = cc3d.connected_components(sub == c.index, connectivity=26,
                                                   return_N=True)
            if target_box is None:
                max_dist = float("nan") if contact else float("inf")
            else:
                targets = np.isin(sub, [table[t].index for t in rule.targets])
                if contact:
                    n_att = int(np.count_nonzero(_touching(cc, n_comp, targets)))
                else:
                    closest = _closest_approach(cc, n_comp, targets, sp)
                    n_att = int(np.count_nonzero(closest <= rule.max_mm * (1.0 + 1e-6)))
                    max_dist = float(closest.max())
        rows.append(AttachmentRow(
            key=c.key, targets="+".join(rule.targets), max_mm=float(rule.max_mm),
            n_components=int(n_comp), n_attached=n_att,
            frac_attached=n_att / n_comp if n_comp else float("nan"),
            max_dist_mm=max_dist,
        ))
    return rows


# --------------------------------------------------------------------------------------------
# surface smoothness
# --------------------------------------------------------------------------------------------

def _face_normals(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals of the faces and a flag for faces with a usable (non-zero) area."""
    v = verts[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    length = np.linalg.norm(n, axis=1)
    ok = length > 0
    n[ok] /= length[ok, None]
    return n, ok


def mesh_dihedral_angles(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Angle (degrees) between the normals of the two faces of every interior edge.

    Edges are keyed by their sorted vertex pair; sorting the keys puts the faces of an edge
    next to each other, which finds all adjacent face pairs without a Python loop. Only
    edges shared by exactly two faces count (boundary and non-manifold edges have no single
    dihedral angle; the marching-cubes mesh of a zero-padded mask has none), and edges next
    to a zero-area face are skipped.
    """
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    normals, ok = _face_normals(verts, faces)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges.sort(axis=1)
    keys = edges[:, 0] * len(verts) + edges[:, 1]
    owner = np.tile(np.arange(len(faces)), 3)
    order = np.argsort(keys, kind="stable")
    keys, owner = keys[order], owner[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    lengths = np.diff(np.r_[starts, len(keys)])
    first = starts[lengths == 2]
    f0, f1 = owner[first], owner[first + 1]
    usable = ok[f0] & ok[f1]
    cos = np.einsum("ij,ij->i", normals[f0[usable]], normals[f1[usable]])
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def taubin_smooth(verts: np.ndarray, faces: np.ndarray, iterations: int,
                  lam: float = 0.5, mu: float = -0.53) -> np.ndarray:
    """Taubin (lambda|mu) smoothing with the uniform umbrella Laplacian.

    Each iteration moves every vertex ``lam`` of the way to the mean of its edge neighbours,
    then ``mu`` (negative) back, which damps high spatial frequencies without the shrinkage of
    plain Laplacian smoothing, so thin structures (coronaries) survive.
    """
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    nv = len(verts)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    adj = sparse.coo_matrix((np.ones(2 * len(e)), (np.r_[e[:, 0], e[:, 1]],
                                                     np.r_[e[:, 1], e[:, 0]])), shape=(nv, nv))
    adj = adj.tocsr()
    adj.data[:] = 1.0  # duplicates (an edge seen from both faces) were summed: back to 0/1
    degree = np.asarray(adj.sum(axis=1)).ravel()
    mean_of_neighbours = sparse.diags(1.0 / np.maximum(degree, 1.0)) @ adj
    isolated = degree == 0
    v = verts.copy()
    for _ in range(iterations):
        for step in (lam, mu):
            delta = mean_of_neighbours @ v - v
            delta[isolated] = 0.0
            v += step * delta
    return v


def surface_roughness(mask: np.ndarray, spacing: Sequence[float],
                      smoothing_iterations: int = 10) -> float:
    """Mean dihedral angle (degrees) of the mask's surface mesh after light Taubin smoothing.

    The mesh is marching cubes (level 0.5, in mm) of the mask padded with zeros. Any binary
    mask is stair-cased at the scale of one voxel, and the raw dihedral angle of its mesh
    mostly measures that aliasing: a finely voxelised sphere then scores about as high as
    the same sphere voxelised on a 3x coarser grid. A few Taubin iterations remove the
    one-voxel aliasing but keep coarser steps and noise, so the score ranks smooth < coarse
    stair-case < noisy surfaces (``smoothing_iterations=0`` gives the raw angle).
    Larger is rougher; ``nan`` for an empty mask.
    """
    sp = _spacing(spacing)
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {mask.shape}")
    box = mask_box(mask)
    if box is None:
        return float("nan")
    volume = np.pad(mask[box], 1).astype(np.float32)  # zero ring: a closed surface
    verts, faces, _, _ = marching_cubes(volume, level=0.5, spacing=sp)
    if smoothing_iterations > 0:
        verts = taubin_smooth(verts, faces, smoothing_iterations)
    return float(np.mean(mesh_dihedral_angles(verts, faces)))


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------

def case_report(pred: np.ndarray, ref: np.ndarray | Reference, spacing: Sequence[float], table: ClassTable,
                nsd_tol_mm: float = 1.0) -> pd.DataFrame:
    """One row per class: pair scores, voxel counts, and component counts of both maps.

    Columns: ``key, dice, hd95, assd, nsd, n_vox, n_vox_ref, n_comp, n_comp_ref, expected``.
    ``ref`` may be a :class:`Reference`: what depends on it alone is then computed once per case.
    """
    reference = Reference.of(ref, spacing, table)
    pred = np.asarray(pred)
    _check_pair(pred, reference.labels)
    fg, boxes_p = _boxes_in_foreground(pred, table)
    frame = pd.DataFrame(_class_rows(pred, boxes_p, reference, table, nsd_tol_mm))
    comp_p, comp_r = _foreground_components(pred, fg, table), reference.components
    frame["n_comp"] = [comp_p[k] for k in frame["key"]]
    frame["n_comp_ref"] = [comp_r[k] for k in frame["key"]]
    frame["expected"] = [table[k].expected_components for k in frame["key"]]
    return frame
