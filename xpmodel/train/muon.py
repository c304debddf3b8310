"""Muon for the hidden matrices and AdamW for everything else, over the flat buffers.

Muon (Keller Jordan, 2024; the update torch.optim.Muon implements) steps each
hidden matrix W (the attention and MLP projections of every block) along the
semi-orthogonal matrix nearest its momentum:

    M <- mu M + (1 - mu) G                   momentum: a running average of gradients
    U <- G + mu (M - G)   (Nesterov)  or  M
    X <- U / max(||U||_F, 1e-7)              every singular value now <= 1
    X <- a X + (b A + c A^2) X,  A = X X^T   ns_steps times (Newton-Schulz)
    W <- (1 - lr wd) W - lr s X              s: the shape adjustment below

One iteration applies the odd polynomial p(x) = a x + b x^3 + c x^5 to every
singular value of X and keeps its singular vectors, so X approaches U V^T of
U's SVD without computing one. The default coefficients ("jordan": 3.4445,
-4.775, 2.0315) trade exactness for speed: after 5 steps every singular value
sigma >= 0.0016 ||U||_F lands in [0.68, 1.21], and those below 0.0015 ||U||_F
end below 0.68, scaled up by at most 3.4445^5. "cubic" (1.5, -0.5, 0) converges to
exactly 1 but needs about 20 steps.

Coefficients that cannot work are refused (check_ns_coefficients, in
xpmodel/ns_coefficients.py, where the run config checks them too): each of
the ns_steps iterations must keep every singular value in (0, NS_BOUND]
(2), for any start in (0, 1]. An update that still comes out non-finite
from finite gradients (float16 iterates overflowing, say) is never applied:
without the fused kernels the step raises before any weight changes; the
fused GPU step skips itself on the device, leaving everything as it was,
and says so in update_finite, which the trainer reads with the step's other
results (train/loop.py) and raises on, naming the step.

Shape adjustment, for a weight stored (in, out), torch's (out, in) transposed:
  original          s = sqrt(max(1, out / in))      Keller Jordan's
  match_rms_adamw   s = 0.2 sqrt(max(in, out))      Moonshot's: AdamW-sized updates

Fused matrices are orthogonalised as one matrix, by xpmodel's choice: the
attention's c_attn (C, 3C), or (C, C + 2 H_kv D) under grouped-query
attention, holds q, k and v side by side, and under SwiGLU mlp.c_fc
(C, 2F) holds gate and up side by side; each is one Newton-Schulz input, and
its s comes from the fused shape (for "original", sqrt(3) for (C, 3C),
sqrt(2F / C) for (C, 2F)). Recipes that keep q, k, v or gate and up as
separate matrices orthogonalise and scale each on its own, which gives a
different update.

The embeddings, the output head and every vector take AdamW (optim.py) at
their own rate `lr`, the one a schedule sets each step; Muon's rate follows
it in proportion (muon_lr at lr's initial value).

Layout: the hidden matrices are one contiguous slice of the flat buffer,
arranged the same way in every block (model/params.py). The momentum is one flat
buffer over that slice, and one name's matrices across the L blocks are one
strided (L, r, c) view of it. Matrices of one shape are orthogonalised as one
stack of batched products (cuBLAS on a GPU), in their wide orientation (rows
<= columns, so A is the smaller Gram matrix): NS(W^T) = NS(W)^T, so a tall
matrix is iterated transposed. The iterations run in the weights' dtype
(float32, float64 in tests), and in float16 with float32 accumulation (tensor
cores) when a GPU trains in fp16 or bf16 mixed precision.
"""
import math
import types

import numpy

from ..cpu_threads import run_elementwise, run_parallel, single_threaded_blas, split, thread_count
from ..backend import device_scalar, is_half
from ..checks import (HALF_OPEN_UNIT, NON_NEGATIVE, POSITIVE, CheckedNumber, Range, check_integer,
                      check_number)
from ..errors import XpmodelError
from ..layers.matmul import matmul
from ..model.gpt import check_model
from ..ns_coefficients import NS_COEFFICIENTS, check_ns_coefficients, parse_ns_coefficients
from ..options import ADJUST_LR
from .optim import AdamW, check_state_arrays

# the weights Muon takes, by their name inside a block (h.{i}.NAME)
HIDDEN_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
NS_EPS = 1e-7   # floor of ||U||_F, as torch.optim.Muon's
# Newton-Schulz steps a wide stack takes on its Gram matrices before forming them
# from X again (newton_schulz): a negative rounding error grows to about 2% of A's scale
GRAM_STEPS = 5
NS_DTYPES = ("float16", "float32", "float64")   # the ns_dtype choices
NON_FINITE_UPDATE = ("Muon's orthogonalised update is not finite although the gradients are: the "
                     "Newton-Schulz iteration overflowed; weights not updated (check "
                     "train.muon_ns_coefficients and train.muon_ns_steps)")
NON_FINITE_MOMENTUM = ("Muon's step met gradients or a momentum that are not finite: weights not "
                       "updated, but the momentum now holds them (clipped_step skips a step whose "
                       "gradients are not finite)")


def _names_ns_dtype(spec):
    """Whether `spec` (numpy.float32, "float32", ...) names one of NS_DTYPES."""
    try:
        return numpy.dtype(spec).name in NS_DTYPES
    except (TypeError, ValueError):
        return False


def lr_adjustment(shape, adjust_lr):
    """Muon's rate multiplier s for a weight stored (in, out)."""
    n_in, n_out = shape
    if adjust_lr == "original":
        return math.sqrt(max(1.0, n_out / n_in))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(n_in, n_out))
    raise ValueError(f"adjust_lr must be one of {', '.join(ADJUST_LR)}, got {adjust_lr!r}")


def newton_schulz(x, coefficients=NS_COEFFICIENTS["jordan"], steps=5):
    """The Newton-Schulz iteration on a stack x (G, n, m), n <= m, each matrix
    already scaled to ||x||_F <= 1; returns a new stack in x's dtype.

    Every iterate is X_k = Q_k X_0 with Q_k a polynomial in A_0 = X_0 X_0^T, so
    a wide stack (m >= 2n) iterates on (n, n) matrices alone and multiplies
    X_0 once at the end: 4 n^2 m + 34 n^3 multiply-adds for 5 steps instead of
    20 n^2 m + 10 n^3. The two orders agree to rounding in float32 and float64;
    16-bit stacks take the plain order, since A_k = P A P squares their rounding.
    A rounding error that leaves an eigenvalue of A_k below zero grows by a^2
    (about 12) a step there, so A is formed from X again every GRAM_STEPS steps."""
    x = _xp(x).ascontiguousarray(x)    # the products write row-major stacks
    if x.shape[-1] >= 2 * x.shape[-2] and steps > 1 and not is_half(x.dtype):
        for done in range(0, steps, GRAM_STEPS):
            x = _newton_schulz_gram(x, coefficients, min(GRAM_STEPS, steps - done))
        return x
    a, b, c = coefficients
    for _ in range(steps):
        gram = matmul(x, x, transpose_b=True)                    # A = X X^T   (G, n, n)
        poly = _polynomial(gram, b, c)                           # b A + c A^2
        following = x * a                                        # a X + (b A + c A^2) X
        matmul(poly, x, out=following, accumulate=True)
        x = following
    return x


def _newton_schulz_gram(x, coefficients, steps):
    """`steps` steps of newton_schulz for a wide stack: P_k = a I + b A_k + c A_k^2,
    Q_{k+1} = P_k Q_k, A_{k+1} = P_k A_k P_k (all polynomials in A_0, so they
    commute), and X = Q X_0 at the end."""
    a, b, c = coefficients
    xp = _xp(x)
    gram = matmul(x, x, transpose_b=True)                        # A_0   (G, n, n)
    identity = xp.eye(x.shape[-2], dtype=x.dtype) * a
    product = None                                               # Q_k
    for k in range(steps):
        poly = _polynomial(gram, b, c)
        poly += identity                                         # P_k
        product = poly if product is None else matmul(poly, product)
        if k + 1 < steps:
            gram = matmul(poly, matmul(poly, gram))
    return matmul(product, x)


def _polynomial(gram, b, c):
    """b A + c A^2 for a stack of Gram matrices A."""
    poly = gram * b
    if c:
        matmul(gram, gram, out=poly, accumulate=True, alpha=c)
    return poly


def orthogonalise(g, coefficients=NS_COEFFICIENTS["jordan"], steps=5, dtype=None):
    """Muon's orthogonalisation of one matrix g (r, c), as an (r, c) array of g's dtype
    (the iterations in `dtype`, default g's)."""
    xp = _xp(g)
    wide = g if g.shape[0] <= g.shape[1] else g.T
    x = (wide / xp.maximum(xp.sqrt(xp.sum(wide * wide)), NS_EPS)).astype(dtype or g.dtype)[None]
    x = newton_schulz(x, coefficients, steps)[0]
    return (x if g.shape[0] <= g.shape[1] else x.T).astype(g.dtype)


def _xp(array):
    from ..backend import array_module
    return array_module(array)


class _Part:
    """flat[start:stop] of a model's buffers, as AdamW sees a model."""

    def __init__(self, model, start, stop):
        self.model = model
        self.xp, self.device = model.xp, model.device
        self.flat_params = model.flat_params[start:stop]
        self.flat_grads = model.flat_grads[start:stop]
        self.layout = types.SimpleNamespace(n_decay=min(max(model.layout.n_decay - start, 0), stop - start))

    @property
    def kernels(self):
        return _kernels(self.model)


def _kernels(model):
    """The model's CUDA kernel mode ("fused" or "xp")."""
    return getattr(model, "kernels", "fused")


class _HiddenLayout:
    """Where the hidden matrices lie: flat[start:stop], L blocks of `per_block`
    elements, each holding the matrices of HIDDEN_MATRICES at the same offsets."""

    def __init__(self, layout):
        names = [name for name in layout.names
                 if name.startswith("h.") and name.split(".", 2)[2] in HIDDEN_MATRICES]
        if not names:
            raise ValueError("Muon needs a model with hidden matrices (model.n_layer >= 1)")
        size = {name: math.prod(layout.shapes[name]) for name in names}
        self.start = min(layout.offsets[name] for name in names)
        self.stop = max(layout.offsets[name] + size[name] for name in names)
        self.n_layer = len({name.split(".")[1] for name in names})
        self.per_block = (self.stop - self.start) // self.n_layer
        # (offset in a block, shape (in, out)) of each matrix
        self.matrices = [(layout.offsets[f"h.0.{name}"] - self.start, tuple(layout.shapes[f"h.0.{name}"]))
                         for name in HIDDEN_MATRICES]
        regular = sum(size.values()) == self.stop - self.start and all(
            layout.offsets[f"h.{i}.{name}"] == self.start + i * self.per_block + offset
            and tuple(layout.shapes[f"h.{i}.{name}"]) == shape
            for i in range(self.n_layer) for name, (offset, shape) in zip(HIDDEN_MATRICES, self.matrices))
        if not regular:
            raise ValueError("Muon needs the hidden matrices laid out block after block in the "
                             "flat buffer (model/params.py)")

    def stacked(self, flat, offset, shape):
        """The (L, in, out) view of one matrix of every block in `flat` (the hidden slice)."""
        r, c = shape
        view = flat.reshape(self.n_layer, self.per_block)[:, offset:offset + r * c].reshape(self.n_layer, r, c)
        assert self.n_layer == 1 or view.strides[0] == self.per_block * flat.itemsize, "not a view"
        return view


class Muon:
    """Muon on the hidden matrices, AdamW (decay on matrices only) on the rest.

    lr: AdamW's rate, the one a schedule changes before any step (as for
    AdamW); muon_lr: Muon's rate while lr is at its initial value, scaled
    with lr after that. weight_decay is AdamW's, muon_weight_decay Muon's
    (decoupled: W <- (1 - rate wd) W). The other arguments are
    torch.optim.Muon's; ns_dtype: the iterations' dtype (None: see the
    module's docstring).

    update_finite: whether the latest step's orthogonalised update was
    finite, a 0-d bool on the model's device (see step).
    """
    lr = CheckedNumber(NON_NEGATIVE)   # a schedule may take it to 0 after a positive start

    def __init__(self, model, lr, muon_lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                 momentum=0.95, nesterov=True, ns_coefficients="jordan", ns_steps=5,
                 muon_weight_decay=0.0, adjust_lr="original", ns_dtype=None):
        check_model(model, "Muon")
        lr = check_number("lr", lr, POSITIVE)
        muon_lr = check_number("muon_lr", muon_lr, NON_NEGATIVE)
        muon_weight_decay = check_number("muon_weight_decay", muon_weight_decay, NON_NEGATIVE)
        momentum = check_number("momentum", momentum, HALF_OPEN_UNIT)
        ns_steps = check_integer("ns_steps", ns_steps, Range(1, 99))
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
        if ns_dtype is not None and not _names_ns_dtype(ns_dtype):
            raise ValueError(f"ns_dtype must be None or one of {', '.join(NS_DTYPES)}, got {ns_dtype!r}")
        if muon_lr * muon_weight_decay >= 1.0:
            raise ValueError(f"muon_lr * muon_weight_decay must be below 1 (W <- (1 - rate wd) W "
                             f"would zero or flip the weights), got {muon_lr * muon_weight_decay:g}")
        lr_adjustment((1, 1), adjust_lr)   # checks the name
        self.coefficients = parse_ns_coefficients(ns_coefficients)
        check_ns_coefficients(self.coefficients, ns_steps)
        self.model, self.lr, self.peak_lr, self.muon_lr = model, lr, lr, muon_lr
        self.momentum, self.nesterov, self.ns_steps = momentum, nesterov, ns_steps
        self.muon_weight_decay, self.adjust_lr = muon_weight_decay, adjust_lr
        xp, layout = model.xp, model.layout
        self.hidden = _HiddenLayout(layout)
        start, stop = self.hidden.start, self.hidden.stop
        self._adamw = [AdamW(_Part(model, a, b), lr, betas, eps, weight_decay)
                       for a, b in ((0, start), (stop, layout.size)) if b > a]
        self.momentum_buffer = xp.zeros(stop - start, dtype=model.flat_params.dtype)   # M, flat
        self._update = xp.empty_like(self.momentum_buffer)    # U, then s X, flat like M
        self._applied = xp.zeros((), dtype="float64")          # steps applied, on the device
        self.update_finite = xp.asarray(True)                  # the latest step's, on the device
        if ns_dtype is None:    # 16-bit runs on a GPU iterate in float16 (more mantissa than bfloat16)
            half_gpu = model.device.is_cuda and getattr(model, "precision", "fp32") in ("fp16", "bf16")
            ns_dtype = numpy.float16 if half_gpu else model.flat_params.dtype
        self.ns_dtype = numpy.dtype(ns_dtype)
        # the stacks to orthogonalise: wide shape (n, m) -> [(offset, (in, out), transposed, s)]
        self._stacks = {}
        for offset, shape in self.hidden.matrices:
            transposed = shape[0] > shape[1]
            wide = shape[::-1] if transposed else shape
            self._stacks.setdefault(wide, []).append(
                (offset, shape, transposed, lr_adjustment(shape, adjust_lr)))

    @property
    def step_count(self):
        """Steps applied so far (waits for the device)."""
        return int(self._applied)

    @property
    def muon_rate(self):
        """Muon's rate at the current lr."""
        return self.muon_lr * self.lr / self.peak_lr

    def step(self, grad_scale=1.0, apply=True):
        """One update from model.flat_grads * grad_scale, skipped where apply is
        false; grad_scale and apply may be 0-d device arrays, as for AdamW.step.

        An orthogonalised update that is not finite (from finite gradients)
        changes no weight: without the fused kernels the step raises
        XpmodelError (NON_FINITE_UPDATE) before any weight or AdamW state
        changes (Muon's momentum already holds the gradient, and the run
        stops); the fused GPU step skips itself on the device,
        leaving the weights, both optimizers' state and the step counts as they
        were, and sets update_finite to false for the caller to read later."""
        if self.model.device.is_cuda and _kernels(self.model) == "fused":
            self._fused_step(grad_scale, apply)
            return
        self.update_finite = self.model.xp.asarray(True)   # a non-finite update raises below
        if bool(apply):
            self._xp_step(grad_scale)

    def _fused_step(self, grad_scale, apply):
        """A step on a GPU with the fused kernels, applied or skipped there.
        The momentum kernel writes U without touching M; only once the
        orthogonalised update is known to be finite do M, the weights,
        AdamW's part and the step counts change (all decided on the device)."""
        from ..cuda.muon import muon_apply, muon_momentum
        xp = self.model.xp
        scale, apply = device_scalar(xp, grad_scale), device_scalar(xp, apply)
        muon_momentum(self._hidden_grads(), self.momentum_buffer, xp.stack([scale, apply]),
                      self.momentum, self.nesterov, self._update)
        self._orthogonalise()
        self.update_finite = self._update_is_finite()   # true for a skipped step's zero update
        keep = apply * self.update_finite
        self._step_adamw(grad_scale, keep)
        self._applied += keep
        rate = self.muon_rate   # decay factor and rate made from keep on the device: no host copy
        muon_apply(self._hidden_grads(), self._update,
                   xp.stack([scale, keep, 1.0 - keep * (rate * self.muon_weight_decay), keep * rate]),
                   self.momentum, self.momentum_buffer, self._hidden_params())

    def _xp_step(self, grad_scale):
        """An applied step on the CPU, or with the model's kernels="xp"."""
        model, xp = self.model, self.model.xp
        g = self._hidden_grads()
        scale = (None if isinstance(grad_scale, float) and grad_scale == 1.0
                 else xp.asarray(grad_scale, dtype=g.dtype))
        run_elementwise(g.size, lambda part: self._momentum(part, scale), model.device.is_cuda)
        self._orthogonalise()
        if not bool(self._update_is_finite()):
            finite_momentum = bool(xp.isfinite(self.momentum_buffer).all())
            raise XpmodelError(NON_FINITE_UPDATE if finite_momentum else NON_FINITE_MOMENTUM)
        self._step_adamw(grad_scale, True)
        self._applied += 1.0
        run_elementwise(g.size, self._apply, model.device.is_cuda)

    def _update_is_finite(self):
        """Whether every element of the orthogonalised update is finite, a 0-d device bool."""
        return self.model.xp.isfinite(self._update).all()

    def _step_adamw(self, grad_scale, apply):
        """AdamW's step on the parameters outside the hidden slice, at self.lr."""
        for part in self._adamw:
            part.lr = self.lr
            part.step(grad_scale=grad_scale, apply=apply)

    def _hidden_params(self):
        return self.model.flat_params[self.hidden.start:self.hidden.stop]

    def _hidden_grads(self):
        return self.model.flat_grads[self.hidden.start:self.hidden.stop]

    def _momentum(self, part, scale):
        """The gradient times `scale` (None: 1), then M and U, on `part` (a
        slice) of the hidden slice, without the fused kernels."""
        xp = self.model.xp
        g = self._hidden_grads()[part]
        m, u = self.momentum_buffer[part], self._update[part]
        if scale is not None:
            g *= scale
        xp.subtract(g, m, out=u)            # M += (1 - mu) (G - M)
        u *= 1.0 - self.momentum
        m += u
        if self.nesterov:                   # U = G + mu (M - G)
            xp.subtract(m, g, out=u)
            u *= self.momentum
            u += g
        else:
            u[...] = m

    def _apply(self, part):
        """W <- W (1 - rate wd) - rate U on `part` of the hidden slice, without the fused kernels."""
        rate = self.muon_rate
        p, u = self._hidden_params()[part], self._update[part]
        if self.muon_weight_decay:
            p *= 1.0 - rate * self.muon_weight_decay
        u *= rate
        p -= u

    def _orthogonalise(self):
        """self._update: U -> s NS(U / ||U||_F), matrix by matrix, in stacks of one shape."""
        xp, hidden = self.model.xp, self.hidden
        for (n, m), members in self._stacks.items():
            x = xp.empty((hidden.n_layer * len(members), n, m), dtype=self.ns_dtype)
            for k, (offset, shape, transposed, _) in enumerate(members):
                u = hidden.stacked(self._update, offset, shape)
                u = u.swapaxes(1, 2) if transposed else u
                norm = xp.sqrt(xp.sum(u * u, axis=(1, 2), keepdims=True))
                x[k * hidden.n_layer:(k + 1) * hidden.n_layer] = u / xp.maximum(norm, NS_EPS)
            x = self._iterate(x)
            for k, (offset, shape, transposed, scale) in enumerate(members):
                out = hidden.stacked(self._update, offset, shape)
                out = out.swapaxes(1, 2) if transposed else out
                out[...] = x[k * hidden.n_layer:(k + 1) * hidden.n_layer]
                if scale != 1.0:
                    out *= scale

    def _iterate(self, x):
        """newton_schulz on a stack; on the CPU its matrices split among xpmodel's
        threads with BLAS on one thread each, as the model's passes run (OpenBLAS's
        own threads would keep spinning into the next forward pass)."""
        if self.model.device.is_cuda:
            return newton_schulz(x, self.coefficients, self.ns_steps)
        parts = split(x.shape[0], thread_count())
        with single_threaded_blas():
            return numpy.concatenate(run_parallel(
                [lambda part=part: newton_schulz(x[part], self.coefficients, self.ns_steps)
                 for part in parts]))

    # ---- state, for checkpoints -------------------------------------------------
    def state_sizes(self):
        n = sum(part.m.size for part in self._adamw)
        return {"m": n, "v": n, "muon_momentum": self.momentum_buffer.size}

    def state_arrays(self):
        """AdamW's moments (its parts end to end) and Muon's momentum, as flat arrays."""
        xp = self.model.xp
        return {"m": xp.concatenate([part.m for part in self._adamw]),
                "v": xp.concatenate([part.v for part in self._adamw]),
                "muon_momentum": self.momentum_buffer}

    def load_state_arrays(self, arrays, step_count):
        """The state as state_arrays gives it, and the steps applied, all
        checked before any is set."""
        check_state_arrays(arrays, self.state_sizes(), self.momentum_buffer.dtype, non_negative=("v",))
        steps = check_integer("step_count", step_count)
        start = 0
        for part in self._adamw:
            stop = start + part.m.size
            part.load_state(arrays["m"][start:stop], arrays["v"][start:stop], steps)
            start = stop
        self.momentum_buffer[...] = arrays["muon_momentum"]
        self._applied[...] = steps
