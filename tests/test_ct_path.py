"""A broken tree joined along the CT's lumen (``repair.ct_path``): on straight synthetic vessels whose CT
is painted from a known lumen (blurred, with noise), a stretch the mask lost is put back along the
lumen; a gap the CT does not show as lumen stays unless the path may cost more; a class as bright as
the lumen is a wall, a darker one that swallowed the vessel is not; two trees never become one; a
poor CT joins nothing; a blob darker than the vessel's surroundings (a segmenter's false positive in the
lung) goes, a stretch of vessel stays."""

import dataclasses

import cc3d
import numpy as np
import pytest
from scipy import ndimage
from test_ct_edge import SHAPE, SPACING, painted_ct

from nearfix_lib.core.config import CTPathParams
from nearfix_lib.core.metrics import dice
from nearfix_lib.repair.ct_path import (
    PATH_PREFIX,
    drop_dark_pieces,
    join_along_lumen,
    lumen_like,
    tree_pieces,
    tree_radius_mm,
)

ON = CTPathParams(enabled=True)
GAP = slice(15, 24)  # the stretch of tree one the mask lost: 9 voxels of 0.9 mm along axis 0


def cylinder(centre_mm: tuple[float, float], radius: float = 1.8, spacing=SPACING) -> np.ndarray:
    """A straight vessel along axis 0 (voxels 3-36) centred at (j, k) mm."""
    _, j, k = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, spacing)], indexing="ij")
    out = (j - centre_mm[0]) ** 2 + (k - centre_mm[1]) ** 2 <= radius ** 2
    out[:3], out[37:] = False, False
    return out


def pieces(mask: np.ndarray) -> int:
    return int(cc3d.connected_components(mask, connectivity=26, return_N=True)[1])


def two_trees() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two trees' lumens, and a mask with tree one's stretch GAP lost (three pieces)."""
    one, two = cylinder((12.0, 10.0)), cylinder((24.0, 20.0))
    mask = one | two
    mask[GAP] &= ~one[GAP]
    return one, one | two, mask


def test_a_lost_stretch_is_put_back_along_the_lumen():
    one, lumen, mask = two_trees()
    joined, report = join_along_lumen(mask, painted_ct(lumen), np.zeros(SHAPE, np.int16), 2, SPACING, ON)
    assert pieces(mask) == 3 and pieces(joined) == 2
    assert not (mask & ~joined).any()  # it only adds
    added = joined & ~mask
    assert report.joined == 1 and report.added == int(added.sum()) > 0
    assert (added & one).sum() >= 0.8 * added.sum()  # along tree one's lumen, not across the fat to tree two
    assert dice(joined, lumen) > dice(mask, lumen) + 0.05
    assert report.contrast_noise > 2.0
    assert set(report.columns()) == {f"{PATH_PREFIX}{n}" for n in ("joined", "added", "contrast_noise", "dark_dropped")}


def test_a_gap_the_ct_does_not_show_stays_unless_the_path_may_cost_more():
    _, _, mask = two_trees()
    ct = painted_ct(mask)  # no lumen in the gap: 8 mm of fat, a path of cost ~80 mm
    kept, report = join_along_lumen(mask, ct, np.zeros(SHAPE, np.int16), 2, SPACING, ON)
    assert np.array_equal(kept, mask) and report.joined == 0 and report.added == 0
    crossed, report = join_along_lumen(mask, ct, np.zeros(SHAPE, np.int16), 2, SPACING,
                                       dataclasses.replace(ON, max_cost_mm=200.0))
    assert pieces(crossed) == 2 and report.joined == 1


@pytest.mark.parametrize(("hu", "passes"), [(350.0, False), (40.0, True)])
def test_a_class_as_bright_as_the_lumen_is_a_wall_a_darker_one_is_not(hu, passes):
    """The lost stretch lies in a slab the input gives another class: a blood pool (350 HU, as bright
    as the lumen: the CT cannot tell the vessel from it) or a myocardium (40 HU) that swallowed it."""
    one, lumen, mask = two_trees()
    neighbours = np.zeros(SHAPE, np.int16)
    neighbours[GAP] = 3
    neighbours[mask] = 0
    ct = painted_ct(lumen)
    ct[GAP] = np.where(lumen[GAP], ct[GAP], ct[GAP] - (-100.0) + hu)  # the slab's tissue, the lumen kept
    assert lumen_like(ct, neighbours, 100.0).any() is not passes
    joined, report = join_along_lumen(mask, ct, neighbours, 2, SPACING, ON)
    assert (pieces(joined) == 2) is passes and (report.joined == 1) is passes
    assert not (joined & ~mask & ~one).any() or passes  # a wall: nothing added at all


def test_two_trees_stay_two_one_tree_is_joined():
    """One vessel cut twice, a one-slice piece between the cuts (axis 0 at 0.5 mm: a widened path
    reaches across the second cut). With two trees expected, the two long pieces are two trees and the
    piece is not joined through; with one expected, all of it is one."""
    spacing = (0.5, 1.0, 1.2)
    lumen = cylinder((12.0, 10.0), spacing=spacing)
    mask = lumen.copy()
    mask[16], mask[18] = False, False  # pieces: 3-15, 17, 19-36
    ct = painted_ct(lumen)
    none = np.zeros(SHAPE, np.int16)
    two, _ = join_along_lumen(mask, ct, none, 2, spacing, ON)
    labels = cc3d.connected_components(two, connectivity=26)
    assert labels[10][lumen[10]].max() != labels[30][lumen[30]].max()  # the long pieces apart
    assert pieces(two) >= 2
    one, report = join_along_lumen(mask, ct, none, 1, spacing, ON)
    assert pieces(one) == 1 and report.joined == 2


def test_the_trees_are_the_pieces_at_their_roots_where_those_are_known():
    """Tree one broken in two long pieces, tree two short and whole, all leaving a root slab (the aorta's
    side) at axis 0's start. By size the trees are tree one's two pieces, which may not join, and tree
    two is too far to reach: nothing moves. With the roots known, tree one's distal piece joins its root."""
    one, two = cylinder((12.0, 10.0)), cylinder((24.0, 20.0))
    two[13:] = False  # short, whole: voxels 3-12
    mask = one | two
    mask[19:22] &= ~one[19:22]  # tree one: 3-18 and 22-36, both longer than tree two
    ct = painted_ct(one | two)
    roots = np.zeros(SHAPE, bool)
    roots[:4] = True
    labels = cc3d.connected_components(mask, connectivity=26)
    assert sorted(tree_pieces(labels, 2)) != sorted(tree_pieces(labels, 2, roots))
    assert set(labels[3][mask[3]]) == set(tree_pieces(labels, 2, roots))  # the pieces at the roots
    none = np.zeros(SHAPE, np.int16)
    by_size, report = join_along_lumen(mask, ct, none, 2, SPACING, ON)
    assert np.array_equal(by_size, mask) and report.joined == 0
    rooted, report = join_along_lumen(mask, ct, none, 2, SPACING, ON, roots)
    assert pieces(rooted) == 2 and report.joined == 1 and (rooted & ~mask & one).sum() >= 0.8 * report.added
    assert list(tree_pieces(labels, 1, np.zeros(SHAPE, bool))) == [int(np.argmax(np.bincount(labels.ravel())[1:])) + 1]


def test_a_poor_ct_or_a_whole_tree_joins_nothing():
    _, lumen, mask = two_trees()
    faint = painted_ct(lumen, contrast=60.0, noise=50.0)
    kept, report = join_along_lumen(mask, faint, np.zeros(SHAPE, np.int16), 2, SPACING, ON)
    assert np.array_equal(kept, mask) and report.joined == 0 and report.contrast_noise < ON.min_contrast_noise
    whole, report = join_along_lumen(lumen, painted_ct(lumen), np.zeros(SHAPE, np.int16), 2, SPACING, ON)
    assert np.array_equal(whole, lumen) and report.joined == 0


def test_the_radius_of_a_tube_and_the_inputs_checked():
    spacing = (0.5, 0.5, 0.5)
    big = np.zeros((80, 40, 40), dtype=bool)
    i, j, k = np.meshgrid(*[np.arange(n) * 0.5 for n in big.shape], indexing="ij")
    big = ((j - 10.0) ** 2 + (k - 10.0) ** 2 <= 6.0 ** 2) & (i > 0.5) & (i < 39.5)
    assert 5.0 < tree_radius_mm(big, spacing) < 6.5  # its two ends count as surface too
    assert tree_radius_mm(np.zeros((3, 4, 5), bool), spacing) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        join_along_lumen(np.zeros(SHAPE, bool), np.zeros((3, 4, 5), np.float32), np.zeros(SHAPE, np.int16), 2,
                         SPACING, ON)
    for bad in ({"max_cost_mm": 0.0}, {"off_lumen_weight": 0.5}, {"min_contrast_noise": -1.0}, {"dark_level": 1.5}):
        with pytest.raises(ValueError, match="ct_path"):
            CTPathParams(**bad)


def test_bright_voxels_of_a_dark_class_are_the_lumen_it_swallowed():
    ct = np.full((6, 5, 4), 300.0, np.float32)
    neighbours = np.zeros(ct.shape, np.int16)
    neighbours[:2], neighbours[4:] = 1, 3
    ct[:2] = 50.0  # class 1 dark (a myocardium), class 3 as bright as the lumen (a chamber)
    ct[0, 0, 0] = 300.0  # a bright voxel inside the dark class: the class still passes
    bright = lumen_like(ct, neighbours, 150.0)
    assert np.array_equal(bright, neighbours == 3)
    assert not ndimage.binary_erosion(bright).any() or bright[4:].all()


def lung_blob(centre: tuple[int, int, int], radius_vox: int = 2) -> np.ndarray:
    i, j, k = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    return (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2 <= radius_vox ** 2


def test_a_blob_darker_than_the_vessels_surroundings_goes_a_stretch_of_vessel_stays():
    """Tree one broken (its distal stretch a third piece, on the lumen), and a blob the segmenter put in
    the lung (-800 HU) or in plain fat beside tree two: the blob goes, every vessel voxel stays. Where
    the blob is brighter than the vessel's surroundings (enhanced: a vessel of its own), or the dark
    level asks for less than the lung, it stays; a poor CT, or a mask at the expected count, decides
    nothing."""
    _, lumen, mask = two_trees()
    blob = lung_blob((30, 20, 9))
    assert not (blob & lumen).any() and pieces(mask | blob) == 4
    ct = painted_ct(lumen)
    lung = np.where(blob, ct - 700.0, ct)
    none = np.zeros(SHAPE, np.int16)
    on = dataclasses.replace(ON, drop_dark=True)
    for dark in (lung, ct):
        kept, dropped = drop_dark_pieces(mask | blob, dark, none, 2, SPACING, on)
        assert np.array_equal(kept, mask) and dropped == int(blob.sum())
    for ct_there, params in ((np.where(blob, ct + 150.0, ct), on), (lung, dataclasses.replace(on, dark_level=-5.0)),
                             (painted_ct(lumen, contrast=60.0, noise=50.0), on)):
        same, dropped = drop_dark_pieces(mask | blob, ct_there, none, 2, SPACING, params)
        assert np.array_equal(same, mask | blob) and dropped == 0
    whole, dropped = drop_dark_pieces(lumen | lung_blob((30, 20, 9), 0), lung, none, 3, SPACING, on)
    assert dropped == 0 and pieces(whole) == 3


def test_the_paths_and_the_dark_rule_each_have_their_own_gate():
    """``min_contrast_noise`` gates the paths, ``dark_min_contrast_noise`` the dark rule: on a CT whose
    contrast lies between the two, a lost stretch is joined and no blob is judged dark; the other way
    round, the blob goes and nothing is joined. The dark rule's default gate is the stricter."""
    _, lumen, mask = two_trees()
    blob = lung_blob((30, 20, 9))
    ct = painted_ct(lumen)
    lung = np.where(blob, ct - 700.0, ct)
    none = np.zeros(SHAPE, np.int16)
    cn = join_along_lumen(mask, ct, none, 2, SPACING, dataclasses.replace(ON, min_contrast_noise=0.0))[1].contrast_noise
    assert cn > 2.0
    for path_gate, dark_gate, joined, dropped in ((cn - 1.0, cn + 1.0, 1, 0), (cn + 1.0, cn - 1.0, 0, int(blob.sum()))):
        params = dataclasses.replace(ON, drop_dark=True, min_contrast_noise=path_gate,
                                     dark_min_contrast_noise=dark_gate)
        assert join_along_lumen(mask, ct, none, 2, SPACING, params)[1].joined == joined
        assert drop_dark_pieces(mask | blob, lung, none, 2, SPACING, params)[1] == dropped
    assert CTPathParams().dark_min_contrast_noise > CTPathParams().min_contrast_noise
    with pytest.raises(ValueError, match="ct_path.dark_min_contrast_noise"):
        CTPathParams(dark_min_contrast_noise=-1.0)
