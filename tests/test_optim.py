"""O2 optimizer: loss scaler, LR schedule, config, AdamW kernels against a reference, the
gradient-norm counting rule, and multi-process runs of the toy LM (tests/toy_lm.py):

- fp16 O2 on the CPU: parameters fp16, masters fp32; an inf or NaN injected on one rank of a
  (tp 2, pp 2) layout skips the step on every rank, the scale halves after the hysteresis and
  grows back after the interval; an overflow from a too-large scale is caught too;
- bf16 runs without a scaler; both follow the fp32 run closely;
- the global gradient norm of (tp, pp, dp) = (2, 1, 2), (1, 2, 2), (2, 2, 1) equals the
  single-process norm, and clipping brings it to the limit.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from m6_engine.parallel.roles import param_role
from m6_engine.config import ConfigError
from m6_engine.optim import (
    AdamW, DynamicLossScaler, LossScaler, LRSchedule, OptimizerConfig, choose_backend, clip_grads_,
    counts_in_norm, global_grad_norm, make_loss_scaler,
)
from m6_engine.optim.adamw import apex_fused_adam
from tests.distributed import Checks, assert_checks, init_state, run_ranks
from tests.optim_loop import build, flat_params, train, train_step
from tests.toy_lm import ToyLMConfig

CFG = ToyLMConfig()
STEPS = 4
BASE = dict(lr=1e-2, min_lr=1e-3, weight_decay=0.1, clip_grad=1.0)


# ----- loss scaler, schedule, config ---------------------------------------------------------

def test_dynamic_loss_scaler_hysteresis_growth_and_floor():
    s = DynamicLossScaler(initial_scale=8.0, growth_interval=3, hysteresis=2, min_scale=2.0)
    s.update(True)
    assert s.scale == 8.0                  # the first overflow is absorbed by the hysteresis
    s.update(True)
    assert s.scale == 4.0                  # the second halves
    s.update(True)
    assert s.scale == 2.0                  # and every further one, until the floor
    s.update(True)
    assert s.scale == 2.0
    for _ in range(2):
        s.update(False)
    assert s.scale == 2.0
    s.update(False)
    assert s.scale == 4.0                  # 3 clean steps in a row: doubled, hysteresis refilled
    s.update(False)
    s.update(True)                         # an overflow resets the clean-step count
    s.update(False)
    s.update(False)
    assert s.scale == 4.0
    s.update(True)
    assert s.scale == 2.0                  # the refilled budget of 2 is spent now
    saved = s.state_dict()
    restored = DynamicLossScaler(initial_scale=8.0, growth_interval=3, hysteresis=2, min_scale=2.0)
    restored.load_state_dict(saved)
    for found_inf in (False, False, False, True):
        s.update(found_inf)
        restored.update(found_inf)
        assert s.state_dict() == restored.state_dict()


def test_scaler_by_precision():
    assert make_loss_scaler(OptimizerConfig(precision="fp16")).scale == 2.0 ** 32
    for precision in ("fp32", "bf16"):
        scaler = make_loss_scaler(OptimizerConfig(precision=precision))
        assert type(scaler) is LossScaler and scaler.scale == 1.0
        scaler.update(True)
        assert scaler.scale == 1.0 and scaler.state_dict() == {}
    with pytest.raises(ValueError, match="no state"):
        LossScaler().load_state_dict({"scale": 4.0})


def test_lr_schedule_warmup_cosine_floor():
    schedule = LRSchedule.from_config(OptimizerConfig(lr=1.0, min_lr=0.1, warmup_fraction=0.01), 1000)
    assert schedule.warmup_steps == 10
    assert schedule.lr(0) == pytest.approx(0.1) and schedule.lr(4) == pytest.approx(0.5)
    assert schedule.lr(9) == pytest.approx(1.0) and schedule.lr(10) == pytest.approx(1.0)
    assert schedule.lr(505) == pytest.approx(0.55)                 # half-way through the decay
    assert schedule.lr(999) == pytest.approx(0.1, abs=1e-4)
    assert schedule.lr(1000) == schedule.lr(5000) == 0.1
    lrs = [schedule.lr(s) for s in range(1000)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert LRSchedule.from_config(OptimizerConfig(warmup_fraction=0.01), 10).warmup_steps == 1
    assert LRSchedule.from_config(OptimizerConfig(warmup_fraction=0.0), 10).lr(0) == 1.5e-4
    with pytest.raises(ValueError, match="total_steps"):
        LRSchedule.from_config(OptimizerConfig(), 0)


@pytest.mark.parametrize("field,value,match", [
    ("precision", "fp8", "precision"), ("min_lr", 1.0, "min_lr"), ("betas", (0.9, 1.0), "betas"),
    ("warmup_fraction", 1.5, "warmup_fraction"), ("adam_backend", "mine", "adam_backend"),
    ("min_loss_scale", 0.5, "min_loss_scale"), ("loss_scale_hysteresis", 0, "hysteresis"),
    ("clip_grad", -1.0, "clip_grad"),
])
def test_config_rejects(field, value, match):
    with pytest.raises(ConfigError, match=match):
        OptimizerConfig(**{field: value})


def test_config_defaults_follow_the_paper():
    cfg = OptimizerConfig()
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.warmup_fraction) == (1.5e-4, (0.9, 0.999), 1e-8, 0.01)
    assert (cfg.initial_loss_scale, cfg.loss_scale_growth_interval, cfg.loss_scale_hysteresis,
            cfg.min_loss_scale) == (2.0 ** 32, 1000, 2, 1.0)
    assert OptimizerConfig(precision="bf16").param_dtype == torch.bfloat16


# ----- AdamW -------------------------------------------------------------------------------------

def _reference_adamw_step(p, g, m, v, step, lr, wd, betas, eps):
    """Textbook AdamW on one tensor (float64): decoupled decay, bias-corrected moments."""
    b1, b2 = betas
    p.mul_(1 - lr * wd)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    m_hat, v_hat = m / (1 - b1 ** step), v / (1 - b2 ** step)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


ADAM_CASES = [("cpu", "torch"), ("cpu", "torch-foreach"), ("cpu", "torch-fused"),
              pytest.param("cuda", "torch-fused", marks=pytest.mark.cuda),
              pytest.param("cuda", "apex", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device,backend", ADAM_CASES)
def test_adamw_matches_reference(device, backend):
    if backend == "apex" and apex_fused_adam() is None:
        pytest.skip("NVIDIA Apex is not installed")
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 5), (5,), (3, 4, 2), (7,)]
    tensors = [torch.randn(s, generator=gen).to(device) for s in shapes]
    betas, eps, wd = (0.9, 0.999), 1e-8, 0.1
    decay = [t for t in tensors if t.dim() >= 2]
    no_decay = [t for t in tensors if t.dim() < 2]
    adam = AdamW([(decay, wd), (no_decay, 0.0)], betas=betas, eps=eps, backend=backend)
    expected = choose_backend("torch", torch.device(device)) if backend == "torch" else backend
    assert adam.backend == expected
    ref = [t.cpu().double() for t in tensors]
    moments = [(torch.zeros_like(r), torch.zeros_like(r)) for r in ref]
    for step, lr in enumerate([1e-2, 5e-3, 2e-2, 1e-3, 1e-2], start=1):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for t, g in zip(tensors, grads):
            t.grad = g.to(device)
        adam.step(lr)
        for r, g, (m, v), t in zip(ref, grads, moments, tensors):
            _reference_adamw_step(r, g.double(), m, v, step, lr, wd if t.dim() >= 2 else 0.0, betas, eps)
    for t, r, (m, v) in zip(tensors, ref, moments):
        assert_close(t.cpu(), r.float(), rtol=1e-6, atol=1e-7)
        exp_avg, exp_avg_sq = adam.moments(t)
        assert_close(exp_avg.cpu(), m.float(), rtol=1e-6, atol=1e-8)
        assert_close(exp_avg_sq.cpu(), v.float(), rtol=1e-6, atol=1e-10)


def test_adamw_load_continues_identically():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 3, generator=gen), torch.randn(4, generator=gen)
    grads = [(torch.randn(6, 3, generator=gen), torch.randn(4, generator=gen)) for _ in range(4)]
    run = AdamW([([a], 0.1), ([b], 0.0)])
    for ga, gb in grads[:2]:
        a.grad, b.grad = ga, gb
        run.step(1e-2)
    a2, b2 = a.clone(), b.clone()
    resumed = AdamW([([a2], 0.1), ([b2], 0.0)])
    resumed.load(2, [run.moments(a), run.moments(b)])
    for ga, gb in grads[2:]:
        a.grad, b.grad, a2.grad, b2.grad = ga, gb, ga, gb
        run.step(1e-2)
        resumed.step(1e-2)
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_backend_choice():
    assert choose_backend("auto", torch.device("cpu")) == "torch-foreach"
    assert choose_backend("torch", torch.device("cuda")) == "torch-fused"
    with pytest.raises(RuntimeError, match="Apex"):
        choose_backend("apex", torch.device("cpu"))


# ----- gradient norm: counting rule and clipping --------------------------------------------

def _param(tp_dim=None, tied=False):
    p = torch.nn.Parameter(torch.zeros(2))
    if tp_dim is not None:
        param_role(p).tp_dim = tp_dim
    if tied:
        param_role(p).tied_across_stages = True
    return p


@pytest.mark.parametrize("tp_rank,first_stage,expected", [
    (0, True, [True, True, True, True]),
    (1, True, [True, False, True, False]),
    (0, False, [True, True, False, False]),
    (1, False, [True, False, False, False]),
])
def test_counts_in_norm_rule(tp_rank, first_stage, expected):
    state = SimpleNamespace(tp_rank=tp_rank, is_first_stage=first_stage)
    params = [_param(tp_dim=0), _param(), _param(tp_dim=0, tied=True), _param(tied=True)]
    assert [counts_in_norm(p, state) for p in params] == expected


def test_clip_grads():
    grads = [torch.full((4,), 3.0), torch.full((9,), 4.0 / 3.0)]       # norm sqrt(36 + 16) ...
    norm = math.sqrt(sum(g.square().sum().item() for g in grads))
    assert clip_grads_(grads, 0.0, norm) == 1.0 and clip_grads_(grads, 2 * norm, norm) == 1.0
    coefficient = clip_grads_(grads, norm / 4, norm)
    assert coefficient == pytest.approx(0.25)
    assert math.sqrt(sum(g.square().sum().item() for g in grads)) == pytest.approx(norm / 4)


# ----- multi-process ----------------------------------------------------------------------------

def _grad_norm_of_step0(state, sharded=False):
    """Global norm of step 0's gradients of the fp32 toy LM, with the module's function."""
    from tests.optim_loop import backward_step
    model, optimizer = build(CFG, state, OptimizerConfig(**BASE), total_steps=1)
    backward_step(model, optimizer, CFG, state, 0)
    grads = [param_role(p).main_grad for p in model.params]
    norm, found_inf = global_grad_norm(grads, [counts_in_norm(p, state) for p in model.params], state,
                                       sharded=sharded)
    assert not found_inf
    return model, optimizer, grads, norm


def _check_norm_and_clip(state, reference_norm):
    model, optimizer, grads, norm = _grad_norm_of_step0(state)
    assert abs(norm - reference_norm) <= 1e-5 * reference_norm, (norm, reference_norm)
    counted = [counts_in_norm(p, state) for p in model.params]
    clip_grads_(grads, norm / 3, norm)
    clipped, _ = global_grad_norm(grads, counted, state, sharded=False)
    assert abs(clipped - norm / 3) <= 1e-5 * norm, (clipped, norm)


def _single_process():
    state = init_state()
    checks = Checks()
    results = {"checks": checks.results}
    model, optimizer, grads, norm = _grad_norm_of_step0(state)
    plain = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    results["norm"] = norm

    def plain_norm():
        assert abs(norm - plain) <= 1e-6 * plain, (norm, plain)     # fp32 per-tensor norms
        assert optimizer.step().grad_norm == norm

    checks.run("single-process norm", plain_norm)
    runs = {p: train(CFG, state, OptimizerConfig(**BASE, precision=p, initial_loss_scale=2.0 ** 12), STEPS)
            for p in ("fp32", "fp16", "bf16")}

    def half_precision(precision, rtol):
        run, reference = runs[precision], runs["fp32"]["losses"]
        opt = run["optimizer"]
        assert all(p.dtype == opt.config.param_dtype for p in run["model"].parameters())
        assert all(m.dtype == torch.float32 for m in opt._masters)
        assert all(param_role(p).main_grad.dtype == torch.float32 for p in run["model"].params)
        assert not any(s.skipped for s in run["stats"]) and opt.steps == STEPS
        assert opt.state_bytes() == 12 * sum(p.numel() for p in run["model"].params)
        for got, want in zip(run["losses"], reference):
            assert abs(got - want) <= rtol * want, (run["losses"], reference)

    checks.run("fp16 follows fp32", half_precision, "fp16", 1e-3)
    checks.run("bf16 follows fp32", half_precision, "bf16", 2e-2)

    def bf16_has_no_scaler():
        opt = runs["bf16"]["optimizer"]
        assert opt.loss_scale == 1.0 and not opt.scaler.dynamic
        assert all(s.loss_scale == 1.0 for s in runs["bf16"]["stats"])

    checks.run("bf16 has no scaler", bf16_has_no_scaler)

    def fp16_overflow_is_caught():
        # 2^32 (the default) makes the fp16 gradients of this model overflow: the step is skipped.
        model, opt = build(CFG, state, OptimizerConfig(**BASE, precision="fp16"), total_steps=2)
        before = flat_params(model)
        _, stats = train_step(model, opt, CFG, state, 0)
        assert stats.skipped and stats.loss_scale == 2.0 ** 32 and opt.skipped_steps == 1
        assert torch.equal(flat_params(model), before)

    checks.run("fp16 overflow caught", fp16_overflow_is_caught)
    return results


INJECT_RANK = 3     # (pp 1, dp 0, tp 1): one rank of four


def _check_fp16_skips_everywhere(state):
    opt_cfg = OptimizerConfig(**BASE, precision="fp16", initial_loss_scale=2.0 ** 10,
                              loss_scale_growth_interval=2, loss_scale_hysteresis=2)
    model, opt = build(CFG, state, opt_cfg, total_steps=6)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    inject = {1: float("inf"), 2: float("nan"), 5: float("inf")}
    skipped, scales = [], []
    for step in range(6):
        def poison(m, value=inject.get(step)):
            if value is not None and state.rank == INJECT_RANK:
                param_role(m.params[-1]).main_grad.view(-1)[0] = value
        before = flat_params(model)
        _, stats = train_step(model, opt, CFG, state, step, before_step=poison)
        changed = not torch.equal(flat_params(model), before)
        assert changed != stats.skipped, f"step {step}: skipped {stats.skipped}, params changed {changed}"
        skipped.append(stats.skipped)
        scales.append(stats.loss_scale)
    assert skipped == [False, True, True, False, False, True], skipped
    # hysteresis 2: the 1st overflow keeps 1024, the 2nd halves; 2 clean steps double it back.
    assert scales == [1024.0, 1024.0, 1024.0, 512.0, 512.0, 1024.0], scales
    assert opt.skipped_steps == 3 and opt.steps == 3 and opt.iterations == 6
    assert all(m.dtype == torch.float32 for m in opt._masters)


def _layouts(reference_norm):
    checks = Checks()
    for tp, pp in [(2, 1), (1, 2), (2, 2)]:      # dp = 2, 2, 1
        state = init_state(tp, pp)
        checks.run(f"norm ({tp}, {pp})", _check_norm_and_clip, state, reference_norm)
        if (tp, pp) == (2, 2):
            checks.run("fp16 skip on all ranks", _check_fp16_skips_everywhere, state)
    return checks.results


@pytest.fixture(scope="module")
def single():
    (result,) = run_ranks(_single_process, 1, torchrun_env=False)
    return result


@pytest.fixture(scope="module")
def multi(single):
    return run_ranks(_layouts, 4, single["norm"])


@pytest.mark.parametrize("name", ["single-process norm", "fp16 follows fp32", "bf16 follows fp32",
                                  "bf16 has no scaler", "fp16 overflow caught"])
def test_single_process(single, name):
    assert_checks([single["checks"]], name)


@pytest.mark.parametrize("name", ["norm (2, 1)", "norm (1, 2)", "norm (2, 2)", "fp16 skip on all ranks"])
def test_layouts(multi, name):
    assert_checks(multi, name)
