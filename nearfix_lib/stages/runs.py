"""A run is a folder: resolved params, code version, data, skipped cases and every result.

``start_run`` is the first call of every notebook. It resolves the run folder
(``outputs/<run.name>`` unless ``run.run_dir`` says otherwise), records ``params.yaml`` and the
code version, generates the phantom data set into ``<run>/phantom`` when no data root is given
(so the user's data root is only ever read), discovers the cases and keeps the list of skipped
cases that every stage appends to. Re-running a notebook on the same folder resumes: stages
look for their outputs before recomputing them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from nearfix_lib import __version__
from nearfix_lib.core.classes import load_table
from nearfix_lib.core.config import Params, project_root
from nearfix_lib.core.io import (
    IMAGE_DIR,
    InputError,
    discover_cases,
    remove_stale_temporaries,
    require_data_root,
    return_large_blocks,
    write_text,
)
from nearfix_lib.core.workspace import SKIPPED_CSV, Run, data_root_of, run_directory
from nearfix_lib.phantom.dataset import write_dataset


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is checked."""
    import torch

    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA device is visible")
    torch.device(device)  # raises on a malformed name
    return device


def code_version() -> str:
    """Package version plus the git commit (and '+dirty') when run from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def start_run(params: Params, progress: bool = True) -> Run:
    """Create/reuse the run folder, record params and version, find (or make) the data.

    Reusing a folder resumes the run: it says so, and removes the temporaries that writers
    killed mid-write left behind (see :func:`~nearfix_lib.core.io.remove_stale_temporaries`).
    Raises :class:`InputError` (one line) when the data root is missing or holds no usable case.
    """
    return_large_blocks()  # this process works case after case: no heap that grows with them
    run_dir = run_directory(params)
    if (run_dir / "params.yaml").is_file():
        print(f"resuming the run in {run_dir}")
    root = project_root()
    table = load_table(params.data.classes, params.data.class_keys or None, root)
    data_root = data_root_of(params, run_dir)
    if params.data.data_root:  # before anything is written: a mistyped root leaves no run behind
        require_data_root(data_root)
        readers = params.stage1.ct_readers([k for k in (params.stage1.classes or table.keys) if k in table.keys])
        if readers and not (data_root / IMAGE_DIR).is_dir():
            switches = yaml.safe_dump({key: params.stage1.ct_switches(key) for key in readers}, default_flow_style=True,
                                      sort_keys=False, width=1 << 16).strip()
            raise InputError(data_root, f"no '{IMAGE_DIR}/' folder, but the stage-1 repair of {', '.join(readers)} "
                                        "reads the CT (model.appearance, ct_edge, ct_path): add the images, or for "
                                        f"labels alone set them false (stage1.overrides: {switches})")
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(run_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of interrupted writes: "
              + ", ".join(str(p.relative_to(run_dir)) for p in stale[:5]) + (" …" if len(stale) > 5 else ""))
    write_text(run_dir / "params.yaml", params.to_yaml())
    write_text(run_dir / "version.txt", code_version() + "\n")
    if not params.data.data_root:
        write_dataset(data_root, params.data.phantom, table, progress=progress)
    discovery = discover_cases(data_root)
    run = Run(params, run_dir, table, data_root, discovery.cases)
    run.skipped.extend_problems("discover", discovery.problems)
    for problem in discovery.problems:
        print(f"problem: {problem}")
    if params.data.max_cases:
        run.cases = run.cases[: params.data.max_cases]
    run.write_skipped()
    if not run.cases:
        raise InputError(data_root, f"no usable case: every case was skipped (listed in {run.path(SKIPPED_CSV)})")
    return run
