"""A micro-batch whose activations cannot fit is refused before anything is
allocated or written, by every command that builds a model from a config."""
import time
from pathlib import Path

import pytest

import xpmodel
from cli_helpers import assert_one_line_error, run_cli, write_corpus
from xpmodel.errors import UsageError

TINY = Path(__file__).parent / "tiny-run.yaml"
HUGE_BATCH = "train.batch_size=16000000"    # within the config's bound, far past 8 GiB


@pytest.fixture
def small_machine(tmp_path, monkeypatch):
    """A host of 8 GiB, and a corpus in tmp_path."""
    import xpmodel.train.setup as setup
    monkeypatch.setattr(setup, "_host_memory", lambda: 8 << 30)
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus.txt")


def test_the_bound_counts_each_blocks_input_and_the_stream_in_float32():
    from xpmodel.train.setup import check_activations_fit
    config = xpmodel.GPTConfig(vocab_size=50, block_size=64, n_layer=3, n_head=2, n_embd=32)
    cpu = xpmodel.get_device("cpu")
    fits = (8 << 30) // (64 * 32 * (3 + 1) * 4)     # windows whose bound is exactly 8 GiB or less
    import xpmodel.train.setup as setup
    original = setup._host_memory
    try:
        setup._host_memory = lambda: 8 << 30
        check_activations_fit(config, fits, cpu)
        with pytest.raises(UsageError, match=r"^train.batch_size=262,145: .* keeps at least 8.0 GiB"):
            check_activations_fit(config, fits + 1, cpu)
    finally:
        setup._host_memory = original


REFUSAL = ("train.batch_size=16,000,000: a micro-batch of 16,000,000 windows of 16 tokens keeps "
           "at least 30.5 GiB of activations, more than this machine's 8.0 GiB; lower "
           "train.batch_size")


@pytest.mark.parametrize("command", ["train", "lr-find"])
def test_a_batch_past_memory_is_refused_at_once_naming_the_key(capsys, tmp_path, small_machine,
                                                               command):
    out = tmp_path / ("run" if command == "train" else "lr.png")
    start = time.perf_counter()
    code, _, err = run_cli(capsys, command, "--config", TINY, f"data.source={small_machine}",
                           HUGE_BATCH, "--out", out)
    assert time.perf_counter() - start < 30
    assert code == 2, err
    assert_one_line_error(err)
    assert REFUSAL in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_doctor_fails_the_checks_that_build_the_model_with_the_refusal(capsys, small_machine):
    start = time.perf_counter()
    code, text, _ = run_cli(capsys, "doctor", TINY, f"data.source={small_machine}", HUGE_BATCH)
    assert time.perf_counter() - start < 60
    failed = [line for line in text.splitlines() if line.lstrip().startswith("FAIL")]
    assert code == 1 and failed and all(REFUSAL in line for line in failed), text
