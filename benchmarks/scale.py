"""Scale benchmarks (not tests): peak memory, wall time and disk of every stage as the data grows.

    python -m benchmarks.scale scale --sizes 8 32 --out outputs/scale       # N cases of 160x160x128
    python -m benchmarks.scale realsize --out outputs/realsize              # one case of 512x512x275
    python -m benchmarks.scale ratio --before-code ../old --before-run ../old/outputs/realsize/run \
        --after-run outputs/realsize/run --out outputs/ratio                # stage 2 and report again, old vs new

Why: a real data set has hundreds to a thousand cases of 512x512x~300 voxels (0.35x0.35x0.5 mm).
Two things decide whether a stage runs on it. Whatever a stage holds for *every case at once*
(label maps read before a loop, per-case sampling tables or teachers kept by a fit, probability
maps kept to fit thresholds) grows with the number of cases N; what it holds for *one case at a
time* grows with the voxels per case. ``scale`` measures the first: the same stages on N and on M
cases of a fixed size with more than 10 MB of data per case, and prints per stage the growth in MB
per case and the peak extrapolated to 1,000 cases. ``realsize`` measures the second: one case of
the real size through every stage.

Each stage runs in its own process (``python -m benchmarks.scale _stage STAGE --run-dir RUN
--params FILE``), started fresh, so its peak RSS is its own (``ru_maxrss`` of that process: a
stage run after another in one process would report the larger of the two peaks, and Python
rarely hands freed memory back), and a stage that exhausts memory or time becomes a row with its
status instead of ending the benchmark. The phantom data is generated before, in this process,
and is part of no stage. The stages are the notebooks' library calls without the figures, on
``params/default.yaml`` (the production model and grids) with short fits (``SHORT_FITS``): the
benchmark measures what a stage holds and writes, not how well it repairs. Both commands write
``<name>.csv`` and ``<name>.md`` (tables rendered from the CSV, stamped with the command and the
code version) into ``--out``; each stage's output is in ``--out/logs/``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from nearfix_lib.core.config import Params

PROJECT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "stage1", "stage2", "stage3", "report")
SCALE_COLUMNS = ["stage", "n_cases", "peak_rss_mb", "wall_s", "disk_mb", "case_disk_mb", "base_rss_mb", "status"]
REALSIZE_COLUMNS = ["stage", "peak_rss_mb", "wall_s", "disk_mb", "case_disk_mb", "base_rss_mb", "status"]
RESULT_TAG = "nearfix-scale-result "
TARGET_CASES = 1000
# Short fits: every code path of a fit runs (training steps, one evaluation, checkpoints) in a few
# epochs. Stage 1 gets 10: after 2 steps (1 epoch = 1 step up to 8 cases) its LV field is still
# empty, stage 2 then fuses empty masks and stage 3 finds no L^ref to learn; after 10 the LV Dice
# is ~0.85 and the coronaries are pieces of a tree, so stages 2 and 3 work on maps like a real run's.
# The fits' validation and the thresholds work on fixed subsets (train.eval_cases,
# stage3.threshold_cases: 16 and 32 by default); here 4, below the smallest N measured, so that
# what grows between two N is the per-case work alone, as it would be beyond 32 cases.
SHORT_FITS = {
    "stage1.classes": ["LV", "Cor"],  # two of ten classes, to bound the time: a large one and the thinnest
    "stage2.unrepaired": "absent",  # L^ref of these two alone, as every earlier scale run measured it
    "stage1.train.epochs": 10, "stage1.train.eval_interval": 10, "stage1.train.checkpoint_interval": 10,
    "stage3.train.epochs": 2, "stage3.train.eval_interval": 2, "stage3.train.checkpoint_interval": 2,
    "stage3.compare_distillation": False,
    "stage1.train.eval_cases": 4, "stage3.train.eval_cases": 4, "stage3.threshold_cases": 4,
}


# -- the child: one stage in its own process --------------------------------------------------------

def _prepare(run) -> None:
    from nearfix_lib.stages.prepare import prepare_run

    prepare_run(run)


def _stage1(run) -> None:
    from nearfix_lib.stages.stage1 import fit_class, repair_run

    for key in run.params.stage1.classes or run.table.keys:
        fit_class(run, key, run.params.stage1, progress=False)
    repair_run(run, progress=False)


def _stage2(run) -> None:
    from nearfix_lib.stages.stage2 import run_stage2

    run_stage2(run, progress=False)


def _stage3(run) -> None:
    from nearfix_lib.stages.stage3 import decode_and_score, fit_unified, load_stage3_data, make_artifact

    data = load_stage3_data(run)
    model, task, _ = fit_unified(run, data, progress=False)
    make_artifact(run, model, task, data)
    decode_and_score(run, progress=False)


def _report(run) -> None:
    from nearfix_lib.stages.report import run_compare

    run_compare(run, progress=False)


STAGE_CALLS = {"prepare": _prepare, "stage1": _stage1, "stage2": _stage2, "stage3": _stage3, "report": _report}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far: ``VmHWM`` of ``/proc/self/status`` where it
    exists, else ``ru_maxrss`` (KiB on Linux). Linux carries ``ru_maxrss`` across exec, so a child
    started by a parent holding 300 MB reports at least 300 MB however little it uses itself;
    ``VmHWM`` belongs to the process's own address space."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(stage: str, run_dir: str, params_file: str) -> int:
    """Run one stage on the run folder; print one ``RESULT_TAG`` JSON line: peak RSS, wall time,
    the RSS its imports alone took (``base_rss_mb``) and ``ok`` or why it failed."""
    importlib.import_module(f"nearfix_lib.stages.{stage}")  # the imports are the baseline, not the stage
    from nearfix_lib.core.config import load_params
    from nearfix_lib.stages.runs import start_run

    base, t0, status = peak_rss_mb(), time.perf_counter(), "ok"
    try:
        STAGE_CALLS[stage](start_run(load_params(params_file, run_dir=run_dir), progress=False))
    except Exception as err:  # the row records it; the traceback stays in the stage's log
        traceback.print_exc()
        status = f"failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
    result = {"peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - t0, "base_rss_mb": base, "status": status}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0 if status == "ok" else 1


# -- the parent: data, one process per stage, tables --------------------------------------------------

def make_data(root: Path, n_cases: int, shape: list[int], spacing: list[float]) -> None:
    """A phantom data root of ``n_cases`` cases (kept if it exists with the same parameters)."""
    from nearfix_lib.core.config import PhantomParams
    from nearfix_lib.phantom.dataset import write_dataset

    fov = tuple(float(n * s) for n, s in zip(shape, spacing))
    t0 = time.perf_counter()
    write_dataset(root, PhantomParams(n_cases=n_cases, shape=tuple(shape), fov_mm=fov), progress=True)
    print(f"phantom: {n_cases} case(s) of {shape} voxels at {spacing} mm in {root} "
          f"({time.perf_counter() - t0:.0f} s; not part of any stage)", flush=True)


def write_params(path: Path, params_file: str, overrides: dict) -> Params:
    """Resolve ``params_file`` with ``overrides`` and write the result to ``path`` (what the stages load)."""
    from nearfix_lib.core.config import load_params
    from nearfix_lib.core.io import write_text

    params = load_params(params_file, overrides)
    write_text(path, params.to_yaml())
    return params


def run_overrides(data_root: Path, n_cases: int, run_dir: Path, device: str, extra: dict) -> dict:
    """``SHORT_FITS``, the data root limited to ``n_cases``, the run folder and device, then ``extra``."""
    return {**SHORT_FITS, "run.name": run_dir.name, "run.run_dir": str(run_dir), "run.device": device,
            "data.data_root": str(data_root), "data.max_cases": n_cases, **extra}


def _spawn(cmd: list[str], log: Path, timeout_s: float, project: Path = PROJECT) -> tuple[int, float, bool]:
    """Run ``cmd`` in the project with its output in ``log``: (exit code, its peak RSS in MB as
    the kernel reports it at exit, whether it was killed for time). That RSS comes from wait4, so
    a process killed for memory still has one; it is ``ru_maxrss``, which counts this process's
    RSS at the start too (see :func:`peak_rss_mb`): an upper bound, used when the child reports none."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(project), os.environ.get("PYTHONPATH")) if p)}
    expired = threading.Event()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=project, env=env)
        timer = threading.Timer(timeout_s, lambda: (expired.set(), proc.kill()))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, usage.ru_maxrss / 1024, expired.is_set()


def _child_result(log: Path) -> dict | None:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(RESULT_TAG)]
    return json.loads(lines[-1][len(RESULT_TAG):]) if lines else None


def folder_mb(folder: Path, case_ids: set[str]) -> tuple[float, float]:
    """Size of the files under ``folder`` (0 when it does not exist), in one walk: all of them, and
    those that belong to one case, a folder or file of their path named by a case id
    (``cases/<case>/``, ``prob/<case>.npy``, ``masks/<case>.nii.gz``). What a thousand cases cost
    on disk is N times the second per case, plus the rest (checkpoints, tables), which does not grow
    with N: with one case, the first mixes the two."""
    total = owned = 0
    for path in folder.rglob("*") if folder.exists() else ():
        if path.is_file():
            size = path.stat().st_size
            total += size
            if any(part.split(".", 1)[0] in case_ids for part in path.relative_to(folder).parts):
                owned += size
    return total / 2**20, owned / 2**20


def params_case_ids(params_file: Path) -> set[str]:
    """The case ids of the data a params file names (none where it cannot be read: the stage's row says why)."""
    from nearfix_lib.core.config import load_params
    from nearfix_lib.core.io import InputError, discover_cases

    params = load_params(params_file)
    try:
        cases = discover_cases(params.data.data_root).cases
    except InputError:
        return set()
    return {c.case_id for c in cases[: params.data.max_cases or None]}


def measure_stage(stage: str, run_dir: Path, params_file: Path, log: Path, timeout_s: float,
                  project: Path = PROJECT) -> dict:
    """One stage in a fresh process, with the code of the checkout ``project``: its row
    (``REALSIZE_COLUMNS``); ``disk_mb`` is what the stage added to the run folder, ``case_disk_mb``
    the part of it that belongs to cases (:func:`folder_mb`)."""
    cases = params_case_ids(params_file)
    before, t0 = folder_mb(run_dir, cases), time.perf_counter()
    cmd = [sys.executable, "-m", "benchmarks.scale", "_stage", stage, "--run-dir", str(run_dir),
           "--params", str(params_file)]
    code, rss_mb, expired = _spawn(cmd, log, timeout_s, project)
    row = {"stage": stage, "peak_rss_mb": rss_mb, "wall_s": time.perf_counter() - t0, "base_rss_mb": float("nan"),
           "status": f"failed: exit code {code} (killed for memory?), see {log}"}
    if expired:
        row["status"] = f"failed: timed out after {timeout_s:.0f} s"
    row.update(_child_result(log) or {})
    after = folder_mb(run_dir, cases)
    return {**row, "disk_mb": after[0] - before[0], "case_disk_mb": after[1] - before[1]}


def clear_stages(run_dir: Path, stages: Sequence[str]) -> None:
    """Remove what ``stages`` wrote to a run folder (``workspace.stage_dir``), so that they run again."""
    from nearfix_lib.core.workspace import open_run, stage_dir

    run = open_run(run_dir, discover=False)
    for stage in stages:
        shutil.rmtree(stage_dir(run, stage), ignore_errors=True)


def run_stages(run_dir: Path, params_file: Path, logs: Path, timeout_s: float,
               again: Sequence[str] = (), on_row: Callable[[dict], None] | None = None,
               stages: Sequence[str] = STAGES, fresh: bool = True) -> list[dict]:
    """``stages`` in order on a fresh run folder (a stage that resumes would measure nothing; with
    ``fresh=False`` the folder is kept and the stages resume, for runs whose results, not costs,
    are wanted); a failed stage is recorded and the next ones still run (and fail on what is
    missing). With ``again``: only those stages, on the run folder as it is, their own folders
    removed first. ``on_row`` receives each stage's row as soon as it is measured."""
    if again:
        clear_stages(run_dir, again)
    elif fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for stage in again or stages:
        print(f"{run_dir.name}: {stage} ...", flush=True)
        row = measure_stage(stage, run_dir, params_file, logs / f"{run_dir.name}_{stage}.log", timeout_s)
        print(f"  {row['status']}: peak RSS {row['peak_rss_mb']:.0f} MB, {row['wall_s']:.0f} s, "
              f"{row['disk_mb']:.1f} MB written", flush=True)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def slopes(table: pd.DataFrame, target: int = TARGET_CASES) -> pd.DataFrame:
    """Per stage, growth per case between the smallest and the largest N that ran (``status`` ok
    where the column exists) and the linear extrapolation to ``target`` cases:
    ``peak(N_max) + mb_per_case * (target - N_max)``, likewise for the wall time."""
    import pandas as pd

    ok = table[table["status"] == "ok"] if "status" in table else table
    rows = []
    for stage, group in ok.groupby("stage", sort=False):
        small, large = group.loc[group["n_cases"].idxmin()], group.loc[group["n_cases"].idxmax()]
        span = large["n_cases"] - small["n_cases"]
        row = {"stage": stage, "n_small": int(small["n_cases"]), "n_large": int(large["n_cases"])}
        for value, per_case, at_target in (("peak_rss_mb", "mb_per_case", f"peak_rss_mb_at_{target}"),
                                           ("wall_s", "s_per_case", f"wall_s_at_{target}")):
            row[per_case] = (large[value] - small[value]) / span if span else float("nan")
            row[at_target] = large[value] + row[per_case] * (target - large["n_cases"])
        rows.append(row)
    columns = ["stage", "n_small", "n_large", "mb_per_case", f"peak_rss_mb_at_{target}", "s_per_case",
               f"wall_s_at_{target}"]
    return pd.DataFrame(rows, columns=columns)


def _conditions(params: Params, shape: list[int], spacing: list[float]) -> str:
    """What the numbers were measured on, for the pages."""
    others = ("L^ref then holds only these" if params.stage2.unrepaired == "absent"
              else "the other classes of L^ref are the input's")
    classes = (f"{', '.join(params.stage1.classes)} only (to bound the time; {others})"
               if params.stage1.classes else "every class")
    mb = math.prod(shape) * 4 / 2**20  # int16 CT + two uint8 label maps
    source = os.path.relpath(params.source, PROJECT)
    return (f"Phantom cases of {' x '.join(map(str, shape))} voxels at {' x '.join(map(str, spacing))} mm "
            f"({mb:.1f} MB per case in memory: int16 CT, noisy and true labels). `{source}` with short fits: "
            f"stage 1 on {classes}, "
            f"{params.stage1.train.epochs} epochs; stage 3 "
            f"{params.stage3.train.epochs} epochs, no fit without distillation, no new-case fit. Device "
            f"`{params.run.device}`, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. "
            "peak_rss_mb: maximum RSS of the stage's own process (its imports included; base_rss_mb: after the "
            "imports); disk_mb: what the stage added to the run folder.\n")


def _pivot(table: pd.DataFrame, value: str) -> str:
    wide = table.pivot(index="stage", columns="n_cases", values=value).reindex(list(STAGES))
    return wide.rename(columns=lambda n: f"N = {n}").to_markdown(floatfmt=".1f")


def scale_page(table: pd.DataFrame, growth: pd.DataFrame, conditions: str) -> str:
    failed = table[table["status"] != "ok"]
    parts = [conditions, "## Peak RSS (MB)", _pivot(table, "peak_rss_mb"), "## Wall time (s)", _pivot(table, "wall_s"),
             "## Written to the run folder (MB)", _pivot(table, "disk_mb"),
             "## Of which case files (MB; `cases/<case>/`, `prob/<case>.npy`, ...: what grows with N)",
             _pivot(table, "case_disk_mb"),
             f"## Growth per case, extrapolated to {TARGET_CASES:,} cases",
             growth.to_markdown(index=False, floatfmt=".1f"),
             "## Failed stages", failed.to_markdown(index=False) if len(failed) else "none"]
    return "\n\n".join(parts) + "\n"


def print_growth(growth: pd.DataFrame) -> None:
    for g in growth.itertuples(index=False):
        print(f"{g.stage}: {g.mb_per_case:+.1f} MB per case (N {g.n_small} -> {g.n_large}); "
              f"at {TARGET_CASES:,} cases ~{getattr(g, f'peak_rss_mb_at_{TARGET_CASES}') / 1024:.1f} GB, "
              f"{getattr(g, f'wall_s_at_{TARGET_CASES}') / 3600:.1f} h")


def _write(out: Path, name: str, table: pd.DataFrame, text: str, argv: list[str]) -> None:
    # imported after the runs: benchmarks.bench imports torch, which would make this process
    # (and the upper bound of a child that reports no RSS itself, see _spawn) 300 MB larger
    from benchmarks.bench import write_report

    write_report(out, name, table, text, argv, module="benchmarks.scale")


def scale(args: argparse.Namespace, argv: list[str]) -> pd.DataFrame:
    """Every stage on each N of ``args.sizes`` (the first N cases of one phantom data root)."""
    import pandas as pd

    out = Path(args.out).resolve()
    make_data(out / "data", max(args.sizes), args.shape, args.spacing)
    again = [stage for stage in STAGES if stage in args.again]  # in pipeline order
    rows: list[dict] = []
    if again:  # the earlier run's rows of the other stages stay (scale.csv in --out)
        earlier = pd.read_csv(out / "scale.csv")
        rows = earlier[~(earlier["stage"].isin(again) & earlier["n_cases"].isin(args.sizes))].to_dict("records")
    params = None

    def keep(n: int, row: dict) -> None:  # scale.csv holds every row so far: a run of hours cut short keeps them
        from nearfix_lib.core.io import write_text

        rows.append({"n_cases": n, **row})
        write_text(out / "scale.csv", pd.DataFrame(rows).reindex(columns=SCALE_COLUMNS).to_csv(index=False))

    for n in sorted(set(args.sizes)):
        run_dir = out / "runs" / f"n{n}"
        overrides = run_overrides(out / "data", n, run_dir, args.device, args.overrides)
        params = write_params(out / "params" / f"n{n}.yaml", args.params, overrides)
        run_stages(run_dir, out / "params" / f"n{n}.yaml", out / "logs", args.timeout_s, again,
                   on_row=lambda row, n=n: keep(n, row))
    table = pd.DataFrame(rows).reindex(columns=SCALE_COLUMNS)
    table["order"] = table["stage"].map(STAGES.index)
    table = table.sort_values(["n_cases", "order"], kind="stable").drop(columns="order").reset_index(drop=True)
    growth = slopes(table)
    note = (f"Measured again with this code version, on the run folders of the earlier run: {', '.join(again)}; "
            "the other rows are that run's.\n\n") if again else ""
    _write(out, "scale", table, scale_page(table, growth, _conditions(params, args.shape, args.spacing) + note), argv)
    print_growth(growth)
    return table


def realsize(args: argparse.Namespace, argv: list[str]) -> pd.DataFrame:
    """Every stage on one case of ``args.shape`` voxels."""
    import pandas as pd

    out = Path(args.out).resolve()
    make_data(out / "data", 1, args.shape, args.spacing)
    run_dir = out / "run"
    params = write_params(out / "params.yaml", args.params,
                          run_overrides(out / "data", 1, run_dir, args.device, args.overrides))
    again = [stage for stage in STAGES if stage in args.again]  # in pipeline order
    stages = [stage for stage in STAGES if stage in args.stages]
    rows = run_stages(run_dir, out / "params.yaml", out / "logs", args.timeout_s, again, stages=stages)
    table = pd.DataFrame(rows).reindex(columns=REALSIZE_COLUMNS)
    note = ""
    if again:  # the other stages' rows as the earlier run measured them
        earlier = pd.read_csv(out / "realsize.csv").set_index("stage").reindex(columns=REALSIZE_COLUMNS[1:])
        earlier.loc[again] = table.set_index("stage").loc[again]
        table = earlier.reindex(list(STAGES)).reset_index()[REALSIZE_COLUMNS]
        note = (f"Measured again with this code version, on the run folder of the earlier run: {', '.join(again)}; "
                "the other rows are that run's.\n\n")
    text = (_conditions(params, args.shape, args.spacing) + "\n" + note
            + table.to_markdown(index=False, floatfmt=".1f") + "\n")
    _write(out, "realsize", table, text, argv)
    return table


RATIO_COLUMNS = ["stage", "before_s", "after_s", "ratio", "before_peak_rss_mb", "after_peak_rss_mb", "status"]


def ratio(args: argparse.Namespace, argv: list[str]) -> pd.DataFrame:
    """Stages measured again, before and after a change, in one script on one machine: each finished
    run folder (``--before-run``, made by the code of ``--before-code``; ``--after-run``, by this
    checkout) is copied, the stages' folders are removed from the copy and the stages run again
    in a fresh process each, before and after in turn, with the code that made the run."""
    import pandas as pd

    out = Path(args.out).resolve()
    sides = {"before": (Path(args.before_code).resolve(), Path(args.before_run).resolve()),
             "after": (PROJECT, Path(args.after_run).resolve())}
    runs = {}
    for side, (_, source) in sides.items():
        runs[side] = out / side / "run"
        if runs[side].exists():
            shutil.rmtree(runs[side])
        shutil.copytree(source, runs[side])
        clear_stages(runs[side], args.stages)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    for stage in args.stages:
        measured = {}
        for side, (code, _) in sides.items():
            print(f"{side}: {stage} ...", flush=True)
            measured[side] = measure_stage(stage, runs[side], runs[side] / "params.yaml",
                                           out / "logs" / f"{side}_{stage}.log", args.timeout_s, project=code)
            print(f"  {measured[side]['status']}: {measured[side]['wall_s']:.1f} s", flush=True)
        b, a = measured["before"], measured["after"]
        status = "ok" if b["status"] == a["status"] == "ok" else f"before {b['status']}; after {a['status']}"
        rows.append({"stage": stage, "before_s": b["wall_s"], "after_s": a["wall_s"],
                     "ratio": a["wall_s"] / b["wall_s"], "before_peak_rss_mb": b["peak_rss_mb"],
                     "after_peak_rss_mb": a["peak_rss_mb"], "status": status})
    table = pd.DataFrame(rows, columns=RATIO_COLUMNS)
    text = (f"Wall time of each stage run again on a copy of a finished run, before (`{args.before_code}`, "
            f"on its own run) and after (this checkout), in turn, each stage in a fresh process; ratio = "
            "after / before.\n\n" + table.to_markdown(index=False, floatfmt=".2f") + "\n")
    _write(out, "ratio", table, text, argv)
    return table


# -- command line ----------------------------------------------------------------------------------

def _child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale _stage", description="one stage, measured")
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--params", required=True)
    args = ap.parse_args(argv)
    return run_child(args.stage, args.run_dir, args.params)


def _parser() -> argparse.ArgumentParser:
    from nearfix_lib.core.config import mapping_parameter

    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    # scale: the phantom's own geometry (params/default.yaml), 12.5 MB per case in memory
    defaults = {"scale": ([160, 160, 128], [0.875, 0.825, 0.9375], "outputs/scale"),
                "realsize": ([512, 512, 275], [0.35, 0.35, 0.5], "outputs/realsize")}
    for name, (shape, spacing, out) in defaults.items():
        p = sub.add_parser(name, help=f"every stage on {'N cases' if name == 'scale' else 'one case'} "
                                      f"of {' x '.join(map(str, shape))} voxels")
        if name == "scale":
            p.add_argument("--sizes", type=int, nargs="+", default=[8, 32], help="numbers of cases")
        p.add_argument("--again", nargs="+", choices=STAGES, default=[],
                       help=f"measure only these stages again, on the run folders and {name}.csv in --out")
        if name == "realsize":
            p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                           help="run only these (in pipeline order, each needing the ones before), "
                                "e.g. 'prepare stage1 stage2' for the disk a case costs before stage 3")
        p.add_argument("--shape", type=int, nargs=3, default=shape, help="voxels per case")
        p.add_argument("--spacing", type=float, nargs=3, default=spacing, help="voxel size in mm")
        p.add_argument("--out", default=out)
        p.add_argument("--params", default="params/default.yaml")
        p.add_argument("--overrides", type=lambda v: mapping_parameter(v, "--overrides"), default={},
                       help="dotted keys as YAML/JSON, applied after the short fits, e.g. '{stage1.classes: [LV]}'")
        p.add_argument("--device", default="cpu")
        p.add_argument("--timeout-s", type=float, default=4 * 3600, help="per stage")
    p = sub.add_parser("ratio", help="stages run again, before and after a change, on copies of finished runs")
    p.add_argument("--before-code", required=True, help="a checkout of the code before the change")
    p.add_argument("--before-run", required=True, help="a run folder that code finished (e.g. realsize's run/)")
    p.add_argument("--after-run", required=True, help="a run folder this checkout finished")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=["stage2", "report"])
    p.add_argument("--out", default="outputs/ratio")
    p.add_argument("--timeout-s", type=float, default=4 * 3600, help="per stage")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_stage"]:
        return _child_main(argv[1:])
    args = _parser().parse_args(argv)
    table = {"scale": scale, "realsize": realsize, "ratio": ratio}[args.command](args, argv)
    return 0 if (table["status"].dropna() == "ok").all() else 1  # a stage not run (--stages) is no failure


if __name__ == "__main__":
    sys.exit(main())
