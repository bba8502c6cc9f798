"""A small pre-LN transformer LM built from the parallel layers, for parity tests and benchmarks.

Stage ``k`` of ``pp`` holds a contiguous range of blocks; stage 0 also the vocab-parallel word
embedding and learned positions, the last stage the final LayerNorm and the output head, tied to
the word embedding (a second copy of it when pp > 1, kept in sync by ``parallel.tied``). Block:

    h = h + RowParallel_out(attention(ColumnParallel_qkv(LN1(h))))     heads split over tp
    h = h + RowParallel_fc2(gelu(ColumnParallel_fc1(LN2(h))))

The mask is M6's prefix-LM rule from (prefix_len, valid_len); the loss is the mean over a
micro-batch's tokens of the vocab-parallel cross entropy. Every weight is drawn from a generator
named after it, so the full model is identical for every (tp, pp, dp) layout.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import m6_engine.ops as ops_module
from m6_engine.parallel.roles import param_role
from m6_engine.parallel import (
    ColumnParallelLinear, DataParallel, RowParallelLinear, TensorSpec, VocabParallelEmbedding,
    broadcast_tied_weights, forward_backward, init_generator, mark_tied, model_grad_sync, normal_init,
    vocab_parallel_cross_entropy,
)


@dataclass(frozen=True)
class ToyLMConfig:
    """Shape of the toy LM and of its synthetic data."""

    vocab_size: int = 100
    hidden: int = 32
    heads: int = 4
    ffn: int = 64
    layers: int = 4
    seq_len: int = 16
    eps: float = 1e-5
    seed: int = 1234


def fused_kernels_registered() -> bool:
    """True when m6_engine._C loads and has CPU kernels for both fused ops."""
    if not ops_module.extension_available():
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
               for name in ("m6::layer_norm", "m6::masked_softmax"))


def ops_for_tests():
    """The fused ops when their CPU kernels are built, else the references (same math).

    ``M6_TEST_REFERENCE_OPS=1`` takes the reference path on purpose (to tell a kernel bug from a
    parallelism bug).
    """
    if os.environ.get("M6_TEST_REFERENCE_OPS") == "1":
        return ops_module.select_ops(False)
    return ops_module.select_ops(fused_kernels_registered())


class LayerNorm(nn.Module):
    """LayerNorm parameters (replicated over tp) applied with the selected op."""

    def __init__(self, dim: int, eps: float, ops, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.bias = nn.Parameter(torch.zeros(dim, device=device))
        self.eps, self.ops = eps, ops

    def forward(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class Block(nn.Module):
    """One pre-LN transformer block; ``layer_id`` is its index in the whole model."""

    def __init__(self, cfg: ToyLMConfig, state, ops, layer_id: int):
        super().__init__()
        gen = lambda name: init_generator(cfg.seed, f"layers.{layer_id}.{name}")  # noqa: E731
        self.heads_per_rank = cfg.heads // state.tp_size
        self.head_dim = cfg.hidden // cfg.heads
        self.ops = ops
        self.ln1 = LayerNorm(cfg.hidden, cfg.eps, ops, state.device)
        # QKV rows are ordered (head, q|k|v, head_dim), so a tp shard holds whole heads.
        self.qkv = ColumnParallelLinear(cfg.hidden, 3 * cfg.hidden, state, generator=gen("qkv"))
        self.out = RowParallelLinear(cfg.hidden, cfg.hidden, state, generator=gen("out"))
        self.ln2 = LayerNorm(cfg.hidden, cfg.eps, ops, state.device)
        self.fc1 = ColumnParallelLinear(cfg.hidden, cfg.ffn, state, generator=gen("fc1"))
        self.fc2 = RowParallelLinear(cfg.ffn, cfg.hidden, state, generator=gen("fc2"))

    def forward(self, h, prefix_len, valid_len):
        b, s, _ = h.shape
        qkv = self.qkv(self.ln1(h)).view(b, s, self.heads_per_rank, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))            # (B, H/t, S, hd)
        scores = torch.matmul(q, k.transpose(-1, -2))                     # (B, H/t, S, S)
        probs = self.ops.masked_softmax(scores, prefix_len, valid_len, 1.0 / math.sqrt(self.head_dim))
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)   # (B, S, H/t * hd)
        h = h + self.out(context)
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


def stage_layers(num_layers: int, pp: int, stage_id: int) -> range:
    """Contiguous block indices of one stage; earlier stages take the remainder."""
    base, extra = divmod(num_layers, pp)
    start = stage_id * base + min(stage_id, extra)
    return range(start, start + base + (1 if stage_id < extra else 0))


class ToyLMStage(nn.Module):
    """The part of the toy LM that pipeline stage ``state.pp_rank`` runs, or with
    ``virtual_stages`` V > 1 its model chunk ``chunk`` (virtual stage ``chunk * pp + pp_rank``)."""

    def __init__(self, cfg: ToyLMConfig, state, ops, *, chunk: int = 0, virtual_stages: int = 1):
        super().__init__()
        stages = state.pp_size * virtual_stages
        if cfg.layers < stages:
            raise ValueError(f"{cfg.layers} layers cannot fill {stages} (virtual) pipeline stages")
        self.cfg, self.state, self.ops = cfg, state, ops
        self.pre_process = state.is_first_stage and chunk == 0
        self.post_process = state.is_last_stage and chunk == virtual_stages - 1
        word = lambda: VocabParallelEmbedding(  # noqa: E731 - one init for both tied copies
            cfg.vocab_size, cfg.hidden, state, generator=init_generator(cfg.seed, "word_embedding"))
        self.word = word() if self.pre_process else None
        if self.word is not None:
            mark_tied(self.word.weight)
            self.position = nn.Parameter(torch.empty(cfg.seq_len, cfg.hidden, device=state.device))
            with torch.no_grad():
                pos = torch.empty(cfg.seq_len, cfg.hidden)
                normal_init()(pos, init_generator(cfg.seed, "position_embedding"))
                self.position.copy_(pos)
        self.blocks = nn.ModuleList(Block(cfg, state, ops, i) for i in stage_layers(
            cfg.layers, stages, chunk * state.pp_size + state.pp_rank))
        if self.post_process:
            self.final_ln = LayerNorm(cfg.hidden, cfg.eps, ops, state.device)
            self.head = self.word if self.pre_process else word()
            mark_tied(self.head.weight)
        broadcast_tied_weights(self, state)

    def forward(self, hidden, batch):
        """hidden (B, S, D) from the previous stage or None; returns (B, S, D) or the mean loss."""
        if self.word is not None:
            hidden = self.word(batch["tokens"]) + self.position
        for block in self.blocks:
            hidden = block(hidden, batch["prefix_len"], batch["valid_len"])
        if not self.post_process:
            return hidden
        logits = self.head.logits(self.final_ln(hidden))                  # (B, S, V/t)
        return vocab_parallel_cross_entropy(logits, batch["labels"], self.state).mean()


def microbatches(cfg: ToyLMConfig, step: int, global_batch: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
    """This dp rank's micro-batches of a step's global batch (deterministic in cfg.seed, step)."""
    if global_batch % (dp_size * micro_batch):
        raise ValueError(f"global batch {global_batch} is not divisible by dp * micro_batch = "
                         f"{dp_size} * {micro_batch}")
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    # Learnable sequences (start + stride * i mod V), so the loss moves within a few steps.
    start = torch.randint(0, cfg.vocab_size, (global_batch, 1), generator=gen)
    stride = torch.randint(1, 4, (global_batch, 1), generator=gen)
    tokens = (start + stride * torch.arange(cfg.seq_len + 1)) % cfg.vocab_size
    prefix = torch.randint(0, cfg.seq_len + 1, (global_batch,), generator=gen)
    per_rank = global_batch // dp_size
    rows = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    out = []
    for start in range(rows.start, rows.stop, micro_batch):
        sl = slice(start, start + micro_batch)
        out.append({"tokens": tokens[sl, :-1], "labels": tokens[sl, 1:], "prefix_len": prefix[sl],
                    "valid_len": torch.full((micro_batch,), cfg.seq_len)})
    return out


def forward_step(data_iterator, model, input_tensor):
    """The schedule's forward_step for the toy LM."""
    return model(input_tensor, next(data_iterator))


def train(cfg: ToyLMConfig, state, *, schedule: str, steps: int, global_batch: int,
          micro_batch: int, lr: float, ops=None, bucket_numel: int = 2000) -> dict:
    """SGD on synthetic batches; returns {"losses": global mean loss per step (last stage, else
    None), "timers": per-step ScheduleTimers, "peak_live": per-step live micro-batches,
    "model": the trained DataParallel-wrapped stage}."""
    ops = ops_for_tests() if ops is None else ops
    model = DataParallel(ToyLMStage(cfg, state, ops), state, bucket_numel=bucket_numel)
    spec = TensorSpec((micro_batch, cfg.seq_len, cfg.hidden), torch.float32)
    losses, timers, peaks = [], [], []
    for step in range(steps):
        model.zero_grad_buffer()
        batches = microbatches(cfg, step, global_batch, micro_batch, state.dp_rank, state.dp_size)
        result = forward_backward(schedule, forward_step=forward_step, data_iterator=iter(batches),
                                  model=model, num_microbatches=len(batches), state=state,
                                  tensor_spec=spec, **model_grad_sync(model, state))
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(param_role(p).main_grad, alpha=lr)
        if state.is_last_stage:
            loss = result.loss.clone()
            torch.distributed.all_reduce(loss, group=state.group("dp"))
            losses.append(loss.item() / state.dp_size)
        timers.append(result.timers)
        peaks.append(result.peak_live_microbatches)
    return {"losses": losses if state.is_last_stage else None, "timers": timers, "peak_live": peaks,
            "model": model}


def tied_copies_differ(model, state) -> float | None:
    """Largest difference between the first and last stage's word-embedding copies (collective on
    the embedding group); None where there is no second copy (pp == 1 or a middle stage)."""
    group = state.group("embedding")
    if state.pp_size == 1 or group is None:
        return None
    stage = model.module
    weight = (stage.word if state.is_first_stage else stage.head).weight.detach()
    copies = [torch.empty_like(weight) for _ in range(2)]
    torch.distributed.all_gather(copies, weight, group=group)
    return (copies[0] - copies[1]).abs().max().item()
