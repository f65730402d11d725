"""Component clean-up against a brute-force BFS, on asymmetric shapes."""

import itertools
from collections import deque

import numpy as np
import pytest

from nearfix_lib.core.config import CleanupParams
from nearfix_lib.core.metrics import mask_components
from nearfix_lib.repair.cleanup import (
    CleanupReport,
    clean_mask,
    drop_enclosed,
    drop_small_components,
    drop_unattached,
    joined_through,
    keep_largest_components,
    split_at_origins,
    split_joins,
)

SHAPE = (12, 9, 7)
NEIGHBOURS = {
    26: [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)],
    6: [d for d in itertools.product((-1, 0, 1), repeat=3) if sum(map(abs, d)) == 1],
}
NO_RULES = CleanupParams(keep_expected=False)


def bfs_components(mask, connectivity=26):
    """Components as voxel lists, in the C order of their first voxel."""
    seen = np.zeros(mask.shape, dtype=bool)
    comps = []
    for start in map(tuple, np.argwhere(mask)):
        if seen[start]:
            continue
        seen[start] = True
        comp, queue = [], deque([start])
        while queue:
            v = queue.popleft()
            comp.append(v)
            for d in NEIGHBOURS[connectivity]:
                w = tuple(a + b for a, b in zip(v, d))
                if all(0 <= w[a] < mask.shape[a] for a in range(3)) and mask[w] and not seen[w]:
                    seen[w] = True
                    queue.append(w)
        comps.append(comp)
    return comps


def reference(mask, comps, keep):
    out = np.zeros(mask.shape, dtype=bool)
    for c in keep:
        out[tuple(np.array(comps[c]).T)] = True
    return out


def ranked(comps):
    return sorted(range(len(comps)), key=lambda c: (-len(comps[c]), c))


def random_mask(seed, shape=SHAPE, density=0.22):
    return np.random.default_rng(seed).random(shape) < density


@pytest.mark.parametrize("connectivity", [26, 6])
@pytest.mark.parametrize("seed", range(6))
def test_matches_bfs_reference(seed, connectivity):
    mask = random_mask(seed, density=0.12 if connectivity == 26 else 0.3)
    comps = bfs_components(mask, connectivity)
    assert len(comps) > 5
    order = ranked(comps)
    for n in (1, 2, 5, len(comps) + 3):
        got = keep_largest_components(mask, n, connectivity)
        assert np.array_equal(got, reference(mask, comps, order[:n]))
    for min_voxels in (2, 4):
        keep = [c for c in range(len(comps)) if len(comps[c]) >= min_voxels or c == order[0]]
        got = drop_small_components(mask, min_voxels, connectivity)
        assert np.array_equal(got, reference(mask, comps, keep))
    if connectivity == 26:
        _, report = clean_mask(mask, 3, (1.0, 1.0, 1.0), CleanupParams())
        assert report.components_before == len(comps)
        assert report.removed_voxels == sum(len(comps[c]) for c in order[3:])


def cubes(shape, corners, size=2):
    mask = np.zeros(shape, dtype=bool)
    for i, j, k in corners:
        mask[i:i + size, j:j + size, k:k + size] = True
    return mask


def test_ties_keep_the_first_component_in_c_order():
    shape = (15, 12, 10)
    corners = [(10, 1, 1), (1, 8, 1), (1, 1, 6)]  # first voxels in C order: 3rd, 2nd, 1st
    mask = cubes(shape, corners)
    assert np.array_equal(keep_largest_components(mask, 1), cubes(shape, [(1, 1, 6)]))
    assert np.array_equal(keep_largest_components(mask, 2), cubes(shape, [(1, 1, 6), (1, 8, 1)]))
    flipped = mask[:, :, ::-1]  # now (1, 1, 2) comes first, then (1, 8, 7)
    assert np.array_equal(keep_largest_components(flipped, 1), cubes(shape, [(1, 1, 2)]))


def sized_components(shape=(20, 13, 9)):
    """Components of 100 (5x5x4), 10 (5x2x1) and 4 (2x2x1) voxels, far apart."""
    mask = np.zeros(shape, dtype=bool)
    mask[1:6, 1:6, 1:5] = True
    mask[12:17, 9:11, 7] = True
    mask[17:19, 2:4, 2] = True
    return mask


def test_minimum_volume_uses_anisotropic_spacing():
    mask = sized_components()
    spacing = (0.5, 0.8, 3.0)  # 1.2 mm3 per voxel: components of 120, 12 and 4.8 mm3
    out, report = clean_mask(mask, 1, spacing, CleanupParams(keep_expected=False, min_component_mm3=5.0))
    assert out.sum() == 110 and not out[17:19, 2:4, 2].any()
    assert (report.removed_components, report.removed_voxels) == (1, 4)
    p = CleanupParams(keep_expected=False, min_component_mm3=4.5)
    assert clean_mask(mask, 1, spacing, p)[0].sum() == 114
    assert clean_mask(mask, 1, (1.0, 1.0, 1.0), p)[0].sum() == 110  # 4 mm3 at 1 mm3 per voxel


def test_relative_rule_and_expected_count():
    mask = sized_components()
    rel, report = clean_mask(mask, 1, (1, 1, 1), CleanupParams(keep_expected=False,
                                                             min_fraction_of_largest=0.05))
    assert rel.sum() == 110 and report == CleanupReport(3, 2, 1, 4, 0)
    rel, _ = clean_mask(mask, 1, (1, 1, 1), CleanupParams(keep_expected=False, min_fraction_of_largest=0.15))
    assert rel.sum() == 100
    two, report = clean_mask(mask, 2, (1, 1, 1), CleanupParams())
    assert two.sum() == 110 and report == CleanupReport(3, 2, 1, 4, 0)
    everything, report = clean_mask(mask, 1, (1, 1, 1), NO_RULES)
    assert np.array_equal(everything, mask) and report == CleanupReport(3, 3, 0, 0, 0)


def test_largest_component_always_stays():
    mask = sized_components()
    out, report = clean_mask(mask, 1, (0.8, 1.1, 2.5), CleanupParams(min_component_mm3=1e6,
                                                                      min_fraction_of_largest=1.0))
    assert out.sum() == 100 and out[1:6, 1:6, 1:5].all()
    assert report == CleanupReport(3, 1, 2, 14, 0)
    assert drop_small_components(mask, 10_000).sum() == 100


def test_empty_mask():
    empty = np.zeros((7, 5, 3), dtype=np.uint8)
    out, report = clean_mask(empty, 2, (1, 1, 1), CleanupParams(fill_holes=True))
    assert out.shape == empty.shape and out.dtype == bool and not out.any()
    assert report == CleanupReport(0, 0, 0, 0, 0)
    assert not keep_largest_components(empty, 1).any()
    assert not drop_small_components(empty, 3).any()


def test_fill_holes_on_a_hollow_sphere():
    shape = (27, 21, 17)
    g = np.indices(shape) - np.array([14, 9, 8])[:, None, None, None]
    r = np.sqrt((g ** 2).sum(axis=0))
    ball, shell = r <= 7, (r <= 7) & (r >= 4.5)
    mask = shell.copy()
    mask[14, 9, 8] = True  # an island inside the cavity: merged by the filling
    out, report = clean_mask(mask, 1, (1, 1, 1), CleanupParams(keep_expected=False))
    assert np.array_equal(out, mask) and report.components_before == 2 and report.filled_voxels == 0
    out, report = clean_mask(mask, 2, (1, 1, 1), CleanupParams(fill_holes=True))
    assert np.array_equal(out, ball)
    assert report == CleanupReport(2, 1, 0, 0, int(ball.sum() - mask.sum()))


def test_input_is_untouched_and_params_validate():
    mask = sized_components().astype(np.uint8)
    before = mask.copy()
    clean_mask(mask, 1, (1, 1, 1), CleanupParams(fill_holes=True))
    assert np.array_equal(mask, before)
    with pytest.raises(ValueError):
        CleanupParams(min_fraction_of_largest=1.5)
    with pytest.raises(ValueError):
        CleanupParams(min_component_mm3=-1)
    with pytest.raises(ValueError):
        clean_mask(mask, 0, (1, 1, 1), CleanupParams())
    with pytest.raises(ValueError):
        clean_mask(mask, 1, (1, 1), CleanupParams())
    with pytest.raises(ValueError):
        keep_largest_components(mask, 0)


def test_keep_near_keeps_broken_pieces_and_drops_far_islands():
    """A tube cut by a 3-voxel gap keeps its piece; an island 12 mm away goes."""
    mask = np.zeros((40, 12, 10), dtype=bool)
    mask[2:15, 5:7, 4:6] = True  # main piece (largest)
    mask[18:25, 5:7, 4:6] = True  # broken-off piece, gap of 3 voxels along i
    mask[37:39, 5:7, 4:6] = True  # island far away along i
    spacing = (1.0, 0.5, 0.5)
    base = CleanupParams(keep_expected=True)
    only_largest, _ = clean_mask(mask, 1, spacing, base)
    assert only_largest.sum() == 13 * 4
    near, report = clean_mask(mask, 1, spacing, CleanupParams(keep_expected=True, keep_near_mm=5.0))
    assert near[18:25, 5:7, 4:6].all() and not near[37:].any()
    assert report.removed_components == 1 and report.components_after == 2
    # the distance is in mm: at 2 mm along i the gap is 8 mm and the piece goes too
    far, _ = clean_mask(mask, 1, (2.0, 0.5, 0.5), CleanupParams(keep_expected=True, keep_near_mm=5.0))
    assert not far[18:25].any()
    with pytest.raises(ValueError, match="keep_near_mm"):
        CleanupParams(keep_near_mm=-1.0)


def test_keep_near_follows_a_chain_of_pieces():
    mask = np.zeros((60, 8, 8), dtype=bool)
    for start in (2, 22, 30, 38):  # main (largest) then pieces 4 voxels apart, each near the last
        mask[start:start + (16 if start == 2 else 4), 3:5, 3:5] = True
    mask[55:57, 3:5, 3:5] = True  # 13 voxels beyond the last piece: an island
    out, report = clean_mask(mask, 1, (1.0, 1.0, 1.0), CleanupParams(keep_near_mm=5.0))
    assert out[38:42, 3:5, 3:5].all() and not out[55:].any()
    assert report.components_after == 4 and report.removed_components == 1


def test_bridge_joins_pieces_across_gaps_in_mm_before_the_rules():
    """Two trees (expected 2): a piece 3 voxels off tree A is tubed in, a far island is not."""
    mask = np.zeros((40, 14, 10), dtype=bool)
    mask[2:15, 3:5, 4:6] = True  # tree A (largest)
    mask[2:12, 10:12, 4:6] = True  # tree B
    mask[18:22, 3:5, 4:6] = True  # piece of A past a gap of 3 voxels along i
    mask[36:38, 10:12, 4:6] = True  # island 24 voxels past tree B
    params = CleanupParams(keep_expected=False, bridge_gap_mm=4.0, bridge_radius_vox=0)
    out, report = clean_mask(mask, 2, (1.0, 0.5, 0.5), params)
    added = out & ~mask
    assert added[15:18, 3:5, 4:6].any() and not added[:, 6:].any() and not added[22:].any()
    assert report.components_before == 4 and report.components_after == 3
    assert report.bridged_voxels == added.sum() >= 3
    assert out[36:38].any()  # nothing asked for the island to go
    # in mm: at 2 mm along i the gap is 6 mm and nothing is joined
    far, far_report = clean_mask(mask, 2, (2.0, 0.5, 0.5), params)
    assert np.array_equal(far, mask) and far_report.bridged_voxels == 0
    # a tube of radius 1 is thicker than the line, and the rules run after the bridge
    thick, _ = clean_mask(mask, 2, (1.0, 0.5, 0.5), CleanupParams(keep_expected=True, bridge_gap_mm=4.0))
    assert (thick & ~mask).sum() > added.sum() and thick[18:22, 3:5, 4:6].all() and not thick[36:].any()
    with pytest.raises(ValueError, match="bridge"):
        CleanupParams(bridge_gap_mm=-1.0)


def test_the_coronary_defaults_bridge_a_14_mm_gap_and_leave_a_20_mm_one():
    """The coronaries' clean-up (stage 1's defaults) joins a tree's piece 14 mm away (a segmenter's
    broken stretch; 12 mm left a third of the tuning seeds' trees in pieces) and keeps one 20 mm away
    apart, in mm on anisotropic voxels."""
    from nearfix_lib.core.config import Stage1Params

    params = Stage1Params().for_class("Cor").cleanup
    spacing = (0.5, 1.0, 0.8)  # asymmetric: along i a voxel is 0.5 mm
    mask = np.zeros((100, 12, 9), dtype=bool)
    mask[2:30, 2:4, 3:5] = True  # tree A
    mask[2:26, 8:10, 3:5] = True  # tree B
    mask[58:78, 2:4, 3:5] = True  # a piece of A (32 mm^3) past 28 voxels = 14 mm along i
    out, report = clean_mask(mask, 2, spacing, params)
    added = out & ~mask
    assert added[30:58, 1:5, 2:6].sum() >= 28 and not added[78:].any() and not added[:, 6:].any()
    assert report.components_before == 3 and report.components_after == 2
    mask[58:78] = False
    mask[70:90, 2:4, 3:5] = True  # now 40 voxels = 20 mm past tree A
    far, far_report = clean_mask(mask, 2, spacing, params)
    assert far_report.bridged_voxels == 0 and np.array_equal(far, mask)


def test_joined_through_adds_only_the_joiner_pieces_that_connect_two_pieces():
    """Two pieces of a vessel with a gap; the joiner (a field's own mask) crosses the gap, widens one
    piece elsewhere, and has a blob apart: only the crossing is added, and the mask is untouched."""
    shape = (7, 30, 9)  # asymmetric: an axis mix-up would move the pieces out of the box
    mask = np.zeros(shape, bool)
    mask[3, 2:12, 4] = mask[3, 16:28, 4] = True
    crossing, shell, blob = (np.zeros(shape, bool) for _ in range(3))
    crossing[3, 11:17, 4] = True  # overlaps both pieces' ends: its part outside the mask is the gap
    shell[4, 20:26, 4] = True  # beside the second piece only: it would widen it, not join anything
    blob[0, 2:4, 0:2] = True  # touches nothing
    joiner = crossing | shell | blob
    before = mask.copy()
    out = joined_through(mask, joiner)
    assert np.array_equal(mask, before)
    assert np.array_equal(out, mask | crossing)
    assert mask_components(out) == 1
    assert np.array_equal(joined_through(mask, np.zeros(shape, bool)), mask)
    one = np.zeros(shape, bool)
    one[3, 2:12, 4] = True
    assert np.array_equal(joined_through(one, joiner), one)  # one piece: nothing to join
    with pytest.raises(ValueError, match="differ in shape"):
        joined_through(mask, joiner[:, :, :5])


def test_drop_unattached_keeps_pieces_that_touch_where_the_class_may_lie():
    """Of three pieces, the one touching ``attached`` and the largest (touching nothing) stay; the
    island apart goes, with its voxel count; the mask is untouched."""
    shape = (9, 24, 7)
    mask = np.zeros(shape, bool)
    mask[2, 1:13, 3] = True  # the largest, away from everything
    mask[6, 15:20, 3] = True  # a piece whose end touches where the class may lie
    mask[7, 22:24, 5] = True  # an island
    attached = np.zeros(shape, bool)
    attached[6:9, 19:21, :] = True
    before = mask.copy()
    out, dropped = drop_unattached(mask, attached)
    assert np.array_equal(mask, before)
    assert dropped == 2 and np.array_equal(out, mask & ~(np.arange(shape[0]) == 7)[:, None, None])
    assert drop_unattached(np.zeros(shape, bool), attached)[1] == 0
    with pytest.raises(ValueError, match="differ in shape"):
        drop_unattached(mask, attached[:5])


def test_drop_enclosed_takes_a_blob_inside_a_chamber_not_a_piece_beside_one():
    """Two trees, a blob inside a chamber's labels (its surroundings all chamber) and a piece of vessel
    along the chamber's wall (its surroundings a third chamber): the blob goes, the rest stays; at the
    expected count or with a share nothing reaches, nothing moves; the mask is untouched."""
    shape = (20, 16, 12)
    mask = np.zeros(shape, bool)
    mask[1:19, 1, 1] = mask[1:19, 1, 10] = True  # the trees
    mask[9:11, 6:8, 5:7] = True  # the blob, 8 voxels (fewer than a tree's 18)
    mask[2:8, 14, 6] = True  # a stretch of vessel on a chamber's wall
    foreign = np.zeros(shape, bool)
    foreign[5:16, 4:12, 3:10] = True  # the chamber around the blob
    foreign[2:8, 12:14, 4:9] = True  # the wall beside the stretch: one side of its surroundings
    foreign &= ~mask
    before = mask.copy()
    out, dropped = drop_enclosed(mask, [(foreign, 0.6)], 2)
    blob = np.zeros(shape, bool)
    blob[9:11, 6:8, 5:7] = True
    assert np.array_equal(mask, before) and dropped == 8 and np.array_equal(out, mask & ~blob)
    at_count, none = drop_enclosed(mask, [(foreign, 0.6)], 4)
    assert none == 0 and np.array_equal(at_count, mask)
    kept, none = drop_enclosed(mask, [(foreign, 1.0)], 2)
    assert none == 0 and np.array_equal(kept, mask)
    assert drop_enclosed(mask, [], 2)[1] == 0
    with pytest.raises(ValueError, match="differ in shape"):
        drop_enclosed(mask, [(foreign[:5], 0.6)], 2)


def test_drop_enclosed_takes_each_region_at_its_own_share():
    """The aorta taken on its own at 0.8 beside the chambers at 0.6: a blob inside the aorta's labels goes,
    a stretch of vessel along its wall (half its surroundings aorta, half a chamber) stays, though the two
    as one region at 0.6 would take it too; without the aorta's region the blob stays (it is not foreign)."""
    shape = (20, 16, 12)
    mask = np.zeros(shape, bool)
    mask[1:19, 1, 1] = mask[1:19, 1, 10] = True  # the trees
    blob = np.zeros(shape, bool)
    blob[9:11, 6:8, 5:7] = True  # 8 voxels in the aortic lumen
    mask |= blob
    mask[2:8, 14, 6] = True  # a stretch of vessel between the aorta and a chamber
    aorta = np.zeros(shape, bool)
    aorta[5:16, 4:12, 3:10] = True  # around the blob
    aorta[0:10, 11:14, 2:11] = aorta[0:10, 14, 2:6] = True  # the stretch's one side ...
    foreign = np.zeros(shape, bool)
    foreign[0:10, 15, 2:11] = foreign[0:10, 14, 7:11] = True  # ... its other side, a chamber
    aorta &= ~mask
    foreign &= ~mask
    before = mask.copy()
    out, dropped = drop_enclosed(mask, [(foreign, 0.6), (aorta, 0.8)], 2)
    assert np.array_equal(mask, before) and dropped == 8 and np.array_equal(out, mask & ~blob)
    assert drop_enclosed(mask, [(foreign | aorta, 0.6)], 2)[1] > 8  # one region: the stretch goes too
    assert drop_enclosed(mask, [(aorta, 0.5)], 2)[1] > 8  # the aorta at a chamber's share: so does it
    kept, none = drop_enclosed(mask, [(foreign, 0.6)], 2)
    assert none == 0 and np.array_equal(kept, mask)


def _two_trees(shape=(30, 11, 8)):
    """Two straight 'trees' along i, each 10 voxels, joined by 4 voxels another class holds."""
    mask, others = np.zeros(shape, bool), np.zeros(shape, bool)
    mask[2:26, 5, 3] = True
    others[12:16] = True  # the aorta between the ostia, say
    return mask, others


def test_split_joins_parts_two_trees_joined_over_another_class():
    mask, others = _two_trees()
    before = mask.copy()
    out, removed = split_joins(mask, others, expected=2, min_voxels=3)
    assert np.array_equal(mask, before)
    # the cut: the layer halfway between the trees, both sides of it (i = 13, 14), not the whole join
    cut = np.zeros_like(mask)
    cut[13:15, 5, 3] = True
    assert removed == 2 and np.array_equal(out, mask & ~cut) and mask_components(out) == 2
    # already at the expected count, or a class of one piece: nothing to part
    assert split_joins(mask, others, expected=1, min_voxels=3)[1] == 0
    assert split_joins(out, others, expected=2, min_voxels=3)[1] == 0
    # the join is the class's own where the input says so: nothing over another class, nothing parted
    assert split_joins(mask, np.zeros_like(others), expected=2, min_voxels=3)[1] == 0
    with pytest.raises(ValueError, match="differ in shape"):
        split_joins(mask, others[:, :5], expected=2, min_voxels=3)


def test_split_joins_parts_only_into_the_expected_count_of_real_pieces():
    """A join that would leave a stub (under ``min_voxels``) or more pieces than expected stays; of the
    joins that give the expected count, the one that parts the trees (not a stub) goes."""
    mask, others = _two_trees()
    assert split_joins(mask, others, expected=2, min_voxels=12)[1] == 0  # the cut leaves two of 11 voxels
    # a second crossing over another class inside the first tree: removing every join would give three
    # pieces, cutting that one a stub of 5 voxels from the rest: only the cut between the trees goes
    others2 = others.copy()
    others2[5:9, 5, 3] = True
    out, removed = split_joins(mask, others2, expected=2, min_voxels=2)
    assert mask_components(out) == 2 and removed == 2
    assert out[5:9, 5, 3].all() and not out[13:15, 5, 3].any()
    # a loop: two joins side by side between the same pieces; removing one leaves them joined
    looped = mask.copy()
    looped[11:17, 7, 3] = looped[11, 6, 3] = looped[16, 6, 3] = True
    assert split_joins(looped, others, expected=2, min_voxels=3)[1] == 0


def test_split_at_origins_parts_a_piece_that_reaches_its_origin_on_both_sides_of_a_join():
    """Two trees joined over the aorta, each leaving it (``origins`` on both sides of the join), part
    whatever the count: with a fragment elsewhere the mask has the expected two pieces, which split_joins
    leaves alone. The
    parting layer is split_joins' own; the input is untouched."""
    mask, others = _two_trees()
    mask[28, 1:4, 1] = True  # a fragment of one tree, away from everything: two pieces, as expected
    origins = np.zeros_like(mask)
    origins[10:18] = True  # beside the aorta, where both ostia are
    before = mask.copy()
    assert split_joins(mask, others, expected=2, min_voxels=3)[1] == 0  # the count hides the join
    out, removed = split_at_origins(mask, others, origins, min_voxels=3)
    assert np.array_equal(mask, before)
    cut = np.zeros_like(mask)
    cut[13:15, 5, 3] = True
    assert removed == 2 and np.array_equal(out, mask & ~cut) and mask_components(out) == 3
    assert split_at_origins(out, others, origins, min_voxels=3)[1] == 0  # parted once, for good
    with pytest.raises(ValueError, match="differ in shape"):
        split_at_origins(mask, others, origins[:, :5], min_voxels=3)


def test_split_at_origins_leaves_a_tree_whose_own_stretch_crosses_another_class():
    """A join with the origin on one side only is one tree whose stretch the segmenter gave a neighbour
    (its distal part lies away from the aorta): it stays, as do a side under ``min_voxels``, a join
    over no other class and a loop; of two joins the one between the origins goes."""
    mask, others = _two_trees()
    one_side = np.zeros_like(mask)
    one_side[14:18] = True  # only the far tree reaches the aorta: its near part is no second tree
    assert split_at_origins(mask, others, one_side, min_voxels=3)[1] == 0
    origins = np.zeros_like(mask)
    origins[10:18] = True
    assert split_at_origins(mask, others, origins, min_voxels=12)[1] == 0  # sides of 11 voxels
    assert split_at_origins(mask, np.zeros_like(others), origins, min_voxels=3)[1] == 0
    looped = mask.copy()
    looped[11:17, 7, 3] = looped[11, 6, 3] = looped[16, 6, 3] = True
    assert split_at_origins(looped, others, origins, min_voxels=3)[1] == 0
    others2 = others.copy()
    others2[5:9, 5, 3] = True  # the first tree's own stretch over a neighbour, far from the aorta
    out, removed = split_at_origins(mask, others2, origins, min_voxels=2)
    assert removed == 2 and out[5:9, 5, 3].all() and not out[13:15, 5, 3].any() and mask_components(out) == 2


def test_the_smallest_piece_kept_in_voxels_rounds_up_and_is_at_least_one():
    assert CleanupParams(min_component_mm3=30.0).min_component_voxels((0.9, 0.9, 1.2)) == 31  # 30 / 0.972 = 30.9
    assert CleanupParams(min_component_mm3=30.0).min_component_voxels((1.0, 1.0, 1.5)) == 20
    assert CleanupParams().min_component_voxels((1.1, 1.1, 1.1)) == 1  # no rule: every piece counts
