"""Evaluate implicit fields on any grid, in chunks of bounded memory.

A case's feature grids are decoded from its latent once (``model.encode``); the point MLP then
runs over the grid's points chunk by chunk. Because the MLP sees one point at a time, the result
equals a one-shot evaluation to the last bit of float precision — chunk size only bounds memory.
Points are generated slab by slab from the grid's affine, so even a 512x512x275 original grid is
never materialised as one coordinate array.

The grid can be the ROI lattice a model was fitted on or, through the affine chain, the case's
original voxels inside the ROI box: ``original_box_grid`` — which is how repaired masks reach the
original image space without a resize-then-resize-back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from nearfix_lib.core.geometry import Box, Grid, apply_affine, original_to_normalised
from nearfix_lib.field.models import Encoded


def original_box_grid(box: Box) -> Grid:
    """The original voxels inside ``box`` as a grid (index g -> original voxel g + lo)."""
    to_original = np.eye(4)
    to_original[:3, 3] = box.lo
    return Grid(box.shape, to_original)


def iter_normalised_points(grid: Grid, box: Box, max_points: int) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (slab of axis 0, (n, 3) float32 normalised points of that slab), C order."""
    plane = grid.shape[1] * grid.shape[2]
    rows = max(1, max_points // plane)
    to_norm = original_to_normalised(box) @ grid.to_original
    jj, kk = np.meshgrid(np.arange(grid.shape[1]), np.arange(grid.shape[2]), indexing="ij")
    jk = np.stack([jj.ravel(), kk.ravel()], axis=1).astype(np.float64)
    for start in range(0, grid.shape[0], rows):
        stop = min(start + rows, grid.shape[0])
        ii = np.repeat(np.arange(start, stop, dtype=np.float64), plane)[:, None]
        idx = np.concatenate([ii, np.tile(jk, (stop - start, 1))], axis=1)
        yield slice(start, stop), apply_affine(to_norm, idx).astype(np.float32)


def encode_case(model: torch.nn.Module, case_index: int, device: str, image: torch.Tensor | None = None,
            latent: torch.Tensor | None = None) -> Encoded:
    """The case's feature grids, from its table entry or from a free ``latent`` (1, D)."""
    model.eval()
    if latent is not None:
        return model.encode_latent(latent.to(device), image)
    return model.encode(torch.tensor([case_index], device=device), image)


def probabilities_at(model: torch.nn.Module, encoded: Encoded, points: np.ndarray, device: str) -> np.ndarray:
    """Sigmoid probabilities (n, heads) at normalised (n, 3) ``points`` of one encoded case."""
    logits = model.decode(encoded, torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).to(device)[None])[0]
    return torch.sigmoid(logits.float()).cpu().numpy()


@torch.no_grad()  # a generator: torch keeps grad off while each chunk is computed
def grid_chunks(model: torch.nn.Module, case_index: int, grid: Grid, box: Box, device: str = "cpu",
                chunk_points: int = 262_144, image: torch.Tensor | None = None,
                latent: torch.Tensor | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """(slab of axis 0, probabilities (n, heads) of its voxel centres), chunk after chunk: for a
    consumer that needs the probabilities but not all of them at once (counts, decisions)."""
    encoded = encode_case(model, case_index, device, image, latent)
    for slab, pts in iter_normalised_points(grid, box, chunk_points):
        yield slab, probabilities_at(model, encoded, pts, device)


@torch.no_grad()
def field_on_grid(model: torch.nn.Module, case_index: int, grid: Grid, box: Box, device: str = "cpu",
                  chunk_points: int = 262_144, image: torch.Tensor | None = None,
                  latent: torch.Tensor | None = None) -> np.ndarray:
    """Sigmoid probabilities of every head at ``grid``'s voxel centres: (*grid.shape, heads).

    ``box`` is the ROI the model's normalised space refers to. ``latent`` (1, D) replaces the
    table entry (latent-only fitting of a new case).
    """
    out = None
    for slab, prob in grid_chunks(model, case_index, grid, box, device, chunk_points, image, latent):
        if out is None:
            out = np.empty((*grid.shape, prob.shape[-1]), dtype=np.float32)
        out[slab] = prob.reshape(slab.stop - slab.start, grid.shape[1], grid.shape[2], -1)
    return out


@torch.no_grad()
def reduced_on_grid(model: torch.nn.Module, case_index: int, grid: Grid, box: Box,
                    reduce: Callable[[np.ndarray], np.ndarray], dtype: type, device: str = "cpu",
                    chunk_points: int = 262_144, image: torch.Tensor | None = None,
                    latent: torch.Tensor | None = None) -> np.ndarray:
    """``reduce`` (probabilities (n, heads) -> values (n,)) at ``grid``'s voxel centres, chunk by chunk:
    (*grid.shape) of ``dtype``. A decision (a label per voxel) without the whole float32 map of
    every head, 40 bytes per voxel for ten heads: 2 GB for a real case's heart box."""
    out = np.empty(grid.shape, dtype=dtype)
    for slab, prob in grid_chunks(model, case_index, grid, box, device, chunk_points, image, latent):
        out[slab] = reduce(prob).reshape(slab.stop - slab.start, grid.shape[1], grid.shape[2])
    return out


@torch.no_grad()
def field_at_points(model: torch.nn.Module, case_index: int, points: np.ndarray, device: str = "cpu",
                    chunk_points: int = 262_144) -> np.ndarray:
    """Sigmoid probabilities (N, heads) of case ``case_index`` at normalised (N, 3) ``points``:
    a scattered set (a boundary band) instead of a whole grid."""
    encoded = encode_case(model, case_index, device)
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    chunks = [probabilities_at(model, encoded, pts[s:s + chunk_points], device)
              for s in range(0, len(pts), chunk_points)]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.n_heads), dtype=np.float32)


def field_in_box(model: torch.nn.Module, case_index: int, grid: Grid, box: Box, device: str = "cpu",
                 chunk_points: int = 262_144, image: torch.Tensor | None = None) -> np.ndarray:
    """Like :func:`field_on_grid` on any (axis-aligned) ``grid``, but only where it lies inside ``box``.

    A class model knows nothing outside its own ROI (the normalised cube), so voxels of the grid
    outside ``box`` are 0 and are not evaluated: a class ROI covers a fraction of a whole-heart grid.
    """
    sub = grid_within_box(grid, box)
    if sub is None:
        return np.zeros((*grid.shape, model.n_heads), dtype=np.float32)
    lo, sub_grid = sub
    prob = field_on_grid(model, case_index, sub_grid, box, device, chunk_points, image=image)
    out = np.zeros((*grid.shape, prob.shape[-1]), dtype=np.float32)
    out[tuple(slice(a, a + n) for a, n in zip(lo, sub_grid.shape))] = prob
    return out


def grid_within_box(grid: Grid, box: Box) -> tuple[tuple[int, int, int], Grid] | None:
    """The block of ``grid`` whose voxel centres lie inside ``box`` (original voxel extents), or None.

    ``grid.to_original`` must be axis-aligned (a scaled, shifted lattice, as every ROI grid is).
    """
    linear = grid.to_original[:3, :3]
    if np.count_nonzero(linear - np.diag(np.diag(linear))):
        raise ValueError("grid_within_box needs an axis-aligned grid")
    scale, shift = np.diag(linear), grid.to_original[:3, 3]
    # original voxel centres of the box run lo..hi-1; its extent is lo-0.5 .. hi-0.5
    a = (np.asarray(box.lo) - 0.5 - shift) / scale
    b = (np.asarray(box.hi) - 0.5 - shift) / scale
    first = np.clip(np.ceil(np.minimum(a, b) - 1e-9), 0, None).astype(int)
    last = np.minimum(np.floor(np.maximum(a, b) + 1e-9).astype(int), np.asarray(grid.shape) - 1)
    if np.any(last < first):
        return None
    to_original = grid.to_original.copy()
    to_original[:3, 3] = shift + scale * first
    shape = tuple(int(v) for v in last - first + 1)
    return tuple(int(v) for v in first), Grid(shape, to_original)  # type: ignore[return-value]
