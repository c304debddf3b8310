"""What a person following the training-loop guide sees and can set: epochs
in the display and metrics, the train/val gap at each evaluation, checkpoint
lines and their losses, the data line, augmentations in every batching mode,
sampling settings, and early stopping end to end. Runs are the tiny model of
tiny-run.yaml, a few milliseconds a step."""
from pathlib import Path

import numpy
import pytest

from cli_helpers import write_corpus
from xpmodel import trainer as trainer_module
from xpmodel.config import load_config
from xpmodel.errors import UsageError
from xpmodel.generate import generate
from xpmodel.model import GPT, GPTConfig
from xpmodel.rundir import RunDir
from xpmodel.trainer import Trainer

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt", lines=400)


def tiny_config(corpus, *overrides):
    return load_config(TINY, [f"data.source={corpus}", *overrides])


# ---- samples during training ---------------------------------------------------------

def test_training_samples_use_the_configured_temperature_top_k_and_top_p(tmp_path, corpus,
                                                                         monkeypatch):
    config = tiny_config(corpus, "train.sample_temperature=0", "train.sample_top_k=null",
                         "train.sample_top_p=0.5", "train.sample_tokens=24")
    trainer = Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)
    calls = []
    real = trainer_module.generate
    monkeypatch.setattr(trainer_module, "generate",
                        lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    text = trainer.sample_text()
    assert (calls[0]["temperature"], calls[0]["top_k"], calls[0]["top_p"]) == (0.0, None, 0.5)
    prompt = trainer.tokenizer.encode("\n")
    greedy = list(generate(trainer.model, prompt, 24, temperature=0,
                           stop_id=trainer.tokenizer.eot_id))
    assert text == "\n" + trainer.tokenizer.decode(greedy)    # temperature 0 is greedy
    assert trainer.sample_text() == text


def test_sampling_defaults_and_bad_values():
    train = load_config("default").train
    assert (train.sample_temperature, train.sample_top_k, train.sample_top_p) == (0.8, 200, None)
    for override, message in [("train.sample_temperature=-1", "train.sample_temperature must be >= 0"),
                              ("train.sample_top_k=0", "train.sample_top_k must be > 0"),
                              ("train.sample_top_p=1.5", "train.sample_top_p must be in (0, 1]")]:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("]", r"\]")):
            load_config("default", [override])


# ---- noise on the input embeddings ---------------------------------------------------

def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in RunDir(run_dir).read_metrics() if r["type"] == "train"]


def test_embedding_noise_is_in_training_passes_only():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=0)
    x = numpy.random.default_rng(0).integers(0, 64, (2, 8))
    y = numpy.roll(x, -1, axis=1)
    clean_loss, clean_eval = float(model.forward_backward(x, y)), float(model.loss(x, y))
    model.embedding_noise = (5.0, "gaussian")
    noisy = [float(model.forward_backward(x, y)) for _ in range(2)]
    assert clean_loss not in noisy and noisy[0] != noisy[1]    # fresh noise every pass
    assert model.dropout_calls == 2                            # drawn from the pass's seed
    assert float(model.loss(x, y)) == clean_eval               # evaluation adds none
    model.dropout_calls = 0
    assert float(model.forward_backward(x, y)) == noisy[0]     # the same pass, the same noise


def test_embedding_noise_run_resumes_bit_exactly(tmp_path, corpus):
    config = tiny_config(corpus, "train.embedding_noise=5", "train.max_iters=12",
                         "train.save_interval=3", "train.eval_interval=12")
    Trainer.start(config, device="cpu", out=tmp_path / "whole", show=False).run()
    first = Trainer.start(config, device="cpu", out=tmp_path / "parts", show=False)
    first.total_steps = 7          # stops after step 7; the last checkpoint is step 7
    first.run()
    second = Trainer.resume(tmp_path / "parts", device="cpu", show=False)
    assert second.model.embedding_noise == (5.0, "uniform")
    second.run()
    assert train_losses(tmp_path / "parts") == train_losses(tmp_path / "whole")
    plain = tiny_config(corpus, "train.max_iters=12", "train.save_interval=3", "train.eval_interval=12")
    Trainer.start(plain, device="cpu", out=tmp_path / "plain", show=False).run()
    assert train_losses(tmp_path / "plain")[1:] != train_losses(tmp_path / "whole")[1:]
