"""The per-case store (stage 3's labels, stage 1's foreground bits): what it writes, that it is written
once, that its teacher lookup is torch's grid_sample, and that a fit's memory no longer grows with the
cases' arrays.

(That sampling and fitting from the store give exactly what the in-memory code gave was checked
once, against the code it replaced, when the store came in: see the commit that added it.)"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_sampling import label_maps
from test_unified import T, case_store

from nearfix_lib.core.config import BalancedSamplingParams, UnifiedLossParams
from nearfix_lib.core.geometry import Box, apply_affine, roi_grid, to_grid_sample_order
from nearfix_lib.core.io import write_npy
from nearfix_lib.field.sampling import boundary_band
from nearfix_lib.field.store import (
    CaseStore,
    StoreSpec,
    Teacher,
    quantise_probability,
    write_case,
    write_store,
)
from nearfix_lib.field.unified import UnifiedTask, teacher_affine, teacher_values


def mixed_maps():
    """test_sampling's two cases (asymmetric, absent classes, an unlisted label), a random and an empty one."""
    c = np.random.default_rng(3).choice(np.array([0, 2, 3, 8, 9], np.uint8), size=(9, 16, 12), p=[.6, .1, .1, .1, .1])
    return [*label_maps(), c, np.zeros((6, 7, 8), np.uint8)]


def spec(classes, params):
    return StoreSpec(tuple(classes), params.dilation_radius, params.mined > 0)


def test_store_layout_is_written_once_and_redone_when_its_inputs_change(tmp_path):
    maps = mixed_maps()
    p = BalancedSamplingParams(positives_per_class=10, negatives=20, mined=4)
    teacher = Teacher(1, np.random.default_rng(0).random((5, 6, 7)).astype(np.float16), np.eye(4))
    store = write_store(tmp_path, maps, spec([2, 3, 8, 9], p), teachers=[[teacher], [], [], []])
    folder = tmp_path / "0"
    assert sorted(f.name for f in folder.iterdir()) == ["band.npy", "cumulative.npy", "interfaces.npy", "labels.npy",
                                                        "meta.json", "teacher_1.npy"]
    assert np.array_equal(store.labels(1), maps[1]) and store.labels(1).dtype == np.uint8
    assert isinstance(store.labels(0), np.memmap) and isinstance(store.teachers(0)[0].prob, np.memmap)
    assert np.array_equal(store.teachers(0)[0].prob, teacher.prob) and store.teacher_channels(1) == []
    assert np.array_equal(store.cumulative(0)[0], np.cumsum((maps[0] == 2).reshape(-1, 9).sum(1)))
    assert np.array_equal(store.histogram(2), np.bincount(maps[2].ravel(), minlength=256))
    assert store.present(0, 8) and not store.present(0, 9) and store.band_size(3) == 0
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["shape"] == [20, 14, 9] and meta["spec"]["classes"] == [2, 3, 8, 9]
    stamps = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    write_store(tmp_path, maps, spec([2, 3, 8, 9], p), teachers=[[teacher], [], [], []])  # complete: kept
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == stamps
    changed = maps[0].copy()
    changed[5, 5, 5] = 3
    write_store(tmp_path, [changed] + maps[1:], spec([2, 3, 8, 9], p), teachers=[[teacher], [], [], []])
    assert np.array_equal(CaseStore(tmp_path, ["0"], spec([2, 3, 8, 9], p)).labels(0), changed)  # redone
    with pytest.raises(ValueError, match="no complete store"):
        CaseStore(tmp_path, ["0"], spec([2, 3], p))  # another spec: must be rebuilt
    no_mining = StoreSpec((2, 3), p.dilation_radius, interfaces=False)
    write_case(tmp_path / "x", maps[0], no_mining)
    assert not (tmp_path / "x" / "interfaces.npy").exists()
    with pytest.raises(ValueError, match="interface bits"):
        CaseStore(tmp_path, ["x"], no_mining).interfaces(0)


def test_a_binary_store_reads_its_bits_at_every_cell(tmp_path):
    """Foreground bits, looked up cell by cell straight from the mapped file: shapes whose voxel counts
    are no multiple of 8 (the last byte is partly padding), the last voxel, repeated and random cells."""
    rng = np.random.default_rng(4)
    masks = [rng.random(s) < 0.4 for s in [(13, 7, 5), (20, 14, 9), (3, 1, 1), (1, 2, 11)]]
    binary = StoreSpec((1,), 1, interfaces=False, binary=True)
    store = write_store(tmp_path, [m.astype(np.uint8) for m in masks], binary)
    assert sorted(f.name for f in store.folder(0).iterdir()) == ["band.npy", "foreground.npy", "meta.json"]
    for i, m in enumerate(masks):
        assert np.array_equal(store.foreground(i), m) and store.foreground(i).dtype == bool
        every = np.indices(m.shape).reshape(3, -1).T
        cells = np.concatenate([every, every[rng.integers(0, len(every), 500)], [np.array(m.shape) - 1]])
        got = store.foreground_at(i, cells)
        assert got.dtype == bool and np.array_equal(got, m[tuple(cells.T)])
    assert store.foreground_at(0, np.array([[12, 6, 4]]))[0] == masks[0][-1, -1, -1]
    with pytest.raises(ValueError):
        store.foreground_at(0, np.array([[13, 0, 0]]))  # off the grid: refused, not another voxel's bit
    with pytest.raises(ValueError, match="binary store has no labels"):
        store.labels(0)


def test_a_binary_store_takes_an_eighth_and_is_never_taken_for_a_label_store(tmp_path):
    mask = np.zeros((64, 64, 64), np.uint8)
    mask[10:50, 12:40, 20:61] = 1
    labels_spec, binary_spec = StoreSpec((1,), 2, False), StoreSpec((1,), 2, False, binary=True)
    write_store(tmp_path / "labels", [mask], labels_spec)
    write_store(tmp_path / "bits", [mask], binary_spec)
    size = {f.name: f.stat().st_size for d in ("labels", "bits") for f in (tmp_path / d / "0").iterdir()}
    assert size["foreground.npy"] <= size["labels.npy"] / 8 + 128  # + the .npy header
    print(f"64^3 mask: labels.npy {size['labels.npy']} B + cumulative.npy {size['cumulative.npy']} B, "
          f"foreground.npy {size['foreground.npy']} B")
    with pytest.raises(ValueError, match="no complete store"):
        CaseStore(tmp_path / "labels", ["0"], binary_spec)
    with pytest.raises(ValueError, match="no complete store"):
        CaseStore(tmp_path / "bits", ["0"], labels_spec)
    with pytest.raises(ValueError, match="label store has no foreground bits"):
        CaseStore(tmp_path / "labels", ["0"], labels_spec).foreground_at(0, np.zeros((1, 3), int))
    store = write_store(tmp_path / "labels", [mask], binary_spec)  # rewritten in the other layout, nothing left over
    assert sorted(f.name for f in store.folder(0).iterdir()) == ["band.npy", "foreground.npy", "meta.json"]
    assert np.array_equal(store.foreground(0), mask.astype(bool))
    every = np.arange(store.band_size(0))
    assert np.array_equal(store.band_at(0, every), CaseStore(tmp_path / "bits", ["0"], binary_spec).band_at(0, every))


def test_teacher_corners_from_a_memmap_equal_grid_sample(tmp_path):
    rng = np.random.default_rng(5)
    heart = Box((2, 3, 1), (40, 33, 25))
    teachers = []
    for channel, (lo, hi, res) in enumerate([((10, 8, 5), (22, 20, 15), (12, 13, 10)),
                                             ((0, 0, 0), (30, 20, 20), (17, 9, 14)),
                                             ((15, 2, 10), (45, 36, 30), (31, 29, 21))]):
        prob = rng.random(res).astype(np.float16)
        teachers.append(Teacher(channel * 3, prob, teacher_affine(heart, Box(lo, hi))))
    store = write_store(tmp_path, [np.zeros((4, 4, 4), np.uint8)], StoreSpec((1,), 1, False), teachers=[teachers])
    mapped = store.teachers(0)
    pts = np.concatenate([rng.uniform(-1.2, 1.2, (20000, 3)),  # inside, on the rims and outside the class ROIs
                          roi_grid(heart, heart.shape).normalised_points(heart)]).astype(np.float32)
    got = teacher_values(mapped, pts, n_heads=10)
    expected = np.zeros_like(got)  # what torch's grid_sample gives on the whole grid (align_corners=False)
    for t in teachers:
        q = torch.from_numpy(to_grid_sample_order(apply_affine(t.from_heart, pts)).astype(np.float32))
        grid = torch.from_numpy(t.prob.astype(np.float32) / 255)[None, None]  # the stored 1/255 steps
        expected[:, t.channel] = F.grid_sample(grid, q.reshape(1, -1, 1, 1, 3), mode="bilinear",
                                               padding_mode="zeros", align_corners=False).reshape(-1).numpy()
    assert np.allclose(got, expected, rtol=0, atol=1e-6)
    assert np.count_nonzero(got) > 0.15 * got[:, [0, 3, 6]].size  # not a comparison of zeros
    print(f"teacher lookup: max |store - grid_sample| = {np.abs(got - expected).max():.3g} "
          f"over {got.size} values, {np.mean(got == expected):.4%} bit-identical")


def test_band_rows_are_the_band_voxels_in_c_order(tmp_path):
    mask = np.zeros((9, 11, 7), dtype=np.uint8)
    mask[3:6, 2:8, 2:5] = 1
    store = write_store(tmp_path, [mask], StoreSpec((1,), 1, False, binary=True))
    rows = np.arange(store.band_size(0))[::-1]  # any order of rows: each gives its own voxel
    assert np.array_equal(store.band_at(0, rows), np.argwhere(boundary_band(mask > 0, 1))[rows])
    assert np.load(store.folder(0) / "band.npy").dtype == np.int32  # flat indices, not (i, j, k) rows


def test_quantised_probabilities_are_within_half_a_step():
    prob = np.concatenate([np.linspace(0, 1, 1001), [-0.1, 1.3]]).astype(np.float32)
    q = quantise_probability(prob)
    assert q.dtype == np.uint8 and q[0] == 0 and q[1000] == 255 and q[-2] == 0 and q[-1] == 255
    assert np.abs(q[:1001] / 255 - prob[:1001]).max() <= 0.5 / 255 + 1e-7


def test_a_teacher_on_disk_is_referenced_not_copied(tmp_path):
    """Stage 3's store points at stage 1's files (relative to the case folder: a moved run still reads them)."""
    prob = quantise_probability(np.random.default_rng(1).random((6, 5, 4)))
    write_npy(tmp_path / "run" / "stage1" / "prob.npy", prob)
    on_disk = Teacher(2, np.load(tmp_path / "run" / "stage1" / "prob.npy", mmap_mode="r"), np.eye(4),
                      tmp_path / "run" / "stage1" / "prob.npy")
    root = tmp_path / "run" / "stage3"
    write_case(root / "a", np.ones((3, 4, 5), np.uint8), StoreSpec((1,), 1, False), [on_disk], {"n": 1})
    assert sorted(f.name for f in (root / "a").iterdir()) == ["band.npy", "cumulative.npy", "labels.npy", "meta.json"]
    shutil.move(tmp_path / "run", tmp_path / "moved")
    read = CaseStore(tmp_path / "moved" / "stage3", ["a"], StoreSpec((1,), 1, False)).teachers(0)
    assert len(read) == 1 and read[0].channel == 2 and np.array_equal(read[0].prob, prob)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _arrays(obj, seen=None, depth=0):
    """(path, nbytes) of every ndarray / tensor reachable from ``obj`` through attributes, lists and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [(type(obj).__name__, obj.nbytes)]
    if isinstance(obj, torch.Tensor):
        return [("tensor", obj.element_size() * obj.nelement())]
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("nearfix_lib", "numpy.random")):
        items = list(vars(obj).items())
    else:
        return []
    return [(f"{key}.{path}", n) for key, value in items for path, n in _arrays(value, seen, depth + 1)]


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm")
def test_memory_per_case_is_bounded(tmp_path):
    """24 cases of 64^3 with 10 teachers each: building the task, sampling every case with distillation,
    and reading every case whole (what validation and the thresholds do) leaves the process's memory
    nearly where it was (the in-memory task of the base commit grew by about the store's size)."""
    rng = np.random.default_rng(0)
    shape, n_cases = (64, 64, 64), 24
    maps, teachers = [], []
    for i in range(n_cases):
        lab = np.zeros(shape, dtype=np.uint8)
        for k, c in enumerate(T.indices):  # nested boxes: every class present, shifted per case
            lo = 4 + k * 2 + i % 3
            lab[lo:64 - lo - k, lo + 1:64 - lo, lo:64 - lo - 1] = c
        maps.append(lab)
        heart = Box((0, 0, 0), shape)
        teachers.append([Teacher(k, rng.random((40, 40, 40)).astype(np.float16),
                                 teacher_affine(heart, Box((10, 8, 6), (54, 56, 60)))) for k in range(len(T))])
    sampling = BalancedSamplingParams(positives_per_class=64, negatives=256, mined=16, mine_interval=10)
    store = case_store(tmp_path / "cases", maps, sampling, teachers)
    del maps, teachers, lab
    total = store.nbytes()
    warm = UnifiedTask(CaseStore(store.root, store.case_ids[:2], store.spec), T, sampling,
                       UnifiedLossParams(distill_weight=0.5), seed=0, device="cpu")
    warm.batch(np.array([0, 1]), 1)  # imports, allocator pools
    del warm
    before = _resident_bytes()
    task = UnifiedTask(store, T, sampling, UnifiedLossParams(distill_weight=0.5), seed=0, device="cpu")
    for epoch in (1, 2):
        for start in range(0, n_cases, 4):
            task.batch(np.arange(start, start + 4), epoch)
    for i in range(n_cases):  # every page of every case mapped once, one case at a time
        labels = store.labels(i)
        int(np.count_nonzero(labels))
        sum(float(t.prob.sum(dtype=np.float32)) for t in store.teachers(i))
        del labels
    grown = _resident_bytes() - before
    print(f"store {total / 2**20:.1f} MiB for {n_cases} cases; resident memory grew {grown / 2**20:.2f} MiB")
    assert grown < 0.25 * total
    held = _arrays(task)
    big = [(path, n) for path, n in held if n > 4096]
    assert not big, big
    assert sum(n for _, n in held) < 16 * 1024  # everything the task holds in arrays, all cases together
