"""What a person following the training-loop guide sees and can set: epochs
in the display and metrics, the train/val gap at each evaluation, checkpoint
lines and their losses, the data line, augmentations in every batching mode,
sampling settings, and early stopping end to end. Runs are the tiny model of
tiny-run.yaml, a few milliseconds a step."""
import re
from pathlib import Path

import numpy
import pytest

from cli_helpers import write_corpus
from xpmodel import trainer as trainer_module
from xpmodel.config import load_config
from xpmodel.corpus import build_tokenizer
from xpmodel.data import EpochSampler, RandomWindowSampler
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


# ---- crop and token dropout in every batching mode ------------------------------------

def test_crop_augment_with_random_windows_is_refused_with_the_fix():
    with pytest.raises(UsageError) as error:
        load_config("default", ["data.crop_augment=true"])
    assert "data.batching=epochs or data.crop_augment=false" in str(error.value)
    assert load_config("default", ["data.crop_augment=true", "data.batching=epochs"]).data.crop_augment


@pytest.mark.parametrize("cls", [EpochSampler, RandomWindowSampler])
def test_token_dropout_mask_mode_hides_inputs_behind_the_mask_id(cls):
    B, T, p, mask_id = 32, 64, 0.2, 999_999
    tokens = numpy.arange(B * (T + 1) * 4, dtype=numpy.uint32)
    sampler = cls(tokens, B, T, seed=0, token_dropout=p, vocab_size=1_000_000,
                  token_dropout_mode="mask", mask_id=mask_id)
    masked = []
    for _ in range(4):
        x, y = sampler.next_batch()
        clean = y - 1                      # targets are untouched: the clean inputs are y - 1
        assert (y[:, 1:] == y[:, :-1] + 1).all()
        hidden = x != clean
        assert (x[hidden] == mask_id).all()
        masked.append(hidden.mean())
    assert abs(numpy.mean(masked) - p) < 0.02
    with pytest.raises(UsageError, match="mask id"):
        cls(tokens, B, T, token_dropout=p, vocab_size=1000, token_dropout_mode="mask", mask_id=None)


def test_a_sampler_state_saved_before_the_mode_existed_resumes_in_random_mode():
    tokens = numpy.arange(5000, dtype=numpy.uint32)
    sampler = RandomWindowSampler(tokens, 4, 16, seed=1, token_dropout=0.1, vocab_size=5000)
    sampler.next_batch()
    old_state = {k: v for k, v in sampler.state_dict().items() if k != "token_dropout_mode"}
    again = RandomWindowSampler(tokens, 4, 16, seed=1, token_dropout=0.1, vocab_size=5000)
    again.load_state_dict(old_state)
    assert again.step == 1
    masking = RandomWindowSampler(tokens, 4, 16, seed=1, token_dropout=0.1, vocab_size=5000,
                                  token_dropout_mode="mask", mask_id=7)
    with pytest.raises(UsageError, match="token_dropout_mode='random'"):
        masking.load_state_dict(old_state)


def test_mask_mode_tokenizers_reserve_mask_after_endoftext(corpus):
    byte = build_tokenizer(tiny_config(corpus, "data.token_dropout_mode=mask").data)
    assert (byte.vocab_size, byte.eot_id, byte.mask_id) == (258, 256, 257)
    assert build_tokenizer(tiny_config(corpus).data).mask_id is None
    bpe = build_tokenizer(tiny_config(corpus, "data.tokenizer=bpe", "data.vocab_size=300",
                                      "data.token_dropout_mode=mask").data, say=lambda s: None)
    assert bpe.vocab_size == 300 and bpe.mask_id == 299 and bpe.eot_id == 298
    assert bpe.mask_id not in bpe.encode_ordinary("a <|mask|> in the text is only text")


@pytest.mark.parametrize("batching", ["random", "epochs"])
@pytest.mark.parametrize("mode", ["random", "mask"])
def test_token_dropout_and_crop_train_in_every_batching_mode(tmp_path, corpus, batching, mode):
    crop = ["data.crop_augment=true"] if batching == "epochs" else []
    config = tiny_config(corpus, f"data.batching={batching}", "data.token_dropout=0.3",
                         f"data.token_dropout_mode={mode}", "train.max_iters=4", *crop)
    trainer = Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)
    x, y = trainer._make_sampler().next_batch()    # a copy: the run's own starts afresh
    if mode == "mask":
        assert trainer.tokenizer.mask_id == 257 and (x == 257).mean() > 0.15
        assert trainer.model.config.vocab_size == 258
    else:
        assert trainer.tokenizer.mask_id is None
    summary = trainer.run()
    assert summary["steps"] == 4 and summary["train_loss"] > 0


def test_mask_mode_from_a_tokenizer_without_the_mask_is_refused(tmp_path, corpus):
    Trainer.start(tiny_config(corpus, "train.max_iters=1"), device="cpu", out=tmp_path / "base",
                  show=False).run()
    config = tiny_config(corpus, "data.token_dropout=0.1", "data.token_dropout_mode=mask",
                         f"train.init_from={tmp_path / 'base'}")
    with pytest.raises(UsageError, match=re.escape("needs a tokenizer that reserves <|mask|>")):
        Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)
