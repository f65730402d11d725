"""One fit loop for every stage: per-class repair, the unified model and latent-only fitting.

What differs between stages — which points are sampled, which loss, how a fit is validated —
lives in a :class:`FitTask`; the loop owns devices, mixed precision, the optimiser (weights and
latents as separate parameter groups), the learning-rate schedule, checkpoints, exact resume,
the progress bar and the CSV log.

Checkpoints hold everything a resumed run needs to continue *exactly* as if it had never
stopped: weights and latents, optimiser and scheduler state, every random state (torch, the
task's samplers, the case order), epoch, step, the history and the resolved parameters.
``last.pt`` is written every ``checkpoint_interval`` epochs and at the end; ``best.pt`` whenever
the validation score improves. Resume is explicit and loud: a resumed fit prints (and appends
to ``events.log`` beside the checkpoints) ``resumed from <last.pt> at epoch N``, and a checkpoint
that does not match the model raises instead of silently restarting (a silent restart from
epoch 0 looks like a resumed fit and quietly throws the finished epochs away).
"""

from __future__ import annotations

import csv
import io as _io
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from nearfix_lib.core.config import TrainParams
from nearfix_lib.core.io import atomic_path, write_text


class FitTask(Protocol):
    """The stage-specific half of a fit.

    A task may also define ``before_epoch(model, epoch)``: the loop calls it on every rank at the
    start of each epoch (the unwrapped model), e.g. to choose where the epoch's points come from.
    Work that belongs after epoch e runs there before epoch e + 1, so a fit resumed from epoch e's
    checkpoint does it too. And ``checkpointed()``: called (on the rank that writes them) once
    ``last.pt`` holds the task's current :meth:`state_dict`, so that files only older states
    referred to (stage 3's mining passes) can go.
    """

    n_cases: int
    score_name: str  # the validation score (higher is better) that selects best.pt

    def batch(self, case_idx: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        """Sampled points and targets for these cases (CPU tensors, which the loop moves, or tensors
        already on the fit's device)."""

    def loss(self, model: torch.nn.Module,
             batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its named parts for the log, as detached 0-d tensors on the device: the loop
        reads them once per epoch, so a step never waits for the device."""

    def evaluate(self, model: torch.nn.Module, cases: Sequence[int]) -> dict[str, float]:
        """Validation metrics over these cases (indices); must contain ``score_name``."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class FitResult:
    history: list[dict]
    best_score: float
    best_epoch: int
    last_epoch: int
    resumed_from: int  # epoch the fit continued from (0 = fresh)
    seconds: float


def validation_cases(n_cases: int, eval_cases: int, seed: int) -> list[int]:
    """The cases validated during a fit: all of them when ``eval_cases`` is 0 or at least ``n_cases``,
    else a fixed subset drawn from ``seed`` (its own stream, so the batch order does not change)."""
    if eval_cases == 0 or eval_cases >= n_cases:
        return list(range(n_cases))
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    return sorted(int(i) for i in rng.choice(n_cases, size=eval_cases, replace=False))


CKPT_VERSION = 1


def make_optimizer(model: torch.nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    latent_ids = {id(p) for name, p in model.named_parameters() if name.startswith("latents.")}
    weights = [p for p in model.parameters() if id(p) not in latent_ids and p.requires_grad]
    latents = [p for p in model.parameters() if id(p) in latent_ids and p.requires_grad]
    groups = [g for g in ({"params": weights, "lr": params.lr}, {"params": latents, "lr": params.lr_latent})
              if g["params"]]
    return torch.optim.Adam(groups)


def _scheduler(opt: torch.optim.Optimizer, params: TrainParams):
    step = params.lr_step_epochs if params.lr_step_epochs > 0 else 10**9
    return torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=params.lr_gamma)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` through a temporary file: an interrupted write never replaces a good file."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A fit checkpoint, checked to be one.

    ``weights_only=False``: the checkpoint holds numpy's global RNG state
    (``np.random.get_state()``, whose key is an ndarray) so that a resumed fit draws what an
    uninterrupted one would, and torch's safe loader refuses ndarrays. These files are written
    by :func:`fit` into the run folder; do not load checkpoints from elsewhere through here.
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "nearfix-fit" or "model" not in ckpt:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a nearfix fit checkpoint (keys: {found})")
    return ckpt


def write_history_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


def fit(model: torch.nn.Module, task: FitTask, params: TrainParams, out_dir: Path, device: str = "cpu",
        seed: int = 0, resume: bool = True, progress: bool = True, extra: dict[str, Any] | None = None,
        epochs: int | None = None) -> FitResult:
    """Train ``model`` on ``task`` for ``params.epochs`` (or ``epochs``) epochs into ``out_dir``.

    ``out_dir`` receives ``last.pt``, ``best.pt`` and ``log.csv``. With ``resume`` and an
    existing ``last.pt`` the fit continues from it and says so: the lead process prints one line
    ``resumed from <out_dir>/last.pt at epoch N`` and appends it, after a local ISO timestamp, to
    ``<out_dir>/events.log`` (plain text, one event per line, never truncated; a fresh fit
    writes nothing there). ``extra`` (e.g. resolved params, class key, case ids) is stored in
    every checkpoint. ``epochs`` overrides the total (tests stop early).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = int(epochs if epochs is not None else params.epochs)
    model.to(device)
    opt = make_optimizer(model, params)
    sched = _scheduler(opt, params)
    order_rng = np.random.Generator(np.random.PCG64(seed))
    validation = validation_cases(task.n_cases, params.eval_cases, seed)
    # every random state a checkpoint holds starts from the seed, so two fits of the same seed
    # hold the same states (numpy's and Python's global ones are otherwise seeded by the OS)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    history: list[dict] = []
    epoch = step = 0
    best_score, best_epoch = -math.inf, 0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    resumed = resume and last_path.is_file()
    if resumed:
        ckpt = load_checkpoint(last_path)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise RuntimeError(f"{last_path}: checkpoint does not fit this model ({str(err).splitlines()[0]}); "
                               "use a new run folder or delete the checkpoint") from None
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        task.load_state_dict(ckpt["task"])
        order_rng.bit_generator.state = ckpt["order_rng"]
        _set_rng_state(ckpt["rng"])
        epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        best_score, best_epoch = float(ckpt["best_score"]), int(ckpt["best_epoch"])
        history = list(ckpt["history"])
    resumed_from = epoch
    rank, world = distributed_rank_world()
    lead = rank == 0  # validates, checkpoints and shows progress
    if resumed and lead:
        _log_event(out_dir, f"resumed from {last_path} at epoch {epoch}")
    use_amp = params.amp and str(device).startswith("cuda")
    steps_per_epoch = math.ceil(task.n_cases / params.cases_per_batch)
    started = time.perf_counter()
    net = _wrap_distributed(model, device) if world > 1 else model
    step_net = torch.compile(net) if params.compile else net  # the steps only; checkpoints hold model's weights

    def payload() -> dict:
        return {"format": "nearfix-fit", "version": CKPT_VERSION, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "task": task.state_dict(),
                "order_rng": order_rng.bit_generator.state, "rng": _rng_state(), "epoch": epoch, "step": step,
                "best_score": best_score, "best_epoch": best_epoch, "history": history, "extra": extra or {}}

    bar = tqdm(range(epoch + 1, total + 1), initial=epoch, total=total, desc="fit", unit="epoch",
               disable=not (progress and lead), file=sys.stdout, mininterval=2.0)
    before_epoch = getattr(task, "before_epoch", None)
    checkpointed = getattr(task, "checkpointed", None)
    for epoch in bar:
        t0 = time.perf_counter()
        if before_epoch is not None:  # every rank (stage 3's mining passes)
            before_epoch(model, epoch)
        model.train()
        order = order_rng.permutation(task.n_cases)
        sums: dict[str, torch.Tensor] = {}  # on the device: summed without a sync, read after the epoch
        for s in range(steps_per_epoch):
            idx = order[s * params.cases_per_batch:(s + 1) * params.cases_per_batch]
            # every rank draws only its share of the cases: the draws are keyed by case, so the
            # K shares are the batch one process would draw (field.sampling._CaseStreams)
            batch = task.batch(_share(idx, rank, world) if world > 1 else idx, epoch)
            loss, parts = train_step(task, step_net, model, opt, batch, device, params.grad_clip, use_amp)
            step += 1
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums[k] + v if k in sums else v.float()
        means = _epoch_means(sums, steps_per_epoch, world, device)
        if not math.isfinite(means["loss"]):  # a NaN or inf of any step of the epoch stays in the sum
            raise FloatingPointError(f"loss became {means['loss']} in epoch {epoch} (steps {step - steps_per_epoch + 1}"
                                     f" to {step})")
        sched.step()
        row: dict[str, Any] = {"epoch": epoch, "step": step, **means,
                               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        improved = False
        if lead and (epoch % params.eval_interval == 0 or epoch == total):
            model.eval()
            metrics = task.evaluate(model, validation)
            row.update(metrics)
            score = float(metrics[task.score_name])
            if score > best_score:
                best_score, best_epoch, improved = score, epoch, True
        history.append(row)
        if improved:
            save_checkpoint(best_path, payload())
        bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", task.score_name) if k in row}, refresh=False)
        if lead and (epoch % params.checkpoint_interval == 0 or epoch == total):
            save_checkpoint(last_path, payload())
            write_history_csv(out_dir / "log.csv", history)
            if checkpointed is not None:  # what only older states referred to may go now
                checkpointed()
    bar.close()
    if world > 1:
        torch.distributed.barrier()  # the checkpoints are written before any rank reads them
    return FitResult(history, best_score, best_epoch, epoch, resumed_from, time.perf_counter() - started)


def train_step(task: FitTask, net: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], device: str, grad_clip: float = 0.0,
               amp: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step on ``batch`` (moved to ``device``): ``net`` is what runs (the model, or its
    DDP or compiled wrapper), ``model`` whose gradients are clipped. Returns the loss and its parts,
    still on the device: nothing here waits for it."""
    batch = {k: to_device(v, device) for k, v in batch.items()}
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
        loss, parts = task.loss(net, batch)
    loss.backward()  # under DDP the gradients are averaged over ranks here
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss, parts


EVENTS_LOG = "events.log"


def _log_event(out_dir: Path, text: str) -> None:
    """Print ``text`` and append it, after a local ISO timestamp, to ``out_dir/events.log``."""
    print(text, flush=True)
    stamp = datetime.now().astimezone().isoformat(timespec="seconds")
    with open(Path(out_dir) / EVENTS_LOG, "a", encoding="utf-8") as f:
        f.write(f"{stamp} {text}\n")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, also when the fit loop hands a task its DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed_from_env(device: str) -> str:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); returns this rank's device.

    NCCL with one GPU per rank (LOCAL_RANK) on CUDA, gloo on CPU. Without torchrun it does
    nothing, so the same notebook code runs on one device.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    cuda = str(device).startswith("cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def _wrap_distributed(model: torch.nn.Module, device: str) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if str(device).startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def _share(idx: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's equal share of a batch's case indices."""
    if len(idx) % world:
        raise ValueError(f"train.cases_per_batch (and the case count) must split evenly over {world} "
                         f"processes; a step has {len(idx)} cases")
    per = len(idx) // world
    return idx[rank * per:(rank + 1) * per]


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A tensor on ``device``: host tensors cross to CUDA from pinned memory without blocking, so the
    copy overlaps the device's work; a tensor already there is returned as it is."""
    target = torch.device(device)
    if tensor.device.type == target.type and target.index in (None, tensor.device.index):
        return tensor  # "cuda" names the current GPU: a tensor on cuda:0 is already there
    if target.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _epoch_means(sums: dict[str, torch.Tensor], steps: int, world: int, device: str) -> dict[str, float]:
    """The epoch's mean loss parts (over ranks too): the loop's one device-to-host read per epoch."""
    t = torch.stack([v.to(device=device, dtype=torch.float64) for v in sums.values()]) / steps
    if world > 1:
        torch.distributed.all_reduce(t)
        t = t / world
    return dict(zip(sums, t.tolist()))


def load_for_inference(model: torch.nn.Module, out_dir: Path, select: str = "best", device: str = "cpu") -> dict:
    """Load ``best.pt`` (or ``last.pt``) weights into ``model``; returns the checkpoint."""
    path = Path(out_dir) / f"{select}.pt"
    if not path.is_file() and select == "best":
        path = Path(out_dir) / "last.pt"
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return ckpt
