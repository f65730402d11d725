"""The ``nearfix`` command: each subcommand reaches its module's ``main`` with the rest of the line."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT

from nearfix_lib.core.io import discover_cases
from nearfix_lib.stages import cli


def test_no_command_prints_the_commands(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("phantom", "pipeline", "stage1", "stage3", "view"))


def test_an_unknown_command_is_one_line_and_rc_2(capsys):
    assert cli.main(["stage9"]) == 2
    assert "unknown command 'stage9'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["phantom", "pipeline", "run", "merge", "stage1", "stage3", "view"])
def test_each_command_has_its_modules_options_under_its_own_name(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: nearfix {command}")


def test_phantom_writes_a_data_root(tmp_path):
    assert cli.main(["phantom", str(tmp_path / "data"), "--cases", "1", "--shape", "40", "36", "30"]) == 0
    found = discover_cases(tmp_path / "data")
    assert [c.case_id for c in found.cases] == ["1"] and not found.problems


def test_view_without_a_display_says_so(monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert cli.main(["view", "outputs/none", "1"]) == 2
    assert capsys.readouterr().err.startswith("no display")


@pytest.mark.parametrize("module", ["nearfix_lib.stages.cli", "nearfix_lib.phantom", "nearfix_lib.stages.pipeline",
                                    "nearfix_lib.stages.stage1", "nearfix_lib.stages.stage3", "nearfix_lib.viz.view"])
def test_the_python_m_entry_points_run(module):
    # torchrun and the README start these as modules; the console script is the same code
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=PROJECT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")


def _job_lines(script):
    """The script's lines with backslash continuations joined."""
    return script.read_text().replace("\\\n", " ").splitlines()


@pytest.mark.parametrize("script", sorted((PROJECT / "jobs").glob("*.sh")), ids=lambda p: p.name)
def test_job_scripts_parse_and_start_what_exists(script, capsys):
    """``bash -n`` parses each job script; every ``-m MODULE`` it starts is a module of ours and every
    ``nearfix COMMAND`` a command, and each option it passes them is one their ``--help`` lists."""
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = []
    for line in _job_lines(script):
        if line.lstrip().startswith("#"):
            continue
        module = re.search(r"-m (nearfix_lib[\w.]*)(.*)", line)
        command = re.match(r"\s*nearfix (\w+)(.*)", line)
        if module:
            calls.append((module[1], importlib.import_module(module[1]).main, module[2]))
        elif command:
            assert command[1] in cli.COMMANDS, command[1]
            calls.append((command[1], cli.COMMANDS[command[1]][0], command[2]))
    assert calls, f"{script.name} starts no module or command of ours"
    for name, main, rest in calls:
        with pytest.raises(SystemExit):
            main(["--help"])
        usage = capsys.readouterr().out
        for option in re.findall(r"(?<!\S)(--[\w-]+)", rest):
            assert option in usage, f"{script.name}: {name} has no option {option}"


def test_submit_all_chains_every_step_on_the_one_before(tmp_path):
    """``jobs/submit_all.sh`` against a stand-in ``sbatch`` that records its arguments and answers
    job ids 1, 2, …: every step is submitted once, in pipeline order, waiting on the step before."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\nn=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 1 ))\n'
                                 'echo "$n $*" >> "$SBATCH_LOG"\necho "$n"\n')
    (fake / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = {"PATH": f"{fake}:{Path(sys.executable).parent}:/usr/bin:/bin", "SBATCH_LOG": str(log),
           "PYTHONPATH": str(PROJECT), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", "jobs/submit_all.sh", "params/demo.yaml", str(tmp_path / "run"), "3"],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = [line.split(" ", 1) for line in log.read_text().splitlines()]
    steps = []  # (job id, script and stage, what it waits for)
    for job_id, args in jobs:
        wait = re.search(r"--dependency=(\w+):(\d+)", args)
        script = re.search(r"jobs/(\w+)\.sh ?(\w*)", args)
        array = re.search(r"--array=(\S+)", args)
        steps.append((int(job_id), f"{script[1]} {script[2]}".strip(), array[1] if array else None,
                      (wait[1], int(wait[2])) if wait else None))
    names = [s[1] for s in steps]
    per_case = ["prepare", "repair", "stage2", "decode", "report"]
    assert names == ["slurm_array prepare", "slurm_array prepare", "torchrun_stage1 params",
                     "slurm_array repair", "slurm_array repair", "slurm_array stage2", "slurm_array stage2",
                     "torchrun_stage3 params", "slurm_array decode", "slurm_array decode",
                     "slurm_array report", "slurm_array report"]
    assert steps[0][3] is None and steps[0][2] == "0-2"  # prepare waits for nothing; 3 shards
    assert steps[2][2] == "0-9"  # one stage-1 task per class of demo.yaml
    for (job_id, name, array, _), (_, next_name, next_array, wait) in zip(steps, steps[1:]):
        if name == next_name and array:  # a stage's merge runs when its shards are over, ok or not
            assert next_array is None and wait == ("afterany", job_id)
        else:  # the next step needs this one to have succeeded
            assert wait == ("afterok", job_id), (name, next_name)
    assert all(f"slurm_array {stage}" in names for stage in per_case)
