"""The fit loop (exact resume, checkpoints, log) and chunked inference on any grid."""

import numpy as np
import pytest
import torch

from nearfix_lib.core.config import ModelParams, SamplingParams, Stage1Params, TrainParams
from nearfix_lib.core.geometry import Box, roi_grid
from nearfix_lib.field.infer import (
    field_in_box,
    field_on_grid,
    grid_within_box,
    iter_normalised_points,
    original_box_grid,
)
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.train import fit, load_checkpoint, to_device
from nearfix_lib.stages.stage1 import Stage1Task, write_mask_store

TINY_MODEL = ModelParams(latent_dim=16, grid_channels=(8, 4), grid_sizes=(4, 8))


def masks(n=4, shape=(14, 11, 9)):
    rng = np.random.default_rng(3)
    out = []
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for _ in range(n):
        c = rng.uniform(3, 6, 3)
        out.append(((ii - c[0]) / 5) ** 2 + ((jj - c[1]) / 3.5) ** 2 + ((kk - c[2]) / 2.5) ** 2 < 1)
    return out


def stage1_params(epochs=6):
    return Stage1Params(model=TINY_MODEL, sampling=SamplingParams(points_per_case=256),
                        train=TrainParams(epochs=epochs, cases_per_batch=2, eval_interval=2,
                                          checkpoint_interval=1, lr_step_epochs=3))


def stage1_task(store_dir, params, n=4):
    """A Stage1Task on ``masks(n)``, stored in ``store_dir``."""
    return Stage1Task(write_mask_store(store_dir, masks(n), params.sampling), params, seed=0, device="cpu")


def make(store_dir, seed=0):
    torch.manual_seed(seed)
    params = stage1_params()
    return ImplicitField(4, params.model), stage1_task(store_dir, params), params


def test_resume_continues_exactly(tmp_path):
    model_a, task_a, params = make(tmp_path / "cases")
    straight = fit(model_a, task_a, params.train, tmp_path / "a", progress=False)
    model_b, task_b, _ = make(tmp_path / "cases")
    half = fit(model_b, task_b, params.train, tmp_path / "b", progress=False, epochs=3)
    assert half.last_epoch == 3
    model_c, task_c, _ = make(tmp_path / "cases", seed=99)  # a fresh process: other init, other RNG
    resumed = fit(model_c, task_c, params.train, tmp_path / "b", progress=False)
    assert resumed.resumed_from == 3 and resumed.last_epoch == 6
    assert straight.history[-1]["step"] == resumed.history[-1]["step"] == 12
    for (name, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.allclose(a, c, atol=1e-6), name
    assert [r["loss"] for r in straight.history] == pytest.approx([r["loss"] for r in resumed.history], rel=1e-5)


def test_checkpoint_holds_everything_and_log_is_written(tmp_path):
    model, task, params = make(tmp_path / "cases")
    res = fit(model, task, params.train, tmp_path, progress=False, extra={"key": "LV", "case_ids": list("abcd")})
    ckpt = load_checkpoint(tmp_path / "last.pt")
    for k in ("model", "optimizer", "scheduler", "rng", "task", "order_rng", "epoch", "step", "history"):
        assert k in ckpt
    assert "latents.table.weight" in ckpt["model"] or any(k.startswith("latents.") for k in ckpt["model"])
    assert ckpt["extra"]["case_ids"] == list("abcd") and ckpt["epoch"] == 6
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == res.best_epoch and best["best_score"] == pytest.approx(res.best_score)
    assert res.best_score == max(r["dice"] for r in res.history if "dice" in r)
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert len(lines) == 7 and lines[0].startswith("epoch,step,loss")
    # the step schedule halved the rate after 3 epochs
    assert res.history[0]["lr"] == pytest.approx(1e-3) and res.history[-1]["lr"] == pytest.approx(2.5e-4)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    model, task, params = make(tmp_path / "cases")
    fit(model, task, params.train, tmp_path, progress=False, epochs=1)
    other = ImplicitField(5, params.model)  # different number of cases
    with pytest.raises(RuntimeError, match="does not fit this model"):
        fit(other, stage1_task(tmp_path / "cases5", params, 5), params.train, tmp_path, progress=False)


def test_chunked_evaluation_equals_one_shot_on_any_grid():
    torch.manual_seed(0)
    model = ImplicitField(2, TINY_MODEL)
    box = Box((3, 5, 2), (20, 12, 9))
    grid = roi_grid(box, (9, 6, 5))
    one = field_on_grid(model, 1, grid, box, chunk_points=10**6)
    chunked = field_on_grid(model, 1, grid, box, chunk_points=7)  # 1 slab of 30 points at a time
    assert one.shape == (9, 6, 5, 1)
    # BLAS may block a 30-point and a 270-point matrix product differently: equal to float32
    # rounding, and identical once thresholded
    assert np.abs(one - chunked).max() < 1e-6
    assert np.array_equal(one >= 0.5, chunked >= 0.5)
    # the original voxels inside the box, where the ROI grid is at native resolution, agree
    native = roi_grid(box, box.shape)
    assert np.allclose(field_on_grid(model, 1, native, box), field_on_grid(model, 1, original_box_grid(box), box),
                       atol=1e-6)


def test_slab_points_match_the_grid_convention():
    box = Box((1, 2, 3), (9, 7, 8))
    grid = roi_grid(box, (5, 4, 3))
    pts = np.concatenate([p for _, p in iter_normalised_points(grid, box, max_points=12)])
    assert np.allclose(pts, grid.normalised_points(box), atol=1e-6)


def test_field_in_box_evaluates_a_class_model_on_a_whole_heart_grid_only_inside_its_box():
    torch.manual_seed(0)
    model = ImplicitField(2, TINY_MODEL)
    heart = Box((1, 2, 0), (30, 25, 17))
    grid = roi_grid(heart, (23, 19, 13))  # resampled: voxel centres do not fall on original ones
    cls_box = Box((6, 9, 3), (18, 14, 12))
    out = field_in_box(model, 1, grid, cls_box, chunk_points=50)
    pts = grid.normalised_points(cls_box).reshape(*grid.shape, 3)
    inside = np.all(np.abs(pts) <= 1.0 + 1e-9, axis=-1)
    assert out.shape == (*grid.shape, 1) and inside.any() and (~inside).any()
    assert np.all(out[~inside] == 0.0) and np.all(out[inside] > 0.0)
    full = field_on_grid(model, 1, grid, cls_box)  # everywhere, extrapolating outside the box
    assert np.allclose(out[inside], full[inside], atol=1e-6)
    assert grid_within_box(grid, Box((40, 40, 40), (45, 45, 45))) is None
    assert np.all(field_in_box(model, 1, grid, Box((40, 40, 40), (45, 45, 45))) == 0.0)


def test_validation_runs_on_a_fixed_seeded_subset(tmp_path):
    """The cost of validation does not grow with the number of cases: a fixed subset, the same every time."""
    from nearfix_lib.field.train import validation_cases

    assert validation_cases(5, 0, seed=0) == validation_cases(5, 8, seed=0) == [0, 1, 2, 3, 4]
    subset = validation_cases(1000, 16, seed=7)
    assert len(subset) == 16 == len(set(subset)) and subset == sorted(subset) and max(subset) < 1000
    assert subset == validation_cases(1000, 16, seed=7) != validation_cases(1000, 16, seed=8)

    model, task, params = make(tmp_path / "cases")
    seen = []
    evaluate = task.evaluate
    task.evaluate = lambda m, cases: seen.append(list(cases)) or evaluate(m, cases)
    train = TrainParams(**{**params.train.__dict__, "eval_cases": 2})
    fit(model, task, train, tmp_path, progress=False)
    assert len(seen) == 3 and all(s == validation_cases(4, 2, seed=0) for s in seen)  # epochs 2, 4, 6


def test_a_loss_that_becomes_nan_stops_the_fit_at_the_end_of_its_epoch(tmp_path):
    model, task, params = make(tmp_path / "cases")
    real_loss, calls = task.loss, []

    def loss(net, batch):  # the third step (epoch 2 of 2-step epochs) goes bad
        total, parts = real_loss(net, batch)
        calls.append(1)
        return (total * float("nan"), parts) if len(calls) == 3 else (total, parts)

    task.loss = loss
    with pytest.raises(FloatingPointError, match=r"nan in epoch 2 \(steps 3 to 4\)"):
        fit(model, task, params.train, tmp_path / "fit", progress=False)
    assert not (tmp_path / "fit" / "best.pt").exists() or load_checkpoint(tmp_path / "fit" / "last.pt")["epoch"] == 1


def test_a_tensor_already_on_the_device_is_not_copied_and_a_host_tensor_crosses():
    host = torch.arange(6.0)
    assert to_device(host, "cpu") is host
    assert to_device(host, torch.device("cpu")) is host
    if torch.cuda.is_available():  # "cuda" names the current GPU: its tensors (cuda:0) must not be pinned again
        on_gpu = to_device(host, "cuda")
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), host)
        assert to_device(on_gpu, "cuda") is on_gpu
        assert to_device(on_gpu, f"cuda:{on_gpu.device.index}") is on_gpu
    else:  # without a GPU the meta device stands in: its tensors stay, host tensors cross unpinned
        meta = host.to("meta")
        assert to_device(meta, "meta") is meta
        assert to_device(host, "meta").device.type == "meta"
