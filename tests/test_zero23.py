"""ZeRO-2 (gradients held as each dp rank's shards only, reduce-scattered every micro-batch) and
ZeRO-3 (parameters too: each layer gathered just in time).

- The toy LM (tests/toy_lm.py) trained with ``zero_stage`` 2 and 3 for STEPS steps at dp = 2 (two
  micro-batches per rank: accumulation across reduce-scatters) and dp = 4 gives the losses of one
  process (relative 1e-5); slow: dp = 2 combined with tp = 2 and with pp = 2 (with ZeRO-2 the tied
  embedding copies on first and last stage stay identical).
- Gradient memory: the persistent buffer of stage 2 is exactly 1/dp of stage 1's; the staging
  tensors are bounded (a few buckets, well below the whole buffer) and all released after the sync;
  ``main_grad`` of an untied parameter is refused after the sync.
- ZeRO-3 memory: the stored parameter shards are 1/dp of the stage; nothing is gathered between
  steps and at most the root (embedding, head), the running layer and the prefetched one inside
  one; a freed layer's weight holds no bytes.
- Checkpoints (one stored format): saved at dp = 2 with ZeRO-2 / ZeRO-3 after SAVE_AT steps and
  loaded at (1, 1, 1) with stage 0, and the reverse; all continue with the one-process losses.
"""

import pytest
import torch

from m6_engine.checkpoint import load_checkpoint, save_checkpoint
from m6_engine.optim import OptimizerConfig
from m6_engine.parallel import layout_grad_buffer
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


def _check_param_memory(state, results):
    model, opt = build(CFG, state, _config(3), total_steps=1)
    sharded = model.sharded_params
    assert sharded.gathered_numel() == 0                         # nothing whole between steps
    train_step(model, opt, CFG, state, 0)
    assert sharded.gathered_numel() == 0
    results["param shard numel"] = sharded.shards.numel()
    results["param peak numel"] = sharded.peak_gathered_numel
    results["layout numel"] = model.layout.numel
    assert sharded.shards.numel() * state.dp_size == model.layout.numel
    # root (embedding, head) + the running layer + the prefetched one, of 4 layers
    largest_layer = max(b.numel for k, b in enumerate(model.buckets) if k != sharded.root_bucket)
    root = model.buckets[sharded.root_bucket].numel
    assert sharded.peak_gathered_numel <= root + 2 * largest_layer < model.layout.numel
    # a freed layer's weight keeps its shape and holds no bytes
    weight = model.module.blocks[0].fc1.weight
    assert weight.shape == (CFG.ffn, CFG.hidden) and weight.untyped_storage().nbytes() == 0


def _zero_rank(stage, layouts, ckpt_dir, with_extras, reference):
    checks, results = Checks(), {}
    for tp, pp in layouts:
        state = init_state(tp, pp)
        model, opt = build(CFG, state, _config(stage), total_steps=STEPS)
        losses = _losses(model, opt, state, range(SAVE_AT))
        if ckpt_dir is not None:
            save_checkpoint(f"{ckpt_dir}/zero{stage}", SAVE_AT, model=model, optimizer=opt, state=state)
        losses += _losses(model, opt, state, range(SAVE_AT, STEPS))
        checks.run(f"parity ({tp}, {pp})", _check_parity, losses, reference)
        if stage == 2:
            checks.run(f"tied ({tp}, {pp})", lambda: _check_tied(model, state))
        if with_extras:
            checks.run("memory", _check_memory if stage == 2 else _check_param_memory, state, results)
        if ckpt_dir is not None:
            checks.run("from stage 0", lambda: _check_parity(
                _continue_from(f"{ckpt_dir}/plain", stage), reference[SAVE_AT:]))
    results["checks"] = checks.results
    return results


def _check_tied(model, state):
    diff = tied_copies_differ(model, state)
    assert diff is None or diff == 0.0, diff



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("zero23"))
    (reference,) = run_ranks(_reference, 1, folder)
    out = {"reference": reference["losses"]}
    for stage in (2, 3):
        out[stage] = run_ranks(_zero_rank, 2, stage, [(1, 1)], folder, True, reference["losses"])
        (out[f"single from zero{stage}"],) = run_ranks(_continue_from, 1, f"{folder}/zero{stage}", 0)
    return out


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("name", ["parity (1, 1)", "memory", "from stage 0"])
def test_dp2(runs, stage, name):
    assert_checks([r["checks"] for r in runs[stage]], name)


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_loads_at_one_process_stage0(runs, stage):
    _check_parity(runs[f"single from zero{stage}"], runs["reference"][SAVE_AT:])


def test_zero2_grad_buffer_is_one_over_dp(runs):
    grad = runs[2][0]["grad bytes"]
    assert grad[2] * 2 == grad[1]


def test_zero3_params_are_one_over_dp(runs):
    for r in runs[3]:
        assert r["param shard numel"] * 2 == r["layout numel"]
        assert r["param peak numel"] < r["layout numel"]


@pytest.mark.parametrize("stage", [2, 3])
def test_dp4(runs, stage):
    results = run_ranks(_zero_rank, 4, stage, [(1, 1)], None, False, runs["reference"])
    assert_checks([r["checks"] for r in results], "parity (1, 1)")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(2, 1), (1, 2)])
def test_zero2_dp2_with_model_parallel(runs, layout):
    results = run_ranks(_zero_rank, 4, 2, [layout], None, False, runs["reference"])
    assert_checks([r["checks"] for r in results], f"parity {layout}")
    assert_checks([r["checks"] for r in results], f"tied {layout}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(2, 1), (1, 2)])
def test_zero3_dp2_with_model_parallel(runs, layout):
    results = run_ranks(_zero_rank, 4, 3, [layout], None, False, runs["reference"])
    assert_checks([r["checks"] for r in results], f"parity {layout}")


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_grouped_layout_has_one_bucket_per_group(dp):
    numels, groups = [5, 7, 300, 1, 9, 9, 2], [-1, -1, 0, 0, 1, 1, 2]
    layout = layout_grad_buffer(numels, bucket_numel=4, dp_size=dp, align=8, groups=groups)
    assert layout.bucket_members == ((0, 1), (2, 3), (4, 5), (6,))    # size ignored, groups kept
    assert all((end - start) % (8 * dp) == 0 for start, end in layout.bucket_ranges)
    with pytest.raises(ValueError, match="groups"):
        layout_grad_buffer(numels, 4, dp, groups=groups[:-1])


def test_layer_units_and_their_grouping():
    from m6_engine.parallel.data_parallel import _group_by_unit
    from m6_engine.parallel.sharded_params import ROOT, layer_units

    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(2, 2)
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
            self.head = torch.nn.Linear(2, 2)

    stage = Stage()
    units = layer_units(stage)
    assert units == list(stage.blocks)
    params, groups = _group_by_unit(list(stage.parameters())[::-1], units)
    # the root's parameters (head first in buffer order, then the embedding) come together
    assert groups == [ROOT] * 4 + [2, 2, 1, 1, 0, 0]
    assert params[:4] == [stage.head.bias, stage.head.weight, stage.embed.bias, stage.embed.weight]
