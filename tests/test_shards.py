"""Per-case stages split over processes and SLURM array tasks (``stages.shards``): the same tables
however the cases are split, a merge that names what is missing, and resume at case granularity.

One tiny run (params/test.yaml, three phantom cases, stage 1 fitted for one class) is copied
for each way of running prepare, stage 2 and the report; their tables are compared byte for byte.
Stage 3's decoding runs on a copy with stage 2 done and the unified model fitted: its maps and
skipped.csv byte for byte, its scores as written but for the wall-time column ``decode_s``.
"""

import dataclasses
import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from params_for_tests import load_test_params

from nearfix_lib.core.io import InputError
from nearfix_lib.core.workspace import Run, case_dir, open_run, prepared_dir
from nearfix_lib.field.unified import UnifiedModel, fit_thresholds
from nearfix_lib.stages import cli, prepare, report, shards, stage1, stage2, stage3
from nearfix_lib.stages.runs import start_run
from nearfix_lib.stages.shards import CaseStage, Shard

THREE_CASES = {"data.phantom.n_cases": 3}  # three cases: two shards of unequal size
TABLES = ["prepared/crops.json", "stage2/scores.csv", "stage2/checks.csv", "stage2/audit.csv",
          "report/scores.csv", "report/checks.csv", "skipped.csv"]


def open_copy(source, dest, overrides=None):
    """A run folder copied from ``source``, opened as a task of a SLURM array opens it."""
    if not dest.exists():
        shutil.copytree(source, dest)
    return start_run(load_test_params({**THREE_CASES, **(overrides or {})}, run_dir=str(dest)), progress=False)


def table_bytes(run_dir):
    return {name: (run_dir / name).read_bytes() for name in TABLES if (run_dir / name).is_file()}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Prepared, and stage 1 fitted and repaired for one class (what stage 2 needs)."""
    folder = tmp_path_factory.mktemp("shards") / "fitted"
    run = start_run(load_test_params(THREE_CASES, run_dir=str(folder)), progress=False)
    prepare.prepare_run(run, progress=False)
    stage1.fit_class(run, "Cor", run.params.stage1, progress=False)
    stage1.repair_class(run, "Cor", progress=False)
    return folder


@pytest.fixture(scope="module")
def unsharded(fitted):
    """Stage 2 and the report in one process, as the notebooks run them: the reference tables."""
    run = open_copy(fitted, fitted.parent / "unsharded")
    stage2.run_stage2(run, progress=False)
    report.run_compare(run, progress=False)
    tables = table_bytes(run.dir)
    assert set(tables) == set(TABLES)
    return tables


def test_shards_parse_and_split_the_cases():
    assert Shard.parse("1/3") == Shard(1, 3) and str(Shard(1, 3)) == "1/3"
    ids = [str(i) for i in range(1, 8)]
    assert Shard(1, 3).select(ids) == ["2", "5"]
    parts = [Shard(i, 3).select(ids) for i in range(3)]
    assert sorted(sum(parts, []), key=int) == ids and sum(map(len, parts)) == len(ids)
    assert Shard(0, 1).select(ids) == ids
    for bad in ("3/3", "-1/2", "x", "1/0", "1/2/3", ""):
        with pytest.raises(ValueError, match="i/n"):
            Shard.parse(bad)


def test_shards_run_apart_then_merged_write_the_unsharded_tables(fitted, unsharded, tmp_path, capsys):
    folder = tmp_path / "sharded"
    shutil.copytree(fitted, folder)
    for name in ("prepared/crops.json", "prepared/parts"):  # prepare again, as two tasks
        shutil.rmtree(folder / name) if (folder / name).is_dir() else (folder / name).unlink()
    steps = ((prepare.prepare_run, "prepared/crops.json"), (stage2.run_stage2, "stage2/scores.csv"),
             (report.run_compare, "report/scores.csv"))
    for function, table in steps:
        first = function(open_copy(fitted, folder), progress=False, shard="0/2")  # each task opens the run
        assert not (folder / table).exists()  # its share is done, the other one is missing
        assert "1 of 3 cases missing (ids 2)" in capsys.readouterr().out
        tables = first.values() if isinstance(first, dict) else first if isinstance(first, tuple) else [first]
        assert all(len(t) == 0 for t in tables)  # nothing to return before every case is done
        function(open_copy(fitted, folder), progress=False, shard=Shard(1, 2))  # the last task merges
        assert (folder / table).is_file()
    assert table_bytes(folder) == unsharded
    # `nearfix merge` writes them again from the parts
    for name in ("stage2/scores.csv", "stage2/checks.csv", "stage2/audit.csv"):
        (folder / name).unlink()
    assert cli.main(["merge", "stage2", "--run-dir", str(folder)]) == 0
    assert table_bytes(folder) == unsharded
    # a stage-2 map written again makes that case's report part stale: only it is scored again
    parts = {cid: folder / "report" / "parts" / f"{cid}.json" for cid in ("1", "2", "3")}
    before = {cid: p.stat().st_mtime_ns for cid, p in parts.items()}
    os.utime(folder / "stage2" / "labels" / "2.nii.gz", ns=(before["2"] + 10**9,) * 2)
    report.run_compare(open_copy(fitted, folder), progress=False)
    assert "report: 2 of 3 cases already done" in capsys.readouterr().out
    after = {cid: p.stat().st_mtime_ns for cid, p in parts.items()}
    assert after["1"] == before["1"] and after["3"] == before["3"] and after["2"] != before["2"]
    assert table_bytes(folder) == unsharded


def test_stage2_fuses_on_the_roi_grid_only_for_roi_supervision(fitted, unsharded, tmp_path):
    """The ROI-grid fusion (ten field evaluations on up to 256^3 points) is made only for its one reader."""
    assert not (fitted.parent / "unsharded" / "stage2" / "roi").exists()
    assert "roi" not in pd.read_csv(fitted.parent / "unsharded" / "stage2" / "audit.csv")["grid"].values
    run = open_copy(fitted, tmp_path / "roi", {"stage3.supervision": "roi"})
    stage2.run_stage2(run, progress=False)
    res = run.params.prepare.heart_resolution
    for cid in ("1", "2", "3"):
        with np.load(run.dir / "stage2" / "roi" / f"{cid}.npz") as z, \
                np.load(case_dir(prepared_dir(run), cid) / "heart.npz") as heart:
            # every class stage 1 did not repair comes from the input (the coronaries, from their field,
            # may lose their pieces to the distance rule on this 24^3 grid)
            assert z["labels"].shape == (res,) * 3
            assert set(np.unique(z["labels"])) - {9} == set(np.unique(heart["labels"])) - {9}
    audit = pd.read_csv(run.dir / "stage2" / "audit.csv")
    assert set(audit["grid"]) == {"original", "roi"} and ((audit["grid"] == "roi") & (audit["key"] == "Cor")).any()
    original = ["stage2/labels/1.nii.gz", "stage2/scores.csv"]  # the original grid is the same either way
    assert all((run.dir / f).read_bytes() == (fitted.parent / "unsharded" / f).read_bytes() for f in original)


def test_stage2_fuses_the_classes_stage1_left_unrepaired_as_the_input_gives_them(fitted, unsharded, tmp_path):
    """Only the coronaries were repaired: every other class of L^ref is the input's (through the rules, which
    now have the neighbours they test: atria, myocardium, aorta), and audit.csv says where each came from."""
    from nearfix_lib.core.metrics import dice

    run = open_run(fitted.parent / "unsharded")
    audit = pd.read_csv(run.dir / "stage2" / "audit.csv", dtype={"case": str})
    taken = audit[audit["rule"] == "input"]
    assert "Cor" not in set(taken["key"]) and {"LV", "LA", "LAA", "Myo"} <= set(taken["key"])
    for case in run.cases:
        fused = np.asarray(nib.load(str(run.dir / "stage2" / "labels" / f"{case.case_id}.nii.gz")).dataobj)
        given = np.asarray(nib.load(str(case.label)).dataobj)
        for key in ("LV", "LA", "RA", "Myo"):  # the chambers: the input's, give or take the rules
            index = run.table[key].index
            assert dice(fused == index, given == index) > 0.9
        assert set(taken[taken["case"] == case.case_id]["key"]) == {
            c.key for c in run.table if c.key != "Cor" and (given == c.index).any()}
    # stage2.unrepaired: absent leaves them out (what the scale benchmark's two-class runs measure)
    alone = open_copy(fitted, tmp_path / "absent", {"stage2.unrepaired": "absent"})
    stage2.run_stage2(alone, progress=False)
    fused = np.asarray(nib.load(str(alone.dir / "stage2" / "labels" / "1.nii.gz")).dataobj)
    assert set(np.unique(fused)) <= {0, 9} and 9 in fused
    assert "input" not in set(pd.read_csv(alone.dir / "stage2" / "audit.csv")["rule"])


def test_report_takes_stage2s_rows_or_scores_them_itself_alike(fitted, unsharded, tmp_path, monkeypatch):
    """The report takes noisy, stage 1 and stage 2 from stage 2's current parts; without them (or
    with a stale one) it scores them itself, and the tables are the same."""
    scored = []
    score_labels = report.score_labels
    monkeypatch.setattr(report, "score_labels", lambda *a, **k: scored.append(a[1]) or score_labels(*a, **k))
    run = open_copy(fitted.parent / "unsharded", tmp_path / "reused")
    shutil.rmtree(run.dir / "report")
    report.run_compare(run, progress=False)
    assert set(scored) == {"gaussian", "closing"}  # no stage-3 map in this run
    assert table_bytes(run.dir) == unsharded
    parts = run.dir / "stage2" / "parts"  # one part gone, one stale (another stamp): those cases are scored here
    (parts / "1.json").unlink()
    (parts / "2.json").write_text((parts / "2.json").read_text().replace('"roi_grid": false', '"roi_grid": true'))
    shutil.rmtree(run.dir / "report")
    scored.clear()
    report.run_compare(run, progress=False)
    assert sorted(scored).count("noisy") == 2 and sorted(scored).count("stage2") == 2
    assert table_bytes(run.dir) == unsharded


def test_worker_processes_write_the_same_tables(fitted, unsharded, tmp_path):
    folder = tmp_path / "workers"
    run = open_copy(fitted, folder)
    stage2.run_stage2(run, progress=False, workers=2)  # each worker loads the stage-1 fields once
    # the command line, as a job runs it: the run's own params.yaml, two workers
    assert cli.main(["run", "report", "--params", str(folder / "params.yaml"), "--run-dir", str(folder),
                     "--workers", "2", "--no-progress"]) == 0
    assert table_bytes(folder) == unsharded


def test_merge_names_the_missing_cases_and_writes_nothing(fitted, tmp_path, capsys):
    folder = tmp_path / "partial"
    report.run_compare(open_copy(fitted, folder), progress=False, shard="0/3")
    capsys.readouterr()
    assert cli.main(["merge", "report", "--run-dir", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "report: 2 of 3 cases missing (ids 2, 3): run the missing shards or `nearfix merge report" in out
    assert sorted(p.name for p in (folder / "report").iterdir()) == ["parts"]
    assert sorted(p.name for p in (folder / "report" / "parts").iterdir()) == ["1.json"]


def test_repair_of_every_class_reads_each_case_once_and_writes_what_each_class_repair_writes(
        fitted, tmp_path, monkeypatch, capsys):
    """``nearfix run repair`` (stage 1's M^ref of every fitted class, per case) as two array tasks:
    after the class notebooks it reuses their masks; without them it reads each case once for both
    classes and writes the masks and scores of the per-class repair."""
    folder = tmp_path / "repair"
    two = {"stage1.classes": ["LV", "Cor"]}
    run = open_copy(fitted, folder, two)
    stage1.fit_class(run, "LV", run.params.stage1, progress=False)
    per_class = {key: stage1.repair_class(run, key, progress=False) for key in ("LV", "Cor")}
    masks = {(key, cid): folder / "stage1" / key / "masks" / f"{cid}.nii.gz"
             for key in ("LV", "Cor") for cid in ("1", "2", "3")}
    written = {name: (read_mask(path), path.stat().st_mtime_ns) for name, path in masks.items()}
    reads = []
    load = Run.load
    monkeypatch.setattr(Run, "load", lambda self, case_id, **kw: reads.append(case_id) or load(self, case_id, **kw))

    def repair_in_two_tasks():
        assert stage1.repair_run(open_copy(fitted, folder, two), progress=False, shard="0/2") is None
        assert "1 of 3 cases missing (ids 2)" in capsys.readouterr().out
        tables = stage1.repair_run(open_copy(fitted, folder, two), progress=False, shard="1/2")
        for key in ("LV", "Cor"):
            assert tables[key].equals(per_class[key])
            assert (folder / "stage1" / key / "scores.csv").read_text() == per_class[key].to_csv(index=False)

    repair_in_two_tasks()  # after the class notebooks: nothing is read or written again
    assert reads == [] and all(path.stat().st_mtime_ns == written[name][1] for name, path in masks.items())
    for key in ("LV", "Cor"):  # now without them
        for name in ("masks", "parts"):
            shutil.rmtree(folder / "stage1" / key / name)
        (folder / "stage1" / key / "scores.csv").unlink()
    shutil.rmtree(folder / "stage1" / "parts")
    repair_in_two_tasks()
    assert sorted(reads) == ["1", "2", "3"]  # once per case, not once per class
    for name, path in masks.items():
        assert np.array_equal(read_mask(path), written[name][0])
    # a class whose fit is missing stops the repair with a message naming it
    shutil.rmtree(folder / "stage1" / "LV" / "ckpt")
    with pytest.raises(ValueError, match=r"\['LV'\] have no finished fit"):
        stage1.repair_run(open_copy(fitted, folder, two), progress=False)


def read_mask(path):
    return np.asarray(nib.load(str(path)).dataobj)


# -- resume, failures and stamps, on a stage that counts its calls --------------------------------

CALLS: list[str] = []
BEHAVIOUR = {"kill at": None, "bad": None, "stamp": 1}


def toy_work(run, case_id, state):
    CALLS.append(case_id)
    if case_id == BEHAVIOUR["kill at"]:
        raise KeyboardInterrupt  # the job is killed while it computes this case
    if case_id == BEHAVIOUR["bad"]:
        raise InputError(f"{case_id}.nii.gz", "unreadable")
    return {"values": [{"case": case_id, "value": 10 * int(case_id) + state}]}


def toy_write(run, rows):
    return shards.write_tables(run.path("toy"), rows)


TOY = CaseStage("toy", ("values",), toy_work, toy_write, setup=lambda run: 7,
                stamp=lambda run, case_id: BEHAVIOUR["stamp"])


def test_a_killed_run_resumes_without_recomputing_done_cases(fitted, tmp_path, capsys):
    run = open_copy(fitted, tmp_path / "toy")
    table = run.path("toy", "values.csv")
    BEHAVIOUR["kill at"] = "2"
    with pytest.raises(KeyboardInterrupt):
        shards.run_stage(run, TOY, progress=False)
    assert CALLS == ["1", "2"] and not table.exists()
    BEHAVIOUR["kill at"] = None
    CALLS.clear()
    shards.run_stage(run, TOY, progress=False)
    assert CALLS == ["2", "3"]  # case 1 was done before the kill
    assert "toy: 1 of 3 cases already done" in capsys.readouterr().out
    assert table.read_text() == "case,value\n1,17\n2,27\n3,37\n"
    # a bad case: one line, listed in skipped.csv, the other cases go on; the next run tries it again
    BEHAVIOUR.update(bad="2", stamp=2)  # another stamp: every case is stale
    CALLS.clear()
    shards.run_stage(run, TOY, progress=False)
    assert CALLS == ["1", "2", "3"] and "skipped case 2: 2.nii.gz: unreadable" in capsys.readouterr().out
    assert table.read_text() == "case,value\n1,17\n3,37\n"
    assert "toy,2,2.nii.gz: unreadable" in run.path("skipped.csv").read_text()
    BEHAVIOUR["bad"] = None
    CALLS.clear()
    shards.run_stage(run, TOY, progress=False)
    assert CALLS == ["2"] and table.read_text() == "case,value\n1,17\n2,27\n3,37\n"
    assert "toy," not in run.path("skipped.csv").read_text()  # fixed: its row is gone


# -- stage 3's decoding (nearfix run decode) ------------------------------------------------------

@pytest.fixture(scope="module")
def fitted3(unsharded, fitted):
    """Stage 2 done (the unsharded run) and the unified model fitted and saved: what decoding reads."""
    run = open_copy(fitted.parent / "unsharded", fitted.parent / "fitted3")
    data = stage3.load_stage3_data(run)
    model, task, _ = stage3.fit_unified(run, data, progress=False)
    stage3.make_artifact(run, model, task, data)
    return run.dir


def test_thresholds_are_fitted_on_a_fixed_subset_of_the_cases(fitted3, tmp_path, monkeypatch):
    """Fitting t_c decodes whole boxes: on ``threshold_cases`` of them, so its cost does not grow with N."""
    run = open_copy(fitted3, tmp_path / "thresholds")
    data = stage3.load_stage3_data(run)
    model, task, _ = stage3.fit_unified(run, data, progress=False)  # finished: loaded, not fitted again
    decoded, slabs, probabilities = [], task.probability_slabs, task.probabilities
    monkeypatch.setattr(task, "probability_slabs", lambda m, i: decoded.append(i) or slabs(m, i))
    params = dataclasses.replace(run.params.stage3, threshold_cases=2)
    task.chunk = 700  # counted slab by slab, several per case: the pooled counts of the whole maps
    unified = stage3.assemble(run, model, task, data, params)
    chosen = stage3.threshold_case_indices(3, params, run.params.run.seed)
    assert decoded == chosen and len(chosen) == 2
    expected = fit_thresholds(((probabilities(model, i), data.store.labels(i)) for i in chosen), run.table,
                              params.threshold_candidates)
    assert np.array_equal(unified.thresholds, expected)
    decoded.clear()
    stage3.assemble(run, model, task, data, dataclasses.replace(params, threshold_cases=0))
    assert decoded == [0, 1, 2]


def test_decoding_chunk_by_chunk_is_the_decision_on_the_whole_probability_map(fitted3):
    from nearfix_lib.field.unified import decode_priority

    unified = UnifiedModel.load(fitted3 / "stage3" / "unified.pt")
    unified.chunk_points = 700  # many chunks, one not a whole number of slabs
    geo = unified.geometry["2"]
    whole = np.zeros(geo.shape, np.uint8)
    whole[geo.heart_box.slices] = decode_priority(unified.probabilities("2"), unified.table, unified.thresholds)
    assert whole.any() and np.array_equal(unified.decode("2"), whole)
    roi = decode_priority(unified.probabilities("2", grid="roi"), unified.table, unified.thresholds)
    assert np.array_equal(unified.decode("2", grid="roi"), roi)


def decoded(run_dir):
    """The decoded maps (bytes), ``skipped.csv`` and ``stage3/scores.csv`` as written, but for
    ``decode_s``: a wall time, it differs between any two runs (checked to be there, and > 0)."""
    files = {p.name: p.read_bytes() for p in sorted((run_dir / "stage3" / "labels").glob("*.nii.gz"))}
    files["skipped.csv"] = (run_dir / "skipped.csv").read_bytes()
    scores = pd.read_csv(run_dir / "stage3" / "scores.csv", dtype=str, keep_default_na=False)
    seconds = scores.pop("decode_s")
    timed = scores["source"] == "stage3"  # the decoded map's rows; noisy and L^ref are not decoded
    assert timed.any() and (pd.to_numeric(seconds[timed]) > 0).all() and (seconds[~timed] == "").all()
    return files, scores


@pytest.fixture(scope="module")
def decoded_once(fitted3):
    """Every case decoded in one process, as the notebook does: the reference."""
    run = open_copy(fitted3, fitted3.parent / "decoded_once")
    stage3.decode_and_score(run, progress=False)
    files, scores = decoded(run.dir)
    assert sorted(scores["case"].unique()) == ["1", "2", "3"] and len(files) == 4
    return files, scores


def test_decoding_in_shards_and_workers_writes_what_one_process_writes(fitted3, decoded_once, tmp_path, capsys):
    folder = tmp_path / "decode"
    # task 0 of 2 from the command line, on two worker processes (each loads unified.pt once)
    open_copy(fitted3, folder)
    assert cli.main(["run", "decode", "--params", str(folder / "params.yaml"), "--run-dir", str(folder),
                     "--workers", "2", "--no-progress", "--shard", "0/2"]) == 0
    assert "decode: 1 of 3 cases missing (ids 2)" in capsys.readouterr().out
    assert not (folder / "stage3" / "scores.csv").exists()
    table = stage3.decode_and_score(open_copy(fitted3, folder), progress=False, shard="1/2")  # the last task
    assert len(table) and (folder / "stage3" / "scores.csv").is_file()
    files, scores = decoded(folder)
    assert files == decoded_once[0]
    pd.testing.assert_frame_equal(scores, decoded_once[1])
    (folder / "stage3" / "scores.csv").unlink()
    assert cli.main(["merge", "decode", "--run-dir", str(folder)]) == 0  # again, from the parts
    pd.testing.assert_frame_equal(decoded(folder)[1], decoded_once[1])


def test_decoding_resumes_goes_stale_with_a_new_artifact_and_skips_a_bad_lref(fitted3, decoded_once, tmp_path,
                                                                             capsys):
    run = open_copy(fitted3, tmp_path / "resume")
    parts = {cid: run.dir / "stage3" / "parts" / f"{cid}.json" for cid in ("1", "2", "3")}
    stage3.decode_and_score(run, progress=False, shard="0/2")  # killed after its share: cases 1 and 3
    done = {cid: parts[cid].stat().st_mtime_ns for cid in ("1", "3")}
    assert not parts["2"].exists()
    stage3.decode_and_score(run, progress=False)
    assert "decode: 2 of 3 cases already done" in capsys.readouterr().out
    assert {cid: parts[cid].stat().st_mtime_ns for cid in ("1", "3")} == done  # not decoded again
    assert decoded(run.dir)[0] == decoded_once[0]
    # a model written again (a refit; a second later, whatever the file system's time resolution)
    # makes every case stale
    artifact = stage3.artifact_path(run)
    written = artifact.stat().st_mtime_ns
    UnifiedModel.load(artifact).save(artifact)
    os.utime(artifact, ns=(written + 10**9,) * 2)
    before = {cid: p.stat().st_mtime_ns for cid, p in parts.items()}
    stage3.decode_and_score(run, progress=False)
    assert "already done" not in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns != before[cid] for cid, p in parts.items())
    # a corrupt and a missing L^ref: one line each, in skipped.csv; the other case goes on
    lref = {cid: run.dir / "stage2" / "labels" / f"{cid}.nii.gz" for cid in ("2", "3")}
    lref["2"].write_bytes(lref["2"].read_bytes()[:400])
    lref["3"].unlink()
    table = stage3.decode_and_score(run, progress=False)
    out = capsys.readouterr().out
    assert f"skipped case 2: {lref['2']}: corrupt voxel data" in out
    assert f"skipped case 3: {lref['3']}: file not found" in out
    assert sorted(table["case"].unique()) == ["1"]
    skipped = (run.dir / "skipped.csv").read_text()
    assert "decode,2," in skipped and "decode,3," in skipped


def test_the_comparison_fit_decodes_into_its_own_folder_and_writes_no_maps(fitted3, tmp_path):
    run = open_copy(fitted3, tmp_path / "no_distill")
    (run.dir / "stage3" / "no_distill").mkdir()
    shutil.copy(stage3.artifact_path(run), stage3.artifact_path(run, "no_distill"))
    table = stage3.decode_and_score(run, progress=False, source="no_distill")
    assert set(table["source"]) == {"no_distill"} and (run.dir / "stage3" / "no_distill" / "scores.csv").is_file()
    assert sorted(p.name for p in (run.dir / "stage3" / "no_distill" / "parts").iterdir()) == [
        "1.json", "2.json", "3.json"]
    assert not (run.dir / "stage3" / "labels").exists() and not (run.dir / "stage3" / "parts").exists()


def test_the_agreement_benchmark_decodes_every_case_and_field_both_ways(fitted3, tmp_path):
    from benchmarks import agreement

    assert agreement.main([str(fitted3), "--out", str(tmp_path), "--device", "cpu"]) == 0
    table = pd.read_csv(tmp_path / "agreement.csv")
    run = open_run(fitted3)
    assert table["case"].nunique() == 3
    assert set(table["field"]) == {"stage1:Cor"} | {f"stage3:{k}" for k in run.table.keys}
    assert table["identical"].between(0.99, 1.0).all() and table["evaluated"].between(0.0, 1.5).all()
    assert (table["components_dense"] >= 0).all() and "99.99%" in (tmp_path / "agreement.md").read_text()
    stage1_rows = table["field"].str.startswith("stage1:")
    assert table.loc[stage1_rows, "mref_identical"].between(0.99, 1.0).all()  # M^ref: the cleaned maps
    assert table.loc[~stage1_rows, "mref_identical"].isna().all()
