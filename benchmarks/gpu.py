"""GPU benchmark (not a test): production-sized training steps and real-size decodes on one GPU, and
what they extrapolate to for the user's 1,000-case pipeline.

    python -m benchmarks.gpu --out DIR [--device cuda] [--cases 1000] [--budget-s 480]

Each measurement runs in its own process (:mod:`benchmarks.speed`'s jobs), on stores written once:

* stage 1: steps of 8 cases x 8,192 points with a 1,000-case latent table, batches drawn on the
  device, bf16 autocast on CUDA (``train.amp``), without and with ``torch.compile``;
* stage 3: steps of 8 real-size cases (the 1.1 mm phantom's heart box at 0.35 x 0.35 x 0.5 mm, a
  128^3 teacher per class), batches drawn on the device, without and with compile;
* the decodes of :func:`benchmarks.speed.measure_decodes` (dense and coarse to fine, on the case's
  voxels and at real size), when time is left (``--budget-s``: the whole script must finish in 8 minutes).

Writes ``DIR/gpu.csv`` (``what,variant,value,unit``: the speed benchmark's rows plus
``extrapolated_hours`` rows) and ``DIR/gpu.md``, and prints points per second and the hours of the
1,000-case pipeline's GPU work: 10 class fits of ``stage1.train.epochs`` and the stage-3 fit of
``stage3.train.epochs``, at ``cases / 8`` steps per epoch and the measured ms per step, plus a
real-size decode per case (the faster of dense and coarse to fine) for stage 1's 10 classes (bounded
by a heart-box decode each) and stage 3.
Stage 2, prepare and the report run on CPUs and are not counted. Runs on CPU too (``--device cpu``,
for its test), where the figures mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.speed import DECODE_REPEATS, PROJECT, USER_SPACING, StepJob, StoreJob, measure_decodes, step_rows

STEP_CASES = 8
STAGE1_POINTS = 8192
# (stage, variant, batches, compile)
GPU_VARIANTS = (("stage1", "bf16", "device", False), ("stage1", "bf16_compile", "device", True),
                ("stage3", "device_batches", "device", False), ("stage3", "device_batches_compile", "device", True))


def extrapolate(value: dict, params, cases: int, decode_s: float | None) -> list[dict]:
    """Hours of the ``cases``-case pipeline's GPU work from the fastest measured step of each stage."""
    steps_per_epoch = -(-cases // STEP_CASES)
    rows = []
    for stage, epochs, fits in (("stage1", params.stage1.train.epochs, 10), ("stage3", params.stage3.train.epochs, 1)):
        ms = [v for (what, _), v in value.items() if what == f"{stage}_ms_per_step"]
        if ms:
            rows.append({"what": "extrapolated_hours", "variant": f"{stage}_fit",
                         "value": fits * epochs * steps_per_epoch * min(ms) / 3.6e6, "unit": "h"})
    if decode_s is not None:
        rows.append({"what": "extrapolated_hours", "variant": "decodes", "value": 11 * cases * decode_s / 3600,
                     "unit": "h"})
    if rows:
        rows.append({"what": "extrapolated_hours", "variant": "total", "value": sum(r["value"] for r in rows),
                     "unit": "h"})
    return rows


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from benchmarks.bench import _run_isolated
    from benchmarks.speed import _steps, _stores
    from nearfix_lib.core.config import load_params
    from nearfix_lib.core.io import write_text
    from nearfix_lib.stages.runs import code_version, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/gpu"))
    ap.add_argument("--params", type=Path, default=PROJECT / "params/phantom_1mm.yaml")
    ap.add_argument("--step-params", type=Path, default=PROJECT / "params/default.yaml",
                    help="the stage1 and stage3 sections (model, sampling, train) of the steps and the extrapolation")
    ap.add_argument("--cases", type=int, default=1000, help="the latent table, and the pipeline extrapolated")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=400, help="steps of the decodes' one-case fit")
    ap.add_argument("--realsize-spacing", type=float, nargs=3, default=USER_SPACING)
    ap.add_argument("--budget-s", type=float, default=480.0, help="the decodes run only if this much time is left")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variants")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    device = resolve_device(args.device)
    params = load_params(args.step_params)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="nearfix-gpu-") as tmp:
        made = _run_isolated(StoreJob(str(args.params), str(args.step_params), tuple(args.realsize_spacing),
                                      STEP_CASES, tmp, device), 600, target=_stores)
        if "shape" not in made:
            print(f"the stores failed: {made}", file=sys.stderr)
            return 1
        for stage, variant, batches, compiled in GPU_VARIANTS:
            if compiled and args.skip_compile:
                continue
            job = StepJob(str(args.step_params), tmp, STEP_CASES, stage, batches, compiled, args.steps, device,
                          latents=args.cases, points_per_case=STAGE1_POINTS if stage == "stage1" else 0)
            res = _run_isolated(job, 600, target=_steps)
            if "step_ms" not in res:
                print(f"{stage} {variant} failed: {res}", file=sys.stderr)
                continue
            rows += step_rows(stage, variant, res)
            print(f"{stage} {variant}: {res['points'] / res['step_ms'] * 1e3 / 1e6:.2f} M points/s, "
                  f"{res['step_ms']:.1f} ms per step (host {res['host_ms']:.1f} ms), first step "
                  f"{res['first_step_s']:.1f} s", flush=True)
    decode_s = None
    elapsed = time.perf_counter() - started
    if elapsed < args.budget_s / 2:  # the decodes take about as long as the steps on a GPU
        decode_args = argparse.Namespace(params=args.params, epochs=args.epochs, timeout_s=args.budget_s,
                                         realsize_spacing=args.realsize_spacing, repeats=DECODE_REPEATS)
        decoded, _ = measure_decodes(decode_args, device)
        rows += decoded
        # the faster of the two decodes, as the steps' fastest variant: on an H200 the dense decode won
        decode_s = min(r["value"] for r in decoded if r["what"] == "decode_realsize")
    else:
        print(f"decodes left out: {elapsed:.0f} s of the {args.budget_s:.0f} s budget spent", flush=True)
    value = {(r["what"], r["variant"]): r["value"] for r in rows}
    rows += extrapolate(value, params, args.cases, decode_s)
    table = pd.DataFrame(rows, columns=["what", "variant", "value", "unit"])
    table.to_csv(args.out / "gpu.csv", index=False)
    hours = table[table.what == "extrapolated_hours"]
    for r in hours.itertuples():
        print(f"{args.cases} cases, {r.variant}: {r.value:.1f} h")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# GPU benchmark", "", f"Device {device}; code {code_version()}; `python -m benchmarks.gpu {command}`; "
             f"{time.perf_counter() - started:.0f} s in all. Steps: {STEP_CASES} cases each, a {args.cases}-case "
             f"latent table, stage 1 {STAGE1_POINTS} points per case; stage 3 on {made['shape']} voxels.", "",
             "| what | variant | value | unit |", "|---|---|---|---|"]
    lines += [f"| {r.what} | {r.variant} | {r.value:.6g} | {r.unit} |" for r in table.itertuples()]
    write_text(args.out / "gpu.md", "\n".join(lines) + "\n")
    print(f"wrote {args.out / 'gpu.csv'} and gpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
