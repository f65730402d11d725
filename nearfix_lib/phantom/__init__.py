"""The synthetic cardiac CT data set: anatomy, CT intensities, label noise, data-set writer.

Imports ``core`` only. ``python -m nearfix_lib.phantom OUT`` writes a data root.
"""
