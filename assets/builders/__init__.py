"""Builders of the tiny random-weight checkpoints, one module per model family."""
