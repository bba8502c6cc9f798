"""The Python stages of `make gpu-check` (tests/gpu_check.sh runs them after the build and the CUDA
tests): the figures and end-to-end checks that need the whole engine on one GPU.

  kernels       tests/bench/bench_ops on the device: GB/s and fraction of a same-run copy per kernel
  training      a real bf16 O2 run of m6-base-width layers (d 1024, 16 heads, S 528 with M6's
                multimodal prefix 272, selective recompute), 30 steps: tokens/s, TFLOP/s and MFU from
                the model's FLOP counter, peak memory next to the planner's prediction for the layout
  parity        the same tiny fp32 run on the device and on the CPU (a subprocess): losses agree
  loss_scaler   fp16 O2 with an inf injected into the gradients: the step is skipped, weights unchanged
  checkpoint    saved on the device, loaded on the CPU (a subprocess): every weight equal
  decode        KV-cache greedy decoding vs recomputing the sequence per token: tokens/s
  offload       the training stage's model and batches (fewer steps), bf16, with the optimizer on the
                device (torch fused AdamW) and under ZeRO-Offload (optimizer.offload: cpu): step time,
                peak GPU memory, the host optimizer step's time, and the losses of the two agree
  init          m6::normal_shard_ (the per-shard N(0, std) initialisation) on the device against the CPU
                kernel (fp32 within 1 ulp, and how many elements are bit-equal; fp16 / bf16; Philox's
                words equal), blocks of a full tensor on the device equal to its slices, and its
                fill rate (elements / s)
  attention     prefix_lm_attention (FlexAttention with the lengths' block mask on CUDA) against SDPA
                causal (flash backend), FlexAttention causal and SDPA with the boolean mask, bf16,
                fwd and fwd+bwd at (8,16,528,64) prefix 272 and (2,16,2048,64) prefix 1040: ms, ratios,
                and the op's largest difference from the fp32 reference

Each stage returns its figures; a stage that raises is recorded as failed and the others still run;
the exit status is non-zero when any failed. ``--dry-run`` runs every stage with small sizes (on
the CPU unless ``--device`` says otherwise), so the plumbing is checked by `make test` between GPU runs.

Usage: ``python -m tests.gpu_check --device cuda --out DIR [--dry-run] [--only STAGE ...]`` writes
``DIR/gpu_check_stages.json``; ``--summarize DIR`` merges it with tests/gpu_check.sh's steps into
``DIR/gpu_check.json`` and prints the final screen.
"""

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

from m6_engine.config import job_config_from_dict
from m6_engine.data.tasks import SampleLayout, collate, multimodal_to_text
from tests.bench.common import print_table, time_calls, time_fns, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ids of the default vocabulary's specials ([PAD] [CLS] [SEP] [MASK] in bert-base-chinese).
SPECIALS = {"pad_id": 0, "cls_id": 101, "sep_id": 102, "mask_id": 103}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each stage runs: the real check, or the dry run's plumbing check."""

    train_model: dict          # ModelConfig overrides of the m6-base preset
    train_steps: int
    timed_from: int            # steps before this one are warm-up, not in the figures
    micro_batch: int
    global_batch: int
    tiny_model: dict           # the parity / scaler / checkpoint model (tiny preset overrides)
    tiny_steps: int
    decode_batches: tuple
    decode_tokens: int
    quick_bench: bool
    attention_cases: tuple = ()   # (B, H, S, D, prefix_len) of the attention stage
    offload_steps: int = 6        # steps of each run of the offload stage (the first is warm-up)
    init_shape: tuple = (4096, 4099)  # the init stage's full tensor (columns not a multiple of 4)


FULL = Sizes(train_model={"num_layers": 8}, train_steps=30, timed_from=5, micro_batch=8, global_batch=64,
             tiny_model={"num_layers": 2, "max_text_positions": 64}, tiny_steps=6,
             decode_batches=(1, 16), decode_tokens=64, quick_bench=False,
             attention_cases=((8, 16, 528, 64, 272), (2, 16, 2048, 64, 1040)), offload_steps=6,
            init_shape=(4096, 4099))
DRY = Sizes(train_model={"num_layers": 1, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 256,
                         "max_text_positions": 32, "vocab_size": 512},
            train_steps=3, timed_from=1, micro_batch=2, global_batch=4,
            tiny_model={"num_layers": 1, "hidden_size": 32, "num_heads": 2, "max_text_positions": 16,
                        "vocab_size": 256},
            tiny_steps=2, decode_batches=(1,), decode_tokens=3, quick_bench=True,
            attention_cases=((2, 2, 40, 16, 20),), offload_steps=2, init_shape=(64, 99))


# ---- jobs and data --------------------------------------------------------------------------------

def _job(preset: str, model: dict, *, precision: str, micro_batch: int, global_batch: int, steps: int,
         recompute: str = "none", dropout: bool = True, optimizer: dict | None = None):
    """A one-process job: the preset with ``model`` overrides; no corpus (batches are built here)."""
    model = dict(model)
    if not dropout:
        model.update(hidden_dropout=0.0, attention_dropout=0.0)
    return job_config_from_dict({
        "model": {"preset": preset, **model},
        "parallel": {"tp": 1, "pp": 1, "timeout_s": 300},
        "optimizer": {"precision": precision, "lr": 1e-4, "min_lr": 1e-5, "warmup_fraction": 0.1,
                      **(optimizer or {})},
        "train": {"train_steps": steps, "micro_batch": micro_batch, "global_batch": global_batch,
                  "recompute": recompute, "log_interval": 1000},
    })


def multimodal_batches(model_config, micro_batch: int, count: int, seed: int = 0) -> list:
    """``count`` micro-batches of full-length multimodality-to-text samples: 16 patches, a masked text
    of half the text positions and a target filling the rest (M6's prefix 16 + 256 of 528)."""
    layout = SampleLayout(model_config.num_patches, model_config.patch_feature_dim,
                          model_config.max_text_positions, **SPECIALS)
    rng = np.random.default_rng(seed)
    half = model_config.max_text_positions // 2
    low = min(1000, model_config.vocab_size // 2)  # ordinary word ids, clear of the specials
    ids = lambda n: rng.integers(low, min(8000, model_config.vocab_size), n).tolist()  # noqa: E731
    batches = []
    for _ in range(count):
        samples = [multimodal_to_text(layout, rng.standard_normal(
            (layout.num_patches, layout.patch_feature_dim)).astype(np.float32), ids(half), ids(half))
            for _ in range(micro_batch)]
        batches.append(collate(samples, layout))
    return batches


def _trainer(job, state, batches):
    from m6_engine.training import Trainer

    return Trainer(job, state, itertools.cycle(batches), log_rank_output=False)


def _losses(trainer, steps: int) -> list:
    from m6_engine.metrics import losses_of

    return [losses_of(trainer.train_step().loss_parts)["loss"] for _ in range(steps)]


# ---- stages ---------------------------------------------------------------------------------------

def stage_kernels(state, sizes: Sizes, out: str) -> dict:
    from tests.bench import bench_ops

    result = bench_ops.run(state.device.type, out, quick=sizes.quick_bench)
    return {"gpu": result.get("gpu", "cpu"), "timing": result["timing"],
            "kernels": [{"op": op, "case": r["case"], "dtype": r["dtype"], "fwd_ms": r["fused_fwd_ms"],
                         "bwd_ms": r["fused_bwd_ms"], "fwd_gbps": r["fwd"]["gbps"],
                         "fwd_of_copy": r["fwd"]["copy_fraction"], "bwd_gbps": r["bwd"]["gbps"],
                         "bwd_of_copy": r["bwd"]["copy_fraction"], "copy_gbps": r["fwd"]["copy_gbps"],
                         "fwd_bwd_speedup": r["fwd_bwd_speedup"]}
                        for op in ("masked_softmax", "layer_norm") for r in result[op]]}


def _planner_device(device: torch.device):
    from m6_engine.plan.devices import GPU_DEVICES, cpu_device

    if device.type != "cuda":
        return cpu_device(peak_fp32_flops=1e11)
    name = torch.cuda.get_device_name(device)
    return next((d for key, d in GPU_DEVICES.items() if key.split("-")[0] in name), GPU_DEVICES["H100-80G"])


def stage_training(state, sizes: Sizes, out: str) -> dict:
    from m6_engine.metrics import losses_of, peak_memory_gib
    from m6_engine.plan.layout import SequenceLayout
    from m6_engine.plan.memory import stage_memory
    from m6_engine.plan.rehearse import plan_layout

    precision = "bf16" if state.device.type == "cuda" else "fp32"
    job = _job("m6-base", sizes.train_model, precision=precision, micro_batch=sizes.micro_batch,
               global_batch=sizes.global_batch, steps=sizes.train_steps, recompute="selective")
    batches = multimodal_batches(job.model, sizes.micro_batch, job.train.num_microbatches(1))
    if state.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(state.device)
    trainer = _trainer(job, state, batches)
    reports = [trainer.train_step() for _ in range(sizes.train_steps)]
    timed = reports[sizes.timed_from:]
    seconds = sum(r.seconds for r in timed)
    tokens = sum(r.tokens for r in timed)
    tflops = sum(r.model_flops for r in timed) / seconds / 1e12
    plan = stage_memory(job.model, plan_layout(job, state), SequenceLayout.for_task(job.model),
                        _planner_device(state.device), 0)
    losses = [losses_of(r.loss_parts)["loss"] for r in reports]
    if not all(np.isfinite(losses)):
        raise AssertionError(f"non-finite training loss: {losses}")
    return {"layers": job.model.num_layers, "hidden": job.model.hidden_size, "heads": job.model.num_heads,
            "seq_length": trainer.seq_length, "precision": precision, "recompute": job.train.recompute,
            "global_batch": job.train.global_batch, "micro_batch": job.train.micro_batch,
            "steps": sizes.train_steps, "timed_steps": len(timed), "step_s": seconds / len(timed),
            "tokens_per_s": tokens / seconds, "tflops_per_s": tflops, "peak_tflops": trainer.peak,
            "mfu": tflops / trainer.peak, "peak_memory_gib": peak_memory_gib(state.device),
            "planned_memory_gib": plan.total / 2 ** 30, "first_loss": losses[0], "last_loss": losses[-1]}


def _offload_run(state, sizes: Sizes, offload: str) -> dict:
    """One run of the offload stage: step and optimizer-step times, peak device memory, losses."""
    from m6_engine.metrics import losses_of, peak_memory_gib

    precision = "bf16" if state.device.type == "cuda" else "fp32"
    job = _job("m6-base", sizes.train_model, precision=precision, micro_batch=sizes.micro_batch,
               global_batch=2 * sizes.micro_batch, steps=sizes.offload_steps, recompute="selective",
               dropout=False, optimizer={"offload": offload})
    batches = multimodal_batches(job.model, sizes.micro_batch, 2)
    if state.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(state.device)
    trainer = _trainer(job, state, batches)
    optimizer_seconds, step = [], trainer.optimizer.step

    def timed_step():                 # the optimizer's share of the step, device work included
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        start = time.perf_counter()
        stats = step()
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        optimizer_seconds.append(time.perf_counter() - start)
        return stats

    trainer.optimizer.step = timed_step
    reports = [trainer.train_step() for _ in range(sizes.offload_steps)]
    timed = slice(1, None) if len(reports) > 1 else slice(None)
    return {"precision": precision, "adam_backend": trainer.optimizer.adam_backend,
            "step_s": float(np.median([r.seconds for r in reports[timed]])),
            "optimizer_step_s": float(np.median(optimizer_seconds[timed])),
            "peak_memory_gib": peak_memory_gib(state.device),
            "host_state_gib": trainer.optimizer.host_state_bytes() / 2 ** 30,
            "device_optimizer_gib": (0 if offload == "cpu" else trainer.optimizer.state_bytes()) / 2 ** 30,
            "losses": [losses_of(r.loss_parts)["loss"] for r in reports]}


def stage_offload(state, sizes: Sizes, out: str) -> dict:
    runs = {name: _offload_run(state, sizes, name) for name in ("none", "cpu")}
    device, offloaded = runs["none"], runs["cpu"]
    # Same weights, data and update rule: the runs differ only by where AdamW runs (and its rounding).
    worst = max(abs(a - b) / abs(b) for a, b in zip(offloaded["losses"], device["losses"]))
    tolerance = 2e-2 if device["precision"] == "bf16" else 1e-4
    if not worst <= tolerance:
        raise AssertionError(f"offload losses {offloaded['losses']} differ from the device run's "
                             f"{device['losses']} by {worst:.2e} (> {tolerance})")
    return {"layers": sizes.train_model.get("num_layers"), "runs": runs,
            "max_rel_loss_difference": worst,
            "step_time_ratio_offload_vs_device": offloaded["step_s"] / device["step_s"],
            "peak_memory_ratio_offload_vs_device": offloaded["peak_memory_gib"] / max(device["peak_memory_gib"], 1e-9)}


def _run_on_cpu(task: str, payload: dict) -> dict:
    """Run ``task`` of this module in a fresh CPU-only process (no GPU visible); returns its answer."""
    with tempfile.TemporaryDirectory() as tmp:
        request, answer = os.path.join(tmp, "request.pt"), os.path.join(tmp, "answer.json")
        torch.save(payload, request)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
        done = subprocess.run([sys.executable, "-m", "tests.gpu_check", "--cpu-task", task, request, answer],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"CPU task {task} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
        with open(answer) as f:
            return json.load(f)


def _tiny_job(sizes: Sizes, precision: str = "fp32", steps: int | None = None, optimizer: dict | None = None):
    return _job("tiny", sizes.tiny_model, precision=precision, micro_batch=2, global_batch=4,
                steps=steps or sizes.tiny_steps, dropout=False, optimizer=optimizer)


def stage_parity(state, sizes: Sizes, out: str) -> dict:
    job = _tiny_job(sizes)
    batches = multimodal_batches(job.model, 2, 2, seed=1)
    here = _losses(_trainer(job, state, batches), sizes.tiny_steps)
    cpu = _run_on_cpu("losses", {"job": job.to_dict(), "batches": batches, "steps": sizes.tiny_steps})["losses"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(here, cpu))
    if worst > 1e-4:
        raise AssertionError(f"{state.device.type} losses {here} vs CPU {cpu}: relative difference {worst:.2e}")
    return {"device_losses": here, "cpu_losses": cpu, "max_relative_difference": worst, "tolerance": 1e-4}


def stage_loss_scaler(state, sizes: Sizes, out: str) -> dict:
    # A scale the tiny model's fp16 gradients do not overflow at (the default 2^32 skips the first steps).
    job = _tiny_job(sizes, precision="fp16", steps=4, optimizer={"initial_loss_scale": 2.0 ** 12})
    trainer = _trainer(job, state, multimodal_batches(job.model, 2, 2, seed=2))
    clean = trainer.train_step().stats
    before = {n: p.detach().clone() for n, p in trainer.stage.named_parameters()}
    step = trainer.optimizer.step

    def poisoned_step():  # the gradients of this step carry an inf, as an fp16 overflow would
        trainer.model.grad_buffer[0] = float("inf")
        return step()

    trainer.optimizer.step = poisoned_step
    skipped = trainer.train_step().stats
    trainer.optimizer.step = step
    changed = [n for n, p in trainer.stage.named_parameters() if not torch.equal(p, before[n])]
    after = trainer.train_step().stats
    if clean.skipped or not skipped.skipped or changed or after.skipped:
        raise AssertionError(f"clean step skipped={clean.skipped}, poisoned step skipped={skipped.skipped} "
                             f"(weights changed: {changed[:3]}), next step skipped={after.skipped}")
    return {"loss_scale_before": clean.loss_scale, "loss_scale_of_skipped_step": skipped.loss_scale,
            "loss_scale_after": after.loss_scale, "skipped_steps": trainer.optimizer.skipped_steps}


def stage_checkpoint(state, sizes: Sizes, out: str) -> dict:
    from m6_engine.checkpoint import save_checkpoint

    precision = "bf16" if state.device.type == "cuda" else "fp32"
    job = _tiny_job(sizes, precision=precision)
    trainer = _trainer(job, state, multimodal_batches(job.model, 2, 2, seed=3))
    _losses(trainer, 2)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = save_checkpoint(tmp, trainer.step, model=trainer.model, state=state, optimizer=trainer.optimizer,
                               rng_tracker=trainer.tracker, config=job.to_dict(), extra={"step": trainer.step})
        save_s = time.perf_counter() - start
        weights = {n: p.detach().cpu() for n, p in trainer.stage.named_parameters()}
        loaded = _run_on_cpu("load", {"job": job.to_dict(), "path": str(path), "weights": weights})
    if loaded["differing"] or loaded["missing"]:
        raise AssertionError(f"loaded on the CPU: differing {loaded['differing']}, missing {loaded['missing']}")
    return {"precision": precision, "weights": len(weights), "save_s": save_s, "cpu_load_s": loaded["load_s"]}


def stage_decode(state, sizes: Sizes, out: str) -> dict:
    from m6_engine.config import model_preset
    from m6_engine.inference import GenerationConfig, generate, m6_prompt
    from m6_engine.model import M6Model

    config = model_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, **(
        {} if not sizes.quick_bench else sizes.tiny_model))
    model = M6Model(config, state, seed=0).eval()
    layout = SampleLayout(config.num_patches, config.patch_feature_dim, config.max_text_positions, **SPECIALS)
    gen = torch.Generator().manual_seed(0)
    cached = GenerationConfig(max_new_tokens=sizes.decode_tokens)
    recompute = dataclasses.replace(cached, use_cache=False)
    rows = []
    for batch in sizes.decode_batches:
        prompts = [m6_prompt(layout, torch.randint(1000, 8000, (layout.max_text_positions // 4,),
                                                    generator=gen).tolist(),
                             torch.randn(layout.num_patches, layout.patch_feature_dim, generator=gen))
                   for _ in range(batch)]
        outputs = {}
        seconds = time_fns({name: (lambda name=name, c=c: outputs.__setitem__(name, generate(model, prompts, c, None)))
                            for name, c in (("cached", cached), ("recompute", recompute))},
                           str(state.device), warmup=1, iters=3)
        tokens = batch * sizes.decode_tokens
        rows.append({"batch": batch, "cached_tokens_per_s": tokens / seconds["cached"],
                     "recompute_tokens_per_s": tokens / seconds["recompute"],
                     "speedup": seconds["recompute"] / seconds["cached"],
                     "same_tokens": [r.tokens for r in outputs["cached"]] == [r.tokens for r in outputs["recompute"]]})
    if not all(r["same_tokens"] for r in rows):
        raise AssertionError(f"cached and recomputed decoding disagree: {rows}")
    return {"model": "tiny", "new_tokens": sizes.decode_tokens, "batches": rows}


def _attention_contenders(prefix_len, valid_len, sq: int, scale: float, device: torch.device) -> dict:
    """name -> fn(q, k, v): the op and what a user would otherwise run on this device."""
    from m6_engine import ops
    from m6_engine.ops.attention_torch import flex_attention_available

    allowed = ops.prefix_lm_mask(prefix_len, valid_len, sq, sq)
    contenders = {
        "prefix_lm_attention": lambda q, k, v: ops.prefix_lm_attention(q, k, v, prefix_len, valid_len, scale=scale),
        "sdpa_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash_causal(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        contenders["sdpa_flash_causal"] = sdpa_flash_causal
        if flex_attention_available():
            from torch.nn.attention.flex_attention import create_block_mask

            from m6_engine.ops.attention_torch import _compiled_flex_attention
            causal = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, sq, sq, device=device)
            flex = _compiled_flex_attention()
            contenders["flex_causal"] = lambda q, k, v: flex(q, k, v, block_mask=causal, scale=scale)
    else:   # the dry run: no flash backend and no FlexAttention backward on the CPU
        contenders["sdpa_causal"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     scale=scale)
    return contenders


def stage_attention(state, sizes: Sizes, out: str) -> dict:
    from m6_engine.ops.reference import prefix_lm_attention_reference
    from tests.bench.bench_attention import attention_calls

    device = state.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for b, h, s, d, prefix in sizes.attention_cases:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, generator=gen, device=device, dtype=dtype).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(b, h, s, d, generator=gen, device=device, dtype=dtype)
        prefix_len = torch.full((b,), prefix, dtype=torch.int64, device=device)
        valid_len = torch.full((b,), s, dtype=torch.int64, device=device)
        contenders = _attention_contenders(prefix_len, valid_len, s, d ** -0.5, device)

        calls = {name: attention_calls(fn, q, k, v, grad) for name, fn in contenders.items()}
        iters = 3 if sizes.quick_bench else 20
        fwd = time_calls({name: c[0] for name, c in calls.items()}, str(device), iters=iters)
        fwd_bwd = time_calls({name: c[1] for name, c in calls.items()}, str(device), iters=iters)
        with torch.no_grad():
            ours = contenders["prefix_lm_attention"](q, k, v).float()
            want = prefix_lm_attention_reference(q.float(), k.float(), v.float(), prefix_len, valid_len)
        causal = "sdpa_flash_causal" if "sdpa_flash_causal" in fwd else "sdpa_causal"
        row = {"shape": [b, h, s, d], "prefix_len": prefix, "dtype": str(dtype).replace("torch.", ""),
               "fwd_ms": {n: t * 1e3 for n, t in fwd.items()}, "fwd_bwd_ms": {n: t * 1e3 for n, t in fwd_bwd.items()},
               "max_abs_difference_vs_fp32_reference": (ours - want).abs().max().item(),
               "fwd_bwd_ours_over_sdpa_causal": fwd_bwd["prefix_lm_attention"] / fwd_bwd[causal],
               "fwd_bwd_ours_over_sdpa_mask": fwd_bwd["prefix_lm_attention"] / fwd_bwd["sdpa_mask"]}
        if "flex_causal" in fwd_bwd:
            row["fwd_bwd_ours_over_flex_causal"] = fwd_bwd["prefix_lm_attention"] / fwd_bwd["flex_causal"]
        rows.append(row)
        tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
        if row["max_abs_difference_vs_fp32_reference"] > tolerance:
            raise AssertionError(f"prefix_lm_attention differs from the reference by "
                                 f"{row['max_abs_difference_vs_fp32_reference']:.2e} at {row['shape']}")
    return {"cases": rows}


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the spacing of b's dtype at |b| (subnormal spacing below the normal range)."""
    info = torch.finfo(b.dtype)
    exact = b.double().abs()
    spacing = torch.exp2(torch.floor(torch.log2(exact.clamp(min=info.smallest_normal)))) * info.eps
    return (a.double() - b.double()).abs() / spacing


def stage_init(state, sizes: Sizes, out: str) -> dict:
    from m6_engine import ops

    device, (rows, cols), key, std = state.device, sizes.init_shape, 0x299F31D0A4093822, 0.02
    result = {"shape": [rows, cols], "dtypes": {}}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        here = ops.normal_shard_(torch.empty(rows, cols, dtype=dtype, device=device), key, full_cols=cols, std=std)
        cpu = ops.normal_shard_(torch.empty(rows, cols, dtype=dtype), key, full_cols=cols, std=std)
        apart = _ulps_apart(here.cpu(), cpu)
        result["dtypes"][str(dtype).replace("torch.", "")] = {
            "max_ulps_from_cpu": apart.max().item(), "bit_equal_fraction": (here.cpu() == cpu).double().mean().item()}
        if apart.max().item() > 1:
            raise AssertionError(f"normal_shard_ {dtype} on {device.type} is {apart.max().item():.1f} ulps from the CPU's")
    words = ops.philox4x32_10(key, 2 ** 32 - 100, 1000, device).cpu()
    if not torch.equal(words, ops.philox4x32_10(key, 2 ** 32 - 100, 1000)):
        raise AssertionError(f"Philox4x32-10 words on {device.type} differ from the CPU's")
    full = ops.normal_shard_(torch.empty(rows, cols, device=device), key, full_cols=cols, std=std)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):     # blocks starting and ending anywhere in a counter's four elements
        row0, col0 = (int(torch.randint(0, n, (1,), generator=gen)) for n in (rows, cols))
        r, c = int(torch.randint(1, rows - row0 + 1, (1,), generator=gen)), int(torch.randint(1, cols - col0 + 1, (1,), generator=gen))
        block = ops.normal_shard_(torch.empty(r, c, device=device), key, full_cols=cols, row0=row0, col0=col0, std=std)
        if not torch.equal(block, full[row0:row0 + r, col0:col0 + c]):
            raise AssertionError(f"the block ({r}, {c}) at ({row0}, {col0}) on {device.type} differs from the full tensor's")
    fills = {str(dtype).replace("torch.", ""): (lambda t=torch.empty(rows, cols, dtype=dtype, device=device):
                                                ops.normal_shard_(t, key, full_cols=cols, std=std))
             for dtype in (torch.float32, torch.bfloat16)}
    seconds = time_calls(fills, str(device), iters=3 if sizes.quick_bench else 10)
    result["elements_per_s"] = {name: rows * cols / t for name, t in seconds.items()}
    return result


STAGES = {"kernels": stage_kernels, "training": stage_training, "parity": stage_parity,
          "loss_scaler": stage_loss_scaler, "checkpoint": stage_checkpoint, "decode": stage_decode,
          "attention": stage_attention, "offload": stage_offload, "init": stage_init}


# ---- the CPU side of the parity and checkpoint stages (run by _run_on_cpu) --------------------------

def _cpu_task(task: str, request: str, answer: str) -> None:
    from m6_engine.checkpoint import load_checkpoint
    from m6_engine.parallel import initialize

    payload = torch.load(request, weights_only=False)
    job = job_config_from_dict(payload["job"])
    state = initialize(1, 1, backend="gloo", timeout=300)
    if task == "losses":
        result = {"losses": _losses(_trainer(job, state, payload["batches"]), payload["steps"])}
    elif task == "load":
        trainer = _trainer(job, state, [])
        start = time.perf_counter()
        load_checkpoint(payload["path"], model=trainer.model, state=state, optimizer=trainer.optimizer,
                        rng_tracker=trainer.tracker)
        mine = dict(trainer.stage.named_parameters())
        result = {"load_s": time.perf_counter() - start,
                  "missing": sorted(set(payload["weights"]) - set(mine)),
                  "differing": sorted(n for n, w in payload["weights"].items()
                                      if n in mine and not torch.equal(mine[n].detach(), w))}
    else:
        raise ValueError(f"unknown CPU task {task!r}")
    write_json(os.path.dirname(answer), os.path.basename(answer)[:-len(".json")], result)


# ---- driver ---------------------------------------------------------------------------------------

def run_stages(state, out: str, sizes: Sizes, only=None, stages=None) -> dict:
    """Every stage of ``stages`` (default :data:`STAGES`; or those in ``only``) on ``state``;
    {stage: result with "ok" and "seconds"}."""
    results = {}
    for name, stage in (stages or STAGES).items():
        if only and name not in only:
            continue
        print(f"\n== stage {name}", flush=True)
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, **stage(state, sizes, out)}
        except Exception:  # noqa: BLE001 -- a failed stage is reported; the others still run
            traceback.print_exc()
            results[name] = {"ok": False, "error": traceback.format_exc(limit=8)}
        results[name]["seconds"] = time.perf_counter() - start
    return results


def print_summary(results: dict) -> None:
    """One screen: the stages, then the kernel and training figures."""
    print_table("gpu-check stages", ["stage", "ok", "seconds"],
                [[name, "ok" if r["ok"] else "FAILED", r["seconds"]] for name, r in results.items()])
    kernels = results.get("kernels", {})
    if kernels.get("ok"):
        print_table(f"kernels on {kernels['gpu']} ({kernels['timing']}); 'of copy' = GB/s / same-run copy GB/s",
                    ["op", "case", "dtype", "fwd ms", "fwd GB/s", "fwd of copy", "bwd ms", "bwd GB/s",
                     "bwd of copy", "fwd+bwd x torch"],
                    [[k["op"], k["case"], k["dtype"], k["fwd_ms"], k["fwd_gbps"], k["fwd_of_copy"], k["bwd_ms"],
                      k["bwd_gbps"], k["bwd_of_copy"], k["fwd_bwd_speedup"]] for k in kernels["kernels"]])
    train = results.get("training", {})
    if train.get("ok"):
        print(f"\ntraining: {train['layers']} layers d {train['hidden']} S {train['seq_length']} {train['precision']} "
              f"recompute {train['recompute']}: {train['step_s'] * 1e3:.1f} ms/step, "
              f"{train['tokens_per_s']:.0f} tokens/s, {train['tflops_per_s']:.1f} TFLOP/s, MFU {train['mfu']:.1%}; "
              f"peak memory {train['peak_memory_gib']:.2f} GiB vs planned {train['planned_memory_gib']:.2f} GiB")
    attention = results.get("attention", {})
    if attention.get("ok"):
        names = list(attention["cases"][0]["fwd_bwd_ms"])
        print_table("attention under the prefix-LM mask (ms; ratios: prefix_lm_attention / contender, fwd+bwd)",
                    ["shape", "prefix", "dtype", *(f"{n} fwd" for n in names), *(f"{n} fwd+bwd" for n in names),
                     "max |ours - fp32 ref|"],
                    [[str(r["shape"]), r["prefix_len"], r["dtype"], *(r["fwd_ms"][n] for n in names),
                      *(f"{r['fwd_bwd_ms'][n]:.2f} ({r['fwd_bwd_ms']['prefix_lm_attention'] / r['fwd_bwd_ms'][n]:.2f})"
                        for n in names), r["max_abs_difference_vs_fp32_reference"]] for r in attention["cases"]])
    offload = results.get("offload", {})
    if offload.get("ok"):
        print_table("ZeRO-Offload vs AdamW on the device (one rank, medians over the steps after the first)",
                    ["optimizer", "backend", "step ms", "optimizer step ms", "peak GiB", "host state GiB"],
                    [[name, r["adam_backend"], r["step_s"] * 1e3, r["optimizer_step_s"] * 1e3,
                      r["peak_memory_gib"], r["host_state_gib"]] for name, r in offload["runs"].items()])
    init = results.get("init", {})
    if init.get("ok"):
        print_table(f"normal_shard_ {init['shape']} vs the CPU kernel", ["dtype", "max ulps from CPU", "bit-equal",
                                                                        "elements / s"],
                    [[name, r["max_ulps_from_cpu"], r["bit_equal_fraction"], init["elements_per_s"].get(name, "-")]
                     for name, r in init["dtypes"].items()])
    decode = results.get("decode", {})
    if decode.get("ok"):
        for row in decode["batches"]:
            print(f"decode batch {row['batch']}: cached {row['cached_tokens_per_s']:.0f} tokens/s, "
                  f"recompute {row['recompute_tokens_per_s']:.0f} ({row['speedup']:.1f}x)")


def summarize(out: str) -> int:
    """Merge the shell's steps (``gpu_check_steps.tsv``: name, exit status, seconds) and the stages'
    JSON into ``out/gpu_check.json``, print the one-screen summary; 0 when every step passed."""
    steps = []
    with open(os.path.join(out, "gpu_check_steps.tsv")) as f:
        for line in f:
            name, rc, seconds = line.rstrip("\n").split("\t")
            steps.append({"step": name, "exit_status": int(rc), "seconds": int(seconds)})
    stages_path = os.path.join(out, "gpu_check_stages.json")
    stages = {}
    if os.path.exists(stages_path):
        with open(stages_path) as f:
            stages = json.load(f)
    summary = {"torch": torch.__version__, "python": sys.executable, "steps": steps, **stages}
    path = write_json(out, "gpu_check", summary)
    print_table("gpu-check steps", ["step", "exit status", "seconds"],
                [[s["step"], s["exit_status"], s["seconds"]] for s in steps])
    if stages.get("stages"):
        print_summary(stages["stages"])
    failed = [s["step"] for s in steps if s["exit_status"]]
    failed += [f"stage {n}" for n, r in stages.get("stages", {}).items() if not r["ok"]]
    if not any(s["step"] == "stages" for s in steps):
        failed.append("stages (never ran)")
    print(f"\nwrote {path}")
    print("gpu-check: OK" if not failed else f"gpu-check: FAILED: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda, or cpu with --dry-run")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--dry-run", action="store_true", help="small sizes: checks the plumbing only")
    parser.add_argument("--only", nargs="*", choices=sorted(STAGES), help="run only these stages")
    parser.add_argument("--summarize", metavar="OUT", help="merge OUT's step and stage results (tests/gpu_check.sh)")
    parser.add_argument("--cpu-task", nargs=3, metavar=("TASK", "REQUEST", "ANSWER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_task:
        _cpu_task(*args.cpu_task)
        return 0
    if args.summarize:
        return summarize(args.summarize)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (use --dry-run to check the plumbing on the CPU)")
    from m6_engine.parallel import initialize

    torch.manual_seed(0)
    state = initialize(1, 1, backend="nccl" if device == "cuda" else "gloo", timeout=300)
    results = run_stages(state, args.out, DRY if args.dry_run else FULL, args.only)
    path = write_json(args.out, "gpu_check_stages", {"device": device, "dry_run": args.dry_run,
                                                      "torch": torch.__version__, "stages": results})
    print_summary(results)
    print(f"\nwrote {path}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
