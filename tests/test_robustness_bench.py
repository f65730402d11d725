"""The robustness matrix's machinery at a tiny size (its numbers are for docs, not asserted here):
families and their seed sets, one run per family, the tables and the verdicts."""

import math

import numpy as np
import pandas as pd
import pytest

from benchmarks.robustness import (
    FAMILIES_FILE,
    MATRIX_COLUMNS,
    dotted,
    family_overrides,
    load_families,
    main,
    shown_path,
    verdicts,
)
from nearfix_lib.core.config import load_params

TINY_FAMILIES = """
cases: 2
families:
  thin:
    about: thinner coronaries, a segmenter's errors in mm
    seeds: {tuning: 12, heldout: 22}
    phantom: {shape: [40, 36, 30], fov_mm: [140, 126, 120], anatomy: {cor_radius_scale: 0.7},
              noise: {segmenter_mm: 3.0}}
  plain:
    about: the tiny phantom (not run here, so the page lists it without tables)
    seeds: {tuning: 11, heldout: 21}
    phantom: {shape: [40, 36, 30], fov_mm: [140, 126, 120]}
"""


def test_the_shipped_families_have_disjoint_seed_sets_and_valid_phantoms():
    cases, families = load_families(FAMILIES_FILE)
    assert cases >= 2 and len(families) >= 6
    seeds = [seed for f in families for seed in f.seeds.values()]
    assert len(seeds) == len(set(seeds))  # no seed is both tuned on and held out, in any family
    assert all(set(f.seeds) == {"tuning", "heldout"} for f in families)
    for family in families:  # every family builds a valid phantom on the judging params
        params = load_params("params/phantom_1mm.yaml", family_overrides(family, "heldout", cases))
        assert params.data.phantom.seed == family.seeds["heldout"] and params.data.phantom.n_cases == cases
    spacing = {f.name: load_params("params/phantom_1mm.yaml", family_overrides(f, "heldout", 1)).data.phantom.spacing
               for f in families}
    assert spacing["fine"].max() < 0.8 and spacing["coarse_aniso"][2] == pytest.approx(1.2)
    assert spacing["user_grid"] == pytest.approx([0.35, 0.35, 0.5], abs=0.001)  # the users' CCTA grid


def test_dotted_overrides_and_unknown_splits():
    assert dotted("data.phantom", {"shape": [1, 2, 3], "noise": {"jitter_vox": 0.5}}) == {
        "data.phantom.shape": [1, 2, 3], "data.phantom.noise.jitter_vox": 0.5}
    _, families = load_families(FAMILIES_FILE)
    with pytest.raises(ValueError, match="no 'validation' seeds"):
        family_overrides(families[0], "validation", 2)


def test_pages_name_the_families_file_inside_the_project_by_its_relative_path(tmp_path):
    assert shown_path(FAMILIES_FILE) == "params/robustness.yaml"
    assert shown_path(tmp_path / "families.yaml") == str((tmp_path / "families.yaml").resolve())


def _scores(rows):
    """Report rows; ASSD half the HD95 and NSD the Dice, enough to follow each through the verdicts."""
    table = pd.DataFrame(rows, columns=["case", "class", "source", "reference", "dice", "hd95", "n_comp",
                                        "expected", "at_expected"])
    return table.assign(assd=table["hd95"] / 2.0, nsd=table["dice"])


def test_verdicts_compare_each_repair_with_its_noisy_input_case_by_case():
    rows = []
    for case, (noisy, stage1, stage2) in enumerate([(0.60, 0.66, 0.58), (0.70, 0.75, 0.69)]):
        for source, dice, hd95, at in (("noisy", noisy, 4.0, 0.0), ("stage1", stage1, 2.0, 1.0),
                                       ("stage2", stage2, 5.0, 1.0)):
            rows.append((str(case), "Cor", source, "truth", dice, hd95, 2, 2, at))
        rows += [(str(case), "LV", "noisy", "truth", 0.9, 2.0, 1, 1, 1.0),
                 (str(case), "LV", "stage1", "truth", 0.92, np.nan, 0, 1, 0.0)]  # emptied in one case
    table = verdicts(_scores(rows), "fam", "heldout").set_index(["class", "source"])
    cor1, cor2 = table.loc[("Cor", "stage1")], table.loc[("Cor", "stage2")]
    assert cor1["dice_gain"] == pytest.approx(0.055) and cor1["hd95_gain"] == pytest.approx(2.0)
    assert cor1["assd_gain"] == pytest.approx(1.0) and cor1["nsd_gain"] == pytest.approx(0.055)
    assert cor2["assd_gain"] == pytest.approx(-0.5)  # reported, not judged: cor2 misses by its Dice alone
    assert cor1["cor_gain_share"] == 1.0 and cor1["ok"]
    assert cor2["dice_gain"] == pytest.approx(-0.015) and not cor2["dice_not_worse"] and not cor2["ok"]
    assert cor2["cor_gain_share"] == 0.0
    lv = table.loc[("LV", "stage1")]
    assert lv["dice_not_worse"] and not lv["hd95_not_worse"] and not lv["ok"]  # a class the input had is gone
    assert math.isnan(lv["hd95_gain"]) and math.isnan(lv["assd_gain"]) and math.isnan(lv["cor_gain_share"])


@pytest.fixture(scope="module")
def tiny_matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("robustness")
    (out / "families.yaml").write_text(TINY_FAMILIES)
    argv = ["--out", str(out), "--families-file", str(out / "families.yaml"), "--params", "params/test.yaml",
            "--device", "cpu", "--families", "thin", "--overrides", "{stage1.classes: [LV, Cor], "
            "stage1.train.epochs: 12, stage1.train.eval_interval: 12, stage1.train.checkpoint_interval: 12}"]
    return out, argv, main(argv)


def test_every_family_is_a_run_on_its_held_out_seed_and_a_table(tiny_matrix):
    out, _, code = tiny_matrix
    assert code == 0
    table = pd.read_csv(out / "robustness.csv")
    assert list(table.columns) == MATRIX_COLUMNS
    assert set(table["family"]) == {"thin"} and set(table["split"]) == {"heldout"}
    assert set(table["source"]) == {"noisy", "closing", "gaussian", "stage1", "stage2"}
    assert set(table["class"]) == {"LV", "Cor"} and (table["n_cases"] == 2).all()  # the classes stage 1 repaired
    assert table["dice"].between(0.0, 1.0).all()
    params = load_params(out / "runs" / "thin_heldout" / "params.yaml")
    assert params.data.phantom.seed == 22 and params.data.phantom.anatomy.cor_radius_scale == 0.7
    assert params.data.data_root == str(out / "data" / "thin_heldout")
    verdict = pd.read_csv(out / "verdicts.csv")
    assert {"dice_gain", "hd95_gain", "assd_gain", "nsd_gain", "cor_gain_share", "ok"} <= set(verdict.columns)
    assert (table["assd"].isna() == table["hd95"].isna()).all() and table["nsd"].between(0.0, 1.0).all()
    assert set(verdict["source"]) == {"stage1", "stage2"}
    page = (out / "robustness.md").read_text()
    assert page.startswith("# Benchmark: robustness") and "## thin" in page and "## plain" not in page
    assert "**heldout** seeds" in page and "Targets missed:" in page and "**ASSD (mm)**" in page
    assert f"Families of `{(out / 'families.yaml').resolve()}` (thin)" in page  # the file it was given


def test_an_interrupted_family_resumes_and_again_starts_it_anew(tmp_path, monkeypatch):
    """Without a report the family's folder is kept and its stages resume (its fits from their
    checkpoints: tests/test_kill_resume.py); ``--again`` removes it first; with a report it is kept."""
    import benchmarks.robustness as bench

    seen = []
    monkeypatch.setattr(bench, "run_stages",
                        lambda run_dir, *a, **k: seen.append((run_dir.exists(), k["fresh"])) or [])
    (tmp_path / "families.yaml").write_text(TINY_FAMILIES)
    _, families = load_families(tmp_path / "families.yaml")
    run = tmp_path / "runs" / "thin_heldout"
    (run / "stage1").mkdir(parents=True)  # what an interrupted run left
    args = (families[0], "heldout", 1, tmp_path, "params/test.yaml", {}, "cpu", 60.0)
    bench.run_family(*args)
    bench.run_family(*args, again=True)
    assert seen == [(True, False), (False, False)]
    (run / "report").mkdir(parents=True)
    (run / "report" / "scores.csv").write_text("case\n")
    assert bench.run_family(*args) == [] and len(seen) == 2  # kept: its report exists


def test_a_family_with_a_report_is_kept_and_the_page_rebuilt(tiny_matrix):
    out, argv, _ = tiny_matrix
    stamp = (out / "runs" / "thin_heldout" / "report" / "scores.csv").stat().st_mtime_ns
    before = pd.read_csv(out / "robustness.csv")
    assert main(argv) == 0
    assert (out / "runs" / "thin_heldout" / "report" / "scores.csv").stat().st_mtime_ns == stamp
    assert pd.read_csv(out / "robustness.csv").equals(before)
    assert "all kept from earlier runs" in (out / "robustness.md").read_text()
    with pytest.raises(SystemExit):  # a family the file does not have
        main([*argv[:-2], "--families", "absent"])


def test_the_roundtrip_through_the_class_roi_grid_needs_no_fit(tmp_path):
    """A coarse class grid breaks a thin tree that a grid as fine as the image keeps."""
    (tmp_path / "families.yaml").write_text(TINY_FAMILIES)
    argv = ["--out", str(tmp_path), "--families-file", str(tmp_path / "families.yaml"), "--families", "thin",
            "--cases", "1", "--roundtrip", "8", "64"]
    assert main(argv) == 0
    table = pd.read_csv(tmp_path / "roundtrip.csv")
    assert set(table["class"]) == {"Cor", "LAA", "PV"} and set(table["resolution"]) == {8, 64}
    cor = table[(table["class"] == "Cor") & (table["source"] == "truth")].set_index("resolution")
    assert cor.loc[64, "dice"] > 0.95 > cor.loc[8, "dice"]
    assert not (tmp_path / "runs").exists()  # nothing was fitted
    assert "## Cor: Dice of the round trip" in (tmp_path / "roundtrip.md").read_text()


def _page(path, rows, surface=True):
    """A page as an invocation leaves it: its verdicts, its matrix rows and its stamp; ``surface=False``
    as one written before ASSD and NSD were measured."""
    path.mkdir(parents=True)
    verdict = pd.DataFrame([{"family": f, "split": "heldout", "class": c, "source": s, "dice_gain": g,
                             "hd95_gain": h, "assd_gain": 0.25, "nsd_gain": 0.05, "dice_not_worse": g >= 0,
                             "hd95_not_worse": h >= 0, "cor_gain_share": np.nan, "ok": g >= 0 and h >= 0}
                            for f, c, s, g, h in rows])
    matrix = pd.DataFrame([{"family": f, "split": "heldout", "class": c, "source": s, "n_cases": 3, "dice": 0.9,
                            "hd95": 1.0, "assd": 0.3, "nsd": 0.8, "n_comp": 1, "expected": 1, "at_expected": 1.0}
                           for f, c, s, _, _ in rows])
    if not surface:
        verdict, matrix = verdict.drop(columns=["assd_gain", "nsd_gain"]), matrix.drop(columns=["assd", "nsd"])
    verdict.to_csv(path / "verdicts.csv", index=False)
    matrix.to_csv(path / "robustness.csv", index=False)
    (path / "robustness.md").write_text(f"# Benchmark: robustness\n\nGenerated by `python -m benchmarks.robustness "
                                        f"--out {path.name}`; do not edit by hand, rerun.\n")


def test_pages_of_disjoint_classes_join_into_one_table_and_overlaps_are_refused(tmp_path):
    (tmp_path / "families.yaml").write_text(TINY_FAMILIES)
    _page(tmp_path / "a", [("thin", "LV", "stage1", 0.02, 0.5), ("thin", "LV", "stage2", 0.01, -0.1),
                           ("plain", "LV", "stage1", 0.03, 0.2), ("plain", "LV", "stage2", 0.03, 0.2)])
    _page(tmp_path / "b", [("thin", "Cor", "stage1", 0.05, 1.0), ("thin", "Cor", "stage2", 0.04, -1.0)],
          surface=False)
    out = tmp_path / "joint"
    argv = ["--out", str(out), "--families-file", str(tmp_path / "families.yaml"), "--combine",
            str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(argv) == 0
    verdict = pd.read_csv(out / "verdicts.csv")
    assert len(verdict) == 6 and "page" not in verdict.columns
    matrix = pd.read_csv(out / "robustness.csv")
    assert len(matrix) == 6 and list(matrix.columns) == MATRIX_COLUMNS
    assert matrix.loc[matrix["class"] == "Cor", "assd"].isna().all()  # page b predates ASSD: empty, not made up
    text = (out / "robustness.md").read_text()
    assert "4 of 6 (family, class, repair) pairs meet every target" in text
    assert "1 (family, class) pairs not run: plain Cor" in text
    assert "+0.020 / +0.010 ✗" in text
    assert "thin LV stage2 (Dice +0.010, HD95 +0.10 mm, ASSD -0.25 mm, NSD +0.050 against the input)" in text
    assert "thin Cor stage2 (Dice +0.040, HD95 +1.00 mm against the input" in text
    assert "**Mean ASSD gain" in text and "| +0.25 / +0.25 ✗ " in text and "| – / – ✗ " in text  # b predates ASSD
    assert "[../a](../a/robustness.md): `python -m benchmarks.robustness --out a`" in text
    assert not (out / "runs").exists()  # nothing ran
    _page(tmp_path / "c", [("thin", "LV", "stage1", 0.0, 0.0)])
    with pytest.raises(ValueError, match="thin heldout LV stage1 is also in"):
        main([*argv, str(tmp_path / "c")])
