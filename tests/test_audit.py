"""The repair's audit against its own input: the measures, and the policy that flags or keeps the input."""

import math

import numpy as np
import pytest
from scipy import ndimage

from nearfix_lib.core.config import AuditParams
from nearfix_lib.repair.audit import audit_repair, skeleton_kept

SHAPE = (40, 34, 52)  # asymmetric on purpose


def _tube(mask: np.ndarray, start, stop, radius: float) -> None:
    """Paint a straight tube of ``radius`` voxels from ``start`` to ``stop`` into ``mask``."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in mask.shape], indexing="ij"), -1).astype(float)
    a, b = np.asarray(start, float), np.asarray(stop, float)
    t = np.clip(((grid - a) @ (b - a)) / ((b - a) @ (b - a)), 0.0, 1.0)
    mask |= np.linalg.norm(grid - (a + t[..., None] * (b - a)), axis=-1) <= radius


@pytest.fixture(scope="module")
def tree():
    """A trunk and a branch of a vessel (the input), and the trunk alone (a repair that lost the branch)."""
    trunk = np.zeros(SHAPE, bool)
    _tube(trunk, (20, 17, 4), (20, 17, 30), 2.0)
    branch = np.zeros(SHAPE, bool)
    _tube(branch, (20, 17, 30), (8, 6, 48), 1.6)
    _tube(trunk, (20, 17, 30), (30, 26, 46), 2.0)
    return trunk | branch, trunk


def test_a_repair_equal_to_its_input_departs_nowhere(tree):
    given, _ = tree
    audit = audit_repair(given, given, AuditParams(skeleton=True, min_fit_dice=0.9, min_skeleton_kept=0.9))
    assert audit.fit_dice == 1.0 and audit.dropped == 0.0 and audit.added == 0.0
    assert audit.comp_input == audit.comp_repair == 1 and audit.skeleton_kept == 1.0
    assert not audit.flagged and not audit.kept_input and audit.reasons == ""


def test_a_dropped_branch_shows_in_the_centre_line_more_than_in_dice(tree):
    given, trunk = tree
    params = AuditParams(skeleton=True, min_skeleton_kept=0.8)
    lost = audit_repair(given, trunk, params)
    assert lost.skeleton_kept < 0.75 and lost.dropped == pytest.approx(1 - trunk.sum() / given.sum())
    assert lost.flagged and "centre line kept" in lost.reasons and not lost.kept_input
    assert lost.skeleton_kept < lost.fit_dice  # the Dice of a thin class hides the branch
    # boundary noise is not a lost structure: a repair one voxel thinner or thicker keeps the centre line
    from scipy import ndimage
    for other in (ndimage.binary_erosion(given), ndimage.binary_dilation(given)):
        assert skeleton_kept(given, other) > 0.95
    for action in ("keep_input", "clean_input", "repair_input"):  # each puts the input in the field's place
        kept = audit_repair(given, trunk, AuditParams(skeleton=True, min_skeleton_kept=0.8, action=action))
        assert kept.flagged and kept.kept_input


def test_fit_dice_added_voxels_and_components(tree):
    given, trunk = tree
    island = np.zeros(SHAPE, bool)
    island[2:5, 2:5, 2:5] = True
    audit = audit_repair(trunk, trunk | island, AuditParams(min_fit_dice=0.999))
    assert audit.added == pytest.approx(27 / trunk.sum()) and audit.dropped == 0.0
    assert audit.comp_input == 1 and audit.comp_repair == 2
    assert audit.flagged and "fit Dice" in audit.reasons
    assert math.isnan(audit.skeleton_kept)  # not asked for (a large class)
    assert set(audit.columns()) >= {"audit_fit_dice", "audit_flagged", "audit_kept_input", "audit_skeleton_kept"}


def test_a_repair_that_leaves_out_too_much_of_its_input_is_flagged(tree):
    """``max_dropped``: the share of the input's voxels the repair left out (a field that cannot hold
    a thin vessel), independent of what it adds."""
    given, trunk = tree
    share = 1 - trunk.sum() / given.sum()
    assert audit_repair(given, trunk, AuditParams(max_dropped=share + 0.01)).flagged is False
    lost = audit_repair(given, trunk | ~given, AuditParams(max_dropped=share - 0.01))
    assert lost.flagged and "input dropped" in lost.reasons and lost.dropped == pytest.approx(share)
    assert not audit_repair(given, given | ~given, AuditParams(max_dropped=0.0)).flagged  # adding drops nothing


def test_a_repair_that_adds_more_than_its_input_holds_is_flagged(tree):
    """``max_added``: repair voxels outside the input per input voxel (a field far too wide, which
    keeps the whole input and so passes every other rule), independent of what it drops."""
    given, _ = tree
    wide = ndimage.binary_dilation(given, iterations=2)
    share = (wide.sum() - given.sum()) / given.sum()
    assert share > 1.0  # the tree's vessels are thin: two voxels around them more than double it
    assert not audit_repair(given, wide, AuditParams()).flagged  # .inf: never
    assert not audit_repair(given, wide, AuditParams(max_added=share + 0.01)).flagged
    flagged = audit_repair(given, wide, AuditParams(max_added=1.0, max_dropped=0.0, action="clean_input"))
    assert flagged.flagged and flagged.kept_input and flagged.added == pytest.approx(share)
    assert flagged.reasons.startswith("added") and "dropped" not in flagged.reasons
    with pytest.raises(ValueError, match="max_added"):
        AuditParams(max_added=-0.5)


def test_an_empty_input_is_never_flagged():
    empty = np.zeros(SHAPE, bool)
    audit = audit_repair(empty, empty, AuditParams(skeleton=True, min_fit_dice=1.0, min_skeleton_kept=1.0,
                                                   max_dropped=0.0, action="keep_input"))
    assert not audit.flagged and audit.dropped == 0.0 and math.isnan(audit.skeleton_kept)


def test_bad_input_and_parameters_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        audit_repair(np.zeros(SHAPE, bool), np.zeros(SHAPE[::-1], bool), AuditParams())
    with pytest.raises(ValueError, match="action"):
        AuditParams(action="drop")
    with pytest.raises(ValueError, match="min_skeleton_kept"):
        AuditParams(min_skeleton_kept=1.5)
    with pytest.raises(ValueError, match="max_dropped"):
        AuditParams(max_dropped=-0.1)
