"""The notebook runner: every job runs once, parallel jobs get their share of the cores, failures surface."""

import os

import pytest

from nearfix_lib.stages import pipeline


def test_parallel_jobs_each_run_once_with_limited_threads(monkeypatch, tmp_path):
    seen = []

    def fake_execute(notebook, out, parameters):
        seen.append((notebook, out.name, parameters["cls"], os.environ.get("OMP_NUM_THREADS")))
        return 0.0

    monkeypatch.setattr(pipeline, "execute", fake_execute)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    jobs = [(f"02_stage1_{k}", {"cls": i}) for i, k in enumerate(["Myo", "LA", "LV"], start=1)]
    pipeline.run_jobs("02_stage1", jobs, {"run_dir": "x"}, tmp_path, parallel=2)
    assert sorted(s[2] for s in seen) == [1, 2, 3]
    assert {s[3] for s in seen} == {"2"}  # 4 cores / 2 jobs
    assert "OMP_NUM_THREADS" not in os.environ  # restored after the stage


def test_a_failing_job_fails_the_stage(monkeypatch, tmp_path):
    def fake_execute(notebook, out, parameters):
        if parameters["cls"] == 2:
            raise RuntimeError("notebook failed")
        return 0.0

    monkeypatch.setattr(pipeline, "execute", fake_execute)
    with pytest.raises(RuntimeError, match="notebook failed"):
        pipeline.run_jobs("02_stage1", [("a", {"cls": 1}), ("b", {"cls": 2})], {}, tmp_path, parallel=2)
