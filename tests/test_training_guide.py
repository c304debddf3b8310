"""What a person following the training-loop guide sees and can set: epochs
in the display and metrics, the train/val gap at each evaluation, checkpoint
lines and their losses, the data line, augmentations in every batching mode,
sampling settings, and early stopping end to end. Runs are the tiny model of
tiny-run.yaml, a few milliseconds a step."""
from pathlib import Path

import pytest

from cli_helpers import write_corpus
from xpmodel import trainer as trainer_module
from xpmodel.config import load_config
from xpmodel.errors import UsageError
from xpmodel.generate import generate
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
