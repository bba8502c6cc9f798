"""ZeRO-1 optimizer sharding and the optimizer's checkpoint contract.

- Pure: the dp ranks' pieces partition every parameter exactly once.
- The toy LM (tests/toy_lm.py) trained with ``optimizer_sharding`` at dp = 2 gives the losses and
  gradient norms of the unsharded run (relative 1e-6) for (tp, pp) = (1, 1), (1, 2), (2, 1);
  the tied embedding copies stay identical; optimizer state per rank drops from 12 to 12/dp
  bytes per parameter (bf16 parameters).
- An inf on one dp rank's shard skips the step on every rank.
- ``state_pieces`` / ``scalar_state`` saved after k steps and loaded into a fresh model and
  optimizer reproduce the next steps bit for bit, with and without sharding; the states gathered
  from shards (``param_states``) equal the unsharded ones.
"""

import pytest
import torch

from m6_engine.optim import OptimizerConfig, owned_pieces, whole_pieces
from m6_engine.parallel import layout_grad_buffer
from tests.distributed import Checks, assert_checks, init_state, run_ranks
from tests.optim_loop import build, flat_params, train, train_step
from tests.toy_lm import ToyLMConfig, tied_copies_differ

CFG = ToyLMConfig()
STEPS, SAVE_AT = 6, 3
BASE = dict(lr=1e-2, min_lr=1e-3, weight_decay=0.1, clip_grad=1.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_pieces_partition_every_parameter(seed, dp):
    gen = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 25, (1,), generator=gen))
    numels = torch.randint(1, 700, (count,), generator=gen).tolist()
    layout = layout_grad_buffer(numels, bucket_numel=900, dp_size=dp, align=8)
    cover = [torch.zeros(n, dtype=torch.int64) for n in numels]
    per_rank = []
    for rank in range(dp):
        pieces = owned_pieces(layout, dp, rank)
        per_rank.append(sum(hi - lo for _, lo, hi in pieces))
        for i, lo, hi in pieces:
            assert 0 <= lo < hi <= numels[i]
            cover[i][lo:hi] += 1
    assert all(bool((c == 1).all()) for c in cover)              # each element owned exactly once
    shard = max(end - start for start, end in layout.bucket_ranges) // dp
    assert max(per_rank) - min(per_rank) <= shard * len(layout.bucket_ranges)
    assert whole_pieces(layout) == [(i, 0, n) for i, n in enumerate(numels)]


def _config(sharded, **overrides):
    return OptimizerConfig(**{**BASE, **overrides}, optimizer_sharding=sharded)


def _check_parity(plain, sharded):
    for a, b in zip(plain["losses"], sharded["losses"]):
        assert a is None or abs(a - b) <= 1e-6 * abs(a), (plain["losses"], sharded["losses"])
    for a, b in zip(plain["stats"], sharded["stats"]):
        assert abs(a.grad_norm - b.grad_norm) <= 1e-6 * a.grad_norm and not b.skipped
    # Parameters agree in norm; not elementwise: the global norm sums per-tensor fp32 norms of
    # differently cut tensors, and Adam turns a last-bit difference of a near-zero gradient into
    # a visible one on that element.
    p, s = flat_params(plain["model"]), flat_params(sharded["model"])
    assert (p - s).norm().item() <= 1e-5 * p.norm().item(), ((p - s).norm().item(), p.norm().item())


def _check_tied(run, state):
    diff = tied_copies_differ(run["model"], state)
    assert diff is None or diff == 0.0, diff


def _check_state_bytes(state, results):
    for sharded in (False, True):
        model, opt = build(CFG, state, _config(sharded, precision="bf16"), total_steps=1)
        results[f"bytes sharded={sharded}"] = opt.state_bytes()
        results["numel"] = sum(p.numel() for p in model.params)


def _check_inf_on_one_shard_skips(state):
    model, opt = build(CFG, state, _config(True, precision="fp16", initial_loss_scale=2.0 ** 10),
                       total_steps=2)

    def poison(m):
        if state.dp_rank == 1:     # an element of this rank's shard: only this rank can see it
            start, _ = m.buckets[0].shard(1)
            m.grad_buffer[start] = float("inf")

    before = flat_params(model)
    _, stats = train_step(model, opt, CFG, state, 0, before_step=poison)
    assert stats.skipped and opt.skipped_steps == 1 and torch.equal(flat_params(model), before)
    _, stats = train_step(model, opt, CFG, state, 1)
    assert not stats.skipped and not torch.equal(flat_params(model), before)


def _check_reduce_scatter_overlaps_and_matches(state):
    from tests.toy_lm import ToyLMStage, microbatches, ops_for_tests
    from m6_engine.parallel import DataParallel

    buffers = {}
    for mode in ("all_reduce", "reduce_scatter"):
        model = DataParallel(ToyLMStage(CFG, state, ops_for_tests()), state, bucket_numel=2000,
                             grad_reduce=mode)
        assert len(model.buckets) >= 4
        batch = microbatches(CFG, 0, 4, 2, state.dp_rank, state.dp_size)[0]
        model(None, batch).backward()
        assert model.buckets_in_flight >= len(model.buckets) - 1   # launched during backward
        model.finish_grad_sync()
        buffers[mode] = (model, model.grad_buffer.clone())
    (model, full), (_, sharded) = buffers["all_reduce"], buffers["reduce_scatter"]
    for bucket in model.buckets:
        start, end = bucket.shard(state.dp_rank)
        assert torch.equal(sharded[start:end], full[start:end]), bucket.index


def _save_and_continue(state, opt_cfg):
    """Train SAVE_AT steps, snapshot the optimizer, train to STEPS; return both."""
    model, opt = build(CFG, state, opt_cfg, total_steps=STEPS)
    for step in range(SAVE_AT):
        train_step(model, opt, CFG, state, step)
    named = list(model.named_parameters())
    whole = opt.param_states(named)
    for name, p in named:
        assert whole[name]["master"].shape == p.shape
        # fp32 parameters are their own masters; half ones are their masters rounded
        assert torch.equal(whole[name]["master"].to(p.dtype), p.detach()), name
    # What a checkpoint saves: this rank's pieces (copied: state_pieces gives the live tensors).
    pieces = {name: [(first, end, {k: v.clone() for k, v in values.items()}) for first, end, values in owned]
              for name, owned in opt.state_pieces(named).items()}
    saved = {"pieces": pieces, "whole": whole, "scalars": opt.scalar_state()}
    losses = [train_step(model, opt, CFG, state, step)[0] for step in range(SAVE_AT, STEPS)]
    return saved, losses, flat_params(model)


def _resume(state, opt_cfg, saved):
    model, opt = build(CFG, state, opt_cfg, total_steps=STEPS)
    opt.load_state_pieces(dict(model.named_parameters()), saved["pieces"])   # a mapping works too
    opt.load_scalar_state(saved["scalars"])
    losses = [train_step(model, opt, CFG, state, step)[0] for step in range(SAVE_AT, STEPS)]
    return losses, flat_params(model)


def _check_round_trips(state):
    runs = {}
    for name, opt_cfg in {"fp16": _config(False, precision="fp16", initial_loss_scale=2.0 ** 12,
                                          loss_scale_growth_interval=2),
                          "fp32": _config(False), "fp32 sharded": _config(True)}.items():
        saved, losses, params = _save_and_continue(state, opt_cfg)
        runs[name] = saved
        resumed, resumed_params = _resume(state, opt_cfg, saved)
        assert resumed == losses, (name, resumed, losses)                 # bit for bit
        assert torch.equal(resumed_params, params), name
        assert all(set(v) == {"master", "exp_avg", "exp_avg_sq"} for v in saved["whole"].values())
        assert all(t.dtype == torch.float32 for v in saved["whole"].values() for t in v.values())
    assert runs["fp16"]["scalars"]["loss_scaler.scale"] == 2.0 ** 13      # it grew once: restored
    # States gathered from the shards: the masters are the (all-gathered) parameters exactly, and
    # all states are those of the unsharded run up to the last-bit noise _check_parity describes.
    plain, sharded = runs["fp32"]["whole"], runs["fp32 sharded"]["whole"]
    assert plain.keys() == sharded.keys()
    for key in ("master", "exp_avg", "exp_avg_sq"):
        a = torch.cat([plain[name][key].reshape(-1) for name in plain])
        b = torch.cat([sharded[name][key].reshape(-1) for name in plain])
        assert (a - b).norm() <= 1e-5 * a.norm(), (key, (a - b).norm().item(), a.norm().item())
    # Loading across the two (sharded state into an unsharded optimizer and back) is the
    # checkpoint's job: tests/test_checkpoint.py.


def _dp2(layouts, with_extras):
    checks, results = Checks(), {}
    for tp, pp in layouts:
        state = init_state(tp, pp)
        plain = train(CFG, state, _config(False), STEPS)
        sharded = train(CFG, state, _config(True), STEPS)
        checks.run(f"parity ({tp}, {pp})", _check_parity, plain, sharded)
        checks.run(f"tied ({tp}, {pp})", _check_tied, sharded, state)
        if with_extras:
            checks.run("reduce-scatter", _check_reduce_scatter_overlaps_and_matches, state)
            checks.run("state bytes", _check_state_bytes, state, results)
            checks.run("inf on one shard", _check_inf_on_one_shard_skips, state)
            checks.run("round trips", _check_round_trips, state)
    results["checks"] = checks.results
    return results


@pytest.fixture(scope="module")
def world2():
    return run_ranks(_dp2, 2, [(1, 1)], True)


@pytest.fixture(scope="module")
def world4():
    return run_ranks(_dp2, 4, [(1, 2), (2, 1)], False)


@pytest.mark.parametrize("name", ["parity (1, 1)", "reduce-scatter", "inf on one shard", "round trips"])
def test_dp2(world2, name):
    assert_checks([r["checks"] for r in world2], name)


@pytest.mark.parametrize("name", ["parity (1, 2)", "tied (1, 2)", "parity (2, 1)"])
def test_dp2_model_parallel(world4, name):
    assert_checks([r["checks"] for r in world4], name)


def test_state_bytes_per_parameter(world2):
    assert_checks([r["checks"] for r in world2], "state bytes")
    numel = world2[0]["numel"]
    unsharded = [r["bytes sharded=False"] for r in world2]
    sharded = [r["bytes sharded=True"] for r in world2]
    assert unsharded == [12 * numel] * 2                       # fp32 master + 2 moments
    assert sum(sharded) == 12 * numel                          # each element's state on one rank
    assert max(sharded) <= 12 * numel / 2 * 1.1, sharded        # ~12 / dp each
