"""napari: a case of a run in 3-D, CT and label maps placed by the NIfTI affine (world mm).

napari (and Qt) are optional, heavy dependencies (``pip install -e .[viewer]``): they are imported
inside the functions, so the rest of ``viz`` works without them. The run's outputs are read from
disk through :mod:`nearfix_lib.core.workspace`.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.workspace import Run, case_view, open_run, repair_audit
from nearfix_lib.viz.figures import WINDOWS, Window


def napari_label_colormap(table: ClassTable):
    """The class table's colours as a napari labels colormap (background and unknown values clear)."""
    from napari.utils.colormaps import DirectLabelColormap

    colours = {c.index: np.r_[np.asarray(c.colour) / 255.0, 1.0] for c in table}
    return DirectLabelColormap(color_dict={None: np.zeros(4), 0: np.zeros(4), **colours})


def audit_note(run: Run, case_id: str) -> str:
    """The classes of a case that stage 1's audit flagged, one line each with the reason, then those
    whose boundary the CT placed (``stage1.ct_edge``), with how much of it and how clearly, those whose
    pieces the CT's lumen joined (``stage1.ct_path``) and those whose pieces ``stage1.anatomy`` parted: what the
    viewer's text overlay shows, for a user without ground truth to read before trusting the labels
    (a CT too faint shows as a small share). Empty when there is nothing to say."""
    def replaced(key: str) -> str:
        action = run.params.stage1.for_class(key).audit.action
        return "; M^ref is its input" + {"clean_input": ", cleaned",
                                         "repair_input": ", repaired without the field"}.get(action, "")

    audit = repair_audit(run, case_id)
    lines = [f"{r['class']}: repair flagged ({r['audit_reasons']})"
             + (replaced(r["class"]) if r["audit_kept_input"] else "")
             for _, r in audit[audit["audit_flagged"]].iterrows()]
    if "edge_decided" in audit.columns:
        lines += [f"{r['class']}: boundary on the CT's edge over {r['edge_decided']:.0%} of its band "
                  f"(contrast / noise {r['edge_contrast_noise']:.1f})"
                  for _, r in audit[audit["edge_decided"].notna()].iterrows()]
    if "path_joined" in audit.columns:
        lines += [f"{r['class']}: {int(r['path_joined'])} piece(s) joined along the CT's lumen "
                  f"({int(r['path_added'])} voxels)"
                  for _, r in audit[audit["path_joined"].fillna(0) > 0].iterrows()]
    if "path_dark_dropped" in audit.columns:
        lines += [f"{r['class']}: piece(s) darker than the vessel's surroundings on the CT removed "
                  f"({int(r['path_dark_dropped'])} voxels)"
                  for _, r in audit[audit["path_dark_dropped"].fillna(0) > 0].iterrows()]
    if "anatomy_enclosed_voxels" in audit.columns:
        lines += [f"{r['class']}: piece(s) enclosed by other classes' labels removed "
                  f"({int(r['anatomy_enclosed_voxels'])} voxels)"
                  for _, r in audit[audit["anatomy_enclosed_voxels"].fillna(0) > 0].iterrows()]
    split = [c for c in ("anatomy_origin_split_voxels", "anatomy_split_voxels") if c in audit.columns]
    if split:
        parted = audit[split].fillna(0).sum(axis=1)
        lines += [f"{r['class']}: pieces parted where the repair joined them over another class "
                  f"({int(parted[i])} voxels)" for i, r in audit[parted > 0].iterrows()]
    return "\n".join(lines)


def napari_overlay(run_dir, case_id: str, layout: str = "grid", show: bool = True, opacity: float = 0.6,
                   preset: str | Window = "cardiac"):
    """Open a case of a run in napari: the CT and Labels layers for the noisy, stage2 and stage3
    labels (and the truth, if any) in the class colours, all placed by the NIfTI affine (world mm).

    ``layout="grid"`` puts each labels layer over its own copy of the CT, side by side;
    ``layout="overlay"`` stacks them on one CT, to toggle with the eye icons. Classes stage 1's
    audit flagged in this case are listed in the text overlay (:func:`audit_note`). Returns the viewer.
    """
    import napari

    if layout not in ("grid", "overlay"):
        raise ValueError(f"layout must be 'grid' or 'overlay', got {layout!r}")
    run = open_run(run_dir)
    maps, image = case_view(run, str(case_id))
    case = next(c for c in run.cases if c.case_id == str(case_id))
    affine = np.asarray(nib.load(str(case.label)).affine)
    win = WINDOWS[preset] if isinstance(preset, str) else preset
    limits = (win.level - win.width / 2, win.level + win.width / 2)
    colormap = napari_label_colormap(run.table)
    viewer = napari.Viewer(title=f"nearfix · {run.dir.name} · case {case_id}", show=show)
    for name, labels in maps.items():
        if image is not None and (layout == "grid" or not viewer.layers):
            viewer.add_image(image, name=f"CT ({name})" if layout == "grid" else "CT", affine=affine,
                             colormap="gray", contrast_limits=limits)
        viewer.add_labels(labels, name=name, affine=affine, colormap=colormap, opacity=opacity)
    if layout == "grid":
        grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid  # napari >= 0.9 / older
        grid.stride = 2 if image is not None else 1
        grid.enabled = True
    note = audit_note(run, str(case_id))
    viewer.text_overlay.text = f"stage 1 audit\n{note}" if note else ""
    viewer.text_overlay.visible = bool(note)
    viewer.reset_view()
    return viewer
