"""Coarse-to-fine decoding (field.decide) against the dense decode it stands in for."""

import dataclasses

import cc3d
import numpy as np
import pytest
import torch

from nearfix_lib.core.config import DecodeParams
from nearfix_lib.core.geometry import Box, Grid, apply_affine, normalised_to_original, roi_grid
from nearfix_lib.field.decide import (
    Decision,
    decode_spent,
    labels_in_box,
    labels_on_grid,
    threshold_bits_decision,
    threshold_decision,
)
from nearfix_lib.field.infer import field_on_grid
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.sampling import interface_band
from tests.test_train_infer import TINY_MODEL

SHAPE = (61, 47, 38)  # asymmetric, no axis a multiple of the coarse step
BOX = Box((0, 0, 0), SHAPE)
GRID = roi_grid(BOX, SHAPE)  # its voxel centres are the box's: grid index = original voxel


class AnalyticField(torch.nn.Module):
    """Heads whose logits fall off linearly (``slope`` per voxel) with the distance in voxels from
    a ball (head 0) and from a straight tube (head 1): a field with a thin structure whose truth is
    known. Counts the points it is asked about."""

    def __init__(self, ball=((30.0, 20.0, 18.0), 11.0), tube=((5.0, 3.0, 4.0), (0.8, 0.5, 0.33), 1.3),
                 slope=1.0):
        super().__init__()
        self.to_index = normalised_to_original(BOX)
        self.ball, self.tube, self.slope = ball, tube, slope
        self.n_heads, self.points = 2, 0

    def encode(self, case_idx, image=None):
        return None

    def decode(self, encoded, points):
        p = apply_affine(self.to_index, points[0].double().numpy())
        self.points += len(p)
        centre, radius = self.ball
        ball = radius - np.linalg.norm(p - np.asarray(centre), axis=1)
        start, direction, tube_radius = self.tube
        d = np.asarray(direction) / np.linalg.norm(direction)
        rel = p - np.asarray(start)
        tube = tube_radius - np.linalg.norm(rel - np.outer(rel @ d, d), axis=1)
        return torch.from_numpy(self.slope * np.stack([ball, tube], axis=1)).float()[None]


PRIORITY = Decision(lambda prob: np.where(prob[:, 1] >= 0.5, 2, np.where(prob[:, 0] >= 0.5, 1, 0)).astype(np.uint8),
                    (0.5, 0.5))


def decode(model, params, decision=PRIORITY, grid=GRID):
    return labels_on_grid(model, 0, grid, BOX, decision, params)


def components(mask):
    return cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)[1]


@pytest.mark.parametrize("step", [1, 2, 4, 8])
def test_coarse_to_fine_equals_dense_on_a_ball_and_a_thin_tube(step):
    dense = decode(AnalyticField(), DecodeParams(mode="dense"))
    assert np.count_nonzero(dense == 2) > 100 and components(dense == 2) == 1  # the tube is in the grid
    fine = decode(AnalyticField(), DecodeParams(coarse_step=step))
    assert fine.shape == SHAPE and fine.dtype == np.uint8
    np.testing.assert_array_equal(fine, dense)


def test_cost_follows_the_surface_not_the_volume():
    field = AnalyticField(slope=3.0)
    labels, spent = decode_spent(field, 0, GRID, BOX, PRIORITY, DecodeParams(), "cpu", 4096)
    evaluated = sum(spent.values())
    np.testing.assert_array_equal(labels, decode(AnalyticField(slope=3.0), DecodeParams(mode="dense")))
    assert evaluated == field.points
    # the first pass is the whole 8-voxel lattice, then each halving and the voxels
    assert sorted(spent) == [1, 2, 4, 8] and spent[8] == np.prod(-(-np.asarray(SHAPE) // 8) + 1)
    assert field.points < 0.25 * np.prod(SHAPE)


def test_a_tube_finer_than_the_coarse_lattice_and_its_margin_is_lost_and_the_guard_keeps_it():
    """Why ``coarse_step``, ``margin`` and the neighbour guard exist: a steep, thin tube between
    the points of a 16-voxel lattice is invisible to them; the defaults keep it."""
    steep = dict(tube=((5.0, 3.0, 4.0), (0.8, 0.5, 0.33), 1.0), slope=4.0)
    dense = decode(AnalyticField(**steep), DecodeParams(mode="dense"))
    assert components(dense == 2) == 1
    blind = decode(AnalyticField(**steep), DecodeParams(coarse_step=16, margin=0.0, guard_from_step=32))
    assert np.count_nonzero(blind == 2) < np.count_nonzero(dense == 2)
    np.testing.assert_array_equal(decode(AnalyticField(**steep), DecodeParams(coarse_step=4)), dense)


def test_the_input_boundaries_as_a_seed_keep_a_structure_confident_cells_would_hide():
    """A small, steep ball and a thin tube between the points of a blind lattice (16 voxels, no margin,
    no guard) are lost; seeded with the boundaries of the labels the field was fitted to, every cell
    they cross is refined and the decode equals the dense one (how stage 1's small boxes are decoded)."""
    steep = dict(ball=((30.0, 21.0, 17.0), 2.6), tube=((5.0, 3.0, 4.0), (0.8, 0.5, 0.33), 1.0), slope=4.0)
    dense = decode(AnalyticField(**steep), DecodeParams(mode="dense"))
    blind = DecodeParams(coarse_step=16, margin=0.0, guard_from_step=32)
    lost = decode(AnalyticField(**steep), blind)
    assert np.count_nonzero(lost == 1) < np.count_nonzero(dense == 1) and np.count_nonzero(lost != dense) > 20
    field = AnalyticField(**steep)
    seeded = labels_on_grid(field, 0, GRID, BOX, PRIORITY, blind, seed=interface_band(dense, 1))
    np.testing.assert_array_equal(seeded, dense)
    assert field.points < 0.5 * np.prod(SHAPE)  # still far fewer points than the dense decode
    with pytest.raises(ValueError, match="seed of shape"):
        labels_on_grid(AnalyticField(), 0, GRID, BOX, PRIORITY, blind, seed=np.zeros(SHAPE[::-1], bool))


def test_the_seed_marks_both_sides_of_every_label_change():
    lab = np.zeros((5, 4, 6), np.uint8)
    lab[1:3, 1:3, 2:4] = 2
    lab[3, 1:3, 2:4] = 5
    seed = interface_band(lab, 1)
    assert seed[lab > 0].all()  # every voxel of these thin blocks touches another label
    assert seed[0, 1, 2] and seed[1, 0, 2] and seed[1, 1, 1] and seed[4, 1, 2]  # their outer neighbours
    assert not seed[0, 0, 0] and not seed[4, 3, 5] and seed.sum() == 12 + 2 * (4 + 6 + 6)  # the block and its faces
    assert not interface_band(np.ones((3, 3, 3)), 1).any()


def test_a_grid_smaller_than_the_coarse_step_and_a_one_voxel_axis():
    for shape in [(5, 3, 7), (1, 9, 4)]:
        grid = Grid(shape, GRID.to_original.copy())
        dense = decode(AnalyticField(), DecodeParams(mode="dense"), grid=grid)
        np.testing.assert_array_equal(decode(AnalyticField(), DecodeParams(coarse_step=8), grid=grid), dense)


def test_labels_in_box_decide_inside_the_class_box_only():
    inner = Box((10, 5, 6), (50, 40, 30))
    field = AnalyticField()
    field.to_index = normalised_to_original(inner)  # the analytic shapes live in the class box's frame
    decision = threshold_decision(0.5)
    out = labels_in_box(field, 0, GRID, inner, decision, DecodeParams())
    outside = np.ones(SHAPE, dtype=bool)
    outside[inner.slices] = False
    assert not out[outside].any()
    field.points = 0
    dense = labels_in_box(field, 0, GRID, inner, decision, DecodeParams(mode="dense"))
    np.testing.assert_array_equal(out, dense)
    assert field.points == np.prod(inner.shape)  # dense evaluated the box, nothing outside


def random_field(n_cases: int) -> tuple[ImplicitField, Box]:
    """The package's own decoder with seeded random weights and latents (a smooth field of blobs with
    no analytic form) and the class box it lives in."""
    torch.manual_seed(0)
    model = ImplicitField(n_cases, TINY_MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model, Box((0, 0, 0), (14, 11, 9))


def test_an_implicit_field_decodes_the_same_coarse_to_fine():
    """The package's own decoder (random weights and latents: a smooth field of blobs with no
    analytic form), cut at the 70th percentile, on an asymmetric grid finer than its feature grids."""
    model, box = random_field(3)
    grid = roi_grid(box, (43, 34, 27))
    for i in range(3):
        prob = field_on_grid(model, i, grid, box)[..., 0]
        decision = threshold_decision(float(np.quantile(prob, 0.7)))
        dense = labels_on_grid(model, i, grid, box, decision, DecodeParams(mode="dense"))
        np.testing.assert_array_equal(dense, prob >= decision.thresholds[0])
        fine = labels_on_grid(model, i, grid, box, decision, DecodeParams(coarse_step=4))
        assert np.mean(fine == dense) >= 0.9999


def test_auto_decodes_dense_on_a_gpu_and_coarse_to_fine_elsewhere():
    """``decode.mode: auto`` (the default): on an H200 dense won (docs/method.md), on CPUs coarse to fine."""
    auto = DecodeParams()
    assert auto.mode == "auto"
    assert [auto.mode_on(d) for d in ("cuda", "cuda:1", torch.device("cuda", 0), "cpu", torch.device("cpu"))] == \
        ["dense", "dense", "dense", "coarse_to_fine", "coarse_to_fine"]
    assert DecodeParams(mode="dense").mode_on("cpu") == "dense"
    assert DecodeParams(mode="coarse_to_fine").mode_on("cuda") == "coarse_to_fine"
    model, box = random_field(1)
    grid = roi_grid(box, (29, 22, 17))
    decision = threshold_decision(0.5)
    on_cpu, spent = decode_spent(model, 0, grid, box, decision, dataclasses.replace(auto, coarse_step=4), "cpu")
    assert set(spent) != {1}  # the lattice's levels: coarse to fine ran
    fine, _ = decode_spent(model, 0, grid, box, decision, DecodeParams(mode="coarse_to_fine", coarse_step=4), "cpu")
    np.testing.assert_array_equal(on_cpu, fine)


@pytest.mark.parametrize("bad", [dict(mode="sparse"), dict(coarse_step=6), dict(coarse_step=0), dict(margin=-1.0),
                                 dict(guard_from_step=3)])
def test_decode_params_are_checked(bad):
    with pytest.raises(ValueError, match="decode"):
        DecodeParams(**bad)


def test_several_thresholds_on_one_head_decode_together():
    """threshold_bits_decision: bit i where P >= thresholds[i], coarse to fine as dense (all three
    surfaces refined), and one threshold gives threshold_decision's labels."""
    model, box = random_field(2)
    grid = roi_grid(box, (41, 36, 29))
    prob = field_on_grid(model, 1, grid, box)[..., 0]
    cuts = [float(np.quantile(prob, q)) for q in (0.6, 0.3, 0.9)]  # in any order
    bits = labels_on_grid(model, 1, grid, box, threshold_bits_decision(cuts), DecodeParams(mode="dense"))
    for i, cut in enumerate(cuts):
        np.testing.assert_array_equal(bits & (1 << i) > 0, prob >= np.float32(cut))
    coronary = DecodeParams(coarse_step=4, margin=4.0)  # the decode stage 1 anchors the coronaries with
    fine = labels_on_grid(model, 1, grid, box, threshold_bits_decision(cuts), coronary)
    assert np.mean(fine == bits) >= 0.9999
    one = labels_on_grid(model, 1, grid, box, threshold_bits_decision([0.7]), DecodeParams(mode="dense"))
    np.testing.assert_array_equal(one, labels_on_grid(model, 1, grid, box, threshold_decision(0.7),
                                                      DecodeParams(mode="dense")))
    with pytest.raises(ValueError, match="1 to 8"):
        threshold_bits_decision([])
