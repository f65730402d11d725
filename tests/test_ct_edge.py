"""The repaired boundary placed on the CT's edge (``repair.ct_edge``): on synthetic vessels whose CT is
painted from a known lumen (blurred, with noise), a boundary one voxel off moves onto the lumen, only
within its band, never into voxels the class may not hold, and not at all where the CT's contrast is
below its noise; the local means keep a vessel whose contrast fades along its length."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from nearfix_lib.core.config import CTEdgeParams
from nearfix_lib.core.metrics import dice
from nearfix_lib.repair.ct_edge import EDGE_PREFIX, local_mean, noise_level, snap_to_edge

SPACING = (0.9, 1.0, 1.2)  # anisotropic, as a user's grid is
SHAPE = (40, 34, 28)  # asymmetric: a transposed axis shows
FACE = ndimage.generate_binary_structure(3, 1)


def tube(radius: float = 2.2) -> np.ndarray:
    """A bent vessel (mm radius) along axis 0: the lumen the CT is painted from."""
    i, j, k = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    centre_j, centre_k = 16.0 + 4.0 * np.sin(i / 12.0), 14.0 + 0.15 * i
    return ((j - centre_j) ** 2 + (k - centre_k) ** 2 <= radius ** 2) & (i > 3) & (i < 33)


def painted_ct(lumen: np.ndarray, contrast: np.ndarray | float = 400.0, noise: float = 25.0,
               seed: int = 0) -> np.ndarray:
    """Fat (-100 HU) with a contrast-filled lumen, blurred (0.7 voxel) as a scanner would, plus noise."""
    ct = -100.0 + np.asarray(contrast) * lumen
    ct = ndimage.gaussian_filter(ct.astype(np.float32), 0.7)
    return (ct + np.random.default_rng(seed).normal(0.0, noise, lumen.shape)).astype(np.float32)


ON = CTEdgeParams(enabled=True)


def test_a_boundary_one_voxel_off_moves_onto_the_lumen_and_only_within_its_band():
    lumen = tube()
    ct = painted_ct(lumen)
    allowed = np.ones(SHAPE, dtype=bool)
    # too fat, too thin (the thin mask's surroundings lie partly in the lumen: it moves less far)
    for off, reached in ((ndimage.binary_dilation(lumen, FACE), 0.85), (ndimage.binary_erosion(lumen, FACE), 0.7)):
        snapped, report = snap_to_edge(off, ct, allowed, SPACING, ON)
        assert dice(snapped, lumen) > dice(off, lumen) + 0.1 and dice(snapped, lumen) > reached
        changed = snapped != off
        band = ndimage.binary_dilation(off, FACE) & ~ndimage.binary_erosion(off, FACE, border_value=1)
        assert changed.any() and not (changed & ~band).any()  # one voxel either side of the boundary, no further
        assert report.added == int((snapped & ~off).sum()) and report.removed == int((off & ~snapped).sum())
        assert report.decided > 0.9 and report.contrast_noise > 2.0  # a clear CT: it decided almost everywhere
    assert set(report.columns()) == {f"{EDGE_PREFIX}{name}" for name in ("added", "removed", "decided",
                                                                         "contrast_noise")}


def test_the_ct_never_puts_a_voxel_where_the_class_may_not_be():
    lumen = tube()
    ct = painted_ct(lumen)
    thin = ndimage.binary_erosion(lumen, FACE)
    allowed = np.ones(SHAPE, dtype=bool)
    allowed[:, :, 15:] = False  # a chamber the input gives another class, over half the vessel's rim
    snapped, _ = snap_to_edge(thin, ct, allowed, SPACING, ON)
    assert not (snapped & ~thin & ~allowed).any()
    assert (snapped & ~thin & allowed).any()  # and where it may, it grows


def test_a_thin_vessels_edge_read_from_its_core_lies_on_the_lumen_not_outside_it():
    """A vessel 2-3 voxels wide, its mask a voxel too fat: that mask's mean is mostly rim and fat, its
    midpoint low, and the whole-mask level keeps voxels outside the lumen that the core's level takes out."""
    lumen = tube(radius=1.3)
    ct = painted_ct(lumen)
    fat = ndimage.binary_dilation(lumen, FACE)
    allowed = np.ones(SHAPE, dtype=bool)
    whole, _ = snap_to_edge(fat, ct, allowed, SPACING, ON)
    core, report = snap_to_edge(fat, ct, allowed, SPACING, dataclasses.replace(ON, lumen_level="core"))
    assert whole.sum() > 1.8 * lumen.sum() and core.sum() < 1.3 * lumen.sum()  # (here 2.0 and 1.2)
    assert dice(core, lumen) > dice(whole, lumen) + 0.15
    assert not ((core != fat) & ~ndimage.binary_dilation(fat, FACE)).any() and report.removed > report.added


@pytest.mark.parametrize("level", ["mask", "core"])
def test_where_the_contrast_is_below_the_noise_the_boundary_stays(level):
    """Either level: the gate reads the whole mask's contrast (the core's brighter voxels would pass
    it on the noise alone)."""
    lumen = tube()
    faint = painted_ct(lumen, contrast=60.0, noise=50.0)  # half contrast 30 HU, noise 50
    fat = ndimage.binary_dilation(lumen, FACE)
    snapped, report = snap_to_edge(fat, faint, np.ones(SHAPE, dtype=bool), SPACING,
                                   dataclasses.replace(ON, lumen_level=level))
    assert np.array_equal(snapped, fat) and report.decided == 0.0 and report.contrast_noise < 1.0
    # the same CT with the gate open: noise decides, and the result is worse than the mask it was given
    ungated, _ = snap_to_edge(fat, faint, np.ones(SHAPE, dtype=bool), SPACING,
                              dataclasses.replace(ON, min_contrast_noise=0.0))
    assert dice(ungated, lumen) < dice(fat, lumen)


def test_local_means_keep_a_vessel_whose_contrast_fades_along_it():
    """Contrast from 500 HU at one end to 120 at the other: one midpoint for the whole vessel (a very
    wide window) cuts the faint end away; the local one keeps it."""
    lumen = tube()
    fading = np.linspace(500.0, 120.0, SHAPE[0])[:, None, None] * np.ones(SHAPE)
    ct = painted_ct(lumen, contrast=fading, noise=10.0)
    mask = lumen.copy()
    local, _ = snap_to_edge(mask, ct, np.ones(SHAPE, dtype=bool), SPACING, ON)
    wide, _ = snap_to_edge(mask, ct, np.ones(SHAPE, dtype=bool), SPACING, dataclasses.replace(ON, window_mm=500.0))
    faint = slice(26, None)  # the last third, 120-250 HU
    assert dice(local[faint], lumen[faint]) > 0.85
    assert dice(wide[faint], lumen[faint]) < dice(local[faint], lumen[faint]) - 0.1


def test_noise_level_and_local_mean():
    rng = np.random.default_rng(3)
    field = rng.normal(40.0, 30.0, SHAPE).astype(np.float32)
    region = np.ones(SHAPE, dtype=bool)
    assert noise_level(field, region, SPACING) == pytest.approx(30.0, rel=0.1)
    assert np.isnan(noise_level(field, np.zeros(SHAPE, dtype=bool), SPACING))
    where = np.zeros(SHAPE, dtype=bool)
    where[:, :, :10] = True
    ct = np.where(where, 200.0, -100.0).astype(np.float32)
    means = local_mean(ct, where, (2.0, 2.0, 2.0))
    near = ndimage.binary_dilation(where, iterations=3)
    assert np.allclose(means[near], 200.0, atol=1e-3)  # the mean of where's voxels only, even at its edge
    assert np.isnan(means[:, :, -1]).all()  # none of them in the window: NaN


def test_an_empty_mask_or_a_mask_without_surroundings_is_returned_unchanged():
    ct = painted_ct(tube())
    empty = np.zeros(SHAPE, dtype=bool)
    out, report = snap_to_edge(empty, ct, np.ones(SHAPE, dtype=bool), SPACING, ON)
    assert not out.any() and report.added == report.removed == 0
    full = np.ones(SHAPE, dtype=bool)
    out, report = snap_to_edge(full, ct, full, SPACING, ON)
    assert out.all() and report.decided == 0.0


def test_ct_edge_parameters_are_checked():
    for bad in ({"band_vox": 0}, {"window_mm": 0.0}, {"min_contrast_noise": -1.0}, {"lumen_level": "peak"}):
        with pytest.raises(ValueError, match="ct_edge"):
            CTEdgeParams(**bad)


def test_on_a_real_ct_the_edge_pulls_a_boundary_a_voxel_off_back_towards_its_label(tmp_path):
    """``benchmarks.ct_edge_real`` on ../shared/data/ts_chest: the aorta's TotalSegmentator label grown
    or shrunk by a voxel comes back closer to it, and the label as it is moves little (a segmenter's
    boundary and the CT's half-maximum edge agree within about a voxel)."""
    import pandas as pd
    from conftest import require_ts_chest

    from benchmarks.ct_edge_real import COLUMNS, main

    data = require_ts_chest()
    assert main(["--data", str(data), "--classes", "Ao", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "ct_edge_real.csv")
    assert list(table.columns) == COLUMNS and len(table) == 4
    table = table.set_index("perturbation")
    for off in ("dilated 1 voxel", "eroded 1 voxel", "boundary noise 30%"):
        assert table.loc[off, "dice_after"] > table.loc[off, "dice_before"] + 0.01
    assert table.loc["as labelled", "dice_after"] > 0.9 and table.loc["dilated 1 voxel", "decided"] > 0.5
    assert "| Ao" in (tmp_path / "ct_edge_real.md").read_text()
