"""The per-case store of stage 3: what it writes, that it is written once, that reading from it gives
exactly what the in-memory code of the base commit gave (tests/inmemory_reference.py), and that a
fit's memory no longer grows with the cases' arrays."""

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import torch
from inmemory_reference import ReferenceSampler, ReferenceTask, ReferenceTeacher, reference_teacher_values
from test_unified import SAMPLING, SMALL_MODEL, T, case_store, heart_maps

from nearfix_lib.core.config import BalancedSamplingParams, TrainParams, UnifiedLossParams
from nearfix_lib.core.geometry import Box, roi_grid
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.sampling import ClassBalancedSampler
from nearfix_lib.field.store import CaseStore, StoreSpec, Teacher, write_case, write_store
from nearfix_lib.field.train import fit
from nearfix_lib.field.unified import UnifiedTask, teacher_affine, teacher_values


def mixed_maps():
    """Asymmetric shapes, classes absent here and there, an unlisted label (1) and an empty case."""
    a = np.zeros((20, 14, 9), dtype=np.uint8)
    a[2:10, 2:9, 1:6] = 2
    a[12:18, 8:13, 4:8] = 3
    a[10:12, 4:6, 2:4] = 8
    a[0:2, 0:2, 0:2] = 1
    b = np.zeros((17, 11, 13), dtype=np.int32)
    b[3:12, 1:5, 2:11] = 2
    b[14:16, 7:10, 0:2] = 9
    c = np.random.default_rng(3).choice(np.array([0, 2, 3, 8, 9], np.uint8), size=(9, 16, 12), p=[.6, .1, .1, .1, .1])
    return [a, b, c, np.zeros((6, 7, 8), np.uint8)]


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


def test_store_backed_sampler_draws_exactly_what_the_in_memory_one_drew(tmp_path):
    maps, classes = mixed_maps(), [2, 3, 8, 9]
    p = BalancedSamplingParams(positives_per_class=25, negatives=41, dilation_radius=2, mined=7, jitter_epochs=3)
    new = ClassBalancedSampler(write_store(tmp_path, maps, spec(classes, p)), p, seed=11)
    ref = ReferenceSampler(maps, classes, p, seed=11)
    order = np.random.default_rng(0)
    for epoch in range(1, 7):
        if epoch == 3:  # mined voxels from then on (case 3 is empty: none there)
            for s in (new, ref):
                s.set_mined(0, np.array([[0, 13, 8], [11, 5, 3], [4, 4, 4]]))
                s.set_mined(2, np.array([[8, 15, 11]]))
        cases = list(order.integers(0, len(maps), 5))
        got, expected = new.sample(cases, epoch), ref.sample(cases, epoch)
        assert got[0].dtype == expected[0].dtype and got[1].dtype == expected[1].dtype
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    state = pickle.loads(pickle.dumps(new.state_dict()))
    ref_state = ref.state_dict()
    assert state["bit_generator"] == ref_state["bit_generator"]
    assert all(np.array_equal(x, y) for x, y in zip(state["mined"], ref_state["mined"]))


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
    expected = reference_teacher_values([ReferenceTeacher(t.channel, torch.from_numpy(t.prob)[None, None],
                                                          t.from_heart) for t in teachers], pts, n_heads=10)
    assert np.allclose(got, expected, rtol=0, atol=1e-6)
    assert np.count_nonzero(got) > 0.15 * got[:, [0, 3, 6]].size  # not a comparison of zeros
    print(f"teacher lookup: max |store - grid_sample| = {np.abs(got - expected).max():.3g} "
          f"over {got.size} values, {np.mean(got == expected):.4%} bit-identical")


def _teachers_for(maps, rng):
    """Stage-1-like teachers of a few classes per case: float16 grids on class boxes inside the heart box."""
    out = []
    for lab in maps:
        heart = Box((3, 2, 4), (3 + lab.shape[0], 2 + lab.shape[1], 4 + lab.shape[2]))
        case = []
        for key in ("LV", "Myo", "Cor"):
            lo = (4, 3, 5)
            hi = (4 + lab.shape[0] - 2, 3 + lab.shape[1] - 3, 5 + lab.shape[2] - 2)
            prob = rng.random((8, 7, 9)).astype(np.float16)
            case.append((T.keys.index(key), prob, teacher_affine(heart, Box(lo, hi))))
        out.append(case)
    return out


def test_a_short_fit_from_the_store_equals_the_in_memory_fit(tmp_path):
    """Distillation, mining, jitter and validation all on: same seed, same points, same weights (1e-6)."""
    maps = heart_maps(3)
    teachers = _teachers_for(maps, np.random.default_rng(1))
    sampling = dataclasses.replace(SAMPLING, mined=16, mine_from_epoch=1, mine_interval=1)
    loss = UnifiedLossParams(distill_weight=0.5)
    train = TrainParams(epochs=3, cases_per_batch=2, lr=3e-3, lr_latent=3e-3, eval_interval=1, checkpoint_interval=3)

    def run(task, out):
        torch.manual_seed(0)
        model = ImplicitField(3, SMALL_MODEL, n_heads=len(T))
        result = fit(model, task, train, out, progress=False)
        return model, result

    store = case_store(tmp_path / "cases", maps, sampling,
                       teachers=[[Teacher(*t) for t in case] for case in teachers])
    new_task = UnifiedTask(store, T, sampling, loss, seed=0, device="cpu")
    ref_task = ReferenceTask(maps, T, sampling, loss, seed=0, device="cpu",
                             teachers=[[ReferenceTeacher(c, torch.from_numpy(p)[None, None], a) for c, p, a in case]
                                       for case in teachers])
    assert new_task.distill and ref_task.distill and torch.equal(new_task.alpha, ref_task.alpha)
    b_new, b_ref = new_task.batch(np.array([2, 0]), 1), ref_task.batch(np.array([2, 0]), 1)
    for key in ("case", "points", "target", "has_teacher"):
        assert torch.equal(b_new[key], b_ref[key]), key
    assert torch.allclose(b_new["teacher"], b_ref["teacher"], rtol=0, atol=1e-6)
    new_model, new_result = run(UnifiedTask(store, T, sampling, loss, seed=0, device="cpu"), tmp_path / "new")
    ref_model, ref_result = run(ReferenceTask(maps, T, sampling, loss, seed=0, device="cpu",
                                              teachers=ref_task.teachers), tmp_path / "ref")
    worst = 0.0
    for (name, a), (_, b) in zip(new_model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
        worst = max(worst, float((a - b).abs().max()))
    for row_new, row_ref in zip(new_result.history, ref_result.history):
        assert row_new["dice"] == row_ref["dice"] and row_new["loss"] == pytest.approx(row_ref["loss"], abs=1e-6)
    new_state = torch.load(tmp_path / "new" / "last.pt", weights_only=False)["task"]["sampler"]
    ref_state = torch.load(tmp_path / "ref" / "last.pt", weights_only=False)["task"]["sampler"]
    assert new_state["bit_generator"] == ref_state["bit_generator"]
    assert all(np.array_equal(x, y) for x, y in zip(new_state["mined"], ref_state["mined"]))
    assert sum(len(m) for m in new_state["mined"]) > 0
    print(f"short fit: max |weight difference| = {worst:.3g}")


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
