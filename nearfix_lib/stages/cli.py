"""The ``nearfix`` command: one entry point for what each has its own ``python -m`` module.

::

    nearfix phantom OUT [--cases N --shape I J K ...]    # = python -m nearfix_lib.phantom
    nearfix pipeline --params P [--run-dir D --jobs N]   # = python -m nearfix_lib.stages.pipeline
    nearfix run STAGE --params P [--run-dir D --workers K --shard i/n]   # a per-case stage, below
    nearfix merge STAGE --run-dir D                      # its tables from the cases' parts
    nearfix stage1 --params P --class KEY [--run-dir D]  # = python -m nearfix_lib.stages.stage1
    nearfix stage3 --params P [--run-dir D]              # = python -m nearfix_lib.stages.stage3
    nearfix view RUN CASE [--layout overlay ...]         # = python -m nearfix_lib.viz.view
    nearfix edit RUN CASE [--source stage1:KEY]          # = python -m nearfix_lib.stages.edit_panel
    nearfix page RUN [--out docs/experiments/NAME.md]    # an experiment page from a run's CSVs

Every subcommand hands the rest of the command line to that module's ``main``, so the options and
their help are the module's own. Under torchrun use the module form,
``torchrun --nproc_per_node=K -m nearfix_lib.stages.stage3 ...`` or ``... -m nearfix_lib.stages.stage1
--class KEY ...`` (torchrun starts a module or a script, not a console script); as SLURM jobs:
``jobs/torchrun_stage1.sh`` (an array, one task per class) and ``jobs/torchrun_stage3.sh``.

``nearfix run STAGE`` is the one way to run a per-case stage outside a notebook: ``prepare``;
``repair`` (stage 1's M^ref of every fitted class, each case read once; the fits come first, from
notebook 02 or ``nearfix stage1``); ``stage2``; ``decode`` (stage 3's decoding and scoring with
``stage3/unified.pt``, once the fit wrote it: ``stage3/labels/``, ``stage3/scores.csv``); or
``report`` (its tables ``report/{scores,checks}.csv``; the figures and ``summary.md`` come from
notebook 05). It runs on all cases, in K processes of one node (``--workers K``), or as one SLURM
array task's share (``--shard i/n``, 0-based: ``--array=0-(n-1)`` and ``--shard
$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``, see ``jobs/slurm_array.sh``). It calls the same
function the notebook calls (``prepare.prepare_run``, ``stage1.repair_run``,
``stage2.run_stage2``, ``stage3.decode_and_score``, ``report.run_compare``; :mod:`stages.shards`).
Done cases are not recomputed; the task that completes the last case writes the tables, and
``nearfix merge STAGE`` writes them again or names the cases still missing (exit status 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

import yaml

from nearfix_lib import __version__
from nearfix_lib.core.config import load_params, resolve_path
from nearfix_lib.core.workspace import open_run, stage_dir
from nearfix_lib.phantom import dataset
from nearfix_lib.stages import edit_panel, pages, pipeline, prepare, report, shards, stage1, stage2, stage3
from nearfix_lib.stages.runs import start_run
from nearfix_lib.viz import view

# the per-case stages: what the notebook calls, and the stage's parts and tables
CASE_STAGES: dict[str, tuple[Callable[..., object], shards.CaseStage]] = {
    "prepare": (prepare.prepare_run, prepare.CASES),
    "repair": (stage1.repair_run, stage1.REPAIR),
    "stage2": (stage2.run_stage2, stage2.CASES),
    "decode": (stage3.decode_and_score, stage3.DECODE),
    "report": (report.run_compare, report.CASES),
}


def _shard(text: str) -> shards.Shard:
    try:
        return shards.Shard.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="run a per-case stage: all cases, in K processes, "
                                 "or one SLURM array task's share (see `nearfix --help` and jobs/slurm_array.sh)")
    ap.add_argument("stage", choices=list(CASE_STAGES))
    ap.add_argument("--params", required=True, help="pipeline parameters file (a run's params.yaml works too)")
    ap.add_argument("--run-dir", default="", help="run folder (default outputs/<run.name>)")
    ap.add_argument("--data-root", default="", help="data root (default: as in the params file)")
    ap.add_argument("--device", default="", help="cpu, cuda, auto (default: as in the params file)")
    ap.add_argument("--workers", type=int, default=1, help="processes on this node (each uses cores/K threads)")
    ap.add_argument("--shard", type=_shard, default=None, metavar="i/n", help="only every n-th case from the "
                    "i-th (0 <= i < n), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    params = load_params(args.params, run_dir=args.run_dir, data_root=args.data_root, device=args.device)
    recorded = (yaml.safe_load(resolve_path(args.params).read_text()) or {}).get("source")
    if recorded:  # a run's params.yaml: keep the params file it names (pages show it)
        params = dataclasses.replace(params, source=recorded)
    run = start_run(params, progress=False)
    function, stage = CASE_STAGES[args.stage]
    function(run, progress=not args.no_progress, workers=args.workers, shard=args.shard)
    if not shards.missing_cases(run, stage):
        print(f"{args.stage}: every case done, tables written in {stage_dir(run, stage.name)}")
    return 0


def merge_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description="write a per-case stage's tables from its cases' parts, "
                                 "or name the cases still missing (exit status 1)")
    ap.add_argument("stage", choices=list(CASE_STAGES))
    ap.add_argument("--run-dir", required=True, help="the run folder")
    args = ap.parse_args(argv)
    run = open_run(args.run_dir)
    stage = CASE_STAGES[args.stage][1]
    if shards.merge(run, stage) is None:
        return 1
    print(f"{args.stage}: tables written in {stage_dir(run, stage.name)}")
    return 0


COMMANDS: dict[str, tuple[Callable[..., int], str]] = {
    "phantom": (dataset.main, "write a phantom data root (segmentations/, images/, ground_truth/)"),
    "pipeline": (pipeline.main, "run every notebook of a run in order through papermill"),
    "run": (run_main, "run a per-case stage (prepare, repair, stage2, decode, report): --workers K, --shard i/n"),
    "merge": (merge_main, "write a per-case stage's tables from its cases' parts, or name the missing cases"),
    "stage1": (stage1.main, "fit one class's field and write its masks (the module form runs under torchrun)"),
    "stage3": (stage3.main, "fit the unified model (the module form runs under torchrun)"),
    "view": (view.main, "open a case of a run in napari"),
    "edit": (edit_panel.main, "repair a case of a run in napari by clicking (its latent re-fitted per click)"),
    "page": (pages.main, "write a run's experiment page (Markdown) from its CSVs"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: nearfix {{{','.join(COMMANDS)}}} ...", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "nearfix COMMAND --help shows the command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"nearfix {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nearfix: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return COMMANDS[command][0](rest, prog=f"nearfix {command}")


if __name__ == "__main__":
    sys.exit(main())
