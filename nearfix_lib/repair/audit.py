"""The repair's audit: how far a repaired mask departs from the input it was fitted to, and what
happens where it departs too far.

A user's data has no ground truth, so a repair that damages a class (drops a coronary branch the
field could not hold, cuts off an appendage) looks like success unless something says otherwise.
Everything here is computed from the input and the repair alone, per case and class:

* ``fit_dice`` — Dice of the repair against its input. Not a quality score (a perfect repair of
  noisy labels sits well below 1: the noise is what it removes), but a field that cannot even
  reproduce its input shows here.
* ``dropped`` / ``added`` — input voxels the repair left out, repair voxels outside the input,
  both as shares of the input's voxels.
* ``comp_input`` / ``comp_repair`` — 26-connected components before and after.
* ``skeleton_kept`` (classes with ``audit.skeleton``, the thin ones) — the share of the input's
  centre line (its 3-D skeleton, ``skimage.morphology.skeletonize``) that lies within one voxel
  of the repair. Boundary noise, stair-casing and islands barely move a vessel's centre line, so
  a good repair keeps nearly all of it; a dropped branch takes its whole centre line along, which
  the Dice of a thin class, dominated by its boundary voxels, hides.

The policy (:class:`~nearfix_lib.core.config.AuditParams`, per class through ``stage1.overrides``):
a case whose ``fit_dice`` or ``skeleton_kept`` falls below the class's minimum, or whose ``dropped``
or ``added`` exceeds its maximum, is ``flagged``. With ``action: keep_input`` its M^ref is the input mask,
unchanged; with ``action: clean_input`` the input mask through the class's clean-up rules (islands
removed, gaps bridged); with ``action: repair_input`` through every rule of M^ref that needs no field
(the clean-up and, where they are on, the CT's edge and path and the anatomy: stage 1's ``mref_of``);
all three are ``kept_input``, so that the field is never the thing that lost a structure. Stage 1
writes the audit as columns of its score rows; the report and the napari view show the flagged cases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from nearfix_lib.core.config import AuditParams
from nearfix_lib.core.metrics import mask_components

AUDIT_PREFIX = "audit_"


@dataclass(frozen=True)
class Audit:
    """One case and class: the measures of the module docstring and the policy's verdict."""

    input_voxels: int
    repair_voxels: int
    fit_dice: float
    dropped: float
    added: float
    comp_input: int
    comp_repair: int
    skeleton_kept: float  # NaN where the class has no skeleton audit or the input no centre line
    flagged: bool
    kept_input: bool  # flagged, and the action puts the input (as it is, cleaned or repaired) in the field's place
    reasons: str  # why it was flagged, "" when it was not
    # the cut above which M^ref kept an input voxel, where ``stage1.anchor`` made it (NaN elsewhere):
    # above ``keep_above`` where its ``max_volume_ratio`` dropped the input's least sure voxels
    keep_cut: float = float("nan")

    def columns(self) -> dict:
        """The audit as score-row columns (``audit_*``)."""
        return {AUDIT_PREFIX + k: v for k, v in asdict(self).items()}


def skeleton_kept(inp: np.ndarray, repair: np.ndarray) -> float:
    """Share of the input's skeleton voxels within one voxel (26-neighbourhood) of the repair
    (NaN when the input has no skeleton: empty, or too small to have a centre line)."""
    skeleton = skeletonize(inp)
    n = int(skeleton.sum())
    if not n:
        return float("nan")
    near = ndimage.binary_dilation(repair, np.ones((3, 3, 3), dtype=bool))
    return float((skeleton & near).sum() / n)


def audit_repair(inp: np.ndarray, repair: np.ndarray, params: AuditParams) -> Audit:
    """The audit of ``repair`` against its input ``inp`` (same-shaped boolean masks: a class box is
    enough, as long as it holds both) and the policy's verdict. An empty input is never flagged:
    there is nothing the repair could have lost."""
    inp, repair = np.asarray(inp, dtype=bool), np.asarray(repair, dtype=bool)
    if inp.shape != repair.shape:
        raise ValueError(f"audit: input {inp.shape} and repair {repair.shape} differ in shape")
    n_in, n_rep = int(inp.sum()), int(repair.sum())
    both = int((inp & repair).sum())
    fit = 2.0 * both / (n_in + n_rep) if n_in + n_rep else 1.0
    kept = skeleton_kept(inp, repair) if params.skeleton and n_in else float("nan")
    reasons = []
    if n_in and fit < params.min_fit_dice:
        reasons.append(f"fit Dice {fit:.3f} < {params.min_fit_dice:g}")
    if n_in and not np.isnan(kept) and kept < params.min_skeleton_kept:
        reasons.append(f"centre line kept {kept:.3f} < {params.min_skeleton_kept:g}")
    dropped = (n_in - both) / n_in if n_in else 0.0
    if dropped > params.max_dropped:
        reasons.append(f"input dropped {dropped:.3f} > {params.max_dropped:g}")
    added = (n_rep - both) / n_in if n_in else 0.0
    if added > params.max_added:
        reasons.append(f"added {added:.3f} > {params.max_added:g} of the input")
    flagged = bool(reasons)
    return Audit(n_in, n_rep, fit, dropped, added,
                 mask_components(inp), mask_components(repair), kept, flagged,
                 flagged and params.action != "flag", "; ".join(reasons))
