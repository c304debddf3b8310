"""write_folder_atomically: a folder written as a whole (a Hugging Face export)
is the old one or the new one at every instant, and what a killed writer left
beside it never blocks or confuses the next write."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xpmodel import atomic
from xpmodel.atomic import write_folder_atomically

OWNED = frozenset({"a.json", "b.bin"})


def _writer(contents):
    def write(folder):
        for name, data in contents.items():
            (folder / name).write_bytes(data)
    return write


def _files(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _leftovers(parent):
    return sorted(name for name in os.listdir(parent) if ".tmp-" in name)


def _dead_pid():
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_folder_over_an_old_one_is_swapped_in_one_step(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    write_folder_atomically(out, _writer({"a.json": b"old", "b.bin": b"old"}), OWNED)
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b)))
    write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    assert _files(out) == {"a.json": b"new"}
    assert renames == []            # no instant without `out` in place
    assert _leftovers(tmp_path) == []


def test_without_an_atomic_swap_a_kill_between_the_renames_is_undone_by_the_next_write(
        tmp_path, monkeypatch):
    out = tmp_path / "hf"
    write_folder_atomically(out, _writer({"a.json": b"old"}), OWNED)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def interrupted_moving_the_new_folder_in(a, b):
        if Path(b) == out and os.path.isdir(f"{a}.old"):
            raise KeyboardInterrupt
        real_rename(a, b)
    monkeypatch.setattr(atomic.os, "rename", interrupted_moving_the_new_folder_in)
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert _files(out) == {"a.json": b"old"}     # put back
    # a kill -9 runs no handler: the old folder stays set aside under the dead writer's id
    pid = _dead_pid()
    os.rename(out, tmp_path / f".hf.tmp-{pid}.old")
    (tmp_path / f".hf.tmp-{pid}").mkdir()
    (tmp_path / f".hf.tmp-{pid}" / "b.bin").write_bytes(b"half")
    write_folder_atomically(out, _writer({"a.json": b"newer"}), OWNED)
    assert _files(out) == {"a.json": b"newer"}
    assert _leftovers(tmp_path) == []


def test_a_leftover_of_a_process_with_this_process_id_is_cleared(tmp_path):
    """Every first process of a new container has the same id: a staging
    folder of a killed one is in the way of the next under the same name."""
    out = tmp_path / "hf"
    staging = tmp_path / f".hf.tmp-{os.getpid()}"
    staging.mkdir()
    (staging / "b.bin").write_bytes(b"a killed export's weights")
    write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    assert _files(out) == {"a.json": b"new"}
    assert _leftovers(tmp_path) == []


def test_leftovers_that_may_not_be_a_killed_writers_are_kept(tmp_path):
    out = tmp_path / "hf"
    alive = tmp_path / f".hf.tmp-{os.getppid()}"          # a live writer's
    alive.mkdir()
    foreign = tmp_path / f".hf.tmp-{_dead_pid()}"          # holds a file no export writes
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    other = tmp_path / f".other.tmp-{_dead_pid()}"         # another folder's
    other.mkdir()
    write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    assert alive.is_dir() and (foreign / "notes.txt").read_text() == "mine" and other.is_dir()
