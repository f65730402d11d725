"""The phantom is the project's test oracle, so its own guarantees are tested here.

Anatomy: component counts of the class table, contacts (LAA and PV on the LA, coronaries on
the aorta and the myocardium), a closed LV. Noise: it happens, it is in a plausible range, each
error is controlled by its own parameter and switches off completely. Data set: files, ids,
affines and resumption.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from nearfix_lib.core.classes import CARDIAC, ClassTable
from nearfix_lib.core.config import AnatomyParams, NoiseParams, PhantomImageParams, PhantomParams
from nearfix_lib.core.io import discover_cases, read_image, read_label
from nearfix_lib.phantom.dataset import make_case, write_dataset

DEMO = PhantomParams()
BALL = np.ones((3, 3, 3), dtype=bool)
LARGE = ("Myo", "LA", "LV", "RA", "RV", "Ao", "PA")
SMALL = ("LAA", "Cor", "PV")


def _clean(shape=DEMO.shape, seed: int = 0) -> PhantomParams:
    return PhantomParams(shape=shape, seed=seed, noise=NoiseParams.disabled())


def _idx(key: str) -> int:
    return CARDIAC[key].index


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return cc3d.connected_components(mask, connectivity=26, return_N=True)


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    """26-neighbour contact between two masks."""
    return bool(np.any(ndimage.binary_dilation(a, BALL) & b))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


@pytest.fixture(scope="module")
def demo_cases():
    """The four default demo cases (with noise), generated once for the module."""
    return [make_case(i, DEMO) for i in range(DEMO.n_cases)]


# -- determinism, grid, affine ---------------------------------------------------------------

def test_same_seed_and_index_give_identical_cases():
    a, b = make_case(2, DEMO), make_case(2, DEMO)
    for field in ("image", "truth", "noisy", "affine"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.noise_log == b.noise_log
    assert a.case_id == "3"


def test_other_index_or_seed_gives_another_case():
    base = make_case(0, DEMO)
    assert not np.array_equal(base.truth, make_case(1, DEMO).truth)
    assert not np.array_equal(base.truth, make_case(0, replace(DEMO, seed=1)).truth)


def test_noise_parameters_never_change_anatomy_or_image():
    noisy, clean = make_case(1, DEMO), make_case(1, _clean())
    assert np.array_equal(noisy.truth, clean.truth)
    assert np.array_equal(noisy.image, clean.image)
    assert np.array_equal(noisy.affine, clean.affine)


def test_arrays_and_affine(demo_cases):
    spacing = np.asarray(DEMO.fov_mm) / np.asarray(DEMO.shape)
    for case in demo_cases:
        assert case.image.shape == case.truth.shape == case.noisy.shape == DEMO.shape
        assert case.image.dtype == np.float32
        assert case.truth.dtype == np.uint8 and case.noisy.dtype == np.uint8
        assert case.affine.shape == (4, 4) and case.affine.dtype == np.float64
        assert not np.allclose(case.affine, np.eye(4))
        assert np.allclose(_spacing(case.affine), spacing)
        assert len(set(np.round(spacing, 6))) > 1  # anisotropic
        # LPS-stored: i runs to the patient's left, j posterior (RAS world), k superior
        assert np.allclose(np.sign(np.diag(case.affine)[:3]), [-1, -1, 1])
        assert np.linalg.norm(case.affine[:3, 3]) > 50.0
        # the field of view is centred on the heart: chambers' centroid near the grid centre
        heart = np.isin(case.truth, [_idx(k) for k in ("LV", "Myo", "RV", "RA", "LA")])
        offset_mm = (np.argwhere(heart).mean(axis=0) - (np.asarray(DEMO.shape) - 1) / 2) * spacing
        assert np.all(np.abs(offset_mm) < 0.15 * np.asarray(DEMO.fov_mm)), offset_mm


def test_anatomy_is_the_same_in_mm_on_another_grid():
    """Shape and spacing change the sampling, not the anatomy: volumes agree in mm^3."""
    coarse, fine = make_case(0, _clean()), make_case(0, _clean((96, 88, 80)))
    vox = [np.prod(_spacing(c.affine)) for c in (coarse, fine)]
    for key in LARGE:
        volumes = [np.count_nonzero(c.truth == _idx(key)) * v for c, v in zip((coarse, fine), vox)]
        assert volumes[0] == pytest.approx(volumes[1], rel=0.12), key


# -- clean anatomy ---------------------------------------------------------------------------

# The robustness matrix's families (benchmarks.robustness) vary what the phantom holds fixed.
FINE = ((140, 132, 120), (140.0, 132.0, 120.0))  # 1 mm: thin coronaries are not clipped at half a voxel diagonal


def _family(**anatomy) -> PhantomParams:
    return PhantomParams(shape=FINE[0], fov_mm=FINE[1], noise=NoiseParams.disabled(),
                         anatomy=AnatomyParams(**anatomy))


def test_anatomy_families_scale_their_structure_and_keep_the_rest():
    base = make_case(0, _family())
    thin = make_case(0, _family(cor_radius_scale=0.6, laa_radius_scale=0.7, pv_radius_scale=1.25))
    thick = make_case(0, _family(cor_radius_scale=1.3, cor_tortuosity=2.5))
    volume = {name: {k: np.count_nonzero(c.truth == _idx(k)) for k in SMALL}
              for name, c in (("base", base), ("thin", thin), ("thick", thick))}
    assert volume["thin"]["Cor"] < 0.6 * volume["base"]["Cor"] < 0.6 * volume["thick"]["Cor"] / 1.4, volume
    assert volume["thin"]["LAA"] < 0.7 * volume["base"]["LAA"] and volume["thin"]["PV"] > 1.25 * volume["base"]["PV"]
    for case in (thin, thick):
        _check_anatomy(case.truth, case.affine)  # still two trees from the aorta, on the epicardium
    # tortuosity draws another tree (not only a wider one) on the same heart
    assert _dice(thick.truth == _idx("Cor"), ndimage.binary_dilation(base.truth == _idx("Cor"), BALL)) < 0.9
    elsewhere = (thick.truth != _idx("Cor")) & (base.truth != _idx("Cor"))
    assert np.array_equal(thick.truth[elsewhere], base.truth[elsewhere])
    with pytest.raises(ValueError, match="cor_radius_scale"):
        AnatomyParams(cor_radius_scale=0.0)


def test_noise_in_a_segmenters_voxels_scales_with_the_image_grid():
    """segmenter_mm: the same segmenter's errors are more image voxels on a finer image."""
    noise = replace(NoiseParams.disabled(), stair_prob=1.0, stair_all_axes_prob=1.0, stair_factor_max=2,
                    segmenter_mm=4.4)
    assert NoiseParams().voxel_scale([0.35, 0.35, 0.5]) == 1.0  # 0: the image's own voxels
    grid = {"shape": (64, 60, 48), "fov_mm": (140.8, 132.0, 105.6)}  # 2.2 mm voxels
    assert noise.voxel_scale(PhantomParams(**grid).spacing) == pytest.approx(2.0)
    assert make_case(0, PhantomParams(**grid, noise=noise)).noise_log == ["stair-case x4 along axis 0, 1, 2"]
    image_voxels = replace(noise, segmenter_mm=0.0)
    assert make_case(0, PhantomParams(**grid, noise=image_voxels)).noise_log == ["stair-case x2 along axis 0, 1, 2"]


ANATOMY_CASES = [(0, 0), (0, 3), (1, 1), (2, 2), (3, 0), (5, 3), (8, 1), (13, 2)]


def _check_anatomy(truth: np.ndarray, affine: np.ndarray) -> None:
    spacing = _spacing(affine)
    for cls in CARDIAC:
        _, n = _components(truth == cls.index)
        assert n == cls.expected_components, f"{cls.key}: {n} components"

    la = truth == _idx("LA")
    assert _touches(truth == _idx("LAA"), la), "LAA does not touch the LA"
    pv, n = _components(truth == _idx("PV"))
    for comp in range(1, n + 1):
        assert _touches(pv == comp, la), f"PV trunk {comp} does not touch the LA"

    ao = truth == _idx("Ao")
    cor_mask = truth == _idx("Cor")
    cor, n = _components(cor_mask)
    for comp in range(1, n + 1):
        assert _touches(cor == comp, ao), f"coronary tree {comp} does not start at the aorta"
    # on the epicardium: within ~3 mm of Myo or Ao (one voxel diagonal on a coarse grid)
    myo_or_ao = ao | (truth == _idx("Myo"))
    dist = ndimage.distance_transform_edt(~myo_or_ao, sampling=spacing)[cor_mask]
    diagonal = float(np.linalg.norm(spacing))
    assert np.mean(dist <= max(3.0, diagonal) + 1e-6) >= 0.98
    assert dist.max() <= 3.0 + diagonal

    # the myocardium closes the LV laterally: the right heart and the small structures never
    # touch the LV cavity, and almost all of its border faces the myocardium
    lv = truth == _idx("LV")
    for key in ("RV", "RA", "PA", "PV", "LAA"):
        assert not _touches(lv, truth == _idx(key)), f"LV touches {key}"
    border = lv & ~ndimage.binary_erosion(lv, BALL)
    assert np.mean(ndimage.binary_dilation(truth == _idx("Myo"), BALL)[border]) > 0.85

    # aorta: the descending part crosses the whole field of view, the ascending leaves at the top
    parts, _ = _components(ao)
    top, bottom = set(np.unique(parts[:, :, -1])) - {0}, set(np.unique(parts[:, :, 0])) - {0}
    assert len(top) == 2 and len(bottom) == 1, (top, bottom)
    ascending = (top - bottom).pop()
    assert _touches(parts == ascending, lv), "the aortic root does not sit on the LV outflow"


@pytest.mark.parametrize("seed,index", ANATOMY_CASES)
def test_truth_anatomy(seed, index):
    case = make_case(index, _clean(seed=seed))
    _check_anatomy(case.truth, case.affine)


def test_truth_voxel_fractions_are_plausible(demo_cases):
    truth = np.stack([c.truth for c in demo_cases])
    fraction = {c.key: np.count_nonzero(truth == c.index) / truth.size for c in CARDIAC}
    for key in LARGE:
        assert 0.008 < fraction[key] < 0.08, (key, fraction[key])
    assert 0.0007 < fraction["LAA"] < 0.004
    assert 0.0007 < fraction["Cor"] < 0.005
    assert 0.002 < fraction["PV"] < 0.008


def test_ct_intensities(demo_cases):
    for case in demo_cases:
        img, truth = case.image, case.truth

        def inner(key: str, depth: int, img=img, truth=truth) -> np.ndarray:  # away from partial volume
            return img[ndimage.binary_erosion(truth == _idx(key), BALL, iterations=depth)]

        lv, rv, myo = inner("LV", 2), inner("RV", 2), inner("Myo", 1)
        assert 250.0 < lv.mean() < 450.0
        assert 120.0 < rv.mean() < lv.mean() - 40.0  # right heart less opacified
        assert 20.0 < myo.mean() < 180.0
        assert 15.0 < lv.std() < 40.0  # image noise
        background = img[truth == 0]
        assert np.mean(background < -600.0) > 0.2  # lungs
        assert np.any((background > -200.0) & (background < 60.0))  # fat and soft tissue


def test_a_harder_ct_changes_the_image_as_asked_and_nothing_else():
    """``phantom.image``: noisier, blurrier, dimmer coronaries; labels, anatomy and affine untouched."""
    base = make_case(1, DEMO)
    hard = make_case(1, replace(DEMO, image=PhantomImageParams(noise_hu=60.0, blur_vox=1.2, cor_enhancement=0.5)))
    for field in ("truth", "noisy", "affine"):
        assert np.array_equal(getattr(base, field), getattr(hard, field)), field
    lv = ndimage.binary_erosion(base.truth == _idx("LV"), BALL, iterations=2)
    assert 1.8 < hard.image[lv].std() / base.image[lv].std() < 3.0  # noise sd 25 -> 60 HU
    # the coronaries' lumen over the fat halves (means over the same voxels, noise averaging out)
    cor, fat = base.truth == _idx("Cor"), (base.truth == 0) & (base.image > -200) & (base.image < 0)
    assert hard.image[cor].mean() - hard.image[fat].mean() < 0.7 * (base.image[cor].mean() - base.image[fat].mean())
    with pytest.raises(ValueError, match="phantom.image"):
        PhantomImageParams(noise_hu=-1.0)


def test_generator_needs_the_cardiac_classes():
    with pytest.raises(ValueError, match="lacks"):
        make_case(0, DEMO, CARDIAC.subset(["LV", "Myo", "RV"]))


def test_indices_come_from_the_table():
    """Another numbering of the same classes gives the same anatomy, relabelled."""
    records = CARDIAC.to_records()
    for rec in records:
        rec["index"] = 20 + (rec["index"] * 7) % 11
    other = ClassTable.from_records(records)
    a, b = make_case(0, DEMO), make_case(0, DEMO, other)
    lut = np.zeros(256, dtype=np.uint8)
    for cls in CARDIAC:
        lut[cls.index] = other[cls.key].index
    assert np.array_equal(lut[a.truth], b.truth)
    assert np.array_equal(lut[a.noisy], b.noisy)
    assert np.array_equal(a.image, b.image)
    assert set(np.unique(b.noisy)) <= set(other.valid_values().tolist())


# -- label noise -----------------------------------------------------------------------------

def test_noise_changes_labels_plausibly(demo_cases):
    dice = {c.key: [] for c in CARDIAC}
    valid = set(CARDIAC.valid_values().tolist())
    for case in demo_cases:
        assert not np.array_equal(case.noisy, case.truth)
        assert set(np.unique(case.noisy)) <= valid
        assert np.count_nonzero(case.noisy) > 0.5 * np.count_nonzero(case.truth)
        assert case.noise_log and all(isinstance(e, str) and e for e in case.noise_log)
        for cls in CARDIAC:
            dice[cls.key].append(_dice(case.truth == cls.index, case.noisy == cls.index))
    for key in LARGE:
        assert 0.8 <= np.mean(dice[key]) <= 0.97, (key, dice[key])
    for key in SMALL:
        assert 0.35 <= np.mean(dice[key]) <= 0.9, (key, dice[key])
    assert np.mean(dice["Cor"]) < min(np.mean(dice[k]) for k in LARGE)
    cor = [_components(c.noisy == _idx("Cor"))[1] for c in demo_cases]
    assert max(cor) > CARDIAC["Cor"].expected_components  # broken coronaries


def test_no_noise_means_noisy_equals_truth():
    case = make_case(0, _clean())
    assert np.array_equal(case.noisy, case.truth)
    assert case.noise_log == []


def test_zero_strengths_mean_noisy_equals_truth():
    """Every error certain to be drawn but with zero strength changes nothing."""
    noise = NoiseParams(jitter_vox=0.0, stair_factor_max=1, island_count=0, hole_count=0,
                        cor_break_count=0, detach_gap_vox=0, leak_vox=0, swap_count=0,
                        missing_prob=0.0, **{f: 1.0 for f in (
                            "jitter_prob", "stair_prob", "island_prob", "hole_prob",
                            "cor_break_prob", "detach_prob", "leak_prob", "swap_prob")})
    case = make_case(0, replace(DEMO, noise=noise))
    assert np.array_equal(case.noisy, case.truth)
    assert case.noise_log == []


def _only(**changes) -> PhantomParams:
    return replace(DEMO, noise=replace(NoiseParams.disabled(), **changes))


@pytest.mark.parametrize("changes,word", [
    ({"jitter_prob": 1.0}, "jitter"),
    ({"stair_prob": 1.0}, "stair-case"),
    ({"island_prob": 1.0}, "island"),
    ({"hole_prob": 1.0}, "hole"),
    ({"cor_break_prob": 1.0}, "Cor broken"),
    ({"detach_prob": 1.0}, "detached"),
    ({"leak_prob": 1.0}, "leaking"),
    ({"swap_prob": 1.0}, "patch"),
    ({"missing_prob": 1.0}, "missing"),
])
def test_each_error_alone_changes_labels_and_is_logged(changes, word):
    case = make_case(1, _only(**changes))
    assert not np.array_equal(case.noisy, case.truth)
    assert case.noise_log and all(word in entry for entry in case.noise_log), case.noise_log


def test_islands_add_components():
    extra = 0
    for index in range(3):
        case = make_case(index, _only(island_prob=1.0, island_count=4))
        extra += sum(_components(case.noisy == c.index)[1] - c.expected_components
                     for c in CARDIAC)
    assert extra > 0


def test_broken_coronaries_add_components():
    case = make_case(0, _only(cor_break_prob=1.0, cor_break_count=3, cor_gap_mm=(5.0, 6.0)))
    assert _components(case.noisy == _idx("Cor"))[1] > CARDIAC["Cor"].expected_components
    changed = case.noisy != case.truth
    assert np.all(case.truth[changed] == _idx("Cor"))  # only the coronaries were cut


def test_detached_appendage_and_veins_lose_the_la():
    case = make_case(0, _only(detach_prob=1.0, detach_gap_vox=1))
    la = case.noisy == _idx("LA")
    assert not _touches(case.noisy == _idx("LAA"), la)
    assert not _touches(case.noisy == _idx("PV"), la)


def test_missing_class():
    for index in range(3):
        case = make_case(index, _only(missing_prob=1.0))
        gone = [k for k in ("LAA", "PV") if not np.any(case.noisy == _idx(k))]
        assert len(gone) == 1 and np.any(case.truth == _idx(gone[0]))
        assert case.noise_log == [f"{gone[0]} missing"]
        # everything else untouched
        keep = case.truth != _idx(gone[0])
        assert np.array_equal(case.noisy[keep], case.truth[keep])


def test_noise_needing_a_missing_class_is_skipped():
    """Detaching or leaking the LAA/PV needs them; with one gone the others still work."""
    case = make_case(2, _only(missing_prob=1.0, detach_prob=1.0, island_prob=1.0))
    gone = case.noise_log[0].split()[0]
    assert not any(entry.startswith(gone) and "missing" not in entry for entry in case.noise_log)
    assert not np.any(case.noisy == _idx(gone))


def test_noise_parameters_are_validated():
    with pytest.raises(ValueError, match="probability"):
        NoiseParams(hole_prob=1.5)
    with pytest.raises(ValueError, match="range"):
        NoiseParams(cor_gap_mm=(5.0, 2.0))
    with pytest.raises(ValueError, match="shape"):
        PhantomParams(shape=(64, 60))


# -- a larger, non-cubic grid ----------------------------------------------------------------

def test_larger_non_cubic_grid_is_quick_and_valid():
    params = PhantomParams(shape=(96, 88, 80), seed=3)
    start = time.perf_counter()
    case = make_case(1, params)
    assert time.perf_counter() - start < 10.0
    assert case.truth.shape == (96, 88, 80)
    assert np.allclose(_spacing(case.affine), np.asarray(params.fov_mm) / np.asarray(params.shape))
    _check_anatomy(case.truth, case.affine)
    assert not np.array_equal(case.noisy, case.truth)


# -- the data set on disk --------------------------------------------------------------------

def _mtimes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}


def test_write_dataset_round_trip_and_resume(tmp_path):
    params = replace(DEMO, n_cases=2)
    root = tmp_path / "phantom"
    assert write_dataset(root, params) == ["1", "2"]

    found = discover_cases(root, require_images=True)
    assert found.ids == ["1", "2"] and not found.problems
    for index, case in enumerate(found.cases):
        expected = make_case(index, params)
        noisy, truth = read_label(case.label, CARDIAC), read_label(case.truth, CARDIAC)
        image = read_image(case.image)
        assert np.array_equal(noisy.array, expected.noisy)
        assert np.array_equal(truth.array, expected.truth)
        assert np.array_equal(image.array, np.rint(expected.image).astype(np.float32))
        for vol in (noisy, truth, image):
            assert np.allclose(vol.affine, expected.affine, atol=1e-4)
    meta = json.loads((root / "phantom.json").read_text())
    assert meta["params"]["seed"] == 0 and meta["params"]["shape"] == list(DEMO.shape)
    assert meta["cases"]["1"] == make_case(0, params).noise_log

    before = _mtimes(root)
    assert len(before) == 6
    write_dataset(root, params)  # complete: nothing is rewritten
    assert _mtimes(root) == before

    (root / "ground_truth" / "2.label.nii.gz").unlink()  # one file lost: only that case redone
    write_dataset(root, params)
    after = _mtimes(root)
    assert all(after[k] == v for k, v in before.items() if "2." not in k)
    assert after["ground_truth/2.label.nii.gz"] != before["ground_truth/2.label.nii.gz"]


def test_write_dataset_regenerates_a_stale_folder(tmp_path):
    root = tmp_path / "phantom"
    write_dataset(root, replace(DEMO, n_cases=3))
    first = read_label(root / "ground_truth" / "1.label.nii.gz", CARDIAC).array

    changed = replace(DEMO, n_cases=2, seed=7)
    assert write_dataset(root, changed) == ["1", "2"]
    assert discover_cases(root).ids == ["1", "2"]  # the stale case 3 is gone
    now = read_label(root / "ground_truth" / "1.label.nii.gz", CARDIAC).array
    assert np.array_equal(now, make_case(0, changed).truth)
    assert not np.array_equal(now, first)
    assert json.loads((root / "phantom.json").read_text())["params"]["seed"] == 7


def test_write_dataset_refuses_a_folder_it_did_not_create(tmp_path):
    (tmp_path / "segmentations").mkdir()
    (tmp_path / "segmentations" / "a.nii.gz").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path, replace(DEMO, n_cases=1))
    assert (tmp_path / "segmentations" / "a.nii.gz").read_bytes() == b"not ours"
