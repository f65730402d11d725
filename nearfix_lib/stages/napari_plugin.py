"""napari's way into nearfix (the npe2 manifest ``napari.yaml`` beside this module names it): the
interactive repair panel in napari's Plugins menu. Only napari imports this module (the command
line's ``nearfix edit`` docks the same panel without it)."""

import napari
from magicgui.widgets import Container

from nearfix_lib.stages.edit_panel import EditPanel


class InteractiveRepair(Container):
    """The panel as napari's Plugins menu docks it. napari reads the constructor's signature and
    passes the viewer to the parameter named ``napari_viewer``; the case is chosen in the panel."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        self.panel = EditPanel(napari_viewer)
        super().__init__(widgets=[self.panel.widget], labels=False)
