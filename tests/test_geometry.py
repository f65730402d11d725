"""The affine chain, ROIs and paste-back, on asymmetric shapes whose axes cannot be confused."""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PROJECT, lps_affine, require_ts_chest

from nearfix_lib.core.classes import load_table
from nearfix_lib.core.geometry import (
    Box,
    apply_affine,
    bounding_box,
    expand_box,
    normalised_to_original,
    normalised_to_world,
    original_grid,
    original_to_normalised,
    paste_back,
    resample,
    resample_mask,
    roi_box,
    roi_grid,
    to_grid_sample_order,
    voxel_spacing,
)
from nearfix_lib.core.io import read_image, read_label, write_nifti


def l_shape(shape=(31, 23, 17)):
    """An object with arms of different lengths along i, j and k: any axis swap moves it."""
    vol = np.zeros(shape, dtype=np.uint8)
    vol[4:20, 5:8, 3:6] = 1  # long arm along i
    vol[4:7, 5:17, 3:6] = 2  # medium arm along j
    vol[4:7, 5:8, 3:13] = 3  # short arm along k
    return vol


def centroid_world(vol, value, affine):
    return apply_affine(affine, np.argwhere(vol == value).mean(axis=0)[None])[0]


def test_bounding_box_and_margin_in_mm_are_per_axis():
    vol = l_shape()
    box = bounding_box(vol > 0)
    assert box == Box((4, 5, 3), (20, 17, 13))
    grown = expand_box(box, 2.5, vol.shape, spacing=(0.5, 1.25, 2.5), unit="mm")
    assert grown == Box((0, 3, 2), (25, 19, 14))  # 5, 2, 1 voxels; clipped at 0 on axis 0
    assert expand_box(box, 2, vol.shape, unit="vox") == Box((2, 3, 1), (22, 19, 15))
    assert roi_box(np.zeros((3, 4, 5), bool), 2, (1, 1, 1)) is None
    with pytest.raises(ValueError):
        Box((1, 1, 1), (1, 2, 2))


def test_normalised_space_spans_the_box_edges():
    box = Box((3, 5, 7), (13, 9, 27))
    n2o = normalised_to_original(box)
    corners = apply_affine(n2o, np.array([[-1, -1, -1], [1, 1, 1]]))
    assert np.allclose(corners[0], np.array(box.lo) - 0.5)
    assert np.allclose(corners[1], np.array(box.hi) - 0.5)
    pts = np.random.default_rng(0).uniform(-1, 1, (50, 3))
    assert np.allclose(apply_affine(original_to_normalised(box), apply_affine(n2o, pts)), pts)


def test_grid_round_trip_is_identity_at_native_resolution():
    vol = l_shape()
    box = roi_box(vol > 0, 2, (1, 1, 1), unit="vox")
    grid = roi_grid(box, box.shape)
    assert np.allclose(grid.to_original[:3, :3], np.eye(3))
    crop = resample(vol, grid, order=0)
    assert np.array_equal(crop, vol[box.slices])
    assert np.array_equal(paste_back(crop, grid, box, vol.shape), vol)
    # world coordinates through the chain agree with the original affine
    aff = lps_affine()
    pts = grid.index_points()[:7]
    assert np.allclose(apply_affine(grid.world_affine(aff), pts), apply_affine(aff, pts + box.lo))


@pytest.mark.parametrize("res", [(40, 20, 12), 24])
def test_orientation_survives_resampling(res):
    """Centroids of each arm stay put in world mm at any (anisotropic) grid resolution."""
    vol = l_shape()
    aff = lps_affine()
    box = roi_box(vol > 0, 1.5, voxel_spacing(aff))
    grid = roi_grid(box, res)
    roi = resample(vol, grid, order=0)
    waff = grid.world_affine(aff)
    for value in (1, 2, 3):
        moved = centroid_world(roi, value, waff) - centroid_world(vol, value, aff)
        assert np.all(np.abs(moved) <= voxel_spacing(aff) * 0.75), (value, moved)
    swapped = np.transpose(roi, (1, 0, 2))  # a transpose hack that keeps the affine moves the arm
    assert np.linalg.norm(centroid_world(swapped, 1, waff) - centroid_world(vol, 1, aff)) > 2.0


def test_paste_back_of_a_coarse_grid_stays_in_place():
    vol = l_shape((41, 29, 23))
    box = roi_box(vol > 0, 2, (1, 1, 1), unit="vox")
    grid = roi_grid(box, (14, 10, 8))  # ~1.5 original voxels per cell
    back = paste_back(resample_mask(vol > 0, grid).astype(np.uint8), grid, box, vol.shape)
    assert back.shape == vol.shape
    assert not back[: box.lo[0]].any() and not back[box.hi[0]:].any()
    dice = 2 * np.sum(back & (vol > 0)) / (back.sum() + np.sum(vol > 0))
    assert dice > 0.75


def test_resample_outside_volume_takes_cval_and_ct_is_linear():
    ct = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    grid = roi_grid(Box((0, 0, 0), (6, 7, 8)), (12, 14, 16))
    up = resample(ct, grid, order=1, cval=-1024)
    assert up.dtype == np.float32 and up.min() >= ct.min() - 1e-3  # inside the volume everywhere
    shifted = original_grid((6, 7, 8))
    shifted = type(shifted)((6, 7, 8), np.array([[1, 0, 0, 3.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    out = resample(ct, shifted, order=0, cval=-1024)
    assert np.all(out[3:] == -1024) and np.array_equal(out[:3], ct[3:])


def test_grid_sample_reads_our_axis_order_through_the_helper():
    """The one place axis order meets torch: a hot voxel is found where geometry says it is."""
    shape = (9, 6, 4)
    vol = np.zeros(shape, np.float32)
    hot = (7, 1, 2)
    vol[hot] = 1.0
    box = Box((0, 0, 0), shape)
    grid = roi_grid(box, shape)
    norm = grid.normalised_points(box).reshape(*shape, 3)[hot]
    pts = torch.tensor(to_grid_sample_order(norm[None]), dtype=torch.float32).view(1, 1, 1, 1, 3)
    val = torch.nn.functional.grid_sample(torch.from_numpy(vol)[None, None], pts, align_corners=False)
    assert float(val) == pytest.approx(1.0)
    wrong = torch.tensor(norm[None], dtype=torch.float32).view(1, 1, 1, 1, 3)
    assert float(torch.nn.functional.grid_sample(torch.from_numpy(vol)[None, None], wrong,
                                                 align_corners=False)) < 0.5


def test_normalised_to_world_matches_composition():
    box = Box((2, 3, 4), (12, 9, 10))
    aff = lps_affine()
    n = np.array([[0.25, -0.5, 0.75]])
    assert np.allclose(apply_affine(normalised_to_world(box, aff), n),
                       apply_affine(aff, apply_affine(normalised_to_original(box), n)))


def test_real_lps_ct_keeps_its_affine_through_roi_and_paste_back(tmp_path):
    root = require_ts_chest()
    table = load_table("params/classes_ts_chest.yaml", root=PROJECT)
    lab = read_label(root / "labels.nii.gz", table)
    ct = read_image(root / "ct.nii.gz")
    assert nib.aff2axcodes(lab.affine) == ("L", "P", "S")
    box = roi_box(lab.array == table["Ao"].index, 5.0, lab.spacing)
    grid = roi_grid(box, 32)
    roi_lab = resample(lab.array, grid, order=0)
    roi_ct = resample(ct.array, grid, order=1, cval=-1024)
    assert roi_ct.mean() > -200  # the aorta ROI is mostly soft tissue / blood, not air
    write_nifti(tmp_path / "roi.nii.gz", roi_lab, grid.world_affine(lab.affine))
    roi_back = nib.load(str(tmp_path / "roi.nii.gz"))
    assert nib.aff2axcodes(roi_back.affine) == ("L", "P", "S")
    # the ROI file and the original agree in world space: aorta centroid within a voxel
    c_roi = centroid_world(np.asarray(roi_back.dataobj), table["Ao"].index, roi_back.affine)
    c_orig = centroid_world(lab.array, table["Ao"].index, lab.affine)
    assert np.linalg.norm(c_roi - c_orig) < 1.5
    back = paste_back(roi_lab, grid, box, lab.shape)
    write_nifti(tmp_path / "back.nii.gz", back, lab.affine, lab.header)
    again = read_label(tmp_path / "back.nii.gz", table)
    assert again.shape == lab.shape and np.allclose(again.affine, lab.affine)
    ao = lab.array == table["Ao"].index
    back_ao = again.array == table["Ao"].index
    assert 2 * np.sum(ao & back_ao) / (ao.sum() + back_ao.sum()) > 0.85
