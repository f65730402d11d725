"""Repair a case by clicking in napari: ``nearfix edit RUN CASE`` (``python -m nearfix_lib.stages.edit_panel``),
or Plugins > nearfix > Interactive repair.

The panel opens a run's case (:func:`~nearfix_lib.stages.edits.open_edit`): the CT and the case's
labels in the class colours on the world affine, and two points layers, ``positive`` and
``negative``. A point added to either, with the class chosen in the panel, is a click
(:mod:`nearfix_lib.field.refine`): the case's latent is re-fitted with the model frozen and the
window around the point is decoded again into the labels layer, in place. Undo steps back one click
exactly, Reset returns to the opened state, Save writes the edit (``<run>/edits/<case>.nii.gz`` and
``.json``, the latent beside the model) and shows the whole box decoded with the edited latent,
which is what the model alone decodes from then on.

The image and labels layers hold voxel indices placed by the NIfTI affine; the points layers hold
world millimetres (no affine), so a point's coordinates are the click's position as they stand.
napari and magicgui are optional (``pip install -e .[viewer]``) and imported when a panel is made.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from nearfix_lib.core.workspace import open_run
from nearfix_lib.field.refine import Click
from nearfix_lib.stages.edits import CaseEdit, open_edit, save_edit, source_class
from nearfix_lib.viz.figures import WINDOWS
from nearfix_lib.viz.napari_viewer import napari_label_colormap
from nearfix_lib.viz.view import NO_DISPLAY, display_available, save_screenshot

LABELS_LAYER = "labels (editing)"
SIGNS = {"positive": True, "negative": False}


class EditPanel:
    """The panel's state and its magicgui container (:attr:`widget`, what napari docks).
    ``run_dir`` and ``case_id`` pre-fill it, and open the case when both are given."""

    def __init__(self, viewer, run_dir: str = "", case_id: str = "", source: str = "auto"):
        from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton

        self.viewer = viewer
        self.edit: CaseEdit | None = None
        self._counts: dict[str, int] = {}
        self._placed: list[str] = []  # the points layer of each click, for undo
        self.run_dir = LineEdit(value=str(run_dir), label="run folder")
        self.case = LineEdit(value=str(case_id), label="case")
        self.source = LineEdit(value=source, label="model")
        # choices as a callable: napari resets a docked magicgui widget's choices whenever layers change
        self.label_class = ComboBox(choices=self._class_choices, label="class")
        self.status = Label(value="open a run and a case")
        buttons = []
        for text, action in (("Open", self.open), ("Undo", self.undo), ("Reset", self.reset), ("Save", self.save)):
            button = PushButton(text=text)
            button.changed.connect(lambda *_, action=action: action())
            buttons.append(button)
        row = Container(widgets=buttons, layout="horizontal", labels=False)
        self.widget = Container(widgets=[self.run_dir, self.case, self.source, self.label_class, row, self.status])
        if run_dir and case_id:
            self.open()

    # -- opening -------------------------------------------------------------------------------
    def open(self) -> None:
        """Open the case the fields name; replaces the layers of a case opened before."""
        run = open_run(Path(self.run_dir.value))
        self.edit = open_edit(run, self.case.value.strip(), self.source.value.strip() or "auto")
        source = self.edit.source
        self.label_class.reset_choices()
        self.label_class.value = self._class_choices()[1]
        self.viewer.layers.clear()
        affine = self.edit.affine
        if self.edit.image is not None:
            win = WINDOWS["cardiac"]
            self.viewer.add_image(self.edit.image, name="CT", affine=affine, colormap="gray",
                                  contrast_limits=(win.level - win.width / 2, win.level + win.width / 2))
        self.viewer.add_labels(self.edit.session.labels.copy(), name=LABELS_LAYER, affine=affine,
                               colormap=napari_label_colormap(run.table), opacity=0.6)
        for name, colour in (("positive", "lime"), ("negative", "red")):
            layer = self.viewer.add_points(np.zeros((0, 3)), name=name, ndim=3, size=3, face_color=colour)
            self._counts[name] = 0
            layer.events.data.connect(lambda event, name=name: self._points_changed(name, event))
        self._placed.clear()
        self.viewer.layers.selection.active = self.viewer.layers["positive"]
        self.viewer.reset_view()
        self.status.value = (f"case {self.edit.case_id} of {run.dir.name} ({source}): add points to 'positive' or "
                             "'negative' with the class chosen above")

    def _class_choices(self, *_) -> list[str]:
        """What a click can name: background and the classes of the model open."""
        if self.edit is None:
            return ["background"]
        source = self.edit.source
        return ["background", *(self.edit.run.table.keys if source == "stage3" else [source_class(source)])]

    # -- clicks --------------------------------------------------------------------------------
    @property
    def labels_layer(self):
        return self.viewer.layers[LABELS_LAYER]

    def active_label(self) -> int:
        name = self.label_class.value
        return 0 if name == "background" or self.edit is None else self.edit.run.table[name].index

    def _points_changed(self, name: str, event) -> None:
        """A points layer's data event: napari sends one before a change (``adding``, ``removing``, …)
        and one after; only points that were added are clicks, any other change is only counted."""
        action = getattr(event, "action", "added")
        action = str(getattr(action, "value", action))
        if action.endswith("ing"):
            return
        layer = self.viewer.layers[name]
        new = np.asarray(layer.data)[self._counts[name]:] if action == "added" else np.zeros((0, 3))
        self._counts[name] = len(layer.data)
        for point in new:
            self.click(Click(tuple(float(v) for v in point), self.active_label(), SIGNS[name]), placed=name)  # type: ignore[arg-type]

    def click(self, click: Click, placed: str = "") -> None:
        """One click: refine, then paste the decoded window into the labels layer."""
        if self.edit is None:
            raise RuntimeError("open a case first")
        try:
            done = self.edit.session.click(click)
        except ValueError as err:  # a click outside the model's box, a negative click on background
            self.status.value = f"click ignored: {err}"
            return
        self._placed.append(placed)
        self.labels_layer.data[done.window.slices] = done.labels
        self.labels_layer.refresh()
        self.status.value = (f"click {len(self.edit.session.clicks)}: {done.seconds:.2f} s, {done.steps} steps, "
                             f"window {done.window.shape}")

    # -- buttons -------------------------------------------------------------------------------
    def undo(self) -> None:
        if self.edit is None or not self.edit.session.undo():
            return
        self.labels_layer.data = self.edit.session.labels.copy()
        name = self._placed.pop() if self._placed else ""
        if name and len(self.viewer.layers[name].data):
            self.viewer.layers[name].data = np.asarray(self.viewer.layers[name].data)[:-1]
        self.status.value = f"undone; {len(self.edit.session.clicks)} click(s)"

    def reset(self) -> None:
        if self.edit is None:
            return
        self.edit.session.reset()
        self.labels_layer.data = self.edit.session.labels.copy()
        for name in SIGNS:
            self.viewer.layers[name].data = np.zeros((0, 3))
        self._placed.clear()
        self.status.value = "reset to the opened state"

    def save(self) -> None:
        if self.edit is None:
            return
        written = save_edit(self.edit)
        self.labels_layer.data = self.edit.session.labels.copy()
        self.status.value = f"saved {written['labels']} (the whole box decoded with the edited latent)"


def open_editor(run_dir, case_id: str, source: str = "auto", show: bool = True):
    """A napari viewer with the panel docked and the case open; returns (viewer, panel)."""
    import napari

    viewer = napari.Viewer(title=f"nearfix · edit case {case_id}", show=show)
    panel = EditPanel(viewer, str(run_dir), str(case_id), source)
    viewer.window.add_dock_widget(panel.widget, name="Interactive repair", area="right")
    return viewer, panel


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run folder, e.g. outputs/demo")
    ap.add_argument("case", help="case id, e.g. 1")
    ap.add_argument("--source", default="auto",
                    help="the model: 'stage3' (default where the run has it) or 'stage1:KEY'")
    ap.add_argument("--screenshot", default="", help="save the window to this PNG and exit")
    args = ap.parse_args(argv)
    if not display_available():
        print(NO_DISPLAY.replace("nearfix_lib.viz.view", "nearfix_lib.stages.edit_panel"), file=sys.stderr)
        return 2
    import napari

    viewer, _ = open_editor(args.run_dir, args.case, args.source)
    if args.screenshot:
        save_screenshot(viewer, args.screenshot, canvas_only=False)
        return 0
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
