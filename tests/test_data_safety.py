"""The data pipeline refusing or repairing what would otherwise go wrong
quietly or slowly: damaged token files (checksums), a whole-file read of one
huge line for BPE training, invalid UTF-8 reported at once, leftover
temporary files of killed prepares, an unusable cache folder, symlinked
folders in a corpus."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from xpmodel.data import prepare, read_sidecar, read_token_file
from xpmodel.data.tokenfile import HEADER_BYTES, check_token_checksum
from xpmodel.errors import DataError
from xpmodel.tokenizer.bpe import BPETokenizer


@pytest.fixture
def byte_tokenizer():
    return BPETokenizer()


def corpus_file(tmp_path, text="the quick brown fox jumps over the lazy dog\n" * 2000):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def zero_ids(path, offset=HEADER_BYTES + 1000, length=20_000):
    """Overwrite ids in place with zeros: in range, same size."""
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(b"\0" * length)


# ---- checksums of the token ids ----------------------------------------------------------

def test_a_token_file_records_the_checksum_of_its_ids(tmp_path, byte_tokenizer):
    path = prepare(corpus_file(tmp_path), byte_tokenizer, cache_dir=tmp_path / "cache")
    assert len(read_sidecar(path)["ids_sha256"]) == 64
    assert check_token_checksum(path) is True
    zero_ids(path)
    assert check_token_checksum(path) is False
    with pytest.raises(DataError, match="do not match the checksum"):
        read_token_file(path, verify_checksum=True)


def test_a_damaged_cache_entry_is_rebuilt_with_a_note(tmp_path, byte_tokenizer, capsys):
    source = corpus_file(tmp_path)
    path = prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache")
    good = np.array(read_token_file(path))
    zero_ids(path)
    assert prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache") == path
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not match their checksum; rebuilding" in err
    assert np.array_equal(read_token_file(path), good)
    prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache")     # now current: no note
    assert capsys.readouterr().err == ""


def test_a_cache_entry_without_a_checksum_is_rebuilt(tmp_path, byte_tokenizer):
    source = corpus_file(tmp_path)
    path = prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache")
    sidecar = read_sidecar(path)
    del sidecar["ids_sha256"]
    Path(f"{path}.json").write_text(json.dumps(sidecar))
    before = os.stat(path).st_ino
    prepare(source, byte_tokenizer, cache_dir=tmp_path / "cache")
    assert os.stat(path).st_ino != before and "ids_sha256" in read_sidecar(path)


def test_a_damaged_user_token_file_is_an_error_and_kept(tmp_path, byte_tokenizer):
    source = corpus_file(tmp_path)
    out = tmp_path / "mine.tok"
    prepare(source, byte_tokenizer, out_path=out)
    zero_ids(out)
    damaged = out.read_bytes()
    with pytest.raises(DataError, match="mine.tok: the token ids do not match the checksum"):
        prepare(source, byte_tokenizer, out_path=out)
    assert out.read_bytes() == damaged
    sidecar = read_sidecar(out)                 # without a checksum: accepted as before
    del sidecar["ids_sha256"]
    Path(f"{out}.json").write_text(json.dumps(sidecar))
    assert prepare(source, byte_tokenizer, out_path=out) == out
    assert out.read_bytes() == damaged


def test_train_rebuilds_a_damaged_cached_token_file(tmp_path, monkeypatch, capsys):
    from cli_helpers import run_cli, write_corpus
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt", lines=400)
    tiny = Path(__file__).parent / "tiny-run.yaml"
    args = ["train", "--config", tiny, f"data.source={corpus}", "train.max_iters=1",
            "train.warmup_iters=0", "train.eval_interval=1", "train.save_interval=1"]
    assert run_cli(capsys, *args, "--out", tmp_path / "a")[0] == 0
    [token_file] = (tmp_path / "cache" / "tokens").glob("*.tok")
    zero_ids(token_file)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "b")
    assert code == 0 and "rebuilding" in err
    assert check_token_checksum(token_file) is True


# ---- bounded reading ---------------------------------------------------------------------

def test_bpe_training_text_stops_at_its_budget_inside_one_huge_line(tmp_path):
    import xpmodel.data.corpus as corpus
    from xpmodel.data import iter_text_pieces
    path = tmp_path / "one-line.txt"
    path.write_bytes(b"word " * (2 << 20))            # 10 MiB, no newline: one document
    pulled = []

    def counting(source):
        for piece in iter_text_pieces(source):
            pulled.append(len(piece.text))
            yield piece
    texts = list(corpus._leading_texts(counting(str(path)), 300_000))
    assert sum(map(len, texts)) == 300_000 and len(texts) == 1
    assert sum(pulled) < 2 << 20                       # a piece or so, not the whole file


def test_budget_keeps_documents_whole_until_it_runs_out(tmp_path):
    from xpmodel.data import iter_text_pieces
    from xpmodel.data.corpus import _leading_texts
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in "abc":
        (folder / f"{name}.txt").write_text(name * 100)
    assert list(_leading_texts(iter_text_pieces(str(folder)), 250)) == ["a" * 100, "b" * 100, "c" * 50]


@pytest.mark.parametrize("content, offset", [
    (b"\x80" * (8 << 20), 0),                          # only continuation bytes
    (b"ab " * (1 << 20) + b"\x80" * (4 << 20), 3 << 20),
    (b"ab " * (1 << 20) + b"\xe2\x82" + b"b" * 100, 3 << 20),  # a character cut short
])
def test_invalid_utf8_without_newlines_is_reported_at_once_with_its_offset(tmp_path, byte_tokenizer,
                                                                           content, offset):
    import time
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    started = time.time()
    with pytest.raises(DataError, match=f"decoding failed at byte offset {offset}\\)"):
        prepare(path, byte_tokenizer, cache_dir=tmp_path / "cache", workers=1)
    assert time.time() - started < 10
    assert not list((tmp_path / "cache").glob("*.tok"))


def test_a_four_byte_character_at_a_window_edge_is_kept_whole(tmp_path):
    from xpmodel.data import iter_text_pieces
    path = tmp_path / "emoji.txt"
    text = "x" * 1021 + "\U0001F600" * 300                  # no newline; windows of 1024 bytes
    path.write_text(text, encoding="utf-8")
    assert "".join(p.text for p in iter_text_pieces(str(path), 1024)) == text


# ---- leftovers of killed prepares --------------------------------------------------------

def dead_pid():
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_dead_prepares_are_removed_from_the_cache_only(tmp_path, byte_tokenizer):
    cache = tmp_path / "cache"
    cache.mkdir()
    old = 1_000_000_000          # mtime long ago
    import subprocess
    import sys
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead, alive = dead_pid(), living.pid
    names = {f".corpus.txt-{'a' * 24}.tok.tmp-{dead}": False,        # ours, writer gone
             f".corpus.txt-{'a' * 24}.tok.json.tmp-{dead}": False,
             f".corpus.txt-{'b' * 24}.tok.tmp-{alive}": True,        # writer alive
             f".notes.txt.tmp-{dead}": True,                          # not our name
             f"corpus.txt-{'a' * 24}.tok.tmp-{dead}": True,           # not a temporary
             # this process's id, no write of it under way: an earlier process's
             f".corpus.txt-{'d' * 24}.tok.tmp-{os.getpid()}": False}
    for name in names:
        (cache / name).write_bytes(b"partial")
        os.utime(cache / name, (old, old))
    fresh = cache / f".corpus.txt-{'c' * 24}.tok.tmp-{dead}"          # may be another host's
    fresh.write_bytes(b"partial")
    names[fresh.name] = True
    try:
        prepare(corpus_file(tmp_path), byte_tokenizer, cache_dir=cache)
    finally:
        living.kill()
        living.wait()
    assert {name: (cache / name).exists() for name in names} == names
    user_folder = tmp_path / "mine"                                   # out_path: not the cache
    user_folder.mkdir()
    leftover = user_folder / f".x-{'a' * 24}.tok.tmp-{dead}"
    leftover.write_bytes(b"partial")
    os.utime(leftover, (old, old))
    prepare(corpus_file(tmp_path), byte_tokenizer, out_path=user_folder / "x.tok")
    assert leftover.exists()


# ---- the cache folder --------------------------------------------------------------------

@pytest.mark.parametrize("where, named", [("env", "XPMODEL_CACHE="), ("key", "data.cache_dir=")])
def test_an_unusable_cache_folder_is_named_before_any_work(tmp_path, monkeypatch, capsys, where,
                                                          named):
    from cli_helpers import assert_one_line_error, run_cli, write_corpus
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    args = ["train", "--config", Path(__file__).parent / "tiny-run.yaml", "--out", tmp_path / "run",
            f"data.source={corpus}", "data.tokenizer=bpe", "data.vocab_size=300"]
    if where == "env":
        monkeypatch.setenv("XPMODEL_CACHE", str(afile / "below"))
    else:
        monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
        args.append(f"data.cache_dir={afile}")
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err)
    assert named in err and f"{afile} is not a folder" in err
    assert "training" not in out and not (tmp_path / "run").exists()
    assert afile.read_text() == "not a folder"
    monkeypatch.chdir(tmp_path)                  # no --out, and the config's folder is taken
    (tmp_path / "runs" / "tiny-run").mkdir(parents=True)
    code, out, err = run_cli(capsys, *args[:3], *args[5:])
    assert code == 2 and named in err
    assert "this run goes to" not in out and sorted(os.listdir(tmp_path / "runs")) == ["tiny-run"]


# ---- links in a folder corpus ------------------------------------------------------------

def test_folders_and_globs_follow_linked_folders_once_and_say_what_they_skipped(tmp_path, capsys):
    from xpmodel.data import resolve_source
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    (corpus / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (corpus / "a.txt").write_text("a")
    (corpus / "sub" / "s.txt").write_text("s")
    (elsewhere / "r.txt").write_text("r")
    (corpus / "linked").symlink_to(elsewhere)
    (corpus / "again").symlink_to(elsewhere)                 # a second way into the same folder
    (corpus / "sub" / "loop").symlink_to(corpus)             # a loop
    (corpus / "sub" / "up").symlink_to(tmp_path)             # a loop through a folder above
    (tmp_path / "beside.txt").write_text("not the corpus's")
    (corpus / "z.txt").symlink_to(corpus / "a.txt")          # a second way to a file
    os.link(corpus / "sub" / "s.txt", corpus / "sub" / "t.txt")   # and a hard link
    (corpus / "gone.txt").symlink_to(tmp_path / "missing.txt")
    names = {"a.txt", "again/r.txt", "sub/s.txt"}            # read through the first name
    folder = resolve_source(str(corpus))
    assert {folder.document_name(p) for p in folder.files} == names
    glob = resolve_source(f"{corpus}/**/*.txt")
    assert {p.relative_to(corpus).as_posix() for p in glob.files} == names
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("a link that points nowhere (gone.txt)" in line and
                                 "a folder reached again through a link (linked)" in line and
                                 "2 links back to the walk's folder or above it (sub/loop, sub/up)"
                                 in line and "2 files reached again through links (sub/t.txt, "
                                 "z.txt)" in line for line in err), err
    resolve_source(str(corpus))
    assert capsys.readouterr().err == ""                      # once per process
    resolve_source(os.path.relpath(corpus))                   # however it is spelled
    assert capsys.readouterr().err == ""


def test_a_file_name_that_is_not_utf8_is_read_and_fingerprinted(tmp_path):
    from xpmodel.data import resolve_source
    from xpmodel.data.sources import corpus_fingerprint
    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/x\xff.txt", "wb") as f:
        f.write(b"hello\n" * 50)
    source = resolve_source(str(folder))
    assert len(source.files) == 1 and len(corpus_fingerprint(source)) == 64


@pytest.mark.parametrize("make, kind", [(os.mkfifo, "a FIFO"),
                                         (None, "a character device")])
def test_a_corpus_spec_that_is_no_file_or_folder_says_what_it_is(tmp_path, make, kind):
    from xpmodel.data import resolve_source
    spec = tmp_path / "special"
    if make is None:
        spec.symlink_to(os.devnull)                           # what the link points to is told
    else:
        make(spec)
    with pytest.raises(DataError, match=f"special: is {kind}, not a text file or folder$"):
        resolve_source(str(spec))


# ---- globs with many `**` ----------------------------------------------------------------

def test_a_glob_of_many_double_stars_matches_in_steps_linear_in_them(tmp_path, monkeypatch):
    # Trying every way 30 `**` could share 13 folders is about 10^11 paths;
    # read as states, each name is one step per part.
    from xpmodel.data import resolve_source, sources
    folder = tmp_path / "deep"
    for depth in range(1, 14):
        folder = folder / f"d{depth}"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (tmp_path / "deep" / "b.txt").write_text("b")
    calls = 0
    name_matches = sources._name_matches

    def counted(name, part):
        nonlocal calls
        calls += 1
        assert calls < 10_000, "the glob is trying the ways `**` can match one by one"
        return name_matches(name, part)
    monkeypatch.setattr(sources, "_name_matches", counted)
    stars = "/".join(["**"] * 30)
    found = resolve_source(f"{tmp_path}/deep/{stars}/*.txt")
    assert [p.name for p in found.files] == ["b.txt", "a.txt"]   # by path: deep/b.txt first
    with pytest.raises(DataError, match=r"\*\*/\*\.zzz: glob matched no files"):
        resolve_source(f"{tmp_path}/deep/{stars}/*.zzz")
    with pytest.raises(DataError, match="glob matched no files"):
        resolve_source(f"{tmp_path}/deep/{stars}/.hidden/{stars}/*.txt")
