"""Every bad-input kind of the data contract gives a one-line error naming file and problem."""

import gzip
import os
import platform
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PROJECT

from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.io import (
    InputError,
    SkipList,
    atomic_path,
    case_id_from_name,
    discover_cases,
    load_case,
    read_image,
    read_label,
    remove_stale_temporaries,
    write_json,
    write_nifti,
    write_text,
)


def save(path, array, affine, dtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype or np.asarray(array).dtype), affine)
    nib.save(img, str(path))
    return path


def make_root(tmp_path, labels, affine, ids=("1", "2")):
    root = tmp_path / "root"
    for cid in ids:
        save(root / "segmentations" / f"{cid}.label.nii.gz", labels, affine)
        save(root / "images" / f"{cid}.img.nii.gz", np.full(labels.shape, -500, np.int16), affine)
    return root


def expect_error(func, path, words):
    with pytest.raises(InputError) as info:
        func()
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert words in msg, msg
    return msg


@pytest.mark.parametrize("name, cid", [
    ("1.img.nii.gz", "1"), ("1.label.nii.gz", "1"), ("1.nii.img.nii.gz", "1"),
    ("case_07.seg.nii", "case_07"), ("12.nii.gz", "12"), ("notes.txt", None)])
def test_case_ids(name, cid):
    assert case_id_from_name(name) == cid


def test_labels_load_as_integers_on_their_affine(tmp_path, small_labels, affine):
    p = save(tmp_path / "a.nii.gz", small_labels, affine)
    vol = read_label(p, CARDIAC)
    assert np.issubdtype(vol.array.dtype, np.integer)
    assert np.array_equal(vol.array, small_labels)
    assert np.allclose(vol.affine, affine)
    assert np.allclose(vol.spacing, [0.8, 1.1, 2.5])
    # integral floats are accepted (some tools store labels as float) and come back as integers
    p2 = save(tmp_path / "f.nii.gz", small_labels.astype(np.float32), affine)
    assert np.array_equal(read_label(p2, CARDIAC).array, small_labels)


def test_missing_and_corrupt_files(tmp_path, small_labels, affine):
    missing = tmp_path / "nope.nii.gz"
    expect_error(lambda: read_label(missing, CARDIAC), missing, "file not found")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(os.urandom(500))
    expect_error(lambda: read_label(junk, CARDIAC), junk, "unreadable")
    good = save(tmp_path / "trunc.nii.gz", small_labels, affine)
    raw = gzip.decompress(good.read_bytes())
    good.write_bytes(gzip.compress(raw[: len(raw) - 900]))  # header fine, voxels cut short
    expect_error(lambda: read_label(good, CARDIAC), good, "corrupt")


def test_not_3d(tmp_path, affine):
    p = save(tmp_path / "4d.nii.gz", np.ones((5, 6, 7, 2), np.uint8), affine)
    expect_error(lambda: read_label(p, CARDIAC), p, "3-D")


def test_non_integer_and_unknown_values_and_empty(tmp_path, small_labels, affine):
    frac = small_labels.astype(np.float32)
    frac[5, 5, 3] = 0.5
    p = save(tmp_path / "prob.nii.gz", frac, affine)
    expect_error(lambda: read_label(p, CARDIAC), p, "non-integer")
    unknown = small_labels.copy()
    unknown[0, 0, 0] = 11
    unknown[1, 0, 0] = 42
    p = save(tmp_path / "unk.nii.gz", unknown, affine)
    msg = expect_error(lambda: read_label(p, CARDIAC), p, "outside the class table")
    assert "11" in msg and "42" in msg
    p = save(tmp_path / "empty.nii.gz", np.zeros((4, 5, 6), np.uint8), affine)
    expect_error(lambda: read_label(p, CARDIAC), p, "empty label map")
    nan = small_labels.astype(np.float32)
    nan[2, 2, 2] = np.nan
    p = save(tmp_path / "nanlab.nii.gz", nan, affine)
    expect_error(lambda: read_label(p, CARDIAC), p, "NaN")


def test_nan_image(tmp_path, affine):
    img = np.zeros((4, 5, 6), np.float32)
    img[1, 2, 3] = np.nan
    p = save(tmp_path / "ct.nii.gz", img, affine)
    expect_error(lambda: read_image(p), p, "NaN")


def test_shape_and_affine_mismatch(tmp_path, small_labels, affine):
    root = make_root(tmp_path, small_labels, affine, ids=("1", "2"))
    save(root / "images" / "1.img.nii.gz", np.zeros((23, 17, 12), np.int16), affine)
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    save(root / "images" / "2.img.nii.gz", np.zeros(small_labels.shape, np.int16), shifted)
    cases = {c.case_id: c for c in discover_cases(root).cases}
    expect_error(lambda: load_case(cases["1"], CARDIAC), cases["1"].image, "shape")
    expect_error(lambda: load_case(cases["2"], CARDIAC), cases["2"].image, "affine differs")


def test_unpaired_files_are_listed_and_others_go_on(tmp_path, small_labels, affine):
    root = make_root(tmp_path, small_labels, affine, ids=("1", "2", "10"))
    save(root / "images" / "3.img.nii.gz", np.zeros(small_labels.shape, np.int16), affine)
    save(root / "segmentations" / "4.label.nii.gz", small_labels, affine)
    save(root / "ground_truth" / "1.label.nii.gz", small_labels, affine)
    save(root / "ground_truth" / "9.label.nii.gz", small_labels, affine)
    found = discover_cases(root)
    assert found.ids == ["1", "2", "10"]  # natural order, unpaired 3/4/9 left out
    assert found.cases[0].truth is not None and found.cases[1].truth is None
    msgs = sorted(str(p) for p in found.problems)
    assert any("3.img.nii.gz" in m and "image without labels" in m for m in msgs)
    assert any("4.label.nii.gz" in m and "labels without image" in m for m in msgs)
    assert any("9.label.nii.gz" in m and "ground truth without labels" in m for m in msgs)
    with pytest.raises(InputError, match="elsewhere: data root does not exist$"):
        discover_cases(tmp_path / "elsewhere")
    (tmp_path / "no_labels").mkdir()
    with pytest.raises(InputError, match="no_labels: data root has no 'segmentations/' folder$"):
        discover_cases(tmp_path / "no_labels")


def test_an_empty_segmentations_folder_is_one_line_no_cases_found(tmp_path, small_labels, affine):
    root = tmp_path / "root"
    (root / "segmentations").mkdir(parents=True)
    (root / "segmentations" / "README.txt").write_text("not a label")
    save(root / "images" / "1.img.nii.gz", np.zeros(small_labels.shape, np.int16), affine)
    with pytest.raises(InputError) as err:
        discover_cases(root)
    assert str(err.value) == f"{root / 'segmentations'}: no cases found in {root} (no .nii/.nii.gz label files)"


def test_labels_only_root_is_valid(tmp_path, small_labels, affine):
    save(tmp_path / "r" / "segmentations" / "1.nii.img.nii.gz", small_labels, affine)
    found = discover_cases(tmp_path / "r")
    assert found.ids == ["1"] and not found.problems and found.cases[0].image is None


def test_reading_never_writes_the_data_root(tmp_path, small_labels, affine):
    root = make_root(tmp_path, small_labels, affine)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    for case in discover_cases(root).cases:
        load_case(case, CARDIAC)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    assert before == after


def test_write_nifti_keeps_affine_header_and_integers(tmp_path, small_labels, affine):
    src = save(tmp_path / "src.nii.gz", small_labels, affine)
    vol = read_label(src, CARDIAC)
    vol.header["descrip"] = b"nearfix test"
    out = write_nifti(tmp_path / "out" / "x.label.nii.gz", vol.array, vol.affine, vol.header)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8
    assert np.allclose(back.affine, affine) and not np.allclose(back.affine, np.eye(4))
    assert nib.aff2axcodes(back.affine) == ("L", "P", "S")
    assert back.header["descrip"].tobytes().startswith(b"nearfix test")
    assert np.array_equal(np.asarray(back.dataobj), small_labels)
    with pytest.raises(ValueError):
        write_nifti(tmp_path / "bad.nii.gz", small_labels[..., None], affine)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "result.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.nii.gz"]


def test_atomic_writes_get_the_permissions_of_the_users_umask(tmp_path, small_labels, affine):
    old = os.umask(0o027)
    try:
        write_nifti(tmp_path / "a.nii.gz", small_labels, affine)
        write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o002)
        write_text(tmp_path / "b.txt", "hello")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.nii.gz": 0o640, "a.json": 0o640, "b.txt": 0o664}


def test_a_killed_writer_leaves_no_target_and_its_temporary_is_removed_later(tmp_path):
    target = tmp_path / "run" / "stage1" / "masks" / "1.nii.gz"
    code = ("import os, signal, sys\n"
            "from nearfix_lib.core.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'x' * 100000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in target.parent.iterdir()]
    assert not target.exists() and len(left) == 1 and left[0].name.startswith(".1.nii.gz.nftmp-")
    assert left[0].name.endswith(".nii.gz") and left[0].stat().st_size == 100000
    with atomic_path(tmp_path / "run" / "live.txt") as live:  # a live writer's temporary stays
        live.write_text("busy")
        removed = remove_stale_temporaries(tmp_path / "run")
        assert removed == left and live.exists()
    assert list(target.parent.iterdir()) == [] and (tmp_path / "run" / "live.txt").read_text() == "busy"


def test_another_hosts_temporary_is_kept_for_a_day(tmp_path):
    foreign = tmp_path / ".x.npz.nftmp-othernode-12345-0a1b2c3d.npz"
    foreign.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [] and foreign.exists()
    day_old = time.time() - 25 * 3600
    os.utime(foreign, (day_old, day_old))
    assert remove_stale_temporaries(tmp_path) == [foreign] and not foreign.exists()


def test_skip_list_merges_stages(tmp_path):
    path = tmp_path / "skipped.csv"
    a = SkipList()
    a.add("prepare", "3", InputError("x/3.nii.gz", "broken"))
    a.write(path)
    b = SkipList()
    b.add("stage1", "4", "no LAA")
    b.write(path)
    text = path.read_text()
    assert "prepare,3,x/3.nii.gz: broken" in text and "stage1,4,no LAA" in text


_FREED_BLOCK = """
import sys
from pathlib import Path

import numpy as np

from nearfix_lib.core.io import return_large_blocks

def rss_kb():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS")).split()[1])

if sys.argv[1] == "fixed":
    assert return_large_blocks()
first = np.ones(1 << 20); del first  # 8 MB, freed: glibc's own threshold rises to its size
before = rss_kb()
second = np.ones(1 << 20); del second
print(rss_kb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file() or platform.libc_ver()[0] != "glibc",
                    reason="measures glibc's allocator through /proc (Linux with glibc only)")
def test_freed_large_blocks_go_back_to_the_system(tmp_path):
    """A freed 8 MB array stays in the process under glibc's own policy, and is returned under the
    policy every run's process sets (fresh interpreters: the policy is process-wide)."""
    script = tmp_path / "freed.py"
    script.write_text(_FREED_BLOCK)
    kept = {mode: int(subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                                     check=True, cwd=PROJECT).stdout) for mode in ("default", "fixed")}
    assert kept["default"] > 6000 and kept["fixed"] < 1000, kept
