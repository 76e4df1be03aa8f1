"""Consistency checks: generated outputs against golden images, per-case metric thresholds, failure artifacts."""
