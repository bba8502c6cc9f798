"""Pieces every M6 module shares: layout-independent initialisation and replicated layers.

Every weight is initialised from the stream of its parameter's *global* name (e.g.
``layers.7.attention.qkv.weight``, :func:`m6_engine.parallel.init.init_generator`): element i of
the full weight is a function of the seed, the name and i (``m6_engine.parallel.init``), and a rank
draws only its shard, on its device and in the parameters' dtype. So every (tp, pp) layout builds
the same model from the same seed, and a module that exists on two pipeline stages (the tied word
embedding) is drawn identically on both. On the meta device nothing is drawn: the shapes are
built, the values are not (parameter counting of 10B models without memory).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from m6_engine.parallel.init import InitMethod, SkipInit, as_rows, init_block_, init_generator, normal_init
from m6_engine.parallel.random import RNGTracker


@dataclass(frozen=True)
class ParamInit:
    """Where and how this model's parameters are made: seed, N(0, std), dtype, device."""

    seed: int
    std: float
    dtype: torch.dtype
    device: torch.device
    draw: bool = True
    """False: allocate the weights without drawing them (a resumed run overwrites every one of them
    from its checkpoint, so the draw would be wasted start-up time)."""
    custom: InitMethod | None = None
    """A custom InitMethod for every N(0, std) weight in place of the default per-shard draw
    (``normal_init(std)``): each full master weight is drawn with it on the CPU and sliced."""

    def generator(self, name: str) -> torch.Generator:
        """The generator of the parameter with global name ``name``."""
        return init_generator(self.seed, name)

    @property
    def init_method(self) -> InitMethod:
        """N(0, std) (or the custom method), or nothing at all on the meta device or without ``draw``."""
        if self.device.type == "meta" or not self.draw:
            return SkipInit()
        return normal_init(self.std) if self.custom is None else self.custom

    def normal(self, shape: tuple[int, ...], name: str) -> nn.Parameter:
        """A replicated parameter drawn N(0, std) from ``name``'s generator."""
        weight = torch.empty(shape, dtype=self.dtype, device=self.device)
        init_block_(weight.view(as_rows(shape)), shape, 0, 0, self.generator(name), self.init_method)
        return nn.Parameter(weight)

    def constant(self, shape: tuple[int, ...], value: float) -> nn.Parameter:
        """A replicated parameter filled with ``value`` (LayerNorm gains and biases)."""
        return nn.Parameter(torch.full(shape, value, dtype=self.dtype, device=self.device))


def sequence_dropout(x: torch.Tensor, p: float, training: bool, rng_tracker: RNGTracker | None,
                     sequence_parallel: bool) -> torch.Tensor:
    """Dropout of an activation that is replicated over tp, or with sequence parallelism holds this
    tp rank's positions only: then each rank must draw its own mask, from the model-parallel
    stream (seeded per tp rank), as Megatron does; the replicated case uses the default stream,
    identical on every tp rank, so every rank drops the same elements."""
    if not (training and p > 0):
        return x
    if not sequence_parallel:
        return F.dropout(x, p, True)
    if rng_tracker is None:
        raise RuntimeError("dropout under sequence parallelism needs the model-parallel RNG stream: "
                           "build M6Model with rng_tracker=seed_parallel_rng(seed, state)")
    with rng_tracker.fork():
        return F.dropout(x, p, True)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with replicated gain / bias, run by the selected op
    (``m6_engine.ops``: fused kernel or reference). x (..., d) -> (..., d)."""

    def __init__(self, dim: int, eps: float, ops, init: ParamInit):
        super().__init__()
        self.weight = init.constant((dim,), 1.0)
        self.bias = init.constant((dim,), 0.0)
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class ReplicatedLinear(nn.Module):
    """y = x W^T + b with W (out, in) replicated on the tp group (no communication)."""

    def __init__(self, in_features: int, out_features: int, init: ParamInit, name: str):
        super().__init__()
        self.weight = init.normal((out_features, in_features), f"{name}.weight")
        self.bias = init.constant((out_features,), 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedEmbedding(nn.Module):
    """A small lookup table (rows, d) replicated on the tp group: ids (...) -> (..., d)."""

    def __init__(self, rows: int, dim: int, init: ParamInit, name: str):
        super().__init__()
        self.weight = init.normal((rows, dim), f"{name}.weight")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
