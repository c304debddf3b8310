"""Shared test setup: paths, tools/ on the import path (for the PyTorch reference
model in tools/torch_gpt.py), and the Tiny Shakespeare fixture."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# XPMODEL_SHARED_DATA points elsewhere on machines without ../shared (a GPU box)
SHARED_DATA = Path(os.environ.get("XPMODEL_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "tools"))


@pytest.fixture
def tinyshakespeare():
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
