"""Shared test fixtures: paths, the PyTorch reference, backends to run on."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tools"))


def available_devices():
    """cpu always; cuda only where CuPy sees a GPU."""
    from xpmodel.backend import cuda_available
    return ["cpu"] + (["cuda"] if cuda_available() else [])


@pytest.fixture
def tinyshakespeare():
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
