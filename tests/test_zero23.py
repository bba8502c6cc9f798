"""ZeRO-2: gradients held as each dp rank's shards only, reduce-scattered every micro-batch.

- The toy LM (tests/toy_lm.py) trained with ``zero_stage: 2`` for STEPS steps at dp = 2 (two
  micro-batches per rank: accumulation across reduce-scatters) and dp = 4 gives the losses of one
  process (relative 1e-5); slow: dp = 2 combined with tp = 2 and with pp = 2 (the tied embedding
  copies on first and last stage stay identical).
- Gradient memory: the persistent buffer of stage 2 is exactly 1/dp of stage 1's; the staging
  tensors are bounded (a few buckets, well below the whole buffer) and all released after the sync;
  ``main_grad`` of an untied parameter is refused after the sync.
- Checkpoints (one stored format): saved at dp = 2 with ZeRO-2 after SAVE_AT steps and loaded at
  (1, 1, 1) with stage 0, and the reverse; both continue with the one-process losses.
"""

import pytest

from m6_engine.checkpoint import load_checkpoint, save_checkpoint
from m6_engine.optim import OptimizerConfig
from m6_engine.parallel.roles import param_role
from tests.distributed import Checks, assert_checks, init_state, run_ranks
from tests.optim_loop import build, train_step
from tests.toy_lm import ToyLMConfig, tied_copies_differ

CFG = ToyLMConfig()
STEPS, SAVE_AT = 8, 4
BASE = dict(lr=1e-2, min_lr=1e-3, weight_decay=0.1, clip_grad=1.0)
RTOL = 1e-5


def _config(stage):
    return OptimizerConfig(**BASE, zero_stage=stage)


def _losses(model, opt, state, steps):
    return [train_step(model, opt, CFG, state, step)[0] for step in steps]


def _reference(ckpt_dir):
    """One process, stage 0: the losses of every step, and a checkpoint after SAVE_AT steps; then
    the steps after SAVE_AT continued from ``ckpt_dir/zero2`` (saved at dp 2 with ZeRO-2)."""
    state = init_state()
    model, opt = build(CFG, state, _config(0), total_steps=STEPS)
    losses = _losses(model, opt, state, range(SAVE_AT))
    save_checkpoint(f"{ckpt_dir}/plain", SAVE_AT, model=model, optimizer=opt, state=state)
    losses += _losses(model, opt, state, range(SAVE_AT, STEPS))
    return {"losses": losses}


def _continue_from(ckpt_dir, stage):
    """A fresh model at this layout and ``stage``, loaded from ``ckpt_dir``: the losses after SAVE_AT."""
    state = init_state()
    model, opt = build(CFG, state, _config(stage), total_steps=STEPS)
    loaded = load_checkpoint(ckpt_dir, model=model, optimizer=opt, state=state)
    assert loaded.step == SAVE_AT
    return _losses(model, opt, state, range(SAVE_AT, STEPS))


def _check_parity(losses, reference):
    for a, b in zip(reference, losses):
        assert a is None or b is None or abs(a - b) <= RTOL * abs(a), (reference, losses)


def _check_memory(state, results):
    buffers = {}
    for stage in (1, 2):
        model, opt = build(CFG, state, _config(stage), total_steps=1, bucket_numel=2000)
        train_step(model, opt, CFG, state, 0)
        buffers[stage] = model
    one, two = buffers[1], buffers[2]
    results["grad bytes"] = {1: one.grad_buffer_bytes(), 2: two.grad_buffer_bytes()}
    results["staging peak"] = two.peak_staging_numel
    assert len(two.buckets) >= 8
    assert two.grad_buffer_bytes() * state.dp_size == one.grad_buffer_bytes()
    assert not two._staging, "staging tensors alive after finish_grad_sync"
    largest = max(b.numel for b in two.buckets)
    # written buckets (the tied embedding's, open from the head's backward to the lookup's, and the
    # one backward is in) plus STAGED_IN_FLIGHT sent ones
    assert 0 < two.peak_staging_numel <= (2 + two.STAGED_IN_FLIGHT) * largest
    assert two.peak_staging_numel < two.layout.numel / 2, (two.peak_staging_numel, two.layout.numel)
    untied = next(p for p in two.params if not param_role(p).tied_across_stages)
    with pytest.raises(RuntimeError, match="shard_grad"):
        param_role(untied).main_grad


def _zero2_rank(layouts, ckpt_dir, with_extras, reference):
    checks, results = Checks(), {}
    for tp, pp in layouts:
        state = init_state(tp, pp)
        model, opt = build(CFG, state, _config(2), total_steps=STEPS)
        losses = _losses(model, opt, state, range(SAVE_AT))
        if ckpt_dir is not None:
            save_checkpoint(f"{ckpt_dir}/zero2", SAVE_AT, model=model, optimizer=opt, state=state)
        losses += _losses(model, opt, state, range(SAVE_AT, STEPS))
        checks.run(f"parity ({tp}, {pp})", _check_parity, losses, reference)
        checks.run(f"tied ({tp}, {pp})", lambda: _check_tied(model, state))
        if with_extras:
            checks.run("memory", _check_memory, state, results)
        if ckpt_dir is not None:
            checks.run("from stage 0", lambda: _check_parity(
                _continue_from(f"{ckpt_dir}/plain", 2), reference[SAVE_AT:]))
    results["checks"] = checks.results
    return results


def _check_tied(model, state):
    diff = tied_copies_differ(model, state)
    assert diff is None or diff == 0.0, diff



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("zero23"))
    (reference,) = run_ranks(_reference, 1, folder)
    dp2 = run_ranks(_zero2_rank, 2, [(1, 1)], folder, True, reference["losses"])
    (single,) = run_ranks(_continue_from, 1, f"{folder}/zero2", 0)
    return {"reference": reference["losses"], "dp2": dp2, "single from zero2": single}


@pytest.mark.parametrize("name", ["parity (1, 1)", "memory", "from stage 0"])
def test_zero2_dp2(runs, name):
    assert_checks([r["checks"] for r in runs["dp2"]], name)


def test_zero2_checkpoint_loads_at_one_process_stage0(runs):
    _check_parity(runs["single from zero2"], runs["reference"][SAVE_AT:])


def test_zero2_grad_buffer_is_one_over_dp(runs):
    grad = runs["dp2"][0]["grad bytes"]
    assert grad[2] * 2 == grad[1]


def test_zero2_dp4(runs):
    results = run_ranks(_zero2_rank, 4, [(1, 1)], None, False, runs["reference"])
    assert_checks([r["checks"] for r in results], "parity (1, 1)")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(2, 1), (1, 2)])
def test_zero2_dp2_with_model_parallel(runs, layout):
    results = run_ranks(_zero2_rank, 4, [layout], None, False, runs["reference"])
    assert_checks([r["checks"] for r in results], f"parity {layout}")
    assert_checks([r["checks"] for r in results], f"tied {layout}")
