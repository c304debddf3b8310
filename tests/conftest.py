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
