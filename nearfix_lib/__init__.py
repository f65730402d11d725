"""nearfix: repair noisy multi-class cardiac CT labels with implicit neural representations.

Modules (dependencies point one way): classes/params <- io/geometry <- phantom/metrics <- viz.
Axis convention, everywhere: arrays are indexed in NIfTI voxel order (i, j, k) exactly as
nibabel returns them; points are (i, j, k) voxel coordinates or world (x, y, z) mm through the
case's affine. See ``nearfix_lib.geometry`` for the affine chain.
"""

__version__ = "0.1.0"
