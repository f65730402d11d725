"""Fault injection: every promise of the data contract, held on a data root broken 15 ways.

A tiny phantom data root is copied and broken in every way a user's data can be broken, the bad
case sorted first. Notebooks 00, 01 and 02 (one class, few epochs) then run through papermill on
the whole root, exactly as a user would run them, with ``overrides`` passed as text (what
``papermill -p`` does). For each kind: the one-line message naming the file and the problem,
its row in ``skipped.csv``, every good case's outputs, and a data root whose file list, sizes,
modes and sha256 are unchanged. An empty ``segmentations/`` and a missing data root stop the
notebooks with one line each.
"""

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import stat

import nibabel as nib
import numpy as np
import papermill as pm
import pytest
from conftest import PROJECT
from params_for_tests import TEST_PARAMS, load_test_params

from nearfix_lib.phantom.dataset import write_dataset

NOTEBOOKS = {stem: PROJECT / "notebooks" / f"{stem}.ipynb"
             for stem in ("00_inspection", "01_prepare", "02_stage1")}
GOOD = ["1", "2", "Fall 3 äöü"]  # the last: a case id with spaces and non-ASCII letters


def _break_label(path, how):
    img = nib.load(str(path))
    data, affine = np.asarray(img.dataobj), img.affine
    if how == "4-D":
        nib.save(nib.Nifti1Image(np.stack([data, data], -1).astype(np.uint8), affine), str(path))
    elif how == "fractional":
        nib.save(nib.Nifti1Image(data.astype(np.float32) * 0.5, affine), str(path))
    elif how == "out of table":
        data = data.copy()
        data[data == 3] = 42
        nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))
    elif how == "all zero":
        nib.save(nib.Nifti1Image(np.zeros_like(data, dtype=np.uint8), affine), str(path))


def _break_image(path, how):
    img = nib.load(str(path))
    data, affine = np.asarray(img.dataobj).astype(np.float32), img.affine.copy()
    if how == "NaN":
        data[data.shape[0] // 2, 3, 4] = np.nan
    elif how == "shape":
        data = data[:-3]
    elif how == "affine":
        affine[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(data, affine), str(path))


# case id -> (kind, the broken file, words the one-line message must hold)
KINDS = {
    "0": ("NaN in the image, sorted first", "images/0.img.nii.gz", "NaN"),
    "t_trunc": ("truncated .nii.gz", "segmentations/t_trunc.label.nii.gz", "corrupt voxel data"),
    "t_text": ("non-NIfTI file named .nii.gz", "segmentations/t_text.label.nii.gz", "unreadable NIfTI"),
    "t_4d": ("4-D label", "segmentations/t_4d.label.nii.gz", "expected a 3-D volume"),
    "t_frac": ("fractional float labels", "segmentations/t_frac.label.nii.gz", "non-integer values"),
    "t_value": ("label value outside the table", "segmentations/t_value.label.nii.gz", "outside the class table: 42"),
    "t_shape": ("image/label shape mismatch", "images/t_shape.img.nii.gz", "shape (45, 44, 36) differs"),
    "t_affine": ("image/label affine mismatch", "images/t_affine.img.nii.gz", "affine differs"),
    "t_zero": ("all-zero label", "segmentations/t_zero.label.nii.gz", "empty label map"),
    "t_img_only": ("image without label", "images/t_img_only.img.nii.gz", "image without labels"),
    "t_lab_only": ("label without image", "segmentations/t_lab_only.label.nii.gz", "labels without image"),
}


def _copy_case(src, root, src_id, dst_id, parts=("images", "segmentations", "ground_truth")):
    suffix = {"images": "img", "segmentations": "label", "ground_truth": "label"}
    for part in parts:
        shutil.copy(src / part / f"{src_id}.{suffix[part]}.nii.gz", root / part / f"{dst_id}.{suffix[part]}.nii.gz")


def make_faulty_root(work):
    """Good cases 1, 2 and 'Fall 3 äöü'; one broken copy of case 1 per kind in KINDS."""
    params = load_test_params().data.phantom
    source = work / "phantom"
    write_dataset(source, dataclasses.replace(params, n_cases=3))
    root = work / "data"
    for part in ("images", "segmentations", "ground_truth"):
        (root / part).mkdir(parents=True)
    for src_id, dst_id in (("1", "1"), ("2", "2"), ("3", GOOD[2])):
        _copy_case(source, root, src_id, dst_id)
    for cid in KINDS:
        _copy_case(source, root, "1", cid)
    (root / "segmentations" / "t_img_only.label.nii.gz").unlink()
    (root / "ground_truth" / "t_img_only.label.nii.gz").unlink()
    (root / "images" / "t_lab_only.img.nii.gz").unlink()
    trunc = root / "segmentations" / "t_trunc.label.nii.gz"
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    (root / "segmentations" / "t_text.label.nii.gz").write_text("case,label\n1,LV\n")
    for cid, how in (("t_4d", "4-D"), ("t_frac", "fractional"), ("t_value", "out of table"), ("t_zero", "all zero")):
        _break_label(root / "segmentations" / f"{cid}.label.nii.gz", how)
    for cid, how in (("0", "NaN"), ("t_shape", "shape"), ("t_affine", "affine")):
        _break_image(root / "images" / f"{cid}.img.nii.gz", how)
    return root


def fingerprint(root):
    """Every file and folder of a tree: size, mode and sha256 (files), mode (folders)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, stat.S_IMODE(st.st_mode), digest)
    return out


def execute(stem, run_dir, data_root, **extra):
    out = run_dir / "notebooks" / f"{stem}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    # overrides as text, as `papermill -p overrides '{...}'` hands it over
    parameters = {"params_file": TEST_PARAMS, "data_root": str(data_root), "run_dir": str(run_dir),
                  "overrides": json.dumps({"stage1.train.epochs": 4, "stage1.train.checkpoint_interval": 2}), **extra}
    pm.execute_notebook(str(NOTEBOOKS[stem]), str(out), kernel_name="python3", cwd=str(PROJECT),
                        progress_bar=False, parameters=parameters)
    return out


def printed(notebook) -> str:
    """What a notebook printed (stdout only: progress bars write to stderr, and the kernel may flush a
    line's text and its newline apart, so a bar's output can land between them when both are read)."""
    nb = json.loads(notebook.read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    root = make_faulty_root(work)
    before = fingerprint(root)
    run_dir = work / "run"
    umask = os.umask(0o002)  # a cluster group's umask: results must come out group-writable
    try:
        logs = {stem: printed(execute(stem, run_dir, root)) for stem in NOTEBOOKS}
    finally:
        os.umask(umask)
    with open(run_dir / "skipped.csv", newline="", encoding="utf-8") as fh:
        skipped = list(csv.DictReader(fh))
    return {"root": root, "before": before, "run": run_dir, "logs": logs, "skipped": skipped}


@pytest.mark.notebook
@pytest.mark.parametrize("case_id", list(KINDS), ids=[k[0] for k in KINDS.values()])
def test_each_bad_case_is_named_in_one_line_listed_and_skipped(faulty_run, case_id):
    kind, rel, problem = KINDS[case_id]
    path = faulty_run["root"] / rel
    rows = [r for r in faulty_run["skipped"] if r["case"] == case_id]
    assert rows, f"{kind}: no row in skipped.csv"
    for row in rows:
        assert row["problem"].startswith(f"{path}: ") and problem in row["problem"] and "\n" not in row["problem"]
    unpaired = kind in ("image without label", "label without image")
    # unpaired files are found by discovery; the rest are read by notebook 00 (survey) and 01 (prepare)
    stages = {"discover"} if unpaired else {"inspect", "prepare"}
    assert {r["stage"] for r in rows} == stages
    logs = faulty_run["logs"]
    line = rows[0]["problem"]
    if unpaired:
        assert f"problem: {line}\n" in logs["00_inspection"]
    else:
        assert f"skipped case {case_id}: {line}\n" in logs["00_inspection"]
        assert f"skipped case {case_id}: {line}\n" in logs["01_prepare"]
    run = faulty_run["run"]
    assert not (run / "prepared" / case_id).exists()
    assert not (run / "stage1" / "Cor" / "masks" / f"{case_id}.nii.gz").exists()


@pytest.mark.notebook
def test_every_good_case_has_its_outputs_on_its_own_grid(faulty_run):
    run = faulty_run["run"]
    cases = (run / "inspection" / "cases.csv").read_text(encoding="utf-8")
    crops = json.loads((run / "prepared" / "crops.json").read_text(encoding="utf-8"))
    assert sorted(crops["cases"]) == sorted(GOOD)
    for cid in GOOD:
        assert f"\n{cid}," in cases and (run / "prepared" / cid / "crop.json").is_file()
        mask = nib.load(str(run / "stage1" / "Cor" / "masks" / f"{cid}.nii.gz"))
        source = nib.load(str(faulty_run["root"] / "segmentations" / f"{cid}.label.nii.gz"))
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert "image" in cases.splitlines()[0]
    assert all(line.split(",")[4] == "True" for line in cases.splitlines()[1:])  # every good case has its CT
    # the figures show the first case that loads, not the bad case sorted first
    assert (run / "inspection" / "slices_1.png").is_file() and not (run / "inspection" / "slices_0.png").exists()
    scores = (run / "stage1" / "Cor" / "scores.csv").read_text(encoding="utf-8")
    assert all(cid in scores for cid in GOOD)


@pytest.mark.notebook
def test_the_data_root_is_never_written(faulty_run):
    assert fingerprint(faulty_run["root"]) == faulty_run["before"]


@pytest.mark.notebook
def test_outputs_get_the_users_umask_and_no_temporary_is_left(faulty_run):
    run = faulty_run["run"]
    files = [p for p in run.rglob("*") if p.is_file() and "notebooks" not in p.parts]
    assert len(files) > 30
    modes = {stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == {0o664}, {oct(m) for m in modes}
    assert not [p for p in run.rglob(".*nftmp-*")]


def _error_line(err: pm.PapermillExecutionError) -> str:
    return f"{err.ename}: {err.evalue}"


@pytest.mark.notebook
@pytest.mark.parametrize("stem", ["00_inspection", "01_prepare"])
def test_an_empty_segmentations_folder_stops_with_one_line(tmp_path, stem):
    root = tmp_path / "data"
    (root / "segmentations").mkdir(parents=True)
    (root / "images").mkdir()
    with pytest.raises(pm.PapermillExecutionError) as err:
        execute(stem, tmp_path / "run", root)
    assert _error_line(err.value) == (f"InputError: {root / 'segmentations'}: no cases found in {root} "
                                      "(no .nii/.nii.gz label files)")


@pytest.mark.notebook
@pytest.mark.parametrize("stem", ["00_inspection", "01_prepare"])
def test_a_missing_data_root_stops_with_one_line(tmp_path, stem):
    root = tmp_path / "not there"
    with pytest.raises(pm.PapermillExecutionError) as err:
        execute(stem, tmp_path / "run", root)
    assert _error_line(err.value) == f"InputError: {root}: data root does not exist"
    assert not root.exists()
