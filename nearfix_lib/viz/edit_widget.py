"""napari: repair a case by clicking (a dock widget, also in napari's Plugins menu as "Interactive repair").

Open a run and a case: the CT and the case's labels in the class colours on the world affine, and two
points layers, ``positive`` and ``negative``. A point added to either (with the class chosen in the
widget) is a click (:mod:`nearfix_lib.field.refine`): the case's latent is re-fitted with the model
frozen and the window around the point is decoded again into the labels layer, in place. Undo steps
back one click exactly, Reset returns to the opened state, Save writes the edit
(:func:`nearfix_lib.stages.edits.save_edit`: ``<run>/edits/<case>.nii.gz`` and ``.json``, the latent
beside the model) and shows the whole box decoded with the edited latent, which is what the model
alone decodes from then on.

The layers hold data in voxel indices placed by the NIfTI affine; the points layers hold world
millimetres (no affine), so a point's coordinates are the click's position as they stand.
"""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from nearfix_lib.core.workspace import open_run
from nearfix_lib.field.refine import Click
from nearfix_lib.stages.edits import CaseEdit, edit_sources, open_edit, save_edit
from nearfix_lib.viz.figures import WINDOWS
from nearfix_lib.viz.napari_viewer import napari_label_colormap

LABELS_LAYER = "labels (editing)"
SIGNS = {"positive": True, "negative": False}


class EditWidget(QWidget):
    """The dock widget. ``run_dir`` and ``case_id`` pre-fill it (and open the case when both are given)."""

    def __init__(self, viewer: napari.viewer.Viewer, run_dir: str = "", case_id: str = "", source: str = "auto"):
        super().__init__()
        self.viewer = viewer
        self.edit: CaseEdit | None = None
        self._counts: dict[str, int] = {}
        self._placed: list[str] = []  # the points layer of each click, for undo
        self.run_dir = QLineEdit(str(run_dir))
        self.case = QLineEdit(str(case_id))
        self.source = QLineEdit(source)
        self.label_class = QComboBox()
        self.status = QLabel("open a run and a case")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("run folder", self.run_dir)
        form.addRow("case", self.case)
        form.addRow("model", self.source)
        form.addRow("class", self.label_class)
        buttons = QHBoxLayout()
        for text, slot in (("Open", self.open), ("Undo", self.undo), ("Reset", self.reset), ("Save", self.save)):
            button = QPushButton(text)
            button.clicked.connect(slot)
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        if run_dir and case_id:
            self.open()

    # -- opening -------------------------------------------------------------------------------
    def open(self) -> None:
        """Open the case the fields name; replaces the layers of a case opened before."""
        run = open_run(Path(self.run_dir.text()))
        source = self.source.text().strip() or "auto"
        if source == "auto":
            sources = edit_sources(run)
            source = sources[0] if sources else "stage3"
        self.edit = open_edit(run, self.case.text().strip(), source)
        classes = run.table.keys if source == "stage3" else [source.split(":", 1)[1]]
        self.label_class.clear()
        self.label_class.addItems(["background", *classes])
        self.label_class.setCurrentIndex(1)
        for name in [layer.name for layer in self.viewer.layers]:
            self.viewer.layers.remove(name)
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
        self.status.setText(f"case {self.edit.case_id} of {run.dir.name} ({source}): add points to 'positive' or "
                            "'negative' with the class chosen above")

    # -- clicks --------------------------------------------------------------------------------
    @property
    def labels_layer(self):
        return self.viewer.layers[LABELS_LAYER]

    def active_label(self) -> int:
        name = self.label_class.currentText()
        return 0 if name == "background" or self.edit is None else self.edit.run.table[name].index

    def _points_changed(self, name: str, event) -> None:
        """A points layer's data event: napari sends one before a change (``adding``, ``changing``, …)
        and one after; only points that were added are clicks, and any other change is counted."""
        action = str(getattr(getattr(event, "action", "added"), "value", getattr(event, "action", "added")))
        if action.endswith("ing"):
            return
        layer = self.viewer.layers[name]
        if action != "added":
            self._counts[name] = len(layer.data)
            return
        new = np.asarray(layer.data)[self._counts[name]:]
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
            self.status.setText(f"click ignored: {err}")
            return
        self._placed.append(placed)
        self.labels_layer.data[done.window.slices] = done.labels
        self.labels_layer.refresh()
        self.status.setText(f"click {len(self.edit.session.clicks)}: {done.seconds:.2f} s, {done.steps} steps, "
                            f"window {done.window.shape}")

    def _remove_last_point(self) -> None:
        name = self._placed.pop() if self._placed else ""
        if name and len(self.viewer.layers[name].data):
            layer = self.viewer.layers[name]
            layer.data = np.asarray(layer.data)[:-1]

    # -- buttons -------------------------------------------------------------------------------
    def undo(self) -> None:
        if self.edit is not None and self.edit.session.undo():
            self.labels_layer.data = self.edit.session.labels.copy()
            self._remove_last_point()
            self.status.setText(f"undone; {len(self.edit.session.clicks)} click(s)")

    def reset(self) -> None:
        if self.edit is None:
            return
        self.edit.session.reset()
        self.labels_layer.data = self.edit.session.labels.copy()
        for name in SIGNS:
            self.viewer.layers[name].data = np.zeros((0, 3))
        self._placed.clear()
        self.status.setText("reset to the opened state")

    def save(self) -> None:
        if self.edit is None:
            return
        written = save_edit(self.edit)
        self.labels_layer.data = self.edit.session.labels.copy()
        self.status.setText(f"saved {written['labels']} (the whole box decoded with the edited latent)")


def open_editor(run_dir, case_id: str, source: str = "auto", show: bool = True) -> tuple[napari.Viewer, EditWidget]:
    """A viewer with the widget docked and the case open (``nearfix view RUN CASE --edit``)."""
    viewer = napari.Viewer(title=f"nearfix · edit case {case_id}", show=show)
    widget = EditWidget(viewer, str(run_dir), str(case_id), source)
    viewer.window.add_dock_widget(widget, name="Interactive repair", area="right")
    return viewer, widget
