"""The model on every backend (NumPy always, CuPy where a GPU is present)
against a NumPy float64 reference, in both precisions.

CUDA cases skip cleanly on machines without CuPy or a GPU; the same cases
also run on the CPU emulator of the CUDA kernels."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

import xpmodel
from xpmodel.backend import cuda_available, to_host
from xpmodel.train.optim import clipped_step

import cuda_emulator
from counter_masks import ReferenceMasks

CONFIG = xpmodel.GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64)


def batch(B=4, T=32, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, CONFIG.vocab_size, (B, T))
    return idx, np.roll(idx, -1, axis=1)


def relative_error(a, b):
    a, b = to_host(a).astype(np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def reference():
    model = xpmodel.GPT(CONFIG, dtype="float64", seed=7)
    idx, targets = batch()
    loss = float(model.forward_backward(idx, targets))
    return loss, model.forward(idx), model.flat_grads.copy()


def test_float32_matches_float64_reference(device, reference):
    ref_loss, ref_logits, ref_grads = reference
    model = xpmodel.GPT(CONFIG, device=device, seed=7)
    idx, targets = batch()
    loss = float(model.forward_backward(idx, targets))
    assert abs(loss - ref_loss) / ref_loss < 1e-5
    assert relative_error(model.forward(idx), ref_logits) < 1e-4
    assert relative_error(model.flat_grads, ref_grads) < 1e-4


def test_fp16_mixed_precision_gradients_are_close(device, reference):
    ref_loss, _, ref_grads = reference
    model = xpmodel.GPT(CONFIG, device=device, seed=7, precision="fp16")
    idx, targets = batch()
    loss = float(model.forward_backward(idx, targets, scale=256.0))
    model.flat_grads *= 1.0 / 256.0
    assert model.flat_params.dtype == np.float32 and model.flat_working.dtype == np.float16
    assert abs(loss - ref_loss) / ref_loss < 5e-3
    assert relative_error(model.flat_grads, ref_grads) < 3e-2


def test_fp16_training_follows_the_fp32_loss_curve(device):
    """Tolerance: every step's fp16 loss within 2% of the fp32 run's."""
    curves = {}
    idx, targets = batch(seed=3)
    for precision in ("fp32", "fp16"):
        model = xpmodel.GPT(CONFIG, device=device, seed=1, precision=precision)
        opt = xpmodel.AdamW(model, lr=2e-3)
        scaler = xpmodel.LossScaler(scale=1024.0, xp=model.xp) if precision == "fp16" else None
        losses = []
        for step in range(40):          # the trainer's step (Trainer._optimizer_step)
            model.zero_grad()
            scale = scaler.device_scale if scaler else 1.0
            losses.append(float(model.forward_backward(idx, targets, scale=scale)))
            _, finite = clipped_step(opt, 1.0, scale)
            assert bool(finite)
            if scaler:
                scaler.record(finite)
                scaler.check(step)
        curves[precision] = np.array(losses)
    assert curves["fp32"][-1] < 0.6 * curves["fp32"][0]
    np.testing.assert_allclose(curves["fp16"], curves["fp32"], rtol=2e-2)


def test_loss_scaling_recovers_from_an_injected_overflow(device):
    """The trainer's step: clipped_step skips the update on an overflow and the
    scaler halves the scale, then grows it back after growth_interval good steps."""
    model = xpmodel.GPT(CONFIG, device=device, seed=1, precision="fp16")
    scaler = xpmodel.LossScaler(scale=2.0 ** 12, growth_interval=3, xp=model.xp)
    opt = xpmodel.AdamW(model, lr=1e-3)
    idx, targets = batch()
    before = model.flat_params.copy()

    def step(overflow=False):
        model.zero_grad()
        model.forward_backward(idx, targets, scale=scaler.device_scale)
        if overflow:
            model.flat_grads[5] = np.inf              # an overflow in one gradient
        with np.errstate(divide="ignore", invalid="ignore"):   # as the trainer's step is
            _, finite = clipped_step(opt, 1.0, scaler.device_scale)
        scaler.record(finite)
        return bool(finite)

    assert not step(overflow=True) and scaler.scale == 2.0 ** 11
    assert bool((model.flat_params == before).all())  # the update was skipped
    assert all(step() for _ in range(3))
    assert scaler.scale == 2.0 ** 12                   # grew back after 3 good steps
    assert not bool((model.flat_params == before).all())


def test_loss_scaling_stops_a_run_that_overflows_step_after_step(device):
    model = xpmodel.GPT(CONFIG, device=device, seed=1, precision="fp16")
    scaler = xpmodel.LossScaler(scale=2.0 ** 12, max_skipped_in_a_row=3, xp=model.xp)
    opt = xpmodel.AdamW(model, lr=1e-3)
    idx, targets = batch()
    for step in range(1, 4):
        model.zero_grad()
        model.forward_backward(idx, targets, scale=scaler.device_scale)
        model.flat_grads[0] = np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            _, finite = clipped_step(opt, 1.0, scaler.device_scale)
        scaler.record(finite)
        if step < 3:
            scaler.check(step)
    with pytest.raises(xpmodel.errors.XpmodelError, match="step 3: 3 steps in a row overflowed"):
        scaler.check(3)
    assert scaler.state_dict()["skipped_total"] == 3 and scaler.scale == 2.0 ** 9


def test_cuda_request_without_a_gpu_is_a_clear_error():
    if cuda_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(xpmodel.backend.DeviceError, match="pip install"):
        xpmodel.GPT(CONFIG, device="cuda")


def test_device_strings():
    from xpmodel.backend import DeviceError, get_device
    assert str(get_device("cpu")) == "cpu"
    assert get_device("auto").kind == ("cuda" if cuda_available() else "cpu")
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(DeviceError, match="expected cpu, cuda, cuda:N or auto"):
            get_device(bad)


def test_fp16_with_dropout_trains(device):
    config = xpmodel.GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.1)
    model = xpmodel.GPT(config, device=device, seed=1, precision="fp16")
    idx, targets = batch()
    first = float(model.forward_backward(idx, targets, scale=256.0))
    second = float(model.forward_backward(idx, targets, scale=256.0))
    assert np.isfinite(first) and first != second          # fresh masks each pass
    assert bool(np.isfinite(to_host(model.flat_grads)).all())


def test_cached_generation_matches_uncached(device):
    from xpmodel.model.generate import generate
    model = xpmodel.GPT(xpmodel.GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=4,
                                          n_embd=32), device=device, seed=4)
    prompt = [1, 5, 9, 2]
    for kwargs in (dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=3)):
        cached = list(generate(model, prompt, 30, use_cache=True, **kwargs))
        uncached = list(generate(model, prompt, 30, use_cache=False, **kwargs))
        assert cached == uncached and len(cached) == 30


def test_a_run_trained_on_a_device_loads_on_the_cpu(device, tmp_path, monkeypatch, tinyshakespeare):
    from xpmodel.config import load_config
    from xpmodel.train import Trainer
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    tiny = str(Path(__file__).resolve().parent / "tiny-run.yaml")
    config = load_config(tiny, [f"data.source={tinyshakespeare}", "train.max_iters=6",
                                "train.eval_interval=3", "train.save_interval=3"])
    trainer = Trainer.start(config, device=device, out=tmp_path / "run", show=False)
    trainer.run()
    model, _ = xpmodel.load(tmp_path / "run", device="cpu")
    for name, value in trainer.model.params.items():
        np.testing.assert_array_equal(model.params[name], to_host(value))


def test_fp16_run_skips_an_overflow_and_resumes_on_the_other_backend(device, tmp_path, monkeypatch,
                                                                    tinyshakespeare):
    """On a GPU the steps between log lines are decided on the device; every
    step still reaches metrics.jsonl, and the skipped one is marked. The run
    resumes on the other backend where this machine has both (on the same one
    where it has only the CPU)."""
    from xpmodel.config import load_config
    from xpmodel.train import Trainer
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    tiny = str(Path(__file__).resolve().parent / "tiny-run.yaml")
    config = load_config(tiny, [f"data.source={tinyshakespeare}", "train.max_iters=10",
                                "train.precision=fp16", "train.log_interval=5",
                                "train.eval_interval=10", "train.save_interval=10"])
    trainer = Trainer.start(config, device=device, out=tmp_path / "run", show=False)
    start_scale = trainer.scaler.scale
    forward_backward = trainer.model.forward_backward

    def overflow_at_step_3(x, y, scale=1.0):
        loss = forward_backward(x, y, scale=scale)
        if trainer.step + 1 == 3:
            trainer.model.flat_grads[7] = float("inf")
        return loss
    trainer.model.forward_backward = overflow_at_step_3
    trainer.run()
    records = [r for r in trainer.run_dir.read_metrics() if r["type"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["step"] for r in records if r["skipped"]] == [3]
    assert records[1]["loss_scale"] == start_scale and records[2]["loss_scale"] == start_scale / 2
    assert all(np.isfinite(r["loss"]) for r in records)
    assert trainer.optimizer.step_count == 9
    other = "cpu" if device == "cuda" else ("cuda" if cuda_available() else "cpu")
    resumed = Trainer.resume(trainer.run_dir.path, device=other, show=False)
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()
    assert resumed.optimizer.step_count == 9
    np.testing.assert_array_equal(to_host(resumed.model.flat_params), to_host(trainer.model.flat_params))


def test_dropout_on_emulated_cuda_matches_the_cpu_with_the_same_masks(monkeypatch):
    """A pass on a GPU draws its masks from the counter-based generator
    (cuda/random.py); the CPU given the same masks (that generator's NumPy
    reference, tests/counter_masks.py) must give the same loss and gradients:
    masks on the attention probabilities (heads of 16: the T x T path) and in
    the fused residual add. B = 1: one shard, one generator, on both."""
    from xpmodel.model import gpt
    if cuda_emulator.compiler() is None:
        pytest.skip("the CUDA emulator needs g++")
    drawn_on_the_device = gpt.pass_generator
    monkeypatch.setattr(gpt, "pass_generator", lambda device, seed: drawn_on_the_device(device, seed)
                        if device.is_cuda else ReferenceMasks(seed))
    config = xpmodel.GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64,
                               dropout=0.2)
    idx, targets = batch(B=1)
    cpu = xpmodel.GPT(config, seed=5)
    cpu_loss = float(cpu.forward_backward(idx, targets))
    with cuda_emulator.emulated_cuda():
        gpu = xpmodel.GPT(config, device="cuda", seed=5)
        gpu_loss = float(gpu.forward_backward(idx, targets))
        assert abs(gpu_loss - cpu_loss) / cpu_loss < 1e-5
        assert relative_error(gpu.flat_grads, cpu.flat_grads) < 1e-4
    plain = xpmodel.GPT(dataclasses.replace(config, dropout=0.0), seed=5)
    plain.forward_backward(idx, targets)
    assert relative_error(plain.flat_grads, cpu.flat_grads) > 0.1   # the masks took effect


LLAMA_STYLE = dict(norm="rmsnorm", position="rope", qk_norm=True, mlp="swiglu", n_kv_head=2,
                   bias=False, tie_embeddings=False)


@pytest.mark.parametrize("options", [LLAMA_STYLE, dict(LLAMA_STYLE, qk_norm=False),
                                     dict(mlp="relu2", bias=False),
                                     dict(norm="rmsnorm", n_kv_head=1)],
                         ids=["llama-style", "llama", "relu2-no-bias", "rmsnorm-mqa"])
def test_architecture_options_match_float64_in_both_precisions(device, options):
    """Every option on every backend: float32 within 1e-4 and fp16 within 3e-2
    of a NumPy float64 reference, loss and every gradient."""
    config = xpmodel.GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64,
                               **options)
    idx, targets = batch()
    reference = xpmodel.GPT(config, dtype="float64", seed=7)
    ref_loss = float(reference.forward_backward(idx, targets))
    model = xpmodel.GPT(config, device=device, seed=7)
    assert abs(float(model.forward_backward(idx, targets)) - ref_loss) / ref_loss < 1e-5
    assert relative_error(model.flat_grads, reference.flat_grads) < 1e-4
    assert relative_error(model.forward(idx), reference.forward(idx)) < 1e-4
    mixed = xpmodel.GPT(config, device=device, seed=7, precision="fp16")
    loss = float(mixed.forward_backward(idx, targets, scale=256.0))
    mixed.flat_grads *= 1.0 / 256.0
    assert abs(loss - ref_loss) / ref_loss < 5e-3
    assert relative_error(mixed.flat_grads, reference.flat_grads) < 3e-2


@pytest.mark.parametrize("n_head,n_embd,options", [
    (2, 128, {}),
    (4, 256, LLAMA_STYLE),
    (4, 256, dict(LLAMA_STYLE, qk_norm=False)),
], ids=["gpt2", "llama-style", "llama"])
def test_fp16_gradients_with_heads_of_64_dimensions(device, monkeypatch, n_head, n_embd, options):
    """Heads of 64 dimensions and T = 64: on CUDA, attention runs on the
    tensor-core kernels of xpmodel/cuda/flash.py (checked by counting), GPT-2's
    and grouped-query attention with RoPE (and QK-norm) alike, the latter on
    the H_kv key/value heads themselves, each read for its group of query
    heads (split by cuda/rope_heads.py without QK-norm)."""
    from xpmodel.cuda import flash
    config = xpmodel.GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=n_head,
                               n_embd=n_embd, **options)
    rng = np.random.default_rng(11)
    idx = rng.integers(0, config.vocab_size, (2, 64))
    targets = np.roll(idx, -1, axis=1)
    reference = xpmodel.GPT(config, dtype="float64", seed=5)
    ref_loss = float(reference.forward_backward(idx, targets))
    monkeypatch.setattr(flash, "ENABLED", True)
    calls, original = [], flash.flash_forward

    def counted(heads, dropout=None):
        calls.append(heads[1].shape)            # k: (B, H_kv, T, D)
        return original(heads, dropout)
    monkeypatch.setattr(flash, "flash_forward", counted)
    model = xpmodel.GPT(config, device=device, seed=5, precision="fp16")
    loss = float(model.forward_backward(idx, targets, scale=256.0))
    model.flat_grads *= 1.0 / 256.0
    assert calls == ([(2, config.kv_heads, 64, 64)] * config.n_layer if device == "cuda" else [])
    assert abs(loss - ref_loss) / ref_loss < 5e-3
    assert relative_error(model.flat_grads, reference.flat_grads) < 3e-2


@pytest.mark.parametrize("options", [{}, LLAMA_STYLE], ids=["gpt2", "llama-style"])
def test_dropout_on_a_gpu_is_drawn_inside_the_flash_kernels(device, monkeypatch, options):
    """A training pass on a GPU draws its dropout masks from a counter-based
    generator (cuda/random.py), so attention with dropout stays on the flash
    kernels, which draw the probabilities' mask themselves: the same loss and
    gradients as the T x T path with the same masks, also with every block
    recomputed in backward (its masks drawn again from the block's seed)."""
    from xpmodel.cuda import flash
    if device == "cpu":
        pytest.skip("the CPU draws its masks with NumPy, outside any kernel")
    config = xpmodel.GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_embd=256,
                               dropout=0.2, **options)
    rng = np.random.default_rng(11)
    idx = rng.integers(0, config.vocab_size, (2, 64))
    targets = np.roll(idx, -1, axis=1)
    calls, original = [], flash.flash_forward

    def counted(heads, dropout=None):
        calls.append(dropout)
        return original(heads, dropout)
    monkeypatch.setattr(flash, "flash_forward", counted)

    def pass_with(enabled, recompute="none"):
        monkeypatch.setattr(flash, "ENABLED", enabled)
        model = xpmodel.GPT(config, device=device, seed=5, precision="fp16", recompute=recompute)
        loss = float(model.forward_backward(idx, targets))
        return loss, to_host(model.flat_grads).astype(np.float64)

    loss, grads = pass_with(True)
    assert len(calls) == config.n_layer and all(rate == 0.2 for rate, _ in calls)
    assert len({key for _, key in calls}) == config.n_layer   # a stream per layer
    softmax_loss, softmax_grads = pass_with(False)
    assert len(calls) == config.n_layer
    assert abs(loss - softmax_loss) / softmax_loss < 2e-3
    assert relative_error(grads, softmax_grads) < 2e-2
    del calls[:]
    recomputed_loss, recomputed_grads = pass_with(True, recompute="block")
    forward_keys, backward_keys = [[key for _, key in part] for part in
                                   (calls[:config.n_layer], calls[config.n_layer:])]
    assert len(calls) == 2 * config.n_layer and backward_keys == forward_keys[::-1]
    softmax_loss, softmax_grads = pass_with(False, recompute="block")
    assert abs(recomputed_loss - softmax_loss) / softmax_loss < 2e-3
    assert relative_error(recomputed_grads, softmax_grads) < 2e-2
    config = dataclasses.replace(config, dropout=0.0)
    assert relative_error(pass_with(True)[1], grads) > 0.1   # the masks took effect
