"""The classical baselines on small hand-built maps (asymmetric shapes, anisotropic spacing)."""

import cc3d
import numpy as np
import pytest

from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.config import BaselineParams
from nearfix_lib.repair.baselines import ball, closing_largest, gaussian_argmax, run_baseline

T = CARDIAC
LV, MYO, LA = T["LV"].index, T["Myo"].index, T["LA"].index


def block_map():
    lab = np.zeros((30, 24, 16), dtype=np.uint8)
    lab[4:20, 4:18, 3:13] = LV
    lab[20:27, 4:18, 3:13] = LA
    return lab


def test_gaussian_removes_islands_and_holes_but_keeps_large_blocks():
    clean = block_map()
    noisy = clean.copy()
    noisy[10, 10, 8] = 0  # one-voxel hole
    noisy[1, 21, 1] = LV  # one-voxel island
    out = gaussian_argmax(noisy, T, (1.0, 1.0, 1.0), sigma_mm=1.0)
    assert out.shape == noisy.shape and out.dtype == np.uint8
    assert out[10, 10, 8] == LV and out[1, 21, 1] == 0
    inner = np.zeros(clean.shape, dtype=bool)
    inner[6:18, 6:16, 5:11] = True
    assert np.all(out[inner] == LV)
    assert noisy[1, 21, 1] == LV  # the input is not modified


def test_gaussian_sigma_is_in_millimetres():
    lab = np.zeros((20, 20, 20), dtype=np.uint8)
    lab[8:12, 2:18, 8:12] = LV  # a 4-voxel-thick bar
    fine = gaussian_argmax(lab, T, (1.0, 1.0, 1.0), sigma_mm=1.0)
    coarse = gaussian_argmax(lab, T, (1.0, 1.0, 1.0), sigma_mm=6.0)
    assert (fine == LV).sum() > (coarse == LV).sum()  # a wide kernel eats a thin bar
    # the same millimetres on a 2 mm grid is half the voxels of blur
    assert np.array_equal(gaussian_argmax(lab, T, (2.0, 2.0, 2.0), sigma_mm=2.0), fine)


def test_closing_bridges_a_gap_and_keeps_the_expected_components():
    lab = np.zeros((30, 20, 12), dtype=np.uint8)
    lab[3:13, 5:12, 3:9] = LV
    lab[14:25, 5:12, 3:9] = LV  # 1-voxel gap at i = 13
    lab[27, 17, 10] = LV  # island far away
    out = closing_largest(lab, T, (1.0, 1.0, 1.0), radius_mm=1.5)
    lv = out == LV
    assert cc3d.connected_components(lv, connectivity=26, return_N=True)[1] == 1
    assert np.all(lv[13, 6:11, 4:8]) and not lv[27, 17, 10]


def test_closing_fuses_by_priority_and_ball_is_anisotropic():
    lab = block_map()
    out = closing_largest(lab, T, (1.0, 1.0, 2.0), radius_mm=2.0)
    assert set(np.unique(out)) == {0, LV, LA}
    assert np.all(out[20:27, 4:18, 3:13] == LA)  # LA (priority 4) keeps its voxels against LV (5)
    assert ball(2.0, np.array([1.0, 1.0, 2.0])).shape == (5, 5, 3)


def test_run_baseline_dispatch_and_validation():
    lab = block_map()
    p = BaselineParams()
    assert run_baseline("gaussian", lab, T, (1, 1, 1), p).shape == lab.shape
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baseline("median", lab, T, (1, 1, 1), p)
    with pytest.raises(ValueError, match="spacing"):
        gaussian_argmax(lab, T, (1, 0, 1), 1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        BaselineParams(gaussian_sigma_mm=0)
    assert not gaussian_argmax(np.zeros((5, 6, 7), np.uint8), T, (1, 1, 1), 1.0).any()


def random_blobs(shape, seed, values):
    """Smoothed noise cut into a few labels: ragged shapes, holes, islands, a class at the border."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    edges = np.quantile(field, np.linspace(0.35, 1, len(values) + 1)[:-1])
    lab = np.zeros(shape, dtype=np.uint8)
    for edge, value in zip(edges, values):
        lab[field >= edge] = value
    return lab


@pytest.mark.parametrize("spacing,radius", [((1.0, 1.0, 1.0), 2.0), ((0.75, 0.75, 0.75), 3.0),
                                            ((0.35, 0.35, 0.5), 1.2), ((0.6, 0.9, 1.7), 2.3),
                                            ((0.3, 0.3, 0.3), 0.9), ((0.1, 0.2, 0.3), 0.5)])
def test_closing_by_distances_is_scipys_closing_with_the_ball(spacing, radius):
    """The rims included: offsets exactly at the radius (4 x 0.75 = 3) count as inside, as in ball().
    At 0.3 mm with r = 0.9 and at (0.1, 0.2, 0.3) with r = 0.5, the EDT's float32 squared distances
    alone put 18 and 4 rim voxels of the first blob map on the wrong side (measured)."""
    from scipy import ndimage

    from nearfix_lib.repair.baselines import close_with_ball, within_ball

    spacing = np.asarray(spacing)
    element = ball(radius, spacing)
    for seed in range(3):
        mask = random_blobs((23, 19, 17), seed, [1]) > 0
        assert np.array_equal(within_ball(mask, radius, spacing), ndimage.binary_dilation(mask, element))
        assert np.array_equal(close_with_ball(mask, radius, spacing),
                              ndimage.binary_closing(mask, structure=element, border_value=0))
    assert not within_ball(np.zeros((3, 4, 5), bool), radius, spacing).any()


def test_gaussian_over_each_class_box_is_the_whole_volume_result():
    from scipy import ndimage

    lab = random_blobs((41, 35, 29), 4, [LV, MYO, LA, T["Cor"].index])
    lab[:, :, :3] = 0  # a margin on one side only
    spacing, sigma_mm = np.array([0.7, 0.7, 1.1]), 1.3
    sigma = sigma_mm / spacing
    best = ndimage.gaussian_filter((lab == 0).astype(np.float32), sigma, mode="nearest")
    expected = np.zeros(lab.shape, dtype=np.uint8)
    for cls in T:  # the whole volume for every class (the work box is the volume here)
        smoothed = ndimage.gaussian_filter((lab == cls.index).astype(np.float32), sigma, mode="nearest")
        expected[smoothed > best] = cls.index
        best = np.maximum(best, smoothed)
    assert np.array_equal(gaussian_argmax(lab, T, spacing, sigma_mm), expected)
    assert len(np.unique(expected)) == 5


def test_closing_over_each_class_box_is_the_whole_volume_result():
    """Whole-volume closing (scipy, the ball), expected largest components and priority fusion: what
    closing_largest computes class box by class box."""
    from scipy import ndimage

    from nearfix_lib.repair.cleanup import keep_largest_components
    from nearfix_lib.repair.fusion import fuse_priority

    lab = random_blobs((41, 35, 29), 7, [LV, MYO, LA, T["Cor"].index])
    lab[:, :, :4] = 0  # a margin on one side only
    lab[0, 0, 5:9] = LA  # an island on the array's edge
    spacing, radius = np.array([0.7, 0.8, 1.1]), 2.0
    element = ball(radius, spacing)
    masks = {}
    for cls in T:
        mask = lab == cls.index
        if mask.any():
            closed = ndimage.binary_closing(mask, structure=element, border_value=0) | mask
            masks[cls.key] = keep_largest_components(closed, cls.expected_components)
    expected = fuse_priority(masks, T, lab.shape)
    assert np.array_equal(closing_largest(lab, T, spacing, radius), expected)
    assert len(np.unique(expected)) == 5
