"""The NeAR auto-decoder F(z_i, p): a per-case latent code decoded into an occupancy field.

NeAR (MICCAI 2022) repairs a label by fitting one latent code z_i per case, with a decoder
shared by all cases: the shared decoder can only express shapes that are typical of the whole
set, so case-specific label noise is not reproduced. The field is split in two parts:

* :class:`GridDecoder` turns z_i into a pyramid of coarse-to-fine 3-D feature grids over the
  case's ROI. It runs once per case and holds all normalisation of the model.
* :class:`PointMLP` reads the grid features (plus the point's own coordinates) at each query
  point and outputs logits. It is purely point-wise, so a point's logit never depends on which
  other points were queried — chunked inference over a full-resolution grid equals one pass.

Points are ROI-normalised ``[-1, 1]^3`` coordinates in (i, j, k) order, the project convention
of :mod:`nearfix_lib.core.geometry`; feature grids are stored (B, C, i, j, k) like every array.

The same class serves the per-class stage (``n_heads=1``) and the unified stage
(``n_heads = number of classes``: independent sigmoid heads, no softmax, so each class keeps
its own occupancy and overlaps are resolved later by the fusion priorities).
An optional appearance branch adds CT features; it is off by default, as NeAR is shape-only. Its
two kinds: NeAR's learned :class:`AppearanceEncoder` (a feature grid 8 times coarser than the ROI),
and :class:`IntensityFeatures`, the CT itself and its smoothings at the ROI grid's resolution, for
structures a few voxels across whose edges a coarser grid cannot place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from nearfix_lib.core.config import ModelParams
from nearfix_lib.core.geometry import to_grid_sample_order
from nearfix_lib.field.losses import latent_l2

__all__ = ["ModelParams", "LatentTable", "GridDecoder", "AppearanceEncoder", "IntensityFeatures", "appearance_input",
           "PointMLP", "Encoded",
           "ImplicitField", "sample_point_features", "count_parameters"]

_LEAK = 0.2  # LeakyReLU slope of the convolutional parts


class LatentTable(nn.Module):
    """One trainable code per training case, looked up by case index.

    Codes start small (``init_std``) so that every case begins near the mean shape and only
    moves away as far as its own labels demand — the prior that ``latent_l2`` keeps enforcing.
    """

    def __init__(self, n_cases: int, dim: int, init_std: float) -> None:
        super().__init__()
        if n_cases < 1:
            raise ValueError(f"a latent table needs at least one case, got {n_cases}")
        self.init_std = float(init_std)
        self.embedding = nn.Embedding(n_cases, dim)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=self.init_std)

    @property
    def n_cases(self) -> int:
        return self.embedding.num_embeddings

    @property
    def dim(self) -> int:
        return self.embedding.embedding_dim

    def forward(self, idx: Tensor) -> Tensor:
        """(B,) case indices -> (B, dim) codes."""
        return self.embedding(idx)

    def new_latent(self, n: int = 1) -> nn.Parameter:
        """Fresh (n, dim) codes, initialised like the table, for fitting unseen cases.

        A new case is fitted with the decoder frozen and only its own code free; it is a
        separate parameter so the trained table stays untouched.
        """
        weight = self.embedding.weight
        return nn.Parameter(torch.randn(n, self.dim, device=weight.device, dtype=weight.dtype)
                            * self.init_std)


def _group_count(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels`` (GroupNorm needs it)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class _ConvBlock(nn.Sequential):
    """Conv3d 3x3x3 + GroupNorm + LeakyReLU: GroupNorm works per case, so batch size 1 is fine."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1),
            nn.GroupNorm(_group_count(out_ch), out_ch),
            nn.LeakyReLU(_LEAK),
        )


class GridDecoder(nn.Module):
    """Latent (B, D) -> feature grids [(B, C_s, S_s, S_s, S_s)] for every scale s.

    A linear layer makes the coarsest grid; each finer scale upsamples the previous grid
    trilinearly and refines it with a conv block, so fine grids add detail to a coarse shape
    instead of encoding it from scratch. All grids are returned: the point MLP reads every
    scale, coarse grids giving it global context, fine grids the boundary position.
    """

    def __init__(self, latent_dim: int, channels: tuple[int, ...], sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.sizes = tuple(sizes)
        self.fc = nn.Linear(latent_dim, channels[0] * sizes[0] ** 3)
        in_channels = (channels[0], *channels[:-1])
        self.blocks = nn.ModuleList(_ConvBlock(i, o) for i, o in zip(in_channels, channels))

    def forward(self, z: Tensor) -> list[Tensor]:
        size = self.sizes[0]
        x = self.fc(z).view(z.shape[0], self.channels[0], size, size, size)
        grids = []
        for scale, block in enumerate(self.blocks):
            if scale:
                x = F.interpolate(x, scale_factor=self.sizes[scale] / self.sizes[scale - 1],
                                  mode="trilinear", align_corners=False)
            x = block(x)
            grids.append(x)
        return grids


class AppearanceEncoder(nn.Module):
    """CT crop (B, 1, R, R, R) -> appearance feature grid (B, out_ch, R/8, R/8, R/8).

    Three stride-2 stages with kernel 4 and padding 1 each halve the grid so that output cell
    o covers input cells [2o, 2o + 2) and is centred on them — the ``align_corners=False``
    geometry that :func:`sample_point_features` assumes. (Kernel 3 with padding 1 would centre
    it on input cell 2o: a half-cell shift per stage, 3.5 input voxels after three.) The CT is
    expected intensity-normalised by the caller; InstanceNorm removes what is left of the
    per-scan contrast differences.
    """

    widths = (16, 32, 64)

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for width in self.widths:
            layers += [nn.Conv3d(in_ch, width, kernel_size=4, stride=2, padding=1),
                       nn.InstanceNorm3d(width, affine=True), nn.LeakyReLU(_LEAK)]
            in_ch = width
        layers += [nn.Conv3d(in_ch, out_channels, kernel_size=3, padding=1),
                   nn.InstanceNorm3d(out_channels, affine=True), nn.LeakyReLU(_LEAK)]
        self.net = nn.Sequential(*layers)

    @property
    def stride(self) -> int:
        return 2 ** len(self.widths)

    def forward(self, image: Tensor) -> Tensor:
        if image.dim() != 5 or image.shape[1] != 1:
            raise ValueError(f"appearance image must be (B, 1, R, R, R), got {tuple(image.shape)}")
        if any(r % self.stride or r < 2 * self.stride for r in image.shape[2:]):
            raise ValueError(f"appearance image sides must be multiples of {self.stride} and at "
                             f"least {2 * self.stride} so features stay aligned with the ROI, "
                             f"got {tuple(image.shape[2:])}")
        return self.net(image)


class IntensityFeatures(nn.Module):
    """The CT itself at the ROI grid's resolution: (B, len(sigmas), R, R, R) smoothings of the crop,
    given as they are (no parameters); :func:`appearance_input` makes them, once per case.

    Why: the learned encoder's grid is 8 times coarser than the ROI, so at a coronary box's 144^3 a
    cell is 18 voxels wide and a vessel 2-4; what tells a point inside a contrast-filled lumen from
    the fat beside it is the intensity at the point. The smoothings give it the neighbourhood (a
    noisy voxel alone says little) without a learned stage that could fit the label's noise. They are
    computed where the case's CT is read, not at each step: the crop does not change during a fit.
    """

    def __init__(self, sigmas: tuple[float, ...]) -> None:
        super().__init__()
        self.sigmas = tuple(float(s) for s in sigmas)

    @staticmethod
    def smoothings(ct: np.ndarray, sigmas: tuple[float, ...]) -> np.ndarray:
        """(len(sigmas), *ct.shape) float32: ``ct`` smoothed by a Gaussian of each sigma (grid voxels;
        0 keeps it as it is), cut at 3 sigma; border voxels replicated, so the ROI's rim is not darkened."""
        ct = np.asarray(ct, dtype=np.float32)
        return np.stack([ct if s == 0 else ndimage.gaussian_filter(ct, s, mode="nearest", truncate=3.0)
                         for s in sigmas])

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 5 or features.shape[1] != len(self.sigmas):
            raise ValueError(f"intensity features must be (B, {len(self.sigmas)}, R, R, R) (one channel per "
                             f"sigma, from appearance_input), got {tuple(features.shape)}")
        return features


def appearance_input(params: ModelParams, ct: np.ndarray) -> np.ndarray:
    """What the appearance branch reads for one case, from its normalised CT crop (R, R, R): the crop
    itself for the learned encoder, (1, R, R, R); its smoothings for ``intensity``, (len(sigmas), R, R, R)."""
    if params.appearance_kind == "intensity":
        return IntensityFeatures.smoothings(ct, params.appearance_sigmas)
    return np.asarray(ct, dtype=np.float32)[None]


class PointMLP(nn.Module):
    """Per-point MLP with one input skip: in -> 256 -> 256 -> [256 + in] -> 128 -> 64 -> n_out.

    Only ``nn.Linear`` on the channel axis, no normalisation: a normalisation over points would
    make a point's logit depend on the other points in the query.
    """

    def __init__(self, in_ch: int, n_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_ch, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256 + in_ch, 128)
        self.fc4 = nn.Linear(128, 64)
        self.out = nn.Linear(64, n_out)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_ch) features -> (..., n_out) logits."""
        h = F.relu(self.fc1(x))
        h = F.relu(self.fc2(h))
        h = F.relu(self.fc3(torch.cat([h, x], dim=-1)))
        h = F.relu(self.fc4(h))
        return self.out(h)


def sample_point_features(grids: list[Tensor], points: Tensor) -> Tensor:
    """Trilinear features of every grid at ``points`` (B, N, 3), concatenated -> (B, N, sum C).

    ``points`` are ROI-normalised (i, j, k); grids are (B, C, i, j, k), and ``grid_sample``
    reads its coordinates as (k, j, i), hence :func:`to_grid_sample_order`. Border padding keeps
    points on the ROI rim (|coordinate| slightly > 1 after rounding) on the edge features.
    """
    batch, n_points, _ = points.shape
    where = to_grid_sample_order(points).reshape(batch, n_points, 1, 1, 3)
    feats = []
    for grid in grids:
        sampled = F.grid_sample(grid, where.to(grid.dtype), mode="bilinear", padding_mode="border",
                                align_corners=False)  # (B, C, N, 1, 1)
        feats.append(sampled.reshape(batch, grid.shape[1], n_points).transpose(1, 2))
    return torch.cat(feats, dim=-1)


@dataclass
class Encoded:
    """The per-case part of the field, computed once and reused for any number of points."""

    shape: list[Tensor]  # GridDecoder output, coarse to fine
    appearance: Tensor | None = None  # AppearanceEncoder output when the branch is on

    @property
    def grids(self) -> list[Tensor]:
        return self.shape if self.appearance is None else [*self.shape, self.appearance]

    @property
    def batch_size(self) -> int:
        return self.shape[0].shape[0]


def _appearance_branch(params: ModelParams) -> nn.Module | None:
    if not params.appearance:
        return None
    if params.appearance_kind == "intensity":
        return IntensityFeatures(params.appearance_sigmas)
    return AppearanceEncoder(params.appearance_channels)


class ImplicitField(nn.Module):
    """F(z_i, p) -> logits: latent table + grid decoder (+ appearance encoder) + point MLP."""

    def __init__(self, n_cases: int, params: ModelParams, n_heads: int = 1) -> None:
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {n_heads}")
        self.params = params
        self.n_heads = n_heads
        self.latents = LatentTable(n_cases, params.latent_dim, params.latent_init_std)
        self.decoder = GridDecoder(params.latent_dim, params.grid_channels, params.grid_sizes)
        self.appearance = _appearance_branch(params)
        self.mlp = PointMLP(self.in_channels, n_heads)

    @property
    def in_channels(self) -> int:
        """Point MLP input width: coordinates + shape features (+ appearance features)."""
        return 3 + sum(self.params.grid_channels) + self.params.appearance_width

    def encode_latent(self, z: Tensor, image: Tensor | None = None) -> Encoded:
        """Feature grids of arbitrary codes (B, D): the path used to fit a new case's free code."""
        if self.appearance is None:
            if image is not None:
                raise ValueError("an image was given but the model has no appearance branch")
            return Encoded(self.decoder(z))
        if image is None:
            raise ValueError("the appearance branch is on: encode needs the CT crop (appearance_input)")
        if image.shape[0] != z.shape[0]:
            raise ValueError(f"{z.shape[0]} codes but {image.shape[0]} images")
        return Encoded(self.decoder(z), self.appearance(image))

    def encode(self, case_idx: Tensor, image: Tensor | None = None) -> Encoded:
        """Feature grids of training cases ``case_idx`` (B,)."""
        return self.encode_latent(self.latents(case_idx), image)

    def decode(self, encoded: Encoded, points: Tensor) -> Tensor:
        """Logits (B, N, n_heads) at ROI-normalised (i, j, k) ``points`` (B, N, 3)."""
        if points.dim() != 3 or points.shape[-1] != 3 or points.shape[0] != encoded.batch_size:
            raise ValueError(f"points must be (B={encoded.batch_size}, N, 3), got {tuple(points.shape)}")
        feats = sample_point_features(encoded.grids, points)
        return self.mlp(torch.cat([feats, points.to(feats.dtype)], dim=-1))

    def forward(self, case_idx: Tensor, points: Tensor, image: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(case_idx, image), points)

    def latent_penalty(self, case_idx: Tensor) -> Tensor:
        """Mean over the batch of ||z_i||^2, the auto-decoder's Gaussian prior on the codes."""
        return latent_l2(self.latents(case_idx))


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
