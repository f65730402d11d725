"""nearfix: repair noisy multi-class cardiac CT labels with implicit neural representations.

The package is in layers; a module imports only its own layer and the layers it points to
(``tests/test_layers.py`` parses every module and fails on a cycle, an import hidden inside a
function, or an import against these arrows)::

    stages    runs · prepare · inspection · stage1 · stage2 · stage3 · report · pipeline · cli
      |  \
      |   viz        figures · napari_viewer · view        (reads the stages' outputs from disk)
      |   |
      |   repair     cleanup · fusion · baselines
      |   |
      |   field      models · losses · sampling · train · infer · unified
      |   |
      |   |   phantom    anatomy · image · noise · dataset
      |   |   |
    core      classes · config · io · geometry · metrics · workspace

``stages`` may import every layer; ``viz`` imports ``repair``, ``field`` and ``core``; ``repair``
imports ``field`` and ``core``; ``field`` and ``phantom`` import ``core`` only; ``core`` imports
nothing above it, and ``core.config`` (every typed parameter) imports nothing of the package.
``core.workspace`` owns the run-folder layout, which is how viewers read what the stages wrote.

Axis convention, everywhere: arrays are indexed in NIfTI voxel order (i, j, k) exactly as
nibabel returns them; points are (i, j, k) voxel coordinates or world (x, y, z) mm through the
case's affine. See ``nearfix_lib.core.geometry`` for the affine chain.
"""

__version__ = "0.1.0"
