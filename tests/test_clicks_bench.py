"""The click benchmark: the simulated user's clicks, and one tiny run writing the CSVs others read."""

import numpy as np
import pandas as pd
import pytest
from conftest import lps_affine

from benchmarks.clicks import README_BEGIN, README_END, cut_distal, main, next_click
from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.geometry import apply_affine

LAA = CARDIAC["LAA"].index


def test_the_simulated_user_clicks_the_centre_of_the_largest_error():
    affine = lps_affine()
    truth = np.zeros((30, 26, 20), np.uint8)
    truth[5:15, 5:15, 5:15] = LAA
    shown = truth.copy()
    shown[5:15, 5:15, 5:9] = 0  # missed: 400 voxels
    shown[20:24, 20:23, 10:13] = LAA  # extra: 36 voxels
    everywhere = (slice(None),) * 3
    click = next_click(shown, truth, LAA, affine, everywhere)
    voxel = np.rint(apply_affine(np.linalg.inv(affine), np.asarray([click.position]))[0]).astype(int)
    assert click.positive and click.label == LAA and shown[tuple(voxel)] == 0 and truth[tuple(voxel)] == LAA
    assert 8 <= voxel[0] <= 11 and 8 <= voxel[1] <= 11  # the middle of the missed slab, not its rim
    shown[5:15, 5:15, 5:9] = LAA  # only the extra blob is left: a negative click on it
    click = next_click(shown, truth, LAA, affine, everywhere)
    voxel = np.rint(apply_affine(np.linalg.inv(affine), np.asarray([click.position]))[0]).astype(int)
    assert not click.positive and shown[tuple(voxel)] == LAA and truth[tuple(voxel)] == 0
    assert next_click(truth, truth, LAA, affine, everywhere) is None  # nothing wrong: no click


def test_cut_distal_removes_the_far_part_of_a_class():
    labels = np.zeros((30, 10, 10), np.uint8)
    labels[0:5, 3:7, 3:7] = CARDIAC["LA"].index
    labels[5:25, 4:6, 4:6] = LAA
    cut = cut_distal(labels, "LAA", "LA", 0.5)
    assert (cut == LAA).sum() == pytest.approx((labels == LAA).sum() / 2, abs=4)
    assert (cut[5:14] == LAA).sum() == (labels[5:14] == LAA).sum() and not (cut[16:25] == LAA).any()  # near kept


def test_a_tiny_click_benchmark_writes_its_tables(tmp_path):
    out = tmp_path / "clicks"
    # few evaluations per click and per save: the suite's time (the machinery is what is tested)
    fast = "{steps: 2, save_steps: 2, save_prior_points: 2000}"
    assert main(["--out", str(out), "--params", "params/test.yaml", "--cases", "1", "--epochs", "3", "--clicks", "1",
                 "--sessions", "2", "--threads", "1", "--refine", fast]) == 0
    clicks = pd.read_csv(out / "clicks.csv")
    assert list(clicks.columns[:10]) == ["case", "class", "kind", "click", "positive", "dice", "hd95", "seconds",
                                         "steps", "other_min_delta"]
    assert set(clicks["kind"]) == {"injected", "held_out"} and (clicks["click"] == 0).sum() == 2
    final = pd.read_csv(out / "final.csv")
    assert set(final["class"]) == set(CARDIAC.keys) and (out / "clicks.png").stat().st_size > 1000
    assert "latency from click to updated map" in (out / "clicks.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{README_BEGIN}\nold\n{README_END}\nb\n")
    assert main(["--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "\nold\n" not in text and "| case | class | error |" in text and text.endswith(f"{README_END}\nb\n")
