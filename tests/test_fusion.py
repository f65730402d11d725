"""Stage-2 fusion and anatomical rules on small hand-built volumes (asymmetric shapes)."""

import dataclasses

import cc3d
import numpy as np
import pytest

from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.config import Stage2Params
from nearfix_lib.core.metrics import attachment_report, component_counts
from nearfix_lib.repair.fusion import (
    fuse_case,
    fuse_priority,
    reassign,
    rule_bridge,
    rule_contact,
    rule_distance,
    rule_holes,
    rule_largest,
)

T = CARDIAC
SHAPE = (26, 19, 13)
SPACING = np.array([1.0, 1.0, 1.0])


def empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=bool)


def box(lo, hi) -> np.ndarray:
    m = empty()
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def n_comp(labels, key):
    return int(cc3d.connected_components(labels == T[key].index, connectivity=26, return_N=True)[1])


def test_priority_fusion_higher_priority_wins_and_absent_classes_stay_empty():
    la, laa, lv = box((2, 2, 2), (10, 9, 7)), box((8, 6, 3), (13, 9, 6)), box((9, 2, 2), (16, 6, 7))
    labels = fuse_priority({"LA": la, "LAA": laa, "LV": lv}, T, SHAPE)
    assert labels.shape == SHAPE and labels.dtype == np.uint8
    assert np.all(labels[laa] == T["LAA"].index)  # LAA (2) beats LA (4) and LV (5)
    assert np.all(labels[la & lv & ~laa] == T["LA"].index)  # LA (4) beats LV (5)
    assert set(np.unique(labels)) == {0, T["LA"].index, T["LAA"].index, T["LV"].index}
    with pytest.raises(ValueError, match="shape"):
        fuse_priority({"LA": la[:-1]}, T, SHAPE)


def test_reassign_goes_to_next_priority_class_holding_the_voxel_else_background():
    labels = np.zeros(SHAPE, dtype=np.uint8)
    removed = box((2, 2, 2), (6, 6, 6))
    labels[removed] = T["LAA"].index
    masks = {"LAA": removed, "LA": box((2, 2, 2), (4, 6, 6)), "RV": box((2, 2, 2), (6, 6, 4)),
             "Cor": removed}  # Cor has higher priority than LAA: never a candidate
    moved = reassign(labels, removed, T["LAA"], masks, T)
    assert np.all(labels[2:4, 2:6, 2:6] == T["LA"].index)  # LA (4) before RV (9)
    assert np.all(labels[4:6, 2:6, 2:4] == T["RV"].index)
    assert np.all(labels[4:6, 2:6, 4:6] == 0)
    assert moved == 2 * 4 * 4 + 2 * 4 * 2


def test_contact_rule_removes_laa_pieces_that_do_not_touch_la():
    la = box((2, 2, 2), (10, 10, 8))
    attached, detached = box((10, 3, 3), (13, 6, 6)), box((18, 12, 3), (21, 15, 6))
    masks = {"LA": la | detached, "LAA": attached | detached}
    labels = fuse_priority(masks, T, SHAPE)
    row = rule_contact(labels, T["LAA"], masks, T, (1.0, 0.9, 1.2))
    assert row.components_before == 2 and row.components_after == 1 and row.components_removed == 1
    assert np.all(labels[attached] == T["LAA"].index)
    assert np.all(labels[detached] == T["LA"].index)  # the LA mask also held it
    assert row.voxels_changed == detached.sum() == row.voxels_reassigned
    assert attachment_report(labels, SPACING, T.subset(["LA", "LAA"]))[0]["frac_attached"] == 1.0


def test_contact_counts_diagonal_touch_and_keeps_a_class_without_targets_untouched():
    la = box((2, 2, 2), (6, 6, 6))
    diagonal = box((6, 6, 6), (8, 8, 8))  # touches LA only at a corner (26-contact)
    labels = fuse_priority({"LA": la, "PV": diagonal}, T, SHAPE)
    assert rule_contact(labels, T["PV"], {"LA": la, "PV": diagonal}, T, (1.0, 0.9, 1.2), 0.0).components_removed == 0
    labels = fuse_priority({"PV": diagonal}, T, SHAPE)  # no LA at all: nothing touches it
    row = rule_contact(labels, T["PV"], {"PV": diagonal}, T, (1.0, 0.9, 1.2))
    assert row.components_removed == 1 and not (labels == T["PV"].index).any()


def test_contact_reach_is_millimetres_whatever_the_voxels():
    """A piece one background voxel from the LA (two voxel steps) is attached within a reach of 2.4 mm at
    1 mm voxels and removed at 2 mm voxels (4 mm apart), and at 0.35 mm voxels one 1.05 mm away (three
    steps) is still attached; touching counts at any reach."""
    la = box((2, 2, 2), (6, 6, 6))
    near = box((7, 2, 2), (9, 6, 6))  # one background voxel between it and the LA: two steps away
    for spacing, reach, removed in (((1.0, 1.0, 1.0), 2.4, 0), ((2.0, 2.0, 2.0), 2.4, 1),
                                    ((1.0, 1.0, 1.0), 0.0, 1), ((1.0, 0.9, 1.2), 1.5, 1)):
        labels = fuse_priority({"LA": la, "PV": near}, T, SHAPE)
        row = rule_contact(labels, T["PV"], {"LA": la, "PV": near}, T, spacing, reach)
        assert row.components_removed == removed, (spacing, reach)
    far = box((8, 2, 2), (10, 6, 6))  # three steps: 1.05 mm at 0.35 mm voxels, 3 mm at 1 mm
    for spacing, removed in (((0.35, 0.35, 0.5), 0), ((1.0, 1.0, 1.0), 1)):
        labels = fuse_priority({"LA": la, "PV": far}, T, SHAPE)
        assert rule_contact(labels, T["PV"], {"LA": la, "PV": far}, T, spacing, 2.4).components_removed == removed
    with pytest.raises(ValueError, match="contact_reach_mm"):
        Stage2Params(contact_reach_mm=-1.0)


def test_distance_rule_is_spacing_aware_and_drops_small_pieces():
    myo = box((2, 2, 2), (8, 17, 11))
    near = box((10, 3, 3), (14, 5, 5))  # 2 voxels from Myo along i
    far = box((20, 3, 3), (24, 5, 5))  # 12 voxels away
    crumb = box((9, 12, 8), (10, 13, 9))  # 1 voxel, touching distance
    masks = {"Myo": myo, "Cor": near | far | crumb}
    labels = fuse_priority(masks, T, SHAPE)
    row = rule_distance(labels, T["Cor"], masks, T, SPACING, min_piece_mm3=2.0)
    assert row.components_before == 3 and row.components_removed == 2
    assert np.all(labels[near] == T["Cor"].index) and not labels[far].any() and not labels[crumb].any()
    # the same voxels 1.0 -> 2.0 mm apart along i: the near piece is now 4 mm > 3 mm away
    labels = fuse_priority(masks, T, SHAPE)
    row = rule_distance(labels, T["Cor"], masks, T, np.array([2.0, 1.0, 1.0]), min_piece_mm3=0.0)
    assert not (labels == T["Cor"].index).any() and row.components_removed == 3


def test_bridge_joins_a_broken_tube_but_not_pieces_beyond_the_gap():
    tube = box((2, 8, 6), (24, 10, 8))
    broken = tube.copy()
    broken[9:12] = False  # 3-voxel gap
    island = box((2, 1, 1), (6, 3, 3))  # ~6 voxels from the tube
    labels = fuse_priority({"Cor": broken | island}, T, SHAPE)
    cor = dataclasses.replace(T["Cor"], expected_components=1)
    row = rule_bridge(labels, cor, SPACING, max_gap_mm=4.5, radius_vox=0)
    assert row.components_before == 3 and row.components_after == 2  # tube joined, island not
    added = (labels == T["Cor"].index) & ~(broken | island)
    assert row.voxels_changed == added.sum() >= 3  # at least a line across the 3-voxel gap
    assert not np.any(added & ~tube)  # closest points face each other: the line stays in the tube
    labels2 = fuse_priority({"Cor": broken | island}, T, SHAPE)
    assert rule_bridge(labels2, cor, SPACING, max_gap_mm=2.0, radius_vox=0).voxels_changed == 0


def test_holes_fill_small_myo_cavities_not_large_ones_or_chambers():
    myo = box((2, 2, 2), (20, 16, 11))
    small_hole, big_hole = box((5, 5, 5), (7, 7, 7)), box((10, 4, 3), (18, 14, 10))
    lv_hole = box((4, 10, 4), (6, 12, 6))
    lv = box((3, 9, 3), (7, 13, 7)) & ~lv_hole  # a cavity walled by LV, inside the Myo block
    labels = fuse_priority({"Myo": myo & ~small_hole & ~big_hole, "LV": lv}, T, SHAPE)
    labels[lv_hole] = 0
    row = rule_holes(labels, T["Myo"], SPACING, max_mm3=50.0, min_share=0.5)
    assert np.all(labels[small_hole] == T["Myo"].index)
    assert not labels[big_hole].any()  # 8*10*7 mm^3 > 50
    assert not labels[lv_hole].any()  # walled by LV: not a hole in the myocardium
    assert row.voxels_changed == small_hole.sum()


def test_holes_split_a_sliver_between_two_classes_by_nearest_wall():
    myo, lv = box((2, 2, 2), (10, 17, 11)), box((11, 2, 2), (20, 17, 11))
    outer = box((1, 1, 1), (21, 18, 12)) & ~box((2, 2, 2), (20, 17, 11))  # Myo skin enclosing both
    labels = fuse_priority({"Myo": myo | outer, "LV": lv}, T, SHAPE)
    row = rule_holes(labels, T["Myo"], SPACING, max_mm3=1000.0, min_share=0.5)
    assert row.voxels_changed == 15 * 9  # the sliver i = 10 is filled...
    sliver = labels[10, 2:17, 2:11]
    assert set(np.unique(sliver)) <= {T["Myo"].index, T["LV"].index}


def test_largest_keeps_expected_components_and_reassigns_the_rest():
    lv_main, lv_piece = box((2, 2, 2), (12, 10, 9)), box((18, 12, 2), (21, 15, 5))
    rv = box((17, 11, 1), (23, 17, 6))
    masks = {"LV": lv_main | lv_piece, "RV": rv}
    labels = fuse_priority(masks, T, SHAPE)
    row = rule_largest(labels, T["LV"], masks, T)
    assert row.components_removed == 1 and row.components_after == 1
    assert np.all(labels[lv_piece] == T["RV"].index)
    ao = box((2, 12, 2), (6, 16, 6)) | box((10, 12, 2), (14, 16, 6)) | box((20, 2, 8), (22, 4, 10))
    labels = fuse_priority({"Ao": ao}, T, SHAPE)
    row = rule_largest(labels, T["Ao"], {"Ao": ao}, T)  # the aorta keeps its 2 largest
    assert row.components_removed == 1 and n_comp(labels, "Ao") == 2


def test_fuse_case_end_to_end_makes_every_check_hold_and_audits():
    la, lv, myo = box((2, 2, 2), (9, 8, 7)), box((12, 2, 2), (20, 8, 8)), box((11, 1, 1), (21, 9, 9))
    masks = {"LA": la | box((22, 15, 10), (24, 17, 12)),  # an LA island
             "LV": lv, "Myo": myo & ~lv & ~box((14, 1, 4), (16, 2, 6)),  # a Myo hole at the wall
             "LAA": box((9, 3, 3), (11, 5, 5)) | box((2, 12, 2), (4, 14, 4)),  # one attached, one not
             "PV": box((4, 8, 2), (6, 11, 4)),  # touches LA
             "Cor": box((12, 10, 3), (20, 11, 5)) | box((2, 16, 10), (4, 18, 12))}  # near Myo / far
    result = fuse_case(masks, T, SPACING, Stage2Params(bridge_gap_mm=0.0))
    labels = result.labels
    assert labels.shape == SHAPE
    assert all(r["frac_attached"] == 1.0 for r in attachment_report(labels, SPACING, T) if r["n_components"])
    counts = component_counts(labels, T)
    for key in ("LA", "LV", "LAA", "Cor"):
        assert counts[key] == 1, key
    rules = {(r.rule, r.key) for r in result.audit}
    assert {("contact", "LAA"), ("contact", "PV"), ("distance", "Cor"), ("holes", "Myo"),
            ("largest", "LA")} <= rules
    assert sorted(result.absent) == ["Ao", "PA", "RA", "RV"]
    changed = {(r.rule, r.key): r.voxels_changed for r in result.audit}
    assert changed[("contact", "LAA")] == 8 and changed[("largest", "LA")] == 8
    assert all(isinstance(v, int) for rec in result.audit_records() for v in rec.values() if not isinstance(v, str))


def test_rules_can_be_switched_off_and_params_are_validated():
    masks = {"LA": box((2, 2, 2), (6, 6, 6)), "LAA": box((12, 12, 8), (14, 14, 10))}
    kept = fuse_case(masks, T, SPACING, Stage2Params(rules=[]))
    assert (kept.labels == T["LAA"].index).sum() == 8 and kept.audit == []
    with pytest.raises(ValueError, match="unknown rules"):
        Stage2Params(rules=["contact", "smooth"])
    # keys the table lacks are reported and skipped: the cardiac defaults work on any table
    params = Stage2Params(keep_largest=["Aorta", "LA"])
    assert params.unknown_keys(T) == {"keep_largest": ["Aorta"]}
    assert {(r.rule, r.key) for r in fuse_case(masks, T, SPACING, params).audit} >= {("largest", "LA")}
    three = T.subset(["LA", "LAA", "Ao"])  # no Myo, LV, ...: the default rules still run
    assert Stage2Params().unknown_keys(three) == {"fill_holes": ["Myo"],
                                                  "keep_largest": ["LV", "RA", "RV", "PA", "Myo"]}
    assert fuse_case(masks, three, SPACING, Stage2Params()).labels.max() == T["LA"].index
    with pytest.raises(ValueError, match="hole_min_share"):
        Stage2Params(hole_min_share=1.5)
    with pytest.raises(ValueError, match="spacing"):
        fuse_case(masks, T, (1.0, 0.0, 1.0), Stage2Params())
