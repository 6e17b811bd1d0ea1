"""Shared fixtures: the golden reference outputs in ../shared and a small, fast configuration."""
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "reference" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of the reference's golden outputs; tests that need it skip when ../shared is absent."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN_DIR} (../shared is absent from this checkout)")
    return GOLDEN_DIR


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def small_toy_world(tmp_path_factory) -> Path:
    """A datasets folder holding the toy world's 'small' preset (160 images), generated once per session."""
    import toy_world

    folder = tmp_path_factory.mktemp("datasets")
    toy_world.make_toy_world(folder, toy_world.PRESETS["small"], progress=False)
    return folder
