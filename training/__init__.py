"""Training code for the embedded default model (gen-shapes): its synthetic world, training, export and evaluation.
Not imported by the library: `assets/` holds the resulting weights, `training/` how they were made."""
