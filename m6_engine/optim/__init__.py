"""Optimization: O2 mixed precision with fp32 master weights, loss scaling, gradient clipping,
AdamW, the learning-rate schedule and ZeRO-1 optimizer sharding.

Use: cast the model stage to ``config.param_dtype``, wrap it in ``parallel.DataParallel`` (with
``grad_reduce="reduce_scatter"`` when ``config.zero_stage >= 1``), build one
:class:`MixedPrecisionOptimizer`, backpropagate ``optimizer.scale_loss(loss)`` and call
``optimizer.step()`` once per global batch.
"""

from m6_engine.optim.adamw import AdamW, choose_backend, decays
from m6_engine.optim.clip import clip_grads_, counts_in_norm, global_grad_norm
from m6_engine.config import OptimizerConfig
from m6_engine.optim.loss_scaler import DynamicLossScaler, LossScaler, make_loss_scaler
from m6_engine.optim.lr_schedule import LRSchedule
from m6_engine.optim.mixed_precision import MixedPrecisionOptimizer, StepStats
from m6_engine.optim.zero import ParamBuffer, gather_pieces, owned_pieces, whole_pieces

__all__ = [
    "AdamW", "DynamicLossScaler", "LRSchedule", "LossScaler", "MixedPrecisionOptimizer",
    "OptimizerConfig", "ParamBuffer", "StepStats", "choose_backend", "clip_grads_",
    "counts_in_norm", "decays", "gather_pieces", "global_grad_norm", "make_loss_scaler",
    "owned_pieces", "whole_pieces",
]
