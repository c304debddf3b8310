"""The two ways a model runs on CUDA: "fused" (the kernels of xpmodel/cuda)
and "xp" (every layer's own `xp` code on CuPy, cuBLAS only for the matrix
products). They must compute the same thing: the same loss and gradients in
float32 and in mixed float16, the same ten training steps, the same
generated tokens, and a whole `xpmodel train --device cuda
train.kernels=xp` run. The "xp" path must launch no kernel of its own.

Each case runs on a GPU when CuPy sees one, and on the CPU emulator of
tests/cuda_emulator (where the arrays are NumPy's underneath, so the "xp"
code runs on the emulator's stand-in for CuPy)."""
from pathlib import Path

import numpy as np
import pytest

import xpmodel
from xpmodel.backend import cuda_available, fused_kernels, to_host, use_kernels
from xpmodel.train.optim import clipped_step

import cuda_emulator
from cli_helpers import run_cli, write_corpus

GPT2 = xpmodel.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
LLAMA = xpmodel.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32,
                          norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, bias=False,
                          qk_norm=True)
CONFIGS = {"gpt2": GPT2, "llama": LLAMA}
# largest gradient difference, relative to the gradient's norm, per parameter
# (on the emulator at most 4e-7 in float32 and 1.2e-3 in float16)
GRAD_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2}
LOSS_TOLERANCE = {"fp32": 1e-6, "fp16": 1e-4}
TINY = Path(__file__).resolve().parent / "tiny-run.yaml"


@pytest.fixture(params=["cuda", "emulated-cuda"])
def cuda(request):
    """A CUDA device: a GPU, or the kernel emulator standing in for one."""
    if request.param == "cuda":
        if not cuda_available():
            pytest.skip("needs CuPy and a CUDA GPU")
        yield "cuda"
        return
    if cuda_emulator.compiler() is None:
        pytest.skip("the CUDA emulator needs g++")
    with cuda_emulator.emulated_cuda():
        yield "cuda"


@pytest.fixture
def launches(cuda, monkeypatch):
    """Names of the kernels launched from here on (raw or elementwise)."""
    from xpmodel import backend
    from xpmodel.cuda import adamw, compile as kernels
    launched = []
    for kind in ("RawKernel", "ElementwiseKernel"):
        make = getattr(backend._cupy, kind)

        def counting(*args, make=make, kind=kind, **kwargs):
            kernel = make(*args, **kwargs)

            def launch(*call_args, **call_kwargs):
                launched.append(kind)
                return kernel(*call_args, **call_kwargs)
            return launch
        monkeypatch.setattr(backend._cupy, kind, counting)
    monkeypatch.setattr(kernels, "_compiled", {})   # compiled afresh, through the counters
    monkeypatch.setattr(adamw, "_kernel", None)
    return launched


def batch(config, B=2, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, (B, config.block_size))
    return idx, np.roll(idx, -1, axis=1)


def gradient_errors(a, b):
    """name -> max |a - b| / ||b|| over the named gradients of two models."""
    errors = {}
    for name, want in b.grads.items():
        want, got = to_host(want).astype(np.float64), to_host(a.grads[name]).astype(np.float64)
        errors[name] = float(np.max(np.abs(got - want)) / max(np.linalg.norm(want), 1e-30))
    return errors


def test_the_switch_itself():
    assert not fused_kernels(np.zeros(3))          # NumPy arrays always take the xp code
    with pytest.raises(ValueError, match="kernels must be one of fused, xp"):
        with use_kernels("triton"):
            pass
    with pytest.raises(ValueError, match="kernels must be one of fused, xp"):
        xpmodel.GPT(GPT2, kernels="cuda")
    from xpmodel.config import load_config
    from xpmodel.errors import UsageError
    assert load_config(TINY, ["train.kernels=xp"]).train.kernels == "xp"
    with pytest.raises(UsageError, match="train.kernels"):
        load_config(TINY, ["train.kernels=triton"])
    # on the CPU both modes are the same code: bit for bit the same
    idx, targets = batch(GPT2)
    losses = []
    for kernels in ("fused", "xp"):
        model = xpmodel.GPT(GPT2, seed=3, kernels=kernels)
        losses.append(float(model.forward_backward(idx, targets)))
    assert losses[0] == losses[1]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fused_and_xp_give_the_same_loss_and_every_gradient(cuda, launches, name, precision):
    config = CONFIGS[name]
    idx, targets = batch(config)
    models, losses = {}, {}
    for kernels in ("fused", "xp"):
        model = xpmodel.GPT(config, device=cuda, seed=1, precision=precision, kernels=kernels)
        scale = 256.0 if precision == "fp16" else 1.0
        del launches[:]
        losses[kernels] = float(model.forward_backward(idx, targets, scale=scale))
        assert (len(launches) > 0) == (kernels == "fused"), launches
        model.flat_grads *= 1.0 / scale
        models[kernels] = model
    assert abs(losses["xp"] - losses["fused"]) <= LOSS_TOLERANCE[precision] * losses["fused"]
    errors = gradient_errors(models["xp"], models["fused"])
    assert max(errors.values()) < GRAD_TOLERANCE[precision], \
        {k: v for k, v in errors.items() if v >= GRAD_TOLERANCE[precision]}
    logits = {k: to_host(m.eval().forward(idx)) for k, m in models.items()}
    np.testing.assert_allclose(logits["xp"], logits["fused"], rtol=0,
                               atol=10 * LOSS_TOLERANCE[precision] * np.abs(logits["fused"]).max())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ten_training_steps_track_each_other(cuda, launches, precision):
    """AdamW, clipping and (fp16) loss scaling as the trainer steps; the xp
    run launches no kernel of its own, optimizer included."""
    config = LLAMA if precision == "fp16" else GPT2
    idx, targets = batch(config, B=4, seed=5)
    curves, params = {}, {}
    for kernels in ("fused", "xp"):
        model = xpmodel.GPT(config, device=cuda, seed=2, precision=precision, kernels=kernels)
        opt = xpmodel.AdamW(model, lr=3e-3)
        scaler = xpmodel.LossScaler(xp=model.xp) if precision == "fp16" else None
        del launches[:]
        losses = []
        for _ in range(10):
            model.zero_grad()
            scale = scaler.device_scale if scaler else 1.0
            losses.append(float(model.forward_backward(idx, targets, scale=scale)))
            _, finite = clipped_step(opt, 1.0, scale)
            if scaler:
                scaler.record(finite)
        assert (len(launches) > 0) == (kernels == "fused"), launches
        curves[kernels], params[kernels] = np.array(losses), to_host(model.flat_params)
    assert curves["fused"][-1] < 0.9 * curves["fused"][0]
    np.testing.assert_allclose(curves["xp"], curves["fused"], rtol=10 * LOSS_TOLERANCE[precision])
    # Adam divides by the gradient's running scale, so a rounding difference in a
    # gradient near 0 can move its weight by up to lr a step: compare the weights'
    # difference to how far they moved (emulator: 1e-5 in fp32, 1.5e-2 in fp16)
    start = to_host(xpmodel.GPT(config, seed=2).flat_params)
    drift = np.linalg.norm(params["xp"] - params["fused"]) / np.linalg.norm(params["fused"] - start)
    assert drift < (1e-3 if precision == "fp32" else 1e-1), drift


def test_generation_gives_the_same_tokens(cuda, launches):
    """Prefill and decode through the KV cache, in each mode."""
    from xpmodel.model.generate import generate
    tokens = {}
    for kernels in ("fused", "xp"):
        model = xpmodel.GPT(LLAMA, device=cuda, seed=4, kernels=kernels).eval()
        del launches[:]
        tokens[kernels] = list(generate(model, [1, 2, 3], 20, temperature=0))
        assert (len(launches) > 0) == (kernels == "fused"), launches
    assert tokens["xp"] == tokens["fused"]


def test_train_with_xp_kernels_end_to_end(cuda, launches, tmp_path, capsys, monkeypatch):
    """`xpmodel train --device cuda train.kernels=xp` in mixed fp16, with
    evaluations, samples and checkpoints, then resumed, sampled and
    evaluated on the xp path: no kernel of xpmodel's own is launched."""
    from xpmodel.train.rundir import RunDir
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--config", TINY, "--device", "cuda", "--out", run,
                             "--quiet", f"data.source={corpus}", "train.kernels=xp",
                             "train.precision=fp16", "train.max_iters=10", "train.save_interval=5",
                             "train.eval_interval=5", "train.sample_interval=10",
                             "train.sample_tokens=8")
    assert code == 0, err
    assert "step 10: val loss" in out and "--- sample at step 10 ---" in out
    assert RunDir(run).load_config().train.kernels == "xp"
    assert RunDir(run).checkpoint_steps()[-1] == 10
    code, out, err = run_cli(capsys, "train", "--resume", run, "--device", "cuda", "--quiet",
                             "train.max_iters=12")
    assert code == 0, err
    steps = [r["step"] for r in RunDir(run).read_metrics() if r["type"] == "train"]
    assert steps == list(range(1, 13)) and RunDir(run).checkpoint_steps()[-1] == 12
    code, out, err = run_cli(capsys, "sample", run, "--device", "cuda", "--kernels", "xp",
                             "--prompt", "The king", "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0 and out.startswith("The king"), err
    code, out, err = run_cli(capsys, "eval", run, "--device", "cuda", "--kernels", "xp",
                             "--batches", "2")
    assert code == 0 and "loss" in out, err
    assert launches == [], out
