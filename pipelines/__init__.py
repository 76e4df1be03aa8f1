"""Pipelines, one file per model family: defaults, the list of stages, and the family-specific bits."""
