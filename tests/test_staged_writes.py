"""atomic.staged_writes: files written in the block are synced aside and put
in place only by `place`; what is not placed is removed when the block ends."""
import pytest

from xpmodel.atomic import atomic_write_bytes, staged_writes


def _entries(folder):
    return sorted(path.name for path in folder.iterdir())


def test_staged_files_land_only_when_placed_in_the_order_written(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    placed = []
    with staged_writes() as staged:
        atomic_write_bytes(tmp_path / "a", b"new a")
        atomic_write_bytes(tmp_path / "sub" / "b", b"new b")
        assert (tmp_path / "a").read_bytes() == b"old a"
        assert not (tmp_path / "sub" / "b").exists()
        staged.place(placed)
    assert placed == [tmp_path / "a", tmp_path / "sub" / "b"]
    assert (tmp_path / "a").read_bytes() == b"new a" and (tmp_path / "sub" / "b").read_bytes() == b"new b"
    assert _entries(tmp_path) == ["a", "sub"] and _entries(tmp_path / "sub") == ["b"]


def test_a_block_that_fails_before_placing_leaves_every_file_as_it_was(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    with pytest.raises(RuntimeError):
        with staged_writes():
            atomic_write_bytes(tmp_path / "a", b"new a")
            atomic_write_bytes(tmp_path / "b", b"new b")
            raise RuntimeError("the disk filled")
    assert _entries(tmp_path) == ["a"] and (tmp_path / "a").read_bytes() == b"old a"


def test_writes_after_the_block_are_placed_at_once(tmp_path):
    with staged_writes():
        pass
    atomic_write_bytes(tmp_path / "a", b"a")
    assert (tmp_path / "a").read_bytes() == b"a"
