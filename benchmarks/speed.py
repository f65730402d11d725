"""Speed benchmark (not a test): dense against coarse-to-fine decoding of a fitted F_Θ.

    python -m benchmarks.speed --out DIR [--epochs 400] [--device auto] [--readme README.md]

One process fits the unified model (ten heads, the production ``stage3.model``) on one case of the
1.1 mm phantom (``params/phantom_1mm.yaml``'s geometry, its clean labels on the whole-heart box).
Then each decode runs in its own fresh process on this machine: the field on the case's own voxels
(``decode_1mm``) and on the same heart box at the user's voxel size, 0.35 x 0.35 x 0.5 mm
(``decode_realsize``: a real-size case's heart-box decode, of a field that has a real anatomy
in it), dense and coarse to fine (``stage3.decode`` of the params). The label maps are compared
voxel by voxel and component by component (26-connected, per class).

Writes ``DIR/speed.csv`` (columns ``what,variant,value,unit``), ``DIR/speed.md``, and prints the
ratios. Rows: ``decode_1mm`` and ``decode_realsize`` (variants ``dense``, ``coarse_to_fine``; s),
``decode_*_identical`` (``coarse_to_fine``; the fraction of voxels equal to dense),
``decode_*_evaluated`` (the fraction of voxels the model was run on), ``decode_*_components``
(per variant, summed over classes) and ``decode_*_components_equal`` (classes with the same count).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.config import DecodeParams, load_params
from nearfix_lib.core.geometry import Box, roi_box, roi_grid, voxel_spacing
from nearfix_lib.core.metrics import component_counts
from nearfix_lib.stages.runs import code_version, resolve_device

if TYPE_CHECKING:
    from nearfix_lib.core.config import Params, Stage3Params
    from nearfix_lib.field.store import StoreSpec

PROJECT = Path(__file__).resolve().parents[1]
USER_SPACING = (0.35, 0.35, 0.5)
DECODE_REPEATS = 3  # decodes per variant on the case's own voxels, the fastest counted (one at real size)
README_BEGIN = "<!-- speed table: begin (python -m benchmarks.speed --readme) -->"
README_END = "<!-- speed table: end -->"


def unmined_stage3(params: Params) -> tuple[Stage3Params, StoreSpec]:
    """``params.stage3`` without mining (the benchmark's fits and steps draw no mined points) and the
    spec of the store it reads (:func:`nearfix_lib.stages.stage3.store_spec`)."""
    from nearfix_lib.stages.stage3 import store_spec

    s3 = dataclasses.replace(params.stage3, sampling=dataclasses.replace(params.stage3.sampling, mined=0))
    return s3, store_spec(CARDIAC, s3)


@dataclass
class FitJob:
    params: str  # the params file whose phantom, prepare and stage3 sections are used
    epochs: int
    work: str  # a scratch folder
    field: str  # where the fitted field is saved
    device: str


@dataclass
class DecodeJob:
    field: str  # the fitted field's file
    grid_shape: tuple[int, int, int] | None  # None: the case's own voxels of the heart box
    mode: str
    out: str  # the label map's .npy
    device: str
    repeats: int = 1  # decodes timed in the process; the fastest counts


def _fit(job: FitJob, queue) -> None:
    """Child: fit F_Θ on case 1 of the 1.1 mm phantom, save its weights, box and spacing."""
    import torch

    from nearfix_lib.field.models import ImplicitField
    from nearfix_lib.field.store import write_store
    from nearfix_lib.field.train import fit
    from nearfix_lib.field.unified import UnifiedTask
    from nearfix_lib.phantom.dataset import make_case

    params = load_params(job.params)
    case = make_case(0, params.data.phantom)
    spacing = voxel_spacing(case.affine)
    box = roi_box(case.truth > 0, params.prepare.heart_margin, spacing, params.prepare.margin_unit)
    s3, spec = unmined_stage3(params)
    train = dataclasses.replace(s3.train, epochs=job.epochs, cases_per_batch=1, eval_interval=job.epochs,
                                checkpoint_interval=job.epochs, lr_step_epochs=0, select="last", amp=False)
    sampling = s3.sampling
    work = Path(job.work)
    store = write_store(work / "cases", [case.truth[box.slices]], spec)
    torch.manual_seed(0)
    model = ImplicitField(1, s3.model, n_heads=len(CARDIAC))
    task = UnifiedTask(store, CARDIAC, sampling, dataclasses.replace(s3.loss, distill_weight=0.0), 0, job.device)
    t0 = time.perf_counter()
    fit(model, task, train, work / "fit", device=job.device, progress=False)
    torch.save({"state_dict": model.state_dict(), "box": box.to_dict(), "spacing": [float(v) for v in spacing],
                "model_params": dataclasses.asdict(s3.model), "decode": dataclasses.asdict(s3.decode),
                "labels": torch.from_numpy(np.ascontiguousarray(case.truth[box.slices]))},  # what it was fitted to
               job.field)
    queue.put({"fit_s": time.perf_counter() - t0, "box_shape": [int(v) for v in box.shape],
               "spacing": [float(v) for v in spacing]})


def _decode(job: DecodeJob, queue) -> None:
    """Child: ``job.repeats`` decodes of the saved field, the fastest one's seconds (a short decode's time
    varies with what else the machine does); the labels go to ``job.out``."""
    import torch

    from nearfix_lib.core.config import ModelParams
    from nearfix_lib.core.geometry import resample
    from nearfix_lib.field.decide import decode_spent
    from nearfix_lib.field.infer import original_box_grid
    from nearfix_lib.field.models import ImplicitField
    from nearfix_lib.field.sampling import interface_band
    from nearfix_lib.field.unified import priority_decision

    saved = torch.load(job.field, weights_only=True)
    model = ImplicitField(1, ModelParams(**saved["model_params"]), n_heads=len(CARDIAC))
    model.load_state_dict(saved["state_dict"])
    model.to(job.device).eval()
    box = Box.from_dict(saved["box"])
    grid = original_box_grid(box) if job.grid_shape is None else roi_grid(box, job.grid_shape)
    decision = priority_decision(CARDIAC, [0.5] * len(CARDIAC))
    params = DecodeParams(**{**saved["decode"], "mode": job.mode})
    fitted = saved["labels"].numpy()  # seeded as the pipeline seeds: by the labels the field was fitted to
    near = fitted if job.grid_shape is None else resample(fitted, roi_grid(Box((0, 0, 0), fitted.shape),
                                                                         job.grid_shape), order=0)
    seconds = np.inf
    for _ in range(job.repeats):
        t0 = time.perf_counter()  # the seed is part of what a decode costs
        labels, spent = decode_spent(model, 0, grid, box, decision, params, job.device, seed=interface_band(near, 1))
        seconds = min(seconds, time.perf_counter() - t0)
    np.save(job.out, labels)
    queue.put({"seconds": seconds, "evaluated_at": {int(k): n / labels.size for k, n in spent.items()},
               "voxels": int(labels.size), "threads": torch.get_num_threads()})


@dataclass
class StoreJob:
    params: str  # the phantom (its case 1) and the heart box's margin
    step_params: str  # the class grids' resolution and the samplers' band radius
    grid_spacing: tuple[float, float, float]  # mm of the label crop: the real case size's voxels
    cases: int  # the batch: this many case folders, links to one stored case
    root: str  # where the stores are written
    device: str


@dataclass
class StepJob:
    params: str  # the model, sampling and train sections of the steps (production: params/default.yaml)
    root: str  # StoreJob.root
    cases: int
    stage: str  # stage1 | stage3
    batches: str  # host | device
    compile: bool
    steps: int  # measured, after WARMUP_STEPS
    device: str
    latents: int = 0  # the latent table's size (0: ``cases``); a 1,000-case table costs its optimiser state
    points_per_case: int = 0  # stage 1's points per case (0: the params')


WARMUP_STEPS = 3
STEP_STAGE1_CLASS = "LV"


def _stores(job: StoreJob, queue) -> None:
    """Child: the stores the steps read. Case 1 of the 1.1 mm phantom, its truth resampled to
    ``grid_spacing`` over its heart box (stage 3's label crop at the real case size), and per class a
    128^3 teacher on the class's box (a stage-1 probability map's size); stage 1's store holds one class's
    128^3 mask. ``cases`` folders link to the one stored case, so a step of ``cases`` cases reads as
    many distinct case ids (its own draws each) from a store written once."""
    import os

    from nearfix_lib.core.geometry import resample
    from nearfix_lib.field.store import Teacher, write_store
    from nearfix_lib.field.unified import teacher_affine
    from nearfix_lib.phantom.dataset import make_case
    from nearfix_lib.stages.stage1 import write_mask_store

    params, steps = load_params(job.params), load_params(job.step_params)
    case = make_case(0, params.data.phantom)
    spacing = voxel_spacing(case.affine)
    p = params.prepare
    box = roi_box(case.truth > 0, p.heart_margin, spacing, p.margin_unit)
    shape = tuple(int(round(n * s / t)) for n, s, t in zip(box.shape, spacing, job.grid_spacing))
    heart = resample(case.truth, roi_grid(box, shape), order=0).astype(np.uint8)
    teachers, masks = [], {}
    for k, cls in enumerate(CARDIAC):
        cls_box = roi_box(case.truth == cls.index, p.class_margin, spacing, p.margin_unit)
        if cls_box is None:
            continue
        prob = resample((case.truth == cls.index).astype(np.float32),
                        roi_grid(cls_box, steps.prepare.class_resolution), order=1)
        teachers.append(Teacher(k, prob, teacher_affine(box, cls_box)))
        masks[cls.key] = prob >= 0.5
    root = Path(job.root)
    write_store(root / "stage3", [heart], unmined_stage3(steps)[1], [teachers])
    write_mask_store(root / "stage1", [masks[STEP_STAGE1_CLASS]], steps.stage1.for_class(STEP_STAGE1_CLASS).sampling)
    for sub in ("stage3", "stage1"):
        for i in range(1, job.cases):
            if not (root / sub / str(i)).exists():
                os.symlink("0", root / sub / str(i))
    queue.put({"shape": list(shape), "voxels": int(heart.size), "class_resolution": steps.prepare.class_resolution})


def _steps(job: StepJob, queue) -> None:
    """Child: ``WARMUP_STEPS + steps`` training steps of ``cases`` cases each, through the fit loop's own
    step (:func:`~nearfix_lib.field.train.train_step`); medians of the host's time to build and hand over
    a batch, and of the whole step (the device synchronised after it)."""
    import torch

    from nearfix_lib.field.models import ImplicitField
    from nearfix_lib.field.store import CaseStore
    from nearfix_lib.field.train import make_optimizer, train_step
    from nearfix_lib.field.unified import UnifiedTask
    from nearfix_lib.stages.stage1 import Stage1Task, store_spec

    params = load_params(job.params)
    ids = [str(i) for i in range(job.cases)]
    root = Path(job.root) / job.stage
    if job.stage == "stage3":
        s3, spec = unmined_stage3(params)
        sampling = dataclasses.replace(s3.sampling, batches=job.batches)
        store = CaseStore(root, ids, spec)
        task = UnifiedTask(store, CARDIAC, sampling, s3.loss, 0, job.device)
        model = ImplicitField(job.latents or job.cases, s3.model, n_heads=len(CARDIAC))
        train, points = s3.train, task.sampler.points_per_case
    else:
        s1 = params.stage1.for_class(STEP_STAGE1_CLASS)
        sampling = dataclasses.replace(s1.sampling, batches=job.batches,
                                       points_per_case=job.points_per_case or s1.sampling.points_per_case)
        s1 = dataclasses.replace(s1, sampling=sampling)
        task = Stage1Task(CaseStore(root, ids, store_spec(s1.sampling)), s1, 0, job.device)
        model, train, points = ImplicitField(job.latents or job.cases, s1.model), s1.train, s1.sampling.points_per_case
    model.to(job.device).train()
    net = torch.compile(model) if job.compile else model
    opt = make_optimizer(model, train)
    amp = train.amp and job.device.startswith("cuda")
    sync = torch.cuda.synchronize if job.device.startswith("cuda") else (lambda: None)
    host, step, first = [], [], 0.0
    cases = np.arange(job.cases)
    for n in range(WARMUP_STEPS + job.steps):
        t0 = time.perf_counter()
        batch = task.batch(cases, epoch=n + 1)
        t1 = time.perf_counter()
        loss, _ = train_step(task, net, model, opt, batch, job.device, train.grad_clip, amp)
        sync()
        t2 = time.perf_counter()
        if n == 0:
            first = t2 - t0  # with compile: the compilation
        if n >= WARMUP_STEPS:
            host.append(t1 - t0)
            step.append(t2 - t0)
    queue.put({"host_ms": 1e3 * float(np.median(host)), "step_ms": 1e3 * float(np.median(step)),
               "points": int(job.cases * points), "first_step_s": first, "loss": float(loss.detach()),
               "threads": torch.get_num_threads(), "batch_ops": batch_ops(task, cases, WARMUP_STEPS + job.steps + 1)})


def batch_ops(task, cases: np.ndarray, epoch: int) -> int:
    """Torch operations dispatched while ``task`` builds one batch of ``cases`` (views included). On a
    GPU each of the others is a kernel launch of several microseconds of host time, so this count,
    measurable on any device, bounds how long the GPU waits for its batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        task.batch(cases, epoch=epoch)
    return count.ops


def step_rows(stage: str, variant: str, res: dict) -> list[dict]:
    """One step measurement as rows: host ms, ms and points per second of a step, the first step's seconds,
    the torch operations that build a batch."""
    return [{"what": f"{stage}_host_ms_per_step", "variant": variant, "value": res["host_ms"], "unit": "ms"},
            {"what": f"{stage}_ms_per_step", "variant": variant, "value": res["step_ms"], "unit": "ms"},
            {"what": f"{stage}_points_per_s", "variant": variant, "value": res["points"] / res["step_ms"] * 1e3,
             "unit": "points/s"},
            {"what": f"{stage}_first_step", "variant": variant, "value": res["first_step_s"], "unit": "s"},
            {"what": f"{stage}_batch_ops", "variant": variant, "value": res["batch_ops"], "unit": "ops"}]


# (stage, variant, batches, compile): current-main-style host batches against device batches, and
# torch.compile on top of device batches
STEP_VARIANTS = (("stage3", "cpu_batches", "host", False), ("stage3", "device_batches", "device", False),
                 ("stage3", "device_batches_compile", "device", True), ("stage1", "cpu_batches", "host", False),
                 ("stage1", "device_batches", "device", False), ("stage1", "device_batches_compile", "device", True))


def measure_steps(args, tmp: str, device: str) -> tuple[list[dict], dict]:
    """Every :data:`STEP_VARIANTS` in its own process, on stores written once; a variant that fails
    (torch.compile without a working compiler) is reported and left out."""
    from benchmarks.bench import _run_isolated

    spacing = tuple(args.realsize_spacing)
    made = _run_isolated(StoreJob(str(args.params), str(args.step_params), spacing, args.step_cases, tmp, device),
                         args.timeout_s, target=_stores)
    if "shape" not in made:
        raise RuntimeError(f"the step stores failed: {made}")
    rows = []
    for stage, variant, batches, compiled in STEP_VARIANTS:
        if compiled and args.skip_compile:
            continue
        job = StepJob(str(args.step_params), tmp, args.step_cases, stage, batches, compiled, args.steps, device)
        res = _run_isolated(job, args.timeout_s, target=_steps)
        if "step_ms" not in res:
            print(f"{stage} {variant} failed: {res}", file=sys.stderr)
            continue
        rows += step_rows(stage, variant, res)
        print(f"{stage} {variant}: host {res['host_ms']:.1f} ms, step {res['step_ms']:.1f} ms per step of "
              f"{res['points']} points", flush=True)
    return rows, made


def decode_rows(name: str, results: dict[str, dict], maps: dict[str, np.ndarray]) -> list[dict]:
    """The rows of one grid: seconds per variant, agreement and components of coarse-to-fine vs dense,
    where coarse to fine spends its points (per lattice spacing) and what share of the voxels lies beside
    a change of label in the dense map (the surface: on the last level, a voxel between two labels
    must be evaluated)."""
    from nearfix_lib.field.sampling import interface_band

    dense, fine = maps["dense"], maps["coarse_to_fine"]
    spent = results["coarse_to_fine"]["evaluated_at"]  # share of the voxels per lattice spacing
    comps = {v: list(component_counts(m, CARDIAC).values()) for v, m in maps.items()}
    rows = [{"what": name, "variant": v, "value": results[v]["seconds"], "unit": "s"} for v in results]
    rows += [{"what": f"{name}_identical", "variant": "coarse_to_fine", "value": float(np.mean(dense == fine)),
              "unit": "fraction"},
             {"what": f"{name}_evaluated", "variant": "coarse_to_fine",
              "value": sum(spent.values()), "unit": "fraction"},
             {"what": f"{name}_voxels", "variant": "dense", "value": results["dense"]["voxels"], "unit": "count"},
             {"what": f"{name}_label_changes", "variant": "dense", "value": float(np.mean(interface_band(dense, 1))),
              "unit": "fraction"}]
    rows += [{"what": f"{name}_evaluated_at", "variant": f"spacing_{spacing}", "value": share, "unit": "fraction"}
             for spacing, share in sorted(spent.items(), reverse=True)]
    rows += [{"what": f"{name}_components", "variant": v, "value": sum(c), "unit": "count"} for v, c in comps.items()]
    rows.append({"what": f"{name}_components_equal", "variant": "coarse_to_fine",
                 "value": sum(a == b for a, b in zip(comps["dense"], comps["coarse_to_fine"])), "unit": "classes"})
    return rows


STEP_RATIOS = (("stage3_host_ms_per_step", "cpu_batches", "device_batches"),
               ("stage3_ms_per_step", "cpu_batches", "device_batches"),
               ("stage3_ms_per_step", "device_batches", "device_batches_compile"),
               ("stage1_ms_per_step", "cpu_batches", "device_batches"),
               ("stage1_ms_per_step", "device_batches", "device_batches_compile"))


def ratio_lines(table) -> list[str]:
    """``| what | a / b |`` for every step and decode comparison the table holds."""
    value = table.set_index(["what", "variant"])["value"]
    pairs = list(STEP_RATIOS) + [(name, "dense", "coarse_to_fine") for name in ("decode_1mm", "decode_realsize")]
    return [f"| {what} | {a} / {b} | {value[(what, a)] / value[(what, b)]:.2f}x |"
            for what, a, b in pairs if (what, a) in value.index and (what, b) in value.index]


def speed_page(table, conditions: str) -> str:
    """The markdown page: the CSV as a table and the ratios."""
    lines = ["# Speed: training steps, dense and coarse-to-fine decoding", "", conditions, "",
             "| what | variant | value | unit |", "|---|---|---|---|"]
    lines += [f"| {r.what} | {r.variant} | {r.value:.6g} | {r.unit} |" for r in table.itertuples()]
    lines += ["", "| what | ratio | |", "|---|---|---|", *ratio_lines(table)]
    return "\n".join(lines) + "\n"


def readme_table(table) -> str:
    """The README's performance tables, from what the CSV holds: the training steps (ms per step, host
    and whole, and the torch operations that build a batch: a GPU's kernel launches) and the decodes
    (seconds, ratio, agreement)."""
    value = table.set_index(["what", "variant"])["value"]
    lines = []
    steps = [(stage, variant) for stage, variant, _, _ in STEP_VARIANTS
             if (f"{stage}_ms_per_step", variant) in value.index]
    if steps:
        lines += ["| training step | batches built (ms) | torch operations per batch | whole step (ms) | points/s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {stage} {variant} | {value[(f'{stage}_host_ms_per_step', variant)]:.0f} | "
                  f"{value.get((f'{stage}_batch_ops', variant), float('nan')):,.0f} | "
                  f"{value[(f'{stage}_ms_per_step', variant)]:.0f} | {value[(f'{stage}_points_per_s', variant)]:,.0f} |"
                  for stage, variant in steps]
    names = [n for n in ("decode_1mm", "decode_realsize") if (n, "dense") in value.index]
    if names:
        lines += [""] if lines else []
        lines += ["| decode | voxels | dense (s) | coarse to fine (s) | dense / coarse to fine | evaluated "
                  "| identical |", "|---|---|---|---|---|---|---|"]
    for name in names:
        dense, fine = value[(name, "dense")], value[(name, "coarse_to_fine")]
        lines.append(f"| {name} | {int(value[(f'{name}_voxels', 'dense')]):,} | {dense:.1f} | {fine:.1f} | "
                     f"{dense / fine:.1f}x | {value[(f'{name}_evaluated', 'coarse_to_fine')]:.1%} | "
                     f"{value[(f'{name}_identical', 'coarse_to_fine')]:.6f} |")
    return "\n".join(lines)


def with_readme_table(text: str, table) -> str:
    """``text`` with what lies between the README's speed markers replaced by :func:`readme_table`."""
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"no speed table markers ({README_BEGIN} ... {README_END}) in the README")
    head, rest = text.split(README_BEGIN, 1)
    return f"{head}{README_BEGIN}\n{readme_table(table)}\n{README_END}{rest.split(README_END, 1)[1]}"


PART_LEADS = {"steps": "Training steps:", "decode": "Decodes:"}  # each part's sentence on the page


def part_of(what: str) -> str:
    return "steps" if what.startswith(("stage1_", "stage3_")) else "decode"


def kept_parts(folder: Path, parts: list[str]) -> tuple[list[dict], list[str]]:
    """The rows of ``parts`` in an earlier run's ``speed.csv`` and their conditions from its page, each
    followed by that run's device, code and command (once: a part kept again keeps its first origin),
    so that a page mixing two runs says which rows are whose."""
    import pandas as pd

    table = pd.read_csv(folder / "speed.csv")
    rows = [r for r in table.to_dict("records") if part_of(r["what"]) in parts]
    paragraph = (folder / "speed.md").read_text().split("\n\n")[1]
    own = paragraph.find("Device ")  # the earlier run's own sentence (a kept part quotes it as "device")
    quoted = paragraph[own:].strip().rstrip(".").replace("Device ", "device ")
    origin = f"These rows are kept from an earlier run ({quoted})."
    texts = []
    for part in parts:
        start = paragraph.find(PART_LEADS[part])
        if start < 0:
            continue
        ends = [i for i in (paragraph.find(lead, start + 1) for lead in (*PART_LEADS.values(), "Device ")) if i > start]
        text = paragraph[start:min(ends)].strip()
        texts.append(text if "kept from an earlier run" in text else f"{text} {origin}")
    return rows, texts


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from nearfix_lib.core.io import write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/speed"))
    ap.add_argument("--epochs", type=int, default=400, help="steps of the one-case fit")
    ap.add_argument("--params", type=Path, default=PROJECT / "params/phantom_1mm.yaml",
                    help="the phantom, prepare and stage3 sections of the fit and the decodes")
    ap.add_argument("--realsize-spacing", type=float, nargs=3, default=USER_SPACING,
                    help="voxel size in mm of the real-size grid over the same heart box")
    ap.add_argument("--readme", type=Path, help="also rewrite this file's speed table from the CSV")
    ap.add_argument("--parts", nargs="+", choices=("steps", "decode"), default=["steps", "decode"],
                    help="training steps (host against device batches), decodes (dense against coarse to fine)")
    ap.add_argument("--repeats", type=int, default=DECODE_REPEATS,
                    help="decodes of the 1.1 mm case timed per variant, the fastest counts (real size: one)")
    ap.add_argument("--steps", type=int, default=10, help="training steps measured per variant (after 3 warm-up)")
    ap.add_argument("--step-cases", type=int, default=8, help="cases per training step")
    ap.add_argument("--step-params", type=Path, default=PROJECT / "params/default.yaml",
                    help="the stage1 and stage3 sections (model, sampling, train) of the training steps")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variants")
    ap.add_argument("--keep", type=Path,
                    help="an earlier run's folder: the rows of the parts not measured now come from its speed.csv, "
                         "their conditions from its page")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="per process")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    version = code_version()  # before this run writes into the checkout (--out under docs/)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, conditions = [], []
    if args.keep:  # read before anything is written: it may be this run's own folder
        rows, conditions = kept_parts(args.keep, [part for part in PART_LEADS if part not in args.parts])
    if "steps" in args.parts:
        with tempfile.TemporaryDirectory(prefix="nearfix-steps-") as tmp:
            step_table, made = measure_steps(args, tmp, device)
        rows += step_table
        res = made["class_resolution"]
        conditions.append(f"Training steps: `{args.step_params.name}`'s model, sampling and train sections, "
                          f"{args.step_cases} cases per step, the median of {args.steps} steps after {WARMUP_STEPS}; "
                          f"stage 3 on a label crop of {made['shape']} voxels (the case's heart box at "
                          f"{list(args.realsize_spacing)} mm) with a {res}^3 teacher per class, stage 1 on a {res}^3 "
                          f"{STEP_STAGE1_CLASS} mask; host ms: building the batch, ms: the whole step.")
    if "decode" in args.parts:
        decoded, text = measure_decodes(args, device)
        rows += decoded
        conditions.append(text)
    table = pd.DataFrame(rows, columns=["what", "variant", "value", "unit"])
    table.to_csv(args.out / "speed.csv", index=False)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    conditions.append(f"Device {device}; code {version}; `python -m benchmarks.speed {command}`.")
    write_text(args.out / "speed.md", speed_page(table, " ".join(conditions)))
    print(f"wrote {args.out / 'speed.csv'} and speed.md")
    if args.readme:
        write_text(args.readme, with_readme_table(args.readme.read_text(), table))
        print(f"rewrote the speed table of {args.readme}")
    return 0


def measure_decodes(args, device: str) -> tuple[list[dict], str]:
    """Fit F_Θ on one case, then decode it dense and coarse to fine on its voxels and at real size,
    each in its own process: the rows and a sentence on the conditions."""
    from benchmarks.bench import _run_isolated

    with tempfile.TemporaryDirectory(prefix="nearfix-speed-") as tmp:
        field = str(Path(tmp) / "field.pt")
        fitted = _run_isolated(FitJob(str(args.params), args.epochs, tmp, field, device), args.timeout_s, target=_fit)
        if "fit_s" not in fitted:
            raise RuntimeError(f"the fit failed: {fitted}")
        box_shape = fitted["box_shape"]
        real = tuple(int(round(n * s / t)) for n, s, t in zip(box_shape, fitted["spacing"], args.realsize_spacing))
        rows = [{"what": "fit", "variant": "one_case", "value": fitted["fit_s"], "unit": "s"}]
        for name, shape, repeats in (("decode_1mm", None, args.repeats), ("decode_realsize", real, 1)):
            results, maps = {}, {}
            for mode in ("dense", "coarse_to_fine"):
                out = str(Path(tmp) / f"{name}_{mode}.npy")
                res = _run_isolated(DecodeJob(field, shape, mode, out, device, repeats), args.timeout_s,
                                    target=_decode)
                if "seconds" not in res:
                    raise RuntimeError(f"{name} {mode} failed: {res}")
                results[mode], maps[mode] = res, np.load(out)
                print(f"{name} {mode}: {res['seconds']:.1f} s, {sum(res['evaluated_at'].values()):.4f} of the voxels "
                      "evaluated", flush=True)
            rows += decode_rows(name, results, maps)
            ratio = results["dense"]["seconds"] / results["coarse_to_fine"]["seconds"]
            print(f"{name}: dense / coarse-to-fine = {ratio:.1f}x, "
                  f"identical {np.mean(maps['dense'] == maps['coarse_to_fine']):.6f}", flush=True)
    text = (f"Decodes: F_Θ fitted {args.epochs} steps on case 1 of the phantom of `{args.params.name}` "
            f"(heart box {box_shape} voxels at {[round(v, 3) for v in fitted['spacing']]} mm), the fastest of "
            f"{args.repeats} decodes per variant; real size: the same box at {list(args.realsize_spacing)} mm "
            f"({list(real)} voxels), one decode per variant.")
    return rows, text


if __name__ == "__main__":
    sys.exit(main())
