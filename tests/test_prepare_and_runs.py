"""A run end to end at library level: bad cases skipped and listed, inputs untouched, resume,
and the real LPS CT through prepare with its own 3-class table."""

import shutil

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import require_ts_chest
from params_for_tests import load_test_params

from nearfix_lib.core.geometry import paste_back
from nearfix_lib.stages.prepare import load_case_arrays, load_crops_index, prepare_run
from nearfix_lib.stages.runs import resolve_device, start_run

# params/test.yaml with a third case: the fixture damages two, and one good case must remain
THREE_CASES = {"data.phantom.n_cases": 3}


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    """A phantom data root made by a first run, then damaged: case 2 corrupt, case 3 unpaired."""
    work = tmp_path_factory.mktemp("phantom_run")
    run = start_run(load_test_params(THREE_CASES, run_dir=str(work / "gen")))
    root = work / "data"
    shutil.copytree(run.data_root, root)
    (root / "segmentations" / "2.label.nii.gz").write_bytes(b"not a nifti file")
    (root / "images" / "3.img.nii.gz").unlink()
    return root


def snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def test_bad_cases_are_skipped_listed_and_inputs_untouched(phantom_root, tmp_path):
    before = snapshot(phantom_root)
    run = start_run(load_test_params(data_root=str(phantom_root), run_dir=str(tmp_path / "run")))
    crops = prepare_run(run)
    assert [c.case_id for c in crops] == ["1"]
    skipped = (tmp_path / "run" / "skipped.csv").read_text().splitlines()
    assert any(line.startswith("prepare,2,") and "2.label.nii.gz" in line and "unreadable" in line for line in skipped)
    assert any(line.startswith("discover,3,") and "labels without image" in line for line in skipped)
    assert snapshot(phantom_root) == before
    assert not (phantom_root / "prepared").exists()


def test_prepare_records_geometry_and_resumes(phantom_root, tmp_path):
    params = load_test_params(data_root=str(phantom_root), run_dir=str(tmp_path / "run"))
    heart_res, class_res = params.prepare.heart_resolution, params.prepare.class_resolution
    run = start_run(params)
    prepare_run(run)
    index = load_crops_index(run.path("prepared"))
    c = index["1"]
    label = nib.load(str(phantom_root / "segmentations" / "1.label.nii.gz"))
    assert np.allclose(c.affine, label.affine) and c.shape == label.shape
    heart, masks = load_case_arrays(run.path("prepared"), "1")
    assert heart["labels"].shape == (heart_res,) * 3 and heart["image"].shape == (heart_res,) * 3
    assert heart["image"].dtype == np.int16  # whole HU: half the bytes of float32
    assert set(masks) == set(run.table.keys) - set(c.missing)
    assert all(m.shape == (class_res,) * 3 and m.any() for m in masks.values())
    # the heart ROI NIfTI sits on the original image in world space
    roi_img = nib.load(str(run.path("prepared", "1", "heart_labels.nii.gz")))
    assert np.allclose(roi_img.affine, c.heart_grid.world_affine(c.affine))
    # pasting the class ROI mask back lands on the class in the original labels
    lv = np.asarray(label.dataobj) == run.table["LV"].index
    back = paste_back(masks["LV"].astype(np.uint8), c.class_grids["LV"], c.class_boxes["LV"], c.shape)
    assert 2 * np.sum(lv & (back > 0)) / (lv.sum() + back.sum()) > 0.8
    # resume: nothing is rewritten when the parameters are unchanged
    stamp = run.path("prepared", "1", "heart.npz").stat().st_mtime_ns
    prepare_run(start_run(params))
    assert run.path("prepared", "1", "heart.npz").stat().st_mtime_ns == stamp
    # changed parameters redo the case
    params2 = load_test_params({"prepare.heart_resolution": heart_res + 2},  # the change that must redo it
                               data_root=str(phantom_root), run_dir=str(tmp_path / "run"))
    prepare_run(start_run(params2))
    heart2, _ = load_case_arrays(run.path("prepared"), "1")
    assert heart2["labels"].shape == (heart_res + 2,) * 3


def test_real_ct_prepares_with_its_own_class_table(tmp_path):
    src = require_ts_chest()
    root = tmp_path / "ts"
    (root / "segmentations").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "segmentations" / "s0011.label.nii.gz").symlink_to(src / "labels.nii.gz")
    (root / "images" / "s0011.img.nii.gz").symlink_to(src / "ct.nii.gz")
    # what is tested: a real CT with its own class table
    params = load_test_params({"data.classes": "params/classes_ts_chest.yaml"},
                              data_root=str(root), run_dir=str(tmp_path / "run"))
    run = start_run(params)
    assert run.table.keys == ["Heart", "Ao", "PA"]
    (crops,) = prepare_run(run)
    orig = nib.load(str(src / "labels.nii.gz"))
    assert np.allclose(crops.affine, orig.affine) and not crops.missing
    roi = nib.load(str(run.path("prepared", "s0011", "heart_labels.nii.gz")))
    assert nib.aff2axcodes(roi.affine) == ("L", "P", "S")
    heart, _ = load_case_arrays(run.path("prepared"), "s0011")
    assert heart["image"].max() > 200  # contrast-filled vessels survived linear resampling


def test_device_resolution():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RuntimeError):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_a_class_can_have_its_own_resolution(phantom_root, tmp_path):
    # what is tested: Cor at its own resolution, unlike test.yaml's class_resolution for the others
    params = load_test_params({"prepare.class_resolution_overrides": {"Cor": 18}}, data_root=str(phantom_root),
                              run_dir=str(tmp_path / "run"))
    class_res = params.prepare.class_resolution
    assert class_res != 18
    prepare_run(start_run(params))
    _, masks = load_case_arrays(tmp_path / "run" / "prepared", "1")
    assert masks["Cor"].shape == (18, 18, 18) and masks["LV"].shape == (class_res,) * 3
    c = load_crops_index(tmp_path / "run" / "prepared")["1"]
    assert c.class_grids["Cor"].shape == (18, 18, 18)
    with pytest.raises(ValueError, match="class_resolution_overrides.Cor"):
        load_test_params({"prepare.class_resolution_overrides": {"Cor": 1}})


def test_a_missing_data_root_is_one_line_and_a_resumed_run_says_so(phantom_root, tmp_path, capsys):
    from nearfix_lib.core.io import InputError

    missing = tmp_path / "no such folder"
    with pytest.raises(InputError) as err:
        start_run(load_test_params(data_root=str(missing), run_dir=str(tmp_path / "run")))
    assert str(err.value) == f"{missing}: data root does not exist"
    # labels alone while a class's model reads the CT: one line naming the root, the class and the fix
    labels_only = tmp_path / "labels_only"
    shutil.copytree(phantom_root / "segmentations", labels_only / "segmentations")
    # the field (model.appearance), the boundary (ct_edge) or the paths (ct_path): each reads it
    alone = {"stage1.overrides.Cor.model.appearance": False, "stage1.overrides.Cor.ct_edge.enabled": False,
             "stage1.overrides.Cor.ct_path.enabled": False, "stage1.overrides.LAA.ct_edge.enabled": False,
             "stage1.overrides.PV.ct_edge.enabled": False}
    for reads_ct in ({**alone, "stage1.overrides.Cor.model.appearance": True},
                     {**alone, "stage1.overrides.Cor.ct_edge.enabled": True},
                     {**alone, "stage1.overrides.Cor.ct_path.enabled": True}):
        with pytest.raises(InputError, match=r"no 'images/' folder, but the stage-1 repair of Cor reads the CT") as err:
            start_run(load_test_params(reads_ct, data_root=str(labels_only), run_dir=str(tmp_path / "lo")))
        assert str(err.value).startswith(str(labels_only)) and "\n" not in str(err.value)
        assert not (tmp_path / "lo").exists()  # nothing written
    start_run(load_test_params(alone, data_root=str(labels_only),
                               run_dir=str(tmp_path / "lo")))  # shape-only: a labels-only root is valid
    # the defaults name every class that reads the CT, and the overrides the message gives make them valid
    with pytest.raises(InputError, match=r"repair of LAA, Cor, PV reads the CT") as err:
        start_run(load_test_params(data_root=str(labels_only), run_dir=str(tmp_path / "lo2")))
    hint = yaml.safe_load(str(err.value).split("stage1.overrides: ", 1)[1][:-1])
    assert set(hint) == {"Cor", "LAA", "PV"} and hint["LAA"] == {"ct_edge": {"enabled": False}}
    start_run(load_test_params({f"stage1.overrides.{key}": over for key, over in hint.items()},
                               data_root=str(labels_only), run_dir=str(tmp_path / "lo2")))
    params = load_test_params(data_root=str(phantom_root), run_dir=str(tmp_path / "run"))
    start_run(params)
    assert "resuming" not in capsys.readouterr().out
    stale = tmp_path / "run" / "prepared" / "1" / ".heart.npz.nftmp-ghost-999999999-0123abcd.npz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    import nearfix_lib.core.io as nio

    stale = stale.rename(stale.with_name(stale.name.replace("ghost", nio._host())))  # this host, a dead pid
    start_run(params)
    out = capsys.readouterr().out
    assert f"resuming the run in {tmp_path / 'run'}" in out
    assert "removed 1 temporary file(s) of interrupted writes: prepared/1/.heart.npz.nftmp-" in out
    assert not stale.exists()
