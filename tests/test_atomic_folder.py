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


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_folder_is_never_swapped_with_a_file_or_a_link(tmp_path, kind):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    out = tmp_path / "hf"
    if kind == "file":
        out.write_text("mine too")
    else:
        out.symlink_to(tmp_path)
    with pytest.raises(atomic.XpmodelError, match="exists and is not a folder"):
        write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    assert mine.read_text() == "mine" and os.path.lexists(out)
    assert (out.read_text() == "mine too") if kind == "file" else out.is_symlink()
    assert _leftovers(tmp_path) == []


def _interrupt_the_second_file(monkeypatch):
    """Make a tokenizer export stop, as a kill would, after writing one file."""
    from xpmodel.tokenizer import hf_export
    written = []

    def write(path, content):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        path.write_bytes(b"{}")
    monkeypatch.setattr(hf_export, "atomic_write_json", write)


def test_a_tokenizer_export_stopped_midway_leaves_the_old_files_or_none(tmp_path, monkeypatch):
    from xpmodel.tokenizer.bpe import BPETokenizer
    from xpmodel.tokenizer.hf_export import export_tokenizer_hf
    old, new = BPETokenizer.train("low lower lowest " * 20, 270), BPETokenizer.train("ab " * 9, 260)
    out = tmp_path / "tok"
    export_tokenizer_hf(old, out)
    before = _files(out)
    with monkeypatch.context() as patch:
        _interrupt_the_second_file(patch)
        with pytest.raises(KeyboardInterrupt):
            export_tokenizer_hf(new, out, overwrite=True)
        with pytest.raises(KeyboardInterrupt):
            export_tokenizer_hf(new, tmp_path / "fresh")
    assert _files(out) == before
    assert not os.path.lexists(tmp_path / "fresh")
    assert _leftovers(tmp_path) == []
    export_tokenizer_hf(new, out, overwrite=True)
    assert _files(out) != before and set(_files(out)) == set(before)
