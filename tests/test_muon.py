"""Muon (xpmodel/train/muon.py): torch.optim.Muon's update step for step in float64,
the Newton-Schulz iteration's singular values, the CUDA path on the emulator,
settings that cannot work, and Muon inside the trainer (exact resume, two
ranks). The kill -9 resume test for Muon is in test_reliability.py."""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cuda_emulator
import xpmodel
from xpmodel import backend
from xpmodel.backend import to_host
from xpmodel.config import load_config
from xpmodel.errors import UsageError, XpmodelError
from xpmodel.ns_coefficients import NS_BOUND
from xpmodel.train.muon import (HIDDEN_MATRICES, NS_COEFFICIENTS, Muon, check_ns_coefficients,
                                newton_schulz, orthogonalise)
from xpmodel.train.optim import clipped_step
from xpmodel.train import Trainer

torch = pytest.importorskip("torch")

TINY = Path(__file__).resolve().parent / "tiny-run.yaml"
GPT2 = xpmodel.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
LLAMA = xpmodel.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32,
                          norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, bias=False,
                          qk_norm=True, tie_embeddings=False)


def is_hidden(name):
    return name.startswith("h.") and name.split(".", 2)[2] in HIDDEN_MATRICES


def batch(rng, config, B=4):
    idx = rng.integers(0, config.vocab_size, (B, config.block_size))
    return idx, np.roll(idx, -1, axis=1)


# ---- against torch.optim.Muon ------------------------------------------------------

TORCH_CASES = {   # Muon's settings beyond the defaults, per case
    "gpt2-nesterov-original-decay": (GPT2, dict(muon_weight_decay=0.1)),
    "llama-plain-match_rms_adamw": (LLAMA, dict(nesterov=False, adjust_lr="match_rms_adamw")),
    "gpt2-momentum-0.8-3-steps": (GPT2, dict(momentum=0.8, ns_steps=3)),
    "gpt2-plain-custom-coefficients-match_rms_adamw-decay": (
        GPT2, dict(nesterov=False, ns_coefficients=(3.0, -3.2, 1.2), adjust_lr="match_rms_adamw",
                   muon_weight_decay=0.05)),
    "llama-momentum-0.8-custom-3-steps-original-decay": (
        LLAMA, dict(momentum=0.8, ns_coefficients=(2.0, -1.5, 0.5), ns_steps=3,
                    muon_weight_decay=0.2)),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_fifty_steps_match_torch_muon_and_adamw_in_float64(case, monkeypatch):
    """xpmodel's weights after each of 50 steps (gradients of xpmodel's model,
    clipped to norm 1, a cosine learning rate) against torch.optim.Muon on the
    hidden matrices, given as (out, in), and torch.optim.AdamW on the rest,
    fed the same gradients: within 1e-9 relative, for momentum, Nesterov,
    Newton-Schulz coefficients and steps, weight decay and both shape
    adjustments. torch.optim.Muon iterates in bfloat16; its cast is made a
    float64 copy so both run in float64."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())
    config, settings = TORCH_CASES[case]
    settings = {"momentum": 0.95, "nesterov": True, "ns_coefficients": NS_COEFFICIENTS["jordan"],
                "ns_steps": 5, "muon_weight_decay": 0.0, "adjust_lr": "original", **settings}
    lr, muon_lr = 3e-3, 0.02
    model = xpmodel.GPT(config, dtype="float64", seed=3)
    opt = Muon(model, lr=lr, muon_lr=muon_lr, weight_decay=0.1, **settings)

    def as_torch(name, array):   # torch holds linear weights as (out, in)
        return torch.tensor(array.T.copy() if is_hidden(name) else array.copy())

    names = model.layout.names
    theirs = {n: as_torch(n, model.params[n]).requires_grad_() for n in names}
    muon = torch.optim.Muon([theirs[n] for n in names if is_hidden(n)], lr=muon_lr,
                            weight_decay=settings["muon_weight_decay"], momentum=settings["momentum"],
                            nesterov=settings["nesterov"], ns_coefficients=settings["ns_coefficients"],
                            ns_steps=settings["ns_steps"], adjust_lr_fn=settings["adjust_lr"])
    adamw = torch.optim.AdamW(
        [{"params": [theirs[n] for n in names if not is_hidden(n) and theirs[n].ndim == 2],
          "weight_decay": 0.1},
         {"params": [theirs[n] for n in names if theirs[n].ndim == 1], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(0)
    worst = 0.0
    for step in range(50):
        model.zero_grad()
        model.forward_backward(*batch(rng, config))
        for n in names:
            theirs[n].grad = as_torch(n, model.grads[n])
        torch.nn.utils.clip_grad_norm_(list(theirs.values()), 1.0)
        rate = 0.5 * (1 + math.cos(math.pi * step / 50))
        opt.lr = lr * rate
        for group in adamw.param_groups:
            group["lr"] = lr * rate
        for group in muon.param_groups:
            group["lr"] = muon_lr * rate
        clipped_step(opt, 1.0)
        muon.step()
        adamw.step()
        for n in names:
            expected = theirs[n].detach().numpy()
            expected = expected.T if is_hidden(n) else expected
            worst = max(worst, np.max(np.abs(model.params[n] - expected)) / np.max(np.abs(expected)))
    assert worst < 1e-9
    assert opt.step_count == 50
    # the step moved every hidden matrix by far more than the tolerance
    assert all(np.max(np.abs(model.params[n] - xpmodel.GPT(config, dtype="float64", seed=3).params[n]))
               > 1e-3 for n in names if is_hidden(n))


# ---- Newton-Schulz ---------------------------------------------------------------

def scalar_map(sigma, coefficients, steps):
    a, b, c = coefficients
    for _ in range(steps):
        sigma = a * sigma + b * sigma ** 3 + c * sigma ** 5
    return sigma


def matrix_with_singular_values(rng, sigma, rows, cols):
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(sigma))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(sigma))))
    return (u * sigma) @ v.T


@pytest.mark.parametrize("rows, cols", [(24, 96), (96, 24), (48, 48)])
def test_newton_schulz_maps_each_singular_value_through_its_polynomial(rows, cols):
    """The iteration keeps the singular vectors and sends every singular value
    sigma through p(x) = a x + b x^3 + c x^5, k times, from sigma / ||G||_F."""
    rng = np.random.default_rng(1)
    n = min(rows, cols)
    sigma = np.geomspace(1e-3, 1.0, n) * 7.0
    g = matrix_with_singular_values(rng, sigma, rows, cols)
    for name, steps in [("jordan", 5), ("jordan", 3), ("cubic", 20)]:
        x = orthogonalise(g, NS_COEFFICIENTS[name], steps)
        assert x.shape == g.shape
        found = np.sort(np.linalg.svd(x, compute_uv=False))
        expected = np.sort(scalar_map(sigma / np.linalg.norm(g), NS_COEFFICIENTS[name], steps))
        np.testing.assert_allclose(found, expected, rtol=1e-9, atol=1e-12)
        # the singular vectors are G's: X = U p(S) V^T
        u, _, vt = np.linalg.svd(g, full_matrices=False)
        np.testing.assert_allclose(u.T @ x @ vt.T, np.diag(np.diag(u.T @ x @ vt.T)), atol=1e-9)


def test_newton_schulz_singular_values_land_in_the_documented_band():
    """muon.py's documented band: after 5 "jordan" steps every singular value
    sigma >= 0.0016 ||G||_F is in [0.68, 1.21], and those below
    0.0015 ||G||_F end below 0.68; the "cubic" set converges to 1.
    In float32 too, and for the stacked matrices of a real Muon step."""
    rng = np.random.default_rng(2)
    for rows, cols in [(32, 128), (128, 128), (512, 128)]:
        g = rng.standard_normal((rows, cols)) * rng.uniform(0.5, 2.0, cols)   # uneven columns
        u, sigma, vt = np.linalg.svd(g, full_matrices=False)
        large = sigma >= 0.0016 * np.linalg.norm(g)
        small = sigma < 0.0015 * np.linalg.norm(g)
        assert 0 < large.sum() and (rows != cols or not large.all())   # a square one has tiny ones
        for dtype in (np.float64, np.float32):
            x = orthogonalise(g.astype(dtype), steps=5)
            assert x.dtype == dtype
            x = x.astype(np.float64)
            mapped = np.diag(u.T @ x @ vt.T)    # what became of each of G's singular values
            assert np.all((0.68 <= mapped[large]) & (mapped[large] <= 1.21)), (rows, cols, dtype)
            assert np.all(mapped[small] < 0.68)
            assert np.linalg.svd(x, compute_uv=False).max() <= 1.21
        s = np.linalg.svd(orthogonalise(g, NS_COEFFICIENTS["cubic"], 25), compute_uv=False)
        np.testing.assert_allclose(s, 1.0, atol=1e-6)
    x = np.geomspace(0.0016, 1.0, 100_001)
    y = scalar_map(x, NS_COEFFICIENTS["jordan"], 5)
    assert 0.68 <= y.min() and y.max() <= 1.21
    x = np.geomspace(1e-6, 0.00149, 10_001)
    y = scalar_map(x, NS_COEFFICIENTS["jordan"], 5)
    assert np.all(np.diff(y) > 0) and y.max() < 0.68 and np.all(y <= 3.4445 ** 5 * x)


@pytest.mark.parametrize("name, steps", [("jordan", 12), ("jordan", 99), ("cubic", 30),
                                         ("bernstein 3,-3.2,1.2", 60)])
def test_many_steps_on_a_rank_deficient_wide_matrix_stay_bounded_in_float32(name, steps):
    """A wide gradient of low rank (a batch of few tokens gives one): rounding
    leaves eigenvalues of its Gram matrix just below zero, which the iteration
    on Gram matrices alone grows by a^2 a step (NaN from 11 "jordan" steps).
    Any allowed step count stays finite, bounded and, on G's singular values,
    as the float64 iteration of the plain order maps them."""
    rng = np.random.default_rng(3)
    sigma = np.geomspace(0.05, 1.0, 8)
    g = matrix_with_singular_values(rng, sigma, 32, 96)          # rank 8 of 32
    coefficients = ACCEPTED[name]
    x = orthogonalise(g.astype(np.float32), coefficients, steps).astype(np.float64)
    assert np.isfinite(x).all() and np.linalg.svd(x, compute_uv=False).max() <= NS_BOUND
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    mapped = np.diag(u[:, :8].T @ x @ vt[:8].T)
    expected = scalar_map(sigma[::-1] / np.linalg.norm(g), coefficients, steps)   # as svd orders
    np.testing.assert_allclose(mapped, expected, atol=2e-3)


ACCEPTED = {   # coefficient sets in use: xpmodel's two and published custom ones
    "jordan": NS_COEFFICIENTS["jordan"], "cubic": NS_COEFFICIENTS["cubic"],
    "bernstein 3,-3.2,1.2": (3.0, -3.2, 1.2), "quintic 15/8,-10/8,3/8": (1.875, -1.25, 0.375),
    "2,-1.5,0.5": (2.0, -1.5, 0.5),
}
REFUSED = {   # (coefficients, ns_steps, the first iteration that leaves (0, NS_BOUND], what it reaches)
    "b's sign lost": ((3.4445, 4.775, 2.0315), 5, 1, "10.3"),
    "overshoots, then blows up": ((3.9505, -8.7481, 6.1616), 5, 2, "12.3"),
    "doubles": ((2.0, 0.0, 0.0), 2, 2, "4"),
    "flips signs": ((1.5, -2.0, 0.0), 1, 1, "-0.5"),
}


def iterates_on_a_grid(coefficients, steps):
    """p^1(x), ..., p^steps(x) for x on a fine grid of (0, 1]."""
    x = np.concatenate([np.geomspace(1e-6, 1e-2, 1000), np.linspace(1e-2, 1.0, 100_000)])
    values = []
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            x = scalar_map(x, coefficients, 1)
            values.append(x)
    return np.array(values)


@pytest.mark.parametrize("name", ACCEPTED)
def test_coefficients_in_use_pass_the_check_and_stay_bounded(name):
    """check_ns_coefficients passes them at every step count, and iterating
    them on a fine grid agrees: every singular value stays in (0, NS_BOUND]."""
    for steps in (1, 3, 5, 20, 99):
        check_ns_coefficients(ACCEPTED[name], steps)
    values = iterates_on_a_grid(ACCEPTED[name], 20)
    assert values.min() > 0 and values.max() <= NS_BOUND


@pytest.mark.parametrize("name", REFUSED)
def test_coefficients_that_diverge_or_flip_signs_are_refused(name):
    """The check names the first iteration that leaves (0, NS_BOUND], the
    same one iterating on a fine grid finds; fewer steps pass."""
    coefficients, steps, first_bad, reached = REFUSED[name]
    with pytest.raises(ValueError) as info:
        check_ns_coefficients(coefficients, steps)
    assert f"iteration {first_bad} " in str(info.value) and f" {reached};" in str(info.value)
    values = iterates_on_a_grid(coefficients, steps)
    inside = (values > 0).all(axis=1) & (values <= NS_BOUND).all(axis=1)
    assert list(inside).index(False) + 1 == first_bad
    if first_bad > 1:
        check_ns_coefficients(coefficients, first_bad - 1)


def test_a_non_finite_update_is_refused_before_any_weight_changes(monkeypatch):
    """Finite gradients whose orthogonalisation overflows (coefficients forced
    past the check): an error that names Muon's update, the weights as they
    were, and no NumPy warning from the worker threads when the caller
    silences them (as the trainer does)."""
    import warnings
    monkeypatch.setenv("XPMODEL_NUM_THREADS", "2")
    model = xpmodel.GPT(GPT2, dtype="float64", seed=0)
    model.forward_backward(*batch(np.random.default_rng(0), GPT2))
    opt = Muon(model, lr=1e-3)
    opt.coefficients = REFUSED["b's sign lost"][0]
    before = model.flat_params.copy()
    with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
        warnings.simplefilter("error")
        with pytest.raises(XpmodelError, match="Muon's orthogonalised update is not finite"):
            clipped_step(opt, 1.0)
    assert np.array_equal(model.flat_params, before) and opt.step_count == 0


def test_a_stack_is_each_matrix_on_its_own():
    rng = np.random.default_rng(3)
    stack = rng.standard_normal((3, 8, 20))
    stack /= np.linalg.norm(stack, axis=(1, 2), keepdims=True)
    together = newton_schulz(stack)
    for k in range(3):
        np.testing.assert_allclose(together[k], newton_schulz(stack[k:k + 1])[0], rtol=1e-13, atol=1e-15)


def test_a_zero_gradient_gives_a_zero_update():
    model = xpmodel.GPT(GPT2, dtype="float64", seed=0)
    before = model.flat_params.copy()
    opt = Muon(model, lr=1e-3, weight_decay=0.0)
    opt.step()
    assert np.array_equal(model.flat_params, before) and opt.step_count == 1


# ---- the CUDA path: on a GPU where CuPy sees one, and on the emulator ----------------

@pytest.fixture(params=["gpu", "emulated"])
def cuda_device(request):
    """The device string "cuda", on a real GPU or on the CPU emulator of the kernels."""
    if request.param == "gpu":
        if not backend.cuda_available():
            pytest.skip("needs CuPy and a CUDA GPU")
        yield "cuda"
        return
    if cuda_emulator.compiler() is None:
        pytest.skip("the CUDA emulator needs g++")
    with cuda_emulator.emulated_cuda():
        yield "cuda"


SMALL = xpmodel.GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
SMALL_HIDDEN = [f"h.{i}.{name}" for i in range(2) for name in HIDDEN_MATRICES]


def train_steps(device, steps=3, ns_dtype=None, precision="fp32"):
    model = xpmodel.GPT(SMALL, device=device, seed=5, precision=precision)
    opt = Muon(model, lr=3e-3, muon_lr=0.02, muon_weight_decay=0.1, ns_dtype=ns_dtype)
    rng = np.random.default_rng(4)
    for _ in range(steps):
        model.zero_grad()
        model.forward_backward(*batch(rng, SMALL, B=2))
        clipped_step(opt, 1.0)
    return model, opt


def test_cuda_steps_match_the_cpu(cuda_device):
    """Momentum and update kernels, the batched cuBLAS iterations and the
    device-side skip, against the NumPy path."""
    cpu_model, cpu_opt = train_steps("cpu")
    gpu_model, gpu_opt = train_steps(cuda_device)
    scale = np.max(np.abs(cpu_model.flat_params))
    assert np.max(np.abs(to_host(gpu_model.flat_params) - cpu_model.flat_params)) / scale < 1e-5
    np.testing.assert_allclose(to_host(gpu_opt.momentum_buffer), cpu_opt.momentum_buffer,
                               rtol=1e-4, atol=1e-7)
    assert gpu_opt.step_count == 3

    # a step the device decides to skip (non-finite gradients) changes nothing
    state = {k: to_host(v).copy() for k, v in gpu_opt.state_arrays().items()}
    weights = to_host(gpu_model.flat_params).copy()
    gpu_model.flat_grads[:] = float("inf")
    norm, finite = clipped_step(gpu_opt, 1.0)
    assert not bool(finite)
    assert np.array_equal(to_host(gpu_model.flat_params), weights)
    for k, v in gpu_opt.state_arrays().items():
        assert np.array_equal(to_host(v), state[k]), k
    assert gpu_opt.step_count == 3


def test_a_non_finite_update_skips_the_fused_step_and_changes_nothing(cuda_device):
    """Finite gradients whose orthogonalisation overflows (coefficients forced
    past the check) on the device: the step is skipped there, weights, Muon's
    momentum, AdamW's moments and every step count as they were, and
    update_finite says so; the next good step then equals the one a run that
    never met the overflow takes, bit for bit. A step skipped for non-finite
    gradients orthogonalises zeros, so it does not count as an overflow."""
    model, opt = train_steps(cuda_device)
    model.zero_grad()
    model.forward_backward(*batch(np.random.default_rng(7), SMALL, B=2))
    grads = to_host(model.flat_grads).copy()
    weights = to_host(model.flat_params).copy()
    state = {k: to_host(v).copy() for k, v in opt.state_arrays().items()}
    reference = xpmodel.GPT(SMALL, device=cuda_device)   # the same weights and state
    reference.flat_params[...] = model.flat_params
    reference_opt = Muon(reference, lr=3e-3, muon_lr=0.02, muon_weight_decay=0.1)
    reference_opt.load_state_arrays(opt.state_arrays(), 3)

    def unchanged():
        assert np.array_equal(to_host(model.flat_params), weights)
        for k, v in opt.state_arrays().items():
            assert np.array_equal(to_host(v), state[k]), k
        assert opt.step_count == 3 and [part.step_count for part in opt._adamw] == [3, 3]

    opt.coefficients = REFUSED["b's sign lost"][0]
    with np.errstate(over="ignore", invalid="ignore"):   # the emulator's products overflow in NumPy
        norm, finite = clipped_step(opt, 1.0)
    assert bool(finite)
    unchanged()
    assert not bool(opt.update_finite)
    model.flat_grads[:] = float("inf")
    norm, finite = clipped_step(opt, 1.0)
    assert not bool(finite) and bool(opt.update_finite)
    unchanged()

    opt.coefficients = reference_opt.coefficients
    for m, o in ((model, opt), (reference, reference_opt)):
        m.flat_grads[...] = m.xp.asarray(grads)
        clipped_step(o, 1.0)
    assert bool(opt.update_finite) and opt.step_count == 4
    assert np.array_equal(to_host(model.flat_params), to_host(reference.flat_params))
    for k, v in opt.state_arrays().items():
        assert np.array_equal(to_host(v), to_host(reference_opt.state_arrays()[k])), k


def test_cuda_float16_iterations_stay_in_the_band(cuda_device):
    """Under fp16 mixed precision a GPU iterates in float16 with float32
    accumulation: the singular values stay in the band, the step near float32's,
    closer to float64's than torch.optim.Muon's bfloat16 iteration."""
    xp = backend.get_device(cuda_device).xp
    rng = np.random.default_rng(6)
    for rows, cols in [(32, 128), (128, 32)]:
        g = xp.asarray(rng.standard_normal((rows, cols)).astype(np.float32))
        x = orthogonalise(g, dtype=np.float16)
        s = np.linalg.svd(to_host(x).astype(np.float64), compute_uv=False)
        assert 0.66 <= s.min() and s.max() <= 1.23, (s.min(), s.max())
    for precision in ("fp16", "bf16"):
        model = xpmodel.GPT(SMALL, device=cuda_device, precision=precision)
        assert Muon(model, lr=1e-3).ns_dtype == np.float16
    assert Muon(xpmodel.GPT(SMALL, precision="fp16"), lr=1e-3).ns_dtype == np.float32   # CPU

    # one step from the same gradients: the float16 update within 1% of the float32 one
    source = xpmodel.GPT(SMALL, seed=5)
    source.forward_backward(*batch(rng, SMALL, B=2))
    steps = {}
    for dtype in (np.float16, np.float32):
        model = xpmodel.GPT(SMALL, device=cuda_device, seed=5)
        model.flat_grads[...] = xp.asarray(source.flat_grads)
        opt = Muon(model, lr=1e-3, ns_dtype=dtype)
        opt.step()
        hidden = slice(opt.hidden.start, opt.hidden.stop)
        steps[dtype] = to_host(model.flat_params)[hidden] - source.flat_params[hidden]
    difference = np.linalg.norm(steps[np.float16] - steps[np.float32])
    assert difference < 0.03 * np.linalg.norm(steps[np.float32])

    # matrix by matrix, float16 is closer to float64 than torch.optim.Muon's own bfloat16
    from torch.optim._muon import _zeropower_via_newtonschulz
    for name in SMALL_HIDDEN:
        g = source.grads[name].astype(np.float64)
        exact = orthogonalise(g)
        half = to_host(orthogonalise(xp.asarray(g.astype(np.float32)), dtype=np.float16))
        bf16 = _zeropower_via_newtonschulz(torch.tensor(g.T), NS_COEFFICIENTS["jordan"], 5, 1e-7)
        error_half = np.linalg.norm(half - exact) / np.linalg.norm(exact)
        error_bf16 = np.linalg.norm(bf16.double().numpy().T - exact) / np.linalg.norm(exact)
        assert error_half < error_bf16, (name, error_half, error_bf16)


# ---- settings that cannot work ---------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(momentum=-0.1), "momentum must be a finite number in [0, 1), got -0.1"),
    (dict(momentum=1.0), "momentum must be a finite number in [0, 1), got 1.0"),
    (dict(momentum=float("nan")), "momentum must be a finite number in [0, 1), got nan"),
    (dict(ns_steps=0), "ns_steps must be an integer in [1, 99]"),
    (dict(ns_steps=100), "ns_steps must be an integer in [1, 99]"),
    (dict(ns_coefficients="quartic"),
     "ns_coefficients must be jordan, cubic or three finite numbers a,b,c, got 'quartic'"),
    (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients must be jordan, cubic or three finite"),
    (dict(ns_coefficients="-3,4,2"), "slope at zero"),
    (dict(ns_coefficients="1e308,1e308,1e308"), "each coefficient must be within +-1000"),
    (dict(ns_coefficients=(3.0, -2e3, 1.0)), "each coefficient must be within +-1000"),
    (dict(ns_coefficients="3.4445,4.775,2.0315"), "iteration 1 takes a singular value to 10.3"),
    (dict(ns_coefficients="2,0,0", ns_steps=2), "iteration 2 takes a singular value to 4"),
    (dict(muon_lr=0.02, muon_weight_decay=50.0), "muon_lr * muon_weight_decay must be below 1"),
    (dict(adjust_lr="rms"), "adjust_lr must be one of original, match_rms_adamw"),
    (dict(muon_lr=-1.0), "muon_lr must be a finite number >= 0, got -1.0"),
    (dict(muon_weight_decay=-0.1), "muon_weight_decay must be a finite number >= 0, got -0.1"),
    (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    (dict(betas=(0.9,)), "betas must be a pair of numbers in [0, 1), got (0.9,)"),
    (dict(ns_dtype="foo"), "ns_dtype must be None or one of float16, float32, float64, got 'foo'"),
    (dict(ns_dtype="int32"), "ns_dtype must be None or one of float16, float32, float64, got 'int32'"),
    (dict(nesterov="no"), "nesterov must be True or False, got 'no'"),
])
def test_python_api_refuses_settings_that_cannot_work(kwargs, message):
    model = xpmodel.GPT(SMALL)
    with pytest.raises(ValueError) as info:
        Muon(model, **{"lr": 1e-3, **kwargs})
    assert message in str(info.value)


def test_python_api_takes_numpy_scalars_as_python_numbers():
    opt = Muon(xpmodel.GPT(SMALL), lr=np.float32(0.5), muon_lr=np.float32(0.25),
               momentum=np.float32(0.5), ns_steps=np.int64(3), muon_weight_decay=np.float64(0.5),
               ns_dtype=np.float32)
    assert (opt.lr, opt.muon_lr, opt.momentum, opt.ns_steps, opt.muon_weight_decay) == (0.5, 0.25, 0.5, 3, 0.5)
    assert type(opt.lr) is float and type(opt.ns_steps) is int and opt.ns_dtype == np.float32


def test_load_state_checks_names_shapes_and_steps_before_changing_anything():
    model = xpmodel.GPT(SMALL)
    opt = Muon(model, lr=1e-3)
    sizes = opt.state_sizes()
    ones = {name: np.ones(size, dtype=np.float32) for name, size in sizes.items()}
    n, hidden = sizes["m"], sizes["muon_momentum"]
    for arrays, steps, message in [
        ({**ones, "muon_momentum": np.zeros(1)}, 1,
         f"optimizer state muon_momentum: shape (1,) does not match the optimizer's ({hidden},)"),
        ({**ones, "m": np.zeros(n + 5)}, 1, f"optimizer state m: shape ({n + 5},) does not match"),
        ({**ones, "v": np.zeros(n - 5)}, 1, f"optimizer state v: shape ({n - 5},) does not match"),
        ({"m": ones["m"], "v": ones["v"]}, 1, "missing ['muon_momentum'], unexpected []"),
        (ones, -1, "step_count must be an integer >= 0, got -1"),
        (ones, float("nan"), "step_count must be an integer >= 0, got nan"),
    ]:
        with pytest.raises(ValueError) as info:
            opt.load_state_arrays(arrays, steps)
        assert message in str(info.value)
        assert not any(state.any() for state in opt.state_arrays().values()) and opt.step_count == 0
    opt.load_state_arrays(ones, 2)
    assert all(state.all() for state in opt.state_arrays().values()) and opt.step_count == 2


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=sgd", "train.optimizer must be one of adamw, muon"),
    ("train.muon_momentum=-0.5", "train.muon_momentum must be in [0, 1)"),
    ("train.muon_lr=0", "train.muon_lr must be > 0"),
    ("train.muon_ns_steps=0", "train.muon_ns_steps must be in [1, 99]"),
    ("train.muon_ns_coefficients=1,2", "train.muon_ns_coefficients must be jordan, cubic or three"),
    ("train.muon_ns_coefficients=2000,0,0",
     "train.muon_ns_coefficients: each coefficient must be within +-1000, got '2000,0,0'"),
    ("train.muon_ns_coefficients=-1,0,0",
     "train.muon_ns_coefficients: a (the slope at zero) must be positive, got -1"),
    ("train.muon_ns_coefficients=nan,0,0", "must be jordan, cubic or three finite numbers a,b,c"),
    ("train.muon_weight_decay=-1", "train.muon_weight_decay must be >= 0"),
    ("train.muon_adjust_lr=rms", "train.muon_adjust_lr must be one of original, match_rms_adamw"),
    ("train.muon_nesterov=maybe", "train.muon_nesterov must be true or false"),
    ("train.muon_ns_coefficients=3.4445,4.775,2.0315",
     "train.muon_ns_coefficients='3.4445,4.775,2.0315' cannot work with train.muon_ns_steps=5: "
     "iteration 1 takes a singular value to 10.3; each must stay in (0, 2]"),
    ("train.muon_weight_decay=50", "train.muon_lr * train.muon_weight_decay = 1 must be below 1"),
    ("train.muon_weight_decay=60", "lower train.muon_weight_decay below 50"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(UsageError) as info:
        load_config("default", ["train.optimizer=muon", override])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("overrides", [
    ["train.muon_lr=0.05"],
    ["train.muon_momentum=0.9", "train.muon_ns_steps=3"],
])
def test_a_muon_key_set_for_adamw_is_refused(overrides):
    with pytest.raises(UsageError) as info:
        load_config("default", overrides)
    key = overrides[0].partition("=")[0]
    assert f"{key} is set but train.optimizer is adamw" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_muon_key_in_a_file_over_an_adamw_base_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: default\ntrain:\n  muon_weight_decay: 0.1\n")
    with pytest.raises(UsageError, match=r"run\.yaml: train\.muon_weight_decay is set but "
                                         r"train\.optimizer is adamw"):
        load_config(path)


def test_switching_a_muon_config_to_adamw_keeps_its_muon_keys(tmp_path):
    """A layer that chooses the optimizer keeps the Muon keys under it, and a
    saved run config (every key spelled out) loads back."""
    from xpmodel.config import save_config
    config = load_config("speedrun-char-cpu", ["train.optimizer=adamw"])
    assert config.train.optimizer == "adamw"
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert load_config(tmp_path / "config.yaml", ["train.lr=1e-3"]).train.lr == 1e-3


def test_config_reads_every_muon_key():
    config = load_config("default", ["train.optimizer=muon", "train.muon_lr=0.05",
                                     "train.muon_ns_coefficients=3,-3.2,1.2", "train.muon_nesterov=false"])
    t = config.train
    assert (t.optimizer, t.muon_lr, t.muon_nesterov) == ("muon", 0.05, False)
    assert (t.muon_momentum, t.muon_ns_steps, t.muon_adjust_lr) == (0.95, 5, "original")
    assert load_config("default").train.optimizer == "adamw"


# ---- in the trainer --------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("XPMODEL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis"]
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(words, 6000)) + "\n")
    return path


def muon_config(corpus, *overrides):
    return load_config(TINY, [f"data.source={corpus}", "train.optimizer=muon", "train.muon_lr=0.03",
                              "train.grad_accum=2", *overrides])


def train_records(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in run.read_metrics() if r["type"] == "train"]


def test_a_resumed_muon_run_repeats_an_uninterrupted_one_exactly(tmp_path, corpus):
    whole = Trainer.start(muon_config(corpus), out=tmp_path / "whole", show=False)
    whole.run()
    half = Trainer.start(muon_config(corpus, "train.max_iters=30", "train.save_interval=15"),
                         out=tmp_path / "half", show=False)
    half.total_steps = 15
    half.run()
    resumed = Trainer.resume(tmp_path / "half", show=False)
    assert resumed.step == 15 and resumed.optimizer.step_count == 15
    resumed.run()
    assert train_records(resumed.run_dir) == train_records(whole.run_dir)   # bit for bit
    assert np.array_equal(resumed.model.flat_params, whole.model.flat_params)
    assert np.array_equal(resumed.optimizer.momentum_buffer, whole.optimizer.momentum_buffer)


def test_a_checkpoint_holds_the_muon_state_and_refuses_the_other_optimizer(tmp_path, corpus):
    trainer = Trainer.start(muon_config(corpus, "train.max_iters=10"), out=tmp_path / "run",
                            show=False)
    trainer.run()
    from xpmodel.train.checkpoint import load_checkpoint
    _, _, optim = load_checkpoint(trainer.run_dir.step_path(10), trainer.model.layout.shapes,
                                  trainer.optimizer.state_sizes())
    hidden = trainer.optimizer.hidden
    assert optim["muon_momentum"].size == hidden.stop - hidden.start
    assert optim["m"].size == trainer.model.flat_params.size - optim["muon_momentum"].size
    assert np.any(optim["muon_momentum"] != 0)
    config = load_config(trainer.run_dir.path / "config.yaml", ["train.optimizer=adamw",
                                                                "train.max_iters=20"])
    from xpmodel.errors import CheckpointError
    with pytest.raises(CheckpointError, match="saved with train.optimizer=muon, resumed with adamw"):
        Trainer.resume(trainer.run_dir.path, overrides_config=config, show=False)


def test_the_trainer_names_the_step_whose_fused_update_was_not_finite(tmp_path, corpus,
                                                                       cuda_device):
    """On a GPU the host reads steps in batches (every 5th here): the overflow
    from step 3 on skips steps 3 to 5 on the device, and the read at step 5
    raises the CPU step's error naming step 3, with the weights as step 2 left them."""
    trainer = Trainer.start(muon_config(corpus), device=cuda_device, out=tmp_path / "run",
                            show=False)
    step = trainer._train_step
    after_two = []

    def step_with_overflow_from_step_3():
        if trainer.step == 2:
            after_two.append(to_host(trainer.model.flat_params).copy())
            trainer.optimizer.coefficients = REFUSED["b's sign lost"][0]
        return step()

    trainer._train_step = step_with_overflow_from_step_3
    with pytest.raises(XpmodelError) as info:
        trainer.run()
    assert str(info.value).startswith("step 3: Muon's orthogonalised update is not finite "
                                      "although the gradients are")
    assert trainer.step == 4 and trainer.optimizer.step_count == 2
    assert np.array_equal(to_host(trainer.model.flat_params), after_two[0])


def test_muon_learns_and_fp16_loss_scaling_works_with_it(tmp_path, corpus):
    """fp16 on the CPU: float16 activations, loss scaling, float32 iterations."""
    val = {}
    for precision in ("fp32", "fp16"):
        trainer = Trainer.start(muon_config(corpus, f"train.precision={precision}", "train.max_iters=40",
                                            "train.eval_interval=40", "train.save_interval=40"),
                                out=tmp_path / precision, show=False)
        val[precision] = trainer.run()["val_loss"]
        records = train_records(trainer.run_dir)
        assert records[-1][1] < records[0][1] - 1.5, precision
    assert abs(val["fp16"] - val["fp32"]) < 0.05, val


needs_mpi = pytest.mark.skipif(
    shutil.which("mpirun") is None or __import__("importlib").util.find_spec("mpi4py") is None,
    reason="mpirun or mpi4py not installed")


@needs_mpi
def test_two_ranks_train_with_muon_like_one_process(tmp_path, corpus):
    """All-reduce first, then every rank takes the same Muon step."""
    import json
    import os
    from xpmodel.distributed import local_mpirun
    env = {**os.environ, "XPMODEL_CACHE": str(tmp_path / "cache"), "XPMODEL_COLLECTIVE_TIMEOUT": "60",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

    def train(out, ranks=None):
        argv = [sys.executable, "-m", "xpmodel.cli.main", "train", "--config", str(TINY), "--device", "cpu",
                "--quiet", "--out", str(out), f"data.source={corpus}", "train.batch_size=8",
                "train.optimizer=muon", "train.max_iters=20"]
        command, launch_env = local_mpirun(ranks, argv) if ranks else (argv, {})
        result = subprocess.run(command, env={**launch_env, **env}, capture_output=True, text=True,
                                timeout=180)
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return np.array([r["loss"] for r in records if r["type"] == "train"])

    np.testing.assert_allclose(train(tmp_path / "two", ranks=2), train(tmp_path / "one"), rtol=1e-5)
