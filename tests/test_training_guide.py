"""What a person following the training-loop guide sees and can set: epochs
in the display and metrics, the train/val gap at each evaluation, checkpoint
lines and their losses, the data line, augmentations in every batching mode,
sampling settings, and early stopping end to end. Runs are the tiny model of
tiny-run.yaml, a few milliseconds a step."""
import math
import random
import re
import shutil
from pathlib import Path

import numpy
import pytest

from cli_helpers import run_cli, write_corpus
import xpmodel
from xpmodel.train import evaluate as evaluate_module
from xpmodel.train.checkpoint import read_checkpoint_meta
from xpmodel.train.setup import make_sampler
from xpmodel.config import load_config
from xpmodel.data.corpus import build_tokenizer, load_tokens
from xpmodel.data import EpochSampler, RandomWindowSampler, eval_batches
from xpmodel.errors import UsageError
from xpmodel.model.generate import generate
from xpmodel.model.gpt import GPT, GPTConfig
from xpmodel.tune.plot import draw_metrics
from xpmodel.train.rundir import RunDir
from xpmodel.tokenizer.bpe import BPETokenizer
from xpmodel.train import Trainer

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"


pytestmark = pytest.mark.usefixtures("private_cache")   # corpus: conftest.py


def tiny_config(corpus, *overrides):
    return load_config(TINY, [f"data.source={corpus}", *overrides])


# ---- samples during training ---------------------------------------------------------

def test_training_samples_use_the_configured_temperature_top_k_and_top_p(tmp_path, corpus,
                                                                         monkeypatch):
    config = tiny_config(corpus, "train.sample_temperature=0", "train.sample_top_k=null",
                         "train.sample_top_p=0.5", "train.sample_tokens=24")
    trainer = Trainer.start(config, device="cpu", out=tmp_path / "run", show=False)
    calls = []
    real = evaluate_module.generate
    monkeypatch.setattr(evaluate_module, "generate",
                        lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    text = trainer.sample_text()
    assert (calls[0]["temperature"], calls[0]["top_k"], calls[0]["top_p"]) == (0.0, None, 0.5)
    prompt = trainer.tokenizer.encode("\n")
    greedy = list(generate(trainer.model, prompt, 24, temperature=0,
                           stop_id=trainer.tokenizer.eot_id))
    assert text == "\n" + trainer.tokenizer.decode(greedy)    # temperature 0 is greedy
    assert trainer.sample_text() == text


def test_a_training_sample_leaves_out_a_character_its_last_tokens_only_began(tmp_path, corpus,
                                                                               monkeypatch):
    trainer = Trainer.start(tiny_config(corpus), device="cpu", out=tmp_path / "run", show=False)
    euro = list("€".encode("utf-8"))                  # byte tokenizer: ids are bytes
    monkeypatch.setattr(evaluate_module, "generate",
                        lambda *args, **kwargs: iter([ord("a")] + euro + [ord("b")] + euro[:2]))
    assert trainer.sample_text() == trainer.config.train.sample_prompt + "a€b"


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


@pytest.mark.parametrize("device", ["cuda", "emulated-cuda"], indirect=True)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_embedding_noise_on_the_cuda_path(device, precision):
    """The noise drawn by CuPy's generator on the device (a GPU, or the kernel emulator)."""
    x = numpy.random.default_rng(0).integers(0, 64, (2, 8))
    y = numpy.roll(x, -1, axis=1)
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16),
                device=device, seed=0, precision=precision)
    clean, clean_eval = float(model.forward_backward(x, y)), float(model.loss(x, y))
    for kind in ("uniform", "gaussian"):
        model.embedding_noise = (5.0, kind)
        model.dropout_calls = 0
        noisy = float(model.forward_backward(x, y))
        model.dropout_calls = 0
        assert float(model.forward_backward(x, y)) == noisy != clean
        assert float(model.loss(x, y)) == clean_eval


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
    # a sampler of its own: the run's starts afresh
    x, y = make_sampler(trainer.config, trainer.tokenizer, trainer.train_tokens).next_batch()
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


# ---- what a run shows: epochs, the train/val gap, checkpoints, the data ----------------

def run_cli_train(capsys, tmp_path, corpus, *overrides, out="run"):
    code, stdout, err = run_cli(capsys, "train", "--config", TINY, "--device", "cpu",
                                "--out", tmp_path / out, f"data.source={corpus}",
                                "train.sample_interval=0", *overrides)
    assert code == 0, err
    return stdout, RunDir(tmp_path / out)


@pytest.mark.parametrize("batching", ["random", "epochs"])
def test_a_run_by_epochs_shows_epoch_n_of_m_and_every_record_carries_its_epoch(
        tmp_path, corpus, capsys, batching):
    out, run = run_cli_train(capsys, tmp_path, corpus, "train.max_iters=null", "train.epochs=2",
                             f"data.batching={batching}", "train.warmup_iters=0",
                             "train.log_interval=20", "train.eval_interval=60",
                             "train.save_interval=1000")
    log = [line for line in out.splitlines() if line.startswith("step ") and " eta " in line]
    assert any("epoch 1/2" in line for line in log) and "epoch 2/2" in log[-1]
    assert all(len(line) <= 80 for line in log), log
    records = run.read_metrics()
    train = [r for r in records if r["type"] == "train"]
    assert all(0 < r["epoch"] <= 2 for r in records)
    assert [r["epoch"] for r in train] == sorted(r["epoch"] for r in train)
    n_train = len(run_tokens(run)[0])
    if batching == "random":        # tokens seen / train tokens
        assert train[0]["epoch"] == pytest.approx(4 * 16 / n_train, abs=1e-6)
        assert train[-1]["epoch"] == pytest.approx(len(train) * 4 * 16 / n_train, abs=1e-6)
    else:                           # whole passes of the epoch sampler
        assert train[-1]["epoch"] == 2.0 and train[len(train) // 2 - 1]["epoch"] == 1.0


def test_evaluations_carry_the_interval_train_loss_the_gap_and_both_perplexities(
        tmp_path, corpus, capsys):
    out, run = run_cli_train(capsys, tmp_path, corpus)
    records = run.read_metrics()
    losses = {r["step"]: r["loss"] for r in records if r["type"] == "train"}
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for previous, record in zip([0, 10, 20], evals):
        interval = [losses[s] for s in range(previous + 1, record["step"] + 1)]
        assert record["train_loss"] == pytest.approx(sum(interval) / len(interval), rel=1e-12)
        assert record["gap"] == pytest.approx(record["val_loss"] - record["train_loss"])
        assert record["train_perplexity"] == pytest.approx(math.exp(record["train_loss"]))
        assert record["val_perplexity"] == pytest.approx(math.exp(record["val_loss"]))
        line = next(l for l in out.splitlines() if l.startswith(f"step {record['step']}: val loss"))
        assert (f"train loss {record['train_loss']:.4f}, gap {record['gap']:+.4f}; perplexity "
                f"{record['val_perplexity']:.2f} val, {record['train_perplexity']:.2f} train") in line


def test_the_interval_train_loss_survives_a_resume(tmp_path, corpus):
    config = tiny_config(corpus, "train.max_iters=20", "train.save_interval=5",
                         "train.eval_interval=10", "train.sample_interval=0")
    Trainer.start(config, device="cpu", out=tmp_path / "whole", show=False).run()
    shutil.copytree(tmp_path / "whole", tmp_path / "parts")
    RunDir(tmp_path / "parts").step_path(20).unlink()   # as if stopped at step 15, mid-interval
    resumed = Trainer.resume(tmp_path / "parts", device="cpu", show=False)
    assert resumed.step == 15 and resumed.interval_loss[1] == 5
    resumed.run()

    def evals(name):
        return [{k: v for k, v in r.items() if k != "time"}
                for r in RunDir(tmp_path / name).read_metrics() if r["type"] == "eval"]
    assert evals("parts")[-1]["step"] == 20 and evals("parts")[-2:] == evals("whole")[-2:]


def test_each_save_prints_a_line_and_keeps_the_steps_train_and_val_loss(tmp_path, corpus, capsys):
    out, run = run_cli_train(capsys, tmp_path, corpus)
    records = run.read_metrics()
    losses = {r["step"]: r["loss"] for r in records if r["type"] == "train"}
    vals = {r["step"]: r["val_loss"] for r in records if r["type"] == "eval"}
    for step in (10, 20, 30):
        assert f"checkpoint saved at step {step}: {run.step_path(step)}" in out.splitlines()
    assert out.count(f": {run.best_path}") == len(vals)    # every evaluation improved here
    for step in (20, 30):
        meta = read_checkpoint_meta(run.step_path(step))
        assert (meta["train_loss"], meta["val_loss"], meta["val_loss_step"]) == \
            (losses[step], vals[step], step)
        assert meta["epoch"] == pytest.approx(step * 4 * 16 / len(run_tokens(run)[0]))
    best = read_checkpoint_meta(run.best_path)
    assert best["val_loss"] == min(vals.values()) and best["train_loss"] == losses[best["step"]]


def run_tokens(run):
    config = load_config(run.config_path)
    return load_tokens(config.data, run.load_tokenizer(), config.model.block_size,
                       show_progress=False)


def test_the_start_shows_one_line_about_the_data(tmp_path, corpus, capsys):
    out, run = run_cli_train(capsys, tmp_path, corpus)
    train, val = run_tokens(run)
    params = GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16).num_params()
    line = next(l for l in out.splitlines() if l.startswith("data: "))
    assert line == (f"data: {corpus} ({corpus.stat().st_size:,} bytes) -> "
                    f"{len(train) + len(val):,} tokens ({len(train):,} train, {len(val):,} val), "
                    f"{len(train) / params:.2g} train tokens per parameter; 30 steps x 64 tokens = "
                    f"{30 * 64 / len(train):.2f} epochs")


def test_prepare_preview_decodes_the_start_of_the_token_file(tmp_path, corpus, capsys):
    tokenizer = BPETokenizer()
    tokenizer.save(tmp_path / "bytes.json")
    code, out, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tmp_path / "bytes.json",
                             "--out", tmp_path / "corpus.tok", "--workers", 1, "--preview", 12)
    assert code == 0, err
    text = corpus.read_text()[:12]
    lines = out.splitlines()
    assert lines[-5] == f"the first 12 of {len(corpus.read_text()):,} tokens:"
    assert lines[-4] == "ids:    " + " ".join(str(b) for b in text.encode())
    assert lines[-3] == "tokens: |" + "|".join(text) + "|"
    assert lines[-2:] == ["text:", text]
    code, _, err = run_cli(capsys, "prepare", corpus, "--tokenizer", tmp_path / "bytes.json",
                           "--preview", 0)
    assert code == 2 and "--preview must be at least 1" in err


def test_plot_draws_the_gap_between_validation_and_train(tmp_path, corpus, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    _, run = run_cli_train(capsys, tmp_path, corpus)
    records = run.read_metrics()
    evals = [r for r in records if r["type"] == "eval"]
    fig = draw_metrics(plt, [r for r in records if r["type"] == "train"], evals, "run")
    try:
        loss_axes, gap_axes, lr_axes = fig.axes
        assert gap_axes.get_ylabel() == "val - train"
        xs, ys = gap_axes.get_lines()[-1].get_data()
        assert list(xs) == [10, 20, 30] and list(ys) == [r["gap"] for r in evals]
    finally:
        plt.close(fig)
    code, out, err = run_cli(capsys, "plot", run.path)
    assert code == 0 and (run.path / "loss.png").stat().st_size > 0
    # the run's own plot is refreshed however --out spells it; another existing file is not
    for spelling in (run.path / "loss.png", (run.path / "loss.png").resolve(),
                     run.path / ".." / run.path.name / "loss.png"):
        code, _, err = run_cli(capsys, "plot", run.path, "--out", spelling)
        assert code == 0, err
    (tmp_path / "link.png").symlink_to(run.path / "loss.png")   # a link to it refreshes the run's plot
    (tmp_path / "link-health.png").write_bytes(b"notes")
    code, _, err = run_cli(capsys, "plot", run.path, "--out", tmp_path / "link.png")
    assert code == 0 and (tmp_path / "link.png").is_symlink()
    assert (tmp_path / "link-health.png").read_bytes() == b"notes"
    (tmp_path / "mine.png").write_bytes(b"mine")
    code, _, err = run_cli(capsys, "plot", run.path, "--out", tmp_path / "mine.png")
    assert code == 2 and "already exists" in err and (tmp_path / "mine.png").read_bytes() == b"mine"


# ---- early stopping --------------------------------------------------------------------

def test_early_stopping_ends_the_run_and_best_holds_the_best_step(tmp_path, capsys):
    # Validation text of digits the training text never has: the val loss falls
    # while the model learns spaces and line ends, then rises as letters win.
    corpus = write_corpus(tmp_path / "corpus.txt", lines=400)
    rng = random.Random(0)
    digits = "\n".join(" ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(3, 8)))
                       for _ in range(60))
    corpus.write_text(corpus.read_text() + digits + "\n")
    out, run = run_cli_train(capsys, tmp_path, corpus, "train.max_iters=200",
                             "train.eval_interval=5", "train.early_stop_patience=3",
                             "train.save_interval=50")
    records = run.read_metrics()
    evals = [(r["step"], r["val_loss"]) for r in records if r["type"] == "eval"]
    last = max(r["step"] for r in records if r["type"] == "train")
    best_step, best_val = min(evals, key=lambda e: e[1])
    assert last < 200 and evals[-1][0] == last
    assert [step for step, _ in evals if step > best_step] == [best_step + 5 * k for k in (1, 2, 3)]
    assert "early stop: no val improvement in 3 evaluations" in out
    assert f"done (early stop): {last} steps" in out
    meta = read_checkpoint_meta(run.best_path)
    assert (meta["step"], meta["val_loss"], meta["best_val"]) == (best_step, best_val, best_val)
    assert run.step_path(last).is_file()          # the stopping step is saved too
    best, _ = xpmodel.load(run.path, checkpoint="best")
    final, _ = xpmodel.load(run.path)
    val_batches = list(eval_batches(run_tokens(run)[1], 4, 16, 2))   # the run's evaluation
    assert numpy.mean([float(best.loss(x, y)) for x, y in val_batches]) == \
        pytest.approx(best_val, rel=1e-6)
    assert numpy.mean([float(final.loss(x, y)) for x, y in val_batches]) == \
        pytest.approx(evals[-1][1], rel=1e-6)
    # resumed, it trains no further until the patience is raised
    metrics = run.metrics_path.read_bytes()
    code, out, err = run_cli(capsys, "train", "--resume", run.path)
    assert code == 0, err
    assert f"the run stopped early at step {last}" in out and "early_stop_patience" in out
    assert run.metrics_path.read_bytes() == metrics
    code, out, err = run_cli(capsys, "train", "--resume", run.path, "train.early_stop_patience=4")
    assert code == 0, err
    assert max(r["step"] for r in run.read_metrics() if r["type"] == "train") == last + 5
