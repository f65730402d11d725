"""A deterministic synthetic cardiac CT: clean labels, a CT-like image and realistic label noise.

Why it exists: the repair pipeline needs a test oracle (clean truth next to what an automatic
segmenter would have produced) and a demo data set that needs no download. Every case is
generated from ``(seed, index)`` alone, so a test, a notebook and a batch run see the same
anatomy.

How the anatomy is built. Shapes are described in a *canonical heart frame*: millimetres, RAS
directions (x right, y anterior, z superior), origin at the nominal centre of the field of view.
A case draws a rotation, a scale and a position, which map canonical points to world mm; the
voxel grid (an LPS-stored, anisotropic NIfTI affine) is mapped back into the canonical frame and
every shape is rasterised at voxel centres. Shape and spacing therefore change the sampling,
never the anatomy. The one exception is the coronary radius, which is never allowed below half a
voxel diagonal: a thinner tube cannot be a single 26-connected component, and the clean truth
must have the component counts of the class table.

Classes are painted from the lowest fusion priority to the highest, so where shapes overlap the
class that wins in fusion wins here too (coronaries last, so they stay thin and continuous).
Class indices always come from the :class:`~nearfix_lib.classes.ClassTable`.

The label-noise model applies, each with its own probability and strength in
:class:`NoiseParams`, the errors automatic cardiac segmenters make: a smooth boundary warp,
stair-casing from a coarser resolution, spurious islands, holes, broken coronaries,
detached or leaking appendage/veins, swapped patches at class boundaries and a missing class.
Every event that happened is written to the case's ``noise_log``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import cc3d
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from tqdm import tqdm

from .classes import CARDIAC, ClassTable
from .io import IMAGE_DIR, LABEL_DIR, TRUTH_DIR, case_id_from_name, write_json, write_nifti

REQUIRED_KEYS = ("Myo", "LA", "LV", "RA", "RV", "Ao", "PA", "LAA", "Cor", "PV")
META_NAME = "phantom.json"
_COR_SINK = 0.6  # coronary centre line depth below the epicardium, in radii


# -- parameters -----------------------------------------------------------------------------

@dataclass
class NoiseParams:
    """How badly the simulated automatic segmenter errs.

    Each error has a probability per case (``*_prob``) and a strength; an error whose
    probability or strength is zero never happens, so :meth:`disabled` (or zero strengths)
    gives ``noisy == truth``. Lengths are in voxels where the error is a resolution artefact of
    the segmenter (warp, stair-case, islands, holes, appendage gaps and leaks) and in
    millimetres where it is anatomical (coronary gaps, swapped patches, extent of a leak, the
    distance of an island from its class).
    The defaults give noisy-vs-truth Dice of roughly 0.85-0.95 for the large classes and
    0.5-0.8 for coronaries, appendage and veins.
    """

    # 1. boundary jitter: labels resampled (nearest) at smoothly displaced coordinates
    jitter_prob: float = 1.0
    jitter_vox: float = 0.35  # standard deviation of each displacement component (voxels)
    jitter_smooth_vox: float = 6.0  # correlation length of the displacement field (voxels)
    # 2. stair-case: labels from a coarser grid, upsampled by nearest neighbour
    # (the commonest error of the real labels: TotalSegmentator works at 1.5 mm, the CT is 0.35 mm)
    stair_prob: float = 0.9
    stair_factor_max: int = 3  # the factor is drawn from 2..stair_factor_max (< 2: never)
    stair_all_axes_prob: float = 0.5  # coarse along all axes, else along one random axis
    # 3. spurious islands: small balls of a class placed away from that class
    island_prob: float = 0.8
    island_count: int = 4  # 1..island_count islands per case
    island_radius_vox: tuple[float, float] = (1.0, 2.5)
    island_min_dist_mm: float = 12.0  # no voxel of the island's class this close to its centre
    # 4. holes: small balls inside a large class (Myo, chambers, aorta) set to background
    hole_prob: float = 0.6
    hole_count: int = 3  # 1..hole_count holes per case
    hole_radius_vox: tuple[float, float] = (1.0, 2.5)
    # 5. broken coronary: short gaps cut across the coronary tubes
    cor_break_prob: float = 0.7
    cor_break_count: int = 3  # 1..cor_break_count gaps per case
    cor_gap_mm: tuple[float, float] = (3.0, 7.0)
    # 6. LAA and each PV trunk: detached from the LA by a gap, or leaking into its neighbours
    detach_prob: float = 0.25  # per structure
    detach_gap_vox: int = 1  # width of the cut next to the LA (voxels)
    leak_prob: float = 0.2  # per structure (when not detached)
    leak_vox: int = 2  # growth into the neighbours (voxels) ...
    leak_radius_mm: float = 8.0  # ... within this distance of a point on its surface
    # 7. class swaps: a patch of one class relabelled as its neighbour at a shared boundary
    swap_prob: float = 0.6
    swap_count: int = 2  # 1..swap_count patches per case
    swap_radius_mm: float = 7.0
    # 8. a small class (LAA or PV) absent from the noisy map
    missing_prob: float = 0.07

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # a range read back from JSON
                value = tuple(value)
                setattr(self, f.name, value)
            if f.name.endswith("_prob") and not 0.0 <= value <= 1.0:
                raise ValueError(f"noise.{f.name} must be a probability in [0, 1], got {value}")
            if isinstance(value, tuple):
                if len(value) != 2 or not 0.0 <= value[0] <= value[1]:
                    raise ValueError(f"noise.{f.name} must be a range (low, high), "
                                     "0 <= low <= high")
            elif isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"noise.{f.name} must be >= 0, got {value}")

    @classmethod
    def disabled(cls) -> "NoiseParams":
        """Every error switched off: the "automatic" labels equal the truth."""
        return cls(**{f.name: 0.0 for f in fields(cls) if f.name.endswith("_prob")})


@dataclass
class PhantomParams:
    """Size of the data set and of each case's grid; the seed makes it reproducible."""

    n_cases: int = 4
    shape: tuple[int, int, int] = (64, 60, 48)
    fov_mm: tuple[float, float, float] = (140.0, 132.0, 120.0)  # spacing = fov_mm / shape
    seed: int = 0
    noise: NoiseParams = field(default_factory=NoiseParams)

    def __post_init__(self) -> None:
        self.shape = tuple(int(v) for v in self.shape)
        self.fov_mm = tuple(float(v) for v in self.fov_mm)
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"phantom.shape must be three sizes >= 8, got {self.shape}")
        if len(self.fov_mm) != 3 or min(self.fov_mm) <= 0:
            raise ValueError(f"phantom.fov_mm must be three positive lengths, got {self.fov_mm}")
        if self.n_cases < 0:
            raise ValueError("phantom.n_cases must be >= 0")

    @property
    def spacing(self) -> np.ndarray:
        return np.asarray(self.fov_mm, dtype=np.float64) / np.asarray(self.shape, dtype=np.float64)


@dataclass
class PhantomCase:
    """One generated case; ``noisy`` is what the simulated automatic segmenter produced."""

    case_id: str
    image: np.ndarray  # float32 HU
    truth: np.ndarray  # uint8 clean labels
    noisy: np.ndarray  # uint8 noisy labels
    affine: np.ndarray  # 4x4 float64, voxel (i, j, k, 1) -> world mm
    noise_log: list[str]


def check_table(table: ClassTable) -> None:
    """The generator paints the ten cardiac structures; a table lacking one cannot be used."""
    missing = [k for k in REQUIRED_KEYS if k not in table.keys]
    if missing:
        raise ValueError(f"the phantom needs the cardiac classes {list(REQUIRED_KEYS)}; "
                         f"the class table lacks {missing}")


# -- the grid in the canonical frame --------------------------------------------------------

def _rotation(degrees: np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Placement:
    """Where a case's heart sits: the voxel affine and the voxel -> canonical map."""

    affine: np.ndarray  # voxel -> world
    vox_to_canon: np.ndarray  # 4x4, voxel -> canonical mm
    scale: float  # canonical mm -> world mm


def _place(params: PhantomParams, rng: np.random.Generator) -> _Placement:
    """Draw the pose of the heart and build an LPS-stored, anisotropic grid centred on it.

    The world affine is what a DICOM series converts to (``diag(-sx, -sy, sz)``, origin far from
    zero), so code that silently assumes an identity affine fails on the phantom too.
    """
    spacing = params.spacing
    shape = np.asarray(params.shape, dtype=np.float64)
    rot = _rotation(rng.uniform(-10.0, 10.0, 3))
    scale = float(rng.uniform(0.9, 1.1))
    heart_world = np.array([-25.0, 10.0, -150.0]) + rng.normal(0.0, 8.0, 3)
    fov_centre = heart_world + rng.normal(0.0, 2.0, 3)
    direction = np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine = np.eye(4)
    affine[:3, :3] = direction
    affine[:3, 3] = fov_centre - direction @ ((shape - 1.0) / 2.0)
    world_to_canon = np.eye(4)
    world_to_canon[:3, :3] = rot.T / scale
    world_to_canon[:3, 3] = -rot.T @ heart_world / scale
    return _Placement(affine, world_to_canon @ affine, scale)


class _Grid:
    """Canonical coordinates (mm) of every voxel centre, and boxes of voxels around shapes."""

    def __init__(self, shape: tuple[int, int, int], vox_to_canon: np.ndarray):
        self.shape = shape
        self.canon_to_vox = np.linalg.inv(vox_to_canon)
        m = vox_to_canon.astype(np.float32)
        idx = [np.arange(n, dtype=np.float32) for n in shape]
        self.pts = np.empty((3, *shape), dtype=np.float32)
        for c in range(3):
            self.pts[c] = (m[c, 0] * idx[0][:, None, None] + m[c, 1] * idx[1][None, :, None]
                           + m[c, 2] * idx[2][None, None, :] + m[c, 3])

    def region(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the canonical box [lo, hi], or None when it misses the grid."""
        corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                            for z in (lo[2], hi[2])])
        vox = (self.canon_to_vox @ corners.T)[:3]
        a = np.maximum(np.floor(vox.min(axis=1)).astype(int), 0)
        b = np.minimum(np.ceil(vox.max(axis=1)).astype(int) + 1, self.shape)
        if np.any(a >= b):
            return None
        return tuple(slice(int(p), int(q)) for p, q in zip(a, b))  # type: ignore[return-value]

    def points(self, region: tuple[slice, slice, slice]) -> np.ndarray:
        return self.pts[(slice(None), *region)]

    def empty(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=bool)


# -- shapes ---------------------------------------------------------------------------------

def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class _Ellipsoid:
    """Chambers and the myocardium are ellipsoids (cut by planes where the anatomy is open)."""

    centre: np.ndarray  # (3,)
    axes: np.ndarray  # (3, 3), rows are unit axis directions
    semi: np.ndarray  # (3,) semi-axis lengths along those rows

    def level(self, pts: np.ndarray) -> np.ndarray:
        """Sum of squared normalised coordinates of (3, ...) points: <= 1 inside."""
        scaled = (self.axes / self.semi[:, None]).astype(np.float32)
        d = pts - self.centre.astype(np.float32).reshape(3, *([1] * (pts.ndim - 1)))
        q = np.tensordot(scaled, d, axes=1)
        return np.einsum("i...,i...->...", q, q)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        ext = np.sqrt(((self.axes * self.semi[:, None]) ** 2).sum(axis=0))
        return self.centre - ext, self.centre + ext

    def exit_distance(self, origin: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """Distance from interior points ``origin`` along unit ``direction`` to the surface."""
        scaled = self.axes / self.semi[:, None]
        q0 = (np.atleast_2d(origin) - self.centre) @ scaled.T
        w = np.atleast_2d(direction) @ scaled.T
        a = (w * w).sum(axis=1)
        b = 2.0 * (q0 * w).sum(axis=1)
        c = (q0 * q0).sum(axis=1) - 1.0
        return (-b + np.sqrt(np.maximum(b * b - 4.0 * a * c, 0.0))) / (2.0 * a)

    def surface_point(self, direction, inset: float = 0.0) -> np.ndarray:
        """Point ``inset`` mm inside the surface, seen from the centre along ``direction``."""
        d = _unit(direction)
        return self.centre + d * (self.exit_distance(self.centre, d)[0] - inset)


@dataclass(frozen=True)
class _Tube:
    """A tube of varying radius around a densely sampled polyline."""

    points: np.ndarray  # (n, 3)
    radii: np.ndarray  # (n,)

    def paint(self, grid: _Grid, mask: np.ndarray) -> None:
        """OR the tube into ``mask``, one bounding box per segment so large grids stay fast."""
        pts = self.points.astype(np.float32)
        for a, b, ra, rb in zip(pts[:-1], pts[1:], self.radii[:-1], self.radii[1:]):
            rmax = float(max(ra, rb))
            region = grid.region(np.minimum(a, b) - rmax, np.maximum(a, b) + rmax)
            if region is None:
                continue
            d = grid.points(region) - a[:, None, None, None]
            ab = b - a
            t = np.clip(np.tensordot(ab, d, axes=1) / float(ab @ ab), 0.0, 1.0)
            off = d - t[None] * ab[:, None, None, None]
            radius = np.float32(ra) + t * np.float32(rb - ra)
            mask[region] |= np.einsum("i...,i...->...", off, off) <= radius * radius


def _resample(points: np.ndarray, radii: np.ndarray, step: float) -> _Tube:
    """Evenly spaced samples (about ``step`` mm apart) along a dense polyline."""
    arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))]
    n = max(int(math.ceil(arc[-1] / step)), 1) + 1
    s = np.linspace(0.0, arc[-1], n)
    pts = np.stack([np.interp(s, arc, points[:, c]) for c in range(3)], axis=1)
    return _Tube(pts, np.interp(s, arc, radii))


def _curve(ctrl, radii, step: float = 1.0) -> _Tube:
    """A smooth tube through control points (canonical mm) with radii given at those points."""
    ctrl = np.asarray(ctrl, dtype=np.float64)
    knots = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))]
    dense = np.linspace(0.0, knots[-1], max(int(knots[-1] / 0.25), 2))
    pts = CubicSpline(knots, ctrl, bc_type="natural")(dense)
    return _resample(pts, np.interp(dense, knots, np.asarray(radii, dtype=np.float64)), step)


# -- the anatomy ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _LVFrame:
    """Long-axis frame of the left ventricle: ``t`` runs from the base plane to the apex.

    ``theta`` is the angle in the short-axis plane, 0 towards the septum (right ventricle),
    +90 towards the inferior-posterior wall, 180 the lateral wall, -90 the anterior wall.
    """

    base: np.ndarray
    u: np.ndarray
    e_sep: np.ndarray
    e_post: np.ndarray
    outer: _Ellipsoid  # epicardial surface of the LV myocardium

    def direction(self, theta_deg) -> np.ndarray:
        th = np.deg2rad(np.atleast_1d(np.asarray(theta_deg, dtype=np.float64)))
        return np.cos(th)[:, None] * self.e_sep + np.sin(th)[:, None] * self.e_post

    def axis_point(self, t) -> np.ndarray:
        return self.base + np.atleast_1d(np.asarray(t, dtype=np.float64))[:, None] * self.u

    def surface(self, t, theta_deg, lift) -> np.ndarray:
        """Points ``lift`` mm outside the epicardium at height ``t`` and angle ``theta``."""
        origin = self.axis_point(t)
        w = self.direction(theta_deg)
        return origin + w * (self.outer.exit_distance(origin, w) + lift)[:, None]

    def height(self, pts: np.ndarray) -> np.ndarray:
        """``t`` of (3, ...) points: >= 0 on the ventricular side of the base plane."""
        d = pts - self.base.astype(np.float32).reshape(3, 1, 1, 1)
        return np.tensordot(self.u.astype(np.float32), d, axes=1)

    def surface_curve(self, ctrl_t_theta, radii, sink: float, step: float = 1.0) -> _Tube:
        """A tube along the epicardium through (t, theta) control points.

        The centre line lies ``sink`` radii below the surface, so the vessel bulges out of
        the myocardium by (1 - sink) radii.
        """
        ctrl = np.asarray(ctrl_t_theta, dtype=np.float64)
        knots = np.arange(len(ctrl), dtype=np.float64)
        dense = np.linspace(0.0, knots[-1], 60 * len(ctrl))
        tt = CubicSpline(knots, ctrl, bc_type="natural")(dense)
        r = np.interp(dense, knots, np.asarray(radii, dtype=np.float64))
        return _resample(self.surface(tt[:, 0], tt[:, 1], -sink * r), r, step)


@dataclass
class _Anatomy:
    """One case's heart in the canonical frame; :meth:`masks` rasterises it on a grid."""

    frame: _LVFrame
    cavity: _Ellipsoid  # LV blood pool, cut at the base plane
    rv_body: _Ellipsoid  # RV before the LV and myocardium are painted over it
    rv_base_t: float  # RV cut: t >= rv_base_t
    rvot: _Tube
    ra: _Ellipsoid
    la: _Ellipsoid
    aorta: list[_Tube]  # ascending (root at the LV outflow), descending
    pa: list[_Tube]  # trunk, left branch, right branch
    laa: _Tube
    pv: list[_Tube]  # left trunk, right trunk
    coronaries: list[_Tube]  # left main, LAD, LCx, RCA (with its posterior descending branch)
    spine: tuple[np.ndarray, float]  # canonical (x, y) of the vertebral column axis, radius

    @classmethod
    def sample(cls, rng: np.random.Generator, cor_radius_min: float) -> "_Anatomy":
        """Draw one heart: adult dimensions (mm) with per-structure size and position jitter."""

        def size() -> float:
            return float(rng.uniform(0.92, 1.08))

        def shift(sd: float = 1.5) -> np.ndarray:
            return rng.normal(0.0, sd, 3)

        # LV long axis: apex left, anterior, inferior of the base.
        u = _unit(np.array([-0.65, 0.55, -0.50]) + rng.normal(0.0, 0.04, 3))
        toward_right = np.array([1.0, 0.2, 0.0])
        e_sep = _unit(toward_right - (toward_right @ u) * u)
        e_post = np.cross(u, e_sep)
        lv_axes = np.stack([u, e_sep, e_post])
        base = np.array([2.0, -4.0, -4.0]) + shift(2.0)

        lv = size()
        wall = float(rng.uniform(9.0, 12.0))
        cav_semi = np.array([44.0, 21.0, 23.0]) * lv
        cav_t = 0.78 * cav_semi[0]
        cavity = _Ellipsoid(base + cav_t * u, lv_axes, cav_semi)
        outer_t = cav_t - 2.0
        outer_semi = cav_semi + np.array([2.0 + 0.8 * wall, wall, wall])  # thinner apex
        outer = _Ellipsoid(base + outer_t * u, lv_axes, outer_semi)
        frame = _LVFrame(base, u, e_sep, e_post, outer)

        rv = size()
        rv_body = _Ellipsoid(base + 0.7 * cav_semi[0] * u + 18.0 * rv * e_sep, lv_axes,
                             np.array([38.0, 32.0, 38.0]) * rv)
        rv_base_t = -5.0

        # Aortic root: in the anterior-septal part of the LV opening, rising along -u, then up.
        ao_r = 13.5 * size()
        root = base + 1.0 * u + 9.0 * frame.direction(-45.0)[0]
        up = root - 14.0 * u
        asc_ctrl = [root, up, up + np.array([3.0, 2.0, 18.0]) + shift(),
                    up + np.array([6.0, 4.0, 60.0]), up + np.array([9.0, 6.0, 220.0])]
        asc = _curve(asc_ctrl, [ao_r, ao_r, 0.95 * ao_r, 0.95 * ao_r, 0.95 * ao_r], step=2.0)
        desc_xy = np.array([-20.0, -60.0]) + rng.normal(0.0, 2.0, 2)
        desc_r = 10.5 * size()
        desc = _curve([[*desc_xy, -250.0], [*desc_xy, 250.0]], [desc_r, desc_r], step=4.0)

        # LA above the mitral part of the opening, posterior to the aortic root.
        la_centre = base + 14.0 * frame.direction(135.0)[0] - 18.0 * u + shift()
        la = _Ellipsoid(la_centre, np.eye(3), np.array([27.0, 19.0, 18.0]) * size())

        ra = _Ellipsoid(base + np.array([36.0, -6.0, 6.0]) + shift(), np.eye(3),
                        np.array([21.0, 22.0, 25.0]) * size())

        # RV outflow and pulmonary trunk: the pulmonary valve lies anterior, left and superior
        # of the aortic valve; the trunk rises and turns posterior to bifurcate, and the right
        # branch passes behind the ascending aorta.
        pa_r = 12.0 * size()
        valve = base - 2.0 * u + 34.0 * frame.direction(-110.0)[0] + shift()
        rvot_ctrl = [frame.surface(25.0, -25.0, 14.0)[0], frame.surface(5.0, -60.0, 15.0)[0],
                     valve]
        rvot = _curve(rvot_ctrl, [13.0, 12.5, pa_r + 0.5], 1.5)  # wider: holds the trunk's start
        bif = valve + np.array([-8.0, -11.0, 10.0]) + shift()
        trunk = _curve([valve, 0.5 * (valve + bif) + np.array([0.0, 2.0, 2.0]), bif],
                       [pa_r] * 3, 1.5)
        lpa = _curve([bif, bif + np.array([-14.0, -10.0, 2.0]),
                      bif + np.array([-34.0, -22.0, -2.0])], [0.8 * pa_r] * 3, 1.5)
        ao_behind = asc_ctrl[2]
        rpa_y = ao_behind[1] - ao_r - 0.8 * pa_r - 9.0
        rpa = _curve([bif, np.array([ao_behind[0] - 6.0, rpa_y + 6.0, bif[2] + 1.0]),
                      np.array([ao_behind[0] + 8.0, rpa_y, bif[2]]),
                      np.array([ao_behind[0] + 30.0, rpa_y - 4.0, bif[2] - 3.0])],
                     [0.8 * pa_r] * 4, 1.5)

        # LAA: a finger from the LA's left-anterior-superior side over the lateral AV groove.
        laa_dir = np.array([-0.7, 0.5, 0.5])
        laa_start = la.surface_point(laa_dir, inset=3.0)
        laa_r = 7.5 * size()
        laa_tip = frame.surface(-10.0, -160.0 + rng.normal(0.0, 5.0), laa_r + 1.0)[0]
        laa_mid = la.surface_point(laa_dir, inset=-0.8 * laa_r)  # off the LA wall, not along it
        laa = _curve([laa_start, laa_mid, laa_tip], [laa_r, laa_r, 0.75 * laa_r], 1.0)

        # PV: two trunks leaving the LA posteriorly, one left, one right.
        pv = []
        for side in (-1.0, 1.0):
            start = la.surface_point([0.85 * side, -0.45, 0.1], inset=3.0)
            out = _unit(np.array([0.95 * side, -0.2, 0.15]) + rng.normal(0.0, 0.06, 3))
            r = 6.5 * size()
            pv.append(_curve([start, start + 16.0 * out + shift(1.0), start + 34.0 * out],
                             [r, r, 0.9 * r], 1.0))

        coronaries = cls._coronaries(rng, frame, rv_body, rv_base_t, root, u, ao_r, cor_radius_min)
        spine = (np.array([4.0, -82.0]) + rng.normal(0.0, 2.0, 2), 18.0 * size())
        return cls(frame, cavity, rv_body, rv_base_t, rvot, ra, la, [asc, desc],
                   [trunk, lpa, rpa], laa, pv, coronaries, spine)

    @staticmethod
    def _coronaries(rng, frame: _LVFrame, rv_body: _Ellipsoid, rv_base_t: float, root: np.ndarray,
                    u: np.ndarray, ao_r: float, r_min: float) -> list[_Tube]:
        """Left tree (left main, LAD, LCx) and right coronary (RCA, posterior descending).

        Both start inside the aortic root, cross the myocardial rim of the base and then
        follow the epicardium, partly sunk into it (``_COR_SINK``) so that every coronary voxel
        stays within about 3 mm of the myocardium or the aorta even on a 2.5 mm grid. The LAD
        and the posterior descending branch run along the interventricular grooves, found where
        the RV body leaves the epicardium.
        """
        sink = _COR_SINK

        def jit(theta: float, t: float) -> tuple[float, float]:
            return t + float(rng.normal(0.0, 1.0)), theta + float(rng.normal(0.0, 3.0))

        def radii(*r: float) -> list[float]:
            return [max(v, r_min) for v in r]

        apex_t = float((frame.outer.centre - frame.base) @ u + frame.outer.semi[0])
        ant, post = _grooves(frame, rv_body, rv_base_t, np.linspace(2.0, 0.7 * apex_t, 8))

        root_axis = root - 4.0 * u  # the root at t = -3, just above the base plane
        ostium_l = root_axis + (ao_r - 1.5) * frame.direction(-75.0)[0]
        ostium_r = root_axis + (ao_r - 1.5) * frame.direction(-5.0)[0]

        bif_t, bif_th = jit(-100.0, 8.0)
        lm_r = radii(2.4, 2.4, 2.4, 2.3)
        rim_l = frame.axis_point(3.0)[0] + 22.0 * frame.direction(-85.0)[0]  # in the LV rim
        over_rim_l = frame.axis_point(0.0)[0] + 21.0 * frame.direction(-72.0)[0]
        left_main = _curve([ostium_l, over_rim_l, rim_l,
                            frame.surface(bif_t, bif_th, -sink * lm_r[3])[0]], lm_r)
        lad_t = np.array([bif_t, 12.0, 30.0, 48.0, 66.0, 0.93 * apex_t])
        lad_th = np.r_[bif_th, np.interp(lad_t[1:], ant[0], ant[1]) - 8.0]
        lad_ctrl = [(lad_t[0], lad_th[0])] + [jit(th, t) for t, th in zip(lad_t[1:], lad_th[1:])]
        lad = frame.surface_curve(lad_ctrl, radii(2.3, 2.0, 1.8, 1.6, 1.5, 1.4), sink)
        lcx_ctrl = [(bif_t, bif_th)] + [jit(th, t) for t, th in
                                       ((8.0, -145.0), (8.0, -190.0), (9.0, -230.0))]
        lcx = frame.surface_curve(lcx_ctrl, radii(2.3, 1.9, 1.7, 1.5), sink)

        pda_th = np.interp([7.0, 20.0, 38.0, 55.0], post[0], post[1]) + 8.0
        rca_ctrl = [jit(-20.0, 5.0), jit(15.0, 5.5), jit(50.0, 6.0), (7.0, pda_th[0]),
                    jit(pda_th[1], 20.0), jit(pda_th[2], 38.0), jit(pda_th[3], 55.0)]
        rca_r = radii(2.3, 2.2, 2.0, 1.9, 1.7, 1.6, 1.5)
        rca_surface = frame.surface_curve(rca_ctrl, rca_r, sink)
        rim_r = frame.axis_point(3.0)[0] + 22.0 * frame.direction(-25.0)[0]
        over_rim_r = frame.axis_point(0.0)[0] + 21.0 * frame.direction(-12.0)[0]
        rca_root = _curve([ostium_r, over_rim_r, rim_r, rca_surface.points[0]],
                          [2.4, 2.4, rca_r[0], rca_r[0]])
        return [left_main, lad, lcx, rca_root, rca_surface]

    def masks(self, grid: _Grid) -> dict[str, np.ndarray]:
        """Boolean mask of every structure on ``grid`` (before priorities resolve overlaps)."""
        out = {k: grid.empty() for k in REQUIRED_KEYS}

        def ellipsoid(key: str, ell: _Ellipsoid,
                      keep: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
            region = grid.region(*ell.bounds())
            if region is None:
                return
            pts = grid.points(region)
            inside = ell.level(pts) <= 1.0
            if keep is not None:
                inside &= keep(pts)
            out[key][region] |= inside

        frame = self.frame
        ellipsoid("LV", self.cavity, lambda pts: frame.height(pts) >= 0.0)
        ellipsoid("Myo", frame.outer, lambda pts: (frame.height(pts) >= 0.0)
                  & (self.cavity.level(pts) > 1.0))
        ellipsoid("RV", self.rv_body, lambda pts: (frame.height(pts) >= self.rv_base_t)
                  & (frame.outer.level(pts) > 1.0))
        self.rvot.paint(grid, out["RV"])
        ellipsoid("RA", self.ra)
        ellipsoid("LA", self.la)
        for key, tubes in (("Ao", self.aorta), ("PA", self.pa), ("PV", self.pv),
                           ("LAA", [self.laa]), ("Cor", self.coronaries)):
            for tube in tubes:
                tube.paint(grid, out[key])
        height = frame.height(grid.pts)
        for key in ("LA", "LAA", "PV"):  # atrial structures stay on the atrial side of the base
            out[key] &= height <= 0.0
        # Only the LA (mitral valve) and the aortic root meet the LV opening; the right heart
        # and the appendage keep a few millimetres off it.
        valve_zone = _Ellipsoid(self.cavity.centre, self.cavity.axes, self.cavity.semi + 8.0)
        off_valves = (height < -5.0) | (valve_zone.level(grid.pts) > 1.0)
        for key in ("RV", "PA", "LAA"):
            out[key] &= off_valves
        return out


def _grooves(frame: _LVFrame, rv_body: _Ellipsoid, rv_base_t: float,
             heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles where the RV body leaves the epicardium: the interventricular grooves.

    Returns (heights, anterior angles) and (heights, posterior angles); at heights the RV does
    not reach (near the apex) the last angle found is kept, so the arteries run on smoothly.
    """
    theta = np.arange(-179.0, 180.0, 1.0)
    ant, post = [], []
    for t in heights:
        pts = frame.surface(np.full(theta.shape, t), theta, 1.0)
        covered = (rv_body.level(pts.T.astype(np.float32)) <= 1.0) & (t >= rv_base_t)
        zero = int(np.argmin(np.abs(theta)))
        if not covered[zero]:
            ant.append(ant[-1] if ant else -60.0)
            post.append(post[-1] if post else 60.0)
            continue
        gaps_neg = np.flatnonzero(~covered[:zero])
        gaps_pos = np.flatnonzero(~covered[zero:])
        ant.append(theta[gaps_neg[-1] + 1] if gaps_neg.size else -150.0)
        post.append(theta[zero + gaps_pos[0] - 1] if gaps_pos.size else 150.0)
    return np.array([heights, ant]), np.array([heights, post])


def _paint(masks: dict[str, np.ndarray], table: ClassTable) -> np.ndarray:
    """Labels from structure masks, lowest fusion priority first so the winner is painted last.

    Where a higher class cuts across the edge of a lower one, a few voxels of the lower class
    can be left isolated; the truth is an oracle with exact component counts, so components
    beyond a class's expected count are given to the label that surrounds them.
    """
    labels = np.zeros(next(iter(masks.values())).shape, dtype=np.uint8)
    for cls in reversed(table.by_priority()):
        labels[masks[cls.key]] = cls.index
    comps, n = cc3d.connected_components(labels, connectivity=26, return_N=True)
    if n == 0:
        return labels
    sizes = np.bincount(comps.ravel(), minlength=n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)
    for box_index, box in enumerate(ndimage.find_objects(comps), start=1):
        owner[box_index] = labels[box][comps[box] == box_index][0]
    ring = np.ones((3, 3, 3), dtype=bool)
    for cls in table:
        mine = np.flatnonzero(owner == cls.index)
        for comp in mine[np.argsort(-sizes[mine])][cls.expected_components:]:
            box = _bbox(comps == comp, 1)
            frag = comps[box] == comp
            around = labels[box][ndimage.binary_dilation(frag, ring) & ~frag]
            labels[box][frag] = np.bincount(around).argmax() if around.size else 0
    return labels


# -- the CT image ---------------------------------------------------------------------------

# Hounsfield units of each structure in an arterial-phase cardiac CT: opacified left heart,
# right heart less dense (contrast mixing with unopacified caval return), then myocardium.
_BLOOD_HU = {"LV": 360.0, "LA": 350.0, "LAA": 340.0, "Ao": 370.0, "Cor": 360.0, "PV": 350.0,
             "RV": 250.0, "RA": 220.0, "PA": 260.0}


def _ct_image(truth: np.ndarray, grid: _Grid, anatomy: _Anatomy, spacing: np.ndarray,
              table: ClassTable, rng: np.random.Generator) -> np.ndarray:
    """A CT-like volume for the labels: lungs, mediastinal fat, spine, contrast blood pool.

    Partial volume comes from a Gaussian blur (sigma 0.7 voxel), quantum noise from additive
    Gaussian noise, so intensity-based tools see realistic but not trivially separable values.
    """
    hu = np.full(truth.shape, -820.0, dtype=np.float32)  # aerated lung
    hu += rng.normal(0.0, 30.0, truth.shape).astype(np.float32)
    x, y = grid.pts[0], grid.pts[1]
    (sx, sy), spine_r = anatomy.spine
    r_spine = np.hypot(x - sx, y - sy)
    hu[(r_spine <= spine_r + 28.0) | (y >= 62.0)] = 40.0  # paraspinal muscle, chest wall
    hu[r_spine <= spine_r] = 300.0  # cancellous bone
    hu[(r_spine <= spine_r) & (r_spine > spine_r - 3.0)] = 650.0  # cortical shell
    near_heart = ndimage.distance_transform_edt(truth == 0, sampling=spacing) <= 9.0
    hu[near_heart & (hu < 0.0)] = -90.0  # epicardial and mediastinal fat
    contrast = float(rng.uniform(0.85, 1.15))
    for cls in table:
        if cls.key in _BLOOD_HU:
            hu[truth == cls.index] = _BLOOD_HU[cls.key] * contrast
    hu[truth == table["Myo"].index] = float(rng.uniform(80.0, 120.0))
    hu = ndimage.gaussian_filter(hu, 0.7)
    hu += rng.normal(0.0, 25.0, truth.shape).astype(np.float32)
    return hu.astype(np.float32)


# -- the label-noise model ------------------------------------------------------------------

# Neighbouring classes an automatic segmenter confuses at their shared boundary (from, to).
_SWAP_PAIRS = (("LV", "Myo"), ("Myo", "LV"), ("RA", "RV"), ("RV", "RA"), ("LA", "LAA"),
               ("LAA", "LA"), ("LA", "PV"), ("RV", "PA"), ("Myo", "RV"), ("LA", "RA"))
_HOLE_KEYS = ("Myo", "LV", "LA", "RA", "RV", "Ao")
_MISSABLE_KEYS = ("LAA", "PV")
_ATTACHED_KEYS = ("LAA", "PV")  # attached to the LA: can be detached or leak
_MAX_TRIES = 40


@dataclass
class _NoiseState:
    labels: np.ndarray
    table: ClassTable
    spacing: np.ndarray
    p: NoiseParams
    log: list[str]

    def idx(self, key: str) -> int:
        return self.table[key].index

    def present(self, key: str) -> bool:
        return bool(np.any(self.labels == self.idx(key)))


def _ball(shape, centre, radius_mm: float, spacing) -> tuple[tuple[slice, ...], np.ndarray]:
    """Voxel slices around ``centre`` and the ball of ``radius_mm`` (per-axis ``spacing``)."""
    half = np.ceil(radius_mm / np.asarray(spacing)).astype(int)
    lo = np.maximum(np.asarray(centre) - half, 0)
    hi = np.minimum(np.asarray(centre) + half + 1, shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grids = np.ogrid[region]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    return region, d2 <= radius_mm * radius_mm


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by ``margin`` voxels."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        out.append(slice(max(int(hit[0]) - margin, 0),
                         min(int(hit[-1]) + margin + 1, mask.shape[axis])))
    return tuple(out)


def _random_voxel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = np.flatnonzero(mask)
    return np.array(np.unravel_index(flat[rng.integers(flat.size)], mask.shape))


def _noise_missing(s: _NoiseState, rng: np.random.Generator) -> None:
    """8. A small class the segmenter did not find at all."""
    if rng.random() >= s.p.missing_prob:
        return
    present = [k for k in _MISSABLE_KEYS if s.present(k)]
    if present:
        key = present[rng.integers(len(present))]
        s.labels[s.labels == s.idx(key)] = 0
        s.log.append(f"{key} missing")


def _noise_stair(s: _NoiseState, rng: np.random.Generator) -> None:
    """2. Labels predicted on a coarser grid and upsampled by nearest neighbour."""
    if s.p.stair_factor_max < 2 or rng.random() >= s.p.stair_prob:
        return
    factor = int(rng.integers(2, s.p.stair_factor_max + 1))
    axes = [0, 1, 2] if rng.random() < s.p.stair_all_axes_prob else [int(rng.integers(3))]
    for axis in axes:
        n = s.labels.shape[axis]
        # each block takes the label at its centre (an odd factor) or one of its two central
        # voxels (even): a coarse prediction upsampled, not a shifted one
        phase = (factor - 1) // 2 + (int(rng.integers(2)) if factor % 2 == 0 else 0)
        src = np.minimum((np.arange(n) // factor) * factor + phase, n - 1)
        s.labels = np.take(s.labels, src, axis=axis)
    s.log.append(f"stair-case x{factor} along axis {'0, 1, 2' if len(axes) == 3 else axes[0]}")


def _noise_jitter(s: _NoiseState, rng: np.random.Generator) -> None:
    """1. Boundaries moved by a smooth random displacement field (nearest-neighbour resample)."""
    if s.p.jitter_vox <= 0.0 or rng.random() >= s.p.jitter_prob:
        return
    shape = np.asarray(s.labels.shape)
    step = max(s.p.jitter_smooth_vox, 1.0)
    coarse_shape = tuple(int(v) for v in np.ceil(shape / step).astype(int) + 2)
    index = []
    for axis in range(3):
        coarse = ndimage.gaussian_filter(rng.normal(0.0, 1.0, coarse_shape), 0.7)
        disp = ndimage.zoom(coarse, shape / np.asarray(coarse_shape), order=1)[
            tuple(slice(0, int(n)) for n in shape)]
        disp *= s.p.jitter_vox / max(float(disp.std()), 1e-6)
        coord = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
        index.append(np.clip(np.rint(coord + disp), 0, shape[axis] - 1).astype(np.intp))
    s.labels = s.labels[tuple(index)]
    s.log.append(f"boundary jitter (sd {s.p.jitter_vox:g} vox)")


def _noise_swaps(s: _NoiseState, rng: np.random.Generator) -> None:
    """7. A patch of one class relabelled as the class it borders (e.g. LV <-> Myo)."""
    if s.p.swap_count < 1 or s.p.swap_radius_mm <= 0.0 or rng.random() >= s.p.swap_prob:
        return
    ball26 = np.ones((3, 3, 3), dtype=bool)
    for _ in range(int(rng.integers(1, s.p.swap_count + 1))):
        for pair in rng.permutation(len(_SWAP_PAIRS)):
            src, dst = _SWAP_PAIRS[pair]
            a = s.labels == s.idx(src)
            if not a.any() or not s.present(dst):
                continue
            box = _bbox(a, 1)
            border = a[box] & ndimage.binary_dilation(s.labels[box] == s.idx(dst), ball26)
            if not border.any():
                continue
            centre = _random_voxel(border, rng) + [b.start for b in box]
            region, ball = _ball(s.labels.shape, centre, s.p.swap_radius_mm, s.spacing)
            patch = ball & (s.labels[region] == s.idx(src))
            s.labels[region][patch] = s.idx(dst)
            s.log.append(f"patch {src}->{dst} ({int(patch.sum())} vox)")
            break


def _noise_attached(s: _NoiseState, rng: np.random.Generator) -> None:
    """6. LAA / PV trunks cut off from the LA by a thin gap, or leaking into their neighbours."""
    if not s.present("LA"):
        return
    ball26 = np.ones((3, 3, 3), dtype=bool)
    la, cor = s.idx("LA"), s.idx("Cor")
    for key in _ATTACHED_KEYS:
        mask = s.labels == s.idx(key)
        if not mask.any():
            continue
        comps, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        for comp in range(1, n + 1):
            part = comps == comp
            detach = s.p.detach_gap_vox > 0 and rng.random() < s.p.detach_prob
            leak = not detach and s.p.leak_vox > 0 and rng.random() < s.p.leak_prob
            if detach:
                box = _bbox(part, s.p.detach_gap_vox + 1)
                local = s.labels[box]
                near_la = ndimage.binary_dilation(local == la, ball26,
                                                  iterations=s.p.detach_gap_vox)
                cut = part[box] & near_la
                if cut.any():
                    local[cut] = 0
                    s.log.append(f"{key} detached ({int(cut.sum())} vox cut)")
            elif leak and s.p.leak_radius_mm > 0.0:
                surface = part & ~ndimage.binary_erosion(part, ball26)
                region, ball = _ball(s.labels.shape, _random_voxel(surface, rng),
                                     s.p.leak_radius_mm, s.spacing)
                local = s.labels[region]
                grown = ndimage.binary_dilation(part[region], ball26, iterations=s.p.leak_vox)
                spill = grown & ball & ~part[region] & (local != la) & (local != cor)
                if spill.any():
                    local[spill] = s.idx(key)
                    s.log.append(f"{key} leaking (+{int(spill.sum())} vox)")


def _noise_coronary(s: _NoiseState, rng: np.random.Generator) -> None:
    """5. Short gaps across the coronary tubes, filled with the label the tube was drawn over."""
    if s.p.cor_break_count < 1 or s.p.cor_gap_mm[1] <= 0.0 or rng.random() >= s.p.cor_break_prob:
        return
    cor = s.idx("Cor")
    n_cut = 0
    for _ in range(int(rng.integers(1, s.p.cor_break_count + 1))):
        mask = s.labels == cor
        if not mask.any():
            break
        centre = _random_voxel(mask, rng)
        gap = float(rng.uniform(*s.p.cor_gap_mm))
        region, near = _ball(s.labels.shape, centre, gap / 2.0 + 6.0, s.spacing)
        local = s.labels[region]
        vessel = near & (local == cor)
        rel = (np.argwhere(vessel) - (centre - [r.start for r in region])) * s.spacing
        axis_pts = rel[np.linalg.norm(rel, axis=1) <= 5.0]
        if len(axis_pts) < 3:
            continue
        direction = np.linalg.eigh(np.cov(axis_pts.T))[1][:, -1]
        cut = np.zeros_like(vessel)
        cut[vessel] = np.abs(rel @ direction) <= gap / 2.0
        _, nearest = ndimage.distance_transform_edt(local == cor, return_indices=True)
        local[cut] = local[tuple(i[cut] for i in nearest)]
        n_cut += 1
    if n_cut:
        s.log.append(f"Cor broken at {n_cut} place{'s' if n_cut > 1 else ''}")


def _noise_holes(s: _NoiseState, rng: np.random.Generator) -> None:
    """4. Small balls inside a large class left unlabelled."""
    if s.p.hole_count < 1 or s.p.hole_radius_vox[1] <= 0.0 or rng.random() >= s.p.hole_prob:
        return
    made: dict[str, int] = {}
    keys = [k for k in _HOLE_KEYS if s.present(k)]
    for _ in range(int(rng.integers(1, s.p.hole_count + 1)) if keys else 0):
        key = keys[rng.integers(len(keys))]
        mask = s.labels == s.idx(key)
        radius = float(rng.uniform(*s.p.hole_radius_vox))
        for _try in range(_MAX_TRIES):
            centre = _random_voxel(mask, rng)
            region, ball = _ball(s.labels.shape, centre, radius, np.ones(3))
            whole = ball.shape == (2 * int(math.ceil(radius)) + 1,) * 3  # not cut by the border
            if whole and np.all(mask[region][ball]):
                s.labels[region][ball] = 0
                made[key] = made.get(key, 0) + 1
                break
    for key, n in made.items():
        s.log.append(f"{n} hole{'s' if n > 1 else ''} {key}")


def _noise_islands(s: _NoiseState, rng: np.random.Generator) -> None:
    """3. Small blobs of a class far from that class (in background or inside other classes)."""
    if s.p.island_count < 1 or s.p.island_radius_vox[1] <= 0.0 or rng.random() >= s.p.island_prob:
        return
    keys = [c.key for c in s.table if s.present(c.key)]
    box = _bbox(s.labels > 0, 4)
    lo = np.array([b.start for b in box])
    hi = np.array([b.stop for b in box])
    made: dict[str, int] = {}
    for _ in range(int(rng.integers(1, s.p.island_count + 1)) if keys else 0):
        key = keys[rng.integers(len(keys))]
        radius = float(rng.uniform(*s.p.island_radius_vox))
        for _try in range(_MAX_TRIES):
            centre = rng.integers(lo, hi)
            region, near = _ball(s.labels.shape, centre, s.p.island_min_dist_mm, s.spacing)
            if np.any(s.labels[region][near] == s.idx(key)):
                continue
            region, ball = _ball(s.labels.shape, centre, radius, np.ones(3))
            s.labels[region][ball] = s.idx(key)
            made[key] = made.get(key, 0) + 1
            break
    for key, n in made.items():
        s.log.append(f"{n} island{'s' if n > 1 else ''} {key}")


# Order matters: a missing class is decided first so no later step can bring it back; the
# resolution and warp errors act on the whole map before local errors are placed on top.
_NOISE_STEPS = (_noise_missing, _noise_stair, _noise_jitter, _noise_swaps, _noise_attached,
                _noise_coronary, _noise_holes, _noise_islands)


def add_noise(truth: np.ndarray, spacing, params: NoiseParams, seed: np.random.SeedSequence,
              table: ClassTable = CARDIAC) -> tuple[np.ndarray, list[str]]:
    """Simulated automatic labels for ``truth`` and the list of errors applied.

    Each step draws from its own child of ``seed``, so switching one error off leaves the
    others exactly as they were.
    """
    check_table(table)
    state = _NoiseState(truth.copy(), table, np.asarray(spacing, dtype=np.float64), params, [])
    for step, child in zip(_NOISE_STEPS, seed.spawn(len(_NOISE_STEPS))):
        step(state, np.random.default_rng(child))
    return state.labels, state.log


# -- cases and data sets --------------------------------------------------------------------

def make_case(index: int, params: PhantomParams, table: ClassTable = CARDIAC) -> PhantomCase:
    """Case ``index`` (id ``index + 1``); depends only on ``params`` and the index.

    The anatomy, the image noise and the label noise draw from separate child seeds, so
    changing the noise parameters never changes the anatomy or the image.
    """
    check_table(table)
    anatomy_seed, image_seed, noise_seed = np.random.SeedSequence([params.seed, index]).spawn(3)
    rng = np.random.default_rng(anatomy_seed)
    placement = _place(params, rng)
    spacing = params.spacing
    cor_radius_min = 0.51 * float(np.linalg.norm(spacing)) / placement.scale
    anatomy = _Anatomy.sample(rng, cor_radius_min)
    grid = _Grid(params.shape, placement.vox_to_canon)
    truth = _paint(anatomy.masks(grid), table)
    image = _ct_image(truth, grid, anatomy, spacing, table, np.random.default_rng(image_seed))
    noisy, log = add_noise(truth, spacing, params.noise, noise_seed, table)
    return PhantomCase(str(index + 1), image, truth, noisy, placement.affine, log)


def case_paths(root: str | Path, case_id: str) -> tuple[Path, Path, Path]:
    """(image, noisy labels, clean labels) file of a case in a phantom data root."""
    root = Path(root)
    return (root / IMAGE_DIR / f"{case_id}.img.nii.gz",
            root / LABEL_DIR / f"{case_id}.label.nii.gz",
            root / TRUTH_DIR / f"{case_id}.label.nii.gz")


def _plain(obj):
    """JSON round trip, so tuples compare equal to the lists a stored file gives back."""
    return json.loads(json.dumps(obj))


def write_dataset(root: str | Path, params: PhantomParams, table: ClassTable = CARDIAC,
                  progress: bool = False) -> list[str]:
    """Write the phantom data set under ``root`` and return its case ids.

    Layout: ``images/<id>.img.nii.gz`` (int16 HU), ``segmentations/<id>.label.nii.gz`` (noisy),
    ``ground_truth/<id>.label.nii.gz`` (clean) and ``phantom.json`` (parameters, class table,
    each case's noise log). Resumable: a case whose three files exist and whose log is recorded
    is kept. When ``phantom.json`` records other parameters the folder is stale and every case
    is regenerated (old case files removed first). A folder holding labels but no
    ``phantom.json`` was not made here and is refused rather than overwritten.
    """
    check_table(table)
    root = Path(root)
    meta_path = root / META_NAME
    wanted = _plain({"params": asdict(params), "classes": table.to_records()})
    ids = [str(i + 1) for i in range(params.n_cases)]
    logs: dict[str, list[str]] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict) and all(meta.get(k) == v for k, v in wanted.items()):
            logs = {k: v for k, v in (meta.get("cases") or {}).items() if k in ids}
        else:
            _remove_case_files(root)
    elif any(case_id_from_name(p.name) for p in (root / LABEL_DIR).glob("*")):
        raise FileExistsError(f"{root}: holds label files but no {META_NAME}; the phantom only "
                              "writes into folders it created")
    write_json(meta_path, {**wanted, "cases": logs})
    for index, cid in enumerate(tqdm(ids, desc="phantom", disable=not progress)):
        paths = case_paths(root, cid)
        if cid in logs and all(p.is_file() for p in paths):
            continue
        case = make_case(index, params, table)
        hu = np.clip(np.rint(case.image), -1024, 3071).astype(np.int16)
        write_nifti(paths[0], hu, case.affine, dtype=np.int16)
        write_nifti(paths[1], case.noisy, case.affine)
        write_nifti(paths[2], case.truth, case.affine)
        logs[cid] = case.noise_log
        write_json(meta_path, {**wanted, "cases": logs})
    return ids


_CASE_FILE = re.compile(r"^\d+\.(img|label)\.nii\.gz$")


def _remove_case_files(root: Path) -> None:
    """Delete the case files of a stale phantom folder (only names the phantom writes)."""
    for sub in (IMAGE_DIR, LABEL_DIR, TRUTH_DIR):
        folder = root / sub
        if folder.is_dir():
            for path in folder.iterdir():
                if _CASE_FILE.match(path.name) and path.is_file():
                    path.unlink()


def main(argv: list[str] | None = None) -> int:
    """``python -m nearfix_lib.phantom OUT``: write a phantom data root to try nearfix on.

    The folder has the layout of a user's data root (``segmentations/``, ``images/``,
    ``ground_truth/``), so copies of its cases can be broken on purpose to see what the data
    contract does with them. Sizes not given keep the :class:`PhantomParams` defaults.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nearfix_lib.phantom",
                                 description="Write a phantom data root (segmentations/, images/, ground_truth/).")
    ap.add_argument("out", help="folder to create (must not hold labels made elsewhere)")
    ap.add_argument("--cases", type=int, help=f"number of cases (default {PhantomParams.n_cases})")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("I", "J", "K"),
                    help=f"voxels per case (default {' '.join(map(str, PhantomParams.shape))})")
    ap.add_argument("--fov-mm", type=float, nargs=3, metavar=("X", "Y", "Z"),
                    help=f"field of view in mm; spacing = fov / shape (default {' '.join(map(str, PhantomParams.fov_mm))})")
    ap.add_argument("--seed", type=int, help=f"seed of the anatomy and noise (default {PhantomParams.seed})")
    args = ap.parse_args(argv)
    given = {"n_cases": args.cases, "shape": args.shape, "fov_mm": args.fov_mm, "seed": args.seed}
    params = PhantomParams(**{k: v for k, v in given.items() if v is not None})
    ids = write_dataset(args.out, params, progress=True)
    print(f"wrote {len(ids)} phantom cases to {args.out} (spacing {' x '.join(f'{s:.2f}' for s in params.spacing)} mm)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
