"""Finite-difference checks along random directions, in float64."""
import numpy as np


def directional_check(loss_fn, x, grad, rng, eps=1e-6, trials=3):
    """Compare <grad, d> with the central difference of loss_fn at x along d.

    loss_fn(x) -> float; x is perturbed in place and restored.
    Returns the worst relative error over `trials` random directions.
    """
    worst = 0.0
    for _ in range(trials):
        d = rng.standard_normal(x.shape)
        x += eps * d
        up = loss_fn(x)
        x -= 2 * eps * d
        down = loss_fn(x)
        x += eps * d
        numeric = (up - down) / (2 * eps)
        analytic = float(np.sum(grad * d))
        worst = max(worst, abs(numeric - analytic) / max(1e-12, abs(numeric) + abs(analytic)))
    return worst
