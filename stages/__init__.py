"""Pipeline stages: small functions from typed inputs to typed outputs, shared across model families."""
