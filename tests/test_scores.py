"""The one scores table: rows from label maps and masks, the canonical columns, the pivot, the checks."""

import math

import numpy as np
import pandas as pd
import pytest

from nearfix_lib.core import metrics as M
from nearfix_lib.core import scores as S
from nearfix_lib.core.classes import CARDIAC

SPACING = (0.8, 1.1, 1.6)
SHAPE = (30, 26, 22)  # asymmetric on purpose


def two_blobs() -> tuple[np.ndarray, np.ndarray]:
    """A reference map with LV and LA, and a prediction that shifts LV and misses LA."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[5:15, 4:14, 3:12] = CARDIAC["LV"].index
    ref[18:26, 15:22, 10:18] = CARDIAC["LA"].index
    pred = np.zeros(SHAPE, np.uint8)
    pred[6:16, 4:14, 3:12] = CARDIAC["LV"].index
    return pred, ref


def test_label_rows_carry_the_case_report_and_the_keys():
    pred, ref = two_blobs()
    rows = S.score_labels("7", "stage2", "truth", pred, ref, SPACING, CARDIAC, decode_s=0.5)
    report = M.case_report(pred, ref, SPACING, CARDIAC)
    assert [r["class"] for r in rows] == CARDIAC.keys
    for row, (_, rep) in zip(rows, report.iterrows(), strict=True):
        assert (row["case"], row["source"], row["reference"], row["decode_s"]) == ("7", "stage2", "truth", 0.5)
        assert row["dice"] == rep["dice"] and row["n_comp"] == rep["n_comp"]
        assert row["at_expected"] == float(rep["n_comp"] == rep["expected"])
        assert row["comp_error"] == abs(rep["n_comp"] - rep["expected"])
    la = next(r for r in rows if r["class"] == "LA")
    assert la["dice"] == 0.0 and math.isnan(la["hd95"]) and la["n_comp"] == 0 and la["comp_error"] == 1


def test_masks_score_each_class_alone_and_missing_masks_as_empty():
    pred, ref = two_blobs()
    lv = pred == CARDIAC["LV"].index
    overlapping = {"LV": lv, "Myo": lv}  # masks may overlap: no label map could hold both
    rows = {r["class"]: r for r in S.score_masks("1", "stage1", "truth", overlapping, ref, SPACING, CARDIAC)}
    assert list(rows) == CARDIAC.keys
    same = {r["class"]: r for r in S.score_labels("1", "stage1", "truth", pred, ref, SPACING, CARDIAC)}
    for key in ("LV", "LA", "Ao"):
        assert rows[key]["dice"] == same[key]["dice"] and rows[key]["n_vox"] == same[key]["n_vox"]
    assert rows["Myo"]["n_vox"] == lv.sum() and rows["Myo"]["n_vox_ref"] == 0 and rows["Myo"]["dice"] == 0.0


def test_write_and_read_keep_the_canonical_columns(tmp_path):
    pred, ref = two_blobs()
    rows = S.score_labels("001", "noisy", "truth", pred, ref, SPACING, CARDIAC.subset(["LV", "LA"]), extra=1)
    frame = S.write_scores(tmp_path, reversed(rows))
    assert list(frame.columns) == [*S.KEYS, *S.METRICS, "extra"]
    back = S.read_scores(tmp_path)
    assert list(back["case"]) == ["001", "001"]  # ids stay strings
    pd.testing.assert_frame_equal(back, frame.reset_index(drop=True), check_dtype=False)
    assert S.write_scores(tmp_path / "none", []).empty and not (tmp_path / "none").exists()
    assert list(S.read_scores(tmp_path / "none").columns) == [*S.KEYS, *S.METRICS]


def long_table() -> pd.DataFrame:
    rows = []
    for case, shift in (("1", 0.0), ("2", 0.2)):
        for key in ("LV", "LA"):
            for source, dice in (("noisy", 0.5), ("stage2", 0.7)):
                for reference in ("truth", "lref"):
                    rows.append({"case": case, "class": key, "source": source, "reference": reference,
                                 "dice": dice + shift + (0.1 if key == "LA" else 0.0),
                                 "hd95": np.nan if case == "2" else 3.0})
    return S.scores_frame(rows)


def test_pivot_means_over_cases_in_first_seen_order():
    t = long_table()
    p = S.pivot(t, "dice", reference="truth")
    assert list(p.index) == ["LV", "LA"] and list(p.columns) == ["noisy", "stage2"]
    assert p.loc["LV", "noisy"] == pytest.approx(0.6) and p.loc["LA", "stage2"] == pytest.approx(0.9)
    assert S.pivot(t, "hd95", reference="truth").loc["LV", "noisy"] == 3.0  # nan skipped
    two = S.pivot(t, ["dice", "hd95"], ["reference", "source"])
    assert list(two.columns)[:2] == ["dice truth noisy", "dice lref noisy"] and two.shape == (2, 8)
    flat = S.pivot(t[t["source"] == "noisy"], ["dice"], columns=[], reference="lref")
    assert list(flat.columns) == ["dice"] and flat.loc["LA", "dice"] == pytest.approx(0.7)


def test_checks_and_their_rates():
    pred, ref = two_blobs()
    table = CARDIAC.subset(["LV", "LA"])
    checks = pd.DataFrame([{"case": "1", "source": "noisy", **S.anatomy_checks(pred, SPACING, table)},
                           {"case": "1", "source": "stage2", **S.anatomy_checks(ref, SPACING, table)}])
    assert checks.loc[0, "LA components"] == 0 and checks.loc[1, "LA at expected"] == 1.0
    rates = S.check_rates(checks)
    assert list(rates.columns) == ["noisy", "stage2"]
    assert rates.loc["LA at expected", "noisy"] == 0.0 and rates.loc["LV at expected", "stage2"] == 1.0


def scattered_maps(seed):
    """Ragged classes with islands in a corner of a larger volume (what a real case looks like)."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(2):
        lab = np.zeros((40, 37, 33), np.uint8)
        core = rng.choice(np.array([0, 1, 2, 3, 9], np.uint8), size=(14, 12, 10), p=[.4, .2, .2, .1, .1])
        lab[20:34, 3:15, 12:22] = core
        lab[25, 30, 5] = 2  # an island far from the rest
        maps.append(lab)
    return maps


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_on_the_foreground_box_are_the_whole_volume_scores(seed):
    """case_report and score_masks crop to the structures: every column as on the whole volume."""
    pred, ref = scattered_maps(seed)
    whole = pd.DataFrame(M.per_class_scores(pred, ref, SPACING, CARDIAC))
    whole["n_comp"] = list(M.component_counts(pred, CARDIAC).values())
    whole["n_comp_ref"] = list(M.component_counts(ref, CARDIAC).values())
    cropped = M.case_report(pred, ref, SPACING, CARDIAC)
    pd.testing.assert_frame_equal(cropped[whole.columns], whole)
    masks = {cls.key: pred == cls.index for cls in CARDIAC if cls.index != 3}  # one class without a mask
    rows = pd.DataFrame(S.score_masks("1", "stage1", "truth", masks, ref, SPACING, CARDIAC)).set_index("class")
    for cls in CARDIAC:  # each mask alone, scored on the whole volume
        alone = (pred == cls.index if cls.key in masks else np.zeros_like(pred, bool)).astype(np.uint8) * cls.index
        one = M.per_class_scores(alone, ref, SPACING, CARDIAC.subset([cls.key]))[0]
        assert (rows.loc[cls.key, "dice"], rows.loc[cls.key, "n_vox_ref"]) == (one["dice"], one["n_vox_ref"])
        hd95 = rows.loc[cls.key, "hd95"]
        assert hd95 == one["hd95"] or math.isnan(one["hd95"]) and math.isnan(hd95)
        assert rows.loc[cls.key, "n_comp_ref"] == M.component_counts(ref, CARDIAC)[cls.key]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_shared_reference_and_known_counts_change_no_row(seed):
    """The truth as one Reference for a label map and masks; checks from the rows' component counts."""
    pred, ref = scattered_maps(seed)
    truth = M.Reference(ref, SPACING, CARDIAC)
    masks = {cls.key: pred == cls.index for cls in CARDIAC if cls.index != 3}
    for plain, shared in ((S.score_labels("1", "noisy", "truth", pred, ref, SPACING, CARDIAC),
                           S.score_labels("1", "noisy", "truth", pred, truth, SPACING, CARDIAC)),
                          (S.score_masks("1", "stage1", "truth", masks, ref, SPACING, CARDIAC),
                           S.score_masks("1", "stage1", "truth", masks, truth, SPACING, CARDIAC))):
        pd.testing.assert_frame_equal(pd.DataFrame(plain), pd.DataFrame(shared))
    rows = S.score_labels("1", "noisy", "truth", pred, truth, SPACING, CARDIAC)
    known = S.anatomy_checks(pred, SPACING, CARDIAC, S.component_counts_of(rows, "noisy"))
    pd.testing.assert_series_equal(pd.Series(known), pd.Series(S.anatomy_checks(pred, SPACING, CARDIAC)))
