"""Tests of nearfix_lib.core.metrics: every fast metric against a slow, obvious re-implementation.

The slow versions walk voxels, faces and edges with Python loops, sets and brute-force
pairwise distances, so they share no code (and no crop/EDT shortcut) with the module. Shapes
are small, odd and non-cubic, spacing anisotropic, masks random blobs (thresholded smoothed
noise, some touching the array border), so axis mix-ups and border effects would show.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist
from skimage.measure import marching_cubes

from nearfix_lib.core import metrics as M
from nearfix_lib.core.classes import CARDIAC
from nearfix_lib.core.io import threads_per_worker

SHAPE = (13, 17, 11)
SPACING = (0.7, 1.9, 1.3)
SEEDS = range(6)
NEIGH6 = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
NEIGH26 = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]


# --------------------------------------------------------------------------------------------
# random shapes
# --------------------------------------------------------------------------------------------

def blob(shape, rng, sigma=1.6, frac=0.3):
    """A random blobby mask: smoothed noise above its (1 - frac) quantile."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return f > np.quantile(f, 1.0 - frac)


def blob_pair(seed):
    """A prediction that is a perturbed version of the reference (realistic overlap)."""
    rng = np.random.default_rng(seed)
    b = blob(SHAPE, rng)
    a = b.copy()
    a ^= blob(SHAPE, rng, sigma=1.0, frac=0.12)  # add and remove lumps
    return a, b


def multilabel(shape, rng, n_classes=10, sigma=1.3):
    """Label map whose values 0..n_classes come from the argmax of smoothed noise fields."""
    f = ndimage.gaussian_filter(rng.standard_normal((n_classes + 1, *shape)), (0, sigma, sigma, sigma))
    return np.argmax(f, axis=0).astype(np.uint8)


def sphere(shape, centre, radius):
    g = np.indices(shape, dtype=np.float64)
    r2 = sum((g[d] - centre[d]) ** 2 for d in range(3))
    return r2 < radius ** 2


# --------------------------------------------------------------------------------------------
# slow reference implementations
# --------------------------------------------------------------------------------------------

def slow_dice(a, b):
    sa = {tuple(p) for p in np.argwhere(a)}
    sb = {tuple(p) for p in np.argwhere(b)}
    if not sa and not sb:
        return 1.0
    return 2 * len(sa & sb) / (len(sa) + len(sb))


def slow_surface(mask):
    """Voxels of the mask with a face neighbour outside it (outside the array = background)."""
    out = []
    for p in map(tuple, np.argwhere(mask)):
        for d in NEIGH6:
            q = tuple(p[k] + d[k] for k in range(3))
            if any(q[k] < 0 or q[k] >= mask.shape[k] for k in range(3)) or not mask[q]:
                out.append(p)
                break
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def slow_directed(a, b, spacing):
    """Distances (mm) from every surface voxel of a to the nearest surface voxel of b."""
    pa, pb = slow_surface(a) * spacing, slow_surface(b) * spacing
    return cdist(pa, pb).min(axis=1)


def slow_scores(a, b, spacing, tol):
    na, nb = int(a.sum()), int(b.sum())
    if na == 0 and nb == 0:
        return dict(dice=1.0, hd95=0.0, assd=0.0, nsd=1.0)
    if na == 0 or nb == 0:
        return dict(dice=0.0, hd95=math.nan, assd=math.nan, nsd=0.0)
    d_ab, d_ba = slow_directed(a, b, spacing), slow_directed(b, a, spacing)
    pooled = np.concatenate([d_ab, d_ba])
    return dict(
        dice=slow_dice(a, b),
        hd95=max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)),
        assd=pooled.mean(),
        nsd=(np.sum(d_ab <= tol) + np.sum(d_ba <= tol)) / pooled.size,
    )


def slow_components(mask):
    """26-connected components as lists of voxel tuples, by breadth-first flood fill."""
    todo = {tuple(p) for p in np.argwhere(mask)}
    comps = []
    while todo:
        seed = todo.pop()
        comp, queue = [seed], deque([seed])
        while queue:
            p = queue.popleft()
            for d in NEIGH26:
                q = (p[0] + d[0], p[1] + d[1], p[2] + d[2])
                if q in todo:
                    todo.remove(q)
                    comp.append(q)
                    queue.append(q)
        comps.append(comp)
    return comps


def slow_attachment(labels, spacing, table):
    rows = []
    for c in table:
        if c.attachment is None:
            continue
        tidx = [table[t].index for t in c.attachment.targets]
        targets = {tuple(p) for p in np.argwhere(np.isin(labels, tidx))}
        comps = slow_components(labels == c.index)
        attached, mins = 0, []
        for comp in comps:
            if c.attachment.max_mm == 0:
                hit = any((p[0] + d[0], p[1] + d[1], p[2] + d[2]) in targets
                          for p in comp for d in NEIGH26)
            else:
                if targets:
                    dmin = cdist(np.array(comp) * spacing, np.array(sorted(targets)) * spacing).min()
                else:
                    dmin = math.inf
                mins.append(dmin)
                hit = dmin <= c.attachment.max_mm
            attached += bool(hit)
        rows.append(dict(key=c.key, n_components=len(comps), n_attached=attached,
                         frac_attached=attached / len(comps) if comps else math.nan,
                         max_dist_mm=max(mins) if mins else math.nan))
    return rows


def slow_dihedral(verts, faces):
    """Dihedral angles (degrees) by a loop over faces and a dict of edges."""
    edge_faces = {}
    for fi, face in enumerate(faces):
        for u, v in ((face[0], face[1]), (face[1], face[2]), (face[2], face[0])):
            edge_faces.setdefault((min(u, v), max(u, v)), []).append(fi)

    def normal(fi):
        p0, p1, p2 = (verts[int(k)] for k in faces[fi])
        n = np.cross(p1 - p0, p2 - p0)
        return n / np.linalg.norm(n)

    out = []
    for owners in edge_faces.values():
        if len(owners) == 2:
            cos = float(np.dot(normal(owners[0]), normal(owners[1])))
            out.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return np.array(out)


def slow_taubin(verts, faces, iterations, lam=0.5, mu=-0.53):
    neighbours = [set() for _ in range(len(verts))]
    for face in faces:
        for u, v in ((face[0], face[1]), (face[1], face[2]), (face[2], face[0])):
            neighbours[u].add(int(v))
            neighbours[v].add(int(u))
    v = np.array(verts, dtype=np.float64)
    for _ in range(iterations):
        for step in (lam, mu):
            new = v.copy()
            for i, nb in enumerate(neighbours):
                if nb:
                    new[i] = v[i] + step * (np.mean([v[j] for j in nb], axis=0) - v[i])
            v = new
    return v


@pytest.fixture(params=["edt", "kdtree"])
def nearest_path(request, monkeypatch):
    """Run a test once through each way metrics computes nearest distances (EDT, k-d tree)."""
    per_point = 0.0 if request.param == "kdtree" else math.inf
    monkeypatch.setattr(M, "_KDTREE_VOXELS_PER_POINT", per_point)
    return request.param


def assert_scores(fast, slow):
    for k in ("dice", "hd95", "assd", "nsd"):
        if math.isnan(slow[k]):
            assert math.isnan(fast[k]), k
        else:
            assert fast[k] == pytest.approx(slow[k], rel=1e-5, abs=1e-5), k


# --------------------------------------------------------------------------------------------
# binary pairs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_binary_scores_match_brute_force(seed, nearest_path):
    a, b = blob_pair(seed)
    assert a.any() and b.any() and (a != b).any()
    for tol in (1.0, 2.5):
        fast = M.binary_scores(a, b, SPACING, nsd_tol_mm=tol)
        assert_scores(fast, slow_scores(a, b, np.array(SPACING), tol))


@pytest.mark.parametrize("seed", SEEDS)
def test_single_metric_functions_match_brute_force(seed):
    a, b = blob_pair(seed)
    slow = slow_scores(a, b, np.array(SPACING), 1.5)
    assert M.dice(a, b) == pytest.approx(slow["dice"])
    assert M.hd95(a, b, SPACING) == pytest.approx(slow["hd95"], rel=1e-5)
    assert M.assd(a, b, SPACING) == pytest.approx(slow["assd"], rel=1e-5)
    assert M.nsd(a, b, SPACING, tol_mm=1.5) == pytest.approx(slow["nsd"])


def test_sparse_masks_in_a_large_box_match_brute_force(monkeypatch):
    # scattered islands stretch the box over the volume: the default cost rule picks the
    # k-d tree here; the spy proves it and the brute force checks the numbers
    shape = (150, 160, 110)
    a = sphere(shape, (10, 12, 9), 3) | sphere(shape, (140, 150, 101), 1.5)
    b = sphere(shape, (11, 12, 9), 3) | sphere(shape, (5, 154, 105), 1)
    calls = []
    real = M.cKDTree
    monkeypatch.setattr(M, "cKDTree", lambda pts: calls.append(len(pts)) or real(pts))
    sp = np.array([0.8, 0.8, 2.5])
    assert_scores(M.binary_scores(a, b, sp, nsd_tol_mm=1.0), slow_scores(a, b, sp, 1.0))
    assert len(calls) == 2



def test_the_kdtree_rule_on_measured_cases():
    # a real-size decoded map that flooded the volume with one class: 0.85 M surface points in a
    # 401x456x275 box took 62 s by k-d tree (queries deep inside the flood), 5 s by EDT
    assert not M.prefer_kdtree(847_302, 401 * 456 * 275)
    # a few islands of a noisy label stretching a class's box over a real-size volume
    assert M.prefer_kdtree(20_000, 512 * 512 * 275)
    # a compact class in its own box: the EDT
    assert not M.prefer_kdtree(60_000, 180 * 170 * 110)

def test_surfaces_on_the_array_border_count(nearest_path):
    # masks filling whole slabs of the array: their surface lies on the array border
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    a[:, :9] = True
    b[:, :6] = True
    assert_scores(M.binary_scores(a, b, SPACING), slow_scores(a, b, np.array(SPACING), 1.0))


def test_scores_are_not_symmetric_in_a_way_that_hides_direction():
    # a tiny mask inside a big one: d(a->b) small-ish, d(b->a) large; hd95 takes the max
    b = sphere(SHAPE, (6, 8, 5), 5)
    a = sphere(SHAPE, (6, 8, 5), 1.5)
    fast = M.binary_scores(a, b, (1, 1, 1))
    d_ab = slow_directed(a, b, np.ones(3))
    d_ba = slow_directed(b, a, np.ones(3))
    assert np.percentile(d_ba, 95) > np.percentile(d_ab, 95)
    assert fast["hd95"] == pytest.approx(np.percentile(d_ba, 95), rel=1e-5)


def test_concentric_spheres_hd95_is_radius_difference():
    shape = (41, 43, 39)
    c = (20.0, 21.0, 19.0)
    inner, outer = sphere(shape, c, 10), sphere(shape, c, 12)
    s = M.binary_scores(inner, outer, (1.0, 1.0, 1.0))
    assert s["hd95"] == pytest.approx(2.0, abs=0.5)
    assert s["assd"] == pytest.approx(2.0, abs=0.5)
    assert s["dice"] == pytest.approx(2 * inner.sum() / (inner.sum() + outer.sum()))


def test_anisotropic_spacing_scales_distances_along_its_axis(nearest_path):
    a = np.zeros((20, 24, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 3, axis=1)
    iso = M.binary_scores(a, b, (1.0, 1.0, 1.0))
    aniso = M.binary_scores(a, b, (1.0, 2.0, 1.0))
    assert iso["hd95"] == pytest.approx(3.0, abs=1e-5)
    assert aniso["hd95"] == pytest.approx(6.0, abs=1e-5)
    # spacing along another axis does not matter for a shift along axis 1
    assert M.hd95(a, b, (3.0, 1.0, 1.0)) == pytest.approx(3.0, abs=1e-5)
    assert_scores(aniso, slow_scores(a, b, np.array([1.0, 2.0, 1.0]), 1.0))


def test_identical_masks_are_perfect():
    a, _ = blob_pair(3)
    s = M.binary_scores(a, a, SPACING)
    assert s == dict(dice=1.0, hd95=0.0, assd=0.0, nsd=1.0)


def test_empty_conventions():
    empty = np.zeros(SHAPE, bool)
    a, _ = blob_pair(1)
    assert M.binary_scores(empty, empty, SPACING) == dict(dice=1.0, hd95=0.0, assd=0.0, nsd=1.0)
    for x, y in ((a, empty), (empty, a)):
        s = M.binary_scores(x, y, SPACING)
        assert s["dice"] == 0.0 and s["nsd"] == 0.0
        assert math.isnan(s["hd95"]) and math.isnan(s["assd"])
    assert M.dice(empty, empty) == 1.0
    assert math.isnan(M.hd95(a, empty, SPACING))


def test_bad_inputs_are_refused():
    a = np.zeros(SHAPE, bool)
    with pytest.raises(ValueError):
        M.binary_scores(a, a[:-1], SPACING)
    with pytest.raises(ValueError):
        M.binary_scores(a, a, (1.0, 1.0))
    with pytest.raises(ValueError):
        M.binary_scores(a, a, (1.0, 0.0, 1.0))


# --------------------------------------------------------------------------------------------
# multi-class
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_per_class_scores_match_binary_brute_force(seed, nearest_path):
    rng = np.random.default_rng(100 + seed)
    ref = multilabel(SHAPE, rng)
    pred = ref.copy()
    flip = blob(SHAPE, rng, sigma=1.0, frac=0.15)
    pred[flip] = rng.integers(0, 11, size=int(flip.sum()))
    pred[pred == CARDIAC["Cor"].index] = 0  # one class absent from the prediction
    rows = M.per_class_scores(pred, ref, SPACING, CARDIAC, nsd_tol_mm=2.0)
    assert [r["key"] for r in rows] == CARDIAC.keys
    for r in rows:
        idx = CARDIAC[r["key"]].index
        a, b = pred == idx, ref == idx
        assert_scores(r, slow_scores(a, b, np.array(SPACING), 2.0))
        assert r["n_vox"] == a.sum() and r["n_vox_ref"] == b.sum()


def test_per_class_scores_with_both_absent_and_fortran_order():
    rng = np.random.default_rng(7)
    ref = multilabel(SHAPE, rng, n_classes=3)  # classes 4..10 absent everywhere
    pred = np.asfortranarray(np.roll(ref, 1, axis=2))
    rows = {r["key"]: r for r in M.per_class_scores(pred, ref, SPACING, CARDIAC)}
    assert rows["PV"]["dice"] == 1.0 and rows["PV"]["hd95"] == 0.0 and rows["PV"]["n_vox"] == 0
    idx = CARDIAC["LA"].index
    assert_scores(rows["LA"], slow_scores(pred == idx, ref == idx, np.array(SPACING), 1.0))



def test_one_reference_for_several_maps_gives_each_maps_own_scores(nearest_path):
    """The truth's boxes, components and surface distances kept across maps: the same rows as scoring
    each map against the array, also when a later map reaches out of the distances' box (regrown)."""
    rng = np.random.default_rng(21)
    shape = (23, 19, 15)
    ref = multilabel(shape, rng, n_classes=4)
    ref[:, :, :3] = 0  # room for an island outside every class's box
    close = ref.copy()
    close[blob(shape, rng, sigma=1.0, frac=0.1)] = 0
    far = ref.copy()
    far[1:3, 1:3, 0:2] = CARDIAC["LA"].index  # an island of LA outside its box
    truth = M.Reference(ref, SPACING, CARDIAC)
    held = {}
    for pred in (close, far, ref):
        shared = M.case_report(pred, truth, SPACING, CARDIAC)
        alone = M.case_report(pred, ref, SPACING, CARDIAC)
        assert shared.equals(alone)
        held[id(pred)] = dict(truth._distance)
    if M._KDTREE_VOXELS_PER_POINT == math.inf:  # the EDT path keeps the distances and grew them for `far`
        before, after = held[id(close)]["LA"][0], held[id(far)]["LA"][0]
        assert after[2].start == 0 < before[2].start
    with pytest.raises(ValueError, match="spacing"):
        M.case_report(far, truth, (1.0, 1.0, 1.0), CARDIAC)

# --------------------------------------------------------------------------------------------
# components
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_component_counts_match_flood_fill(seed):
    rng = np.random.default_rng(200 + seed)
    labels = multilabel((9, 12, 7), rng, sigma=0.8)
    counts = M.component_counts(labels, CARDIAC)
    for c in CARDIAC:
        assert counts[c.key] == len(slow_components(labels == c.index)), c.key
    assert M.component_counts(np.asfortranarray(labels), CARDIAC) == counts


def test_component_counts_use_26_connectivity_and_ignore_other_labels():
    labels = np.zeros((6, 6, 6), np.uint8)
    la, laa = CARDIAC["LA"].index, CARDIAC["LAA"].index
    labels[1, 1, 1] = la
    labels[2, 2, 2] = la  # corner contact only: one 26-component
    labels[4, 4, 4] = la
    labels[0, 5, 0] = laa
    labels[5, 0, 5] = 200  # not in the table
    table = CARDIAC.subset(["LA", "LAA"])
    assert M.component_counts(labels, table) == {"LA": 2, "LAA": 1}


def test_at_expected_fraction():
    table = CARDIAC.subset(["LA", "Ao"])  # LA expects 1, Ao expects 2
    cases = [{"LA": 1, "Ao": 2}, {"LA": 3, "Ao": 2}, {"LA": 1, "Ao": 1}, {"LA": 1, "Ao": 2}]
    assert M.at_expected_fraction(cases, table) == {"LA": 0.75, "Ao": 0.75}
    assert all(math.isnan(v) for v in M.at_expected_fraction([], table).values())


# --------------------------------------------------------------------------------------------
# attachment
# --------------------------------------------------------------------------------------------

def _compare_attachment(fast, slow):
    assert [r["key"] for r in fast] == [r["key"] for r in slow]
    for f, s in zip(fast, slow):
        assert f["n_components"] == s["n_components"], f["key"]
        assert f["n_attached"] == s["n_attached"], f["key"]
        for k in ("frac_attached", "max_dist_mm"):
            if math.isnan(s[k]):
                assert math.isnan(f[k]), (f["key"], k)
            else:
                assert f[k] == pytest.approx(s[k], rel=1e-5), (f["key"], k)


@pytest.mark.parametrize("seed", range(4))
def test_attachment_report_matches_brute_force(seed, nearest_path):
    rng = np.random.default_rng(300 + seed)
    labels = multilabel(SHAPE, rng, sigma=1.0)
    fast = M.attachment_report(labels, SPACING, CARDIAC)
    assert [r["key"] for r in fast] == ["LAA", "Cor", "PV"]
    _compare_attachment(fast, slow_attachment(labels, np.array(SPACING), CARDIAC))


def test_attachment_hand_built_cases(nearest_path):
    sp = (1.0, 1.0, 1.0)
    L = {k: CARDIAC[k].index for k in CARDIAC.keys}
    lab = np.zeros((30, 20, 20), np.uint8)
    lab[2:10, 2:10, 2:10] = L["LA"]
    lab[10:13, 4:7, 4:7] = L["LAA"]  # face contact with LA: attached
    lab[10, 10, 10] = L["LAA"]  # touches LA only at the corner (9, 9, 9): attached (26)
    lab[2:5, 12:15, 2:5] = L["LAA"]  # a 2-voxel gap to LA: not attached
    lab[20:25, 2:12, 2:12] = L["Myo"]
    lab[20:25, 14, 5] = L["Cor"]  # 3 mm from Myo (j = 11): attached
    lab[20:25, 16, 5] = L["Cor"]  # 5 mm away: not attached
    lab[28, 18, 18] = L["Cor"]  # far away
    rows = {r["key"]: r for r in M.attachment_report(lab, sp, CARDIAC)}
    assert rows["LAA"]["n_components"] == 3 and rows["LAA"]["n_attached"] == 2
    assert rows["LAA"]["frac_attached"] == pytest.approx(2 / 3)
    assert math.isnan(rows["LAA"]["max_dist_mm"])
    assert rows["Cor"]["n_components"] == 3 and rows["Cor"]["n_attached"] == 1
    far = math.dist((28, 18, 18), (24, 11, 11))
    assert rows["Cor"]["max_dist_mm"] == pytest.approx(far, rel=1e-5)
    assert rows["PV"]["n_components"] == 0 and math.isnan(rows["PV"]["frac_attached"])
    _compare_attachment(list(rows.values()),
                        slow_attachment(lab, np.ones(3), CARDIAC))

    # the same Cor scene with anisotropic spacing: 3 voxels along axis 1 at 1.5 mm = 4.5 mm
    rows = {r["key"]: r for r in M.attachment_report(lab, (1.0, 1.5, 1.0), CARDIAC)}
    assert rows["Cor"]["n_attached"] == 0

    # contact found although the target lies wholly outside the class's bounding box
    alone = np.zeros((8, 8, 8), np.uint8)
    alone[0:3, 0:3, 0:3] = L["LA"]
    alone[3, 3, 3] = L["LAA"]  # corner contact
    alone[6, 0, 0] = L["LAA"]  # two voxels away
    rows = {r["key"]: r for r in M.attachment_report(alone, sp, CARDIAC)}
    assert rows["LAA"]["n_components"] == 2 and rows["LAA"]["n_attached"] == 1
    alone[6, 0, 0] = 0
    rows = {r["key"]: r for r in M.attachment_report(alone, sp, CARDIAC)}
    assert rows["LAA"]["n_attached"] == 1

    # targets absent: nothing attached, distance to nothing is infinite
    lab[lab == L["Myo"]] = 0
    lab[lab == L["LA"]] = 0
    rows = {r["key"]: r for r in M.attachment_report(lab, sp, CARDIAC)}
    assert rows["Cor"]["n_attached"] == 0 and rows["Cor"]["max_dist_mm"] == math.inf
    assert rows["LAA"]["n_attached"] == 0 and rows["LAA"]["frac_attached"] == 0.0


# --------------------------------------------------------------------------------------------
# surface roughness
# --------------------------------------------------------------------------------------------

def _small_mesh(seed, spacing=SPACING):
    mask = blob((10, 12, 9), np.random.default_rng(400 + seed), sigma=1.8, frac=0.25)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    verts, faces, _, _ = marching_cubes(np.pad(mask[box], 1).astype(np.float32), 0.5,
                                        spacing=spacing)
    return mask, verts, faces


@pytest.mark.parametrize("seed", range(3))
def test_dihedral_angles_match_loop(seed):
    _, verts, faces = _small_mesh(seed)
    fast = np.sort(M.mesh_dihedral_angles(verts, faces))
    slow = np.sort(slow_dihedral(verts, faces))
    assert fast.shape == slow.shape and fast.size > 0
    assert np.allclose(fast, slow, atol=1e-6)


def test_dihedral_angles_analytic_and_degenerate_faces():
    # two triangles folded 90 degrees along the edge (0, 1), one flat pair along (0, 2)
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 1, 0], [2, 0, 0]], float)
    faces = np.array([[0, 1, 2], [1, 0, 3], [0, 2, 4]])  # consistently oriented
    assert np.allclose(np.sort(M.mesh_dihedral_angles(verts, faces)), [0.0, 90.0])
    # a zero-area face (collinear points) on the edge (1, 2) adds no angle
    faces_deg = np.vstack([faces, [[2, 5, 1]]])
    verts_deg = verts.copy()
    verts_deg[5] = [0.5, 0.5, 0.0]  # on the segment 1-2
    assert np.allclose(np.sort(M.mesh_dihedral_angles(verts_deg, faces_deg)), [0.0, 90.0])


def test_taubin_leaves_unreferenced_vertices_alone():
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 5]], float)
    out = M.taubin_smooth(verts, np.array([[0, 1, 2]]), 4)
    assert np.array_equal(out[3], verts[3])
    assert np.allclose(out[:3], slow_taubin(verts[:3], np.array([[0, 1, 2]]), 4))


def test_taubin_matches_loop():
    _, verts, faces = _small_mesh(0)
    assert np.allclose(M.taubin_smooth(verts, faces, 3), slow_taubin(verts, faces, 3), atol=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_surface_roughness_matches_loop(seed):
    mask, verts, faces = _small_mesh(seed)
    expected = float(np.mean(slow_dihedral(slow_taubin(verts, faces, 10), faces)))
    assert M.surface_roughness(mask, SPACING) == pytest.approx(expected, rel=1e-6)
    raw = float(np.mean(slow_dihedral(verts, faces)))
    assert M.surface_roughness(mask, SPACING, smoothing_iterations=0) == pytest.approx(raw, rel=1e-6)


@pytest.mark.parametrize("radius,offset", [(12, 0.0), (13, 0.37), (18, 0.21)])
def test_surface_roughness_ranks_smooth_stair_noisy(radius, offset):
    n = int(2 * radius + 10) // 3 * 3
    centre = [(n - 1) / 2 + offset] * 3
    smooth = sphere((n,) * 3, centre, radius)
    # the same sphere on a 3x coarser grid, upsampled by nearest neighbour: 3-voxel stairs
    coarse_centre = [(c - 1) / 3 for c in centre]  # coarse voxel q covers fine 3q..3q+2
    coarse = sphere((n // 3,) * 3, coarse_centre, radius / 3)
    stair = coarse.repeat(3, 0).repeat(3, 1).repeat(3, 2)
    assert abs(int(stair.sum()) - int(smooth.sum())) < 0.1 * smooth.sum()
    rng = np.random.default_rng(radius)
    shell = smooth & ~ndimage.binary_erosion(smooth)
    noisy = smooth ^ (ndimage.binary_dilation(shell) & (rng.random(smooth.shape) < 0.2))
    r = [M.surface_roughness(m, (1.0, 1.0, 1.0)) for m in (smooth, stair, noisy)]
    assert r[0] < r[1] < r[2], r


def test_surface_roughness_empty_is_nan():
    assert math.isnan(M.surface_roughness(np.zeros(SHAPE, bool), SPACING))


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------

def test_case_report():
    rng = np.random.default_rng(500)
    ref = multilabel(SHAPE, rng)
    pred = ref.copy()
    pred[pred == CARDIAC["PV"].index] = 0  # PV missing: hd95 nan, 0 components
    frame = M.case_report(pred, ref, SPACING, CARDIAC)
    assert list(frame.columns) == ["key", "dice", "hd95", "assd", "nsd", "n_vox", "n_vox_ref",
                                   "n_comp", "n_comp_ref", "expected"]
    assert list(frame["key"]) == CARDIAC.keys
    comp_p, comp_r = M.component_counts(pred, CARDIAC), M.component_counts(ref, CARDIAC)
    for _, row in frame.iterrows():
        assert row["n_comp"] == comp_p[row["key"]] and row["n_comp_ref"] == comp_r[row["key"]]
        assert row["expected"] == CARDIAC[row["key"]].expected_components
    pv = frame.set_index("key").loc["PV"]
    assert math.isnan(pv["hd95"]) and pv["n_comp"] == 0 and pv["dice"] == 0.0



def test_surface_distances_do_not_depend_on_the_thread_count(monkeypatch):
    """The distance transforms run on the cores the process may use (OMP_NUM_THREADS caps them)."""
    rng = np.random.default_rng(11)
    a = ndimage.binary_dilation(rng.random((41, 37, 29)) > 0.995, iterations=3)
    b = ndimage.binary_dilation(rng.random((41, 37, 29)) > 0.995, iterations=2)
    results = []
    for threads in ("1", "2", "4"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        results.append(M._nearest_distances(a, b, (0.7, 0.9, 1.3)))
    assert threads_per_worker(1) <= 4 and all(np.array_equal(results[0], r) for r in results[1:])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_per_worker(1) == 1
