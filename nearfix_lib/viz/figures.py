"""Figures in the class table's fixed colours, and CT window presets.

Display convention (display only — arrays are never transposed for computation): a slice
through axis ``a`` of an (i, j, k) volume is drawn with the lower-numbered remaining axis
horizontal and the other vertical, origin at the bottom left, and the axes are labelled with
the voxel axes they show, so an orientation error is visible in the figure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from nearfix_lib.core.classes import ClassTable, class_centre
from nearfix_lib.core.io import atomic_path
from nearfix_lib.core.scores import pivot


@dataclass(frozen=True)
class Window:
    """A CT display window: ``level`` (centre) and ``width`` in HU."""

    level: float
    width: float

    def apply(self, image: np.ndarray) -> np.ndarray:
        lo = self.level - self.width / 2.0
        return np.clip((np.asarray(image, dtype=np.float32) - lo) / self.width, 0.0, 1.0)


# Common radiological presets (level, width in HU); "cardiac" suits contrast CT angiography.
WINDOWS: dict[str, Window] = {
    "soft_tissue": Window(40, 400),
    "cardiac": Window(300, 800),
    "lung": Window(-600, 1500),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
}


def window(image: np.ndarray, preset: str | Window = "cardiac") -> np.ndarray:
    """CT values mapped to [0, 1] through a named preset or a :class:`Window`."""
    win = WINDOWS[preset] if isinstance(preset, str) else preset
    return win.apply(image)


def label_rgba(labels: np.ndarray, table: ClassTable, alpha: float = 0.6) -> np.ndarray:
    """RGBA image of a label map in the table's colours; background transparent."""
    lut = table.colour_lut().copy()
    lut[:, 3] *= alpha
    safe = np.clip(labels, 0, table.max_index)
    return lut[safe]


AXIS_NAMES = ("i", "j", "k")


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2-D slice ``index`` through ``axis``, oriented for ``imshow(origin="lower")``.

    Trailing channel axes (RGBA) stay last.
    """
    plane = np.take(volume, index, axis=axis)
    return np.swapaxes(plane, 0, 1)


def legend_handles(table: ClassTable, present: Sequence[int] | None = None) -> list[Patch]:
    keep = set(present) if present is not None else None
    return [Patch(color=np.asarray(c.colour) / 255.0, label=f"{c.index} {c.key}")
            for c in table if keep is None or c.index in keep]


def _with_class_legend(fig: plt.Figure, label_maps: Mapping[str, np.ndarray], table: ClassTable) -> plt.Figure:
    """A legend row (index, key, colour) of the classes present in any of the maps, below the panels."""
    present = sorted(set(np.unique(np.concatenate([np.unique(m) for m in label_maps.values()]))) - {0})
    fig.legend(handles=legend_handles(table, present), loc="lower center", ncol=min(len(present), 10) or 1,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def show_slices(label_maps: Mapping[str, np.ndarray], table: ClassTable, image: np.ndarray | None = None,
                centre: Sequence[int] | None = None, preset: str | Window = "cardiac",
                alpha: float = 0.6, size: float = 3.0) -> plt.Figure:
    """One row per label map, three orthogonal slices through ``centre``, CT underneath."""
    first = next(iter(label_maps.values()))
    centre = tuple(centre) if centre is not None else class_centre(first, table)
    rows = len(label_maps)
    fig, axes = plt.subplots(rows, 3, figsize=(3 * size, rows * size), squeeze=False)
    for r, (title, labels) in enumerate(label_maps.items()):
        for axis in range(3):
            ax = axes[r, axis]
            _ct_panel(ax, image, axis, centre[axis], preset)
            ax.imshow(take_slice(label_rgba(labels, table, alpha), axis, centre[axis]), origin="lower",
                      interpolation="nearest")
            ax.set_title(f"{title}: {AXIS_NAMES[axis]} = {centre[axis]}", fontsize=9)
    return _with_class_legend(fig, label_maps, table)


def show_windows(image: np.ndarray, axis: int = 2, index: int | None = None,
                 presets: Sequence[str] = tuple(WINDOWS), size: float = 3.0) -> plt.Figure:
    """The same CT slice under each window preset."""
    index = image.shape[axis] // 2 if index is None else index
    fig, axes = plt.subplots(1, len(presets), figsize=(len(presets) * size, size), squeeze=False)
    for ax, name in zip(axes[0], presets):
        ax.imshow(take_slice(window(image, name), axis, index), cmap="gray", origin="lower", vmin=0, vmax=1)
        w = WINDOWS[name]
        ax.set_title(f"{name} (L {w.level:g} / W {w.width:g})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_component_counts(counts: pd.DataFrame, table: ClassTable, size: float = 3.0) -> plt.Figure:
    """Per class: the distribution of component counts across cases vs the expected count.

    ``counts``: one row per case, one column per class key (as from ``inspection.survey``).
    """
    keys = [k for k in table.keys if k in counts.columns]
    fig, axes = plt.subplots(1, len(keys), figsize=(len(keys) * size * 0.6, size), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        cls = table[key]
        values = counts[key].to_numpy()
        top = int(max(values.max(initial=0), cls.expected_components)) + 1
        hist = np.bincount(values.astype(int), minlength=top + 1)
        colours = ["0.7"] * len(hist)
        colours[cls.expected_components] = np.asarray(cls.colour) / 255.0
        ax.bar(np.arange(len(hist)), hist, color=colours)
        ax.set_title(f"{key} (exp. {cls.expected_components})", fontsize=9)
        ax.set_xlabel("components")
    axes[0, 0].set_ylabel("cases")
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path) -> None:
    """Save a figure as PNG (atomically) and release its memory."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def show_roi_masks(masks: Mapping[str, np.ndarray], table: ClassTable, axis: int = 2,
                   size: float = 2.2) -> plt.Figure:
    """The middle slice of every class's resampled ROI mask, in the class colour.

    What stage 1 fits: if a class looks broken or empty here, its ROI or margin is wrong.
    """
    keys = [k for k in table.keys if k in masks]
    cols = min(len(keys), 5) or 1
    rows = max(1, int(np.ceil(len(keys) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, key in zip(axes.ravel(), keys):
        mask = np.asarray(masks[key], dtype=bool)
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        index = int(np.median(hit)) if hit.size else mask.shape[axis] // 2
        rgba = np.zeros(mask.shape[:axis] + mask.shape[axis + 1:] + (4,), np.float32)
        rgba[..., 3] = 1.0
        rgba[np.take(mask, index, axis=axis)] = [*(np.asarray(table[key].colour) / 255.0), 1.0]
        ax.imshow(np.transpose(rgba, (1, 0, 2)), origin="lower", interpolation="nearest")
        ax.set_title(f"{key} {'x'.join(map(str, mask.shape))}, {AXIS_NAMES[axis]}={index}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(history: Sequence[Mapping], keys: Sequence[str] = ("loss", "dice"), size: float = 3.2) -> plt.Figure:
    """Training curves from a fit history (one panel per logged quantity, x = epoch)."""
    keys = [k for k in keys if any(k in row for row in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(len(keys) * size * 1.3, size), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(row["epoch"], row[key]) for row in history if key in row]
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_xlabel("epoch")
        ax.set_title(key, fontsize=9)
        if key == "loss":
            ax.set_yscale("log")
    fig.tight_layout()
    return fig


# -- comparison figures (notebook 05) ----------------------------------------------------------------

def _ct_panel(ax, image: np.ndarray | None, axis: int, index: int, preset: str | Window) -> None:
    if image is not None:
        ax.imshow(take_slice(window(image, preset), axis, index), cmap="gray", origin="lower", vmin=0, vmax=1,
                  interpolation="nearest")
    else:
        ax.set_facecolor("black")
    rest = [AXIS_NAMES[a] for a in range(3) if a != axis]
    ax.set_xlabel(rest[0])
    ax.set_ylabel(rest[1])
    ax.set_xticks([])
    ax.set_yticks([])


def show_contours(label_maps: Mapping[str, np.ndarray], table: ClassTable, image: np.ndarray | None = None,
                  centre: Sequence[int] | None = None, preset: str | Window = "cardiac",
                  size: float = 3.0) -> plt.Figure:
    """One row per label map, three orthogonal slices through ``centre``: the CT with every class's
    outline in its colour (outlines show where two maps differ better than filled overlays)."""
    first = next(iter(label_maps.values()))
    centre = tuple(centre) if centre is not None else class_centre(first, table)
    fig, axes = plt.subplots(len(label_maps), 3, figsize=(3 * size, len(label_maps) * size), squeeze=False)
    for r, (title, labels) in enumerate(label_maps.items()):
        for axis in range(3):
            ax = axes[r, axis]
            _ct_panel(ax, image, axis, centre[axis], preset)
            plane = take_slice(labels, axis, centre[axis])
            for cls in table:
                mask = plane == cls.index
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[np.asarray(cls.colour) / 255.0],
                               linewidths=1.0, origin="lower")
            ax.set_title(f"{title}: {AXIS_NAMES[axis]} = {centre[axis]}", fontsize=9)
    return _with_class_legend(fig, label_maps, table)


def show_surfaces(masks: Mapping[str, np.ndarray], spacing: Sequence[float], colour: Sequence[int],
                  size: float = 3.5, step: int = 1) -> plt.Figure:
    """Marching-cubes surfaces (mm) of one class in several maps side by side, same view and limits."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    from skimage.measure import marching_cubes

    fig = plt.figure(figsize=(len(masks) * size, size))
    boxes = [np.argwhere(m) for m in masks.values() if np.any(m)]
    if boxes:
        pts = np.concatenate(boxes) * np.asarray(spacing)
        lo, hi = pts.min(axis=0) - 2, pts.max(axis=0) + 2
    for n, (title, mask) in enumerate(masks.items(), start=1):
        ax = fig.add_subplot(1, len(masks), n, projection="3d")
        ax.set_title(title, fontsize=9)
        if np.any(mask) and not np.all(mask):
            verts, faces, _, _ = marching_cubes(np.pad(mask, 1).astype(np.float32), 0.5, spacing=tuple(spacing),
                                                step_size=step)
            verts -= np.asarray(spacing)  # undo the padding
            tri = verts[faces]
            normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
            normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
            light = np.array([0.4, -0.5, 0.77])  # fixed, so every panel is lit alike
            shade = 0.35 + 0.65 * np.abs(normals @ (light / np.linalg.norm(light)))
            rgb = np.clip(shade[:, None] * (np.asarray(colour) / 255.0), 0, 1)
            ax.add_collection3d(Poly3DCollection(tri, facecolors=rgb, edgecolor="none"))
        if boxes:
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_zlim(lo[2], hi[2])
        ax.set_xlabel("i (mm)", fontsize=7)
        ax.set_ylabel("j (mm)", fontsize=7)
        ax.set_zlabel("k (mm)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def plot_metric_panels(scores: pd.DataFrame, table: ClassTable, values: Sequence[str] = ("dice", "hd95", "comp_error"),
                       by: str = "source", size: float = 3.2) -> plt.Figure:
    """Grouped bars per class, one panel per metric, one bar per ``by`` (means over cases of a scores
    table, :func:`nearfix_lib.core.scores.pivot`)."""
    keys = [k for k in table.keys if k in set(scores["class"])]
    groups = list(dict.fromkeys(scores[by]))
    width = 0.8 / max(len(groups), 1)
    fig, axes = plt.subplots(len(values), 1, figsize=(max(7, len(keys) * 0.9), len(values) * size), squeeze=False)
    for ax, value in zip(axes[:, 0], values):
        means = pivot(scores, value, by).reindex(index=keys, columns=groups)
        for g, name in enumerate(groups):
            ax.bar(np.arange(len(keys)) + g * width, means[name].to_numpy(dtype=float), width, label=str(name))
        ax.set_xticks(np.arange(len(keys)) + width * (len(groups) - 1) / 2, keys)
        ax.set_ylabel(value)
    axes[0, 0].legend(fontsize=7, ncol=max(len(groups), 1))
    fig.tight_layout()
    return fig


def browser(load: Callable[[str], tuple[dict[str, np.ndarray], np.ndarray | None]], case_ids: Sequence[str],
            table: ClassTable, preset: str | Window = "cardiac"):
    """An ipywidgets browser for JupyterLab: case, class, axis, slice and which map to overlay.

    ``load(case_id)`` returns the case's label maps (name -> map, e.g. noisy / stage2 / stage3)
    and its CT. Returns the widget (display it); the figure is redrawn on every change.
    """
    import ipywidgets as w

    cache: dict[str, tuple[dict[str, np.ndarray], np.ndarray | None]] = {}

    def get(cid: str):
        if cid not in cache:
            cache.clear()  # one case in memory at a time
            cache[cid] = load(cid)
        return cache[cid]

    maps0, _ = get(case_ids[0])
    case = w.Dropdown(options=list(case_ids), description="case")
    cls = w.Dropdown(options=table.keys, description="class")
    axis = w.ToggleButtons(options=[("i", 0), ("j", 1), ("k", 2)], value=2, description="axis")
    source = w.ToggleButtons(options=list(maps0), description="labels")
    index = w.IntSlider(min=0, max=next(iter(maps0.values())).shape[2] - 1, description="slice")
    out = w.Output()

    def centre_on_class(*_):
        maps, _img = get(case.value)
        first = next(iter(maps.values()))
        index.max = first.shape[axis.value] - 1
        index.value = class_centre(first, table, cls.value)[axis.value]

    def draw(*_):
        maps, img = get(case.value)
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(5, 5))
            _ct_panel(ax, img, axis.value, index.value, preset)
            labels = maps[source.value]
            ax.imshow(take_slice(label_rgba(labels, table, 0.5), axis.value, index.value), origin="lower",
                      interpolation="nearest")
            ax.set_title(f"case {case.value} · {source.value} · {AXIS_NAMES[axis.value]} = {index.value}", fontsize=9)
            plt.show()

    for control in (case, cls, axis):
        control.observe(centre_on_class, names="value")
    for control in (case, cls, axis, source, index):
        control.observe(draw, names="value")
    centre_on_class()
    draw()
    return w.VBox([w.HBox([case, cls]), axis, source, index, out])
