"""The phantom's label-noise model: the errors automatic cardiac segmenters make.

The label-noise model applies, each with its own probability and strength in
:class:`NoiseParams`, the errors automatic cardiac segmenters make: a smooth boundary warp,
stair-casing from a coarser resolution, spurious islands, holes, broken coronaries,
detached or leaking appendage/veins, swapped patches at class boundaries and a missing class.
Every event that happened is written to the case's ``noise_log``. Lengths in voxels are the
image's, or those of a segmenter working at ``NoiseParams.segmenter_mm`` (converted here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

from nearfix_lib.core.classes import CARDIAC, ClassTable
from nearfix_lib.core.config import NoiseParams
from nearfix_lib.phantom.anatomy import _bbox, check_table

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
    vox: float = 1.0  # image voxels per voxel length of ``p`` (NoiseParams.voxel_scale)

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
    factor = max(int(round(int(rng.integers(2, s.p.stair_factor_max + 1)) * s.vox)), 1)
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
    step = max(s.p.jitter_smooth_vox * s.vox, 1.0)
    coarse_shape = tuple(int(v) for v in np.ceil(shape / step).astype(int) + 2)
    index = []
    for axis in range(3):
        coarse = ndimage.gaussian_filter(rng.normal(0.0, 1.0, coarse_shape), 0.7)
        disp = ndimage.zoom(coarse, shape / np.asarray(coarse_shape), order=1)[
            tuple(slice(0, int(n)) for n in shape)]
        disp *= s.p.jitter_vox * s.vox / max(float(disp.std()), 1e-6)
        coord = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
        index.append(np.clip(np.rint(coord + disp), 0, shape[axis] - 1).astype(np.intp))
    s.labels = s.labels[tuple(index)]
    s.log.append(f"boundary jitter (sd {s.p.jitter_vox * s.vox:g} vox)")


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
    gap, leak_vox = (int(round(v * s.vox)) for v in (s.p.detach_gap_vox, s.p.leak_vox))
    for key in _ATTACHED_KEYS:
        mask = s.labels == s.idx(key)
        if not mask.any():
            continue
        comps, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        for comp in range(1, n + 1):
            part = comps == comp
            detach = gap > 0 and rng.random() < s.p.detach_prob
            leak = not detach and leak_vox > 0 and rng.random() < s.p.leak_prob
            if detach:
                box = _bbox(part, gap + 1)
                local = s.labels[box]
                near_la = ndimage.binary_dilation(local == la, ball26, iterations=gap)
                cut = part[box] & near_la
                if cut.any():
                    local[cut] = 0
                    s.log.append(f"{key} detached ({int(cut.sum())} vox cut)")
            elif leak and s.p.leak_radius_mm > 0.0:
                surface = part & ~ndimage.binary_erosion(part, ball26)
                region, ball = _ball(s.labels.shape, _random_voxel(surface, rng),
                                     s.p.leak_radius_mm, s.spacing)
                local = s.labels[region]
                grown = ndimage.binary_dilation(part[region], ball26, iterations=leak_vox)
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
        radius = float(rng.uniform(*s.p.hole_radius_vox)) * s.vox
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
        radius = float(rng.uniform(*s.p.island_radius_vox)) * s.vox
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
    state = _NoiseState(truth.copy(), table, np.asarray(spacing, dtype=np.float64), params, [],
                        params.voxel_scale(spacing))
    for step, child in zip(_NOISE_STEPS, seed.spawn(len(_NOISE_STEPS))):
        step(state, np.random.default_rng(child))
    return state.labels, state.log
