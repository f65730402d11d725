"""The benchmark code runs (its numbers are for the README, not asserted as timings here)."""

import pandas as pd

from nearfix_lib.bench import Stage1BenchConfig, _run_isolated, dense_memory_estimate_mb, ratios


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
    from nearfix_lib.bench import bench_stage2

    table = bench_stage2([40], n_cases=1, repeats=1)
    row = table.iloc[0]
    assert row["s_fusion_rules"] > 0 and row["s_fusion_only"] > 0
    assert row["rules/fusion_only"] == row["s_fusion_rules"] / row["s_fusion_only"]
    assert 0 <= row["classes_at_expected"] <= 10
