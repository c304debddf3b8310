"""Checkpoint files and run directories: atomic writes, safe reading of
crafted or damaged files, and what a run directory may point at.

"Before any large allocation" is checked with tracemalloc: reading a file that
claims terabytes must stay within a few hundred kilobytes of Python memory.
"""
import errno
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy
import pytest
from safetensors.numpy import save_file

import xpmodel
from xpmodel import atomic as atomic_module
from xpmodel.atomic import abandon_partial_writes, atomic_write_bytes
from xpmodel.train.checkpoint import (FORMAT, load_checkpoint,
                                read_checkpoint_meta, save_checkpoint)
from xpmodel.config import load_config, save_config
from xpmodel.data.tokenfile import HEADER, MAGIC, read_token_file
from xpmodel.errors import CheckpointError, DataError, XpmodelError
from xpmodel.model.gpt import GPT, GPTConfig
from xpmodel.model.params import parameter_shapes
from xpmodel.train.rundir import RunDir
from xpmodel.tokenizer.bpe import BPETokenizer

PACKAGE = Path(xpmodel.__file__).resolve().parent
TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
TINY_GPT = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)
SHAPES = dict(parameter_shapes(TINY_GPT))
N = TINY_GPT.num_params()
PEAK_LIMIT = 512 * 1024   # bytes of Python allocations allowed while rejecting a crafted file


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))


def tiny_state(seed=0, step=7):
    """(params, optimizer state, metadata) of TINY_GPT at `step`, drawn from `seed`."""
    rng = numpy.random.default_rng(seed)
    params = {name: rng.normal(size=shape).astype(numpy.float32) for name, shape in SHAPES.items()}
    optim = {"m": rng.normal(size=N).astype(numpy.float32),
             "v": rng.random(N).astype(numpy.float32)}
    meta = {"step": step, "vocab_size": 257, "tokenizer_fingerprint": BPETokenizer().fingerprint()}
    return params, optim, meta


def write_raw(path, header, data=b""):
    """A safetensors-shaped file with an arbitrary header."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def peak_allocation(function, *args):
    """(exception raised or None, peak bytes allocated by Python while calling)."""
    tracemalloc.start()
    try:
        function(*args)
        raised = None
    except Exception as exc:
        raised = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return raised, peak


def make_run(root):
    """A run directory holding one step-3 checkpoint of the tiny model."""
    run = RunDir(root)
    config = load_config(TINY, ["data.source=unused.txt"])
    params, optim, meta = tiny_state()
    run.create(config, BPETokenizer(),
               first_checkpoint=lambda path: save_checkpoint(path, params, optim, dict(meta, step=0)))
    save_checkpoint(run.step_path(3), params, optim, dict(meta, step=3))
    return run


# ---- writing -----------------------------------------------------------------------

def test_save_then_load_gives_back_every_tensor_and_the_metadata(tmp_path):
    params, optim, meta = tiny_state()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params, optim, meta)
    loaded_meta, loaded_params, loaded_optim = load_checkpoint(path, SHAPES, {"m": N, "v": N})
    assert loaded_meta == dict(meta, format=FORMAT, format_version=1)
    for name in SHAPES:
        numpy.testing.assert_array_equal(loaded_params[name], params[name])
    numpy.testing.assert_array_equal(loaded_optim["v"], optim["v"])
    _, weights_only, none = load_checkpoint(path, SHAPES, None)
    assert set(weights_only) == set(SHAPES) and none == {}


@pytest.mark.parametrize("failure", ["fsync", "write", "replace", "ctrl-c"])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(failure, tmp_path, monkeypatch):
    params, optim, meta = tiny_state()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params, optim, meta)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        if failure == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failure == "write":
        real_open = open

        class FullDisk:
            def __init__(self, handle):
                self.handle = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

            def write(self, data):
                self.handle.write(data[:100])
                fail()

        monkeypatch.setattr(atomic_module, "open",
                            lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    else:
        monkeypatch.setattr(os, {"fsync": "fsync", "replace": "replace", "ctrl-c": "replace"}[failure],
                            fail)
    params2, optim2, _ = tiny_state(seed=1)
    with pytest.raises(KeyboardInterrupt if failure == "ctrl-c" else OSError):
        save_checkpoint(path, params2, optim2, meta)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_the_slow_save_hook_pauses_before_the_rename(tmp_path, monkeypatch):
    monkeypatch.setenv("XPMODEL_TEST_SLOW_SAVE", "0.3")
    params, optim, meta = tiny_state()
    path = tmp_path / "c.safetensors"
    seen = []
    writer = threading.Thread(target=lambda: seen.append(
        _catch(save_checkpoint, path, params, optim, meta)))
    writer.start()
    deadline = time.monotonic() + 10
    while not list(tmp_path.glob(".c.safetensors.tmp-*")):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert not path.exists()
    # a process leaving at once (a second Ctrl-C) removes what it was writing
    abandon_partial_writes()
    writer.join()
    assert isinstance(seen[0], FileNotFoundError)
    assert list(tmp_path.iterdir()) == []


def _catch(function, *args):
    try:
        function(*args)
    except Exception as exc:
        return exc
    return None


# ---- reading crafted and damaged files --------------------------------------------

def _valid_entry(dtype="F32", shape=(2,), start=0):
    size = int(numpy.prod(shape)) * 4
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + size]}


CRAFTED = {
    "header length beyond the file": lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}"),
    "header length past the cap": lambda p: p.write_bytes(struct.pack("<Q", 200 * 2**20) + b"{}" * 8),
    "shorter than the length prefix": lambda p: p.write_bytes(b"\x01\x02"),
    "header not JSON": lambda p: write_raw(p, b"{not json", b"\0" * 8),
    "header a list": lambda p: write_raw(p, [1, 2, 3]),
    "absurd shape": lambda p: write_raw(p, {"param/wte.weight": {
        "dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8),
    "offsets past the end": lambda p: write_raw(p, {"param/wte.weight": {
        "dtype": "F32", "shape": [2**20, 16], "data_offsets": [0, 2**26]}}, b"\0" * 8),
    "negative shape": lambda p: write_raw(p, {"param/wte.weight": {
        "dtype": "F32", "shape": [-2, -4], "data_offsets": [0, 32]}}, b"\0" * 32),
    "unknown dtype": lambda p: write_raw(p, {"param/wte.weight": {
        "dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "metadata not strings": lambda p: write_raw(p, {"__metadata__": {"xpmodel": {"step": 1}}}),
    "no xpmodel metadata": lambda p: write_raw(p, {"x": _valid_entry()}, b"\0" * 8),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_files_are_refused_before_any_large_allocation(case, tmp_path):
    path = tmp_path / "crafted.safetensors"
    CRAFTED[case](path)
    raised, peak = peak_allocation(load_checkpoint, path, SHAPES, {"m": N, "v": N})
    assert isinstance(raised, CheckpointError), raised
    assert str(path) in str(raised)
    assert peak < PEAK_LIMIT


def test_a_valid_file_of_the_wrong_shape_is_refused_before_reading_tensors(tmp_path):
    params, optim, meta = tiny_state()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params, optim, meta)
    bigger = dict(SHAPES, **{"wte.weight": (4096, 16)})
    raised, peak = peak_allocation(load_checkpoint, path, bigger, {"m": N, "v": N})
    assert isinstance(raised, CheckpointError) and "shape" in str(raised)
    assert peak < PEAK_LIMIT


def test_a_run_whose_checkpoint_claims_a_huge_vocab_is_refused_cheaply(tmp_path):
    run = make_run(tmp_path / "run")
    params, optim, meta = tiny_state()
    save_checkpoint(run.step_path(3), params, optim, dict(meta, step=3, vocab_size=10**12))
    save_checkpoint(run.step_path(0), params, optim, dict(meta, step=0, vocab_size=10**12))
    raised, peak = peak_allocation(xpmodel.load, run.path)
    assert isinstance(raised, CheckpointError) and "the config does not match the checkpoint" in str(raised)
    assert peak < 4 * PEAK_LIMIT   # parses config.yaml and the tokenizer as well


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path):
    params, _, meta = tiny_state()
    path = tmp_path / "c.safetensors"
    save_file({f"param/{k}": v for k, v in params.items()}, str(path),
              metadata={"xpmodel": json.dumps(dict(meta, format=FORMAT, format_version=2))})
    with pytest.raises(CheckpointError, match="version 2 is newer.*upgrade xpmodel"):
        read_checkpoint_meta(path)


def test_nan_weights_in_a_file_are_refused(tmp_path):
    params, optim, meta = tiny_state()
    params["ln_f.bias"][3] = numpy.inf
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params, optim, meta)
    with pytest.raises(CheckpointError, match="ln_f.bias holds NaN or Inf"):
        load_checkpoint(path, SHAPES, {"m": N, "v": N})


@pytest.mark.parametrize("count, vocab", [
    (2**62, 257),        # promises exabytes
    (10**9, 257),        # promises 2 GB the file does not have
    (16, 0),             # no vocabulary
    (16, 2**20),         # ids too narrow for the vocabulary
])
def test_crafted_token_files_are_refused_before_any_large_allocation(count, vocab, tmp_path):
    path = tmp_path / "crafted.tok"
    header = HEADER.pack(MAGIC, 1, 1, count, vocab, b"\0" * 32)
    path.write_bytes(header + b"\0" * 32)
    raised, peak = peak_allocation(read_token_file, path)
    assert isinstance(raised, DataError), raised
    assert str(path) in str(raised)
    assert peak < PEAK_LIMIT


# ---- nothing is unpickled -----------------------------------------------------------

_UNSAFE = [
    (re.compile(r"\bimport pickle\b|\bfrom pickle\b|\bpickle\.loads?\("), "pickle"),
    (re.compile(r"\bcPickle\b|\bdill\b|\bjoblib\.load\b|\bshelve\b|\bmarshal\.loads?\("), "other unpicklers"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"\btorch\.load\("), "torch.load"),
    (re.compile(r"\bpandas\.read_pickle|\bpd\.read_pickle"), "read_pickle"),
]


def test_no_code_path_unpickles_a_file():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern, what in _UNSAFE:
            if pattern.search(text):
                problems.append(f"{path.relative_to(PACKAGE)}: {what}")
        for call in re.finditer(r"\b(?:np|numpy)\.load\(([^)]*)\)", text):
            if "allow_pickle=False" not in call.group(1):
                problems.append(f"{path.relative_to(PACKAGE)}: numpy.load without allow_pickle=False")
    assert problems == []


# ---- run directories ---------------------------------------------------------------

def test_checkpoints_that_link_outside_the_run_are_ignored(tmp_path):
    run = make_run(tmp_path / "run")
    outside = tmp_path / "elsewhere.safetensors"
    params, optim, meta = tiny_state(seed=5)
    save_checkpoint(outside, params, optim, dict(meta, step=99))
    (run.checkpoint_dir / "step-00000099.safetensors").symlink_to(outside)
    run.best_path.symlink_to(outside)
    latest, skipped = run.latest_checkpoint()
    assert latest == run.step_path(3)
    assert "outside the run directory" in skipped[0]
    for which in ("latest", "best"):
        model, _ = xpmodel.load(run.path, checkpoint=which)
        expected, _, _ = tiny_state()
        numpy.testing.assert_array_equal(model.params["wte.weight"], expected["wte.weight"])


def test_a_run_cut_short_while_being_created_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    save_config(load_config(TINY, ["data.source=unused.txt"]), folder / "config.yaml")
    (folder / ".tokenizer.json.tmp-123").write_text("{")
    (folder / "checkpoints" / ".step-00000000.safetensors.tmp-123").write_bytes(b"\0" * 10)
    run = RunDir(folder)
    # Without the lock file its creator left, these are a user's files, not a run's.
    with pytest.raises(xpmodel.errors.UsageError, match="config.yaml.*even with --overwrite"):
        run.check_can_create(overwrite=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.lock_path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.raises(xpmodel.errors.UsageError, match="stopped while it was being created"):
        run.require_run("--resume")
    run.check_can_create()   # no --overwrite needed
    (folder / "notes.txt").write_text("mine")
    run.check_can_create()   # the user's file stays; only the run's own files are replaced
    run.create(load_config(TINY, ["data.source=unused.txt"]), BPETokenizer())
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "config.yaml", "notes.txt",
                                                        "run.json", "tokenizer.json"]
    assert list(run.checkpoint_dir.iterdir()) == []


def test_creating_a_run_that_fails_leaves_nothing_behind(tmp_path):
    run = RunDir(tmp_path / "run")

    def failing_checkpoint(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(XpmodelError, match="No space left on device; the run was not created"):
        run.create(load_config(TINY, ["data.source=unused.txt"]), BPETokenizer(),
                   first_checkpoint=failing_checkpoint)
    assert not run.path.exists()


def test_metrics_survive_a_cut_line_and_truncate_to_a_step(tmp_path):
    run = make_run(tmp_path / "run")
    for step in range(1, 6):
        run.append_metrics({"type": "train", "step": step, "loss": float(step), "grad_norm": float("inf")})
    with open(run.metrics_path, "a") as f:
        f.write('{"type": "train", "step": 6, "lo')    # a kill in mid-line
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5]
    assert run.read_metrics()[0]["grad_norm"] is None   # strict JSON: no Infinity
    run.truncate_metrics(3)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    assert run.metrics_path.read_text().count("\n") == 3
    assert not [p for p in run.path.iterdir() if ".tmp" in p.name]


def test_a_model_loaded_from_a_run_matches_the_saved_weights(tmp_path):
    run = make_run(tmp_path / "run")
    model, tokenizer = xpmodel.load(run.path)
    params, _, _ = tiny_state()
    reference = GPT(TINY_GPT)
    reference.load_state_arrays(params)
    ids = numpy.arange(16).reshape(1, 16)
    numpy.testing.assert_array_equal(model.forward(ids), reference.forward(ids))
    assert not model.training and tokenizer == BPETokenizer()


@pytest.mark.parametrize("checkpoint", ["worst", "Best", None])
def test_loading_a_checkpoint_other_than_latest_or_best_is_refused(tmp_path, checkpoint):
    run = make_run(tmp_path / "run")
    with pytest.raises(ValueError, match=f"checkpoint must be one of latest, best, got {checkpoint!r}"):
        xpmodel.load(run.path, checkpoint=checkpoint)


def test_a_failed_write_names_the_target_not_the_temporary(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    target = tmp_path / "notes.txt" / "c.json"
    with pytest.raises(OSError) as failure:
        atomic_write_bytes(target, b"{}")
    assert failure.value.filename == str(target)


def test_a_write_removes_what_killed_writes_of_the_same_file_left(tmp_path):
    """Their temporaries, once a minute old; never a live writer's, a recent
    one (another machine's, in a shared folder), or another file's."""
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    old = time.time() - 2 * atomic_module.STALE_TEMPORARY_S
    kept = {f".out.json.tmp-{living.pid}", f".other.json.tmp-{exited.pid}"}
    names = {f".out.json.tmp-{exited.pid}", *kept}
    try:
        for name in names:
            (tmp_path / name).write_text("{")
            os.utime(tmp_path / name, (old, old))
        recent = tmp_path / f".out.json.tmp-{exited.pid + 1_000_000}"
        recent.write_text("{")
        kept.add(recent.name)
        atomic_write_bytes(tmp_path / "out.json", b"{}")
    finally:
        living.kill()
        living.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept | {"out.json"})
