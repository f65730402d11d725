"""The bottom layer: class table, typed params, io, geometry, metrics, the run-folder layout.

Imports nothing of the package above ``core``; ``core.config`` imports nothing of the package at all.
"""
