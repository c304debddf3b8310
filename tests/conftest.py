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


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """XPMODEL_CACHE in the test's own folder, so no token file or tokenizer is
    shared with another test."""
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus(tmp_path):
    """A small generated text corpus (400 lines) for tiny training runs."""
    from cli_helpers import write_corpus
    return write_corpus(tmp_path / "corpus.txt", lines=400)


@pytest.fixture(params=["cpu", "cuda", "emulated-cuda"])
def device(request):
    """A device string; "emulated-cuda" is the CUDA path on the CPU emulator of
    tests/cuda_emulator (xpmodel sees a GPU, its kernels run as CPU fibers)."""
    from xpmodel.backend import cuda_available
    if request.param == "cuda" and not cuda_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    if request.param != "emulated-cuda":
        yield request.param
        return
    import cuda_emulator
    with cuda_emulator.emulated_cuda_or_skip():
        yield "cuda"


@pytest.fixture(params=["gpu", "emulated"])
def cp(request):
    """The array module the kernels run on: CuPy, or the CPU emulator standing in for it."""
    from xpmodel.backend import cuda_available
    if request.param == "gpu":
        if not cuda_available():
            pytest.skip("needs CuPy and a CUDA GPU")
        import cupy
        yield cupy
    else:
        import cuda_emulator
        with cuda_emulator.emulated_cuda_or_skip() as module:
            yield module
