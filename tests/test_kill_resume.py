"""A fit killed with SIGKILL and run again ends bit for bit where an uninterrupted fit ends.

The stage's real fit runs in a child process (``tests/fit_child.py``): stage 1 (``fit_class``
for Cor) and stage 3 (``fit_unified`` with hard-example mining and distillation). One child
is killed once its first ``last.pt`` is on disk, part-way through the next epoch, and the same
command is run again; another child runs the same command undisturbed in its own run folder.
Their checkpoints must be equal — weights, latents, optimiser, scheduler, task (sampler RNG,
mined voxels), RNG states, epoch, step, best score and history — except wall-clock columns
and the run folder's own path. Both children use one thread, so this holds on any machine.
"""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROJECT
from fit_child import EPOCHS, TRAIN, checkpoint_dir
from test_train_infer import make

from nearfix_lib.field.train import fit, load_checkpoint

CHILD = Path(__file__).resolve().parent / "fit_child.py"
WALL_CLOCK = {"seconds"}  # history columns that measure time, not the fit
EVENTS_LOG = "events.log"  # the documented name (train.fit)
RESUMED = re.compile(r"^resumed from (.+) at epoch (\d+)$")


# -- the message ------------------------------------------------------------------------------

def test_a_resumed_fit_says_so_and_a_fresh_one_does_not(tmp_path, capsys):
    model, task, params = make(tmp_path / "cases")  # checkpoint_interval 1
    fit(model, task, params.train, tmp_path, progress=False, epochs=1)
    assert "resumed" not in capsys.readouterr().out
    assert not (tmp_path / EVENTS_LOG).exists()
    model, task, _ = make(tmp_path / "cases")
    result = fit(model, task, params.train, tmp_path, progress=False, epochs=2)
    line = f"resumed from {tmp_path / 'last.pt'} at epoch 1"
    assert result.resumed_from == 1
    assert [out for out in capsys.readouterr().out.splitlines() if "resumed" in out] == [line]
    events = (tmp_path / EVENTS_LOG).read_text().splitlines()
    assert len(events) == 1
    stamp, text = events[0].split(" ", 1)
    assert text == line and datetime.fromisoformat(stamp).tzinfo is not None
    model, task, _ = make(tmp_path / "cases")  # resume=False starts over, silently
    fit(model, task, params.train, tmp_path, progress=False, epochs=1, resume=False)
    assert "resumed" not in capsys.readouterr().out
    assert len((tmp_path / EVENTS_LOG).read_text().splitlines()) == 1
    model, task, _ = make(tmp_path / "cases")
    fit(model, task, params.train, tmp_path, progress=False, epochs=2)
    assert capsys.readouterr().out.count("resumed from") == 1
    events = (tmp_path / EVENTS_LOG).read_text().splitlines()  # appended to, never rewritten
    assert len(events) == 2 and events[0].endswith(line) and events[1].endswith(line)


# -- kill and resume ----------------------------------------------------------------------------

def assert_identical(a, b, where: str = "checkpoint") -> None:
    """Equal bit for bit, walking dicts, lists and tuples: tensors by ``torch.equal`` (and dtype),
    arrays by dtype and content, floats exactly (NaN equals NaN), everything else by ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"{where}: arrays differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__} of {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b))), f"{where}: {a!r} != {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def comparable(ckpt: dict) -> dict:
    """A checkpoint without what may differ between two equal fits: wall-clock columns of the
    history and the run folder's path in the recorded params."""
    out = dict(ckpt)
    out["history"] = [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in ckpt["history"]]
    extra = dict(ckpt["extra"])
    if "params" in extra:
        run = {k: v for k, v in extra["params"]["run"].items() if k != "run_dir"}
        extra["params"] = {**extra["params"], "run": run}
    out["extra"] = extra
    return out


def log_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in csv.DictReader(f)]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def command(stage: str, run_dir: Path) -> list[str]:
    return [sys.executable, str(CHILD), stage, str(run_dir)]


def start(stage: str, run_dir: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:  # the child keeps its own handle
        return subprocess.Popen(command(stage, run_dir), cwd=PROJECT, env=child_env(), stdout=f,
                                stderr=subprocess.STDOUT)


def kill_after_first_checkpoint(proc: subprocess.Popen, last: Path, log: Path, timeout: float = 180.0) -> None:
    """SIGKILL ``proc`` a little after ``last`` appears (mid-epoch, past the checkpoint)."""
    deadline = time.monotonic() + timeout
    while not last.is_file():  # written atomically: once it exists it is whole
        if proc.poll() is not None:
            pytest.fail(f"the fit ended (rc {proc.returncode}) before its first checkpoint:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {last} after {timeout:.0f} s:\n{log.read_text()}")
        time.sleep(0.01)
    time.sleep(0.15)  # into the next epoch: its steps (and maybe a best.pt) are lost and redone
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_a_killed_fit_resumes_to_the_same_checkpoint_bit_for_bit(tmp_path, stage):
    tmp_path = tmp_path.resolve()
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = start(stage, straight_dir, tmp_path / "straight.out")  # alongside: two cores, one thread each
    victim = start(stage, killed_dir, tmp_path / "killed.out")
    ckpt = checkpoint_dir(stage, killed_dir)
    kill_after_first_checkpoint(victim, ckpt / "last.pt", tmp_path / "killed.out")
    at_kill = load_checkpoint(ckpt / "last.pt")["epoch"]
    assert 0 < at_kill < EPOCHS and at_kill % TRAIN["checkpoint_interval"] == 0

    rerun = subprocess.run(command(stage, killed_dir), cwd=PROJECT, env=child_env(), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    said = [m for m in map(RESUMED.match, rerun.stdout.splitlines()) if m]
    assert len(said) == 1, rerun.stdout
    assert Path(said[0][1]) == ckpt / "last.pt" and int(said[0][2]) == at_kill > 0
    assert f"done: epochs {at_kill} to {EPOCHS}" in rerun.stdout
    assert (ckpt / EVENTS_LOG).read_text().count("resumed from") == 1

    assert straight.wait(timeout=300) == 0, (tmp_path / "straight.out").read_text()
    straight_out = (tmp_path / "straight.out").read_text()
    assert "resumed from" not in straight_out and f"done: epochs 0 to {EPOCHS}" in straight_out
    reference = checkpoint_dir(stage, straight_dir)
    assert not (reference / EVENTS_LOG).exists()
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(reference / name), load_checkpoint(ckpt / name)
        assert_identical(comparable(a), comparable(b), f"{stage} {name}")
    final = load_checkpoint(ckpt / "last.pt")
    assert final["epoch"] == EPOCHS and len(final["history"]) == EPOCHS
    if stage == "stage3":  # mining ran: the mined voxels (on disk, beside the checkpoints) must match too
        passes = [sorted((d / "mined").glob("pass_*")) for d in (reference, ckpt)]
        last = f"pass_{final['task']['sampler']['mined_pass']}"
        assert [p.name for p in passes[0]] == [p.name for p in passes[1]] == [last]
        files = sorted(p.name for p in passes[0][0].iterdir())
        assert len(files) > 1 and files == sorted(p.name for p in passes[1][0].iterdir())
        assert all(np.array_equal(np.load(passes[0][0] / f), np.load(passes[1][0] / f)) for f in files)
    assert log_rows(reference / "log.csv") == log_rows(ckpt / "log.csv")


def test_the_comparison_sees_a_one_ulp_difference():
    a = {"model": {"w": torch.tensor([1.0, 2.0])}, "history": [{"loss": 0.5}], "rng": (np.arange(3), 1)}
    b = {"model": {"w": torch.tensor([1.0, 2.0])}, "history": [{"loss": 0.5}], "rng": (np.arange(3), 1)}
    assert_identical(a, b)
    b["model"]["w"][1] = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_identical(a, b)
    with pytest.raises(AssertionError):
        assert_identical(a["history"], [{"loss": math.nextafter(0.5, 1.0)}])
    with pytest.raises(AssertionError, match="arrays differ"):
        assert_identical(a["rng"], (np.arange(1, 4), 1))
