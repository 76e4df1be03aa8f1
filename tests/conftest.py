"""Shared fixtures: paths of the tiny assets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"

# two cores: one torch thread per pytest-xdist worker (the README runs two), both for a single process
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def flux_dev_path() -> Path:
    return ASSETS / "flux-tiny"


@pytest.fixture(scope="session")
def flux_schnell_path() -> Path:
    return ASSETS / "flux-schnell-tiny"
