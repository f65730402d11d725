"""Every loss against an obvious reference, at extreme logits, and the dispatch from params."""

import pytest
import torch
import torch.nn.functional as F

from nearfix_lib.core.config import LOSS_KINDS, LossParams
from nearfix_lib.field.losses import (
    bce,
    bce_dice,
    build_loss,
    dice_focal,
    distillation,
    focal_loss,
    inverse_frequency_weights,
    latent_l2,
    per_head_weighted_bce,
    soft_dice_loss,
)


def sample(shape=(3, 200, 4), seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=gen) * scale
    target = (torch.rand(*shape, generator=gen) < 0.3).float()
    return logits, target


def test_bce_matches_torch_on_probabilities_and_weights():
    logits, target = sample()
    ref = F.binary_cross_entropy(torch.sigmoid(logits), target)
    assert torch.allclose(bce(logits, target), ref, atol=1e-5)
    weight = torch.rand_like(target)
    manual = (F.binary_cross_entropy(torch.sigmoid(logits), target, reduction="none") * weight).mean()
    assert torch.allclose(bce(logits, target, weight), manual, atol=1e-5)


def test_soft_dice_reference_and_perfect_prediction():
    logits, target = sample()
    prob = torch.sigmoid(logits)
    dices = []
    for b in range(3):
        for h in range(4):
            p, t = prob[b, :, h], target[b, :, h]
            dices.append((2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    assert torch.allclose(soft_dice_loss(logits, target), 1 - torch.stack(dices).mean(), atol=1e-6)
    perfect = (target * 2 - 1) * 50
    assert soft_dice_loss(perfect, target).item() < 1e-5
    assert soft_dice_loss(-perfect, target).item() > 0.95
    # an empty class predicted empty is right, not 0/0
    assert soft_dice_loss(torch.full((2, 30), -50.0), torch.zeros(2, 30)).item() < 1e-5


def test_focal_reduces_to_bce_and_matches_its_definition():
    logits, target = sample()
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), bce(logits, target), atol=1e-6)
    p = torch.sigmoid(logits)
    p_t = torch.where(target > 0.5, p, 1 - p)
    ce = -torch.log(p_t)
    a_t = torch.where(target > 0.5, torch.tensor(0.25), torch.tensor(0.75))
    ref = (a_t * (1 - p_t) ** 2 * ce).mean()
    assert torch.allclose(focal_loss(logits, target, gamma=2.0, alpha=0.25), ref, atol=1e-5)
    # confident right answers are discounted more than by BCE
    assert focal_loss(logits, target, gamma=4.0) < bce(logits, target)


def test_combinations_are_the_weighted_sums():
    logits, target = sample(seed=3)
    dice, foc, ce = soft_dice_loss(logits, target), focal_loss(logits, target, 4.0), bce(logits, target)
    assert torch.allclose(dice_focal(logits, target, 0.7, 0.3, 4.0), 0.7 * dice + 0.3 * foc)
    assert torch.allclose(bce_dice(logits, target, 1.0, 0.7), ce + 0.7 * dice)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_extreme_logits_give_finite_values_and_gradients(kind):
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5]])
    loss = build_loss(LossParams(kind=kind))(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 4.0])
def test_focal_gradient_finite_for_any_gamma_at_saturation(gamma):
    logits = torch.tensor([100.0, -100.0, 30.0], requires_grad=True)
    focal_loss(logits, torch.tensor([1.0, 0.0, 1.0]), gamma=gamma).backward()
    assert torch.isfinite(logits.grad).all()


def test_soft_targets_and_distillation():
    teacher = torch.tensor([[0.1, 0.5, 0.93, 0.0, 1.0]])
    student = torch.logit(teacher.clamp(1e-4, 1 - 1e-4)).requires_grad_(True)
    teacher_req = teacher.clone().requires_grad_(True)
    loss = distillation(student, teacher_req)
    loss.backward()
    assert student.grad.abs().max() < 1e-4  # minimum where the student equals the teacher
    assert teacher_req.grad is None  # no gradient to the teacher
    entropy = -(teacher * teacher.clamp_min(1e-12).log()
                + (1 - teacher) * (1 - teacher).clamp_min(1e-12).log()).mean()
    assert torch.allclose(loss, entropy, atol=1e-3)
    assert distillation(student.detach() + 1, teacher) > loss


def test_latent_l2():
    z = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    assert latent_l2(z).item() == pytest.approx((5 + 9) / 2)


def test_build_loss_dispatch_and_unknown_kind():
    logits, target = sample(seed=5)
    p = LossParams(focal_gamma=2.0, focal_alpha=0.4, dice_weight=0.6, focal_weight=0.2, bce_weight=0.5)
    expected = {
        "bce": bce(logits, target),
        "dice": soft_dice_loss(logits, target),
        "focal": focal_loss(logits, target, 2.0, 0.4),
        "dice_focal": 0.6 * soft_dice_loss(logits, target) + 0.2 * focal_loss(logits, target, 2.0, 0.4),
        "bce_dice": 0.5 * bce(logits, target) + 0.6 * soft_dice_loss(logits, target),
    }
    assert set(expected) == set(LOSS_KINDS)
    for kind, value in expected.items():
        p.kind = kind
        assert torch.allclose(build_loss(p)(logits, target), value, atol=1e-6), kind
    p.kind = "hinge"
    with pytest.raises(ValueError, match="hinge"):
        build_loss(p)
    with pytest.raises(ValueError, match="tversky"):
        LossParams(kind="tversky")
    with pytest.raises(ValueError, match="dice_weight"):
        LossParams(dice_weight=-1)
    with pytest.raises(ValueError, match="focal_alpha"):
        LossParams(focal_alpha=1.5)


def test_per_head_weighted_bce_and_inverse_frequency():
    logits, target = sample(shape=(2, 100, 3))
    alpha = torch.tensor([0.2, 0.5, 0.3])
    ref = sum(alpha[c] * bce(logits[..., c], target[..., c]) for c in range(3))
    assert torch.allclose(per_head_weighted_bce(logits, target, alpha), ref, atol=1e-6)
    uniform = per_head_weighted_bce(logits, target, torch.full((3,), 1 / 3))
    assert torch.allclose(uniform, bce(logits, target), atol=1e-6)
    with pytest.raises(ValueError):
        per_head_weighted_bce(logits, target, alpha[:2])

    weights = inverse_frequency_weights([0.30, 0.002, 0.05, 0.15])
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights.argsort(descending=True).tolist() == [1, 2, 3, 0]
    assert weights[1] / weights[0] == pytest.approx(0.30 / 0.002, rel=1e-5)
    with pytest.raises(ValueError, match="> 0"):
        inverse_frequency_weights([0.5, 0.0])
