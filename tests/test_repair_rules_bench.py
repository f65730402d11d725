"""benchmarks.repair_rules on a tiny phantom run: every rule goes through the run's own M^ref function,
so the rule the run's parameters name reproduces the mask stage 1 wrote (dense decode on both sides)."""

import dataclasses
import math

import nibabel as nib
import numpy as np
import pandas as pd
from params_for_tests import load_test_params

from benchmarks.repair_rules import COLUMNS, main, rule_bits, rules, summary
from nearfix_lib.core.config import AnchorParams, Stage1Params
from nearfix_lib.core.metrics import dice
from nearfix_lib.repair.cleanup import clean_mask
from nearfix_lib.stages import prepare, stage1
from nearfix_lib.stages.runs import start_run


def test_rule_bits_set_the_cut_bits_of_the_repair_decision():
    p = np.array([0.01, 0.1, 0.4, 0.6, 0.9], dtype=np.float32)
    anchored = dataclasses.replace(Stage1Params(), threshold=0.3,
                                   anchor=AnchorParams(enabled=True, keep_above=0.05, add_above=0.7))
    assert rule_bits(p, anchored).tolist() == [0, 2, 3, 3, 7]
    alone = dataclasses.replace(Stage1Params(), threshold=0.5, anchor=AnchorParams(enabled=False))
    assert rule_bits(p, alone).tolist() == [0, 0, 0, 1, 1]  # the field alone: bit 0 only
    names = [r[0] for r in rules([0.05, 0.8], [0.7], [False, True])]
    assert names == ["field", "anchor 0.05 / 0.7", "anchor 0.05 / 0.7 + join"]  # keep < add only
    bridged = rules([0.05], [0.7], [False], [12.0, 16.0])
    assert [r[0] for r in bridged] == ["field, bridge 12 mm", "field, bridge 16 mm", "anchor 0.05 / 0.7, bridge 12 mm",
                                       "anchor 0.05 / 0.7, bridge 16 mm"]
    assert [r[4] for r in bridged] == [12.0, 16.0, 12.0, 16.0]
    capped = rules([0.05], [0.7], [False], [16.0], [0.0, 1.1])  # the field alone has no anchor to cap
    assert [r.name for r in capped] == ["field, bridge 16 mm", "anchor 0.05 / 0.7, volume 0, bridge 16 mm",
                                        "anchor 0.05 / 0.7, volume 1.1, bridge 16 mm"]
    assert math.isnan(capped[0].max_volume_ratio) and [r.max_volume_ratio for r in capped[1:]] == [0.0, 1.1]
    held = rules([0.05], [0.7], [False], overs=[True, False])  # the field alone has no anchor to hold
    assert [r.name for r in held] == ["field", "anchor 0.05 / 0.7", "anchor 0.05 / 0.7, not over foreign"]
    assert [r.add_over_foreign for r in held] == [None, True, False]
    edged = rules([0.05], [0.7], [False], edges=[False, True])  # the field alone's boundary moves too
    assert [r.name for r in edged] == ["field", "field, CT edge", "anchor 0.05 / 0.7", "anchor 0.05 / 0.7, CT edge"]
    assert [r.ct_edge for r in edged] == [False, True, False, True]
    held_to_table = rules([0.05], [0.7], [False], edges=[True], anatomies=[False, True])
    assert [r.name for r in held_to_table] == ["field, CT edge", "field, CT edge, anatomy",
                                               "anchor 0.05 / 0.7, CT edge", "anchor 0.05 / 0.7, CT edge, anatomy"]
    assert [r.anatomy for r in held_to_table] == [False, True, False, True]


def test_the_runs_own_rule_reproduces_its_stage1_mask_and_the_page_is_written(tmp_path):
    # a dense stage-1 decode, so that the benchmark's dense probabilities give the same cuts exactly
    params = load_test_params({"stage1.decode.mode": "dense"}, run_dir=str(tmp_path / "run"))
    run = start_run(params, progress=False)
    prepare.prepare_run(run)
    stage1.fit_class(run, "Cor", run.params.stage1, progress=False)
    stage1.repair_class(run, "Cor", progress=False)
    anchor, gap = run.params.stage1.for_class("Cor").anchor, run.params.stage1.for_class("Cor").cleanup.bridge_gap_mm
    assert anchor.enabled and gap > 0  # the coronaries' default: the rule measured below is the run's own
    other = 0.0 if anchor.max_volume_ratio > 0 else 1.1  # a volume cap that is not the run's
    out = tmp_path / "rules"
    assert main(["--runs", str(run.dir), "--class", "Cor", "--keep", str(anchor.keep_above), "0.9",
                 "--add", str(anchor.add_above), "--join", "on" if anchor.join else "off",
                 "--bridge", str(gap), "0", "--volume-ratio", str(anchor.max_volume_ratio), str(other),
                 "--without-field", "--out", str(out)]) == 0
    table = pd.read_csv(out / "rules.csv", dtype={"case": str})
    assert list(table.columns) == COLUMNS
    cut = f"anchor {anchor.keep_above:g} / {anchor.add_above:g}" + (" + join" if anchor.join else "")
    own, recapped = (f"{cut}, volume {v:g}, bridge {gap:g} mm" for v in (anchor.max_volume_ratio, other))
    unbridged = f"{cut}, volume {anchor.max_volume_ratio:g}, bridge 0 mm"
    assert set(table["rule"]) == {"noisy", f"field, bridge {gap:g} mm", "field, bridge 0 mm", own, unbridged,
                                  recapped, f"{cut}, volume {other:g}, bridge 0 mm",  # 0.9 >= 0.7: not a rule
                                  "audit: clean_input", "audit: repair_input"}  # --without-field
    assert set(table.loc[table["rule"] == unbridged, "bridge_gap_mm"]) == {0.0}
    assert set(table.loc[table["rule"] == recapped, "max_volume_ratio"]) == {other}
    for case in run.cases:
        mask_file = stage1.stage1_dir(run, "Cor") / "masks" / f"{case.case_id}.nii.gz"
        written = np.asarray(nib.load(str(mask_file)).dataobj) > 0
        truth = np.asarray(nib.load(str(case.truth)).dataobj) == run.table["Cor"].index
        row = table[(table["case"] == case.case_id) & (table["rule"] == own)].iloc[0]
        assert row["dice"] == dice(written, truth)  # the class box holds every voxel of both masks
        # the fallbacks on every case: the input cleaned, and the input through the rules without the field
        label = nib.load(str(case.label))
        given = np.asarray(label.dataobj) == run.table["Cor"].index
        cleaned, _ = clean_mask(given, run.table["Cor"].expected_components, label.header.get_zooms()[:3],
                                run.params.stage1.for_class("Cor").cleanup)
        fallback = table[(table["case"] == case.case_id) & table["rule"].str.startswith("audit: ")].set_index("rule")
        assert fallback["kept_input"].all()
        assert math.isclose(fallback.loc["audit: clean_input", "dice"], dice(cleaned, truth))
        assert not math.isclose(fallback.loc["audit: repair_input", "dice"], dice(cleaned, truth))  # the CT moved it
    s = summary(table)
    assert set(s["rule"]) == set(table["rule"]) - {"noisy"} and (s["cases"] == len(run.cases)).all()
    noisy = table[table["rule"] == "noisy"].set_index("case")["dice"]
    field = table[table["rule"] == f"field, bridge {gap:g} mm"].set_index("case")["dice"]
    assert math.isclose(s.set_index("rule").loc[f"field, bridge {gap:g} mm", "dice_gain"], (field - noisy).mean())
    page = (out / "rules.md").read_text()
    assert "**Dice gain**" in page and own in page and run.dir.name in page
    # several classes: a run without a fit of one skips it, and the page names each (class, run)
    stage1.fit_class(run, "LV", run.params.stage1, progress=False)
    both = tmp_path / "both"
    assert main(["--runs", str(run.dir), "--class", "Cor", "LV", "Myo", "--keep", "0.4", "--add", "0.6",
                 "--join", "off", "--out", str(both)]) == 0
    rows = pd.read_csv(both / "rules.csv", dtype={"case": str})
    assert set(rows["class"]) == {"Cor", "LV"} and set(rows["rule"]) == {"noisy", "field", "anchor 0.4 / 0.6"}
    assert len(rows) == 2 * 3 * len(run.cases)  # per class and case: the input, the field, the anchor
    assert all(f"{key} {run.dir.name}" in (both / "rules.md").read_text() for key in ("Cor", "LV"))
    assert main(["--runs", str(run.dir), "--class", "RV", "Myo", "--out", str(tmp_path / "none")]) == 2
