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

import numpy as np

from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.config import DecodeParams, load_params
from nearfix_lib.core.geometry import Box, roi_box, roi_grid, voxel_spacing
from nearfix_lib.core.metrics import component_counts
from nearfix_lib.stages.runs import code_version, resolve_device

PROJECT = Path(__file__).resolve().parents[1]
USER_SPACING = (0.35, 0.35, 0.5)
README_BEGIN = "<!-- speed table: begin (python -m benchmarks.speed --readme) -->"
README_END = "<!-- speed table: end -->"


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


def _fit(job: FitJob, queue) -> None:
    """Child: fit F_Θ on case 1 of the 1.1 mm phantom, save its weights, box and spacing."""
    import torch

    from nearfix_lib.field.models import ImplicitField
    from nearfix_lib.field.store import StoreSpec, write_store
    from nearfix_lib.field.train import fit
    from nearfix_lib.field.unified import UnifiedTask
    from nearfix_lib.phantom.dataset import make_case

    params = load_params(job.params)
    case = make_case(0, params.data.phantom)
    spacing = voxel_spacing(case.affine)
    box = roi_box(case.truth > 0, params.prepare.heart_margin, spacing, params.prepare.margin_unit)
    s3 = params.stage3
    train = dataclasses.replace(s3.train, epochs=job.epochs, cases_per_batch=1, eval_interval=job.epochs,
                                checkpoint_interval=job.epochs, lr_step_epochs=0, select="last", amp=False)
    sampling = dataclasses.replace(s3.sampling, mined=0)
    work = Path(job.work)
    store = write_store(work / "cases", [case.truth[box.slices]],
                        StoreSpec(tuple(CARDIAC.indices), sampling.dilation_radius, interfaces=False))
    torch.manual_seed(0)
    model = ImplicitField(1, s3.model, n_heads=len(CARDIAC))
    task = UnifiedTask(store, CARDIAC, sampling, dataclasses.replace(s3.loss, distill_weight=0.0), 0, job.device)
    t0 = time.perf_counter()
    fit(model, task, train, work / "fit", device=job.device, progress=False)
    torch.save({"state_dict": model.state_dict(), "box": box.to_dict(), "spacing": [float(v) for v in spacing],
                "model_params": dataclasses.asdict(s3.model), "decode": dataclasses.asdict(s3.decode)},
               job.field)
    queue.put({"fit_s": time.perf_counter() - t0, "box_shape": [int(v) for v in box.shape],
               "spacing": [float(v) for v in spacing]})


def _decode(job: DecodeJob, queue) -> None:
    """Child: one decode of the saved field, timed; the labels go to ``job.out``."""
    import torch

    from nearfix_lib.core.config import ModelParams
    from nearfix_lib.field.decide import decode_counted
    from nearfix_lib.field.infer import original_box_grid
    from nearfix_lib.field.models import ImplicitField
    from nearfix_lib.field.unified import priority_decision

    saved = torch.load(job.field, weights_only=True)
    model = ImplicitField(1, ModelParams(**saved["model_params"]), n_heads=len(CARDIAC))
    model.load_state_dict(saved["state_dict"])
    model.to(job.device).eval()
    box = Box.from_dict(saved["box"])
    grid = original_box_grid(box) if job.grid_shape is None else roi_grid(box, job.grid_shape)
    decision = priority_decision(CARDIAC, [0.5] * len(CARDIAC))
    params = DecodeParams(**{**saved["decode"], "mode": job.mode})
    t0 = time.perf_counter()
    labels, evaluated = decode_counted(model, 0, grid, box, decision, params, job.device)
    seconds = time.perf_counter() - t0
    np.save(job.out, labels)
    queue.put({"seconds": seconds, "evaluated": evaluated / labels.size, "voxels": int(labels.size),
               "threads": torch.get_num_threads()})


def decode_rows(name: str, results: dict[str, dict], maps: dict[str, np.ndarray]) -> list[dict]:
    """The rows of one grid: seconds per variant, agreement and components of coarse-to-fine vs dense."""
    dense, fine = maps["dense"], maps["coarse_to_fine"]
    comps = {v: list(component_counts(m, CARDIAC).values()) for v, m in maps.items()}
    rows = [{"what": name, "variant": v, "value": results[v]["seconds"], "unit": "s"} for v in results]
    rows += [{"what": f"{name}_identical", "variant": "coarse_to_fine", "value": float(np.mean(dense == fine)),
              "unit": "fraction"},
             {"what": f"{name}_evaluated", "variant": "coarse_to_fine",
              "value": results["coarse_to_fine"]["evaluated"], "unit": "fraction"},
             {"what": f"{name}_voxels", "variant": "dense", "value": results["dense"]["voxels"], "unit": "count"}]
    rows += [{"what": f"{name}_components", "variant": v, "value": sum(c), "unit": "count"} for v, c in comps.items()]
    rows.append({"what": f"{name}_components_equal", "variant": "coarse_to_fine",
                 "value": sum(a == b for a, b in zip(comps["dense"], comps["coarse_to_fine"])), "unit": "classes"})
    return rows


def speed_page(table, conditions: str) -> str:
    """The markdown page: the CSV as a table and the dense / coarse-to-fine ratios."""
    lines = ["# Speed: dense and coarse-to-fine decoding", "", conditions, "",
             "| what | variant | value | unit |", "|---|---|---|---|"]
    lines += [f"| {r.what} | {r.variant} | {r.value:.6g} | {r.unit} |" for r in table.itertuples()]
    lines += ["", "| decode | dense / coarse-to-fine |", "|---|---|"]
    for name in ("decode_1mm", "decode_realsize"):
        t = table[table.what == name].set_index("variant")["value"]
        if {"dense", "coarse_to_fine"} <= set(t.index):
            lines.append(f"| {name} | {t['dense'] / t['coarse_to_fine']:.1f}x |")
    return "\n".join(lines) + "\n"


def readme_table(table) -> str:
    """The README's performance table: seconds per decode, the ratio and the agreement."""
    lines = ["| decode | voxels | dense (s) | coarse to fine (s) | dense / coarse to fine | evaluated | identical |",
             "|---|---|---|---|---|---|---|"]
    value = table.set_index(["what", "variant"])["value"]
    for name in ("decode_1mm", "decode_realsize"):
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


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from benchmarks.bench import _run_isolated
    from nearfix_lib.core.io import write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/speed"))
    ap.add_argument("--epochs", type=int, default=400, help="steps of the one-case fit")
    ap.add_argument("--params", type=Path, default=PROJECT / "params/phantom_1mm.yaml",
                    help="the phantom, prepare and stage3 sections of the fit and the decodes")
    ap.add_argument("--realsize-spacing", type=float, nargs=3, default=USER_SPACING,
                    help="voxel size in mm of the real-size grid over the same heart box")
    ap.add_argument("--readme", type=Path, help="also rewrite this file's speed table from the CSV")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="per process")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nearfix-speed-") as tmp:
        field = str(Path(tmp) / "field.pt")
        fitted = _run_isolated(FitJob(str(args.params), args.epochs, tmp, field, device), args.timeout_s, target=_fit)
        if "fit_s" not in fitted:
            print(f"fit failed: {fitted}", file=sys.stderr)
            return 1
        box_shape = fitted["box_shape"]
        real = tuple(int(round(n * s / t)) for n, s, t in zip(box_shape, fitted["spacing"], args.realsize_spacing))
        rows = [{"what": "fit", "variant": "one_case", "value": fitted["fit_s"], "unit": "s"}]
        for name, shape in (("decode_1mm", None), ("decode_realsize", real)):
            results, maps = {}, {}
            for mode in ("dense", "coarse_to_fine"):
                out = str(Path(tmp) / f"{name}_{mode}.npy")
                res = _run_isolated(DecodeJob(field, shape, mode, out, device), args.timeout_s, target=_decode)
                if "seconds" not in res:
                    print(f"{name} {mode} failed: {res}", file=sys.stderr)
                    return 1
                results[mode], maps[mode] = res, np.load(out)
                print(f"{name} {mode}: {res['seconds']:.1f} s, {res['evaluated']:.4f} of the voxels evaluated",
                      flush=True)
            rows += decode_rows(name, results, maps)
            ratio = results["dense"]["seconds"] / results["coarse_to_fine"]["seconds"]
            print(f"{name}: dense / coarse-to-fine = {ratio:.1f}x, "
                  f"identical {np.mean(maps['dense'] == maps['coarse_to_fine']):.6f}", flush=True)
    table = pd.DataFrame(rows, columns=["what", "variant", "value", "unit"])
    table.to_csv(args.out / "speed.csv", index=False)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    conditions = (f"F_Θ fitted {args.epochs} steps on case 1 of the phantom of `{args.params.name}` "
                  f"(heart box {box_shape} voxels at {[round(v, 3) for v in fitted['spacing']]} mm); "
                  f"real size: the same box at {list(args.realsize_spacing)} mm ({list(real)} voxels)."
                  f" Device {device}; "
                  f"code {code_version()}; `python -m benchmarks.speed {command}`.")
    write_text(args.out / "speed.md", speed_page(table, conditions))
    print(f"wrote {args.out / 'speed.csv'} and speed.md")
    if args.readme:
        write_text(args.readme, with_readme_table(args.readme.read_text(), table))
        print(f"rewrote the speed table of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
