"""Losses of every stage, chosen by name in the params file (``LossParams``).

All binary losses take logits of any shape — (B, N) for one field, (B, N, H) for H heads —
and float targets in [0, 1] of the same shape. Targets may be soft (a teacher's probability,
a partial-volume occupancy): nothing here assumes they are exactly 0 or 1.

The models output independent sigmoid heads, one per class, even in the unified stage: each
class keeps its own occupancy and overlaps are settled by the fusion priorities, so the
data terms are binary, and every kind :func:`build_loss` offers takes ``(logits, target)`` of one
shape. (A softmax cross-entropy + Dice over mutually exclusive classes and a deep-supervision
mean over several output scales were here once; no model of nearfix has softmax outputs or
several scales, so neither could be selected and both were removed.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from nearfix_lib.core.config import LOSS_KINDS, LossParams, _check_kind

__all__ = ["LossParams", "LOSS_KINDS", "bce", "soft_dice_loss", "focal_loss", "dice_focal", "bce_dice",
           "latent_l2", "distillation", "build_loss",
           "per_head_weighted_bce", "inverse_frequency_weights"]


def bce(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean binary cross-entropy on logits (log-sum-exp form: finite for any logit).

    ``weight`` multiplies each element (broadcast) and the sum is still divided by the number
    of elements, so a weight of 1 everywhere is plain BCE.
    """
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight)


def soft_dice_loss(logits: Tensor, target: Tensor, dims: int | Sequence[int] = 1,
                   eps: float = 1.0) -> Tensor:
    """1 - mean soft Dice, Dice taken over ``dims`` (the point axis) per sample and head.

    Dice counts overlap relative to the object's size, so a small class (coronaries, a few
    per mille of the ROI) weighs as much as a large one — BCE alone lets it vanish. ``eps``
    keeps an empty target with an empty prediction at Dice 1 instead of 0/0.
    """
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=dims)
    total = prob.sum(dim=dims) + target.sum(dim=dims)
    return 1.0 - ((2.0 * inter + eps) / (total + eps)).mean()


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 4.0, alpha: float = -1.0) -> Tensor:
    """Mean focal loss: BCE scaled by (1 - p_t)^gamma, p_t the probability given to the target.

    Down-weights the many points that are already right (far from the surface) so training
    concentrates on the boundary. ``gamma = 0`` and ``alpha < 0`` is plain BCE; ``alpha`` in
    [0, 1] weighs foreground by alpha and background by 1 - alpha.
    """
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1.0 - prob) * (1.0 - target)
    # The floor keeps the gradient of x**gamma finite at x = 0 when gamma < 1.
    miss = (1.0 - p_t).clamp(min=torch.finfo(prob.dtype).tiny)
    loss = ce * miss ** gamma
    if alpha >= 0:
        loss = loss * (alpha * target + (1.0 - alpha) * (1.0 - target))
    return loss.mean()


def dice_focal(logits: Tensor, target: Tensor, dice_weight: float = 0.7, focal_weight: float = 0.3,
               gamma: float = 4.0, alpha: float = -1.0) -> Tensor:
    """dice_weight * soft Dice + focal_weight * focal: region overlap plus boundary focus."""
    return (dice_weight * soft_dice_loss(logits, target)
            + focal_weight * focal_loss(logits, target, gamma, alpha))


def bce_dice(logits: Tensor, target: Tensor, bce_weight: float = 1.0, dice_weight: float = 0.7) -> Tensor:
    """bce_weight * BCE + dice_weight * soft Dice."""
    return bce_weight * bce(logits, target) + dice_weight * soft_dice_loss(logits, target)


def latent_l2(z: Tensor) -> Tensor:
    """Mean over the batch of ||z||^2 (codes (B, D)): the Gaussian prior of the auto-decoder."""
    return z.pow(2).sum(dim=-1).mean()


def distillation(student_logits: Tensor, teacher_prob: Tensor, weight: Tensor | None = None) -> Tensor:
    """BCE of the student against the teacher's soft probability (no gradient to the teacher).

    Soft targets carry what hard labels lose: where the teacher is unsure (the surface, thin
    or ambiguous boundaries) the student learns that uncertainty instead of an arbitrary 0/1,
    and its surface lands where the teacher's 0.5 level is. The minimum is the teacher's
    entropy, not 0, reached when the student's probability equals the teacher's.
    """
    return bce(student_logits, teacher_prob.detach(), weight)


def build_loss(params: LossParams) -> Callable[[Tensor, Tensor], Tensor]:
    """The data term ``loss(logits, target)`` that ``params.kind`` names, with its weights."""
    _check_kind(params.kind)
    if params.kind == "bce":
        return bce
    if params.kind == "dice":
        return soft_dice_loss
    if params.kind == "focal":
        return partial(focal_loss, gamma=params.focal_gamma, alpha=params.focal_alpha)
    if params.kind == "dice_focal":
        return partial(dice_focal, dice_weight=params.dice_weight, focal_weight=params.focal_weight,
                       gamma=params.focal_gamma, alpha=params.focal_alpha)
    return partial(bce_dice, bce_weight=params.bce_weight, dice_weight=params.dice_weight)


def per_head_weighted_bce(logits: Tensor, targets: Tensor, alpha: Tensor) -> Tensor:
    """sum_c alpha_c * BCE_c for logits/targets (B, N, H); BCE_c is the mean over B and N of head c.

    With alpha from :func:`inverse_frequency_weights`, the unified model's rare classes are not
    drowned by the large chambers that fill most of the points.
    """
    if logits.dim() != 3 or alpha.shape != logits.shape[-1:]:
        raise ValueError(f"per_head_weighted_bce needs logits (B, N, H) and alpha (H,), got "
                         f"{tuple(logits.shape)} and {tuple(alpha.shape)}")
    per_head = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=(0, 1))
    return (alpha.to(per_head) * per_head).sum()


def inverse_frequency_weights(fractions: Sequence[float] | Tensor) -> Tensor:
    """alpha_c proportional to 1 / f_c, normalised to sum 1 (f_c: fraction of points in class c)."""
    freq = torch.as_tensor(fractions, dtype=torch.float32)
    if freq.dim() != 1 or freq.numel() == 0:
        raise ValueError(f"fractions must be a non-empty 1-D sequence, got shape {tuple(freq.shape)}")
    if not torch.all(freq > 0):
        raise ValueError(f"class fractions must be > 0 (a class absent from the data has no "
                         f"inverse frequency), got {freq.tolist()}")
    inv = 1.0 / freq
    return inv / inv.sum()
