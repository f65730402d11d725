"""Stage 2: fuse the per-class repaired masks into one label map and enforce the anatomy.

The ten stage-1 masks M^ref_c of a case overlap (each was repaired alone), so they are fused by
the class table's fixed priority: where several hold a voxel, the class with the smallest
priority number wins (default Coronary > LAA > PV > LA > LV > Myo > Aorta > RA > RV > PA — thin
classes first, because a few voxels decide whether they survive at all). Then one round of
anatomical rules, each a function of its own, applied in this order:

1. **contact** — every component of a class with a contact rule in the table (LAA, PV) must touch
   one of its targets (LA), or come within ``contact_reach_mm`` of it, else it is removed;
2. **bridge** — pieces of a class with a distance rule (coronaries) within ``bridge_gap_mm`` of
   the main trees are joined to them by a straight tube: a segmenter breaks thin vessels into
   pieces (stage 1 repairs their surfaces, not the gaps);
3. **distance** — components of that class farther than the table's distance (3 mm) from its
   targets (Myo ∪ Ao) are removed, and so are small dangling pieces (``min_piece_mm3``);
4. **holes** — background cavities enclosed by the label map, mostly surrounded by a class of
   ``fill_holes`` (Myo) and no larger than ``hole_max_mm3``, are filled with that class;
5. **largest** — classes in ``keep_largest`` keep their expected number of largest components
   (chambers, aorta, PA: a detached piece — a false lumen — is removed).

A voxel a rule takes from class c goes to the next class by priority whose M^ref holds it, else
to background, so removing a wrong LAA piece gives the voxels back to the LA that also claimed
them. Every rule returns an :class:`AuditRow` (components removed, voxels changed, component
counts before and after) for the per-case audit.

All rules work on the bounding box of the classes involved; cc3d labels components, scipy/edt
measure distances and fill-voids finds cavities, so a 256^3 case takes about a second on one core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import cc3d
import edt
import fill_voids
import numpy as np
from scipy import ndimage

from nearfix_lib.core.classes import ClassTable, LabelClass
from nearfix_lib.core.config import Stage2Params
from nearfix_lib.core.geometry import Box, bounding_box
from nearfix_lib.repair.cleanup import bridge_voxels


@dataclass
class AuditRow:
    """What one rule did to one class of one case."""

    rule: str
    key: str
    components_before: int
    components_after: int
    components_removed: int = 0
    voxels_changed: int = 0  # voxels whose label the rule changed (removed, reassigned or added)
    voxels_reassigned: int = 0  # of the removed voxels, those given to a lower-priority class


# -- helpers -----------------------------------------------------------------------------------

def _grow(box: Box, by: int, shape: Sequence[int]) -> Box:
    lo = tuple(max(0, a - by) for a in box.lo)
    hi = tuple(min(int(s), b + by) for b, s in zip(box.hi, shape))
    return Box(lo, hi)  # type: ignore[arg-type]


def _union_box(boxes: Sequence[Box | None]) -> Box | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    lo = tuple(min(b.lo[a] for b in boxes) for a in range(3))
    hi = tuple(max(b.hi[a] for b in boxes) for a in range(3))
    return Box(lo, hi)  # type: ignore[arg-type]


def _count(mask: np.ndarray) -> int:
    box = bounding_box(mask)
    if box is None:
        return 0
    return int(cc3d.connected_components(np.ascontiguousarray(mask[box.slices]), connectivity=26,
                                         return_N=True)[1])


def fuse_priority(masks: Mapping[str, np.ndarray], table: ClassTable, shape: Sequence[int]) -> np.ndarray:
    """One label map from per-class masks: where masks overlap the higher-priority class wins.

    Classes of the table without a mask are absent (their voxels are never labelled).
    """
    labels = np.zeros(tuple(shape), dtype=np.uint8)
    for cls in reversed(table.by_priority()):  # lowest priority first, so winners overwrite
        mask = masks.get(cls.key)
        if mask is not None:
            if mask.shape != labels.shape:
                raise ValueError(f"fusion: mask of {cls.key} has shape {mask.shape}, expected {labels.shape}")
            labels[np.asarray(mask, dtype=bool)] = cls.index
    return labels


def reassign(labels: np.ndarray, removed: np.ndarray, cls: LabelClass, masks: Mapping[str, np.ndarray],
             table: ClassTable) -> int:
    """Give ``removed`` voxels of ``cls`` to the next class by priority whose mask holds them.

    Voxels no lower-priority mask claims become background. Works in place; returns how many
    voxels went to another class.
    """
    left = removed.copy()
    moved = 0
    for other in table.by_priority():
        if other.priority <= cls.priority or other.key not in masks or not left.any():
            continue
        take = left & masks[other.key]
        labels[take] = other.index
        moved += int(take.sum())
        left &= ~take
    labels[left] = 0
    return moved


def _remove_components(labels: np.ndarray, cls: LabelClass, region: Box, cc: np.ndarray, drop: np.ndarray,
                       masks: Mapping[str, np.ndarray], table: ClassTable, rule: str) -> AuditRow:
    """Remove the components flagged in ``drop`` (0-based ids of ``cc`` on ``region``) from ``cls``."""
    n = drop.size
    removed = np.zeros(labels.shape, dtype=bool)
    removed[region.slices] = np.concatenate([[False], drop])[cc]
    moved = reassign(labels, removed, cls, masks, table) if drop.any() else 0
    return AuditRow(rule, cls.key, n, _count(labels == cls.index) if drop.any() else n,
                    int(drop.sum()), int(removed.sum()), moved)


def _class_components(labels: np.ndarray, cls: LabelClass, region: Box) -> tuple[np.ndarray, int]:
    return cc3d.connected_components(np.ascontiguousarray(labels[region.slices] == cls.index),
                                     connectivity=26, return_N=True)


# -- the rules ---------------------------------------------------------------------------------

def rule_contact(labels: np.ndarray, cls: LabelClass, masks: Mapping[str, np.ndarray],
                 table: ClassTable, spacing: Sequence[float], reach_mm: float = 0.0) -> AuditRow:
    """Remove components of ``cls`` none of whose voxels lies within ``reach_mm`` (centre to centre) of
    any of its attachment targets; a component touching one (26-neighbour contact) is attached at any
    reach. In millimetres: a segmenter's gap between an appendage and its atrium is its error's depth,
    the same millimetres on any grid (two voxels at 1.2 mm are six at 0.35 mm)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    box = bounding_box(labels == cls.index)
    if box is None:
        return AuditRow("contact", cls.key, 0, 0)
    reach = max(float(reach_mm), float(np.linalg.norm(spacing)))  # a corner neighbour touches
    region = _grow(box, int(np.ceil(reach / spacing.min())) + 1, labels.shape)
    cc, n = _class_components(labels, cls, region)
    distance = _target_distance(labels, cls, table, region, spacing)
    attached = np.zeros(n + 1, dtype=bool)
    if distance is not None:
        attached[np.unique(cc[distance <= reach * (1.0 + 1e-6)])] = True
    return _remove_components(labels, cls, region, cc, ~attached[1:], masks, table, "contact")


def _target_distance(labels: np.ndarray, cls: LabelClass, table: ClassTable, region: Box,
                     spacing: np.ndarray) -> np.ndarray | None:
    """Distance (mm, voxel centre to centre) from each voxel of ``region`` to the class's targets."""
    targets = np.isin(labels[region.slices], [table[t].index for t in cls.attachment.targets])
    if not targets.any():
        return None
    return edt.edt(np.ascontiguousarray(~targets), anisotropy=tuple(spacing), black_border=False)


def rule_distance(labels: np.ndarray, cls: LabelClass, masks: Mapping[str, np.ndarray], table: ClassTable,
                  spacing: np.ndarray, min_piece_mm3: float) -> AuditRow:
    """Remove components of ``cls`` farther than the table's distance from its targets, and small pieces.

    The largest component is never removed for being small (only for being far), so a class is
    not emptied by the size rule. With no target voxels at all, only the size rule applies.
    """
    box = bounding_box(labels == cls.index)
    if box is None:
        return AuditRow("distance", cls.key, 0, 0)
    target_box = bounding_box(np.isin(labels, [table[t].index for t in cls.attachment.targets]))
    region = _union_box([box, target_box])
    cc, n = _class_components(labels, cls, region)
    sizes = np.bincount(cc.ravel(), minlength=n + 1)[1:]
    drop = sizes * float(np.prod(spacing)) < min_piece_mm3
    drop[np.argmax(sizes)] = False
    dist = _target_distance(labels, cls, table, region, spacing)
    if dist is not None:
        inside = cc > 0  # the minimum per component over its own voxels only (scipy's would sort the box)
        closest = np.full(n + 1, np.inf)
        np.minimum.at(closest, cc[inside], dist[inside])
        drop |= closest[1:] > cls.attachment.max_mm * (1.0 + 1e-6)
    return _remove_components(labels, cls, region, cc, drop, masks, table, "distance")


def rule_bridge(labels: np.ndarray, cls: LabelClass, spacing: np.ndarray, max_gap_mm: float,
                radius_vox: int) -> AuditRow:
    """Join pieces of ``cls`` to its ``expected_components`` largest by straight tubes across gaps.

    The tubes are :func:`~nearfix_lib.repair.cleanup.bridge_voxels` (Prim's algorithm, gaps up to
    ``max_gap_mm``); pieces farther than that stay separate (the distance rule deals with them).
    Bridge voxels become ``cls`` whatever they held: a gap in a coronary is where the segmenter
    lost the vessel.
    """
    mask = labels == cls.index
    n = _count(mask)
    if n <= cls.expected_components or max_gap_mm <= 0:
        return AuditRow("bridge", cls.key, n, n)
    new = bridge_voxels(mask, cls.expected_components, spacing, max_gap_mm, radius_vox) & ~mask
    labels[new] = cls.index
    after = _count(labels == cls.index) if new.any() else n
    return AuditRow("bridge", cls.key, n, after, 0, int(new.sum()), 0)


def rule_holes(labels: np.ndarray, cls: LabelClass, spacing: np.ndarray, max_mm3: float,
               min_share: float) -> AuditRow:
    """Fill background cavities enclosed by the label map and mostly walled by ``cls``.

    A cavity is a 6-connected component of background that the foreground (any class) encloses.
    It is filled when its volume is at most ``max_mm3`` and at least ``min_share`` of the voxels
    on its face-neighbour shell belong to ``cls``. Each of its voxels takes the label of its
    nearest labelled voxel (in mm): a hole inside the myocardium becomes myocardium, while a
    sliver left between the myocardium and a chamber — where two independently repaired masks
    stopped short of each other — is split between the two along the middle.
    """
    box = bounding_box(labels == cls.index)
    if box is None:
        return AuditRow("holes", cls.key, 0, 0)
    region = _grow(box, 1, labels.shape)
    sub = labels[region.slices]
    n_before = _count(sub == cls.index)
    fg = sub > 0
    cavities = fill_voids.fill(fg, in_place=False) & ~fg
    if not cavities.any():
        return AuditRow("holes", cls.key, n_before, n_before)
    cc, n = cc3d.connected_components(cavities, connectivity=6, return_N=True)
    sizes = np.bincount(cc.ravel(), minlength=n + 1)[1:]
    face = ndimage.generate_binary_structure(3, 1)
    shell = ndimage.binary_dilation(cavities, structure=face) & ~cavities
    # each shell voxel is credited to the cavity it borders (cavities are separated by >= 1 voxel)
    owner = ndimage.grey_dilation(cc, footprint=face)[shell]
    walls = np.bincount(owner, minlength=n + 1)[1:]
    walls_cls = np.bincount(owner[sub[shell] == cls.index], minlength=n + 1)[1:]
    fill = (sizes * float(np.prod(spacing)) <= max_mm3) & (walls_cls >= min_share * np.maximum(walls, 1))
    filled = np.concatenate([[False], fill])[cc]
    if not filled.any():
        return AuditRow("holes", cls.key, n_before, n_before)
    near = _grow(bounding_box(filled), 2, sub.shape)
    local = sub[near.slices]
    nearest = ndimage.distance_transform_edt(local == 0, sampling=spacing, return_distances=False,
                                             return_indices=True)
    take = filled[near.slices]
    local[take] = local[tuple(ix[take] for ix in nearest)]
    return AuditRow("holes", cls.key, n_before, _count(sub == cls.index), 0, int(take.sum()), 0)


def rule_largest(labels: np.ndarray, cls: LabelClass, masks: Mapping[str, np.ndarray],
                 table: ClassTable) -> AuditRow:
    """Keep the ``expected_components`` largest components of ``cls``; the rest are reassigned."""
    box = bounding_box(labels == cls.index)
    if box is None:
        return AuditRow("largest", cls.key, 0, 0)
    cc, n = _class_components(labels, cls, box)
    sizes = np.bincount(cc.ravel(), minlength=n + 1)[1:]
    drop = np.ones(n, dtype=bool)
    drop[np.argsort(-sizes, kind="stable")[:cls.expected_components]] = False
    return _remove_components(labels, cls, box, cc, drop, masks, table, "largest")


# -- one case ----------------------------------------------------------------------------------

@dataclass
class FusionResult:
    labels: np.ndarray
    audit: list[AuditRow]
    absent: list[str]  # classes of the table without a mask for this case

    def audit_records(self) -> list[dict]:
        return [asdict(r) for r in self.audit]


def fuse_case(masks: Mapping[str, np.ndarray], table: ClassTable, spacing: Sequence[float],
              params: Stage2Params, shape: Sequence[int] | None = None) -> FusionResult:
    """Priority fusion then the anatomical rules, on one grid (``spacing`` in mm along i, j, k).

    ``masks`` maps class keys to bool arrays of one shape (classes without a mask are absent);
    ``shape`` is needed only when no mask is given at all.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
    masks = {k: np.asarray(m, dtype=bool) for k, m in masks.items() if k in table.keys}
    if shape is None:
        if not masks:
            raise ValueError("fuse_case: no masks and no shape")
        shape = next(iter(masks.values())).shape
    labels = fuse_priority(masks, table, shape)
    audit: list[AuditRow] = []
    order = table.by_priority()
    present = [c for c in order if c.key in masks]
    active = set(params.rules)
    if "contact" in active:
        audit += [rule_contact(labels, c, masks, table, spacing, params.contact_reach_mm) for c in present
                  if c.attachment is not None and c.attachment.max_mm == 0]
    distance_classes = [c for c in present if c.attachment is not None and c.attachment.max_mm > 0]
    if "bridge" in active:
        audit += [rule_bridge(labels, c, spacing, params.bridge_gap_mm, params.bridge_radius_vox)
                  for c in distance_classes]
    if "distance" in active:
        audit += [rule_distance(labels, c, masks, table, spacing, params.min_piece_mm3) for c in distance_classes]
    if "holes" in active:
        audit += [rule_holes(labels, table[k], spacing, params.hole_max_mm3, params.hole_min_share)
                  for k in params.fill_holes if k in masks]
    if "largest" in active:
        keep = set(params.keep_largest)
        audit += [rule_largest(labels, c, masks, table) for c in present if c.key in keep]
    return FusionResult(labels, audit, [c.key for c in table if c.key not in masks])
