"""Run under xvfb-run by tests/test_refine.py: the edit widget in a real napari viewer.

    python tests/napari_edit_child.py RUN_DIR CASE I J K SHOT.png

Opens the case with the widget docked, adds a point at voxel (I, J, K) to the 'positive' points
layer with the widget's class set to LV (what a user's click does), checks that the labels layer
changed there, undoes, checks it is back, clicks again, saves, checks that the layer shows the saved
map, and writes a screenshot of the window. Exit 0 and one line 'ok …' on success.
"""

import sys

import numpy as np
from qtpy.QtWidgets import QApplication

from nearfix_lib.core.geometry import apply_affine
from nearfix_lib.stages.edit_panel import LABELS_LAYER, open_editor


def main(run_dir: str, case: str, i: str, j: str, k: str, shot: str) -> int:
    viewer, widget = open_editor(run_dir, case)
    voxel = np.array([[int(i), int(j), int(k)]], float)
    layer = viewer.layers[LABELS_LAYER]
    before = np.asarray(layer.data).copy()
    widget.label_class.value = "LV"
    point = apply_affine(widget.edit.affine, voxel)
    viewer.layers["positive"].add(point)  # what clicking with the points tool does
    QApplication.processEvents()
    after = np.asarray(layer.data)
    lv = widget.edit.run.table["LV"].index
    assert before[tuple(voxel[0].astype(int))] != lv and after[tuple(voxel[0].astype(int))] == lv, "no change"
    changed = int((after != before).sum())
    assert len(widget.edit.session.clicks) == 1, f"{len(widget.edit.session.clicks)} clicks from one point"
    widget.undo()
    assert np.array_equal(np.asarray(layer.data), before), f"undo: {(np.asarray(layer.data) != before).sum()} differ"
    assert len(viewer.layers["positive"].data) == 0, f"undo: {len(viewer.layers['positive'].data)} point(s) left"
    viewer.layers["positive"].add(point)
    widget.save()
    saved = widget.edit.labels_path
    import nibabel as nib

    assert np.array_equal(np.asarray(nib.load(str(saved)).dataobj), np.asarray(layer.data)), "save"
    dock, plugin_panel = viewer.window.add_plugin_dock_widget("nearfix", "Interactive repair")  # the Plugins menu
    assert plugin_panel is not None, "the npe2 manifest's panel did not open"
    viewer.window.remove_dock_widget(dock)
    viewer.window.resize(1400, 1000)
    QApplication.processEvents()
    viewer.screenshot(shot, canvas_only=False, flash=False)
    viewer.close()
    print(f"ok: {changed} voxels changed by the click; saved {saved.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
