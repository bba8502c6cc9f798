"""The tensor-parallel feed-forward network of a block.

    h = gelu_tanh(ColumnParallel_fc1(x))     x (B, S, d) -> (B, S, f / t)   no communication
    y = RowParallel_fc2(h)                   (B, S, f / t) -> (B, S, d)      all-reduce over tp

With sequence parallelism x and y are this rank's positions (B, S / t, d): fc1 all-gathers x,
fc2 reduce-scatters y.

gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the GPT-2 / BERT approximation.
"""

import torch
import torch.nn.functional as F
from torch import nn

from m6_engine.config import ModelConfig
from m6_engine.model.common import ParamInit
from m6_engine.parallel.layers import ColumnParallelLinear, RowParallelLinear
from m6_engine.parallel.state import ParallelState


class MLP(nn.Module):
    """FC1 (column-parallel), GeLU (tanh approximation), FC2 (row-parallel)."""

    def __init__(self, config: ModelConfig, state: ParallelState, init: ParamInit, prefix: str, *,
                 sequence_parallel: bool = False):
        super().__init__()
        d, f = config.hidden_size, config.ffn_size
        self.fc1 = ColumnParallelLinear(d, f, state, generator=init.generator(f"{prefix}fc1.weight"),
                                        init_method=init.init_method, dtype=init.dtype, device=init.device,
                                        sequence_parallel=sequence_parallel)
        self.fc2 = RowParallelLinear(f, d, state, generator=init.generator(f"{prefix}fc2.weight"),
                                     init_method=init.init_method, dtype=init.dtype, device=init.device,
                                     sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
