"""The phantom's anatomy: a canonical heart frame, its shapes and the painted clean labels.

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
Class indices always come from the :class:`~nearfix_lib.core.classes.ClassTable`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.config import AnatomyParams, PhantomParams

REQUIRED_KEYS = ("Myo", "LA", "LV", "RA", "RV", "Ao", "PA", "LAA", "Cor", "PV")
_COR_SINK = 0.6  # coronary centre line depth below the epicardium, in radii


def check_table(table: ClassTable) -> None:
    """The generator paints the ten cardiac structures; a table lacking one cannot be used."""
    missing = [k for k in REQUIRED_KEYS if k not in table.keys]
    if missing:
        raise ValueError(f"the phantom needs the cardiac classes {list(REQUIRED_KEYS)}; "
                         f"the class table lacks {missing}")


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by ``margin`` voxels."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        out.append(slice(max(int(hit[0]) - margin, 0),
                         min(int(hit[-1]) + margin + 1, mask.shape[axis])))
    return tuple(out)


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
    def sample(cls, rng: np.random.Generator, cor_radius_min: float,
               family: AnatomyParams | None = None) -> _Anatomy:
        """Draw one heart: adult dimensions (mm) with per-structure size and position jitter,
        scaled where ``family`` says (the same draws: a family changes sizes, not the case)."""
        family = family or AnatomyParams()

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
        laa_r = 7.5 * family.laa_radius_scale * size()
        laa_tip = frame.surface(-10.0, -160.0 + rng.normal(0.0, 5.0), laa_r + 1.0)[0]
        laa_mid = la.surface_point(laa_dir, inset=-0.8 * laa_r)  # off the LA wall, not along it
        laa = _curve([laa_start, laa_mid, laa_tip], [laa_r, laa_r, 0.75 * laa_r], 1.0)

        # PV: two trunks leaving the LA posteriorly, one left, one right.
        pv = []
        for side in (-1.0, 1.0):
            start = la.surface_point([0.85 * side, -0.45, 0.1], inset=3.0)
            out = _unit(np.array([0.95 * side, -0.2, 0.15]) + rng.normal(0.0, 0.06, 3))
            r = 6.5 * family.pv_radius_scale * size()
            pv.append(_curve([start, start + 16.0 * out + shift(1.0), start + 34.0 * out],
                             [r, r, 0.9 * r], 1.0))

        coronaries = cls._coronaries(rng, frame, rv_body, rv_base_t, root, u, ao_r, cor_radius_min, family)
        spine = (np.array([4.0, -82.0]) + rng.normal(0.0, 2.0, 2), 18.0 * size())
        return cls(frame, cavity, rv_body, rv_base_t, rvot, ra, la, [asc, desc],
                   [trunk, lpa, rpa], laa, pv, coronaries, spine)

    @staticmethod
    def _coronaries(rng, frame: _LVFrame, rv_body: _Ellipsoid, rv_base_t: float, root: np.ndarray,
                    u: np.ndarray, ao_r: float, r_min: float, family: AnatomyParams) -> list[_Tube]:
        """Left tree (left main, LAD, LCx) and right coronary (RCA, posterior descending).

        Both start inside the aortic root, cross the myocardial rim of the base and then
        follow the epicardium, partly sunk into it (``_COR_SINK``) so that every coronary voxel
        stays within about 3 mm of the myocardium or the aorta even on a 2.5 mm grid. The LAD
        and the posterior descending branch run along the interventricular grooves, found where
        the RV body leaves the epicardium. ``family`` scales the radii and the jitter of the control points.
        """
        sink = _COR_SINK
        wander = family.cor_tortuosity

        def jit(theta: float, t: float) -> tuple[float, float]:
            return t + wander * float(rng.normal(0.0, 1.0)), theta + wander * float(rng.normal(0.0, 3.0))

        def radii(*r: float) -> list[float]:
            return [max(v * family.cor_radius_scale, r_min) for v in r]

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
                          [max(2.4 * family.cor_radius_scale, min(2.4, r_min))] * 2 + [rca_r[0], rca_r[0]])
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
