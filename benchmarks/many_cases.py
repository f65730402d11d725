"""What many cases buy (a benchmark, not a test): F_Θ fitted on the first N cases of one run, for
several N, and unseen cases fitted by their latent alone (F_Θ frozen), against their noisy labels.

    python -m nearfix_lib.stages.pipeline --params params/many_cases.yaml --stages 01_prepare,02_stage1,03_stage2
    python -m benchmarks.many_cases --run outputs/many_cases --sizes 8 32 --out DIR

Why: with 4 training cases the latent of a case F_Θ never saw decodes *worse* than that case's
noisy labels on every class (the demo's page): a latent space fitted on a few cases has not learned
the shape variation that lets a new case's latent land on a plausible heart. Users will fit it on
hundreds. This measures whether more cases move a new case's decode from below its input to above.

Every size N gets its own run folder ``DIR/n<N>`` that links the source run's data, prepared crops
and stage-1 outputs and the stage-2 L^ref of its first N cases only (stage 3 lists the others as
skipped), so that every N learns from the same L^ref. Stage 3 is fitted there with the source run's
``stage3`` parameters (without the distillation comparison), then the latent of each held-out phantom
case (indices ``n_cases`` onward of the run's phantom, the same cases for every N) is fitted and the
decode and the noisy labels are scored against the truth. A size whose scores exist is kept; an
interrupted fit resumes from its checkpoint. Writes ``many_cases.csv`` (n_train, case, class,
source, dice, hd95) and ``many_cases.md`` rendered from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["n_train", "case", "class", "source", "dice", "hd95"]
LINKED = ("phantom", "prepared", "stage1")  # what every size reads from the source run as it is


def subset_run_dir(source: Path, folder: Path, case_ids: list[str]) -> None:
    """``folder`` as a run that shares ``source``'s data, crops and stage-1 outputs and holds the stage-2
    labels (and ROI labels, where written) of ``case_ids`` only."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if (source / name).exists() and not (folder / name).exists():
            os.symlink((source / name).resolve(), folder / name)
    for sub, suffix in (("labels", ".nii.gz"), ("roi", ".npz")):
        if not (source / "stage2" / sub).is_dir():
            continue
        (folder / "stage2" / sub).mkdir(parents=True, exist_ok=True)
        for cid in case_ids:
            target, link = source / "stage2" / sub / f"{cid}{suffix}", folder / "stage2" / sub / f"{cid}{suffix}"
            if target.is_file() and not link.exists():
                os.symlink(target.resolve(), link)


def run_size(source: Path, folder: Path, n_train: int, holdouts: int, progress: bool) -> pd.DataFrame:
    """Fit F_Θ on the source run's first ``n_train`` cases in ``folder`` and the held-out latents:
    the long score rows (noisy and decoded against the truth per held-out case and class)."""
    import pandas as pd

    from nearfix_lib.core.config import load_params
    from nearfix_lib.core.scores import read_scores
    from nearfix_lib.phantom.dataset import make_case
    from nearfix_lib.stages import stage3
    from nearfix_lib.stages.prepare import load_crops_index
    from nearfix_lib.stages.runs import start_run

    params = load_params(source / "params.yaml", {"stage3.compare_distillation": False}, run_dir=str(folder))
    if params.data.data_root:
        raise ValueError(f"{source} runs on {params.data.data_root}: the unseen cases come from the phantom, "
                         "so this needs a phantom run")
    index = list(load_crops_index(source / "prepared"))
    if len(index) < n_train:
        raise ValueError(f"{source} has {len(index)} prepared cases, fewer than {n_train}")
    subset_run_dir(source, folder, index[:n_train])
    ids = [f"holdout{i}" for i in range(holdouts)]
    done = [folder / "stage3" / "new_cases" / cid for cid in ids]
    if not all((d / "scores.csv").is_file() for d in done):
        run = start_run(params, progress=progress)
        started = time.perf_counter()
        data = stage3.load_stage3_data(run)
        if len(data.case_ids) != n_train:
            raise RuntimeError(f"{folder}: stage 3 found {len(data.case_ids)} cases, expected {n_train}")
        model, task, _ = stage3.fit_unified(run, data, progress=progress)
        unified = stage3.make_artifact(run, model, task, data)
        print(f"N = {n_train}: F_Θ fitted in {time.perf_counter() - started:.0f} s", flush=True)
        for i, cid in enumerate(ids):
            case = make_case(params.data.phantom.n_cases + i, params.data.phantom, run.table)
            decoded = stage3.fit_new_case(run, unified, cid, case.noisy, case.affine)
            print(stage3.new_case_scores(run, cid, case, decoded).round(3).to_string(), flush=True)
    rows = pd.concat([read_scores(d) for d in done], ignore_index=True)
    rows["n_train"] = n_train
    return rows[COLUMNS]


def page(table: pd.DataFrame, command: str) -> str:
    """The markdown page: per class the held-out cases' mean Dice and HD95, noisy and decoded at each
    size, and in how many held-out cases the decode beats the noisy labels."""
    sizes = sorted(table["n_train"].unique())
    noisy = table[table["source"] == "noisy"].groupby("class", sort=False)[["dice", "hd95"]].mean()
    decoded = table[table["source"] == "stage3"]
    lines = ["# What many cases buy: a case F_Θ never saw, fitted by its latent alone", "",
             f"`python -m benchmarks.many_cases {command}`. Mean over {table['case'].nunique()} held-out cases "
             "(the same for every N) of the Dice and HD95 (mm) against the truth; `better` counts the held-out "
             "cases whose decode has a higher Dice than their noisy labels.", ""]
    header = "| class | noisy Dice | " + " | ".join(f"N = {n} Dice | better" for n in sizes) + " |"
    lines += [header, "|---|---|" + "---|---|" * len(sizes)]
    pairs = decoded.merge(table[table["source"] == "noisy"], on=["n_train", "case", "class"], suffixes=("", "_noisy"))
    for cls in noisy.index:
        cells = []
        for n in sizes:
            at = pairs[(pairs["n_train"] == n) & (pairs["class"] == cls)]
            cells.append(f"{at['dice'].mean():.3f} | {int((at['dice'] > at['dice_noisy']).sum())}/{len(at)}")
        lines.append(f"| {cls} | {noisy.loc[cls, 'dice']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| class | noisy HD95 | " + " | ".join(f"N = {n} HD95" for n in sizes) + " |",
              "|---|---|" + "---|" * len(sizes)]
    for cls in noisy.index:
        cells = [f"{decoded[(decoded['n_train'] == n) & (decoded['class'] == cls)]['hd95'].mean():.2f}"
                 for n in sizes]
        lines.append(f"| {cls} | {noisy.loc[cls, 'hd95']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from nearfix_lib.core.io import write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a phantom run whose stages 0-2 are done")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32], help="training cases of each F_Θ")
    ap.add_argument("--holdouts", type=int, default=3, help="unseen phantom cases, fitted by their latent")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/many_cases"))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if not (args.run / "params.yaml").is_file():
        print(f"{args.run}: no params.yaml, not a run folder", file=sys.stderr)
        return 2
    tables = [run_size(args.run, args.out / f"n{n}", n, args.holdouts, args.progress) for n in sorted(args.sizes)]
    table = pd.concat(tables, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "many_cases.csv", table.to_csv(index=False))
    command = " ".join(argv if argv is not None else sys.argv[1:])
    write_text(args.out / "many_cases.md", page(table, command))
    print(f"wrote {args.out / 'many_cases.csv'} and many_cases.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
