"""Loss scaling: a constant scale of 1 (fp32, bf16) and the dynamic scaler of fp16 training.

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero. The loss is multiplied by ``scale``
before backward, so the half-precision gradients are ``scale * dL/dw``; the optimizer divides the
fp32 gradients by ``scale`` again. A scale too large overflows some gradient to inf/NaN: that
step is skipped (no parameter changes) and the scaler learns from it through ``update``.
"""

from dataclasses import dataclass


class LossScaler:
    """No scaling: ``scale`` is 1 and never changes (fp32 and bf16, whose range needs none)."""

    dynamic = False

    @property
    def scale(self) -> float:
        return 1.0

    def update(self, found_inf: bool) -> None:
        """Nothing to learn: a non-finite gradient here is a real divergence, not a scale problem."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"a constant loss scaler has no state to load, got keys {sorted(state)} "
                             "(was the checkpoint written with precision fp16?)")


@dataclass
class DynamicLossScaler(LossScaler):
    """fp16's dynamic loss scale, with Megatron's hysteresis rule.

    After ``growth_interval`` consecutive clean steps the scale is multiplied by ``growth_factor``
    and the hysteresis budget refilled. Each overflowing step resets the clean-step count and
    spends one unit of the budget; once ``hysteresis`` overflows have happened since the last
    growth, this and every further overflow multiply the scale by ``backoff_factor`` (not below
    ``min_scale``). With the defaults: 2^32, x2 after 1000 clean steps, x0.5 from the 2nd overflow.
    """

    initial_scale: float = 2.0 ** 32
    growth_interval: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5

    dynamic = True

    def __post_init__(self):
        if not 1 <= self.min_scale <= self.initial_scale:
            raise ValueError(f"need 1 <= min_scale = {self.min_scale} <= initial_scale = "
                             f"{self.initial_scale}")
        if self.growth_interval < 1 or self.hysteresis < 1:
            raise ValueError(f"growth_interval = {self.growth_interval} and hysteresis = "
                             f"{self.hysteresis} must be >= 1")
        if not (self.growth_factor > 1 and 0 < self.backoff_factor < 1):
            raise ValueError(f"need growth_factor = {self.growth_factor} > 1 and 0 < backoff_factor "
                             f"= {self.backoff_factor} < 1")
        self._scale = float(self.initial_scale)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    @property
    def scale(self) -> float:
        return self._scale

    def update(self, found_inf: bool) -> None:
        """Account for one step whose gradients were (``found_inf``) or were not finite."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self._scale *= self.growth_factor

    def state_dict(self) -> dict:
        """Plain numbers: the scale and both trackers."""
        return {"scale": self._scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        expected = {"scale", "growth_tracker", "hysteresis_tracker"}
        if set(state) != expected:
            raise ValueError(f"dynamic loss scaler state needs keys {sorted(expected)}, "
                             f"got {sorted(state)}")
        self._scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


def make_loss_scaler(config) -> LossScaler:
    """The scaler an :class:`~m6_engine.config.OptimizerConfig` asks for (dynamic for fp16)."""
    if config.precision != "fp16":
        return LossScaler()
    return DynamicLossScaler(initial_scale=config.initial_loss_scale,
                             growth_interval=config.loss_scale_growth_interval,
                             hysteresis=config.loss_scale_hysteresis, min_scale=config.min_loss_scale)
