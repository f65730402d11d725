"""Training-point sampling on asymmetric grids, where any (i, j, k) transpose shows up."""

import dataclasses
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from nearfix_lib.core.config import BalancedSamplingParams, SamplingParams
from nearfix_lib.core.geometry import Box, roi_grid
from nearfix_lib.field.sampling import (
    BandSampler,
    ClassBalancedSampler,
    bias_at_epoch,
    boundary_band,
    cell_index,
    dense_from_sparse,
    index_to_normalised,
    interface_band,
    lookup,
    mining_due,
    normalised_to_index,
    sparse_coordinates,
)
from nearfix_lib.field.store import MinedVoxels, StoreSpec, write_store
from nearfix_lib.stages.stage1 import write_mask_store

SHAPE = (20, 14, 9)


def blob(shape=SHAPE):
    """Ellipsoid elongated along i, a bar cut by the k = 0 face and a lone voxel."""
    g = np.indices(shape).astype(float)
    m = ((g[0] - 9) / 7.5) ** 2 + ((g[1] - 6) / 4.2) ** 2 + ((g[2] - 5) / 3.1) ** 2 <= 1
    m[14:19, 10:13, 0:3] = True
    m[2, 12, 7] = True
    return m


def corner_slab(shape=SHAPE):
    """Long along j, at low i and high k: its (k, j, i)-read image lies elsewhere entirely."""
    m = np.zeros(shape, dtype=bool)
    m[1:4, 1:13, 6:8] = True
    return m


def brute_band(mask, radius, outside_is_background=True):
    """dilate & ~erode by a Euclidean ball, from nearest-neighbour distances; outside = background (or,
    for the erosion only, nothing: a mask cut by the border is not eroded there)."""
    padded = np.pad(mask, radius)
    vox = np.argwhere(np.ones(mask.shape, dtype=bool)) + radius
    d_fg = cKDTree(np.argwhere(padded)).query(vox)[0]
    background = ~np.pad(mask, radius, constant_values=not outside_is_background)
    d_bg = cKDTree(np.argwhere(background)).query(vox)[0]
    return ((d_fg <= radius + 1e-9) & (d_bg <= radius + 1e-9)).reshape(mask.shape)


def band_sampler(tmp_path, masks, params, seed):
    """A BandSampler over ``masks``, written to a fresh stage-1 store under ``tmp_path`` (how it reads cases)."""
    return BandSampler(write_mask_store(Path(tempfile.mkdtemp(dir=tmp_path)), masks, params), params, seed)


def params(**kw):
    base = dict(points_per_case=1000, bias_schedule=[], sampling_bias_ratio=0.5)
    base.update(kw)
    return SamplingParams(**base)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_band_matches_the_distance_definition(radius):
    m = blob()
    band = boundary_band(m, radius)
    assert np.array_equal(band, brute_band(m, radius))
    assert band[15, 11, 0]  # a mask cut by the ROI border has band there (outside = background)
    assert not boundary_band(np.zeros(SHAPE, bool), radius).any()
    # the border no surface (the CT edge's band): no band where the border cuts the mask
    uncut = boundary_band(m, radius, border_is_surface=False)
    assert np.array_equal(uncut, brute_band(m, radius, outside_is_background=False))
    assert radius > 1 or not uncut[15, 11, 0]  # (wider bands reach it from the blob's own surface)


def test_band_points_fall_in_band_voxels_and_a_transpose_would_not(tmp_path):
    m = corner_slab()
    band = boundary_band(m, 2)
    sampler = band_sampler(tmp_path, [m], params(points_per_case=3000, sampling_bias_ratio=1.0), 1)
    pts, targets = sampler.sample([0], epoch=1)
    cells = np.floor(normalised_to_index(pts[0], SHAPE) + 0.5).astype(int)
    assert np.array_equal(cells, cell_index(pts[0], SHAPE))
    assert band[cells[:, 0], cells[:, 1], cells[:, 2]].all()
    assert np.array_equal(targets[0], lookup(m, pts[0]))
    swapped = cell_index(pts[0][:, ::-1], SHAPE)  # the old bug: (k, j, i) read as (i, j, k)
    assert band[swapped[:, 0], swapped[:, 1], swapped[:, 2]].mean() < 0.05
    assert not np.array_equal(lookup(m, pts[0][:, ::-1]), targets[0])
    # jittered points spread over their cells, not just the centres
    frac = normalised_to_index(pts[0], SHAPE) - cells
    assert frac.min() < -0.45 and frac.max() > 0.45


def test_band_counts_are_exactly_round_ratio_times_n(tmp_path):
    masks = [blob(), corner_slab(), np.zeros(SHAPE, bool), blob((11, 23, 16))]
    p = params(points_per_case=1001, jitter=False, bias_schedule=[[2, 0.3], [3, 0.77]])
    sampler = band_sampler(tmp_path, masks, p, 0)
    for epoch, ratio in ((1, 0.3), (3, 0.77), (9, 0.77)):
        pts, _ = sampler.sample([0, 1, 2, 3], epoch)
        for b, m in enumerate(masks):
            idx = normalised_to_index(pts[b], m.shape)
            on_centre = np.all(np.abs(idx - np.round(idx)) < 1e-4, axis=1)
            expected = 0 if not m.any() else round(ratio * 1001)
            assert on_centre.sum() == expected
            assert on_centre[:expected].all()  # band points first, documented order


def test_bias_schedule():
    p = SamplingParams()
    values = {e: bias_at_epoch(p, e) for e in (1, 100, 101, 200, 201, 300, 400)}
    assert values == {1: 0.5, 100: 0.5, 101: 0.3, 200: 0.3, 201: 0.1, 300: 0.1, 400: 0.1}
    assert bias_at_epoch(params(sampling_bias_ratio=0.25), 7) == 0.25
    with pytest.raises(ValueError):
        bias_at_epoch(p, 0)
    for bad in ([[100, 0.5], [50, 0.3]], [[100, 1.5]], [[100]]):
        with pytest.raises(ValueError):
            SamplingParams(bias_schedule=bad)


def test_conversions_follow_the_roi_grid_convention():
    box = Box((3, 5, 7), (40, 31, 20))
    grid = roi_grid(box, SHAPE)
    n = grid.normalised_points(box)
    idx = grid.index_points()
    assert np.allclose(index_to_normalised(idx, SHAPE), n)
    assert np.allclose(normalised_to_index(n, SHAPE), idx)
    assert np.array_equal(cell_index(n, SHAPE), idx.astype(int))
    m = blob()
    assert np.array_equal(lookup(m, n), m.ravel())
    assert np.array_equal(lookup(m, n.reshape(*SHAPE, 3)), m)
    # box edges belong to the edge voxels
    assert np.array_equal(cell_index(np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]), SHAPE),
                          [[0, 0, 0], [19, 13, 8]])


def test_targets_are_the_mask_at_the_returned_points(tmp_path):
    """Read from the stage-1 store's bits; 13 x 7 x 5 voxels are no multiple of a byte's 8."""
    masks = [blob(), blob((11, 23, 16)), np.random.default_rng(1).random((13, 7, 5)) < 0.5]
    sampler = band_sampler(tmp_path, masks, params(points_per_case=4096), 3)
    pts, targets = sampler.sample([1, 0, 1, 2], epoch=1)
    assert pts.dtype == np.float32 and targets.dtype == np.float32
    assert pts.shape == (4, 4096, 3) and targets.shape == (4, 4096)
    for b, case in enumerate([1, 0, 1, 2]):
        assert np.array_equal(targets[b], lookup(masks[case], pts[b]).astype(np.float32))
    assert 0.2 < targets.mean() < 0.8  # the band straddles the surface
    assert all(np.array_equal(sampler.mask(i), m) for i, m in enumerate(masks))  # what evaluation reads


def test_band_sampler_refuses_a_store_of_another_band_radius(tmp_path):
    store = write_mask_store(tmp_path, [blob()], params(sampling_dilation_radius=2))
    with pytest.raises(ValueError, match="radius 2"):
        BandSampler(store, params(sampling_dilation_radius=3), seed=0)


def test_uniform_points_cover_the_box(tmp_path):
    m = blob()
    sampler = band_sampler(tmp_path, [m], params(points_per_case=4096, sampling_bias_ratio=0.0), 5)
    pts, targets = sampler.sample([0] * 8, epoch=1)
    flat = pts.reshape(-1, 3)
    assert flat.min() >= -1 and flat.max() <= 1
    assert np.all(flat.min(axis=0) < -0.99) and np.all(flat.max(axis=0) > 0.99)
    assert np.all(np.abs(flat.mean(axis=0)) < 0.02)
    assert abs(targets.mean() - m.mean()) < 0.015  # uniform points hit voxels by volume


def test_empty_mask_draws_uniform_points(tmp_path):
    sampler = band_sampler(tmp_path, [np.zeros(SHAPE, bool)], params(sampling_bias_ratio=1.0), 0)
    pts, targets = sampler.sample([0], epoch=1)
    assert not targets.any()
    assert np.abs(pts.mean(axis=1)).max() < 0.1


def test_draws_are_keyed_by_seed_epoch_and_case(tmp_path):
    """A case's points depend on (seed, epoch, case) only: not on the batch it is drawn in nor on what
    was drawn before, which lets a torchrun rank draw its own cases alone and a fit resume without state."""
    masks = [blob(), corner_slab()]

    def make(seed):
        return band_sampler(tmp_path, masks, params(), seed)

    a, b = make(7), make(7)
    pair = a.sample([0, 1], 1)
    assert all(np.array_equal(x, y) for x, y in zip(pair, b.sample([0, 1], 1)))
    swapped, alone = b.sample([1, 0], 1), make(7).sample([1], 1)
    assert all(np.array_equal(x[::-1], y) and np.array_equal(x[1:], z) for x, y, z in zip(pair, swapped, alone))
    assert not np.array_equal(pair[0], a.sample([0, 1], 2)[0])  # another epoch
    assert not np.array_equal(pair[0], make(8).sample([0, 1], 1)[0])  # another seed

    resumed = make(7)
    resumed.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    assert all(np.array_equal(x, y) for x, y in zip(a.sample([1, 0], 150), resumed.sample([1, 0], 150)))
    with pytest.raises(ValueError, match="start it again"):  # a checkpoint of the one-stream sampler
        resumed.load_state_dict({"bit_generator": np.random.PCG64(7).state})


def balanced(tmp_path, maps, classes, params, seed, mining=None):
    """A ClassBalancedSampler over ``maps``, written to a fresh store under ``tmp_path`` (how it reads
    cases); with ``params.mined``, its mining passes in ``mining`` (a folder; default: a fresh one)."""
    spec = StoreSpec(tuple(classes), params.dilation_radius, interfaces=False)
    store = write_store(Path(tempfile.mkdtemp(dir=tmp_path)), maps, spec)
    mined = MinedVoxels(mining or tempfile.mkdtemp(dir=tmp_path), store.case_ids) if params.mined else None
    return ClassBalancedSampler(store, params, seed, mined)


def flat_pass(maps, per_case):
    """Each case's (i, j, k) voxel rows as the flat indices a mining pass writes."""
    return [np.ravel_multi_index(np.asarray(c, dtype=np.int64).reshape(-1, 3).T, m.shape)
            for m, c in zip(maps, per_case)]


def label_maps():
    """Case 0: classes 2, 3, 8 and an unlisted 1; case 1 (another shape): 2 and 9."""
    a = np.zeros(SHAPE, dtype=np.uint8)
    a[2:10, 2:9, 1:6] = 2
    a[12:18, 8:13, 4:8] = 3
    a[10:12, 4:6, 2:4] = 8
    a[0:2, 0:2, 0:2] = 1
    b = np.zeros((17, 11, 13), dtype=np.int32)
    b[3:12, 1:5, 2:11] = 2
    b[14:16, 7:10, 0:2] = 9
    return [a, b]


def test_class_balanced_counts_labels_and_missing_classes(tmp_path):
    maps = label_maps()
    classes = [2, 3, 8, 9]
    p = BalancedSamplingParams(positives_per_class=50, negatives=101, dilation_radius=2)
    sampler = balanced(tmp_path, maps, classes, p, seed=0)
    assert sampler.points_per_case == 301
    pts, labels = sampler.sample([0, 1], epoch=1)
    assert pts.shape == (2, 301, 3) and pts.dtype == np.float32 and labels.dtype == np.int64
    for b, lab in enumerate(maps):
        expected = lookup(lab, pts[b])
        expected = np.where(np.isin(expected, classes), expected, 0)
        assert np.array_equal(labels[b], expected)
    assert not np.any(labels == 1)  # unlisted classes read as background
    for b, present in ((0, [2, 3, 8]), (1, [2, 9])):
        for slot, c in enumerate(present):
            assert np.all(labels[b, slot * 50:(slot + 1) * 50] == c)
        n_pos = 50 * len(present)
        n_neg = 301 - n_pos
        n_band = n_neg - n_neg // 2
        band = boundary_band(np.isin(maps[b], classes), 2)
        cells = cell_index(pts[b, n_pos:n_pos + n_band], maps[b].shape)
        assert band[cells[:, 0], cells[:, 1], cells[:, 2]].all()
    empty = balanced(tmp_path, [np.zeros(SHAPE, np.uint8)], classes, p, seed=0)
    pts, labels = empty.sample([0], epoch=1)
    assert pts.shape == (1, 301, 3) and not labels.any()


def test_class_balanced_draws_each_class_voxel_equally(tmp_path):
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[3:15, 2:11, 1:7] = 4
    small = np.array([[0, 0, 0], [0, 0, 8], [5, 13, 2], [5, 13, 6], [19, 1, 3], [19, 13, 8], [7, 6, 4]])
    lab[small[:, 0], small[:, 1], small[:, 2]] = 6
    p = BalancedSamplingParams(positives_per_class=7000, negatives=0, jitter=False)
    sampler = balanced(tmp_path, [lab], [6, 4], p, seed=2)
    pts, labels = sampler.sample([0], epoch=1)
    cells = cell_index(pts[0, :7000], SHAPE)
    assert np.all(labels[0, :7000] == 6) and np.all(labels[0, 7000:] == 4)
    flat = np.ravel_multi_index(cells.T, SHAPE)
    counts = np.bincount(flat, minlength=lab.size)[np.ravel_multi_index(small.T, SHAPE)]
    assert counts.sum() == 7000 and np.all(np.abs(counts - 1000) < 150)
    big = np.bincount(np.ravel_multi_index(cell_index(pts[0, 7000:], SHAPE).T, SHAPE), minlength=lab.size)
    assert np.count_nonzero(big) > 0.95 * np.count_nonzero(lab == 4)  # 7000 draws over 648 voxels


def test_class_balanced_jitter_stops_after_jitter_epochs(tmp_path):
    maps = label_maps()
    sampler = balanced(tmp_path, maps, [2, 3, 8], BalancedSamplingParams(20, 30, jitter_epochs=3), seed=1)
    n_cell = 20 * 3 + (30 - 30 // 2)  # case 0 has all three classes: positives + band negatives

    def off_centre(epoch):
        pts = sampler.sample([0], epoch)[0][0, :n_cell]
        from_centre = normalised_to_index(pts, maps[0].shape) - cell_index(pts, maps[0].shape)
        return np.abs(from_centre).max()

    assert off_centre(1) > 0.2 and off_centre(3) > 0.2  # jittered within the cell up to epoch 3
    assert off_centre(4) < 1e-5 and off_centre(10) < 1e-5  # cell centres afterwards
    with pytest.raises(ValueError, match="jitter_epochs"):
        BalancedSamplingParams(jitter_epochs=-1)


def test_class_balanced_state_round_trip(tmp_path):
    maps = label_maps()
    p = BalancedSamplingParams(positives_per_class=20, negatives=30)
    a = balanced(tmp_path, maps, [2, 3, 9], p, seed=4)
    a.sample([0, 1], 1)
    state = pickle.dumps(a.state_dict())
    expected = a.sample([1, 0], 2)
    b = balanced(tmp_path, maps, [2, 3, 9], p, seed=4)
    b.load_state_dict(pickle.loads(state))
    assert all(np.array_equal(x, y) for x, y in zip(expected, b.sample([1, 0], 2)))
    alone = balanced(tmp_path, maps, [2, 3, 9], p, seed=4).sample([0], 2)  # keyed by case: the batch does not matter
    assert all(np.array_equal(x[1:], y) for x, y in zip(expected, alone))


def test_sparse_round_trip():
    m = np.random.default_rng(0).random(SHAPE) < 0.1
    coords = sparse_coordinates(m)
    assert coords.dtype == np.int32 and coords.shape == (m.sum(), 3)
    assert np.array_equal(coords, np.argwhere(m))
    assert np.array_equal(dense_from_sparse(coords, SHAPE), m)
    assert not dense_from_sparse(sparse_coordinates(np.zeros(SHAPE, bool)), SHAPE).any()
    with pytest.raises(ValueError):
        dense_from_sparse(np.array([[19, 14, 0]]), SHAPE)


def test_interface_band_covers_both_sides_of_every_class_boundary():
    lab = np.zeros((12, 10, 9), dtype=np.uint8)
    lab[2:10, 2:8, 2:7] = 2
    lab[2:10, 2:8, 5:7] = 3  # a 2|3 face between k = 4 and k = 5, inside the foreground
    band = interface_band(lab, 1)
    assert band[5, 5, 4] and band[5, 5, 5]  # both sides of the class-class face
    assert band[5, 5, 1] and band[5, 5, 2]  # both sides of the foreground-background face
    assert not band[5, 5, 3]  # inside class 2, one voxel from both faces
    assert not band[0, 0, 0] and not band[11, 9, 8]  # far background
    assert np.array_equal(interface_band(lab, 2) | band, interface_band(lab, 2))  # grows with the radius
    assert not interface_band(np.full((4, 5, 6), 3, np.uint8), 1).any()
    with pytest.raises(ValueError, match="radius"):
        interface_band(lab, 0)


@pytest.mark.parametrize("shape", [(9, 6, 4), (1, 7, 5), (8, 1, 1)])
def test_the_radius_one_band_is_the_balls_band(shape):
    """Radius 1 compares face neighbours instead of filtering: the same voxels as the ball's max != min."""
    from scipy import ndimage

    lab = np.random.default_rng(3).integers(0, 3, shape).astype(np.uint8)
    ball = ndimage.generate_binary_structure(3, 1)  # the radius-1 ball: a voxel and its six faces' neighbours
    expected = ndimage.maximum_filter(lab, footprint=ball) != ndimage.minimum_filter(lab, footprint=ball)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(interface_band(lab, 1), expected)


def test_mining_schedule_and_limits():
    p = BalancedSamplingParams(positives_per_class=10, negatives=40, mined=20, mine_from_epoch=30, mine_interval=10)
    assert [e for e in range(1, 61) if mining_due(p, e)] == [30, 40, 50, 60]
    assert [e for e in range(1, 25) if mining_due(dataclasses.replace(p, mine_from_epoch=0), e)] == [10, 20]
    assert not any(mining_due(dataclasses.replace(p, mined=0), e) for e in range(1, 61))
    BalancedSamplingParams(negatives=41, mined=21)  # the band takes the larger half
    with pytest.raises(ValueError, match="band half"):
        BalancedSamplingParams(negatives=40, mined=21)
    with pytest.raises(ValueError, match="mine_interval"):
        BalancedSamplingParams(negatives=40, mined=4, mine_interval=0)


def test_mined_voxels_replace_band_negatives_only_once_there_are_some(tmp_path):
    maps = label_maps()
    p = BalancedSamplingParams(positives_per_class=20, negatives=30, jitter=False, mined=10)
    plain = balanced(tmp_path, maps, [2, 3, 8], dataclasses.replace(p, mined=0), seed=5)
    mining = balanced(tmp_path, maps, [2, 3, 8], p, seed=5)
    # no mined voxels yet: the very same points as without mining
    assert all(np.array_equal(x, y) for x, y in zip(plain.sample([0, 1], 1), mining.sample([0, 1], 1)))
    cells = np.array([[0, 13, 8], [11, 5, 3]])  # background and a voxel of class 8
    mining.mined_voxels.write_pass(1, flat_pass(maps, [cells, np.zeros((0, 3))]))
    pts, lab = mining.sample([0, 1], 2)
    n_before = 20 * 3 + (30 - 30 // 2) - 10  # positives and what is left of the band negatives of case 0
    got = cell_index(pts[0], maps[0].shape)
    from_mined = (got[:, None, :] == cells[None]).all(-1).any(1)
    assert from_mined[n_before:n_before + 10].all()  # the last 10 of the band half ...
    assert np.allclose(pts[0, n_before:n_before + 10], index_to_normalised(got[n_before:n_before + 10], maps[0].shape))
    mined = got[n_before:n_before + 10]
    assert np.array_equal(lab[0, n_before:n_before + 10], maps[0][mined[:, 0], mined[:, 1], mined[:, 2]])
    assert set(lab[0, n_before:n_before + 10]) == {0, 8}  # ... with their labels looked up
    uniform = pts[0, n_before + 10:]
    assert len(uniform) == 30 // 2 and not from_mined[n_before + 10:].all()  # the uniform half stays
    assert np.abs(normalised_to_index(uniform, maps[0].shape) - cell_index(uniform, maps[0].shape)).max() > 0.1
    assert mining.mined_count(0) == 2 and mining.mined_count(1) == 0
    with pytest.raises(ValueError, match="needs a MinedVoxels"):
        ClassBalancedSampler(mining.store, p, 5)


def test_mined_voxels_live_on_disk_and_a_checkpoint_names_their_pass(tmp_path):
    maps = label_maps()
    p = BalancedSamplingParams(positives_per_class=20, negatives=30, mined=10)
    folder = tmp_path / "mined"
    a = balanced(tmp_path, maps, [2, 3, 8], p, seed=5, mining=folder)
    a.mined_voxels.write_pass(4, flat_pass(maps, [np.zeros((0, 3)), [[3, 2, 4], [16, 10, 12]]]))
    state = pickle.dumps(a.state_dict())
    assert len(state) < 1000 and pickle.loads(state)["mined_pass"] == 4  # the voxels are not in it
    expected = a.sample([1, 0], 7)
    a.mined_voxels.write_pass(8, flat_pass(maps, [[[1, 1, 1]], [[3, 2, 4]]]))  # a later pass, not yet checkpointed
    b = balanced(tmp_path, maps, [2, 3, 8], p, seed=5, mining=folder)
    b.load_state_dict(pickle.loads(state))  # a resume from the checkpoint: its pass, not the latest
    assert b.mined_count(1) == 2 and b.mined_count(0) == 0
    assert all(np.array_equal(x, y) for x, y in zip(expected, b.sample([1, 0], 7)))
    a.mined_voxels.checkpointed()  # a checkpoint now holds pass 8: pass 4 goes
    assert sorted(f.name for f in folder.iterdir()) == ["pass_8"]
    old = pickle.loads(state)
    del old["mined_pass"]  # a checkpoint written before the first mining pass
    c = balanced(tmp_path, maps, [2, 3, 8], p, seed=5, mining=folder)
    c.load_state_dict(old)
    assert c.mined_count(1) == 0
    with pytest.raises(FileNotFoundError, match="mined voxels this checkpoint drew from are missing"):
        c.load_state_dict(pickle.loads(state))
