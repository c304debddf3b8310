"""Optimizers over the flat parameter buffer, and global-norm clipping.

Each step is a handful of whole-buffer operations; weight decay touches only
the leading matrix slice of the buffer (see model/params.py). On CUDA, AdamW is
one fused kernel, or with the model's kernels="xp" the same `xp` update NumPy runs.
"""
import math

import numpy

from ..backend import check_real_values, check_scale, device_scalar
from ..checks import (HALF_OPEN_UNIT, NON_NEGATIVE, POSITIVE, POSITIVE_FRACTION, CheckedNumber,
                      check_integer, check_number)
from ..cpu_threads import run_elementwise
from ..model.gpt import check_model


class AdamW:
    """The update rule of torch.optim.AdamW (decoupled weight decay, bias
    correction), with decay on matrices only. `lr` may be changed before
    any step, which is how schedules drive it (checked when set)."""
    lr = CheckedNumber(NON_NEGATIVE)

    def __init__(self, model, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        check_model(model, "AdamW")
        self.lr = lr
        self.betas = check_betas(betas)
        self.eps = check_number("eps", eps, POSITIVE_FRACTION)
        self.weight_decay = check_number("weight_decay", weight_decay, NON_NEGATIVE)
        self.model = model
        xp = model.xp
        self.m = xp.zeros_like(model.flat_params)   # first moment, flat like the params
        self.v = xp.zeros_like(model.flat_params)   # second moment
        # the `xp` update works through a scratch buffer; the fused GPU one needs none
        self._scratch = None if self._fused else xp.empty_like(model.flat_params)
        self._applied = xp.zeros((), dtype="float64")   # steps applied, on the device

    @property
    def _fused(self):
        """Whether steps run the fused CUDA kernel, as the model's `kernels` says."""
        return self.model.device.is_cuda and self.model.kernels == "fused"

    @property
    def step_count(self):
        """Steps applied so far (waits for the device)."""
        return int(self._applied)

    def step(self, grad_scale=1.0, apply=True):
        """One update from model.flat_grads * grad_scale, skipped where apply is false.

        grad_scale and apply may be 0-d arrays on the model's device: a GPU
        step is then decided there (clipping, loss-scale overflow) and the
        host never waits for it (the `xp` update reads them on the host)."""
        model, xp = self.model, self.model.xp
        beta1, beta2 = self.betas
        self._applied += apply
        if self._fused:
            from ..cuda.adamw import adamw_step
            t = self._applied
            # made on the device: a host number is a kernel's argument, not a copy
            scalars = xp.stack([device_scalar(xp, grad_scale), device_scalar(xp, apply),
                                device_scalar(xp, 1.0 - self.lr * self.weight_decay),
                                self.lr / (1.0 - beta1 ** t),
                                1.0 / xp.sqrt(1.0 - beta2 ** t)])
            adamw_step(model.flat_params, model.flat_grads, self.m, self.v, scalars, beta1, beta2,
                       self.eps, model.layout.n_decay)
            return
        if not bool(apply):
            return
        if self._scratch is None:   # the model's kernels changed from "fused" to "xp"
            self._scratch = xp.empty_like(model.flat_params)
        scale = (None if isinstance(grad_scale, float) and grad_scale == 1.0
                 else xp.asarray(grad_scale, dtype=model.flat_grads.dtype))
        run_elementwise(model.flat_params.size, lambda part: self._update(part, scale),
                        model.device.is_cuda)

    def _update(self, part, scale):
        """The whole update on `part` (a slice) of the flat buffers: the
        gradient times `scale` (None: 1), decay where `part` meets the
        matrices, then Adam. Every pass reads one cache-sized chunk."""
        xp = self.model.xp
        p, g, m, v, tmp = (self.model.flat_params[part], self.model.flat_grads[part],
                           self.m[part], self.v[part], self._scratch[part])
        beta1, beta2 = self.betas
        if scale is not None:
            g *= scale
        n_decay = self.model.layout.n_decay
        if part.start < n_decay:
            p[:n_decay - part.start] *= 1.0 - self.lr * self.weight_decay
        m *= beta1
        xp.multiply(g, 1.0 - beta1, out=tmp)
        m += tmp
        v *= beta2
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - beta2
        v += tmp
        t = float(self._applied)
        bias1 = 1.0 - beta1 ** t
        bias2 = 1.0 - beta2 ** t
        # p -= lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps)
        xp.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(bias2)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= self.lr / bias1
        p -= tmp

    def state_sizes(self):
        return {"m": self.m.size, "v": self.v.size}

    def state_arrays(self):
        return {"m": self.m, "v": self.v}

    def load_state(self, m, v, step_count):
        """The moments (flat, as state_arrays gives them) and the steps applied,
        all checked before any is set."""
        self.load_state_arrays({"m": m, "v": v}, step_count)

    def load_state_arrays(self, arrays, step_count):
        check_state_arrays(arrays, self.state_sizes(), self.m.dtype, non_negative=("v",))
        steps = check_integer("step_count", step_count)
        self.m[...] = arrays["m"]
        self.v[...] = arrays["v"]
        self._applied[...] = steps


class SGD:
    """Plain SGD with optional momentum and L2 weight decay (added to the gradient) on matrices."""

    lr = CheckedNumber(NON_NEGATIVE)

    def __init__(self, model, lr, momentum=0.0, weight_decay=0.0):
        check_model(model, "SGD")
        self.lr = lr
        self.momentum = check_number("momentum", momentum, HALF_OPEN_UNIT)
        self.weight_decay = check_number("weight_decay", weight_decay, NON_NEGATIVE)
        self.model = model
        self.velocity = model.xp.zeros_like(model.flat_params) if self.momentum else None
        self.step_count = 0

    def step(self, grad_scale=1.0, apply=True):
        """One update from model.flat_grads * grad_scale, skipped where apply
        is false (read on the host), as AdamW.step takes them."""
        if not bool(apply):
            return
        p, g = self.model.flat_params, self.model.flat_grads
        n_decay = self.model.layout.n_decay
        self.step_count += 1
        update = g * self.model.xp.asarray(grad_scale, dtype=g.dtype)
        if self.weight_decay:
            update[:n_decay] += self.weight_decay * p[:n_decay]
        if self.velocity is not None:
            self.velocity *= self.momentum
            self.velocity += update
            update = self.velocity
        p -= self.lr * update


def grad_norm(model):
    """Global L2 norm of all gradients, a 0-d array (no host sync on GPU)."""
    check_model(model, "grad_norm")
    g = model.flat_grads
    return model.xp.sqrt(model.xp.dot(g, g))


def clipped_step(optimizer, grad_clip, scale=1.0, loss=None):
    """One optimizer step from the gradients of a loss multiplied by `scale`:
    unscale, clip to a global norm of grad_clip (0: no clipping) as
    torch.nn.utils.clip_grad_norm_ does, and apply, unless the gradients (or
    the loss, when given) are not finite. All of it is decided on the model's
    device, so a GPU step never waits for the host; the gradients are read
    once for the norm and once by the update.

    Returns the unscaled gradient norm and whether the gradients were finite,
    as 0-d arrays on the model's device."""
    grad_clip = check_number("grad_clip", grad_clip, NON_NEGATIVE)
    scale = check_scale(scale)
    xp = optimizer.model.xp
    norm = xp.asarray(grad_norm(optimizer.model), dtype=numpy.float64) / scale
    grads_finite = xp.isfinite(norm)
    coef = 1.0 / scale
    if grad_clip > 0:
        coef = coef * xp.minimum(grad_clip / (norm + 1e-6), 1.0)
    apply = grads_finite if loss is None else grads_finite & xp.isfinite(loss)
    optimizer.step(grad_scale=coef, apply=apply)
    return norm, grads_finite


def clip_grad_norm(model, max_norm):
    """Scale gradients so their global L2 norm is at most max_norm, as
    torch.nn.utils.clip_grad_norm_ does; returns the norm before clipping."""
    max_norm = check_number("max_norm", max_norm, POSITIVE)
    norm = grad_norm(model)
    coef = max_norm / (norm + 1e-6)
    model.flat_grads *= model.xp.minimum(coef, 1.0).astype(model.flat_grads.dtype)
    return norm


def check_betas(betas):
    """betas as a tuple of two Python floats, each in [0, 1); ValueError otherwise."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
    return tuple(check_number(f"betas[{i}]", beta, HALF_OPEN_UNIT) for i, beta in enumerate(betas))


def check_state_arrays(arrays, sizes, dtype, non_negative=()):
    """ValueError unless `arrays` holds exactly the optimizer state `sizes`
    names (name -> length), each a flat array of that length of real values
    finite in `dtype`, those of the names in `non_negative` none below zero."""
    if not isinstance(arrays, dict):
        raise ValueError(f"optimizer state must be a dict of arrays, got {type(arrays).__name__}")
    missing, unexpected = sorted(set(sizes) - set(arrays)), sorted(set(arrays) - set(sizes))
    if missing or unexpected:
        raise ValueError(f"optimizer state names do not match: missing {missing}, unexpected {unexpected}")
    for name, size in sizes.items():
        shape = getattr(arrays[name], "shape", None)
        if shape is None or tuple(shape) != (size,):
            raise ValueError(f"optimizer state {name}: shape {shape} does not match the "
                             f"optimizer's ({size},)")
        check_real_values(f"optimizer state {name}", arrays[name], dtype, name in non_negative)
