"""Dynamic loss scaling for float16 training.

The loss is multiplied by `scale` before backward so small float16
gradients do not flush to zero; gradients are divided by it again before
clipping and the optimizer. An inf or NaN anywhere in the gradients means
the scale was too large: the step is skipped and the scale halved. After
`growth_interval` good steps in a row the scale doubles.
"""
import math

from .errors import XpmodelError


class LossScaler:
    def __init__(self, scale=2.0 ** 16, growth_interval=2000, max_skipped_in_a_row=50):
        self.scale = float(scale)
        self.growth_interval = growth_interval
        self.max_skipped_in_a_row = max_skipped_in_a_row
        self.good_steps = 0          # good steps since the last change of scale
        self.skipped_in_a_row = 0
        self.skipped_total = 0

    def unscale_and_check(self, model):
        """Divide the gradients by the scale; True when they are all finite."""
        xp = model.xp
        model.flat_grads *= 1.0 / self.scale
        return bool(xp.isfinite(xp.dot(model.flat_grads, model.flat_grads)))

    def update(self, finite, step):
        """Record a step's outcome; raises after too many skipped steps in a row."""
        if finite:
            self.skipped_in_a_row = 0
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0
            return
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        self.good_steps = 0
        self.scale = max(self.scale / 2.0, 1.0)
        if self.skipped_in_a_row >= self.max_skipped_in_a_row:
            raise XpmodelError(
                f"step {step}: {self.skipped_in_a_row} steps in a row overflowed in float16 "
                f"(loss scale now {self.scale:g}); the run is diverging: lower train.lr or use "
                f"train.precision=fp32")

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps,
                "skipped_in_a_row": self.skipped_in_a_row, "skipped_total": self.skipped_total}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        if not (math.isfinite(self.scale) and self.scale >= 1.0):
            raise ValueError(f"bad loss scale {self.scale}")
        self.good_steps = int(state["good_steps"])
        self.skipped_in_a_row = int(state["skipped_in_a_row"])
        self.skipped_total = int(state["skipped_total"])
