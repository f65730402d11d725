"""Stage-3 batches drawn in torch on the fit's device (here the CPU): the host sampler's layout and
labels, per-case streams, the teachers' trilinear values, the device cache, and exact resume."""

import dataclasses

import numpy as np
import pytest
import torch
from test_unified import SAMPLING, T, case_store, heart_maps

from nearfix_lib.core.config import BalancedSamplingParams, UnifiedLossParams
from nearfix_lib.core.geometry import Box
from nearfix_lib.field import device_batches as db
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.sampling import boundary_band, cell_index, lookup
from nearfix_lib.field.store import Teacher
from nearfix_lib.field.train import fit
from nearfix_lib.field.unified import UnifiedTask, teacher_affine
from nearfix_lib.field.unified import trilinear_zero_padded as host_trilinear

DEVICE = dataclasses.replace(SAMPLING, batches="device")


def teachers_for(maps):
    """Per case a smooth teacher of LV on a class box inside the heart box, and one of Cor."""
    out = []
    rng = np.random.default_rng(5)
    for lab in maps:
        heart = Box((0, 0, 0), lab.shape)
        lv = Box((2, 2, 1), (14, 13, 11))
        out.append([Teacher(T.keys.index("LV"), rng.random((9, 8, 7)).astype(np.float32), teacher_affine(heart, lv)),
                    Teacher(T.keys.index("Cor"), rng.random((6, 5, 4)).astype(np.float32),
                            teacher_affine(heart, Box((5, 1, 1), (11, 6, 11))))])
    return out


def task_for(root, sampling=DEVICE, maps=None, teachers=None, distill=0.0):
    maps = heart_maps() if maps is None else maps
    return UnifiedTask(case_store(root, maps, sampling, teachers), T, sampling,
                       UnifiedLossParams(distill_weight=distill), seed=0, device="cpu")


def test_device_batch_has_the_host_layout_and_labels_read_at_its_points(tmp_path):
    maps = heart_maps()
    task = task_for(tmp_path, maps=maps)
    assert task.device_sampler is not None
    b = task.batch(np.array([0, 2]), epoch=1)
    host = task_for(tmp_path, sampling=SAMPLING, maps=maps).batch(np.array([0, 2]), epoch=1)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: (v.shape, v.dtype) for k, v in host.items()}
    assert not torch.equal(b["points"], host["points"])  # torch's generator, not numpy's
    pos = SAMPLING.positives_per_class
    for row, case in enumerate((0, 2)):
        points = b["points"][row].numpy()
        assert np.abs(points).max() <= 1.0
        labels = lookup(maps[case], points)  # the label of the cell containing each float32 point
        channel = b["target"][row].argmax(-1).numpy()
        onehot = b["target"][row].sum(-1).numpy() > 0
        assert np.array_equal(np.where(onehot, np.asarray(T.indices)[channel], 0), labels)
        present = [c for c in T.indices if (maps[case] == c).any()]
        for k, c in enumerate(present):  # positives in blocks, class by class, in table order
            assert (labels[k * pos:(k + 1) * pos] == c).all()
        n_neg = SAMPLING.negatives + pos * (len(T) - len(present))
        band = boundary_band(maps[case] > 0, SAMPLING.dilation_radius)
        start = pos * len(present)
        cells = cell_index(points[start:start + n_neg - n_neg // 2], maps[case].shape)
        assert band[cells[:, 0], cells[:, 1], cells[:, 2]].all()  # the larger half of the negatives: the band


def test_a_case_draws_the_same_points_alone_or_in_any_batch(tmp_path):
    task = task_for(tmp_path)
    both = task.batch(np.array([2, 0]), epoch=3)
    alone = [task.batch(np.array([i]), epoch=3) for i in (2, 0)]
    for k in ("points", "target"):
        assert torch.equal(both[k], torch.cat([a[k] for a in alone]))
    assert not torch.equal(task.batch(np.array([2]), epoch=4)["points"], alone[0]["points"])  # epochs differ


def test_class_draws_reach_every_voxel_of_a_thin_class_and_only_those(tmp_path):
    maps = heart_maps(1)
    sampling = dataclasses.replace(DEVICE, positives_per_class=400, jitter=False)
    task = task_for(tmp_path, sampling=sampling, maps=maps)
    points, labels, _ = task.device_sampler.sample_case(0, epoch=1)
    cor = T["Cor"].index
    k = [c for c in T.indices if (maps[0] == c).any()].index(cor)
    block = points[k * 400:(k + 1) * 400].numpy()
    cells = {tuple(c) for c in cell_index(block, maps[0].shape)}
    assert cells == {tuple(c) for c in np.argwhere(maps[0] == cor)}  # 8 voxels, all reached, nothing else
    assert (labels[k * 400:(k + 1) * 400] == cor).all()


def test_class_draws_are_uniform_over_a_class_whose_rows_hold_one_to_nine_of_its_voxels(tmp_path):
    lab = np.zeros((6, 5, 9), dtype=np.uint8)
    lv, cor = T["LV"].index, T["Cor"].index  # Myo and LA absent: classes before LV take no ranks
    lab[1, 1, 4] = lv
    lab[3, 2, :] = lv
    lab[4, 0, 2:5] = lv
    lab[2, 3, [1, 7]] = cor
    n = 13_000  # 1,000 per LV voxel expected, a standard deviation of ~28
    task = task_for(tmp_path, sampling=dataclasses.replace(DEVICE, positives_per_class=n, jitter=False), maps=[lab])
    points, labels, _ = task.device_sampler.sample_case(0, epoch=1)
    cells, hits = np.unique(cell_index(points[:n].numpy(), lab.shape), axis=0, return_counts=True)
    assert np.array_equal(cells, np.argwhere(lab == lv))  # every LV voxel, nothing else
    assert np.abs(hits - n / 13).max() < 150, hits  # uniform over voxels, not over rows (1 in a row: 2,167)
    cor_cells = np.unique(cell_index(points[n:2 * n].numpy(), lab.shape), axis=0)
    assert np.array_equal(cor_cells, np.argwhere(lab == cor)) and (labels[n:2 * n] == cor).all()


def test_teacher_values_on_the_device_equal_the_host_look_up(tmp_path):
    maps = heart_maps()
    teachers = teachers_for(maps)
    task = task_for(tmp_path, maps=maps, teachers=teachers, distill=0.5)
    b = task.batch(np.array([1, 0]), epoch=2)
    from nearfix_lib.field.unified import teacher_values

    for row, case in enumerate((1, 0)):
        stored = task.store.teachers(case)
        expected = teacher_values(stored, b["points"][row].numpy(), len(T))
        assert np.abs(b["teacher"][row].numpy() - expected).max() < 1e-6
        assert expected[:, T.keys.index("LV")].max() > 0.5
    assert b["has_teacher"].dtype == torch.bool and b["has_teacher"][:, T.keys.index("LV")].all()


@pytest.mark.parametrize("shape", [(7, 5, 4), (1, 6, 3)])
def test_trilinear_matches_grid_sample_and_the_host_version(shape):
    from torch.nn.functional import grid_sample

    gen = torch.Generator().manual_seed(2)
    grid = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    points = torch.rand((500, 3), generator=gen) * 2.6 - 1.3  # some outside: zero padding
    got = db.stacked_trilinear(grid.reshape(-1), torch.zeros(1, dtype=torch.int64), torch.tensor([shape]),
                               points.T[None])[0]
    reference = grid_sample(grid.float()[None, None], points[:, [2, 1, 0]].reshape(1, 1, 1, -1, 3),
                            mode="bilinear", padding_mode="zeros", align_corners=False).reshape(-1)
    assert torch.allclose(got, reference, rtol=1e-5, atol=1e-3)
    assert np.abs(got.numpy() - host_trilinear(grid.numpy(), points.numpy())).max() < 1e-3


def test_the_device_cache_stays_within_its_budget_and_gives_the_same_draws(tmp_path):
    task = task_for(tmp_path)
    unlimited = [task.batch(np.array([i]), epoch=1)["points"] for i in (0, 1, 2, 0)]
    tiny = task_for(tmp_path, sampling=dataclasses.replace(DEVICE, device_cache_mb=1e-4))
    small = [tiny.batch(np.array([i]), epoch=1)["points"] for i in (0, 1, 2, 0)]
    assert all(torch.equal(a, b) for a, b in zip(unlimited, small))
    assert len(tiny.device_sampler.cache) == 1 and tiny.device_sampler.cache.loads == 4  # case 0 loaded twice
    assert len(task.device_sampler.cache) == 3 and task.device_sampler.cache.loads == 3


def test_where_batches_are_drawn():
    params = BalancedSamplingParams()
    assert params.batches == "auto"
    assert not db.device_batches(params, "cpu") and db.device_batches(params, "cuda:0")
    assert db.device_batches(dataclasses.replace(params, batches="device"), "cpu")
    assert not db.device_batches(dataclasses.replace(params, batches="host"), "cuda")
    assert db.device_cache_mb(params, "cpu") == 2048 and db.device_cache_mb(DEVICE, "cpu") == 2048
    assert db.device_cache_mb(dataclasses.replace(params, device_cache_mb=300), "cpu") == 300
    with pytest.raises(ValueError, match="batches"):
        BalancedSamplingParams(batches="gpu")
    with pytest.raises(ValueError, match="device_cache_mb"):
        BalancedSamplingParams(device_cache_mb=-1)
    seeds = {db.case_seed(0, e, c) for e in range(1, 20) for c in range(50)}
    assert len(seeds) == 19 * 50 and max(seeds) < 2**63


def test_stage1_device_batches_put_the_band_share_in_the_band_and_read_targets_at_their_points(tmp_path):
    from test_train_infer import masks, stage1_params

    from nearfix_lib.core.config import SamplingParams
    from nearfix_lib.field.sampling import bias_at_epoch
    from nearfix_lib.stages.stage1 import Stage1Task, write_mask_store

    params = stage1_params()
    params = dataclasses.replace(params, sampling=SamplingParams(points_per_case=300, batches="device"))
    shapes = masks(3)
    task = Stage1Task(write_mask_store(tmp_path, shapes, params.sampling), params, seed=0, device="cpu")
    assert task.device_sampler is not None
    b = task.batch(np.array([2, 0]), epoch=150)
    n_band = int(round(bias_at_epoch(params.sampling, 150) * 300))
    assert b["points"].shape == (2, 300, 3) and b["target"].dtype == torch.float32
    for row, case in enumerate((2, 0)):
        points = b["points"][row].numpy()
        assert np.array_equal(b["target"][row].numpy(), lookup(shapes[case], points).astype(np.float32))
        cells = cell_index(points[:n_band], shapes[case].shape)
        band = boundary_band(shapes[case], params.sampling.sampling_dilation_radius)
        assert band[cells[:, 0], cells[:, 1], cells[:, 2]].all()
    alone = task.batch(np.array([0]), epoch=150)
    assert torch.equal(alone["points"][0], b["points"][1])  # per-case streams


def test_a_stage1_fit_with_device_batches_resumes_exactly(tmp_path):
    from test_train_infer import TINY_MODEL, stage1_params, stage1_task

    params = stage1_params()
    params = dataclasses.replace(params, sampling=dataclasses.replace(params.sampling, batches="device"))

    def run(out, seed, epochs=None):
        torch.manual_seed(seed)
        model = ImplicitField(4, TINY_MODEL)
        return model, fit(model, stage1_task(tmp_path / "cases", params), params.train, out, progress=False,
                          epochs=epochs)

    straight, _ = run(tmp_path / "a", 0)
    run(tmp_path / "b", 0, epochs=3)
    resumed, result = run(tmp_path / "b", 99)
    assert result.resumed_from == 3
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
