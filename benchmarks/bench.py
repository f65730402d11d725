"""Benchmarks (not tests): speed, memory and quality of a stage on the phantom.

    python -m benchmarks.bench stage1 --resolutions 32 64 128 --budget-s 60
    python -m benchmarks.bench stage2 --shapes 128 256 --cases 2
    python -m benchmarks.bench stage3 --shape 128 120 112 --cases 8 --steps 20

Stage 1: the per-class auto-decoder trained our way — a few thousand sampled points per case
per step, several cases per step — against the *dense* reference: the
full R^3 grid of one case per step, how a voxel network (and a first NeAR port) trains, and
what runs out of memory at 128^3 on a 32 GB GPU. Each configuration runs in its own process (so peak memory
is its own, and a dense run that exhausts memory cannot take the benchmark down); reported are
training points/s, seconds per epoch (every case once), the memory training adds (CPU: growth
of the peak RSS over the training loop; CUDA: peak allocation), and the Dice against the
phantom's truth after the same wall-clock budget, with sparse/dense ratios.

Stage 3: the unified model's cost per training step and per decoded case for feature-grid
pyramids that end at 32^3 (the reference, the default model) or 64^3, each in its own process,
with ratios against the reference: what a finer grid costs before a long fit is started.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.config import (
    BalancedSamplingParams,
    ModelParams,
    PhantomParams,
    SamplingParams,
    Stage2Params,
    UnifiedLossParams,
)
from nearfix_lib.core.geometry import Box, resample_mask, roi_box, roi_grid, voxel_spacing
from nearfix_lib.core.io import write_text
from nearfix_lib.core.metrics import attachment_report, component_counts, dice
from nearfix_lib.field.infer import field_on_grid
from nearfix_lib.field.losses import bce, latent_l2
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.sampling import BandSampler
from nearfix_lib.field.store import StoreSpec, write_store
from nearfix_lib.field.unified import UnifiedTask, decode_priority
from nearfix_lib.phantom.dataset import make_case
from nearfix_lib.repair.fusion import fuse_case, fuse_priority
from nearfix_lib.stages.runs import code_version, resolve_device
from nearfix_lib.stages.stage1 import write_mask_store

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Stage1BenchConfig:
    name: str  # "sparse" or "dense"
    resolution: int
    n_cases: int
    points_per_case: int  # 0 = the dense grid
    cases_per_step: int
    budget_s: float
    device: str
    key: str = "LV"
    phantom_shape: tuple[int, int, int] = (96, 88, 80)
    seed: int = 0


def _phantom_masks(cfg: Stage1BenchConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Noisy and clean class masks of ``n_cases`` phantom cases on the class ROI grid (R^3)."""
    params = PhantomParams(n_cases=cfg.n_cases, shape=cfg.phantom_shape, seed=cfg.seed)
    noisy, clean = [], []
    idx = CARDIAC[cfg.key].index
    for i in range(cfg.n_cases):
        case = make_case(i, params)
        box = roi_box(case.noisy == idx, 6.0, voxel_spacing(case.affine))
        grid = roi_grid(box, cfg.resolution)
        noisy.append(resample_mask(case.noisy == idx, grid))
        clean.append(resample_mask(case.truth == idx, grid))
    return noisy, clean


def _dense_batch(masks: list[np.ndarray], case_idx: np.ndarray):
    import torch

    shape = masks[0].shape
    box = Box((0, 0, 0), shape)
    pts = torch.from_numpy(roi_grid(box, shape).normalised_points(box).astype(np.float32))
    points = pts[None].expand(len(case_idx), -1, -1)
    targets = torch.from_numpy(np.stack([masks[i].reshape(-1) for i in case_idx]).astype(np.float32))
    return points, targets


def _measure(cfg: Stage1BenchConfig, queue) -> None:
    """Child process: train for the budget, report speed, memory and Dice vs the truth."""
    store_dir = tempfile.TemporaryDirectory(prefix="nearfix-bench-store-")  # the masks as stage 1 reads them
    try:
        import torch

        torch.manual_seed(cfg.seed)
        noisy, clean = _phantom_masks(cfg)
        model = ImplicitField(cfg.n_cases, ModelParams()).to(cfg.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sampling = SamplingParams(points_per_case=max(cfg.points_per_case, 1))
        sampler = BandSampler(write_mask_store(store_dir.name, noisy, sampling), sampling, cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        if cfg.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        before_mb = _peak_mb(cfg.device)
        steps, points, t_train = 0, 0, 0.0
        epoch_steps = int(np.ceil(cfg.n_cases / cfg.cases_per_step))
        start = time.perf_counter()
        while time.perf_counter() - start < cfg.budget_s:
            order = rng.permutation(cfg.n_cases)
            for s in range(epoch_steps):
                idx = order[s * cfg.cases_per_step:(s + 1) * cfg.cases_per_step]
                if cfg.points_per_case:
                    p, t = sampler.sample(list(idx), 1 + steps // epoch_steps)
                    p, t = torch.from_numpy(p), torch.from_numpy(t)
                else:
                    p, t = _dense_batch(noisy, idx)
                t0 = time.perf_counter()
                p, t = p.to(cfg.device), t.to(cfg.device)
                case = torch.as_tensor(idx, device=cfg.device)
                opt.zero_grad(set_to_none=True)
                loss = bce(model(case, p)[..., 0], t) + 1e-4 * latent_l2(model.latents(case))
                loss.backward()
                opt.step()
                if cfg.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t_train += time.perf_counter() - t0
                steps += 1
                points += p.shape[0] * p.shape[1]
                if time.perf_counter() - start >= cfg.budget_s:
                    break
        train_mb = _peak_mb(cfg.device) - (0.0 if cfg.device.startswith("cuda") else before_mb)
        dices = []
        for i, truth in enumerate(clean):
            box = Box((0, 0, 0), truth.shape)
            pred = field_on_grid(model, i, roi_grid(box, truth.shape), box, cfg.device)[..., 0] >= 0.5
            dices.append(dice(pred, truth))
        noisy_dice = [dice(n, c) for n, c in zip(noisy, clean)]
        queue.put({**asdict(cfg), "steps": steps, "points_per_s": points / t_train,
                   "s_per_step": t_train / steps, "s_per_epoch": t_train / steps * epoch_steps,
                   "peak_mb": train_mb, "dice_vs_truth": float(np.mean(dices)),
                   "noisy_dice_vs_truth": float(np.mean(noisy_dice)), "status": "ok"})
    except (RuntimeError, MemoryError) as err:  # out of memory, typically
        queue.put({**asdict(cfg), "status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"})
    finally:
        store_dir.cleanup()


def _peak_mb(device: str) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's maximum RSS on the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# What every measured child imports, loaded once by the fork server instead of by each child's
# fresh interpreter (~4 s per child on 2 cores; the speed benchmark starts ten).
CHILD_PRELOAD = ["numpy", "torch", "nearfix_lib.field.train", "nearfix_lib.field.unified", "nearfix_lib.stages.stage1"]


def _child_context():
    """Children forked from a server that has imported :data:`CHILD_PRELOAD` and run nothing else: no
    torch op (so no thread pool, which does not survive a fork), no CUDA context, no data. A child is
    still its own process, its memory its own from that server's start; spawn where fork is missing."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(CHILD_PRELOAD)  # effective when the server starts, the first time
    return ctx


def _run_isolated(cfg, timeout_s: float, target=_measure) -> dict:
    """``target(cfg, queue)`` in a fresh process: its peak memory is its own, and a run that
    exhausts memory reports a failure instead of taking the benchmark down."""
    ctx = _child_context()
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(cfg, queue))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        return {**asdict(cfg), "status": "failed: timed out"}
    if queue.empty():
        return {**asdict(cfg), "status": f"failed: process ended with code {proc.exitcode} (out of memory?)"}
    return queue.get()


def dense_memory_estimate_mb(resolution: int, in_channels: int = 163) -> float:
    """Activation memory of one dense step (forward + saved for backward) of the seed MLP."""
    per_point = 4 * (in_channels + 256 + 256 + 256 + in_channels + 128 + 64 + 1) * 2
    return resolution ** 3 * per_point / 2**20


def bench_stage1(resolutions: list[int], n_cases: int, points_per_case: int, budget_s: float,
                 device: str, max_dense_mb: float) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for r in resolutions:
        configs = [Stage1BenchConfig("sparse", r, n_cases, points_per_case, n_cases, budget_s, device),
                   Stage1BenchConfig("dense", r, n_cases, 0, 1, budget_s, device)]
        for cfg in configs:
            est = dense_memory_estimate_mb(r)
            if cfg.name == "dense" and est > max_dense_mb:
                rows.append({**asdict(cfg), "status": f"not run: needs ~{est / 1024:.1f} GB of activations "
                                                      f"(limit {max_dense_mb / 1024:.1f} GB)"})
                continue
            print(f"R={r} {cfg.name} ...", flush=True)
            rows.append(_run_isolated(cfg, budget_s * 4 + 300))
    return pd.DataFrame(rows)


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    """sparse / dense per resolution for the measured quantities."""
    import pandas as pd

    out = []
    for r, group in table.groupby("resolution"):
        g = group.set_index("name")
        if {"sparse", "dense"} <= set(g.index) and (g["status"] == "ok").all():
            out.append({"resolution": r,
                        **{f"{k} sparse/dense": g.loc["sparse", k] / g.loc["dense", k]
                           for k in ("points_per_s", "s_per_epoch", "peak_mb")},
                        "dice sparse - dense": g.loc["sparse", "dice_vs_truth"] - g.loc["dense", "dice_vs_truth"]})
    return pd.DataFrame(out)


def bench_stage2(sizes: list[int], n_cases: int, repeats: int = 2) -> pd.DataFrame:
    """Seconds per case of stage-2 fusion + rules on phantom cases of ``size^3`` voxels.

    The inputs are the noisy phantom labels split into per-class masks, each grown by one voxel
    so that neighbours overlap as independently repaired masks do, with the label noise's islands,
    holes, detached appendages and broken coronaries still in them: every rule has work. The
    reference is the priority fusion alone (one pass over the volume), timed in the same process;
    the best of ``repeats`` runs is kept. cc3d, edt and scipy run on one thread.
    """
    import pandas as pd
    from scipy import ndimage

    rows = []
    for size in sizes:
        params = PhantomParams(n_cases=n_cases, shape=(size, size, size), fov_mm=(140.0, 132.0, 120.0))
        for i in range(n_cases):
            case = make_case(i, params)
            spacing = voxel_spacing(case.affine)
            masks = {c.key: ndimage.binary_dilation(case.noisy == c.index) for c in CARDIAC}
            t_ref = min(_timed(partial(fuse_priority, masks, CARDIAC, case.noisy.shape)) for _ in range(repeats))
            timings = [_timed(partial(fuse_case, masks, CARDIAC, spacing, Stage2Params())) for _ in range(repeats)]
            result = fuse_case(masks, CARDIAC, spacing, Stage2Params())
            by_rule = pd.DataFrame(result.audit_records()).groupby("rule")["voxels_changed"].sum().to_dict()
            counts = component_counts(result.labels, CARDIAC)
            attached = [r["frac_attached"] for r in attachment_report(result.labels, spacing, CARDIAC)]
            rows.append({"size": size, "case": i + 1, "s_fusion_only": t_ref, "s_fusion_rules": min(timings),
                         "rules/fusion_only": min(timings) / t_ref,
                         "classes_at_expected": sum(counts[c.key] == c.expected_components for c in CARDIAC),
                         "attached_min": float(np.nanmin(attached)),
                         **{f"changed_{k}": int(v) for k, v in by_rule.items()}})
    return pd.DataFrame(rows)


@dataclass
class Stage3BenchConfig:
    name: str  # the feature-grid sizes, e.g. "4/8/16/32"
    grid_channels: tuple[int, ...]
    grid_sizes: tuple[int, ...]
    n_cases: int
    phantom_shape: tuple[int, int, int]
    positives_per_class: int
    negatives: int
    steps: int
    device: str
    seed: int = 0


def stage3_configs(n_cases: int, shape: tuple[int, int, int], positives: int, negatives: int, steps: int,
                   device: str) -> list[Stage3BenchConfig]:
    """The default model's pyramid (the reference) and the same with one more level at twice the
    finest size and half its channels (64^3 x 8 after 32^3 x 16)."""
    ref = ModelParams()
    finer = (ref.grid_channels + (ref.grid_channels[-1] // 2,), ref.grid_sizes + (2 * ref.grid_sizes[-1],))
    return [Stage3BenchConfig("/".join(map(str, sizes)), channels, sizes, n_cases, shape, positives, negatives,
                              steps, device)
            for channels, sizes in ((ref.grid_channels, ref.grid_sizes), finer)]


def _measure_stage3(cfg: Stage3BenchConfig, queue) -> None:
    """Child process: a few training steps of all cases (the first is warm-up, not timed), then a
    decode of every case on its whole-heart box (all heads + the priority walk)."""
    store_dir = tempfile.TemporaryDirectory(prefix="nearfix-bench-store-")  # the cases as stage 3 reads them
    try:
        import torch

        torch.manual_seed(cfg.seed)
        params = PhantomParams(n_cases=cfg.n_cases, shape=cfg.phantom_shape, seed=cfg.seed)
        maps = []
        for i in range(cfg.n_cases):
            case = make_case(i, params)
            maps.append(case.truth[roi_box(case.truth > 0, 6.0, voxel_spacing(case.affine)).slices])
        sampling = BalancedSamplingParams(cfg.positives_per_class, cfg.negatives)
        store = write_store(store_dir.name, maps, StoreSpec(tuple(CARDIAC.indices), sampling.dilation_radius, False))
        box_voxels = float(np.mean([m.size for m in maps]))
        del maps
        task = UnifiedTask(store, CARDIAC, sampling, UnifiedLossParams(distill_weight=0.0), cfg.seed, cfg.device)
        model = ImplicitField(cfg.n_cases, ModelParams(grid_channels=cfg.grid_channels, grid_sizes=cfg.grid_sizes),
                              n_heads=len(CARDIAC)).to(cfg.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        every_case = np.arange(cfg.n_cases)
        if cfg.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        before_mb = _peak_mb(cfg.device)

        def step(epoch: int) -> None:
            batch = {k: v.to(cfg.device) for k, v in task.batch(every_case, epoch).items()}
            opt.zero_grad(set_to_none=True)
            task.loss(model, batch)[0].backward()
            opt.step()
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()

        step(1)  # warm-up
        t_train = sum(_timed(partial(step, e)) for e in range(2, cfg.steps + 2))
        train_mb = _peak_mb(cfg.device) - (0.0 if cfg.device.startswith("cuda") else before_mb)
        model.eval()
        t_decode = [_timed(lambda i=i: decode_priority(task.probabilities(model, i), CARDIAC, task.thresholds))
                    for i in range(cfg.n_cases)]
        queue.put({**asdict(cfg), "threads": torch.get_num_threads(),
                   "box_voxels": box_voxels,
                   "s_per_step": t_train / cfg.steps, "peak_mb": train_mb,
                   "s_decode_per_case": float(np.mean(t_decode)),
                   "status": "ok"})
    except (RuntimeError, MemoryError) as err:  # out of memory, typically
        queue.put({**asdict(cfg), "status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"})
    finally:
        store_dir.cleanup()


def bench_stage3(configs: list[Stage3BenchConfig], timeout_s: float = 3600) -> pd.DataFrame:
    """One isolated run per configuration; ``/ref`` columns divide by the first configuration."""
    import pandas as pd

    rows = []
    for cfg in configs:
        print(f"stage 3, grids {cfg.name} ...", flush=True)
        rows.append(_run_isolated(cfg, timeout_s, target=_measure_stage3))
    table = pd.DataFrame(rows)
    if (table["status"] == "ok").all():
        for k in ("s_per_step", "s_decode_per_case", "peak_mb"):
            table[f"{k} /ref"] = table[k] / table[k].iloc[0]
    return table


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


GENERATED_BY = "Generated by `"  # a page's stamp, before the command that wrote it


def stamped_command(page: Path) -> str:
    """The command a page of :func:`write_report` was generated by (read from its stamp), "unknown" if none."""
    line = next((x for x in page.read_text().splitlines() if x.startswith(GENERATED_BY)), "")
    return line.removeprefix(GENERATED_BY).split("`;")[0] or "unknown"


def write_report(out: Path, name: str, table: pd.DataFrame, text: str, argv: list[str],
                 module: str = "benchmarks.bench") -> None:
    """``<name>.csv`` and ``<name>.md``: the tables rendered from that CSV's rows, stamped with the
    command (``python -m <module> <argv>``), the code version and the machine, so a page in docs/
    is regenerated, never edited. Every benchmark module writes its pages through this one."""
    stamp = (f"# Benchmark: {name}\n\n{GENERATED_BY}python -m {module} {' '.join(argv)}`; "
             f"do not edit by hand, rerun.\n\n| | |\n|---|---|\n| code version | `{code_version()}` |\n"
             f"| machine | {os.cpu_count()} CPU cores, torch {package_version('torch')} |\n"
             f"| load | 1-minute load average {os.getloadavg()[0]:.1f} at the end (other jobs slow the timings) |\n\n")
    write_text(out / f"{name}.csv", table.to_csv(index=False))
    write_text(out / f"{name}.md", stamp + text)
    print(stamp + text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nearfix benchmarks")
    ap.add_argument("stage", choices=["stage1", "stage2", "stage3"])
    ap.add_argument("--shapes", type=int, nargs="+", default=[128, 256], help="stage 2: phantom edge sizes")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 120, 112], help="stage 3: phantom shape")
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--points", type=int, default=8192, help="stage 1: sampled points per case per step")
    ap.add_argument("--positives", type=int, default=256, help="stage 3: positives per class per case per step")
    ap.add_argument("--negatives", type=int, default=1024, help="stage 3: negatives per case per step")
    ap.add_argument("--steps", type=int, default=20, help="stage 3: timed training steps")
    ap.add_argument("--budget-s", type=float, default=60.0, help="training wall-clock per configuration")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-dense-gb", type=float, default=12.0)
    ap.add_argument("--out", default="outputs/bench")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)

    out = Path(args.out)
    if args.stage == "stage2":
        table = bench_stage2(args.shapes, args.cases)
        write_report(out, "stage2", table, table.to_markdown(index=False, floatfmt=".3g") + "\n", argv)
        return 0
    device = resolve_device(args.device)
    if args.stage == "stage3":
        table = bench_stage3(stage3_configs(args.cases, tuple(args.shape), args.positives, args.negatives, args.steps,
                                            device))
        write_report(out, "stage3", table, f"device: {device}\n\n" + table.drop(
            columns=["grid_channels", "grid_sizes"]).to_markdown(index=False, floatfmt=".3g") + "\n", argv)
        return 0
    table = bench_stage1(args.resolutions, args.cases, args.points, args.budget_s, device, args.max_dense_gb * 1024)
    cols = ["resolution", "name", "status", "points_per_s", "s_per_epoch", "peak_mb", "dice_vs_truth",
            "noisy_dice_vs_truth", "steps"]
    text = (f"device: {device}\n\n" + table.reindex(columns=cols).to_markdown(index=False, floatfmt=".3g")
            + "\n\n" + ratios(table).to_markdown(index=False, floatfmt=".3g") + "\n")
    write_report(out, "stage1", table, text, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
