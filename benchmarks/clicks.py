"""Clicks: how far interactive repair (``field.refine``) corrects a decoded case, and how fast.

    python -m benchmarks.clicks --out DIR [--params params/phantom_1mm.yaml] [--cases 4] [--epochs 1200]
    python -m benchmarks.clicks --out DIR --run outputs/phantom_1mm [--classes LAA Cor PV] [--cases 8]

The protocol of interactive segmentation evaluation: a simulated user looks at the decoded map
against the truth, finds the largest connected error region of the class being corrected, and clicks
at its centre (the point deepest inside it, by the distance transform, in mm): positive where the
class was missed, negative where it was added; 1 to ``--clicks`` clicks, each one :meth:`EditSession.click`
(the latent re-fitted, F_Θ frozen, the window around the click decoded again), timed from the click to
the updated map.

The model: F_Θ fitted on ``--cases`` phantom cases of the params' phantom (default the judging
configuration's 1.1 mm), their truth standing in for L^ref (stage 2 of that run takes hours on a
CPU), except that case 1's L^ref carries two injected errors, **an LAA cut off** (its half farthest
from the LA removed) and **a dropped coronary branch** (the 40 % of the largest coronary tree farthest
from the aorta removed), which F_Θ learns and decodes. A further case is the **held-out** one: its
latent fitted to its noisy labels with F_Θ frozen (``UnifiedModel.fit_case``). The sessions: case 1's
LAA and Cor (the injected errors), the held-out case's LAA, Cor and PV.

Writes ``DIR/clicks.csv`` (``case, class, kind, click, positive, dice, hd95, seconds, steps,
other_min_delta``: one row per session and click, click 0 the map before any), ``DIR/final.csv``
(every class of every session's case after its last click, decoded whole with the edited latent as
the saved artifact decodes it, against the start), ``DIR/clicks.png`` (Dice against clicks) and
``DIR/clicks.md``. The fitted model is kept in ``DIR/model/`` and reused (``--refit`` to fit again).
With ``--run``, a finished run with ground truth (the phantom's) is used instead: its stage-3 model,
each case started from its decode seeded by its L^ref, each of ``--classes`` it holds clicked.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import cc3d
import edt
import numpy as np
import pandas as pd
import torch
import yaml

from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.config import load_params
from nearfix_lib.core.geometry import apply_affine, roi_box, voxel_spacing
from nearfix_lib.core.io import read_label, write_text
from nearfix_lib.core.metrics import dice, hd95
from nearfix_lib.core.workspace import open_run, stage_labels
from nearfix_lib.field.infer import original_box_grid
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.refine import Click, EditSession
from nearfix_lib.field.store import write_store
from nearfix_lib.field.train import fit
from nearfix_lib.field.unified import CaseGeometry, UnifiedModel, UnifiedTask
from nearfix_lib.phantom.dataset import make_case
from nearfix_lib.stages.runs import code_version, resolve_device
from nearfix_lib.stages.stage3 import artifact_path, store_spec

PROJECT = Path(__file__).resolve().parents[1]
README_BEGIN = "<!-- clicks table: begin (python -m benchmarks.clicks --readme) -->"
README_END = "<!-- clicks table: end -->"
SESSIONS = (("1", "LAA", "injected"), ("holdout", "LAA", "held_out"), ("1", "Cor", "injected"),
            ("holdout", "Cor", "held_out"), ("holdout", "PV", "held_out"))


def cut_distal(labels: np.ndarray, key: str, anchor: str, fraction: float, largest_only: bool = False) -> np.ndarray:
    """``labels`` with the ``fraction`` of class ``key``'s voxels farthest from class ``anchor`` set to
    background (of its largest component only, with ``largest_only``): a structure cut off."""
    out = labels.copy()
    mask = labels == CARDIAC[key].index
    if largest_only:
        comps = cc3d.connected_components(mask, connectivity=26)
        mask = comps == np.argmax(np.bincount(comps.ravel())[1:]) + 1
    where = np.argwhere(mask)
    anchor_at = np.argwhere(labels == CARDIAC[anchor].index).mean(0)
    far = np.linalg.norm(where - anchor_at, axis=1)
    cut = where[far >= np.quantile(far, 1.0 - fraction)]
    out[tuple(cut.T)] = 0
    return out


def build_model(params_file: Path, n_cases: int, epochs: int, work: Path, device: str) -> tuple[UnifiedModel, dict]:
    """Fit F_Θ on ``n_cases`` phantom cases (case 1 with injected errors) and a held-out latent;
    returns the model and, per case id, (truth, affine, what it was fitted to)."""
    params = load_params(params_file)
    s3 = params.stage3
    cases = [make_case(i, params.data.phantom) for i in range(n_cases + 1)]
    ids = [str(i + 1) for i in range(n_cases)]
    geometry, fitted = {}, []
    for cid, case in zip([*ids, "holdout"], cases):
        box = roi_box(case.truth > 0, params.prepare.heart_margin, voxel_spacing(case.affine),
                      params.prepare.margin_unit)
        geometry[cid] = CaseGeometry(case.truth.shape, case.affine, box, original_box_grid(box))
        given = case.truth
        if cid == "1":
            given = cut_distal(cut_distal(given, "LAA", "LA", 0.5), "Cor", "Ao", 0.4, largest_only=True)
        fitted.append(case.noisy if cid == "holdout" else given)
    sampling = dataclasses.replace(s3.sampling, mined=0)
    loss = dataclasses.replace(s3.loss, distill_weight=0.0)
    store = write_store(work / "cases", [fitted[i][geometry[c].heart_box.slices] for i, c in enumerate(ids)],
                        store_spec(CARDIAC, dataclasses.replace(s3, sampling=sampling)), case_ids=ids)
    torch.manual_seed(params.run.seed)
    model = ImplicitField(n_cases, s3.model, n_heads=len(CARDIAC))
    task = UnifiedTask(store, CARDIAC, sampling, loss, params.run.seed, device)
    train = dataclasses.replace(s3.train, epochs=epochs, cases_per_batch=min(n_cases, s3.train.cases_per_batch),
                                eval_interval=epochs, checkpoint_interval=max(1, epochs // 10), select="last",
                                lr_step_epochs=min(s3.train.lr_step_epochs or epochs, epochs))
    fit(model, task, train, work / "fit", device=device, seed=params.run.seed, progress=True)
    unified = UnifiedModel(model, s3.model, CARDIAC, ids, np.full(len(CARDIAC), 0.5),
                           {c: geometry[c] for c in ids}, device, decoding=s3.decode)
    held = geometry["holdout"]
    unified.fit_case("holdout", fitted[-1][held.heart_box.slices], held, sampling, loss, s3.new_case_train,
                     work / "holdout", seed=params.run.seed)
    truth = {cid: (case.truth, case.affine, fitted[k]) for k, (cid, case) in enumerate(zip([*ids, "holdout"], cases))}
    return unified, truth


def next_click(shown: np.ndarray, truth: np.ndarray, label: int, affine: np.ndarray, region) -> Click | None:
    """The simulated user's click: the centre of the largest error region of class ``label`` in ``region``."""
    best = None
    for positive, error in ((True, (truth == label) & (shown != label)), (False, (shown == label) & (truth != label))):
        error = error[region]
        if not error.any():
            continue
        comps = cc3d.connected_components(error, connectivity=26)
        sizes = np.bincount(comps.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (sizes[k], positive, comps == k + 1)
    if best is None:
        return None
    _, positive, comp = best
    depth = edt.edt(comp, anisotropy=tuple(float(v) for v in voxel_spacing(affine)))
    voxel = np.asarray(np.unravel_index(int(np.argmax(depth)), comp.shape)) + [s.start or 0 for s in region]
    return Click(tuple(apply_affine(affine, voxel[None].astype(float))[0]), label, positive)  # type: ignore[arg-type]


def class_scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {c.key: dice(labels == c.index, truth == c.index) for c in CARDIAC}


def run_session(unified: UnifiedModel, case_id: str, key: str, kind: str, truth: np.ndarray, affine: np.ndarray,
                fitted: np.ndarray, n_clicks: int, params) -> tuple[list[dict], list[dict]]:
    field = unified.case_field(case_id)
    start = unified.decode(case_id, seed_labels=fitted)
    session = EditSession(field, start, params.refine, seed=params.run.seed)
    spacing = voxel_spacing(affine)
    label = CARDIAC[key].index
    before = class_scores(start, truth)
    rows = [{"case": case_id, "class": key, "kind": kind, "click": 0, "positive": "", "dice": before[key],
             "hd95": hd95(start == label, truth == label, spacing), "seconds": np.nan, "steps": 0,
             "other_min_delta": 0.0}]
    for n in range(1, n_clicks + 1):
        click = next_click(session.labels, truth, label, affine, field.box.slices)
        if click is None:
            break
        t0 = time.perf_counter()
        done = session.click(click)
        seconds = time.perf_counter() - t0
        now = class_scores(session.labels, truth)
        rows.append({"case": case_id, "class": key, "kind": kind, "click": n, "positive": click.positive,
                     "dice": now[key], "hd95": hd95(session.labels == label, truth == label, spacing),
                     "seconds": seconds, "steps": done.steps,
                     "other_min_delta": min(now[k] - before[k] for k in now if k != key)})
        print(f"  {case_id} {key} click {n} ({'+' if click.positive else '-'}): Dice {now[key]:.3f} "
              f"({seconds:.2f} s, {done.steps} steps)", flush=True)
    session.consolidate()  # what a save does
    final = class_scores(session.decode_all(), truth)
    finals = [{"case": case_id, "session": key, "class": k, "start": before[k], "final": final[k],
               "delta": final[k] - before[k]} for k in final]
    return rows, finals


def summary(clicks: pd.DataFrame, finals: pd.DataFrame, conditions: str) -> str:
    timed = clicks[clicks["click"] > 0]["seconds"]
    gain = clicks.pivot_table(index=["case", "class", "kind"], columns="click", values="dice")
    gain = gain.ffill(axis=1)  # a session whose errors ran out keeps its last Dice
    lines = ["# Clicks: interactive repair on the phantom", "", conditions, "",
             "Dice of the class being corrected against the truth after each click (the map shown: each click's "
             "window pasted; a session whose errors ran out keeps its last Dice):", "",
             gain.round(3).reset_index().to_markdown(index=False), ""]
    for kind, part in gain.groupby(level="kind"):
        after3 = part[min(3, part.columns.max())] - part[0]
        lines.append(f"- {kind}: mean Dice gain after {min(3, part.columns.max())} clicks **{after3.mean():+.3f}** "
                     f"over {len(part)} sessions")
    others = finals[finals["class"] != finals["session"]]
    own = finals[finals["class"] == finals["session"]].set_index(["case", "session"])
    last = clicks.sort_values("click").groupby(["case", "class"]).last()["dice"]
    saved = pd.DataFrame({"start": own["start"], "shown after the last click": last.reindex(own.index).values,
                          "saved (consolidated, decoded whole)": own["final"]})
    lines += [f"- latency from click to updated map: median **{timed.median():.2f} s**, p95 "
              f"**{timed.quantile(0.95):.2f} s** over {len(timed)} clicks",
              f"- the other classes, the map shown: worst change {clicks['other_min_delta'].min():+.4f} Dice",
              f"- the other classes, the whole box decoded with the edited latent (what is saved): worst change "
              f"{others['delta'].min():+.4f} Dice ({others.loc[others['delta'].idxmin(), 'class']} in the "
              f"{others.loc[others['delta'].idxmin(), 'session']} session of case "
              f"{others.loc[others['delta'].idxmin(), 'case']})"]
    lines += ["", "The clicked class after Save (the latent fitted once more to the whole map shown, the box "
              "decoded with it):", "", saved.round(3).reset_index().to_markdown(index=False), ""]
    return "\n".join(lines)


def readme_table(clicks: pd.DataFrame) -> str:
    """The README's table: Dice of the corrected class before and after 1, 3 and the last click, and
    the latency, from ``clicks.csv``."""
    dice_at = clicks.pivot_table(index=["case", "class", "kind"], columns="click", values="dice").ffill(axis=1)
    last = int(dice_at.columns.max())
    shown = list(dict.fromkeys([0, 1, min(3, last), last]))
    lines = ["| case | class | error | " + " | ".join(f"{c} clicks" for c in shown) + " |",
             "|---|---|---|" + "---|" * len(shown)]
    for (case, key, kind), row in dice_at.iterrows():
        values = " | ".join(f"{row[c]:.3f}" for c in shown)
        lines.append(f"| {case} | {key} | {kind.replace('_', '-')} | {values} |")
    timed = clicks.loc[clicks["click"] > 0, "seconds"]
    lines += ["", f"Click to updated map: median {timed.median():.2f} s, p95 {timed.quantile(0.95):.2f} s "
              f"({len(timed)} clicks)."]
    return "\n".join(lines)


def with_readme_table(text: str, clicks: pd.DataFrame) -> str:
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{readme_table(clicks)}\n{README_END}{tail}"


def plot(clicks: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (case, key, kind), part in clicks.groupby(["case", "class", "kind"]):
        colour = np.asarray(CARDIAC[key].colour) / 255.0
        ax.plot(part["click"], part["dice"], marker="o", color=colour, ls="-" if kind == "injected" else "--",
                label=f"{key} ({kind}, case {case})")
    ax.set_xlabel("clicks")
    ax.set_ylabel("Dice against the truth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/clicks"))
    ap.add_argument("--params", type=Path, default=PROJECT / "params/phantom_1mm.yaml")
    ap.add_argument("--cases", type=int, default=4, help="training cases of F_Θ (case 1 with the injected errors)")
    ap.add_argument("--epochs", type=int, default=1200)
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=len(SESSIONS), help="the first N sessions only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the latency target is for 2 CPU cores)")
    ap.add_argument("--refit", action="store_true", help="fit the model again even if DIR/model holds one")
    ap.add_argument("--readme", type=Path, help="only rewrite this file's clicks table from DIR/clicks.csv")
    ap.add_argument("--refine", default="", help="refine parameters to change, YAML: '{anchor_weight: 3, steps: 20}'")
    ap.add_argument("--csv-dir", type=Path, help="write the tables here instead of DIR (another variant, same model)")
    ap.add_argument("--run", type=Path, help="a finished run with ground truth (its stage-3 model, its decoded maps) "
                                             "instead of the benchmark's own model")
    ap.add_argument("--classes", nargs="+", default=["LAA", "Cor", "PV"], help="with --run: the classes clicked")
    args = ap.parse_args(argv)
    if args.readme:
        args.readme.write_text(with_readme_table(args.readme.read_text(), pd.read_csv(args.out / "clicks.csv")))
        print(f"rewrote the clicks table of {args.readme}")
        return 0
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    changes = {f"refine.{k}": v for k, v in (yaml.safe_load(args.refine) or {}).items()} if args.refine else None
    if args.run:
        return clicks_on_run(args, changes, device)
    params = load_params(args.params, changes)
    work = args.out / "model"
    artifact = work / "unified.pt"
    if args.refit or not artifact.is_file():
        t0 = time.perf_counter()
        unified, cases = build_model(args.params, args.cases, args.epochs, work, device)
        unified.save(artifact)
        torch.save({cid: {"truth": torch.from_numpy(t), "affine": torch.from_numpy(a), "fitted": torch.from_numpy(f)}
                    for cid, (t, a, f) in cases.items()}, work / "cases.pt")
        print(f"fitted in {time.perf_counter() - t0:.0f} s", flush=True)
    unified = UnifiedModel.load(artifact, device=device, edits=False)
    cases = {cid: (d["truth"].numpy(), d["affine"].numpy(), d["fitted"].numpy())
             for cid, d in torch.load(work / "cases.pt", weights_only=True).items()}
    rows, finals = [], []
    for case_id, key, kind in SESSIONS[:args.sessions]:
        truth, affine, fitted = cases[case_id]
        r, f = run_session(unified, case_id, key, kind, truth, affine, fitted, args.clicks, params)
        rows += r
        finals += f
    conditions = (f"F_Θ fitted {args.epochs} epochs on {args.cases} cases of `{args.params.name}`'s phantom "
                  f"({'x'.join(str(v) for v in params.data.phantom.shape)} voxels); {_refine_text(params.refine)}; "
                  f"device {device}, "
                  f"{args.threads} threads; code {code_version()}; `python -m benchmarks.clicks --out {args.out}"
                  f"{f' --refine {chr(39)}{args.refine}{chr(39)}' if args.refine else ''}`.")
    return write_tables(args, rows, finals, conditions)


def _refine_text(r) -> str:
    return (f"refine: L-BFGS, {r.steps} evaluations, anchor {r.anchor_weight}, click radius {r.click_radius_mm} mm, "
            f"click weight {r.click_weight}, {r.prior_points} prior voxels ({r.prior_window_share:.0%} in the window), "
            f"window {r.window_mm} mm, paste {r.paste}")


def clicks_on_run(args, changes: dict | None, device: str) -> int:
    """The sessions on a finished run: its stage-3 artifact, every case with ground truth (the first
    ``--cases``), each of ``--classes`` it holds, started from the decode seeded by its L^ref."""
    run = open_run(args.run)
    params = load_params(run.dir / "params.yaml", changes)
    unified = UnifiedModel.load(artifact_path(run), device=device, edits=False)
    rows, finals = [], []
    in_run = {c.case_id for c in run.cases}
    for case_id in [c for c in unified.case_ids if c in in_run][:args.cases]:
        case = run.load(case_id, with_image=False)
        if case.truth is None:
            continue
        lref_path = stage_labels(run, "stage2", case_id)
        lref = read_label(lref_path, run.table).array if lref_path.is_file() else case.label.array
        for key in args.classes:
            if np.any(case.truth.array == run.table[key].index):
                r, f = run_session(unified, case_id, key, "run", case.truth.array, case.label.affine, lref,
                                   args.clicks, params)
                rows += r
                finals += f
    if not rows:
        raise SystemExit(f"{run.dir}: no case with ground truth and a stage-3 latent")
    conditions = (f"The stage-3 model of run `{run.dir.name}` ({len(unified.case_ids)} cases); "
                  f"{_refine_text(params.refine)}; device {device}, {args.threads} threads; code {code_version()}; "
                  f"`python -m benchmarks.clicks --out {args.out} --run {args.run}`.")
    return write_tables(args, rows, finals, conditions)


def write_tables(args, rows: list[dict], finals: list[dict], conditions: str) -> int:
    clicks, final = pd.DataFrame(rows), pd.DataFrame(finals)
    out = args.csv_dir or args.out
    out.mkdir(parents=True, exist_ok=True)
    clicks.to_csv(out / "clicks.csv", index=False)
    final.to_csv(out / "final.csv", index=False)
    plot(clicks, out / "clicks.png")
    page = summary(clicks, final, conditions)
    write_text(out / "clicks.md", page + "\n")
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
