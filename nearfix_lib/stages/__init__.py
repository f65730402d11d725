"""The pipeline's steps on a run folder: runs, prepare, inspection, stage 1-3, report, pipeline, CLI.

May import every other layer.
"""
