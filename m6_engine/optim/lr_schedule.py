"""Learning rate: linear warm-up, then cosine decay to a floor (paper A.1: warm-up 1%, peak 1.5e-4)."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """lr(s) for the update with index s = 0, 1, ... (the number of updates already applied).

        s <  W:        lr = peak * (s + 1) / W                                   (linear warm-up)
        W <= s < T:    lr = floor + (peak - floor) * (1 + cos(pi * (s - W) / (T - W))) / 2
        s >= T:        lr = floor

    with W = ``warmup_steps`` and T = ``total_steps``. The first update already moves (lr > 0) and
    update W - 1 runs at the peak. A pure function of s: its position is the optimizer's step count.
    """

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self):
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps = {self.warmup_steps} <= total_steps = "
                             f"{self.total_steps}")
        if not 0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"need 0 <= min_lr = {self.min_lr} <= peak_lr = {self.peak_lr}")

    @classmethod
    def from_config(cls, config, total_steps: int) -> "LRSchedule":
        """Warm-up over ceil(warmup_fraction * total_steps) updates (so any fraction > 0 warms up)."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        warmup = math.ceil(config.warmup_fraction * total_steps)
        return cls(config.lr, config.min_lr, warmup, total_steps)

    def lr(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
