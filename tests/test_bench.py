"""The benchmark code runs (its numbers are for the README, not asserted as timings here)."""

import pandas as pd

from benchmarks.bench import Stage1BenchConfig, _run_isolated, dense_memory_estimate_mb, ratios


def test_dense_memory_grows_with_the_cube_of_the_resolution():
    assert dense_memory_estimate_mb(128) == 8 * dense_memory_estimate_mb(64)
    assert dense_memory_estimate_mb(128) > 12 * 1024  # why the dense 128^3 reference cannot run here


def test_one_configuration_measures_speed_memory_and_quality():
    # each configuration in its own process, as the benchmark runs them: the memory measured is the
    # growth of that process's peak, which a test process that already peaked higher would hide
    rows = [_run_isolated(Stage1BenchConfig(name, 12, 2, points, per_step, 0.5, "cpu", phantom_shape=(40, 36, 30)),
                          timeout_s=120)
            for name, points, per_step in (("sparse", 256, 2), ("dense", 0, 1))]
    assert all(r["status"] == "ok" for r in rows), rows
    for r in rows:
        # at 12^3 the training may stay under the peak the phantom generation already reached
        assert r["steps"] >= 1 and r["points_per_s"] > 0 and r["peak_mb"] >= 0
        assert 0.0 <= r["dice_vs_truth"] <= 1.0 and 0.0 < r["noisy_dice_vs_truth"] <= 1.0
    table = ratios(pd.DataFrame(rows))
    assert list(table["resolution"]) == [12] and table["points_per_s sparse/dense"].iloc[0] > 0


def test_stage2_benchmark_times_fusion_against_the_priority_pass():
    from benchmarks.bench import bench_stage2

    table = bench_stage2([40], n_cases=1, repeats=1)
    row = table.iloc[0]
    assert row["s_fusion_rules"] > 0 and row["s_fusion_only"] > 0
    assert row["rules/fusion_only"] == row["s_fusion_rules"] / row["s_fusion_only"]
    assert 0 <= row["classes_at_expected"] <= 10


def test_stage3_benchmark_times_a_finer_grid_against_the_default_model():
    from benchmarks.bench import bench_stage3, stage3_configs

    configs = stage3_configs(2, (44, 40, 36), positives=32, negatives=64, steps=2, device="cpu")
    assert [c.grid_sizes[-1] for c in configs] == [32, 64]
    table = bench_stage3(configs, timeout_s=300)
    assert (table["status"] == "ok").all(), table["status"].tolist()
    assert (table["s_per_step"] > 0).all() and (table["s_decode_per_case"] > 0).all()
    assert table["s_per_step /ref"].iloc[0] == 1.0
    assert table["s_per_step /ref"].iloc[1] == table["s_per_step"].iloc[1] / table["s_per_step"].iloc[0]
    assert (table["box_voxels"] < 44 * 40 * 36).all()  # decoded on the heart box, not the whole image


def test_a_benchmark_page_is_rendered_from_its_csv_and_stamped(tmp_path):
    from benchmarks.bench import main

    assert main(["stage2", "--shapes", "40", "--cases", "1", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "stage2.csv")
    page = (tmp_path / "stage2.md").read_text()
    assert page.startswith("# Benchmark: stage2") and "python -m benchmarks.bench stage2 --shapes 40" in page
    assert "| code version | `0." in page
    assert f"{table['s_fusion_rules'].iloc[0]:.3g}" in page
