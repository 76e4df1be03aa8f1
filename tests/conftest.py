"""Shared fixtures: paths of the tiny assets."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def flux_dev_path() -> Path:
    return ASSETS / "flux-tiny"


@pytest.fixture(scope="session")
def flux_schnell_path() -> Path:
    return ASSETS / "flux-schnell-tiny"
