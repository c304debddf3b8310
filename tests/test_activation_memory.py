"""A micro-batch whose activations cannot fit is refused before anything is
allocated or written, by every command that builds a model from a config."""
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import xpmodel
import xpmodel.train.setup as setup
from cli_helpers import assert_one_line_error, run_cli, write_corpus
from xpmodel.config import load_config
from xpmodel.errors import UsageError
from xpmodel.tokenizer.bpe import BPETokenizer

TINY = Path(__file__).parent / "tiny-run.yaml"
HUGE_BATCH = "train.batch_size=16000000"    # within the config's bound, far past 8 GiB
SHAPE = xpmodel.GPTConfig(vocab_size=50, block_size=64, n_layer=3, n_head=2, n_embd=32)
FITS = (8 << 30) // (64 * 32 * (3 + 1) * 4)     # windows whose bound is 8 GiB at most
CPU, GPU = xpmodel.get_device("cpu"), SimpleNamespace(is_cuda=True)


@pytest.fixture
def small_machine(tmp_path, monkeypatch):
    """A host of 8 GiB and a GPU of 4 GiB, and a corpus in tmp_path."""
    monkeypatch.setattr(setup, "_host_memory", lambda: 8 << 30)
    monkeypatch.setattr(setup, "_gpu_memory", lambda device: 4 << 30)
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus.txt")


def test_the_bound_counts_each_blocks_input_and_the_stream_in_float32(small_machine):
    setup.check_activations_fit(SHAPE, FITS, CPU)
    with pytest.raises(UsageError, match=r"^train.batch_size: a micro-batch of 262,145 windows .* "
                                         r"keeps at least 8.0 GiB .* more than this machine's"):
        setup.check_activations_fit(SHAPE, FITS + 1, CPU)


def test_a_gpu_run_is_held_to_the_gpus_memory(small_machine):
    setup.check_activations_fit(SHAPE, FITS // 2, GPU)
    with pytest.raises(UsageError, match=r"keeps at least 4.0 GiB of activations, more than "
                                         r"the GPU's 4.0 GiB"):
        setup.check_activations_fit(SHAPE, FITS // 2 + 1, GPU)


def test_data_parallel_ranks_are_each_held_to_their_share(small_machine):
    config = load_config(TINY, [f"train.batch_size={2 * 16 * FITS}", "model.n_layer=3",
                                "model.n_embd=32", "model.block_size=64"])
    tokenizer = BPETokenizer()
    with pytest.raises(UsageError, match=f"a micro-batch of {2 * FITS:,} windows"):
        setup.build_model(config, tokenizer, "cpu", ranks=16)
    assert setup.build_model(config, tokenizer, "cpu", ranks=32).config.n_layer == 3


REFUSAL = ("train.batch_size: a micro-batch of 16,000,000 windows of 16 tokens keeps "
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
