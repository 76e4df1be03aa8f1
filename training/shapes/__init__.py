"""The synthetic shapes world, its training scripts and its evaluation (the trained default model in assets/gen-shapes)."""
