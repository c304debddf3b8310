"""Dynamic loss scaling for float16 training.

The loss is multiplied by `scale` before backward so small float16
gradients do not flush to zero; optim.clipped_step divides the gradients by
it again, with the clipping, and skips the update when they are not finite.
`record` takes that outcome: an inf or NaN anywhere in the gradients means
the scale was too large, so the scale is halved. After
`growth_interval` good steps in a row the scale doubles.

The state lives in a small array on the model's device, so on a GPU a step
records its outcome without waiting for the device; `check` (called when
the host reads a step's results anyway) raises when the run is diverging.
"""
import numpy

from ..backend import array_module, to_host
from ..checks import Range, check_integer, check_number
from ..errors import XpmodelError, quote

_SCALE, _GOOD, _SKIPPED_IN_A_ROW, _SKIPPED_TOTAL = range(4)
AT_LEAST_ONE = Range(low=1)


class LossScaler:
    def __init__(self, scale=2.0 ** 16, growth_interval=2000, max_skipped_in_a_row=50, xp=numpy):
        scale = check_number("scale", scale, AT_LEAST_ONE)
        self.growth_interval = check_integer("growth_interval", growth_interval, AT_LEAST_ONE)
        self.max_skipped_in_a_row = check_integer("max_skipped_in_a_row", max_skipped_in_a_row,
                                                  AT_LEAST_ONE)
        if not hasattr(xp, "asarray"):
            raise ValueError(f"xp must be an array module (numpy or cupy), got {xp!r}")
        # scale, good steps since the last change of scale, skipped in a row, skipped in total
        self.state = xp.asarray([float(scale), 0.0, 0.0, 0.0], dtype=numpy.float64)

    @property
    def xp(self):
        return array_module(self.state)

    @property
    def scale(self):
        """The current scale as a host float (waits for the device)."""
        return float(self.state[_SCALE])

    @property
    def device_scale(self):
        """The current scale as a 0-d array on the state's device (no wait)."""
        return self.state[_SCALE]

    def record(self, finite):
        """Count one step's outcome (a bool or 0-d bool array) and adapt the
        scale, on the state's device."""
        xp, s = self.xp, self.state
        finite = xp.asarray(finite, dtype=bool)
        good = xp.where(finite, s[_GOOD] + 1.0, 0.0)
        grow = good >= self.growth_interval
        scale = xp.where(finite, xp.where(grow, s[_SCALE] * 2.0, s[_SCALE]),
                         xp.maximum(s[_SCALE] / 2.0, 1.0))
        s[_SKIPPED_IN_A_ROW] = xp.where(finite, 0.0, s[_SKIPPED_IN_A_ROW] + 1.0)
        s[_SKIPPED_TOTAL] = s[_SKIPPED_TOTAL] + xp.where(finite, 0.0, 1.0)
        s[_GOOD] = xp.where(grow, 0.0, good)
        s[_SCALE] = scale

    def check(self, step):
        """Raise when too many steps in a row were skipped (reads the state)."""
        skipped = int(self.state[_SKIPPED_IN_A_ROW])
        if skipped >= self.max_skipped_in_a_row:
            raise XpmodelError(
                f"step {step}: {skipped} steps in a row overflowed in float16 "
                f"(loss scale now {self.scale:g}); the run is diverging: lower train.lr or use "
                f"train.precision=fp32")

    def state_dict(self):
        s = to_host(self.state)
        return {"scale": float(s[_SCALE]), "good_steps": int(s[_GOOD]),
                "skipped_in_a_row": int(s[_SKIPPED_IN_A_ROW]), "skipped_total": int(s[_SKIPPED_TOTAL])}

    def load_state_dict(self, state):
        """A state as state_dict gives it, every entry checked before any is set."""
        keys = ("scale", "good_steps", "skipped_in_a_row", "skipped_total")
        if not isinstance(state, dict) or set(state) != set(keys):
            raise ValueError(f"a loss scaler's state is a dict of {', '.join(keys)}, got "
                             f"{quote(state, 100)}")
        values = [check_number("scale", state["scale"], AT_LEAST_ONE)]
        values += [check_integer(key, state[key]) for key in keys[1:]]
        self.state[...] = self.xp.asarray(values, dtype=numpy.float64)
