"""Weight initialisation that does not depend on the parallel layout.

A parallel layer draws its *master* (full, unsharded) weight on the CPU in fp32 from a
``torch.Generator`` and keeps its own shard, so the full weight is bit-identical for every tp and
pp for the same seed: the parity tests rely on it. Layers never touch the global RNG; a model
derives one generator per parameter from a base seed and the parameter's name with
:func:`init_generator`, so a pipeline stage that builds only some layers draws the same values for
them as one process building all of them. (The master weight of each layer exists briefly on every
rank: at M6-large scale the biggest one, the word embedding, is 21128 x 4096 fp32 = 346 MB.)
"""

import hashlib
from typing import Callable

import torch

InitMethod = Callable[[torch.Tensor, torch.Generator], None]
"""Fills a CPU fp32 master weight in place from the generator."""


def init_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, name)`` by a stable hash (same in every process)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def normal_init(std: float = 0.02) -> InitMethod:
    """N(0, std), the M6 initialisation (paper 3.5)."""
    if std <= 0:
        raise ValueError(f"normal_init: std must be > 0, got {std}")

    def init(weight: torch.Tensor, generator: torch.Generator) -> None:
        weight.normal_(0.0, std, generator=generator)

    return init


def master_weight(shape: tuple[int, ...], generator: torch.Generator,
                  init_method: InitMethod) -> torch.Tensor:
    """The full fp32 CPU weight of ``shape``, filled by ``init_method`` from ``generator``."""
    weight = torch.empty(shape, dtype=torch.float32)
    init_method(weight, generator)
    return weight
