"""One optimizer step the megatron-core way, for M6McoreModel or GPTModel stages.

Megatron-LM's ``train_step`` in a few lines: megatron-core's ``DistributedDataParallel`` (fp32
gradient buffers) around the stage, its optimizer (``torch.optim.AdamW`` without Apex / TE), and
its pipeline schedule from ``get_forward_backward_func()`` (non-interleaved 1F1B with pp > 1),
which calls ``finalize_model_grads`` (data-parallel all-reduce, tied-embedding sum over first and
last stage) after the last backward. Process groups are megatron-core's
(``parallel_state.initialize_model_parallel``).
"""

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from m6_engine.config import OptimizerConfig as M6OptimizerConfig


def wrap_ddp(module: torch.nn.Module, config: TransformerConfig) -> DistributedDataParallel:
    """megatron-core DDP with fp32 gradient accumulation; also tells the schedule how to defer and
    finish gradient reduction (``config.no_sync_func`` / ``finalize_model_grads_func``)."""
    ddp = DistributedDataParallel(config=config, module=module, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp: DistributedDataParallel, config: TransformerConfig, opt: M6OptimizerConfig):
    """megatron-core's Adam in AdamW mode with our optimizer settings at a constant ``opt.lr``
    (no LR scheduler is attached); ``clip_grad`` and the precision are taken over as they are."""
    if opt.precision == "fp16":
        raise ValueError("build_optimizer: fp16 needs megatron-core's loss scaler settings; use bf16 or fp32")
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_eps=opt.eps, clip_grad=opt.clip_grad,
        bf16=opt.precision == "bf16", params_dtype=config.params_dtype), [ddp])
    return optimizer


def train_step(forward_step, ddp: DistributedDataParallel, optimizer, data_iterator, *,
               num_microbatches: int, seq_length: int, micro_batch_size: int) -> list[dict]:
    """Zero the gradient buffers, run the schedule over ``num_microbatches``, step the optimizer.
    Returns the loss dicts of the micro-batches (last stage; empty elsewhere)."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[ddp],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False)
    optimizer.step()
    return losses
