"""The planner against the real model: per-rank parameter counts of meta-device builds (the 10B
M6-large at its planned layouts included), saved activation bytes measured with saved-tensor hooks
(one stage in one process, and a real tp=2 x pp=2 1F1B run on 4 ranks), resident weights,
gradients and optimizer state of a wrapped stage, FLOPs against the trainer's formula, the search,
the presets, the example configs and the CLI."""

import dataclasses
import functools
import itertools
from pathlib import Path

import pytest
import torch

from m6_engine.config import ConfigError, ModelConfig, job_config_from_dict, load_yaml, model_preset
from m6_engine.data.batch import MicroBatch
from m6_engine.model import M6Model, batch_forward_flops, parameter_count
from m6_engine.parallel import seed_parallel_rng
from m6_engine.plan import (
    GPU_DEVICES, ActivationDtype, Layout, SearchSpace, SequenceLayout, block_activation_bytes, cpu_device,
    in_flight_microbatches, make_plan, model_flops_per_step, plan_cluster, search,
    stage_activation_bytes, stage_parameters, unique_parameters,
)
from m6_engine.plan.__main__ import main as plan_main
from m6_engine.plan.measure import SavedActivations, resident_bytes
from m6_engine.plan.meta import meta_build, stand_in_state
from m6_engine.plan.resident import stage_parameter_numels
from tests.distributed import assert_checks, init_state, run_ranks
from tests.m6_data import mixed_batch, task_batch
from tests.single_rank import run_module_checks

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.10
SMALL = ModelConfig(num_layers=3, hidden_size=64, num_heads=4, vocab_size=500, max_text_positions=48,
                    num_patches=4, patch_feature_dim=16, vocab_multiple=8)
CONFIGS = {
    "small, dropout": SMALL,
    "small, no dropout, ffn 96": dataclasses.replace(SMALL, hidden_dropout=0.0, attention_dropout=0.0,
                                                     ffn_hidden_size=96),
    "text-only, no segments": dataclasses.replace(SMALL, num_patches=0, num_segments=0, num_heads=8),
}
# (tp, pp, stage) of a stand-in rank: first, middle and last stages, tp up to 4.
STAGES = ((1, 1, 0), (2, 1, 0), (1, 3, 0), (1, 3, 1), (2, 3, 2), (4, 2, 1))
CPU = cpu_device(peak_fp32_flops=1e11)   # timing is not under test: no matmul measurement
FIGURES = {}


@functools.cache
def _best_plan(preset: str):
    return plan_cluster(preset)[0]


def _fp32() -> ActivationDtype:
    """What this CPU saves: fp32 activations and float dropout masks."""
    return ActivationDtype.of(Layout(1, 1, 1, 1, 1, precision="fp32"), CPU)


def _batch(config, first: int, size: int) -> dict:
    if config.num_patches:
        return mixed_batch(config, first, size)
    return task_batch(config, ["text_denoising", "language_modelling"] * (size // 2), seed=first)


def _loss_tokens(batch) -> int:
    return int(batch.loss_mask.ne(0).sum())


# --------------------------------------------------------------------------- checks in one rank

def _check_activation_predictions(state):
    """One stage's forward on a stand-in rank: saved bytes against the formula, every mode."""
    worst = 0.0
    # Every config with the default (fused) attention; the other cores where they differ: "none".
    cases = [(name, config, placement, recompute) for (name, config), placement, recompute in itertools.product(
        CONFIGS.items(), STAGES, ("none", "selective", "full"))]
    cases += [(f"{name}, {backend}", dataclasses.replace(config, attention_backend=backend), placement, "none")
              for (name, config), placement, backend in itertools.product(
                  CONFIGS.items(), STAGES, ("unfused", "sdpa"))]
    for name, config, (tp, pp, stage), recompute in cases:
        rank = stand_in_state(tp, pp, 1, pp_rank=stage, tp_rank=tp - 1, group=state.group("tp"),
                              device="cpu")
        model = M6Model(config, rank, recompute=recompute, rng_tracker=seed_parallel_rng(0, rank)).train()
        batch = _batch(config, 0, 2)
        seq_length = batch.tokens.shape[1]
        input_tensor = None if stage == 0 else torch.randn(2, seq_length, config.hidden_size,
                                                           requires_grad=True)
        saved = SavedActivations(model)
        with saved.hooks():
            out = model(batch, input_tensor)
        measured = saved.live
        predicted = stage_activation_bytes(
            config, tp=tp, pp=pp, stage_id=stage, micro_batch=2, seq_length=seq_length,
            loss_tokens=_loss_tokens(batch), dtype=_fp32(), recompute=recompute)
        error = abs(predicted - measured) / measured
        worst = max(worst, error)
        FIGURES[f"activations {name}, tp {tp} pp {pp} stage {stage}, {recompute} "
                f"(measured, predicted bytes)"] = (measured, predicted)
        assert error <= TOLERANCE, (name, tp, pp, stage, recompute, measured, predicted)
        del out
    FIGURES["activations: worst relative error"] = worst


def _check_per_rank_parameters(state):
    """Each (stage, tp rank) of small layouts: meta build == plan, counted once == the model."""
    group = state.group("tp")
    for config, (tp, pp) in itertools.product(
            (SMALL, CONFIGS["text-only, no segments"]), ((1, 1), (2, 1), (1, 3), (2, 2), (4, 3))):
        ranks = meta_build(config, tp, pp, 2, group)
        for r in ranks:
            assert r.count == stage_parameters(config, tp, pp, r.pp_rank), (tp, pp, r.pp_rank, r.tp_rank)
        once = sum(r.unique for r in ranks)
        assert once == unique_parameters(config, tp, pp) == parameter_count(config, tp=tp), (tp, pp, once)
    # The registration order the gradient buffer is laid out in (reversed), chunks included.
    for config, (tp, pp, v) in itertools.product(
            (SMALL, dataclasses.replace(CONFIGS["text-only, no segments"], itm_head=True)),
            ((1, 1, 1), (2, 1, 1), (2, 3, 1), (1, 2, 2), (2, 3, 1))):
        config = dataclasses.replace(config, num_layers=max(config.num_layers, pp * v))
        for r in meta_build(config, tp, pp, 2, group, v):
            planned = stage_parameter_numels(config, tp, pp, r.pp_rank, v)
            assert r.numels == tuple(p.numel for p in planned), (tp, pp, v, r.pp_rank)
            assert r.count == stage_parameters(config, tp, pp, r.pp_rank, v)


def _check_10b_layout(state, preset: str):
    """M6-large on the meta device at the layout the planner picks for ``preset``."""
    layout = _best_plan(preset).layout
    config = model_preset("m6-large")
    ranks = meta_build(config, layout.tp, layout.pp, layout.dp, state.group("tp"))
    assert len(ranks) == layout.tp * layout.pp
    for r in ranks:
        assert r.count == stage_parameters(config, layout.tp, layout.pp, r.pp_rank), r.pp_rank
    once = sum(r.unique for r in ranks)
    FIGURES[f"{preset}: {layout.describe()}; parameters counted once"] = once
    FIGURES[f"{preset}: per-rank parameters (stage, tp rank, count)"] = [
        (r.pp_rank, r.tp_rank, r.count) for r in ranks if r.tp_rank == 0]
    assert abs(once - 10e9) <= 0.03 * 10e9, once
    assert once == parameter_count(config, tp=layout.tp)


CHECKS = {
    "activation predictions": _check_activation_predictions,
    "per-rank parameters": _check_per_rank_parameters,
    "10B at the paper layout": lambda s: _check_10b_layout(s, "paper-96xV100"),
    "10B at the 8x8 H200 layout": lambda s: _check_10b_layout(s, "h200-8x8"),
}


@pytest.fixture(scope="module")
def single():
    return run_module_checks(__name__)


@pytest.mark.parametrize("name", list(CHECKS))
def test_plan_against_model(single, name):
    assert_checks([single["checks"]], name)


# --------------------------------------------------------------------------- 4 ranks: tp 2 x pp 2

def _ranks_1f1b_activations(num_microbatches: int) -> dict:
    """Each rank: the most bytes its saved tensors hold after any forward of a real 1F1B step,
    against the plan's in-flight micro-batches x one micro-batch's activations."""
    from m6_engine.model import ForwardStep
    from m6_engine.parallel import forward_backward, model_grad_sync

    state = init_state(tp=2, pp=2)
    out = {}
    for recompute in ("none", "selective", "full"):
        model = M6Model(SMALL, state, recompute=recompute, rng_tracker=seed_parallel_rng(1, state)).train()
        batches = [_batch(SMALL, 2 * i, 2) for i in range(num_microbatches)]
        saved, step, peaks = SavedActivations(model), ForwardStep(), []

        def forward_step(data_iterator, module, input_tensor):
            with saved.hooks():
                result = step(data_iterator, module, input_tensor)
            peaks.append(saved.live)
            return result

        seq_length = batches[0].tokens.shape[1]
        forward_backward("1f1b", forward_step=forward_step, data_iterator=iter(batches), model=model,
                         num_microbatches=num_microbatches, state=state,
                         tensor_spec=model.activation_spec(2, seq_length), **model_grad_sync(model, state))
        per_microbatch = [stage_activation_bytes(
            SMALL, tp=2, pp=2, stage_id=state.pp_rank, micro_batch=2, seq_length=seq_length,
            loss_tokens=_loss_tokens(b), dtype=_fp32(), recompute=recompute) for b in batches]
        held = in_flight_microbatches(2, state.pp_rank, num_microbatches)
        predicted = max(sum(per_microbatch[i:i + held]) for i in range(num_microbatches - held + 1))
        out[recompute] = (max(peaks), predicted, saved.live)
    out["resident"] = _resident(state)
    return out


def _resident(state) -> dict:
    """Parameters, fp32 gradient buffer and optimizer state of a wrapped stage vs the plan."""
    from m6_engine.config import OptimizerConfig
    from m6_engine.optim import MixedPrecisionOptimizer
    from m6_engine.parallel import DataParallel
    from m6_engine.plan import stage_memory

    result = {}
    for precision in ("fp32", "bf16"):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        model = DataParallel(M6Model(SMALL, state, dtype=dtype), state)
        optimizer = MixedPrecisionOptimizer(model, OptimizerConfig(precision=precision), state, total_steps=1)
        measured = resident_bytes(model, model.grad_buffer, optimizer)
        layout = Layout(tp=2, pp=2, dp=1, micro_batch=2, global_batch=2, precision=precision)
        plan = stage_memory(SMALL, layout, SequenceLayout.for_task(SMALL), CPU, state.pp_rank)
        result[precision] = {k: (measured[k], getattr(plan, k)) for k in measured}
    return result


def test_1f1b_activations_and_resident_state_tp2_pp2():
    results = run_ranks(_ranks_1f1b_activations, 4, 3)
    for rank, by_mode in enumerate(results):
        for precision, parts in by_mode.pop("resident").items():
            for part, (measured, predicted) in parts.items():
                print(f"rank {rank} {precision} {part}: measured {measured} bytes, predicted {predicted}")
                assert abs(predicted - measured) <= 0.01 * measured, (rank, precision, part)
        for recompute, (measured, predicted, left) in by_mode.items():
            print(f"rank {rank} (stage {rank // 2}, tp {rank % 2}) {recompute}: measured {measured} "
                  f"bytes, predicted {predicted}")
            assert abs(predicted - measured) <= TOLERANCE * measured, (rank, recompute, measured, predicted)
            assert left == 0, f"rank {rank}: {left} saved bytes outlived the step"


# --------------------------------------------------------------------------- pure

@pytest.mark.parametrize("name, tp, pp", [
    ("tiny", 1, 1), ("tiny", 2, 2), ("tiny", 4, 3), ("m6-base", 1, 1), ("m6-base", 8, 5),
    ("m6-large", 4, 2), ("m6-large", 8, 5), ("m6-large", 1, 50)])
def test_unique_parameters_equal_the_model_formula(name, tp, pp):
    config = model_preset(name)
    assert unique_parameters(config, tp, pp) == parameter_count(config, tp=tp)


def test_half_precision_block_is_korthikantis_formula():
    """On a GPU (bool dropout masks, e = 2) one block of M6-large saves 34 s b h + 5 a s^2 b bytes
    (Korthikanti et al. 2022) plus our 16 bytes of LayerNorm statistics per token; selective
    recomputation leaves the 34 s b h."""
    config = model_preset("m6-large", attention_backend="unfused")
    half = ActivationDtype.of(Layout(1, 1, 1, 1, 1, precision="bf16"), GPU_DEVICES["H200-141G"])
    s, b, h, a = 528, 2, config.hidden_size, config.num_heads
    kwargs = dict(tp=1, micro_batch=b, seq_length=s, dtype=half)
    none = block_activation_bytes(config, recompute="none", **kwargs)
    assert none == s * b * (34 * h + 16) + 5 * a * s * s * b
    # The fused core keeps a 4-byte log-sum-exp per query row and head instead of 5 a s^2 b.
    fused = block_activation_bytes(dataclasses.replace(config, attention_backend="fused"), recompute="none", **kwargs)
    assert fused == s * b * (34 * h + 16) + 4 * a * s * b + 8 * b
    assert block_activation_bytes(config, recompute="selective", **kwargs) == s * b * (34 * h + 16)
    assert block_activation_bytes(config, recompute="full", **kwargs) == 2 * s * b * h


@pytest.mark.parametrize("task", ["multimodal_to_text", "image_to_text", "text_denoising",
                                  "language_modelling"])
def test_model_flops_use_the_trainer_formula(task):
    """A batch of the task's longest sample: planner FLOPs == 3 x the trainer's batch_forward_flops."""
    seq = SequenceLayout.for_task(SMALL, task)
    s = seq.seq_length
    loss_mask = torch.zeros(3, s)
    loss_mask[:, seq.prefix_len:seq.prefix_len + seq.loss_tokens] = 1
    tokens = torch.zeros(3, s, dtype=torch.long)
    batch = MicroBatch(tokens=tokens, position_ids=tokens, labels=tokens, loss_mask=loss_mask,
                       prefix_len=torch.full((3,), seq.prefix_len), valid_len=torch.full((3,), seq.valid_len),
                       patches=torch.zeros(3, SMALL.num_patches, SMALL.patch_feature_dim),
                       num_image_patches=torch.full((3,), seq.image_patches))
    assert model_flops_per_step(SMALL, seq, 3) == 3 * batch_forward_flops(SMALL, batch)


def test_prefix_mask_makes_causal_attention_about_half():
    """Only the attention term depends on the mask: bidirectional minus causal is the half of
    the T^2 pairs a causal query may not see (3 x 4 d L per pair)."""
    config = model_preset("m6-large")
    causal = SequenceLayout.for_task(config, "language_modelling")
    bidirectional = dataclasses.replace(causal, prefix_len=causal.valid_len)
    t, d, layers = causal.valid_len, config.hidden_size, config.num_layers
    difference = model_flops_per_step(config, bidirectional, 1) - model_flops_per_step(config, causal, 1)
    assert difference == 3 * 4 * d * layers * (t * t - t * (t + 1) // 2)


def test_memory_terms():
    config = model_preset("m6-large")
    layout = Layout(tp=4, pp=4, dp=6, micro_batch=2, global_batch=96, recompute="full",
                    precision="fp16", zero_stage=1)
    plan = make_plan(config, layout, SequenceLayout.for_task(config), GPU_DEVICES["V100-32G"])
    first = plan.stages[0]
    assert [s.in_flight for s in plan.stages] == [4, 3, 2, 1]
    assert first.activations == max(s.activations for s in plan.stages)
    for s in plan.stages:
        # ZeRO-1: parameters in the flat buffer laid out like the gradients' (padded to dp * 128
        # per bucket), optimizer state for dp rank 0's 1/dp.
        assert 2 * s.parameters <= s.weights < 2 * s.parameters * 1.001
        assert s.gradients == 2 * s.weights
        assert 12 * (s.parameters // 6) <= s.optimizer <= 12 * -(-s.weights // 2 // 6)
        assert s.gathered == s.staging == s.host == 0
    assert plan.step.bubble_fraction == pytest.approx(3 / (8 + 3))
    unsharded = make_plan(config, dataclasses.replace(layout, zero_stage=0, precision="fp32"),
                          plan.seq, GPU_DEVICES["A100-80G"])
    assert unsharded.stages[1].optimizer == 8 * unsharded.stages[1].parameters
    assert unsharded.stages[1].weights == 4 * unsharded.stages[1].parameters


def test_search_lists_fitting_layouts_best_first():
    config = model_preset("m6-base")
    device = GPU_DEVICES["A100-80G"]
    seq = SequenceLayout.for_task(config)
    plans = search(config, 16, 512, "bf16", device, seq)
    assert plans and all(p.fits and p.layout.world_size == 16 for p in plans)
    times = [round(p.step.step_s, 6) for p in plans]     # the search's key: ties go to less memory
    assert times == sorted(times)
    # m6-large fp32 on 4 V100 never fits with ZeRO-1 at most: every split leaves >= 2.5 B
    # parameters on a rank, at 4 (weights) + 4 (grads) + 8 / dp (Adam, ZeRO-1) >= 10 bytes each.
    # ZeRO-3 (4 x 4 / dp bytes) or ZeRO-2 with the optimizer offloaded makes it fit.
    large = model_preset("m6-large")
    v100, large_seq = GPU_DEVICES["V100-32G"], SequenceLayout.for_task(large)
    assert search(large, 4, 64, "fp32", v100, large_seq, space=SearchSpace(zero_stage=(0, 1), offload=("none",))) == []
    fitting = search(large, 4, 64, "fp32", v100, large_seq)
    assert fitting and all(p.layout.zero_stage == 3 or p.layout.offload == "cpu" for p in fitting)
    pinned = search(config, 16, 512, "bf16", device, seq,
                    space=SearchSpace(recompute=("full",), zero_stage=(1,), pp=(2,)))
    assert pinned and all(p.layout.recompute == "full" and p.layout.pp == 2 for p in pinned)


def test_presets_follow_the_paper():
    best = _best_plan("paper-96xV100")
    lay = best.layout
    assert (lay.world_size, lay.precision, lay.recompute) == (96, "fp16", "full")
    assert lay.zero_stage == 1 and lay.offload == "none"
    assert lay.pp > 1 and lay.global_batch == 6144 and best.fits
    assert best.peak_bytes <= GPU_DEVICES["V100-32G"].usable_bytes
    h200 = _best_plan("h200-8x8")
    assert h200.layout.world_size == 64 and h200.layout.precision == "bf16" and h200.fits
    with pytest.raises(ConfigError, match="no bf16"):
        GPU_DEVICES["V100-32G"].peak("bf16")


@pytest.mark.parametrize("path, preset", [("examples/configs/m6-large-96xV100.yaml", "paper-96xV100"),
                                          ("examples/configs/m6-large-8xH200.yaml", "h200-8x8")])
def test_example_configs_carry_the_planned_layout(path, preset):
    job = job_config_from_dict(load_yaml(str(ROOT / path)))
    lay = _best_plan(preset).layout
    assert job.model == model_preset("m6-large")
    assert (job.parallel.tp, job.parallel.pp) == (lay.tp, lay.pp)
    assert (job.train.micro_batch, job.train.global_batch, job.train.recompute) == (
        lay.micro_batch, lay.global_batch, lay.recompute)
    assert job.optimizer.precision == lay.precision
    assert (job.optimizer.zero_stage, job.optimizer.offload) == (lay.zero_stage, lay.offload)
    assert (job.parallel.sequence_parallel, job.parallel.virtual_stages) == (
        lay.sequence_parallel, lay.virtual_stages)
    assert Layout.of_job(job, lay.dp) == lay
    job.train.num_microbatches(lay.dp)   # the launch script's world size divides the batch
    text = (ROOT / path).read_text()
    assert f"tp {lay.tp} x pp {lay.pp} x dp {lay.dp}" in text, "the planner's table is not in the comment"


@pytest.mark.parametrize("fields, message", [
    (dict(global_batch=10), "global_batch = 10 is not divisible"),
    (dict(recompute="some"), "recompute"),
    (dict(precision="fp8"), "precision"),
    (dict(tp=0), "tp must be"),
])
def test_layout_errors(fields, message):
    base = dict(tp=2, pp=2, dp=2, micro_batch=2, global_batch=16)
    with pytest.raises(ConfigError, match=message):
        Layout(**{**base, **fields})


def test_layout_that_cannot_split_the_model():
    with pytest.raises(ConfigError, match="not divisible by tp = 3"):
        make_plan(model_preset("m6-base"), Layout(3, 1, 1, 1, 1), SequenceLayout.for_task(SMALL), CPU)


def test_cli(capsys):
    plan_main(["--model", "m6-base", "--device", "A100-80G", "--tp", "2", "--pp", "2", "--dp", "2",
               "--micro-batch", "4", "--global-batch", "64", "--recompute", "selective", "--zero-stage", "1"])
    out = capsys.readouterr().out
    assert "tp 2 x pp 2 x dp 2" in out and "fits: yes" in out and "MFU" in out
    plan_main(["--model", "m6-base", "--device", "V100-32G", "--precision", "fp16", "--gpus", "16",
               "--global-batch", "256", "--search", "--top", "3"])
    out = capsys.readouterr().out
    assert "more layouts fit" in out and "best:" in out
    plan_main(["--config", str(ROOT / "examples/configs/m6-large-96xV100.yaml"), "--gpus", "96",
               "--device", "V100-32G"])
    out = capsys.readouterr().out
    assert "tp 4 x pp 2 x dp 12" in out and "recompute full, fp16, ZeRO-1" in out and "fits: yes" in out
