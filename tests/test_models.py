"""The implicit field: shapes, per-point independence, axis order of sampling, and that it learns."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nearfix_lib.core.config import ModelParams
from nearfix_lib.field.models import (
    AppearanceEncoder,
    ImplicitField,
    LatentTable,
    PointMLP,
    appearance_input,
    count_parameters,
    sample_point_features,
)

# Small grids keep the tests fast; the default-size checks only build the modules.
SMALL = ModelParams(latent_dim=16, grid_channels=(8, 8, 4), grid_sizes=(2, 4, 8))


def random_points(batch, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, 3, generator=gen) * 2 - 1


def test_default_input_width_and_parameter_count():
    model = ImplicitField(3, ModelParams())
    assert model.in_channels == 163 and model.mlp.fc1.in_features == 163
    assert model.appearance is None
    with_ct = ImplicitField(3, ModelParams(appearance=True))
    assert with_ct.in_channels == 323 and with_ct.mlp.fc1.in_features == 323
    assert count_parameters(with_ct) > count_parameters(model) > 0
    assert count_parameters(nn.Linear(4, 3)) == 15


def test_mlp_layer_sizes_are_exactly_the_specified_ones():
    mlp = PointMLP(163, 10)
    sizes = [(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert sizes == [(163, 256), (256, 256), (256 + 163, 128), (128, 64), (64, 10)]


def test_no_normalisation_in_the_point_mlp_but_in_the_grid_decoder():
    model = ImplicitField(2, ModelParams(appearance=True), n_heads=10)
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    assert not any(isinstance(m, norm_types) for m in model.mlp.modules())
    assert {type(m) for m in model.mlp.modules()} == {PointMLP, nn.Linear}
    assert any(isinstance(m, nn.GroupNorm) for m in model.decoder.modules())


@pytest.mark.parametrize("n_heads", [1, 10])
def test_output_shapes(n_heads):
    model = ImplicitField(5, SMALL, n_heads=n_heads)
    out = model(torch.tensor([0, 3, 4]), random_points(3, 50))
    assert out.shape == (3, 50, n_heads)
    grids = model.encode(torch.tensor([1, 2])).grids
    assert [tuple(g.shape) for g in grids] == [(2, 8, 2, 2, 2), (2, 8, 4, 4, 4), (2, 4, 8, 8, 8)]


def test_appearance_branch_runs_with_an_image_and_requires_one():
    params = ModelParams(latent_dim=16, grid_channels=(8, 4), grid_sizes=(2, 4), appearance=True,
                         appearance_channels=12)
    model = ImplicitField(2, params, n_heads=3)
    assert model.in_channels == 3 + 12 + 12
    image = torch.randn(2, 1, 16, 16, 16)
    enc = model.encode(torch.tensor([0, 1]), image)
    assert enc.appearance.shape == (2, 12, 2, 2, 2)
    assert model(torch.tensor([0, 1]), random_points(2, 7), image).shape == (2, 7, 3)
    with pytest.raises(ValueError, match="CT crop"):
        model(torch.tensor([0, 1]), random_points(2, 7))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.appearance(torch.randn(1, 1, 20, 16, 16))
    with pytest.raises(ValueError, match="no appearance branch"):
        ImplicitField(2, SMALL)(torch.tensor([0]), random_points(1, 4), image[:1])


def test_appearance_encoder_output_is_centred_on_its_input_cells():
    """With averaging kernels the encoder is a 2x2x2 mean pool per stage: cell o = mean of [8o, 8o+8)."""
    enc = AppearanceEncoder(1)
    with torch.no_grad():
        for m in enc.net:
            if isinstance(m, nn.Conv3d):
                m.weight.zero_()
                m.bias.zero_()
                if m.kernel_size == (4, 4, 4):
                    m.weight[:, :, 1:3, 1:3, 1:3] = 1.0 / (8 * m.in_channels)
                else:
                    m.weight[:, :, 1, 1, 1] = 1.0 / m.in_channels
    linear = nn.Sequential(*[m for m in enc.net if isinstance(m, nn.Conv3d)])
    ramp = torch.arange(32.0).view(1, 1, 32, 1, 1).expand(1, 1, 32, 16, 24).contiguous()
    out = linear(ramp)
    assert out.shape == (1, 1, 4, 2, 3)
    assert torch.allclose(out[0, 0, :, 1, 1], torch.tensor([3.5, 11.5, 19.5, 27.5]))


def test_intensity_features_are_the_ct_and_its_smoothings_at_full_resolution():
    """Channel 0 is the crop itself, the others Gaussian smoothings along each axis on its own; no parameters."""
    params = ModelParams(latent_dim=16, grid_channels=(8, 4), grid_sizes=(2, 4), appearance=True,
                         appearance_kind="intensity", appearance_sigmas=(0.0, 1.0, 2.0))
    ct = np.random.default_rng(0).normal(size=(9, 7, 11)).astype(np.float32)  # any sides: nothing is pooled
    out = appearance_input(params, ct)
    assert out.shape == (3, 9, 7, 11) and out.dtype == np.float32 and np.array_equal(out[0], ct)
    # a constant stays constant up to the rim (borders replicated, not zero-padded)
    flat = appearance_input(params, np.full((6, 5, 4), 0.3, np.float32))
    assert np.allclose(flat, 0.3)
    # a plane i = 4 spreads along i only, as a Gaussian of sigma 1 voxel (cut at 3 sigma, summing to 1)
    plane = np.zeros((9, 7, 11), np.float32)
    plane[4] = 1.0
    smooth = appearance_input(params, plane)[1]
    d = np.arange(9) - 4
    gauss = np.exp(-0.5 * d ** 2) * (np.abs(d) <= 3)
    assert np.allclose(smooth[:, 3, 5], gauss / gauss.sum(), atol=1e-5)
    assert np.allclose(smooth, smooth[:, :1, :1], atol=1e-6)
    # the encoder reads the crop as it is
    assert np.array_equal(appearance_input(ModelParams(appearance=True), ct), ct[None])
    # the field: coordinates + shape features + one channel per sigma, the features required
    model = ImplicitField(2, params)
    assert model.in_channels == 3 + 12 + 3 and count_parameters(model.appearance) == 0
    image = torch.from_numpy(np.stack([out, out]))
    assert model(torch.tensor([0, 1]), random_points(2, 5), image).shape == (2, 5, 1)
    with pytest.raises(ValueError, match="CT crop"):
        model(torch.tensor([0, 1]), random_points(2, 5))
    with pytest.raises(ValueError, match="one channel per sigma"):
        model(torch.tensor([0, 1]), random_points(2, 5), image[:, :1])


def test_grid_sample_reads_points_in_i_j_k_order():
    """A grid whose value is its i (resp. j, k) coordinate, and one hot cell, sampled at known points."""
    shape = (6, 5, 4)  # distinct sides: a swapped axis changes the answer
    centres = [(2 * torch.arange(n, dtype=torch.float32) + 1) / n - 1 for n in shape]
    ii, jj, kk = torch.meshgrid(*centres, indexing="ij")
    grid = torch.stack([ii, jj, kk])[None]  # (1, 3, i, j, k): channel c = coordinate c
    pts = torch.tensor([[[-0.5, 0.2, 0.7], [0.3, -0.6, 0.1], [0.0, 0.0, -0.25]]])
    feats = sample_point_features([grid], pts)
    assert torch.allclose(feats, pts, atol=1e-6)  # interior points: linear in each coordinate

    hot = torch.zeros(1, 1, *shape)
    hot[0, 0, 4, 1, 3] = 1.0
    at_hot = torch.tensor([[[centres[0][4], centres[1][1], centres[2][3]],
                            [centres[0][3], centres[1][1], centres[2][3]],  # next cell along i
                            [centres[0][1], centres[1][4], centres[2][3]]]])  # i and j swapped
    assert sample_point_features([hot], at_hot)[0, :, 0].tolist() == [1.0, 0.0, 0.0]


def test_a_point_does_not_depend_on_the_other_points_queried():
    torch.manual_seed(0)
    model = ImplicitField(3, SMALL, n_heads=10).eval()
    pts = random_points(2, 300)
    with torch.no_grad():
        enc = model.encode(torch.tensor([0, 2]))
        full = model.decode(enc, pts)
        head = model.decode(enc, pts[:, :37])
        chunks = torch.cat([model.decode(enc, c) for c in pts.split(64, dim=1)], dim=1)
        perm = torch.randperm(300)
        shuffled = model.decode(enc, pts[:, perm])
        alone = model.decode(enc, pts[:, 123:124])
    assert torch.allclose(head, full[:, :37], atol=1e-6)
    assert torch.allclose(chunks, full, atol=1e-6)
    assert torch.allclose(shuffled, full[:, perm], atol=1e-6)
    assert torch.allclose(alone, full[:, 123:124], atol=1e-6)


def test_gradients_reach_only_the_latent_rows_in_the_batch():
    model = ImplicitField(6, SMALL)
    idx = torch.tensor([1, 4])
    loss = model(idx, random_points(2, 40)).square().mean() + model.latent_penalty(idx)
    loss.backward()
    grad = model.latents.embedding.weight.grad
    row_norms = grad.norm(dim=1)
    assert torch.all(row_norms[idx] > 0)
    assert torch.all(row_norms[[0, 2, 3, 5]] == 0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_latent_penalty_and_new_latent():
    model = ImplicitField(4, SMALL)
    idx = torch.tensor([0, 3])
    z = model.latents(idx)
    assert torch.allclose(model.latent_penalty(idx), z.pow(2).sum(1).mean())
    fresh = model.latents.new_latent(2)
    assert isinstance(fresh, nn.Parameter) and fresh.shape == (2, 16)
    assert fresh.abs().max() < 0.1  # same small init as the table (std 0.01)
    table = LatentTable(1000, 32, 0.5)
    assert abs(table.embedding.weight.std().item() - 0.5) < 0.02
    assert abs(table.new_latent(1000).std().item() - 0.5) < 0.02
    # a free code decodes through the frozen decoder like a table row
    pts = random_points(1, 20)
    same = model.decode(model.encode_latent(model.latents(torch.tensor([2]))), pts)
    assert torch.allclose(same, model(torch.tensor([2]), pts))
    out = model.decode(model.encode_latent(fresh[:1]), pts)
    out.sum().backward()
    assert fresh.grad is not None and fresh.grad[0].abs().sum() > 0


@pytest.fixture
def one_thread():
    """Tiny tensors train faster on one thread, and far faster when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_overfits_two_tiny_shapes(one_thread):
    """Case 0 a sphere, case 1 an off-centre box, on the same points: only the latent tells them apart."""
    torch.manual_seed(0)
    model = ImplicitField(2, SMALL)
    pts = random_points(1, 1024, seed=1).expand(2, -1, -1)
    sphere = pts[0].norm(dim=-1) < 0.5
    box = (pts[1] - torch.tensor([0.5, -0.5, 0.4])).abs().amax(dim=-1) < 0.35
    target = torch.stack([sphere, box]).float()[..., None]
    idx = torch.tensor([0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():
        first = F.binary_cross_entropy_with_logits(model(idx, pts), target).item()
    for _ in range(150):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(idx, pts), target)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(idx, pts)
    last = F.binary_cross_entropy_with_logits(logits, target).item()
    assert last < first / 5, (first, last)
    differ = sphere != box  # a field ignoring the latent gets at most half of these right
    correct = ((logits[..., 0] > 0) == target[..., 0].bool())[:, differ].float().mean()
    assert correct > 0.9, correct


@pytest.mark.parametrize("kwargs, message", [
    ({"grid_channels": (8, 8), "grid_sizes": (2, 4, 8)}, "same length"),
    ({"grid_channels": (8, 8), "grid_sizes": (4, 4)}, "increase"),
    ({"grid_channels": (8, 8), "grid_sizes": (4, 12)}, "power-of-two"),
    ({"grid_channels": (8, 0), "grid_sizes": (4, 8)}, "grid_channels"),
    ({"grid_channels": (), "grid_sizes": ()}, "at least one"),
    ({"latent_dim": 0}, "latent_dim"),
    ({"appearance_channels": 0}, "appearance_channels"),
    ({"appearance_kind": "cnn"}, "appearance_kind"),
    ({"appearance_sigmas": ()}, "appearance_sigmas"),
    ({"appearance_sigmas": (0.0, -1.0)}, "appearance_sigmas"),
    ({"latent_init_std": -1.0}, "latent_init_std"),
])
def test_parameter_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelParams(**kwargs)


def test_params_accept_yaml_lists_and_bad_constructor_arguments_fail():
    p = ModelParams(grid_channels=[8, 4], grid_sizes=[2, 8])
    assert p.grid_channels == (8, 4) and p.grid_sizes == (2, 8)
    with pytest.raises(ValueError, match="n_heads"):
        ImplicitField(2, SMALL, n_heads=0)
    with pytest.raises(ValueError, match="at least one case"):
        ImplicitField(0, SMALL)
    with pytest.raises(ValueError, match="points must be"):
        model = ImplicitField(2, SMALL)
        model(torch.tensor([0, 1]), random_points(1, 5))
