"""Benchmark of the training loop on the ``tiny`` config (examples/configs/tiny.yaml), one CPU process.

(a) Activation checkpointing: for recompute none / selective / full, the median step time and the
    peak activation memory of a step. Activation memory is measured with
    ``torch.autograd.graph.saved_tensors_hooks``: the bytes of the tensors autograd keeps for
    backward (parameters excluded, a storage counted once however often it is saved), live at the
    same time, peak over the step's forwards, backwards and recomputations. Tensors a custom
    autograd Function keeps as plain attributes of ``ctx`` are not seen (the fused ops save theirs
    with ``save_for_backward``). The process's peak RSS is not used: it only grows, and it also
    holds the corpus, the allocator's caches and Python.
(b) Throughput: tokens/s of a whole training step (the config's global batch and micro-batches,
    AdamW, clipping) of our Trainer against a plain single-process PyTorch loop of the same model
    (:class:`PlainM6`: ``nn.Linear`` layers, ``scaled_dot_product_attention`` with an explicit
    prefix-LM mask, ``F.cross_entropy``, ``torch.optim.AdamW``), on the same pre-built micro-batches
    (data loading is outside both). Steps of the two alternate, so machine noise hits both alike;
    wall time and the process's CPU time are both reported (see ``_interleaved_medians``).
    Target: ours / plain >= 1.0. Same model: tanh GeLU, tied output layer; ours pads the
    vocabulary to a multiple of 128 (21248 rows) and masks the padding columns.

The corpus is a small demo corpus (tests/training_job.py's ``build_corpus``) with the
bert-base-chinese vocabulary that ``tiny`` uses.

Usage: ``python -m tests.bench.bench_training --out DIR`` (writes ``DIR/bench_training.json``), or
``run(out_dir)`` from another script.
"""

import argparse
import itertools
import os
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from m6_engine.config import job_config_from_dict, load_yaml
from m6_engine.data.tokenizer import default_vocab_path
from m6_engine.parallel import initialize
from m6_engine.training import Trainer, make_datasets
from tests.bench.common import print_table, write_json
from tests.training_job import build_corpus

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny.yaml"
MODES = ("none", "selective", "full")


def tiny_job(corpus, **train):
    """examples/configs/tiny.yaml on one process (tp = pp = 1) and the benchmark corpus."""
    overrides = {"parallel.tp": 1, "parallel.pp": 1, "data.corpus": corpus.train,
                 "data.vocab_file": corpus.vocab_file, "train.save_dir": "", "train.tensorboard_dir": "",
                 "train.eval_interval": 0}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return job_config_from_dict(load_yaml(str(CONFIG)), overrides)


class _Saved:
    """What autograd keeps instead of a saved tensor; its release means the tensor was dropped."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedActivations:
    """Within: live and peak bytes of the tensors autograd saves for backward (module doc), in
    total and for those saved while one of ``blocks`` runs its forward ("in blocks")."""

    def __init__(self, blocks=()):
        self.live = {"total": 0, "in blocks": 0}
        self.peak = dict(self.live)
        self._refs: dict[int, int] = {}
        self._depth = 0
        self._blocks = list(blocks)

    def _enter_block(self, *args):
        self._depth += 1

    def _leave_block(self, *args):
        self._depth -= 1

    def _add(self, scopes, nbytes: int) -> None:
        for scope in scopes:
            self.live[scope] += nbytes
            self.peak[scope] = max(self.peak[scope], self.live[scope])

    def _release(self, key: int, scopes, nbytes: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self._add(scopes, -nbytes)

    def _pack(self, tensor: torch.Tensor):
        holder = _Saved(tensor)
        if isinstance(tensor, nn.Parameter):
            return holder
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        scopes = ("total", "in blocks") if self._depth else ("total",)
        if key not in self._refs:
            self._refs[key] = 0
            self._add(scopes, nbytes)
        self._refs[key] += 1
        weakref.finalize(holder, self._release, key, scopes, nbytes)   # autograd dropped it
        return holder

    def __enter__(self):
        self._handles = [h for b in self._blocks for h in (b.register_forward_pre_hook(self._enter_block),
                                                           b.register_forward_hook(self._leave_block))]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


# ---- the plain PyTorch competitor ---------------------------------------------------------------

class PlainBlock(nn.Module):
    """Pre-LN block: h + attn(LN(h)), h + mlp(LN(h)); attention by scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)                     # (B, H, S, hd)
        h = h + self.out(ctx.transpose(1, 2).reshape(b, s, d))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h)), approximate="tanh"))


class PlainM6(nn.Module):
    """The tiny M6 as a plain single-process model: word / position / segment embeddings and the
    patch projection, pre-LN blocks, final LN, output layer tied to the word embedding."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.num_patches = config.num_patches
        self.word = nn.Embedding(config.vocab_size, d)
        self.position = nn.Embedding(config.max_text_positions, d)
        self.segment = nn.Embedding(config.num_segments, d)
        self.patch = nn.Linear(config.patch_feature_dim, d)
        self.blocks = nn.ModuleList(PlainBlock(d, config.num_heads, config.ffn_size, config.layernorm_eps)
                                    for _ in range(config.num_layers))
        self.final_ln = nn.LayerNorm(d, eps=config.layernorm_eps)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=config.init_std)

    @staticmethod
    def mask(prefix_len: torch.Tensor, valid_len: torch.Tensor, s: int) -> torch.Tensor:
        """(B, 1, S, S) bool: query i sees key j iff j < valid and (j < prefix or j <= i); padded
        queries see key 0 (their outputs are never used; an empty row would give NaN)."""
        i = torch.arange(s).view(1, s, 1)
        j = torch.arange(s).view(1, 1, s)
        prefix, valid = prefix_len.view(-1, 1, 1), valid_len.view(-1, 1, 1)
        allowed = (j < valid) & ((j < prefix) | (j <= i)) & (i < valid)
        return (allowed | ((i >= valid) & (j == 0))).unsqueeze(1)

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean cross entropy over the micro-batch's loss tokens."""
        x = self.word(batch.tokens)                                             # (B, S, d)
        n = self.num_patches
        is_patch = (torch.arange(n).unsqueeze(0) < batch.num_image_patches.unsqueeze(1)).unsqueeze(-1)
        x = torch.cat([torch.where(is_patch, self.patch(batch.patches.float()), x[:, :n]), x[:, n:]], 1)
        h = x + self.position(batch.position_ids) + self.segment(batch.segment_ids)
        mask = self.mask(batch.prefix_len, batch.valid_len, h.shape[1])
        for block in self.blocks:
            h = block(h, mask)
        weights = batch.loss_mask.float()
        rows = weights.nonzero(as_tuple=True)
        logits = self.final_ln(h[rows]) @ self.word.weight.t()                    # (N, V)
        losses = F.cross_entropy(logits, batch.labels[rows].long(), reduction="none")
        return (losses * weights[rows]).sum() / weights[rows].sum()


class PlainLoop:
    """nanoGPT-style step: accumulate over micro-batches, clip, AdamW (no decay on vectors), LR."""

    def __init__(self, job, batches):
        self.model = PlainM6(job.model)
        opt = job.optimizer
        decay = [p for p in self.model.parameters() if p.dim() > 1]
        rest = [p for p in self.model.parameters() if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}],
                                           lr=opt.lr, betas=opt.betas, eps=opt.eps)
        self.clip = opt.clip_grad
        self.batches = batches
        self.num_microbatches = job.train.num_microbatches(1)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.num_microbatches):
            (self.model(next(self.batches)) / self.num_microbatches).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()


# ---- measurements -------------------------------------------------------------------------------

def _interleaved_medians(steps: dict, warmup: int, iters: int) -> dict:
    """{name: (median wall seconds, median CPU seconds of this process)} of each callable, the
    calls alternating round-robin. On a shared machine the CPU time is the steadier figure: wall
    time also counts the waits for a core, and more of them for code that hands work to helper
    threads (gloo's collectives) than for code that does not."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in steps}


def _fixed_batches(job, state, count: int) -> list:
    data, _ = make_datasets(job, state)
    return [next(data) for _ in range(count)]


def bench_recompute(corpus, state, iters: int) -> list:
    """(a): step time and peak saved-activation bytes per recompute mode, same batches."""
    job = tiny_job(corpus)
    batches = _fixed_batches(job, state, job.train.num_microbatches(1))
    trainers = {mode: Trainer(tiny_job(corpus, recompute=mode), state, itertools.cycle(batches),
                              log_rank_output=False) for mode in MODES}
    peaks = {}
    for mode, trainer in trainers.items():
        with SavedActivations(trainer.stage.layers.values()) as saved:
            trainer.train_step()
        peaks[mode] = saved.peak
    times = _interleaved_medians({m: t.train_step for m, t in trainers.items()}, warmup=1, iters=iters)
    mib = 2 ** 20
    return [{"recompute": mode, "step_s": times[mode][0], "step_cpu_s": times[mode][1],
             "time_vs_none": times[mode][0] / times["none"][0],
             "cpu_time_vs_none": times[mode][1] / times["none"][1],
             "peak_activation_mib": peaks[mode]["total"] / mib,
             "peak_block_activation_mib": peaks[mode]["in blocks"] / mib,
             "block_activation_vs_none": peaks[mode]["in blocks"] / peaks["none"]["in blocks"]}
            for mode in MODES]


def bench_throughput(corpus, state, iters: int) -> dict:
    """(b): tokens/s of our Trainer step and of the plain loop on the same micro-batches."""
    job = tiny_job(corpus)
    n = job.train.num_microbatches(1)
    batches = _fixed_batches(job, state, 4 * n)                # 4 different global batches, cycled
    tokens = statistics.mean(sum(int(b.valid_len.sum()) for b in batches[i:i + n])
                             for i in range(0, len(batches), n))
    trainer = Trainer(job, state, itertools.cycle(batches), log_rank_output=False)
    plain = PlainLoop(job, itertools.cycle(batches))
    times = _interleaved_medians({"ours": trainer.train_step, "plain": plain.step}, warmup=2, iters=iters)
    result = {"tokens_per_step": tokens,
              "parameters": {"ours": sum(p.numel() for p in trainer.stage.parameters()),
                             "plain": sum(p.numel() for p in plain.model.parameters())}}
    for clock, i in (("wall", 0), ("cpu", 1)):
        result[clock] = {"ours_step_s": times["ours"][i], "plain_step_s": times["plain"][i],
                         "ours_tokens_per_s": tokens / times["ours"][i],
                         "plain_tokens_per_s": tokens / times["plain"][i],
                         "ratio_ours_over_plain": times["plain"][i] / times["ours"][i]}
    return result


def run(out_dir: str = "bench-results", iters: int = 10, threads: int = 1) -> dict:
    """Both parts with ``threads`` intra-op threads (1 by default: on a shared 2-core machine a
    second thread waits on whoever else holds the other core, and the figures turn to noise)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = build_corpus(tmp, num_images=48, paragraphs=300, vocab_file=default_vocab_path())
            state = initialize(1, 1)
            recompute = bench_recompute(corpus, state, iters)
            throughput = bench_throughput(corpus, state, iters)
    finally:
        torch.set_num_threads(previous)
    job = tiny_job(corpus)
    shape = (f"micro-batch {job.train.micro_batch} x {job.train.num_microbatches(1)}, "
             f"sequence {job.model.num_patches + job.model.max_text_positions}, {threads} thread(s)")
    print_table(f"activation checkpointing, tiny.yaml, {shape}",
                ["recompute", "step s (wall)", "x none", "step s (CPU)", "x none", "peak activations MiB",
                 "of which in blocks MiB", "x none (blocks)"],
                [[r["recompute"], r["step_s"], r["time_vs_none"], r["step_cpu_s"], r["cpu_time_vs_none"],
                  r["peak_activation_mib"], r["peak_block_activation_mib"], r["block_activation_vs_none"]]
                 for r in recompute])
    print_table(f"training step throughput, tiny.yaml, {shape}",
                ["", "step s (wall)", "tokens/s (wall)", "step s (CPU)", "tokens/s (CPU)"],
                [[name, throughput["wall"][f"{key}_step_s"], throughput["wall"][f"{key}_tokens_per_s"],
                  throughput["cpu"][f"{key}_step_s"], throughput["cpu"][f"{key}_tokens_per_s"]]
                 for name, key in (("ours (Trainer)", "ours"), ("plain PyTorch", "plain"))])
    print(f"ours / plain: {throughput['wall']['ratio_ours_over_plain']:.2f}x wall, "
          f"{throughput['cpu']['ratio_ours_over_plain']:.2f}x CPU time (target >= 1.0)")
    result = {"recompute": recompute, "throughput": throughput, "shape": shape, "iters": iters,
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
              "memory_measure": "torch.autograd.graph.saved_tensors_hooks: peak live bytes of the "
                                "tensors saved for backward (parameters excluded, storages once); "
                                "'in blocks': saved while a transformer block's forward runs"}
    write_json(out_dir, "bench_training", result)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results", help="folder for bench_training.json")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per contender")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = parser.parse_args(argv)
    run(args.out, iters=args.iters, threads=args.threads)


if __name__ == "__main__":
    main()
