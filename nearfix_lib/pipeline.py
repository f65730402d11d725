"""Run the numbered notebooks headless, in order, into one run folder (what ``make demo`` does).

    python -m nearfix_lib.pipeline --params params/demo.yaml --run-dir outputs/demo

Stage 1 is one papermill job per class (``-p cls <index>``), exactly as a SLURM array would run
it; the class list comes from the run's class table (or ``stage1.classes``), never from here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .params import load_params, project_root

STAGES = ("00_data_inspection", "01_prepare", "02_stage1", "03_fusion", "04_unified")


def execute(notebook: str, out: Path, parameters: dict) -> float:
    import papermill as pm

    t0 = time.perf_counter()
    pm.execute_notebook(str(project_root() / "notebooks" / f"{notebook}.ipynb"), str(out), parameters=parameters,
                        kernel_name="python3", cwd=str(project_root()), progress_bar=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/demo.yaml", help="pipeline parameters file")
    ap.add_argument("--run-dir", default="", help="run folder (default outputs/<run.name>)")
    ap.add_argument("--data-root", default="", help="data root (default: as in the params file)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated notebook names to run")
    args = ap.parse_args(argv)

    from .classes import load_table
    from .runs import run_directory

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
        for name, extra in jobs:
            seconds = execute(stage, run_dir / "notebooks" / f"{name}.ipynb", {**common, **extra})
            print(f"{name}: {seconds:.0f} s", flush=True)
    print(f"results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
