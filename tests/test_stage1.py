"""Stage 1 end to end on a tiny phantom: masks on the original grid with the source affine,
per-class overrides, metrics against input and truth, and a real repair on a clear-cut case."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PROJECT
from params_for_tests import load_test_params

from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.config import AnchorParams, load_params
from nearfix_lib.field.models import appearance_input
from nearfix_lib.repair.cleanup import clean_mask, joined_through
from nearfix_lib.stages import prepare, stage1
from nearfix_lib.stages.runs import start_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    params = load_test_params(run_dir=str(tmp_path_factory.mktemp("s1")))
    run = start_run(params, progress=False)
    prepare.prepare_run(run)
    return run


def fit_and_repair(run, cls):
    """What ``02_stage1`` does with ``-p cls 9``: resolve the class, fit F_c, write and score M^ref."""
    key = run.table.resolve(cls).key
    stage1.fit_class(run, key, run.params.stage1, progress=False)
    return stage1.repair_class(run, key, progress=False)


def test_fit_and_repair_write_masks_on_the_original_grid(tiny_run):
    table = fit_and_repair(tiny_run, "9")  # papermill passes "-p cls 9" like this
    out = stage1.stage1_dir(tiny_run, "Cor")
    class_res = tiny_run.params.prepare.class_resolution
    for case in tiny_run.cases:
        src = nib.load(str(case.label))
        mask = nib.load(str(out / "masks" / f"{case.case_id}.nii.gz"))
        assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        prob = np.load(stage1.stage1_probabilities(tiny_run, "Cor", case.case_id))
        assert prob.dtype == np.uint8 and prob.shape == (class_res,) * 3 and prob.any()
    assert {"ckpt", "prob", "masks"} <= {p.name for p in out.iterdir()}
    assert (out / "ckpt" / "best.pt").is_file() and (out / "scores.csv").is_file()
    assert set(table["reference"]) == {"noisy", "truth"}
    assert set(table[table.reference == "truth"]["source"]) == {"noisy", "stage1"}
    assert set(table[table.reference == "noisy"]["source"]) == {"stage1"}
    assert table["dice"].between(0, 1).all() and table["class"].nunique() == 1
    repaired = table[table["source"] == "stage1"]
    assert repaired["audit_skeleton_kept"].between(0, 1).all()  # the coronaries' centre line is audited


def test_finished_fit_is_loaded_not_retrained(tiny_run):
    fit_and_repair(tiny_run, "LA")
    ckpt = stage1.stage1_dir(tiny_run, "LA") / "ckpt" / "last.pt"
    stamp = ckpt.stat().st_mtime_ns
    _, _, result = stage1.fit_class(tiny_run, "LA", tiny_run.params.stage1, progress=False)
    epochs = tiny_run.params.stage1.train.epochs
    assert result.resumed_from == epochs and ckpt.stat().st_mtime_ns == stamp


def test_every_repair_is_audited_and_a_flagged_case_can_keep_its_input(tiny_run):
    """The audit's columns on M^ref's rows; ``keep_input`` writes the input mask itself where flagged
    (a minimum fit Dice no repair reaches flags every case). The fit is reused: only the repair reruns."""
    import dataclasses

    fit_and_repair(tiny_run, "LA")
    audited = stage1.repair_class(tiny_run, "LA", progress=False)
    rows = audited[audited["source"] == "stage1"]
    assert rows["audit_fit_dice"].between(0, 1).all() and not rows["audit_kept_input"].any()
    assert rows["audit_skeleton_kept"].isna().all()  # a chamber: no centre line asked for
    # a large class's narrow anchor (no volume cap): its keep cut on every row, the field's own beyond it
    assert (rows["audit_keep_cut"] == tiny_run.params.stage1.for_class("LA").anchor.keep_above).all()
    unanchored = load_test_params({"stage1.overrides.LA.anchor.enabled": False}, run_dir=str(tiny_run.dir))
    alone = stage1.repair_class(dataclasses.replace(tiny_run, params=unanchored), "LA", progress=False)
    assert alone.loc[alone["source"] == "stage1", "audit_keep_cut"].isna().all()  # M^ref is the field's decision
    strict = load_test_params({"stage1.overrides.LA.audit": {"min_fit_dice": 0.9999, "action": "keep_input"}},
                              run_dir=str(tiny_run.dir))
    run = dataclasses.replace(tiny_run, params=strict)
    kept = stage1.repair_class(run, "LA", progress=False)
    rows = kept[kept["source"] == "stage1"]
    assert rows["audit_flagged"].all() and rows["audit_kept_input"].all()
    assert rows["audit_reasons"].str.contains("fit Dice").all()
    for case in run.cases:
        written = np.asarray(nib.load(str(stage1.stage1_dir(run, "LA") / "masks" / f"{case.case_id}.nii.gz")).dataobj)
        given = np.asarray(nib.load(str(case.label)).dataobj) == run.table["LA"].index
        assert np.array_equal(written > 0, given)
    noisy_rows = kept[(kept["source"] == "stage1") & (kept["reference"] == "noisy")]
    assert (noisy_rows["dice"] == 1.0).all()
    # what the report and the viewer read: the audit of the run, or of one case
    from nearfix_lib.core.workspace import repair_audit
    from nearfix_lib.stages.report import audit_summary

    per_class, flagged = audit_summary(repair_audit(run))
    assert per_class.loc["LA", "flagged"] == per_class.loc["LA", "kept_input"] == len(run.cases)
    assert flagged[flagged["class"] == "LA"]["why"].str.contains("fit Dice").all()
    older, _ = audit_summary(repair_audit(run).drop(columns=["audit_keep_cut"]))  # a run repaired before it existed
    assert "keep cut" in per_class.columns and "keep cut" not in older.columns and older["flagged"].equals(
        per_class["flagged"])
    one = repair_audit(run, run.cases[0].case_id)
    assert set(one["case"]) == {run.cases[0].case_id} and "LA" in set(one["class"])
    # clean_input: the input through the class's own clean-up rules, not the field's mask: the
    # coronaries' (pieces bridged, small ones removed) change their broken noisy input
    fit_and_repair(tiny_run, "Cor")  # resumes the fit when an earlier test made it
    cleaning = load_test_params({"stage1.overrides.Cor.audit": {"min_fit_dice": 0.9999, "action": "clean_input"}},
                                run_dir=str(tiny_run.dir))
    run = dataclasses.replace(tiny_run, params=cleaning)
    cleaned_rows = stage1.repair_class(run, "Cor", progress=False)
    assert cleaned_rows[cleaned_rows["source"] == "stage1"]["audit_kept_input"].all()
    p, cor, changed = run.params.stage1.for_class("Cor"), run.table["Cor"], 0
    for case in run.cases:
        written = np.asarray(nib.load(str(stage1.stage1_dir(run, "Cor") / "masks" / f"{case.case_id}.nii.gz")).dataobj)
        label = nib.load(str(case.label))
        given = np.asarray(label.dataobj) == cor.index
        expected, _ = clean_mask(given, cor.expected_components, label.header.get_zooms()[:3], p.cleanup)
        assert np.array_equal(written > 0, expected)
        changed += int((expected != given).sum())
    assert changed > 0


def test_where_the_audit_kept_the_input_nothing_downstream_learns_from_the_field(tiny_run):
    """The audit's verdict reaches every consumer of a case's field: stage 3 withholds the class's
    teacher (its head learns that case from L^ref alone) and stage 2's ROI-grid mask is the input
    on that grid, as M^ref is on the original one. A class the audit passed keeps its teacher."""
    import dataclasses

    from nearfix_lib.core.workspace import case_dir, kept_inputs
    from nearfix_lib.stages import stage2, stage3

    fit_and_repair(tiny_run, "LA")  # resumes the fits and repairs of the tests above, if they ran
    fit_and_repair(tiny_run, "Cor")
    strict = load_test_params({"stage1.overrides.LA.audit": {"min_fit_dice": 0.9999, "action": "keep_input"},
                               "stage1.overrides.Cor.audit": {"max_dropped": 1.0, "max_added": float("inf"),
                                                              "min_skeleton_kept": 0.0}},
                              run_dir=str(tiny_run.dir))
    run = dataclasses.replace(tiny_run, params=strict)
    for key in ("LA", "Cor"):
        stage1.repair_class(run, key, progress=False)
    kept = kept_inputs(run)
    assert {cid: set(keys) for cid, keys in kept.items()} == {c.case_id: {"LA"} for c in run.cases}
    stage2.run_stage2(run, progress=False)
    data = stage3.load_stage3_data(run)
    la, cor = run.table.keys.index("LA"), run.table.keys.index("Cor")
    for i, _ in enumerate(data.case_ids):
        channels = data.store.teacher_channels(i)
        assert cor in channels and la not in channels
    fields = stage1.load_stage1_fields(run, "cpu", ["LA"])
    crops = stage3.load_crops_index(stage3.prepared_dir(run))[run.cases[0].case_id]
    with np.load(case_dir(stage3.prepared_dir(run), crops.case_id) / "heart.npz") as z:
        heart_labels = z["labels"]
    given = heart_labels == run.table["LA"].index
    field_mask = stage2.roi_masks(run, fields, crops, "cpu", heart_labels)["LA"]
    kept_mask = stage2.roi_masks(run, fields, crops, "cpu", heart_labels, kept[crops.case_id])["LA"]
    assert np.array_equal(kept_mask, given) and not np.array_equal(field_mask, given)
    # the verdict withdrawn (the default audit passes LA): the store takes the teacher back
    stage1.repair_class(tiny_run, "LA", progress=False)
    data = stage3.load_stage3_data(tiny_run)
    assert all(la in data.store.teacher_channels(i) for i in range(len(data.case_ids)))


def test_an_anchored_repair_keeps_the_input_where_the_field_is_unsure(tiny_run):
    """``stage1.anchor``: M^ref is the input where P >= keep_above plus the voxels where P >= add_above,
    with ``join`` joined where the field's own cleaned decision connects its pieces, through the
    clean-up; checked against the field's own probabilities (dense decode, so exactly), with and
    without the join. The audit still reads the field's own decision."""
    import dataclasses

    from nearfix_lib.core.workspace import prepared_dir
    from nearfix_lib.field.infer import field_on_grid, original_box_grid

    fit_and_repair(tiny_run, "Cor")  # resumes the fit when an earlier test made it
    cor = tiny_run.table["Cor"]
    field = stage1.load_stage1_fields(tiny_run, "cpu", ["Cor"])["Cor"]
    index = prepare.load_crops_index(prepared_dir(tiny_run))
    p = tiny_run.params.stage1.for_class("Cor")  # threshold and clean-up: the same for both repairs
    unions, own, spacings, boxes = {}, {}, {}, {}
    for case in tiny_run.cases:  # what the join does not change: the field's decode, its own mask, the union
        box = boxes[case.case_id] = index[case.case_id].class_boxes["Cor"]
        image = stage1.class_image(tiny_run, case.case_id, "Cor", p.model, "cpu")  # the coronaries' field reads the CT
        prob = field_on_grid(field.model, field.index_of[case.case_id], original_box_grid(box), box, "cpu",
                             image=image)[..., 0]
        label = nib.load(str(case.label))
        given = (np.asarray(label.dataobj) == cor.index)[box.slices]
        # what the field adds never takes a voxel the input gives a class the coronaries do not lie on
        foreign = stage1.foreign_voxels(np.asarray(label.dataobj)[box.slices], "Cor", tiny_run.table)
        spacings[case.case_id] = spacing = label.header.get_zooms()[:3]
        own[case.case_id], _ = clean_mask(prob >= np.float32(p.threshold), cor.expected_components, spacing,
                                          p.cleanup)
        unions[case.case_id] = (given & (prob >= np.float32(0.1))) | ((prob >= np.float32(0.8)) & ~foreign)
    written, expected = {}, {}
    for join in (False, True):
        # the audit only flags (a replaced case would not show the anchor), dense: exact comparisons
        params = load_test_params({"stage1.overrides.Cor.anchor": {"enabled": True, "keep_above": 0.1,
                                                                   "add_above": 0.8, "join": join,
                                                                   "max_volume_ratio": 0.0},
                                   "stage1.overrides.Cor.decode": {"mode": "dense"},
                                   "stage1.overrides.Cor.audit": {"action": "flag"},
                                   # the anchor alone: the CT edge, paths and anatomy act after it (tested below)
                                   "stage1.overrides.Cor.ct_edge": {"enabled": False},
                                   "stage1.overrides.Cor.ct_path": {"enabled": False},
                                   "stage1.overrides.Cor.anatomy": {"drop_unattached": False, "split_joins": False,
                                                                    "split_origins": []}},
                                  run_dir=str(tiny_run.dir))
        run = dataclasses.replace(tiny_run, params=params)
        rows = stage1.repair_class(run, "Cor", progress=False)
        rows = rows[(rows["source"] == "stage1") & (rows["reference"] == "noisy")].set_index("case")
        for case in run.cases:
            box, union = boxes[case.case_id], unions[case.case_id]
            if join:
                union = joined_through(union, own[case.case_id])
            expected[join, case.case_id], _ = clean_mask(union, cor.expected_components, spacings[case.case_id],
                                                         p.cleanup)
            mask_file = stage1.stage1_dir(run, "Cor") / "masks" / f"{case.case_id}.nii.gz"
            written[join, case.case_id] = np.asarray(nib.load(str(mask_file)).dataobj) > 0
            assert np.array_equal(written[join, case.case_id][box.slices], expected[join, case.case_id])
            assert written[join, case.case_id].sum() == expected[join, case.case_id].sum()
            assert rows.loc[case.case_id, "audit_repair_voxels"] == own[case.case_id].sum()  # the field's decision
            assert rows.loc[case.case_id, "audit_keep_cut"] == 0.1  # no volume cap: keep_above
    ids = [case.case_id for case in tiny_run.cases]
    assert sum(int((expected[False, c] != own[c]).sum()) for c in ids) > 0  # the anchor changed M^ref
    assert sum(int((expected[True, c] != expected[False, c]).sum()) for c in ids) > 0  # and the join did
    for c in ids:
        assert not (expected[False, c] & ~expected[True, c]).any()  # the join only adds


def test_the_coronaries_boundary_is_moved_onto_the_cts_edge_within_one_voxel(tiny_run):
    """``stage1.ct_edge`` (the coronaries' default): M^ref is the anchored repair with its boundary band
    decided by the CT (``repair.ct_edge``), then the clean-up: it differs from the repair without it only
    within a voxel of that repair's boundary, and its scores carry the CT's report (``edge_*``)."""
    import dataclasses

    from scipy import ndimage

    fit_and_repair(tiny_run, "Cor")
    assert tiny_run.params.stage1.for_class("Cor").ct_edge.enabled
    masks, rows = {}, {}
    # the edge off and on with no paths, then the run's own parameters (both on) last: the report reads them
    for on, path in ((False, False), (True, False), ("path", True)):
        params = load_test_params({"stage1.overrides.Cor.ct_edge": {"enabled": bool(on)},
                                   "stage1.overrides.Cor.ct_path": {"enabled": path},
                                   "stage1.overrides.Cor.audit": {"action": "flag"}}, run_dir=str(tiny_run.dir))
        run = dataclasses.replace(tiny_run, params=params)
        table = stage1.repair_class(run, "Cor", progress=False)
        rows[on] = table[(table["source"] == "stage1") & (table["reference"] == "noisy")].set_index("case")
        masks[on] = {c.case_id: np.asarray(nib.load(str(stage1.stage1_dir(run, "Cor") / "masks" /
                                                        f"{c.case_id}.nii.gz")).dataobj) > 0 for c in run.cases}
    face = ndimage.generate_binary_structure(3, 1)
    moved = 0
    for cid, off in masks[False].items():
        changed = masks[True][cid] != off
        band = ndimage.binary_dilation(off, face) & ~ndimage.binary_erosion(off, face, border_value=1)
        assert not (changed & ~band).any()
        moved += int(changed.sum())
        assert rows[True].loc[cid, "edge_added"] + rows[True].loc[cid, "edge_removed"] >= changed.sum() - \
            rows[True].loc[cid, "cleanup_removed_voxels"]
    assert moved > 0  # the phantom's CT is clear: the edge moved somewhere
    assert rows[True]["edge_decided"].between(0, 1).all() and "edge_decided" not in rows[False].columns
    # the coronaries' default holds M^ref to the table's anatomy: its report reaches the written scores
    anatomy = ["anatomy_unattached_voxels", "anatomy_origin_split_voxels", "anatomy_split_voxels"]
    assert set(anatomy) <= set(rows[True].columns) and (rows[True][anatomy] >= 0).all().all()
    # then joins the pieces left apart along the CT's lumen (both tiny cases have some): the anatomy acted
    # before it, the same way, so it only adds, as it reports
    assert "path_joined" not in rows[True].columns and (rows["path"]["path_joined"] > 0).any()
    assert rows["path"][anatomy].equals(rows[True][anatomy])
    for cid, edged in masks[True].items():
        assert not (edged & ~masks["path"][cid]).any()
        assert (masks["path"][cid] & ~edged).sum() == rows["path"].loc[cid, "path_added"]
    # what the report reads (its audit section): the CT edge's share and clarity per class
    from nearfix_lib.core.workspace import repair_audit
    from nearfix_lib.stages.report import audit_summary

    per_class, _ = audit_summary(repair_audit(tiny_run))
    assert per_class.loc["Cor", "CT edge decided"] == pytest.approx(
        repair_audit(tiny_run).query("`class` == 'Cor'")["edge_decided"].mean())
    assert per_class.loc["Cor", "pieces joined on the CT"] == pytest.approx(
        rows["path"]["path_joined"].mean())


def test_stage2_decodes_a_field_that_reads_the_ct_on_the_roi_grid(tiny_run):
    """``stage3.supervision: roi``: stage 2 evaluates each field on the heart grid; the coronaries' field
    reads the CT, so it must be given its crop there too (without it the model refuses)."""
    from nearfix_lib.core.workspace import case_dir, prepared_dir
    from nearfix_lib.field.decide import labels_in_box, threshold_decision
    from nearfix_lib.stages import stage2

    fit_and_repair(tiny_run, "Cor")
    fields = stage1.load_stage1_fields(tiny_run, "cpu", ["Cor"])
    crops = prepare.load_crops_index(prepared_dir(tiny_run))[tiny_run.cases[0].case_id]
    with np.load(case_dir(prepared_dir(tiny_run), crops.case_id) / "heart.npz") as z:
        heart_labels = z["labels"]
    mask = stage2.roi_masks(tiny_run, fields, crops, "cpu", heart_labels)["Cor"]  # not kept: the field decodes
    assert mask.shape == crops.heart_grid.shape and mask.any()
    p, field = tiny_run.params.stage1.for_class("Cor"), fields["Cor"]
    with pytest.raises(ValueError, match="CT crop"):
        labels_in_box(field.model, field.index_of[crops.case_id], crops.heart_grid, crops.class_boxes["Cor"],
                      threshold_decision(p.threshold), p.decode, "cpu")


def test_the_large_classes_keep_their_inputs_boundary_only_where_the_field_is_near_its_threshold():
    """The default for the chambers, great vessels and myocardium (``anchor`` 0.45 / 0.55): an input voxel
    where P is just under 0.5 stays and one just over it outside the input is not added (a near-clean
    boundary the field rounds off), while the field still drops an island it is sure of and fills a hole
    it is sure of. The veins are not anchored; the appendage and coronaries keep their wider anchor."""
    stage1_params = load_params(PROJECT / "params/default.yaml").stage1
    rv = stage1_params.for_class("RV")
    given = np.zeros((9, 10, 11), dtype=bool)
    given[2:7, 2:8, 2:9] = True
    given[4, 5, 5] = False  # a hole the field fills
    given[0, 0, 0] = True  # an island the field drops
    p = np.where(given, 0.95, 0.02).astype(np.float32)
    p[4, 5, 5] = 0.9
    p[0, 0, 0] = 0.1
    p[2, 2, 2:9] = 0.48  # an edge of the input the field is unsure of: kept
    p[7, 2:8, 2:9] = 0.53  # a layer beside it the field would add by a hair: not added
    bits = stage1.repair_decision(rv).labels(p.reshape(-1, 1)).reshape(p.shape)
    made = stage1.mref_of(given, bits, 1, (1.1, 1.0, 0.9), rv)
    field_alone = stage1.mref_of(given, bits, 1, (1.1, 1.0, 0.9), dataclasses.replace(rv, anchor=AnchorParams()))
    expected = given.copy()
    expected[4, 5, 5], expected[0, 0, 0] = True, False
    assert np.array_equal(made.mask, expected)
    assert not field_alone.mask[2, 2, 2:9].any() and field_alone.mask[7, 2:8, 2:9].all()  # the field's own cut
    assert all(stage1_params.for_class(k).anchor == rv.anchor for k in ("LA", "LV", "RA", "Ao", "PA", "Myo"))
    assert not stage1_params.for_class("PV").anchor.enabled
    assert stage1_params.for_class("LAA").anchor.keep_above == stage1_params.for_class("Cor").anchor.keep_above == 0.05


def test_an_anchored_repair_larger_than_its_input_drops_the_inputs_least_sure_voxels_first():
    """``anchor.max_volume_ratio``: the keep cut rises through ``keep_steps`` until the anchored mask
    holds at most that many voxels per input voxel; what the field adds stays, whatever the cut."""
    import dataclasses

    from nearfix_lib.core.config import AnchorParams, Stage1Params

    given = np.zeros((4, 5, 6), dtype=bool)
    given[1:3, 1:4, 1:5] = True  # 24 input voxels
    p = np.zeros(given.shape, dtype=np.float32)
    p[given] = np.linspace(0.06, 0.95, 24, dtype=np.float32)  # the input's voxels, least sure first
    p[0, 0, :] = 0.9  # 6 voxels the field adds (P >= add_above)
    p[3, 4, :] = 0.5  # 6 the field would like but is not sure of: never added
    anchor = AnchorParams(enabled=True, keep_above=0.05, add_above=0.7, keep_steps=(0.2, 0.4, 0.6))

    cuts = {}

    def mask(ratio: float) -> np.ndarray:
        params = dataclasses.replace(Stage1Params(), threshold=0.3,
                                     anchor=dataclasses.replace(anchor, max_volume_ratio=ratio))
        bits = stage1.repair_decision(params).labels(p.reshape(-1, 1)).reshape(p.shape)
        out, cuts[ratio] = stage1.anchored_mask(given, bits, params.anchor)
        return out

    def anchored(cut: float) -> np.ndarray:
        return (given & (p >= cut)) | (p >= 0.7)

    assert np.array_equal(mask(0.0), anchored(0.05))  # no cap: 30 voxels, 1.25 per input voxel
    assert np.array_equal(mask(1.5), anchored(0.05))  # under the cap: the cut stays
    # over 1.1 x 24 = 26.4: 0.2 keeps 20 + 6 = 26 voxels, the first cut that fits
    assert np.count_nonzero(anchored(0.2)) == 26 and np.array_equal(mask(1.1), anchored(0.2))
    assert np.array_equal(mask(0.5), anchored(0.6))  # no cut fits: the last
    assert (mask(0.5) & ~given).sum() == 6  # the voxels the field adds stay
    assert cuts == {0.0: 0.05, 1.5: 0.05, 1.1: 0.2, 0.5: 0.6}  # the keep cut each took (the audit's keep_cut)
    higher = AnchorParams(enabled=True, keep_above=0.25, add_above=0.7, max_volume_ratio=1.1)
    assert higher.keep_cuts() == (0.25, 0.3, 0.4)  # the steps above keep_above
    with pytest.raises(ValueError, match="keep_steps"):
        AnchorParams(enabled=True, keep_above=0.05, add_above=0.7, keep_steps=(0.3, 0.2))
    with pytest.raises(ValueError, match="keep_steps"):
        AnchorParams(enabled=True, keep_above=0.05, add_above=0.7, keep_steps=(0.2, 0.8))
    # add_over_foreign off: what the field adds never takes a voxel the input gives a class the coronaries
    # neither are nor lie on; the myocardium and aorta they lie on stay open to it
    labels = np.zeros(given.shape, np.uint8)
    labels[0, 0, :2], labels[0, 0, 2], labels[0, 0, 3] = CARDIAC["LV"].index, CARDIAC["RV"].index, CARDIAC["Myo"].index
    labels[0, 0, 4] = CARDIAC["Ao"].index
    labels[given] = CARDIAC["Cor"].index
    others = stage1.foreign_voxels(labels, "Cor", CARDIAC)
    assert others.sum() == 3 and others[0, 0, :3].all()
    bits = stage1.repair_decision(dataclasses.replace(Stage1Params(), threshold=0.3, anchor=anchor)).labels(
        p.reshape(-1, 1)).reshape(p.shape)
    assert np.array_equal(stage1.anchored_mask(given, bits, anchor, others)[0], anchored(0.05))  # default: on
    kept_out, _ = stage1.anchored_mask(given, bits, dataclasses.replace(anchor, add_over_foreign=False), others)
    assert np.array_equal(kept_out, anchored(0.05) & ~others) and (kept_out & ~given).sum() == 3


def test_mref_holds_the_tables_anatomy_read_from_the_inputs_labels():
    """``stage1.anatomy``: a coronary piece far from the myocardium and aorta goes (a target just outside
    the class box still counts where it may lie), and two trees the field joined across the aorta's voxels are parted;
    off, or without the input's labels, M^ref is the field's."""
    import dataclasses

    from nearfix_lib.core.config import CleanupParams, RepairAnatomyParams, Stage1Params
    from nearfix_lib.core.geometry import Box

    shape, spacing = (40, 16, 12), (1.0, 0.8, 1.5)  # anisotropic: distances in mm
    labels = np.zeros(shape, np.uint8)
    labels[:, :, 0:2] = CARDIAC["Myo"].index  # the heart's surface, along the box's floor
    labels[18:22, :, 2:9] = CARDIAC["Ao"].index  # the aorta between the two trees' ostia
    labels[1, 2:14, 10:12] = CARDIAC["Myo"].index  # a target outside the box (i = 1 < box.lo)
    cor = CARDIAC["Cor"].index
    labels[4:18, 6, 3] = labels[22:36, 6, 3] = cor  # two trees beside the surface, ostia at the aorta
    labels[30:33, 12, 10] = cor  # an island 12 mm above the surface
    box = Box((2, 0, 0), (40, 16, 12))
    around = stage1.box_anatomy(labels, box, "Cor", CARDIAC, spacing)
    given = labels[box.slices] == cor
    assert around.others.sum() == np.count_nonzero(labels[box.slices] != 0) - given.sum()
    assert around.attached[1, 6, 10] and not around.attached[29, 12, 10]  # box index 1 = label index 3
    field = given.copy()
    field[16:20, 6, 3] = True  # the field runs the first tree on through the aorta (box i 16-19) into the second
    bits = field.astype(np.uint8)  # bit 0: the field's own decision; no anchor, no CT
    base = dataclasses.replace(Stage1Params(), cleanup=CleanupParams(keep_expected=False))
    off = stage1.mref_of(given, bits, 2, spacing, base, around)
    assert np.array_equal(off.mask, field) and off.anatomy is None and "anatomy_split_voxels" not in off.columns()
    on = dataclasses.replace(base, anatomy=RepairAnatomyParams(drop_unattached=True, split_joins=True))
    made = stage1.mref_of(given, bits, 2, spacing, on, around)
    island = np.zeros(shape, bool)
    island[30:33, 12, 10] = True
    cut = np.zeros_like(field)
    cut[17:19, 6, 3] = True  # the middle of the join's four aortic voxels (box i 16-19), not all of them
    assert np.array_equal(made.mask, field & ~island[box.slices] & ~cut)
    assert made.columns()["anatomy_unattached_voxels"] == 3 and made.columns()["anatomy_split_voxels"] == 2
    assert np.array_equal(stage1.mref_of(given, bits, 2, spacing, on).mask, field)  # no labels: nothing to read


def test_mref_joins_a_broken_tree_along_the_cts_lumen():
    """``stage1.ct_path``: a stretch of a tree the field lost is put back where the CT shows the lumen, the
    other tree left apart; on, it needs the box's CT."""
    import dataclasses

    from nearfix_lib.core.config import CleanupParams, CTPathParams, Stage1Params
    from nearfix_lib.core.geometry import Box

    shape, spacing = (40, 16, 12), (1.0, 0.8, 1.5)
    labels = np.zeros(shape, np.uint8)
    labels[:, :, 0:2] = CARDIAC["Myo"].index
    cor = CARDIAC["Cor"].index
    labels[4:18, 5:8, 3:5] = labels[22:36, 9:12, 3:5] = cor  # two trees, 3 x 2 voxels across
    around = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Cor", CARDIAC, spacing)
    given = labels == cor
    ct = np.where(given, 300.0, -80.0) + np.where(labels == CARDIAC["Myo"].index, 120.0, 0.0)
    ct = (ct + np.random.default_rng(0).normal(0.0, 15.0, shape)).astype(np.float32)
    field = given.copy()
    field[8:14] = False  # the first tree lost 6 mm: three pieces
    base = dataclasses.replace(Stage1Params(), cleanup=CleanupParams(keep_expected=False))
    on = dataclasses.replace(base, ct_path=CTPathParams(enabled=True))
    made = stage1.mref_of(given, field.astype(np.uint8), 2, spacing, on, around, ct)
    assert np.array_equal(made.mask & ~field, given & ~field)  # the lost stretch, all of it and nothing else
    assert made.columns()["path_joined"] == 1 and made.columns()["path_added"] == int((given & ~field).sum())
    off = stage1.mref_of(given, field.astype(np.uint8), 2, spacing, base, around, ct)
    assert np.array_equal(off.mask, field) and "path_joined" not in off.columns()
    with pytest.raises(ValueError, match="ct_path is on"):
        stage1.mref_of(given, field.astype(np.uint8), 2, spacing, on, around)


def test_an_appendages_edge_stays_out_of_the_atrium_it_opens_into_unless_told():
    """``ct_edge.into_attached``: the appendage's blood and the atrium's (its ``attach_to``) are one
    brightness, so the CT shows no edge between them. Allowed into the atrium's voxels, the edge takes
    those beside the appendage as lumen; held out, it takes none of them, and still places the boundary
    the appendage shares with the fat a voxel further out where the label fell short."""
    import dataclasses

    from nearfix_lib.core.config import CleanupParams, CTEdgeParams, Stage1Params
    from nearfix_lib.core.geometry import Box

    shape, spacing = (30, 26, 22), (0.9, 1.0, 1.2)
    la, laa = CARDIAC["LA"].index, CARDIAC["LAA"].index
    labels = np.zeros(shape, np.uint8)
    labels[2:14, 4:22, 4:18] = la
    lumen = np.zeros(shape, bool)
    lumen[14:26, 8:18, 7:15] = True  # the appendage opens into the atrium along x = 14
    labels[lumen] = laa
    given = labels == laa
    given[:, 8, :] = False  # the label fell a voxel short on one side facing the fat
    labels[lumen & ~given] = 0
    ct = np.where((labels == la) | lumen, 350.0, -90.0)
    ct = (ct + np.random.default_rng(1).normal(0.0, 15.0, shape)).astype(np.float32)
    around = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "LAA", CARDIAC, spacing)
    base = dataclasses.replace(Stage1Params(), cleanup=CleanupParams(keep_expected=False))
    made = {}
    for into in (True, False):
        p = dataclasses.replace(base, ct_edge=CTEdgeParams(enabled=True, into_attached=into))
        made[into] = stage1.mref_of(given, given.astype(np.uint8), 1, spacing, p, around, ct).mask
    atrium = labels == la
    assert (made[True] & atrium).sum() > 0  # no edge between two blood pools: the atrium's voxels taken
    assert not (made[False] & atrium).any()
    assert made[False][lumen & ~given].all() and not (made[False] & ~lumen).any()  # the short side mended


def test_a_repair_the_audit_replaced_can_still_take_every_rule_without_the_field():
    """``audit.action: repair_input``: where the audit replaces a field that lost the vessels, M^ref is
    the input through the CT's edge and path (its too-wide side and its broken stretch mended on the
    CT), not only cleaned (``clean_input``: both errors kept)."""
    import dataclasses

    from nearfix_lib.core.config import AuditParams, CleanupParams, CTEdgeParams, CTPathParams, Stage1Params
    from nearfix_lib.core.geometry import Box
    from nearfix_lib.core.metrics import dice

    shape, spacing = (40, 16, 12), (1.0, 0.8, 1.5)
    labels = np.zeros(shape, np.uint8)
    labels[:, :, 0:2] = CARDIAC["Myo"].index
    cor = CARDIAC["Cor"].index
    truth = np.zeros(shape, bool)
    truth[4:18, 5:8, 3:5] = truth[22:36, 9:12, 3:5] = True  # two trees, 3 x 2 voxels across
    labels[truth] = cor
    labels[4:18, 8, 3:5] = cor  # the segmenter's first tree one voxel too wide on one side
    labels[8:14, 5:9, 3:5] = 0  # and 6 mm of it lost: three pieces
    around = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Cor", CARDIAC, spacing)
    given = labels == cor
    ct = np.where(truth, 300.0, -80.0) + np.where(labels == CARDIAC["Myo"].index, 120.0, 0.0)
    ct = (ct + np.random.default_rng(0).normal(0.0, 15.0, shape)).astype(np.float32)
    lost = np.zeros(shape, np.uint8)  # a field that held none of it: the audit flags it (all dropped)
    rules = dataclasses.replace(Stage1Params(), cleanup=CleanupParams(keep_expected=False),
                                ct_edge=CTEdgeParams(enabled=True, lumen_level="core"),
                                ct_path=CTPathParams(enabled=True))
    made = {}
    for action in ("clean_input", "repair_input"):
        p = dataclasses.replace(rules, audit=AuditParams(max_dropped=0.28, action=action))
        made[action] = stage1.mref_of(given, lost, 2, spacing, p, around, ct)
        assert made[action].audit.kept_input and made[action].columns()["audit_reasons"].startswith("input dropped")
    cleaned, repaired = made["clean_input"], made["repair_input"]
    assert np.array_equal(cleaned.mask, clean_mask(given, 2, spacing, rules.cleanup)[0])
    assert "edge_added" not in cleaned.columns() and "path_joined" not in cleaned.columns()
    assert np.array_equal(repaired.mask, truth), dice(repaired.mask, truth)
    assert repaired.columns()["edge_removed"] > 0 and repaired.columns()["path_joined"] == 1
    assert dice(cleaned.mask, truth) < 0.95


def test_mref_drops_a_dark_blob_before_the_bridges_tie_it_to_a_tree():
    """``ct_path.drop_dark``: a blob of the input in the lung, 4 mm from a tree, is bridged onto it by the
    clean-up when off; on, it goes first, and the trees are as the field left them."""
    import dataclasses

    from nearfix_lib.core.config import CleanupParams, CTPathParams, Stage1Params
    from nearfix_lib.core.geometry import Box

    shape, spacing = (40, 16, 12), (1.0, 0.8, 1.5)
    labels = np.zeros(shape, np.uint8)
    labels[:, :, 0:2] = CARDIAC["Myo"].index
    cor = CARDIAC["Cor"].index
    labels[4:18, 5:8, 3:5] = labels[22:36, 9:12, 3:5] = cor  # two trees, 3 x 2 voxels across
    blob = np.zeros(shape, bool)
    blob[10:14, 11:15, 7:10] = True  # 4 x 4 x 3 voxels, 4 mm beside the first tree
    labels[blob] = cor
    around = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Cor", CARDIAC, spacing)
    given = labels == cor
    ct = np.where(given & ~blob, 300.0, np.where(blob, -700.0, -80.0))
    ct = (ct + np.random.default_rng(0).normal(0.0, 15.0, shape)).astype(np.float32)
    base = dataclasses.replace(Stage1Params(), cleanup=CleanupParams(keep_expected=False, bridge_gap_mm=16.0),
                               ct_path=CTPathParams(enabled=True))
    bits = given.astype(np.uint8)
    tied = stage1.mref_of(given, bits, 2, spacing, base, around, ct)
    assert tied.mask[blob].all() and tied.columns()["cleanup_bridged_voxels"] > 0
    on = dataclasses.replace(base, ct_path=CTPathParams(enabled=True, drop_dark=True))
    made = stage1.mref_of(given, bits, 2, spacing, on, around, ct)
    assert np.array_equal(made.mask, given & ~blob) and made.columns()["path_dark_dropped"] == blob.sum()
    assert made.columns()["cleanup_bridged_voxels"] == 0


def test_mref_drops_a_blob_inside_a_chamber_before_the_bridges_tie_it_to_a_tree():
    """``anatomy.enclosed_share``: a blob of the input inside the left ventricle's labels, 3 mm from a tree
    and as bright as the lumen (the CT cannot tell), is bridged onto the tree when off; on, it goes first."""
    import dataclasses

    from nearfix_lib.core.config import CleanupParams, RepairAnatomyParams, Stage1Params
    from nearfix_lib.core.geometry import Box

    shape, spacing = (40, 18, 12), (1.0, 0.8, 1.5)
    labels = np.zeros(shape, np.uint8)
    labels[:, :, 0:2] = CARDIAC["Myo"].index
    labels[8:20, 10:18, 3:10] = CARDIAC["LV"].index  # a chamber beside the first tree
    cor = CARDIAC["Cor"].index
    labels[4:18, 5:8, 3:5] = labels[22:36, 5:8, 3:5] = cor  # two trees, 3 x 2 voxels across
    blob = np.zeros(shape, bool)
    blob[11:15, 12:16, 5:8] = True  # 48 voxels inside the chamber's labels
    labels[blob] = cor
    around = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Cor", CARDIAC, spacing)
    given = labels == cor
    bits = given.astype(np.uint8)
    base = dataclasses.replace(Stage1Params(), cleanup=CleanupParams(keep_expected=False, min_component_mm3=30.0,
                                                                     bridge_gap_mm=16.0))
    tied = stage1.mref_of(given, bits, 2, spacing, base, around)
    assert tied.mask[blob].all() and tied.columns()["cleanup_bridged_voxels"] > 0
    on = dataclasses.replace(base, anatomy=RepairAnatomyParams(enclosed_share=0.6))
    made = stage1.mref_of(given, bits, 2, spacing, on, around)
    assert np.array_equal(made.mask, given & ~blob) and made.columns()["anatomy_enclosed_voxels"] == blob.sum()


def test_mref_drops_a_blob_inside_the_aortas_labels_where_enclosed_by_names_it():
    """``anatomy.enclosed_by: {Ao: 0.8}``: a blob of the input in the aorta's lumen (the aorta is a class the
    coronaries lie on, so not foreign) goes before the bridges; without it, it stays, a third piece.
    ``box_anatomy`` reads the named classes' voxels, ignoring one the table lacks."""
    import dataclasses

    from nearfix_lib.core.config import CleanupParams, RepairAnatomyParams, Stage1Params
    from nearfix_lib.core.geometry import Box

    shape, spacing = (40, 18, 12), (1.0, 0.8, 1.5)
    labels = np.zeros(shape, np.uint8)
    labels[:, :, 0:2] = CARDIAC["Myo"].index
    labels[8:30, 10:18, 3:10] = CARDIAC["Ao"].index  # the aortic root, 5 voxels from the trees
    cor = CARDIAC["Cor"].index
    labels[4:18, 5:7, 3:5] = labels[22:36, 5:7, 3:5] = cor  # two trees, 2 x 2 voxels across
    blob = np.zeros(shape, bool)
    blob[17:21, 13:16, 5:8] = True  # 36 voxels in the aorta, 20 mm or more from a tree's end along it
    labels[blob] = cor
    given = labels == cor
    bits = given.astype(np.uint8)
    base = dataclasses.replace(Stage1Params(), cleanup=CleanupParams(keep_expected=False, min_component_mm3=30.0,
                                                                     bridge_gap_mm=4.0))
    rules = RepairAnatomyParams(enclosed_share=0.6)
    plain = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Cor", CARDIAC, spacing, rules)
    assert plain.within == {}
    kept = stage1.mref_of(given, bits, 2, spacing, dataclasses.replace(base, anatomy=rules), plain)
    assert np.array_equal(kept.mask, given)
    rules = dataclasses.replace(rules, enclosed_by={"Ao": 0.8, "absent": 0.5})
    around = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Cor", CARDIAC, spacing, rules)
    assert list(around.within) == ["Ao"] and np.array_equal(around.within["Ao"], labels == CARDIAC["Ao"].index)
    assert [share for _, share in around.enclosing(rules)] == [0.6, 0.8]
    made = stage1.mref_of(given, bits, 2, spacing, dataclasses.replace(base, anatomy=rules), around)
    assert np.array_equal(made.mask, given & ~blob) and made.columns()["anatomy_enclosed_voxels"] == blob.sum()


def test_mref_parts_trees_joined_between_their_origins_before_joining_pieces_to_them():
    """``anatomy.split_origins``: two trees the field ran together through the aorta, with a fragment of
    the second making up the expected count, are parted between their ostia; then ``ct_path`` joins the
    fragment to its own tree along the CT. Without it the count hides the join and nothing moves."""
    import dataclasses

    from nearfix_lib.core.config import CleanupParams, CTPathParams, RepairAnatomyParams, Stage1Params
    from nearfix_lib.core.geometry import Box

    shape, spacing = (40, 16, 12), (1.0, 0.8, 1.5)
    labels = np.zeros(shape, np.uint8)
    labels[:, :, 0:2] = CARDIAC["Myo"].index
    labels[18:22, 3:10, 2:9] = CARDIAC["Ao"].index  # the aortic root between the ostia
    cor = CARDIAC["Cor"].index
    labels[4:18, 5:8, 3:5] = labels[22:36, 5:8, 3:5] = cor  # two trees leaving the aorta on either side
    around = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Cor", CARDIAC, spacing,
                                 RepairAnatomyParams(split_origins=["Ao", "absent"]))
    assert around.origins[17, 6, 3] and around.origins[22, 6, 3] and not around.origins[12, 6, 3]
    assert stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Cor", CARDIAC, spacing).origins is None
    given = labels == cor
    ct = np.where(given | (labels == CARDIAC["Ao"].index), 300.0, -80.0)
    ct = (ct + np.random.default_rng(0).normal(0.0, 15.0, shape)).astype(np.float32)
    field = given.copy()
    field[18:22, 5:8, 3:5] = True  # through the aorta: one piece
    field[28:31] = False  # the second tree lost 3 mm: its end a second piece, two in all
    bits = field.astype(np.uint8)
    base = dataclasses.replace(Stage1Params(), cleanup=CleanupParams(keep_expected=False),
                               ct_path=CTPathParams(enabled=True))
    hidden = stage1.mref_of(given, bits, 2, spacing, dataclasses.replace(
        base, anatomy=RepairAnatomyParams(split_joins=True)), around, ct)
    assert np.array_equal(hidden.mask, field) and hidden.columns()["path_joined"] == 0
    on = dataclasses.replace(base, anatomy=RepairAnatomyParams(split_joins=True, split_origins=["Ao"]))
    made = stage1.mref_of(given, bits, 2, spacing, on, around, ct)
    cut = np.zeros(shape, bool)
    cut[19:21, 5:8, 3:5] = True  # the middle of the join's aortic voxels
    assert np.array_equal(made.mask, (field & ~cut) | given)  # parted, and the lost stretch put back
    assert made.columns()["anatomy_origin_split_voxels"] == cut.sum() and made.columns()["path_joined"] == 1
    assert made.columns()["anatomy_split_voxels"] == 0


def test_per_class_overrides():
    p = load_params(PROJECT / "params/default.yaml").stage1
    cor, lv = p.for_class("Cor"), p.for_class("LV")
    assert (cor.loss.kind, cor.loss.dice_weight, cor.loss.focal_weight, cor.loss.focal_gamma) == (
        "dice_focal", 0.7, 0.3, 4.0)
    assert lv.loss.kind == "bce" and lv.threshold == 0.5 and lv.cleanup.keep_expected
    assert cor.threshold < 0.5 and not cor.cleanup.keep_expected
    assert cor.train == lv.train and not lv.model.appearance  # untouched sections stay
    # the coronaries' field reads the CT (its own kind), the rest of their model is everyone's
    assert cor.model.appearance and cor.model.appearance_kind == "intensity"
    assert cor.model.grid_sizes == lv.model.grid_sizes and cor.model.latent_dim == lv.model.latent_dim
    q = load_params(PROJECT / "params/default.yaml",
                    {"stage1.overrides": {"LAA": {"model": {"grid_sizes": [4, 8], "grid_channels": [64, 48]},
                                                  "threshold": 0.4}}}).stage1
    laa = q.for_class("LAA")
    assert laa.model.grid_sizes == (4, 8) and laa.model.latent_dim == 256 and laa.threshold == 0.4
    assert q.for_class("Cor").threshold == 0.3  # overrides merge: the file's Cor block stays
    with pytest.raises(ValueError, match="gama"):  # at load time, not when LV's job runs
        load_params(PROJECT / "params/default.yaml", {"stage1.overrides": {"LV": {"loss": {"gama": 2}}}})


def test_the_coronary_band_keeps_its_width_in_its_box_on_any_grid(tmp_path, monkeypatch):
    """The judging configuration's coronary band is 2 % of its box whatever the class grid (2 voxels
    at 96^3, 3 at its 144^3: with 2 there the thin family's fields came out 2.5-3.6x their input),
    never below the base radius; without ``band_box_share`` (default.yaml) the radius stays; and the
    fit builds its store with the radius of the class's own grid."""
    judging = load_params(PROJECT / "params/phantom_1mm.yaml")
    cor = judging.stage1.for_class("Cor")
    assert [cor.band_on_grid(r).sampling.sampling_dilation_radius for r in (16, 96, 128, 144, 192)] == [2, 2, 3, 3, 4]
    assert judging.prepare.class_resolution_for("Cor") == 144
    assert cor.band_on_grid(144).sampling.bias_schedule == cor.sampling.bias_schedule  # only the radius moves
    plain = load_params(PROJECT / "params/default.yaml").stage1.for_class("Cor")
    assert plain.band_on_grid(192) is plain and plain.sampling.sampling_dilation_radius == 2
    # 0.021 x 120 = 2.52: 3 voxels on a 120^3 Cor grid (test.yaml's others are 16^3); the store and the
    # sampler are built as a fit builds them, the optimisation itself (not what is tested) left out
    over = {"prepare.class_resolution_overrides": {"Cor": 120},
            "stage1.overrides": {"Cor": {"sampling": {"band_box_share": 0.021}}}}
    run = start_run(load_test_params(over, run_dir=str(tmp_path)), progress=False)
    prepare.prepare_run(run)
    assert run.params.stage1.sampling.sampling_dilation_radius == 2
    assert stage1.class_fit_params(run, "Cor", run.params.stage1).sampling.sampling_dilation_radius == 3
    tasks = []
    monkeypatch.setattr(stage1, "fit", lambda model, task, *args, **kwargs: tasks.append(task))
    _, data, _ = stage1.fit_class(run, "Cor", run.params.stage1, progress=False)
    assert data.store.spec.dilation_radius == 3 and tasks[0].sampler.params.sampling_dilation_radius == 3
    assert tasks[0].sampler.params.bias_schedule == run.params.stage1.for_class("Cor").sampling.bias_schedule


def test_repair_beats_a_noisy_mask_with_islands_and_stairs():
    """The auto-decoder + clean-up recover a smooth shape from a stair-cased, island-ridden one."""
    import torch

    from nearfix_lib.core.config import CleanupParams, ModelParams, SamplingParams, Stage1Params, TrainParams
    from nearfix_lib.core.geometry import Box, roi_grid
    from nearfix_lib.field.infer import field_on_grid
    from nearfix_lib.field.train import fit
    from nearfix_lib.repair.cleanup import clean_mask

    shape = (30, 24, 20)
    ii, jj, kk = np.meshgrid(*[np.arange(s) + 0.5 for s in shape], indexing="ij")
    truths, noisy = [], []
    rng = np.random.default_rng(0)
    for c in ([15, 12, 10], [14, 11, 9]):
        t = ((ii - c[0]) / 11) ** 2 + ((jj - c[1]) / 8) ** 2 + ((kk - c[2]) / 6) ** 2 < 1
        n = np.repeat(np.repeat(t[1::3, 1::3], 3, axis=0), 3, axis=1)[: shape[0], : shape[1]]  # stair-case
        for _ in range(4):  # islands
            p = rng.integers(0, 3, 3) + [0, 0, 16]
            n[p[0]:p[0] + 2, p[1]:p[1] + 2, p[2]:p[2] + 2] = True
        truths.append(t)
        noisy.append(n)
    torch.manual_seed(0)
    params = Stage1Params(model=ModelParams(latent_dim=32, grid_channels=(32, 16), grid_sizes=(4, 8)),
                          sampling=SamplingParams(points_per_case=1024, bias_schedule=[]),
                          train=TrainParams(epochs=150, cases_per_batch=2, eval_interval=150, lr_step_epochs=0))
    model = stage1.build_model(2, params)
    tmp = __import__("tempfile").mkdtemp()
    task = stage1.Stage1Task(stage1.write_mask_store(tmp + "/cases", noisy, params.sampling), params, seed=0,
                             device="cpu")
    fit(model, task, params.train, tmp + "/ckpt", progress=False)
    box = Box((0, 0, 0), shape)
    for i, (t, n) in enumerate(zip(truths, noisy)):
        pred = field_on_grid(model, i, roi_grid(box, shape), box)[..., 0] >= 0.5
        pred, _ = clean_mask(pred, 1, (1, 1, 1), CleanupParams())
        dice = lambda a, b: 2 * np.sum(a & b) / (a.sum() + b.sum())  # noqa: E731
        assert dice(pred, t) > dice(n, t) + 0.01, (dice(pred, t), dice(n, t))


@pytest.mark.parametrize("kind", ["encoder", "intensity"])
def test_appearance_branch_runs_end_to_end(tmp_path, kind):
    """in_ch 323 (encoder) or 166 (intensity): the CT cropped to the class ROI feeds the branch; prepare
    crops it for the classes whose model reads it, and again when that changes."""
    over = {"stage1.overrides.LV.model": {"appearance": True, "appearance_kind": kind},  # what is tested
            # it has to run, not learn: 2 epochs instead of test.yaml's, evaluated at the last
            "stage1.train": {"epochs": 2, "eval_interval": 2}}
    shape_only = start_run(load_test_params({"stage1.train": over["stage1.train"]}, run_dir=str(tmp_path)),
                           progress=False)
    prepare.prepare_run(shape_only)
    first = shape_only.cases[0].case_id
    for key, cropped in (("LV", False), ("Cor", True)):  # the coronaries' field reads the CT by default
        with np.load(shape_only.path("prepared", first, f"class_{key}.npz")) as z:
            assert ("image" in z.files) == cropped, key
    run = start_run(load_test_params(over, run_dir=str(tmp_path)), progress=False)
    assert prepare.image_classes(run) == ("LV", "Cor")
    prepare.prepare_run(run)  # the same run folder: prepared again, since the LV model now reads the CT
    for key, cropped in (("LV", True), ("Myo", False)):
        with np.load(run.path("prepared", first, f"class_{key}.npz")) as z:
            assert ("image" in z.files) == cropped, key
    model, data, _ = stage1.fit_class(run, "LV", run.params.stage1, progress=False)
    m = run.params.stage1.for_class("LV").model  # coordinates + one feature vector per grid scale + the CT's
    width = m.appearance_channels if kind == "encoder" else len(m.appearance_sigmas)
    assert model.in_channels == 3 + sum(m.grid_channels) + width
    assert data.images is not None and -1.0 <= data.images[0].min() and data.images[0].max() <= 1.0
    # the inputs are read from the store on disk for each batch, not held: what the prepared crop gives
    assert data.case_ids[0] == first
    with np.load(run.path("prepared", first, "class_LV.npz")) as z:
        expected = appearance_input(m, stage1.normalise_ct(z["image"]))
    assert data.images.paths[0] == stage1.stage1_cases_dir(run, "LV") / first / stage1.appearance_file(m)
    assert data.images.batch([0]).shape == (1, *expected.shape)
    # the intensity branch's smoothings are stored in float16 (half the disk), the encoder's crop as it is
    tol = 1e-3 if kind == "intensity" else 0.0
    assert np.allclose(data.images.batch([0])[0].numpy(), expected, atol=tol, rtol=0)
    # a store written without them (the branch was off) gets them when the branch is turned on
    data.images.paths[0].unlink()
    again = stage1.load_stage1_data(run, "LV", run.params.stage1.for_class("LV"), with_images=True)
    assert np.allclose(again.images.batch([0])[0].numpy(), expected, atol=tol, rtol=0)
    # a repair reads what the fit read, from the store, not a fresh smoothing
    assert torch.equal(stage1.class_image(run, first, "LV", m, "cpu"), again.images.batch([0]))
    table = stage1.repair_class(run, "LV", progress=False)
    assert run.cases and len(table) == len(run.cases) * 3  # per case: stage1 vs noisy, noisy and stage1 vs truth
    # the interactive repair reads the same input: a click refits the latent with the CT's features
    from nearfix_lib.field.refine import Click
    from nearfix_lib.stages.edits import open_edit

    edit = open_edit(run, first, source="stage1:LV", with_image=False)
    assert torch.allclose(edit.session.field.image[0].cpu(), torch.from_numpy(expected), atol=tol)
    box = edit.session.field.box
    inside = np.argwhere(edit.session.labels[box.slices] > 0)[0] + np.asarray(box.lo)
    world = tuple(float(v) for v in (run.load(first, with_image=False).label.affine @ [*inside, 1.0])[:3])
    refined = edit.session.click(Click(world, 0))
    assert refined.steps > 0 and not torch.equal(edit.session.latent, edit.session.start_latent)


def test_a_case_without_the_class_is_listed_not_fatal(tiny_run, tmp_path):
    """An empty class in one case: prepare records it, stage 1 leaves that case out and says so."""
    import shutil

    from nearfix_lib.core.io import read_label, write_nifti

    root = tmp_path / "data"
    shutil.copytree(tiny_run.data_root, root)
    lab = read_label(root / "segmentations" / "2.label.nii.gz", tiny_run.table)
    write_nifti(root / "segmentations" / "2.label.nii.gz",
                np.where(lab.array == tiny_run.table["LAA"].index, 0, lab.array), lab.affine, lab.header)
    run = start_run(load_test_params(data_root=str(root), run_dir=str(tmp_path / "run")), progress=False)
    crops = {c.case_id: c for c in prepare.prepare_run(run)}
    assert crops["2"].missing == ["LAA"] and not crops["1"].missing
    data = stage1.load_stage1_data(run, "LAA", run.params.stage1.for_class("LAA"))
    assert data.case_ids == ["1"] and data.absent == ["2"]
    assert data.store.case_ids == ["1"]
    assert sorted(f.name for f in data.store.folder(0).iterdir()) == ["band.npy", "foreground.npy", "meta.json"]


def test_a_run_without_stage3_edits_one_class_with_its_stage1_model(tiny_run):
    """The interactive repair's stage-1 path: the class's M^ref shown in the class's index, a click
    re-fits the case's code of F_c, Save writes edits/stage1_KEY/ and the latent beside the fit."""
    from scipy import ndimage

    from nearfix_lib.core.config import RefineParams
    from nearfix_lib.core.geometry import apply_affine
    from nearfix_lib.field.infer import encode_case, probabilities_at
    from nearfix_lib.field.refine import Click, read_edited_latents
    from nearfix_lib.stages.edits import edit_sources, open_edit, save_edit

    fit_and_repair(tiny_run, "LA")  # loads the finished fit when an earlier test made it
    assert "stage1:LA" in edit_sources(tiny_run) and "stage3" not in edit_sources(tiny_run)
    la = tiny_run.table["LA"].index
    # a strong click (the defaults are cautious): this test is about the path, test_refine about the fit
    edit = open_edit(tiny_run, "1", "stage1:LA", params=RefineParams(click_weight=30, steps=20), with_image=False)
    shown = edit.session.labels.copy()
    mask = nib.load(str(stage1.stage1_dir(tiny_run, "LA") / "masks" / "1.nii.gz"))  # may be empty: shown too
    assert np.array_equal(shown > 0, np.asarray(mask.dataobj) > 0) and set(np.unique(shown)) <= {0, la}
    box = edit.session.field.box
    target = np.asarray([(a + b) // 2 for a, b in zip(box.lo, box.hi)])  # the class box's centre
    if shown[tuple(target)] == la:  # then a voxel just outside the class, inside its box
        rim = ndimage.binary_dilation(shown == la) & (shown != la)
        inside = np.zeros_like(rim)
        inside[box.slices] = True
        target = np.argwhere(rim & inside)[0]
    at = apply_affine(edit.affine, target[None].astype(float))
    field = edit.session.field

    def p_la(latent):
        with torch.no_grad():
            encoded = encode_case(field.model, 0, "cpu", latent=latent)
            return float(probabilities_at(field.model, encoded, field.normalised(at), "cpu")[0, 0])

    done = edit.session.click(Click(tuple(at[0]), la))
    assert done.steps >= 1 and p_la(edit.session.latent) > p_la(edit.session.start_latent)
    with pytest.raises(ValueError, match="no head"):
        edit.session.click(Click(tuple(apply_affine(edit.affine, target[None].astype(float))[0]), 3))
    written = save_edit(edit)
    assert written["labels"] == tiny_run.dir / "edits" / "stage1_LA" / "1.nii.gz"
    assert "1" in read_edited_latents(stage1.stage1_dir(tiny_run, "LA") / "edits.pt")
    again = open_edit(tiny_run, "1", "stage1:LA", with_image=False)
    assert np.array_equal(again.session.labels, edit.session.labels)


def test_the_myocardiums_mref_leaves_the_inputs_coronary_voxels_to_them_where_yield_to_names_them():
    """``anatomy.yield_to: [Cor]``: a myocardial field that fills the groove a coronary runs in on its surface
    gives the input's vessel voxels back, last (no clean-up after it fills them in again), and reports them;
    a sliver of wall that cuts off goes by the class's component rules; the field's other voxels, its own
    class's and a class not named stay."""
    import dataclasses

    from nearfix_lib.core.config import CleanupParams, RepairAnatomyParams, Stage1Params
    from nearfix_lib.core.geometry import Box

    shape, spacing = (30, 14, 11), (0.9, 0.8, 1.2)
    labels = np.zeros(shape, np.uint8)
    labels[:, :, 0:5] = CARDIAC["Myo"].index  # a slab of wall
    groove = np.zeros(shape, bool)
    groove[3:27, 5:10, 4:6] = True  # a vessel sunk into the wall's surface, 5 x 2 voxels across
    labels[groove] = CARDIAC["Cor"].index
    labels[10:14, 2:4, 5] = CARDIAC["RV"].index  # another class on the surface, not named
    given = labels == CARDIAC["Myo"].index
    field = np.zeros(shape, bool)
    field[:, :, 0:6] = True  # the field's smooth wall: the groove filled, the RV voxels and a rim added
    bits = field.astype(np.uint8)
    base = dataclasses.replace(Stage1Params(), cleanup=CleanupParams(keep_expected=False))
    on = dataclasses.replace(base, anatomy=RepairAnatomyParams(yield_to=["Cor", "absent"]))
    plain = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Myo", CARDIAC, spacing)
    assert plain.yielded is None
    assert np.array_equal(stage1.mref_of(given, bits, 1, spacing, base, plain).mask, field)
    around = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Myo", CARDIAC, spacing, on.anatomy)
    assert np.array_equal(around.yielded, groove)
    made = stage1.mref_of(given, bits, 1, spacing, on, around)
    assert np.array_equal(made.mask, field & ~groove)
    assert made.columns()["anatomy_yielded_voxels"] == groove.sum()
    sliver = np.zeros(shape, bool)
    sliver[5:25, 7, 6] = True  # the field's wall runs over the vessel: taking the vessel cuts this off
    over = (field | sliver).astype(np.uint8)
    cut = stage1.mref_of(given, over, 1, spacing, dataclasses.replace(on, cleanup=CleanupParams()), around)
    assert np.array_equal(cut.mask, field & ~groove)  # the sliver goes (one expected piece), the groove stays open
    own = stage1.box_anatomy(labels, Box((0, 0, 0), shape), "Cor", CARDIAC, spacing, on.anatomy)
    assert own.yielded is None  # a class never yields to itself
