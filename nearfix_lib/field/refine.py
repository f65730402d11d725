"""Interactive repair: a click re-fits one case's latent, the field frozen.

The interactive segmenters of the field (SAM-Med3D, nnInteractive, MONAI Label) encode an image once
and answer each prompt in well under a second. nearfix answers a prompt in its own terms: a click is
a constraint on the case's field and only the case's latent z_i moves (the latent-only fit a new case
gets in :meth:`UnifiedModel.fit_case`), so the corrected case is still F_Θ + z_i — decodable on any
grid, smooth by construction, and kept as a shape code instead of painted voxels.

One refinement (:func:`refine`):

* every click of the session is a hard constraint over a ball of ``click_radius_mm`` (weight
  ``click_weight``): a positive click of class c wants head c on and every other head off, a
  positive click on background (label 0) every head off, a negative click of class c head c off
  and the other heads free;
* the labels shown before the click are a soft prior at sampled voxels, half of them inside the window
  decoded again and half anywhere in the box, each half on the band along the class boundaries
  (where a moved latent shows first) and uniform, none within ``prior_clearance_mm`` of a click, so
  the rest of the case stays as it was;
* z starts where it is and is fitted by L-BFGS (strong-Wolfe line search) in at most ``steps``
  evaluations of the loss, held near its start by ``anchor_weight``. Measured on the click benchmark
  (``docs/experiments/clicks``): Adam moved every coordinate by its step whatever the gradient's shape
  (its first step moved a held-out case's latent by a quarter of its norm and took half its LAA with
  it), and its clicks lowered the Dice of the class clicked on; L-BFGS follows the curvature the
  prior adds and gains;
* only a window of ``window_mm`` around the newest click is decoded again (coarse to fine, seeded by
  the shown boundaries and the click's ball), and of it only what concerns the clicked class
  (``paste: class``: voxels that become or stop being that class) is pasted. The latent moved
  everywhere, so the shown map can drift from a full decode of the new latent;
  :meth:`EditSession.decode_all` is that full decode, the one saved.

Gradients reach z only (``torch.autograd.grad``): the frozen weights get none, and the model is
shared with whoever else holds it. :class:`EditSession` keeps the clicks and an undo stack of
latents (with each window's previous labels, so undo restores the map exactly).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nearfix_lib.core.config import DecodeParams, RefineParams
from nearfix_lib.core.geometry import Box, apply_affine, original_to_normalised, voxel_spacing
from nearfix_lib.core.io import atomic_path
from nearfix_lib.field.decide import Decision, labels_on_grid
from nearfix_lib.field.infer import original_box_grid
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.sampling import interface_band

EDITS_FORMAT = "nearfix-edits"


@dataclass(frozen=True)
class Click:
    """A user's point: where (world mm: the case image's affine applied to voxel indices), which
    class (its index; 0 = background) and whether the point belongs to it (positive) or not."""

    position: tuple[float, float, float]
    label: int
    positive: bool = True

    def to_dict(self) -> dict:
        return {"position": [float(v) for v in self.position], "label": int(self.label),
                "positive": bool(self.positive)}

    @classmethod
    def from_dict(cls, d: dict) -> Click:
        return cls(tuple(float(v) for v in d["position"]), int(d["label"]), bool(d.get("positive", True)))  # type: ignore[arg-type]


def click_targets(head_classes: Sequence[int], click: Click) -> np.ndarray:
    """(heads,) what a click asks of each head: 1 on, 0 off, NaN free."""
    heads = np.asarray(head_classes)
    if click.label != 0 and click.label not in heads:
        raise ValueError(f"a click on class {click.label}, which this field has no head for "
                         f"(classes {sorted(int(h) for h in heads)}; 0 = background)")
    if click.positive:
        return (heads == click.label).astype(np.float32)
    if click.label == 0:
        raise ValueError("a negative click on background asks for no class in particular: "
                         "click positive with the class the point belongs to")
    out = np.full(len(heads), np.nan, dtype=np.float32)
    out[heads == click.label] = 0.0
    return out


@dataclass
class CaseField:
    """One case's field as an edit sees it: a frozen model read with a free latent inside ``box``
    (the ROI its normalised space refers to) of an image of ``shape`` placed by ``affine``; the
    ``decision`` turns its heads into class indices, ``head_classes`` says which class each head is;
    ``image`` is the appearance branch's input for the case (``appearance_input``), when the model has one."""

    model: ImplicitField
    latent: torch.Tensor  # (1, D): where the case's code starts
    box: Box
    affine: np.ndarray
    shape: tuple[int, int, int]
    decision: Decision
    head_classes: tuple[int, ...]
    decoding: DecodeParams = field(default_factory=DecodeParams)
    device: str = "cpu"
    chunk_points: int = 262_144
    image: torch.Tensor | None = None  # (1, C, R, R, R) on ``device``

    def normalised(self, world: np.ndarray) -> np.ndarray:
        """World mm (n, 3) -> the field's normalised coordinates."""
        voxel = apply_affine(np.linalg.inv(np.asarray(self.affine, dtype=np.float64)), np.asarray(world, float))
        return apply_affine(original_to_normalised(self.box), voxel)

    def voxel_of(self, world: Sequence[float]) -> np.ndarray:
        """The (fractional) voxel index of a world point."""
        return apply_affine(np.linalg.inv(np.asarray(self.affine, dtype=np.float64)),
                            np.asarray(world, float)[None])[0]

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, window: Box | None = None, seed: np.ndarray | None = None) -> np.ndarray:
        """Class indices on the original voxels of ``window`` (default: the whole box) for ``latent``."""
        return labels_on_grid(self.model, 0, original_box_grid(window or self.box), self.box, self.decision,
                              self.decoding, self.device, self.chunk_points, image=self.image,
                              latent=latent.to(self.device), seed=seed)


@dataclass
class Refined:
    """What one refinement changed: the new latent, the window decoded again and its labels."""

    latent: torch.Tensor
    window: Box
    labels: np.ndarray
    steps: int
    seconds: float


def _ball_offsets(rng: np.random.Generator, n: int, radius_mm: float) -> np.ndarray:
    """(n, 3) offsets in mm uniform in a ball, the first at its centre."""
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-12
    offsets = direction * radius_mm * rng.random(n)[:, None] ** (1.0 / 3.0)
    offsets[0] = 0.0
    return offsets


def prior_candidates(field: CaseField, labels: np.ndarray) -> np.ndarray:
    """Flat indices (into the box) of the voxels on the band along the class boundaries of ``labels``
    inside the field's box: half of every refinement's prior is drawn from these."""
    return np.flatnonzero(interface_band(np.asarray(labels)[field.box.slices], 1))


def _window(field: CaseField, click: Click, window_mm: float) -> Box:
    spacing = voxel_spacing(field.affine)
    centre = field.voxel_of(click.position)
    half = window_mm / spacing
    lo = np.maximum(np.floor(centre - half).astype(int), field.box.lo)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, field.box.hi)
    return Box(tuple(int(v) for v in lo), tuple(int(v) for v in hi))  # type: ignore[arg-type]


def _ball_mask(field: CaseField, window: Box, click: Click, radius_mm: float) -> np.ndarray:
    """The voxels of ``window`` within ``radius_mm`` of the click."""
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(window.lo, window.hi)], indexing="ij"), -1)
    world = apply_affine(np.asarray(field.affine, float), idx.reshape(-1, 3).astype(float))
    reach = radius_mm + 0.5 * voxel_spacing(field.affine).max()  # a voxel whose cell the ball touches
    return (np.linalg.norm(world - np.asarray(click.position), axis=1) <= reach).reshape(window.shape)


def refine(field: CaseField, labels: np.ndarray, clicks: Sequence[Click], params: RefineParams,
           seed: int = 0, band: np.ndarray | None = None) -> Refined:
    """Fit the case's latent to ``clicks`` with ``labels`` (the map shown now, the image's shape) as the
    prior, starting from ``field.latent``; decode the window around the last click. ``band``: the
    :func:`prior_candidates` of the labels, when the caller keeps them between clicks."""
    if not clicks:
        raise ValueError("refine needs at least one click")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    window = _window(field, clicks[-1], params.window_mm)
    prior = _prior_voxels(field, labels, clicks, params.prior_points, params.prior_window_share, params, rng,
                          band, window)
    latent, steps = fit_latent(field, labels, clicks, prior, params, params.steps, rng)
    shown = labels[window.slices]
    seed_mask = interface_band(shown, 1) | _ball_mask(field, window, clicks[-1], params.click_radius_mm)
    new = field.decode(latent, window, seed=seed_mask)
    if params.paste == "class":
        label = clicks[-1].label
        keep = (new == label) == (shown == label)  # neither became nor stopped being the clicked class
        new = np.where(keep, shown, new)
    return Refined(latent.cpu(), window, new, steps, time.perf_counter() - t0)


def fit_latent(field: CaseField, labels: np.ndarray, clicks: Sequence[Click], prior: np.ndarray,
               params: RefineParams, steps: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """The latent, from ``field.latent``, that honours ``clicks`` (balls of ``click_points``) and keeps
    ``labels`` at the ``prior`` voxels (flat indices into the box), by L-BFGS in at most ``steps``
    evaluations; returns it and the evaluations made."""
    labels = np.asarray(labels)
    if labels.shape != tuple(field.shape):
        raise ValueError(f"labels of shape {labels.shape} for a case of shape {tuple(field.shape)}")
    click_world, click_target = [], []
    for click in clicks:
        inside = field.voxel_of(click.position)
        if np.any(inside < np.asarray(field.box.lo) - 0.5) or np.any(inside > np.asarray(field.box.hi) - 0.5):
            raise ValueError(f"click at {tuple(round(v, 1) for v in click.position)} mm lies outside the field's box "
                             f"(voxels {field.box.lo}..{field.box.hi})")
        click_world.append(np.asarray(click.position, float) + _ball_offsets(rng, params.click_points,
                                                                              params.click_radius_mm))
        click_target.append(np.repeat(click_targets(field.head_classes, click)[None], params.click_points, 0))
    points = [field.normalised(np.concatenate(click_world))] if clicks else []
    targets = [np.concatenate(click_target)] if clicks else []
    n_click = len(targets[0]) if clicks else 0
    if len(prior):
        box_labels = labels[field.box.slices].reshape(-1)[prior]
        voxels = np.stack(np.unravel_index(prior, field.box.shape), 1) + np.asarray(field.box.lo)
        points.append(apply_affine(original_to_normalised(field.box), voxels.astype(float)))
        targets.append((box_labels[:, None] == np.asarray(field.head_classes)[None]).astype(np.float32))
    device = field.device
    pts = torch.from_numpy(np.concatenate(points).astype(np.float32)).to(device)[None]
    target = torch.from_numpy(np.concatenate(targets)).to(device)
    free = torch.isnan(target)
    target = torch.nan_to_num(target, nan=0.0)
    weight = torch.ones_like(target)
    # per point: a click point weighs click_weight prior voxels, so that the fit changes as few of the
    # voxels shown as the clicks allow (a mean per group let a click flip 5 % of the case for its ball)
    weight[:n_click] *= params.click_weight
    weight /= max(len(target) - n_click, 1)
    weight[free] = 0.0

    z0 = field.latent.detach().to(device).float()
    z = z0.clone().requires_grad_(True)
    evaluations = 0

    def loss_and_gradient() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        logits = field.model.decode(field.model.encode_latent(z, field.image), pts)[0]
        loss = (F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none") * weight).sum()
        loss = loss + params.anchor_weight * ((z - z0) ** 2).sum()
        (z.grad,) = torch.autograd.grad(loss, z)
        return loss.detach()

    lbfgs = torch.optim.LBFGS([z], lr=1.0, max_iter=steps, max_eval=steps, line_search_fn="strong_wolfe")
    lbfgs.step(loss_and_gradient)
    return z.detach(), evaluations


def _prior_voxels(field: CaseField, labels: np.ndarray, clicks: Sequence[Click], n_points: int, window_share: float,
                  params: RefineParams, rng: np.random.Generator, band: np.ndarray | None, window: Box) -> np.ndarray:
    """Flat box indices of ``n_points`` prior voxels, none near a click: ``window_share`` of them inside
    the window (where the map shown changes), the rest anywhere in the box (where the saved decode
    may change); each part half from the band along the class boundaries and half uniform."""
    if n_points == 0:
        return np.zeros(0, dtype=np.int64)
    band = prior_candidates(field, labels) if band is None else band
    lo = np.asarray(window.lo) - np.asarray(field.box.lo)
    hi = np.asarray(window.hi) - np.asarray(field.box.lo)
    band_at = np.stack(np.unravel_index(band, field.box.shape), 1)
    window_band = band[np.all((band_at >= lo) & (band_at < hi), axis=1)]
    local = int(round(n_points * window_share))
    picked = []
    for n, candidates, uniform in ((local, window_band, lambda k: rng.integers(lo, hi, (k, 3))),
                                   (n_points - local, band,
                                    lambda k: rng.integers(0, field.box.shape, (k, 3)))):
        from_band = n // 2 if len(candidates) else 0
        picked.append(np.ravel_multi_index(tuple(uniform(n - from_band).T), field.box.shape))
        if from_band:
            picked.append(candidates[rng.integers(0, len(candidates), from_band)])
    flat = np.unique(np.concatenate(picked))
    voxels = np.stack(np.unravel_index(flat, field.box.shape), 1) + np.asarray(field.box.lo)
    world = apply_affine(np.asarray(field.affine, float), voxels.astype(float))
    far = np.ones(len(flat), dtype=bool)
    for click in clicks:
        far &= np.linalg.norm(world - np.asarray(click.position), axis=1) > params.prior_clearance_mm
    return flat[far]


@dataclass
class _Step:
    latent: torch.Tensor
    window: Box
    previous: np.ndarray  # the window's labels before the step


class EditSession:
    """One case being edited: its clicks, its latent, the map shown, and an undo stack.

    ``labels`` is the map shown at the start (the image's shape; e.g. the case's decoded labels),
    edited in place window by window as clicks arrive; undo restores it exactly.
    """

    def __init__(self, field: CaseField, labels: np.ndarray, params: RefineParams, seed: int = 0):
        labels = np.asarray(labels)
        if labels.shape != tuple(field.shape):
            raise ValueError(f"labels of shape {labels.shape} for a case of shape {tuple(field.shape)}")
        self.field, self.params, self.seed = field, params, seed
        self.start_latent = field.latent.detach().cpu().float().clone()
        self.latent = self.start_latent.clone()
        self.labels = labels.astype(np.uint8, copy=True)
        self.start_labels = self.labels.copy()
        self.clicks: list[Click] = []
        self._undo: list[_Step] = []
        self._band = prior_candidates(field, self.labels)
        # torch's first optimizer imports its compiler (~3 s on 2 cores): here, not in the first click
        torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])

    def click(self, click: Click) -> Refined:
        """Refine with every click so far and this one; paste the window into :attr:`labels`."""
        clicks = [*self.clicks, click]
        current = dataclasses.replace(self.field, latent=self.latent)
        done = refine(current, self.labels, clicks, self.params, seed=self.seed + len(clicks), band=self._band)
        self._undo.append(_Step(self.latent, done.window, self.labels[done.window.slices].copy()))
        self.labels[done.window.slices] = done.labels
        self.latent = done.latent
        self.clicks = clicks
        return done

    def undo(self) -> bool:
        """Back one click (latent and labels exactly as before it); False when there is none."""
        if not self._undo:
            return False
        step = self._undo.pop()
        self.labels[step.window.slices] = step.previous
        self.latent = step.latent
        self.clicks.pop()
        return True

    def reset(self) -> None:
        """Back to where the session started."""
        self.labels = self.start_labels.copy()
        self.latent = self.start_latent.clone()
        self.clicks.clear()
        self._undo.clear()

    def consolidate(self) -> int:
        """Before a save: fit the latent once more, to the clicks and to the whole map shown (whose
        changes are only the clicked classes' in the windows), with ``save_prior_points`` voxels of the
        box and ``save_steps`` evaluations; then, ``save_rounds - 1`` times, decode the box, add the
        voxels that decode differently from the map shown to the prior and fit again. A click's fit
        sees a few thousand voxels, mostly near it, and can move the case elsewhere; this brings the
        saved decode back toward what was shown. Returns the evaluations made (no clicks: 0)."""
        if not self.clicks:
            return 0
        rng = np.random.default_rng(self.seed)
        shown = self.labels[self.field.box.slices]
        prior = _prior_voxels(self.field, self.labels, self.clicks, self.params.save_prior_points, 0.0, self.params,
                              rng, prior_candidates(self.field, self.labels), self.field.box)
        seed = interface_band(shown, 1) if self.params.save_rounds > 1 else None
        evaluations = 0
        for round_ in range(self.params.save_rounds):
            if round_:
                decoded = self.field.decode(self.latent, seed=seed)
                differ = np.flatnonzero(decoded != shown)
                if not len(differ):
                    break
                take = rng.choice(differ, min(len(differ), self.params.save_prior_points), replace=False)
                prior = np.union1d(prior, take)
            start = dataclasses.replace(self.field, latent=self.latent)
            latent, made = fit_latent(start, self.labels, self.clicks, prior, self.params, self.params.save_steps, rng)
            self.latent, evaluations = latent.cpu(), evaluations + made
        return evaluations

    def decode_all(self, max_rounds: int = 3) -> np.ndarray:
        """The whole box decoded with the current latent (what a saved edit holds; the map shown
        outside the box). Coarse to fine, seeded by the boundaries shown, then by its own result until
        that no longer changes: the map returned is a fixed point of its own seeded decode, so
        ``UnifiedModel.decode(case, seed_labels=<this map>)`` gives it back voxel for voxel."""
        out = self.labels.copy()
        box = self.field.box
        seed_from = self.labels[box.slices]
        for _ in range(max_rounds):
            decoded = self.field.decode(self.latent, seed=interface_band(seed_from, 1))
            settled = np.array_equal(decoded, seed_from)
            seed_from = decoded
            if settled:
                break
        out[box.slices] = seed_from
        return out

    @property
    def edited(self) -> bool:
        return bool(self.clicks)


# -- edited latents beside a model -------------------------------------------------------------

def read_edited_latents(path: str | Path) -> dict[str, dict]:
    """``{case_id: {"latent": (1, D) tensor, ...}}`` from an edits file ({} when there is none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    d = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or d.get("format") != EDITS_FORMAT:
        raise ValueError(f"{path}: not a nearfix edits file")
    return dict(d["edits"])


def write_edited_latent(path: str | Path, case_id: str, latent: torch.Tensor | None, **info: float) -> Path:
    """Put (or, with ``latent=None``, remove) a case's edited latent in the edits file ``path``,
    atomically; the other cases' edits stay."""
    edits = read_edited_latents(path)
    if latent is None:
        edits.pop(str(case_id), None)
    else:
        edits[str(case_id)] = {"latent": latent.detach().cpu().float().reshape(1, -1).clone(),
                               **{k: float(v) for k, v in info.items()}}
    with atomic_path(path) as tmp:
        torch.save({"format": EDITS_FORMAT, "edits": edits}, tmp)
    return Path(path)
