"""Run the numbered notebooks headless, in order, into one run folder (what ``make demo`` does).

    python -m nearfix_lib.stages.pipeline --params params/demo.yaml --run-dir outputs/demo

Stage 1 is one papermill job per class (``-p cls <index>``), exactly as a SLURM array would run
it; the class list comes from the run's class table (or ``stage1.classes``), never from here.
``--jobs K`` runs K of those jobs at a time, each kernel limited to cores/K threads (small models
use two single-threaded processes better than one two-threaded one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nearfix_lib.core.classes import load_table
from nearfix_lib.core.config import load_params, project_root
from nearfix_lib.core.workspace import run_directory
from nearfix_lib.stages.shards import thread_variables

STAGES = ("00_inspection", "01_prepare", "02_stage1", "03_stage2", "04_stage3", "05_report")


def execute(notebook: str, out: Path, parameters: dict) -> float:
    import papermill as pm

    t0 = time.perf_counter()
    pm.execute_notebook(str(project_root() / "notebooks" / f"{notebook}.ipynb"), str(out), parameters=parameters,
                        kernel_name="python3", cwd=str(project_root()), progress_bar=False)
    return time.perf_counter() - t0


def run_jobs(stage: str, jobs: list[tuple[str, dict]], common: dict, out_dir: Path, parallel: int) -> None:
    """Execute one notebook once per job (name, extra parameters), ``parallel`` at a time."""
    def one(job: tuple[str, dict]) -> None:
        name, extra = job
        seconds = execute(stage, out_dir / f"{name}.ipynb", {**common, **extra})
        print(f"{name}: {seconds:.0f} s", flush=True)

    if parallel <= 1 or len(jobs) == 1:
        for job in jobs:
            one(job)
        return
    with thread_variables(max(1, (os.cpu_count() or 1) // parallel)), ThreadPoolExecutor(parallel) as pool:
        for future in [pool.submit(one, job) for job in jobs]:
            future.result()  # re-raises the first failure


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/demo.yaml", help="pipeline parameters file")
    ap.add_argument("--run-dir", default="", help="run folder (default outputs/<run.name>)")
    ap.add_argument("--data-root", default="", help="data root (default: as in the params file)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated notebook names to run")
    ap.add_argument("--jobs", type=int, default=1, help="stage-1 class jobs run at the same time")
    args = ap.parse_args(argv)

    params = load_params(args.params, run_dir=args.run_dir, data_root=args.data_root)
    run_dir = run_directory(params)
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    common = {"params_file": str(args.params), "run_dir": str(run_dir), "data_root": args.data_root}
    table = load_table(params.data.classes, params.data.class_keys or None, project_root())
    for stage in [s for s in args.stages.split(",") if s]:
        if stage not in STAGES:
            ap.error(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
        jobs = [(stage, {})]
        if stage == "02_stage1":
            keys = params.stage1.classes or table.keys
            jobs = [(f"{stage}_{k}", {"cls": table[k].index}) for k in keys]
        run_jobs(stage, jobs, common, run_dir / "notebooks", args.jobs)
    print(f"results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
