"""Classical label repair: per-class clean-up, priority fusion with anatomical rules, baselines.

Imports ``core`` and ``field``.
"""
