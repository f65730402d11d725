"""The scale benchmark's machinery at a tiny size (its numbers are for docs, not asserted here):
one process per stage and N, the CSV and page, the growth per case and its extrapolation."""

import math

import pandas as pd
import pytest

from benchmarks.scale import STAGES, folder_mb, main, measure_stage, slopes, write_params

# the tests' tiny run; stage 1 on one class, with enough steps that its masks are not empty
# (stage 3 learns from what stage 1 and 2 produced, and refuses a run without any L^ref)
TINY = ["--shape", "40", "36", "30", "--spacing", "3.5", "3.5", "4.0", "--params", "params/test.yaml", "--overrides",
        "{stage1.classes: [LV], stage1.train.epochs: 20, stage1.train.eval_interval: 20, "
        "stage1.train.checkpoint_interval: 20}"]


@pytest.fixture(scope="module")
def tiny_scale(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    code = main(["scale", "--sizes", "1", "2", "--out", str(out), *TINY])
    return out, code, pd.read_csv(out / "scale.csv")


def test_every_stage_and_n_is_one_row_measured_in_its_own_process(tiny_scale):
    out, code, table = tiny_scale
    assert list(table.columns[:4]) == ["stage", "n_cases", "peak_rss_mb", "wall_s"]
    assert code == 0 and (table["status"] == "ok").all(), table["status"].tolist()
    assert sorted(zip(table["stage"], table["n_cases"])) == sorted((s, n) for s in STAGES for n in (1, 2))
    assert (table["peak_rss_mb"] > 0).all() and (table["wall_s"] > 0).all()
    assert (table["peak_rss_mb"] >= table["base_rss_mb"]).all()
    # each child's own memory, not the parent's: prepare imports no torch, so it peaks below the
    # RSS that stage 1's imports alone take, although this test process holds torch and more
    prepare, stage1 = (table[table["stage"] == s].set_index("n_cases") for s in ("prepare", "stage1"))
    assert (prepare["peak_rss_mb"] < stage1["base_rss_mb"]).all()
    stage1 = table[table["stage"] == "stage1"].set_index("n_cases")
    assert (stage1["disk_mb"] > stage1["case_disk_mb"]).all()  # the checkpoints belong to no case
    assert 1.5 < stage1.loc[2, "case_disk_mb"] / stage1.loc[1, "case_disk_mb"] < 2.5
    assert (out / "logs" / "n2_stage3.log").is_file() and (out / "runs" / "n2" / "stage3" / "unified.pt").is_file()


def test_the_page_is_rendered_from_the_csv_and_stamped(tiny_scale):
    out, _, table = tiny_scale
    page = (out / "scale.md").read_text()
    assert page.startswith("# Benchmark: scale") and "python -m benchmarks.scale scale --sizes 1 2" in page
    assert "| code version | `0." in page and "stage 1 on LV only" in page
    assert f"{table['peak_rss_mb'].iloc[0]:.1f}" in page and "## Growth per case, extrapolated to 1,000" in page


def test_ratio_runs_the_stages_again_on_copies_before_and_after(tiny_scale, tmp_path):
    """Both sides here are this checkout on the N = 2 run: the machinery, not a speed-up."""
    out, _, _ = tiny_scale
    run = out / "runs" / "n2"
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    code = main(["ratio", "--before-code", ".", "--before-run", str(run), "--after-run", str(run),
                 "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "ratio.csv")
    assert code == 0 and list(table["stage"]) == ["stage2", "report"] and (table["status"] == "ok").all()
    assert list(table.columns[:4]) == ["stage", "before_s", "after_s", "ratio"]
    assert ((table["before_s"] > 0) & (table["after_s"] > 0)).all()
    assert (table["ratio"] - table["after_s"] / table["before_s"]).abs().max() < 1e-12
    for side in ("before", "after"):  # the stages ran again in the copies ...
        assert (tmp_path / side / "run" / "stage2" / "scores.csv").is_file()
        assert (tmp_path / side / "run" / "report" / "scores.csv").is_file()
    assert before == {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}  # ... not here
    assert (tmp_path / "ratio.md").read_text().startswith("# Benchmark: ratio")


def test_realsize_measures_named_stages_again_and_keeps_the_other_rows(tmp_path):
    """The first stages only (``--stages``: what the suite's time allows), then one of them again."""
    tiny = ["--shape", "40", "36", "30", "--spacing", "3.5", "3.5", "4.0", "--params", "params/test.yaml",
            "--overrides", "{stage1.classes: [LV], stage1.train.epochs: 20, stage1.train.eval_interval: 20}"]
    assert main(["realsize", "--out", str(tmp_path), "--stages", "prepare", "stage1", "stage2", *tiny]) == 0
    first = pd.read_csv(tmp_path / "realsize.csv").set_index("stage")
    assert list(first.index) == ["prepare", "stage1", "stage2"] and (first["case_disk_mb"] > 0).all()
    stamp = (tmp_path / "run" / "stage1" / "LV" / "ckpt" / "last.pt").stat().st_mtime_ns
    assert main(["realsize", "--out", str(tmp_path), "--again", "stage2", *tiny]) == 0
    again = pd.read_csv(tmp_path / "realsize.csv").set_index("stage")
    assert list(again.index) == list(STAGES) and (again.loc[["prepare", "stage1", "stage2"], "status"] == "ok").all()
    assert again.loc[["prepare", "stage1"]].equals(first.loc[["prepare", "stage1"]])
    assert again.loc["stage2", "wall_s"] != first.loc["stage2", "wall_s"]
    assert again.loc[["stage3", "report"], "status"].isna().all()  # never run here
    assert (tmp_path / "run" / "stage1" / "LV" / "ckpt" / "last.pt").stat().st_mtime_ns == stamp  # kept
    assert "Measured again with this code version" in (tmp_path / "realsize.md").read_text()


def test_growth_per_case_and_extrapolation_to_1000_cases():
    rows = pd.DataFrame([("stage1", 8, 500.0, 10.0, "ok"), ("stage1", 32, 980.0, 34.0, "ok"),
                         ("stage3", 32, 2000.0, 5.0, "ok"), ("stage3", 8, 800.0, 1.0, "ok"),
                         ("report", 8, 300.0, 2.0, "ok"), ("report", 32, 310.0, 9.0, "failed: timed out")],
                        columns=["stage", "n_cases", "peak_rss_mb", "wall_s", "status"])
    growth = slopes(rows).set_index("stage")
    assert list(growth.index) == ["stage1", "stage3", "report"]
    assert growth.loc["stage1", "mb_per_case"] == 20.0 and growth.loc["stage3", "mb_per_case"] == 50.0
    assert growth.loc["stage1", "peak_rss_mb_at_1000"] == 980.0 + 20.0 * 968
    assert growth.loc["stage3", "peak_rss_mb_at_1000"] == 2000.0 + 50.0 * 968
    assert growth.loc["stage1", "s_per_case"] == 1.0 and growth.loc["stage1", "wall_s_at_1000"] == 34.0 + 968
    assert (growth.loc["report", ["n_small", "n_large"]] == 8).all()  # the failed N is left out
    assert math.isnan(growth.loc["report", "mb_per_case"]) and math.isnan(growth.loc["report", "peak_rss_mb_at_1000"])


def test_a_failing_stage_is_a_row_with_its_status(tmp_path):
    params = tmp_path / "params.yaml"
    write_params(params, "params/test.yaml", {"data.data_root": str(tmp_path / "absent"), "run.device": "cpu"})
    row = measure_stage("prepare", tmp_path / "run", params, tmp_path / "prepare.log", timeout_s=120)
    assert row["status"].startswith("failed: InputError") and "does not exist" in row["status"]
    assert row["peak_rss_mb"] > 0 and row["disk_mb"] == 0.0


def test_scale_csv_holds_every_row_measured_so_far(tmp_path, monkeypatch):
    """A run of hours cut short keeps what it measured: scale.csv is rewritten after each stage."""
    import benchmarks.scale as bench

    seen = []

    def fake_stage(stage, run_dir, params_file, log, timeout_s, project=bench.PROJECT):
        csv = tmp_path / "scale.csv"
        seen.append(len(pd.read_csv(csv)) if csv.is_file() else 0)
        return {"stage": stage, "peak_rss_mb": 1.0, "wall_s": 1.0, "base_rss_mb": 1.0, "status": "ok", "disk_mb": 0.0}

    monkeypatch.setattr(bench, "measure_stage", fake_stage)
    assert main(["scale", "--sizes", "1", "2", "--out", str(tmp_path), *TINY[:8]]) == 0
    assert seen == list(range(2 * len(STAGES)))
    assert len(pd.read_csv(tmp_path / "scale.csv")) == 2 * len(STAGES)


def test_scale_measures_named_stages_again_and_keeps_the_other_rows(tiny_scale):
    """Last in this file: it re-measures the fixture's report rows."""
    out, _, first = tiny_scale
    assert main(["scale", "--sizes", "1", "2", "--out", str(out), "--again", "report", *TINY]) == 0
    again = pd.read_csv(out / "scale.csv")
    assert sorted(zip(again["stage"], again["n_cases"])) == sorted((s, n) for s in STAGES for n in (1, 2))
    key = ["stage", "n_cases"]
    others = first[first["stage"] != "report"].set_index(key).sort_index()
    assert again[again["stage"] != "report"].set_index(key).sort_index().equals(others)
    report = again[again["stage"] == "report"].set_index("n_cases")["wall_s"]
    assert (report != first[first["stage"] == "report"].set_index("n_cases")["wall_s"]).all()
    assert "Measured again with this code version" in (out / "scale.md").read_text()


def test_case_disk_counts_the_files_a_case_id_names(tmp_path):
    files = {"stage1/LV/cases/7/labels.npy": 3000, "stage1/LV/prob/7.npy": 2000, "stage1/LV/masks/7.nii.gz": 500,
             "stage1/LV/prob/17.npy": 4000, "stage1/LV/ckpt/last.pt": 9000, "stage7/scores.csv": 100}
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    assert folder_mb(tmp_path, {"7"})[1] * 2**20 == 5500
    assert folder_mb(tmp_path, {"7", "17"})[1] * 2**20 == 9500
    assert folder_mb(tmp_path / "absent", {"7"}) == (0.0, 0.0)


def test_realsize_runs_only_the_stages_asked_for(tmp_path, monkeypatch):
    import benchmarks.scale as bench

    ran = []

    def fake_stage(stage, run_dir, params_file, log, timeout_s, project=bench.PROJECT):
        ran.append(stage)
        return {"stage": stage, "peak_rss_mb": 1.0, "wall_s": 1.0, "base_rss_mb": 1.0, "status": "ok",
                "disk_mb": 2.0, "case_disk_mb": 1.0}

    monkeypatch.setattr(bench, "measure_stage", fake_stage)
    assert main(["realsize", "--out", str(tmp_path), "--stages", "stage1", "prepare", *TINY[:8]]) == 0
    assert ran == ["prepare", "stage1"]
    assert list(pd.read_csv(tmp_path / "realsize.csv")["stage"]) == ["prepare", "stage1"]
