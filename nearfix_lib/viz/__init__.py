"""Figures, the notebook browser and the napari viewer.

Imports ``core``, ``field`` and ``repair``; the stages' outputs are read from disk through
:mod:`nearfix_lib.core.workspace`, never by importing ``stages``.
"""
