"""Implicit fields: models, losses, samplers, the one fit loop, chunked evaluation, the unified model.

Imports ``core`` only.
"""
