"""The fit loop under DistributedDataParallel (2 CPU processes, gloo) equals one process, for the
unified task of stage 3 (with and without mining) and the per-class task of stage 1, each reading
its cases from a store on disk as under torchrun.

Both see the same global batch of 4 cases per step: each rank draws (and maps from the store) only
its 2 cases, with the per-case random streams the one process uses for them, DDP averages the
ranks' gradients, so every update equals the one-process update up to float rounding.

What is compared is what DDP guarantees, each with a tolerance that does not hinge on one rounding
pattern (it holds whatever thread count the reference runs on; the test still runs every process
on the same count, so its numbers do not depend on the machine either):

* the ranks stay in lockstep: identical averaged gradients, hence identical weights, bit for bit;
* step 1 (same initial weights everywhere): the gradient averaged over the ranks' halves of the
  batch is the one-process gradient of the whole batch, up to float summation order;
* after the fit, the two models give the same outputs and the same logged loss.

Weights after the fit are not compared element by element: Adam divides each gradient by its own
running scale, so an element whose exact gradient is (nearly) zero, e.g. a conv bias followed by
GroupNorm, takes full-size steps in the direction of its float noise, and two summation orders
(two ranks' halves vs one batch, or 1 thread vs 2) move it differently. The outputs cannot see it.
"""

import dataclasses
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_unified import SAMPLING, SMALL_MODEL, T, case_store, heart_maps
from torch.optim.optimizer import register_optimizer_step_pre_hook

from nearfix_lib.core.config import SamplingParams, Stage1Params, TrainParams, UnifiedLossParams
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.train import fit, load_checkpoint
from nearfix_lib.field.unified import UnifiedTask
from nearfix_lib.stages.stage1 import Stage1Task, write_mask_store

TRAIN = TrainParams(epochs=4, cases_per_batch=4, lr=3e-3, lr_latent=3e-3, lr_step_epochs=2,
                    eval_interval=4, checkpoint_interval=4)

# mining passes after every epoch from the first: each rank mines every case on its own weights
MINING = dataclasses.replace(SAMPLING, mined=32, mine_from_epoch=1, mine_interval=1)

# every process of the comparison (each gloo rank and the one-process reference) runs torch on this
# many threads: the thread count changes how a reduction is split, hence the float rounding, so
# the reference must not take whatever the machine (or OMP_NUM_THREADS) gives it
THREADS = 1
WORLD = 2


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def unified_task(out_dir, sampling):
    """Stage 3's task on 4 label maps (a model of len(T) heads)."""
    return UnifiedTask(case_store(Path(out_dir) / "cases", heart_maps(4), sampling), T, sampling,
                       UnifiedLossParams(distill_weight=0.0), seed=0, device="cpu")


def stage1_task(out_dir):
    """Stage 1's task on the LV masks of the same 4 cases (a model of 1 head)."""
    params = Stage1Params(model=SMALL_MODEL, sampling=SamplingParams(points_per_case=256))
    masks = [m == T["LV"].index for m in heart_maps(4)]
    return Stage1Task(write_mask_store(Path(out_dir) / "cases", masks, params.sampling), params, seed=0,
                      device="cpu")


# the task and the model's head count; module-level functions (and partials), so that mp.spawn can pickle them
TASKS = {"plain": (partial(unified_task, sampling=SAMPLING), len(T)),
         "mining": (partial(unified_task, sampling=MINING), len(T)),
         "stage1": (stage1_task, 1)}


def _fit(out_dir, setup) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[list[int]]]:
    """Fit; returns the gradients the first optimiser step applied (after DDP's averaging), the
    final weights of this process's model and the cases of every batch this process drew."""
    # the ranks of a DDP fit share out_dir, so they write (the same bytes of) the same store, as under torchrun
    make_task, heads = setup
    torch.manual_seed(0)
    model = ImplicitField(4, SMALL_MODEL, n_heads=heads)
    task = make_task(out_dir)
    drawn: list[list[int]] = []
    batch = task.batch
    task.batch = lambda idx, epoch: drawn.append([int(i) for i in idx]) or batch(idx, epoch)
    names = {id(p): name for name, p in model.named_parameters()}
    first: dict[str, torch.Tensor] = {}

    def keep_first_gradients(opt, args, kwargs):
        if not first:
            first.update({names[id(p)]: p.grad.detach().clone()
                          for g in opt.param_groups for p in g["params"] if p.grad is not None})

    handle = register_optimizer_step_pre_hook(keep_first_gradients)
    try:
        fit(model, task, TRAIN, out_dir, device="cpu", seed=0, progress=False)
    finally:
        handle.remove()
    return first, {k: v.detach().clone() for k, v in model.state_dict().items()}, drawn


def _worker(rank, world, init_file, out_dir, setup):
    torch.set_num_threads(THREADS)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads, weights, drawn = _fit(out_dir, setup)
        torch.save({"grads": grads, "weights": weights, "drawn": drawn}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_both(tmp_path, setup, threads: int = THREADS):
    """The DDP fit (``WORLD`` gloo ranks, ``THREADS`` threads each) and the one-process fit (on
    ``threads`` threads, then the count it had is restored): rank files, step-1 gradients, checkpoints."""
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path / "ddp"), setup), nprocs=WORLD,
             join=True)
    with torch_threads(threads):
        single_grads, _, drawn = _fit(tmp_path / "single", setup)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(WORLD)]
    ddp, single = (load_checkpoint(tmp_path / name / "last.pt") for name in ("ddp", "single"))
    # each rank drew only its half of every batch: the two halves are the one process's batch
    assert all(len(half) == len(whole) // WORLD for r in ranks for half, whole in zip(r["drawn"], drawn))
    assert [a + b for a, b in zip(ranks[0]["drawn"], ranks[1]["drawn"])] == drawn
    return ranks, single_grads, ddp, single


def sigmoid_outputs(weights: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    m = ImplicitField(4, SMALL_MODEL, n_heads=heads)
    m.load_state_dict(weights)
    pts = torch.rand(4, 500, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        return torch.sigmoid(m.eval()(torch.arange(4), pts))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("task", list(TASKS))
def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch, task):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    ranks, single_grads, ddp, single = run_both(tmp_path, TASKS[task])
    heads = TASKS[task][1]
    assert torch.get_num_threads() == before  # the reference's thread count is restored
    assert ddp["epoch"] == single["epoch"] == 4

    # the ranks in lockstep: the same averaged gradients and the same weights, exactly
    for r in ranks[1:]:
        assert r["grads"].keys() == ranks[0]["grads"].keys()
        assert all(torch.equal(r["grads"][k], v) for k, v in ranks[0]["grads"].items())
        assert all(torch.equal(r["weights"][k], v) for k, v in ranks[0]["weights"].items())
    assert all(torch.equal(ddp["model"][k], v) for k, v in ranks[0]["weights"].items())

    # step 1 (the same initial weights everywhere): the mean of the ranks' gradients is the whole
    # batch's gradient. Float32 summation-order noise is ~1e-6 of a tensor's scale (measured: at most
    # 1.5e-6, reference on 1, 2, 4 or 16 threads); a rank that summed instead of averaging, or kept
    # the wrong cases, is off by O(1).
    assert ranks[0]["grads"].keys() == single_grads.keys()
    scale = max(float(g.abs().max()) for g in single_grads.values())
    noise = {name for name, g in single_grads.items() if g.abs().max() <= 1e-6 * scale}
    # a conv bias followed by GroupNorm with one channel per group has exact gradient 0: float noise
    assert all(n.startswith("decoder.blocks.") and n.endswith(".0.bias") for n in noise), noise
    for name, g in single_grads.items():
        mean = ranks[0]["grads"][name]
        if name in noise:
            assert mean.abs().max() <= 1e-6 * scale, name
        else:
            assert (mean - g).abs().max() <= 1e-4 * g.abs().max(), name

    # after the fit (4 steps, the mined points chosen on each side's own weights): the same outputs
    out_ddp, out_single = sigmoid_outputs(ddp["model"], heads), sigmoid_outputs(single["model"], heads)
    assert (out_ddp - out_single).abs().max() < 1e-4
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the initial weights of both fits
        initial = ImplicitField(4, SMALL_MODEL, n_heads=heads).state_dict()
    assert (sigmoid_outputs(initial, heads) - out_single).abs().max() > 1e-2  # ... and the fit changed them
    # the logged loss is the mean over ranks, i.e. the global batch's loss
    assert np.isclose(ddp["history"][-1]["loss"], single["history"][-1]["loss"], rtol=1e-4)


def test_a_batch_that_does_not_split_evenly_is_refused():
    from nearfix_lib.field.train import _share

    assert _share(np.array([7, 1, 4, 2]), 1, 2).tolist() == [4, 2]
    with pytest.raises(ValueError, match="split evenly"):
        _share(np.arange(3), 0, 2)
