"""folder_write.write_folder_atomically: a folder written as a whole (a Hugging
Face export) is the old one or the new one at every instant, what a killed
writer left beside it never blocks or confuses the next write, and nothing
but the folder's own files is ever removed."""
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xpmodel import folder_write
from xpmodel.errors import XpmodelError
from xpmodel.folder_write import write_folder_atomically

OWNED = frozenset({"a.json", "b.bin"})


def _writer(contents, also=None):
    def write(folder):
        for name, data in contents.items():
            (folder / name).write_bytes(data)
        if also is not None:
            also()
    return write


def _files(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _leftovers(parent):
    return sorted(name for name in os.listdir(parent) if ".tmp-" in name)


def _leftover(parent, name, files):
    """A folder as a killed writer leaves it, holding `files`."""
    folder = parent / name
    folder.mkdir()
    for file_name, data in files.items():
        (folder / file_name).write_bytes(data)
    return folder


def _exited_pid():
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _can_swap(folder):
    """Whether this system swaps two folders in one step."""
    (folder / "x").mkdir()
    (folder / "y").mkdir()
    try:
        return folder_write._exchange(folder / "x", folder / "y")
    finally:
        (folder / "x").rmdir()
        (folder / "y").rmdir()


def test_a_folder_over_an_old_one_is_never_missing(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    write_folder_atomically(out, _writer({"a.json": b"old", "b.bin": b"old"}), OWNED)
    swapped = []
    exchange = folder_write._exchange
    monkeypatch.setattr(folder_write, "_exchange", lambda a, b: swapped.append(exchange(a, b))
                        or swapped[-1])
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(folder_write.os, "rename",
                        lambda a, b: (renames.append((a, b)), real_rename(a, b)))
    write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    assert _files(out) == {"a.json": b"new"}
    assert _leftovers(tmp_path) == []
    if swapped != [True]:
        pytest.skip("renameat2's RENAME_EXCHANGE is not available here")
    assert renames == []            # one swap: no instant without `out` in place


def test_a_file_put_in_the_old_folder_meanwhile_is_kept(tmp_path):
    out = tmp_path / "hf"
    write_folder_atomically(out, _writer({"a.json": b"old"}), OWNED)

    def user_adds_files():
        (out / "README.md").write_text("mine")
        (out / "sub").mkdir()
        (out / "sub" / "x").write_text("mine too")
    write_folder_atomically(out, _writer({"a.json": b"new"}, also=user_adds_files), OWNED)
    assert _files(out) == {"a.json": b"new"}
    [kept] = _leftovers(tmp_path)           # the old folder, set aside with the user's files
    assert (tmp_path / kept / "README.md").read_text() == "mine"
    assert (tmp_path / kept / "sub" / "x").read_text() == "mine too"


def test_without_an_atomic_swap_a_kill_between_the_renames_is_undone_by_the_next_write(
        tmp_path, monkeypatch):
    out = tmp_path / "hf"
    write_folder_atomically(out, _writer({"a.json": b"old"}), OWNED)
    monkeypatch.setattr(folder_write, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def interrupted_moving_the_new_folder_in(a, b):
        if Path(b) == out and Path(a).name == f".hf.tmp-{os.getpid()}":    # the new folder
            raise KeyboardInterrupt
        real_rename(a, b)
    monkeypatch.setattr(folder_write.os, "rename", interrupted_moving_the_new_folder_in)
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    monkeypatch.setattr(folder_write.os, "rename", real_rename)
    assert _files(out) == {"a.json": b"old"}     # put back
    # a kill -9 runs no handler: the old folder stays set aside, the new one half made
    pid = _exited_pid()
    os.rename(out, tmp_path / f".hf.tmp-{pid}.old")
    _leftover(tmp_path, f".hf.tmp-{pid}", {"b.bin": b"half", f".a.json.tmp-{pid}": b"{"})
    write_folder_atomically(out, _writer({"a.json": b"newer"}), OWNED)
    assert _files(out) == {"a.json": b"newer"}
    assert _leftovers(tmp_path) == []


def test_a_leftover_under_this_process_id_is_cleared(tmp_path):
    """Every first process of a new container has the same id: a killed
    export's folder is in the way of the next one under the same name."""
    out = tmp_path / "hf"
    _leftover(tmp_path, f".hf.tmp-{os.getpid()}",
              {"b.bin": b"a killed export's weights", f".a.json.tmp-{os.getpid()}": b"{"})
    write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    assert _files(out) == {"a.json": b"new"}
    assert _leftovers(tmp_path) == []


def test_leftovers_that_may_not_be_a_killed_writers_are_kept(tmp_path):
    out = tmp_path / "hf"
    live = _leftover(tmp_path, ".hf.tmp-7", {"b.bin": b"being written"})
    foreign = _leftover(tmp_path, ".hf.tmp-8", {"notes.txt": b"mine"})    # no export writes it
    other = _leftover(tmp_path, ".other.tmp-9", {"b.bin": b"another folder's"})
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)         # as a live writer holds its folder
    try:
        write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    finally:
        os.close(held)
    assert _files(live) == {"b.bin": b"being written"}
    assert _files(foreign) == {"notes.txt": b"mine"} and other.is_dir()


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_folder_is_never_swapped_with_a_file_or_a_link(tmp_path, kind):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    out = tmp_path / "hf"
    if kind == "file":
        out.write_text("mine too")
    else:
        out.symlink_to(tmp_path)
    with pytest.raises(XpmodelError, match="exists and is not a folder"):
        write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    assert mine.read_text() == "mine" and os.path.lexists(out)
    assert (out.read_text() == "mine too") if kind == "file" else out.is_symlink()
    assert _leftovers(tmp_path) == []


def test_a_tokenizer_export_stopped_midway_leaves_no_new_folder(tmp_path, monkeypatch):
    from xpmodel.tokenizer import hf_export
    from xpmodel.tokenizer.bpe import BPETokenizer
    written, json_bytes = [], hf_export.json_bytes

    def stopped_at_the_second_file(content):
        if written:
            raise KeyboardInterrupt
        written.append(content)
        return json_bytes(content)
    monkeypatch.setattr(hf_export, "json_bytes", stopped_at_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        hf_export.export_tokenizer_hf(BPETokenizer.train("ab " * 9, 260), tmp_path / "fresh")
    assert not os.path.lexists(tmp_path / "fresh") and _leftovers(tmp_path) == []


def test_a_tokenizer_export_into_an_existing_folder_keeps_it_and_its_files(tmp_path):
    from xpmodel.tokenizer.bpe import BPETokenizer
    from xpmodel.tokenizer.hf_export import export_tokenizer_hf
    folder = tmp_path / "tok"
    folder.mkdir(mode=0o750)
    (folder / "README.md").write_text("mine")
    identity = os.stat(folder)
    export_tokenizer_hf(BPETokenizer.train("ab " * 9, 260), folder)
    after = os.stat(folder)
    assert (after.st_ino, after.st_mode) == (identity.st_ino, identity.st_mode)
    assert (folder / "README.md").read_text() == "mine" and (folder / "tokenizer.json").is_file()


def test_a_killed_write_to_a_folder_named_like_a_set_aside_one_is_not_put_in_place(tmp_path):
    """`.hf.old.tmp-PID` is a killed write to hf.old, not hf's old folder."""
    pid = _exited_pid()
    other = _leftover(tmp_path, f".hf.old.tmp-{pid}", {"a.json": b"a killed write to hf.old"})
    write_folder_atomically(tmp_path / "hf", _writer({"a.json": b"new"}), OWNED)
    assert _files(tmp_path / "hf") == {"a.json": b"new"}
    assert _files(other) == {"a.json": b"a killed write to hf.old"}     # hf.old's to clear


def test_a_set_aside_old_folder_comes_back_and_one_with_the_users_files_stops_the_write(
        tmp_path):
    out = tmp_path / "hf"
    pid = _exited_pid()
    _leftover(tmp_path, f".hf.tmp-{pid}.old", {"a.json": b"old"})
    write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)     # an export's only
    assert _files(out) == {"a.json": b"new"} and _leftovers(tmp_path) == []
    shutil.rmtree(out)
    _leftover(tmp_path, f".hf.tmp-{pid}.old", {"a.json": b"old", "README.md": b"mine"})
    with pytest.raises(XpmodelError, match="put back as it was before an interrupted write.*"
                                           r"\(README\.md\): check them, then run again"):
        write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    assert _files(out) == {"a.json": b"old", "README.md": b"mine"} and _leftovers(tmp_path) == []


@pytest.mark.parametrize("swap", [True, False])
def test_interrupted_right_after_the_new_folder_is_in_place_nothing_of_the_users_is_lost(
        tmp_path, monkeypatch, swap):
    out = tmp_path / "hf"
    write_folder_atomically(out, _writer({"a.json": b"old"}), OWNED)
    (out / "README.md").write_text("mine")
    if not swap:
        monkeypatch.setattr(folder_write, "_exchange", lambda a, b: False)
    elif not _can_swap(tmp_path):
        pytest.skip("renameat2's RENAME_EXCHANGE is not available here")

    def interrupted(folder):
        raise KeyboardInterrupt
    monkeypatch.setattr(folder_write, "fsync_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(out, _writer({"a.json": b"new"}), OWNED)
    assert _files(out) == {"a.json": b"new"}
    [kept] = _leftovers(tmp_path)         # the old folder, with the user's file and nothing else
    assert _files(tmp_path / kept) == {"README.md": b"mine"}


def test_a_leftover_holding_a_users_file_in_the_writers_way_is_named(tmp_path):
    _leftover(tmp_path, f".hf.tmp-{os.getpid()}", {"a.json": b"half", "notes.txt": b"mine"})
    with pytest.raises(XpmodelError, match=rf"\.hf\.tmp-{os.getpid()}: an interrupted write left "
                                           r"this folder, holding files it does not write "
                                           r"\(notes\.txt\); move them out"):
        write_folder_atomically(tmp_path / "hf", _writer({"a.json": b"new"}), OWNED)
    assert _files(tmp_path / f".hf.tmp-{os.getpid()}")["notes.txt"] == b"mine"


def test_a_name_with_a_line_break_is_no_temporary():
    from xpmodel.atomic import temporary_target
    assert temporary_target(".out.json.tmp-123") == ("out.json", 123)
    assert temporary_target(".out.json.tmp-123\n") is None


def test_a_writer_whose_new_folder_another_process_holds_stops(tmp_path, monkeypatch):
    held = []
    real_mkdir = Path.mkdir

    def made_then_taken(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self.name.startswith(".hf.tmp-"):
            fd = os.open(self, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)      # as another writer clearing leftovers would
            held.append(fd)
    monkeypatch.setattr(Path, "mkdir", made_then_taken)
    try:
        with pytest.raises(XpmodelError, match="another process is writing beside it"):
            write_folder_atomically(tmp_path / "hf", _writer({"a.json": b"new"}), OWNED)
    finally:
        for fd in held:
            os.close(fd)
    assert not os.path.lexists(tmp_path / "hf")
