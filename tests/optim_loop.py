"""The toy LM (tests/toy_lm.py) trained with the O2 optimizer: shared by test_optim, test_zero and
bench_optim. One step: zero the buffers, 1F1B over the micro-batches with the loss scaled, an
optional hook (fault injection), ``MixedPrecisionOptimizer.step``."""

import torch
import torch.distributed as dist

from m6_engine.optim import MixedPrecisionOptimizer, OptimizerConfig
from m6_engine.parallel import (
    DataParallel, TensorSpec, data_parallel_options, forward_backward, model_grad_sync,
)
from tests.toy_lm import ToyLMConfig, ToyLMStage, microbatches, ops_for_tests

GLOBAL_BATCH, MICRO_BATCH = 8, 2


def build(cfg: ToyLMConfig, state, opt_cfg: OptimizerConfig, *, total_steps: int,
          bucket_numel: int = 2000):
    """(DataParallel-wrapped stage in opt_cfg's precision, its MixedPrecisionOptimizer)."""
    stage = ToyLMStage(cfg, state, ops_for_tests()).to(opt_cfg.param_dtype)
    model = DataParallel(stage, state, bucket_numel=bucket_numel,
                         **data_parallel_options(opt_cfg.zero_stage, stage))
    return model, MixedPrecisionOptimizer(model, opt_cfg, state, total_steps=total_steps)


def backward_step(model, optimizer, cfg: ToyLMConfig, state, step: int) -> float | None:
    """Forward and backward of global batch ``step`` (gradients synced); returns the global mean
    loss on the last stage, else None."""
    optimizer.zero_grad()
    batches = microbatches(cfg, step, GLOBAL_BATCH, MICRO_BATCH, state.dp_rank, state.dp_size)
    scale = optimizer.loss_scale

    def forward_step(data_iterator, module, input_tensor):
        out = module(input_tensor, next(data_iterator))
        return optimizer.scale_loss(out) if state.is_last_stage else out

    dtype = optimizer.config.param_dtype
    spec = TensorSpec((MICRO_BATCH, cfg.seq_len, cfg.hidden), dtype)
    result = forward_backward("1f1b", forward_step=forward_step, data_iterator=iter(batches),
                              model=model, num_microbatches=len(batches), state=state,
                              tensor_spec=spec, **model_grad_sync(model, state))
    if not state.is_last_stage:
        return None
    loss = result.loss.detach().double() / scale
    dist.all_reduce(loss, group=state.group("dp"))
    return loss.item() / state.dp_size


def train_step(model, optimizer, cfg: ToyLMConfig, state, step: int, before_step=None):
    """One training step; ``before_step(model)`` runs between the gradient sync and the update.
    Returns (loss or None, StepStats)."""
    loss = backward_step(model, optimizer, cfg, state, step)
    if before_step is not None:
        before_step(model)
    return loss, optimizer.step()


def train(cfg: ToyLMConfig, state, opt_cfg: OptimizerConfig, steps: int, **build_kwargs) -> dict:
    """Train ``steps`` steps from scratch: {"losses", "stats", "model", "optimizer"}."""
    model, optimizer = build(cfg, state, opt_cfg, total_steps=steps, **build_kwargs)
    losses, stats = [], []
    for step in range(steps):
        loss, stat = train_step(model, optimizer, cfg, state, step)
        losses.append(loss)
        stats.append(stat)
    return {"losses": losses, "stats": stats, "model": model, "optimizer": optimizer}


def flat_params(model) -> torch.Tensor:
    """Every parameter of the stage, flattened and concatenated in fp32 (a snapshot)."""
    return torch.cat([p.detach().float().reshape(-1) for p in model.module.parameters()])
