"""The speed benchmark's machinery at a tiny size (its numbers are for docs, not asserted here):
training steps with host and device batches, a fit and four decodes, each in its own process, the
CSV with the rows others read, the page and the README table generated from the CSV."""

import pandas as pd
import pytest

from benchmarks.speed import README_BEGIN, README_END, main, readme_table, with_readme_table

REQUIRED = {("decode_1mm", "dense", "s"), ("decode_1mm", "coarse_to_fine", "s"),
            ("decode_realsize", "dense", "s"), ("decode_realsize", "coarse_to_fine", "s"),
            ("decode_1mm_identical", "coarse_to_fine", "fraction"),
            ("decode_realsize_identical", "coarse_to_fine", "fraction"),
            ("stage3_host_ms_per_step", "cpu_batches", "ms"), ("stage3_host_ms_per_step", "device_batches", "ms"),
            ("stage3_ms_per_step", "device_batches", "ms"), ("stage1_points_per_s", "cpu_batches", "points/s")}


@pytest.fixture(scope="module")
def tiny_speed(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    readme = out / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    code = main(["--out", str(out), "--params", "params/test.yaml", "--step-params", "params/test.yaml",
                 "--epochs", "5",
                 "--realsize-spacing", "1.5", "1.5", "2.0", "--readme", str(readme),
                 "--steps", "2", "--step-cases", "2", "--skip-compile"])
    return out, code, pd.read_csv(out / "speed.csv"), readme.read_text()


def test_the_csv_holds_the_rows_others_read(tiny_speed):
    out, code, table, _ = tiny_speed
    assert code == 0
    assert list(table.columns) == ["what", "variant", "value", "unit"]
    assert REQUIRED <= set(zip(table["what"], table["variant"], table["unit"]))
    value = table.set_index(["what", "variant"])["value"]
    for name in ("decode_1mm", "decode_realsize"):
        assert value[(name, "dense")] > 0 and value[(name, "coarse_to_fine")] > 0
        assert 0.99 <= value[(f"{name}_identical", "coarse_to_fine")] <= 1.0
        assert 0 < value[(f"{name}_evaluated", "coarse_to_fine")] <= 1.5  # clamped lattice points may repeat
        spent = table[table["what"] == f"{name}_evaluated_at"]  # where the points went, per lattice spacing
        assert len(spent) >= 2 and spent["variant"].str.startswith("spacing_").all()
        assert spent["value"].sum() == pytest.approx(value[(f"{name}_evaluated", "coarse_to_fine")])
        assert 0 <= value[(f"{name}_label_changes", "dense")] < 1  # a 5-step fit may decode no class yet
    # the real-size grid is the same box at a finer voxel size: more voxels
    assert value[("decode_realsize_voxels", "dense")] > value[("decode_1mm_voxels", "dense")]
    for stage in ("stage3", "stage1"):  # a step takes longer than building its batch
        assert 0 < value[(f"{stage}_host_ms_per_step", "cpu_batches")] < value[(f"{stage}_ms_per_step", "cpu_batches")]
    # the host path draws in numpy; on the device every draw and look-up is a torch operation, but a
    # few per case, not per class: no more than 300 per case of the step's 2
    assert value[("stage3_batch_ops", "cpu_batches")] < value[("stage3_batch_ops", "device_batches")] <= 2 * 300
    assert value[("stage1_batch_ops", "cpu_batches")] < value[("stage1_batch_ops", "device_batches")]  # as asked
    assert not any("compile" in v for v in table["variant"])
    page = (out / "speed.md").read_text()
    assert "cpu_batches / device_batches" in page and "dense / coarse_to_fine" in page
    assert "`test.yaml`" in page and "benchmarks.speed --out" in page


def test_the_readme_table_is_rewritten_between_its_markers_only(tiny_speed):
    _, _, table, readme = tiny_speed
    assert readme.startswith("# x\n\nbefore\n") and readme.endswith(f"{README_END}\nafter\n")
    assert "old table" not in readme and readme_table(table) in readme
    with pytest.raises(ValueError, match="markers"):
        with_readme_table("no markers here", table)


def test_a_partial_rerun_keeps_the_other_parts_rows_and_says_whose_they_are(tiny_speed, tmp_path):
    out, _, table, _ = tiny_speed
    again = tmp_path / "again"
    code = main(["--out", str(again), "--params", "params/test.yaml", "--step-params", "params/test.yaml",
                 "--parts", "steps", "--steps", "1", "--step-cases", "2", "--skip-compile", "--keep", str(out)])
    assert code == 0
    rerun = pd.read_csv(again / "speed.csv")
    decode = table[~table["what"].str.startswith(("stage1_", "stage3_"))]
    assert rerun[rerun["what"].str.startswith("decode")].reset_index(drop=True).equals(
        decode[decode["what"].str.startswith("decode")].reset_index(drop=True))
    assert set(rerun["what"]) == set(table["what"])  # every row: the steps measured again, the decodes kept
    page = (again / "speed.md").read_text()
    assert page.count("Decodes:") == 1 and "kept from an earlier run (device cpu" in page
    assert "--parts steps" in page.split("kept from an earlier run")[1]  # this run's own command comes last
