"""Weight initialisation that does not depend on the parallel layout.

Every initial weight is a function of the base seed, its parameter's global name and each
element's index in the full (unsharded) weight, so every tp and pp builds the same model from the
same seed (the parity tests rely on it). A model derives one ``torch.Generator`` per parameter from
the seed and the name with :func:`init_generator` (a stable sha256 hash); layers never touch the
global RNG.

The default N(0, std), :func:`normal_init` (a :class:`NormalInit`), does not run that generator:
its seed is the 64-bit key of m6-engine's counter-based stream, in which element i of the full
weight is Philox4x32-10 of counter i / 4 through a float64 Box-Muller (``m6_engine.ops.normal_shard_``;
csrc/init/philox_normal.h). Each rank draws only its own shard, directly on its device and in the
parameter's dtype, without stepping through the other ranks' elements, and gets the values the
full weight has there; start-up work per rank falls with tp instead of staying that of the whole
model. The values are the same on the CPU and CUDA.

A custom :data:`InitMethod` gets the generator itself: the layer draws the full fp32 master weight
on the CPU with it and keeps its shard (the master weight of each such layer exists briefly on every
rank: at M6-large scale the word embedding is 21128 x 4096 fp32 = 346 MB).

The initial weights of a seed changed with the counter-based stream: before it every weight was
torch's mt19937 ``normal_`` of the full master weight, drawn on every rank and sliced.
:func:`mt19937_normal_init` is that scheme, now a custom InitMethod (the start-up benchmark's
baseline, tests/bench/bench_startup.py).
"""

import abc
import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from m6_engine import ops

InitMethod = Callable[[torch.Tensor, torch.Generator], None]
"""Fills a CPU fp32 master weight in place from the generator."""


def init_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, name)`` by a stable hash (same in every process)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def stream_key(generator: torch.Generator) -> int:
    """The counter-based stream's key of the weight whose generator this is: its seed."""
    return generator.initial_seed()


def as_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """A weight's shape as the (rows, columns) its stream is indexed by: a 1-D weight is one row,
    higher dims fold into the columns."""
    if len(shape) == 0:
        return 1, 1
    return (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))


class BlockInit(abc.ABC):
    """An initialisation that fills any block of the full weight alone, without drawing the rest.
    Also an :data:`InitMethod` (the whole weight as its own block)."""

    @abc.abstractmethod
    def fill_block(self, block: torch.Tensor, generator: torch.Generator, full_shape: tuple[int, ...],
                   row0: int, col0: int) -> None:
        """Fill ``block`` (R, C), or a 1-D block as one row, with rows [row0, row0 + R) and
        columns [col0, col0 + C) of the full weight of ``full_shape`` (:func:`as_rows`)."""

    def __call__(self, weight: torch.Tensor, generator: torch.Generator) -> None:
        rows, cols = as_rows(tuple(weight.shape))
        self.fill_block(weight.view(rows, cols), generator, tuple(weight.shape), 0, 0)


@dataclass(frozen=True)
class NormalInit(BlockInit):
    """N(0, std), the M6 initialisation (paper 3.5), from the counter-based stream whose key is the
    generator's seed (the generator's own state is not used)."""

    std: float = 0.02

    def __post_init__(self):
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"normal_init: std must be a finite number > 0, got {self.std}")

    def fill_block(self, block, generator, full_shape, row0, col0) -> None:
        rows, cols = as_rows(full_shape)
        block_rows = block.shape[0] if block.dim() == 2 else 1
        if block.dim() not in (1, 2) or row0 + block_rows > rows:
            raise ValueError(f"normal_init: a block of {tuple(block.shape)} at row {row0} does not fit the "
                             f"weight's {rows} rows (shape {tuple(full_shape)})")
        key = stream_key(generator)
        if block.device.type == "cuda" and not ops.cuda_kernels_built():
            # A CPU-only build on a GPU machine: the same values, drawn on the host and copied.
            block.copy_(ops.normal_shard_(torch.empty(block.shape, dtype=block.dtype), key, full_cols=cols,
                                          row0=row0, col0=col0, std=self.std))
            return
        ops.normal_shard_(block, key, full_cols=cols, row0=row0, col0=col0, std=self.std)


@dataclass(frozen=True)
class SkipInit(BlockInit):
    """Draw nothing: the meta device (shapes only, the values are never read) and a resumed run
    (its checkpoint overwrites every weight, so a draw would be wasted start-up time)."""

    def fill_block(self, block, generator, full_shape, row0, col0) -> None:
        pass


def normal_init(std: float = 0.02) -> NormalInit:
    """N(0, std), the M6 initialisation (paper 3.5), drawn shard by shard (:class:`NormalInit`)."""
    return NormalInit(std)


def mt19937_normal_init(std: float = 0.02) -> InitMethod:
    """N(0, std) as torch's ``normal_`` of the full master weight from the generator (mt19937, then
    Box-Muller): the scheme before the counter-based stream, a custom :data:`InitMethod` now, so a
    layer given it draws every full master weight on the CPU and keeps its shard."""
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"mt19937_normal_init: std must be a finite number > 0, got {std}")

    def init(weight: torch.Tensor, generator: torch.Generator) -> None:
        weight.normal_(0.0, std, generator=generator)

    return init


def master_weight(shape: tuple[int, ...], generator: torch.Generator,
                  init_method: InitMethod) -> torch.Tensor:
    """The full fp32 CPU weight of ``shape``, filled by ``init_method`` from ``generator``."""
    weight = torch.empty(shape, dtype=torch.float32)
    init_method(weight, generator)
    return weight


def init_block_(block: torch.Tensor, full_shape: tuple[int, ...], row0: int, col0: int,
                generator: torch.Generator, init_method: InitMethod) -> torch.Tensor:
    """Fill ``block`` (R, C) (1-D: one row) with rows [row0, row0 + R) and columns
    [col0, col0 + C) of the full weight of ``full_shape`` that ``init_method`` draws from
    ``generator``; returns block. A :class:`BlockInit` draws the block alone, on its device and in
    its dtype; any other InitMethod draws the full fp32 master weight on the CPU, and the block is
    copied out of it."""
    if isinstance(init_method, BlockInit):
        init_method.fill_block(block, generator, full_shape, row0, col0)
        return block
    rows, cols = as_rows(full_shape)
    block_rows, block_cols = (block.shape[0], block.shape[1]) if block.dim() == 2 else (1, block.shape[-1])
    master = master_weight(full_shape, generator, init_method).view(rows, cols)
    block.copy_(master[row0:row0 + block_rows, col0:col0 + block_cols].reshape(block.shape))
    return block
