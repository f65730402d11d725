"""The fit loop under DistributedDataParallel (2 CPU processes, gloo) equals one process.

Both see the same global batch of 4 cases per step: the two ranks draw it with the same RNG and
keep 2 cases each, DDP averages their gradients, so every update equals the one-process update
up to float rounding.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nearfix_lib.core.config import TrainParams, UnifiedLossParams
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.train import fit, load_checkpoint
from nearfix_lib.field.unified import UnifiedTask

from test_unified import SAMPLING, SMALL_MODEL, T, heart_maps

TRAIN = TrainParams(epochs=4, cases_per_batch=4, lr=3e-3, lr_latent=3e-3, lr_step_epochs=2,
                    eval_interval=4, checkpoint_interval=4)


# mining passes after every epoch from the first: each rank mines every case on its own weights
MINING = dataclasses.replace(SAMPLING, mined=32, mine_from_epoch=1, mine_interval=1)


def _fit(out_dir, sampling):
    torch.manual_seed(0)
    model = ImplicitField(4, SMALL_MODEL, n_heads=len(T))
    task = UnifiedTask(heart_maps(4), T, sampling, UnifiedLossParams(distill_weight=0.0), seed=0, device="cpu")
    return fit(model, task, TRAIN, out_dir, device="cpu", seed=0, progress=False)


def _worker(rank, world, init_file, out_dir, sampling):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _fit(out_dir, sampling)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("sampling", [SAMPLING, MINING], ids=["plain", "mining"])
def test_two_gloo_processes_match_one_process(tmp_path, sampling):
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), sampling), nprocs=2, join=True)
    _fit(tmp_path / "single", sampling)
    ddp, single = load_checkpoint(tmp_path / "ddp" / "last.pt"), load_checkpoint(tmp_path / "single" / "last.pt")
    assert ddp["epoch"] == single["epoch"] == 4
    for name, value in single["model"].items():
        if name.startswith("decoder.blocks.") and name.endswith(".0.bias"):
            # a conv bias followed by GroupNorm: its exact gradient is 0, and Adam turns the float
            # noise of two different summation orders into full-size steps; it cannot change outputs
            continue
        assert torch.allclose(ddp["model"][name], value, atol=1e-4), name
    models = []
    for ckpt in (ddp, single):
        m = ImplicitField(4, SMALL_MODEL, n_heads=len(T))
        m.load_state_dict(ckpt["model"])
        models.append(m.eval())
    pts = torch.rand(4, 500, 3) * 2 - 1
    with torch.no_grad():
        out = [torch.sigmoid(m(torch.arange(4), pts)) for m in models]
    assert (out[0] - out[1]).abs().max() < 1e-4
    assert not torch.equal(single["model"]["mlp.fc1.weight"],
                           ImplicitField(4, SMALL_MODEL, n_heads=len(T)).state_dict()["mlp.fc1.weight"])
    # the logged loss is the mean over ranks, i.e. the global batch's loss
    assert np.isclose(ddp["history"][-1]["loss"], single["history"][-1]["loss"], rtol=1e-4)


def test_a_batch_that_does_not_split_evenly_is_refused():
    from nearfix_lib.field.train import _shard

    batch = {"case": torch.arange(3), "points": torch.zeros(3, 5, 3)}
    assert _shard({"case": torch.arange(4)}, 4, 1, 2)["case"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="split evenly"):
        _shard(batch, 3, 0, 2)
