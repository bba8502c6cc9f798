"""Interleaved 1F1B (m6_engine/parallel/interleaved.py, ParallelConfig.virtual_stages).

- The schedule table, without processes: every (chunk, micro-batch) gets one forward and one
  backward, forwards first; per rank the order and warm-up counts are Megatron's; every transfer
  is posted by both sides in the same tick and feeds exactly the operation that needs it; with
  equal-time chunks (backward 1x or 2x the forward) the modelled bubble is (pp - 1) / (V m).
- On toy-LM ranks (pp 2 and 4, V 2): the losses of one rank, the live micro-batches the order
  implies (saved-tensor hooks and StepResult), sent activations freed, no_sync around all but the
  step's last backward.
- Layer placement: chunk c of rank k holds virtual stage c * pp + k; the layers of all chunks of
  all ranks are each layer once, and parameter names are those of the one-process model.
- Training parity against one process (fp32, dropout 0, 8 steps, relative 1e-5): pp 2 V 2 with the
  held-out evaluation (forward-only path); slow: pp 4 V 2 (8 layers), pp 2 V 2 with dp 2 and
  with tp 2.
- Checkpoints: pp 2 V 2's step 4 resumed at (1,1,1) and at pp 2 V 1, and (1,1,1)'s step 4 resumed
  at pp 2 V 2, continue with the same losses.
- Errors: too few layers for pp * V, micro-batches not a multiple of pp.
"""

import collections

import pytest

from m6_engine.config import ConfigError, job_config_from_dict
from m6_engine.parallel.interleaved import (
    ACTIVATION, BACKWARD, FORWARD, GRADIENT, rank_order, schedule_table, warmup_forwards,
)
from tests.distributed import run_ranks
from tests.training_job import Run, launch, max_rel, small_job, check_resumed
from tests.training_job import corpus_fixture  # noqa: F401  (provides the module-scoped "corpus" fixture)

SHAPES = [(2, 2, 2), (2, 2, 4), (2, 3, 6), (3, 2, 3), (3, 2, 9), (4, 2, 4), (4, 2, 8), (4, 3, 12),
          (4, 4, 8), (8, 2, 16)]
STEPS, SAVE_AT = 8, 4


# ---- the schedule table -------------------------------------------------------------------------

@pytest.mark.parametrize("pp,v,m", SHAPES)
def test_each_microbatch_and_chunk_runs_forward_then_backward_once(pp, v, m):
    for rank in range(pp):
        order = rank_order(pp, v, m, rank)
        seen = collections.Counter((op.kind, op.chunk, op.microbatch) for op in order)
        expected = {(kind, c, j) for kind in (FORWARD, BACKWARD) for c in range(v) for j in range(m)}
        assert set(seen) == expected and set(seen.values()) == {1}, (rank, seen)
        position = {(op.kind, op.chunk, op.microbatch): i for i, op in enumerate(order)}
        assert all(position[(FORWARD, c, j)] < position[(BACKWARD, c, j)]
                   for c in range(v) for j in range(m))
        ticks = [op for t in schedule_table(pp, v, m)[rank] for op in t.ops]
        assert ticks == order, "the table runs the rank's operations in its order"


@pytest.mark.parametrize("pp,v,m", SHAPES)
def test_order_is_megatrons(pp, v, m):
    for rank in range(pp):
        order = rank_order(pp, v, m, rank)
        w = warmup_forwards(pp, v, m, rank)
        assert w == min(2 * (pp - rank - 1) + (v - 1) * pp, v * m)
        assert [op.kind for op in order[:w]] == [FORWARD] * w
        steady = order[w:len(order) - w]
        assert [op.kind for op in steady] == [FORWARD, BACKWARD] * (v * m - w)
        assert [op.kind for op in order[len(order) - w:]] == [BACKWARD] * w
        forwards = [(op.chunk, op.microbatch) for op in order if op.kind == FORWARD]
        backwards = [(op.chunk, op.microbatch) for op in order if op.kind == BACKWARD]
        # Groups of pp micro-batches per chunk: chunks ascending for forwards, descending backwards.
        assert forwards[:pp] == [(0, j) for j in range(pp)]
        assert forwards[pp:2 * pp] == [(1, j) for j in range(pp)]
        assert backwards[:pp] == [(v - 1, j) for j in range(pp)]
        assert forwards[v * pp:v * pp + pp] == ([(0, j) for j in range(pp, 2 * pp)] if m > pp else [])


@pytest.mark.parametrize("pp,v,m", SHAPES)
@pytest.mark.parametrize("forward_only", [False, True])
def test_transfers_pair_up_and_feed_the_operation_that_needs_them(pp, v, m, forward_only):
    table = schedule_table(pp, v, m, forward_only=forward_only)
    assert len({len(column) for column in table}) == 1
    last_stage = v * pp - 1
    for t in range(len(table[0])):
        for k in range(pp):
            tick = table[k][t]
            assert len(tick.sends) <= len(tick.ops) <= (1 if forward_only else 2)
            assert list(tick.sends) == sorted(tick.sends, key=lambda x: (x.kind, x.chunk, x.microbatch))
            assert list(tick.recvs) == sorted(tick.recvs, key=lambda x: (x.kind, x.chunk, x.microbatch))
            for send in tick.sends:
                assert send.src == k and send in table[send.dst][t].recvs, (t, send)
                assert send.dst == ((k + 1) % pp if send.kind == ACTIVATION else (k - 1) % pp)
            for recv in tick.recvs:
                assert recv in table[recv.src][t].sends, (t, recv)
    for k in range(pp):
        arrived, used = {}, set()
        for t, tick in enumerate(table[k]):
            for op in tick.ops:
                stage = op.chunk * pp + k
                needs = ((ACTIVATION if op.kind == FORWARD else GRADIENT), op.chunk, op.microbatch)
                starts_here = stage == 0 if op.kind == FORWARD else stage == last_stage
                if not starts_here:
                    assert arrived.get(needs, t) < t, (k, t, op)   # received in an earlier tick
                    used.add(needs)
            for recv in tick.recvs:
                arrived[(recv.kind, recv.chunk, recv.microbatch)] = t
                if recv.kind == ACTIVATION:   # chunk c on the last rank feeds chunk c + 1 on rank 0
                    assert recv.chunk * pp + k == (recv.chunk - (k == 0)) * pp + recv.src + 1
        assert used == set(arrived), k


def _makespan(table, forward_s, backward_s):
    """Step time of ``table`` when every forward of a chunk takes ``forward_s`` and every
    backward ``backward_s``, and a tick's batch completes once every peer in it has posted its
    side (the end of that peer's compute in the same tick)."""
    pp, done = len(table), [0.0] * len(table)
    for t in range(len(table[0])):
        posted = [done[k] + sum(forward_s if op.kind == FORWARD else backward_s for op in table[k][t].ops)
                  for k in range(pp)]
        peers = [{x.dst for x in table[k][t].sends} | {x.src for x in table[k][t].recvs} for k in range(pp)]
        done = [max([posted[k]] + [posted[p] for p in peers[k]]) for k in range(pp)]
    return max(done)


@pytest.mark.parametrize("pp,v,m", SHAPES)
@pytest.mark.parametrize("backward_s", [1.0, 2.0])
def test_modelled_bubble_is_the_formula(pp, v, m, backward_s):
    """With equal-time chunks and free transfers, the table's step is the busy time plus a
    bubble of (pp - 1) / (V m) of it, V times less than plain 1F1B's (pp - 1) / m; also with a
    backward twice as long as a forward (steady ticks pair a forward with a backward, so
    neighbours are in phase)."""
    busy = v * m * (1.0 + backward_s)
    bubble = _makespan(schedule_table(pp, v, m), 1.0, backward_s) - busy
    assert bubble / busy == pytest.approx((pp - 1) / (v * m))


def test_a_list_of_chunks_needs_the_1f1b_schedule():
    from m6_engine.parallel import TensorSpec, forward_backward

    state = type("Stages", (), {"pp_size": 2})()
    with pytest.raises(ValueError, match="a list of model chunks runs the interleaved 1F1B schedule; "
                                         "schedule 'gpipe' takes one stage per rank"):
        forward_backward("gpipe", forward_step=None, data_iterator=None, model=[None, None],
                         num_microbatches=2, state=state, tensor_spec=TensorSpec((1,)))


def test_shape_errors():
    with pytest.raises(ValueError, match="num_microbatches = 6 is not a multiple of pp = 4"):
        rank_order(4, 2, 6, 0)
    with pytest.raises(ValueError, match="virtual_stages must be an integer >= 2"):
        schedule_table(2, 1, 4)
    with pytest.raises(ValueError, match="pp must be an integer >= 2"):
        schedule_table(1, 2, 4)


# ---- layer placement ----------------------------------------------------------------------------

@pytest.mark.parametrize("layers,pp,v", [(4, 2, 2), (8, 4, 2), (9, 2, 2), (13, 3, 4)])
def test_virtual_stages_partition_the_layers(layers, pp, v):
    from m6_engine.model import stage_layer_range

    ranges = {(k, c): stage_layer_range(layers, pp, k, v, c) for k in range(pp) for c in range(v)}
    in_stage_order = [i for s in range(pp * v) for i in ranges[(s % pp, s // pp)]]
    assert in_stage_order == list(range(layers))
    assert all(len(r) >= 1 for r in ranges.values())
    assert stage_layer_range(layers, pp, 1) == stage_layer_range(layers, pp, 1, 1, 0)


def test_too_few_layers_for_the_virtual_stages():
    from m6_engine.config import ModelConfig

    with pytest.raises(ConfigError, match=r"num_layers = 6 is fewer than pp \* ParallelConfig."
                                          r"virtual_stages = 4 \* 2 = 8 virtual pipeline stages"):
        ModelConfig(num_layers=6, hidden_size=32, num_heads=2).check_layout(1, 4, 2)
    ModelConfig(num_layers=8, hidden_size=32, num_heads=2).check_layout(1, 4, 2)


def _ranks_chunk_names(layers):
    """Names and shapes of pp 2 V 2 stages, and of V 1 stages (same rank), as StageChunks sees them."""
    from m6_engine.config import ModelConfig
    from m6_engine.model import M6Model, StageChunks
    from tests.distributed import init_state

    state = init_state(tp=1, pp=2)
    config = ModelConfig(num_layers=layers, hidden_size=32, num_heads=2, vocab_size=64,
                         max_text_positions=16, num_patches=2, patch_feature_dim=8)
    chunks = StageChunks([M6Model(config, state, chunk=c, virtual_stages=2) for c in range(2)])
    return {n: tuple(p.shape) for n, p in chunks.named_parameters()}


def _whole_model_names(layers):
    """Names and shapes of the one-process model (its own rank: no group in the pytest process)."""
    from m6_engine.config import ModelConfig
    from m6_engine.model import M6Model
    from tests.distributed import init_state

    config = ModelConfig(num_layers=layers, hidden_size=32, num_heads=2, vocab_size=64,
                         max_text_positions=16, num_patches=2, patch_feature_dim=8)
    return {n: tuple(p.shape) for n, p in M6Model(config, init_state()).named_parameters()}


def test_parameter_names_do_not_depend_on_pp_or_v():
    ranks = run_ranks(_ranks_chunk_names, 2, 4)
    (whole,) = run_ranks(_whole_model_names, 1, 4, torchrun_env=False)
    assert {n for r in ranks for n in r} == set(whole)
    assert all(whole[n] == s for r in ranks for n, s in r.items())
    assert sorted({n.split(".")[1] for n in ranks[0] if n.startswith("layers.")}) == ["0", "2"]
    assert sorted({n.split(".")[1] for n in ranks[1] if n.startswith("layers.")}) == ["1", "3"]
    # The tied word embedding: on virtual stage 0 (rank 0) and the last virtual stage (rank 1).
    assert "embedding.word.weight" in ranks[0] and "embedding.word.weight" in ranks[1]
    assert "final_ln.weight" in ranks[1] and "final_ln.weight" not in ranks[0]


# ---- the schedule on ranks (toy LM) -------------------------------------------------------------

def _expected_peak(pp, v, m, rank):
    live = peak = 0
    for op in rank_order(pp, v, m, rank):
        live += 1 if op.kind == FORWARD else -1
        peak = max(peak, live)
    return peak


def _ranks_toy(pp, v, m, steps):
    """SGD steps of the 8-layer toy LM, interleaved with V = v (v == 1: plain 1F1B); per rank the
    step losses, live micro-batches (saved-tensor hooks and the schedule's count), whether sent
    activations were freed, and the order of no_sync / finalize calls of the first step."""
    import contextlib

    import torch
    from torch import nn

    from m6_engine.parallel import DataParallel, TensorSpec, forward_backward, model_grad_sync
    from m6_engine.parallel.roles import param_role
    from tests.distributed import init_state
    from tests.test_pipeline import LiveActivations, _instrumented_step
    from tests.toy_lm import ToyLMConfig, ToyLMStage, microbatches, ops_for_tests

    cfg = ToyLMConfig(layers=8)
    state = init_state(tp=1, pp=pp)
    ops = ops_for_tests()
    if v == 1:
        stage = ToyLMStage(cfg, state, ops)
        model = DataParallel(stage, state, bucket_numel=2000)
        schedule_model = model
    else:
        chunks = [ToyLMStage(cfg, state, ops, chunk=c, virtual_stages=v) for c in range(v)]
        model = DataParallel(nn.ModuleList(chunks), state, bucket_numel=2000)
        schedule_model = chunks
    events = []
    sync = model_grad_sync(model, state)

    @contextlib.contextmanager
    def no_sync():
        events.append("no_sync")
        with sync["no_sync"]():
            yield

    def finalize():
        events.append("finalize")
        sync["finalize_grads"]()

    out = {"losses": [], "live_peak": [], "schedule_peak": [], "released": True}
    for step in range(steps):
        model.zero_grad_buffer()
        live, outputs = LiveActivations(), []
        batches = microbatches(cfg, step, m * 2, 2)
        result = forward_backward("1f1b", forward_step=_instrumented_step(live, outputs),
                                  data_iterator=iter(batches), model=schedule_model,
                                  num_microbatches=m, state=state,
                                  tensor_spec=TensorSpec((2, cfg.seq_len, cfg.hidden)),
                                  check_shapes=step == steps - 1,   # the metadata exchange too
                                  no_sync=no_sync, finalize_grads=finalize)
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(param_role(p).main_grad, alpha=0.05)
        out["losses"].append([x.item() for x in result.losses])
        out["live_peak"].append(live.peak)
        out["schedule_peak"].append(result.peak_live_microbatches)
        out["released"] &= all(o.untyped_storage().nbytes() <= o.element_size()
                               for o in outputs if o.dim() > 0)
        if step == 0:
            out["events"] = list(events)
    return out


@pytest.fixture(scope="module")
def toy_reference():
    return run_ranks(_ranks_toy, 1, 1, 1, 4, 3)[0]


@pytest.mark.parametrize("pp,v", [(2, 2), (4, 2)])
def test_schedule_on_ranks_matches_one_rank(pp, v, toy_reference):
    m = 4
    ranks = run_ranks(_ranks_toy, pp, pp, v, m, 3)
    last = ranks[-1]
    assert len(last["losses"]) == 3 and all(len(x) == m for x in last["losses"])
    for ours, ref in zip(last["losses"], toy_reference["losses"]):
        assert ours == pytest.approx(ref, rel=1e-5), (last["losses"], toy_reference["losses"])
    for rank, r in enumerate(ranks):
        expected = _expected_peak(pp, v, m, rank)
        assert r["schedule_peak"] == [expected] * 3, (rank, r["schedule_peak"], expected)
        assert r["live_peak"] == [expected] * 3, (rank, r["live_peak"], expected)
        assert r["released"], f"rank {rank} kept the storage of a sent activation"
        # Every backward but the last of the step (over all chunks) defers the dp reduction.
        assert r["events"] == ["no_sync"] * (v * m - 1) + ["finalize"], (rank, r["events"])


# ---- training -----------------------------------------------------------------------------------

def _job(corpus, *, tp=1, pp=1, v=1, layers=4, save="", save_interval=0, load="", evaluate=False,
         zero_stage=0):
    job = small_job(corpus, tp=tp, pp=pp, steps=STEPS, evaluate=evaluate, model={"num_layers": layers},
                    optimizer={"zero_stage": zero_stage},
                    train={"save_dir": save, "save_interval": save_interval, "load": load})
    return job_config_from_dict(job.to_dict(), {"parallel.virtual_stages": str(v)})


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt_111")
    runs = {"(1,1,1)": Run(_job(corpus, save=str(save), save_interval=SAVE_AT, evaluate=True))}
    return launch(1, runs, timeout_s=400.0) | {"save": save}


@pytest.fixture(scope="module")
def pp2_v2(corpus, one_process, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt_pp2v2")
    step = f"step_{SAVE_AT:06d}"
    runs = {
        "pp2 V2": Run(_job(corpus, pp=2, v=2, save=str(save), save_interval=SAVE_AT, evaluate=True)),
        "pp2 V2 -> pp2 V1": Run(_job(corpus, pp=2, v=1, load=str(save / step))),
        "(1,1,1) -> pp2 V2": Run(_job(corpus, pp=2, v=2, load=str(one_process["save"] / step))),
    }
    return launch(2, runs, timeout_s=400.0) | {"save": save}


@pytest.fixture(scope="module")
def resumed_in_one_process(corpus, pp2_v2):
    runs = {"pp2 V2 -> (1,1,1)": Run(_job(corpus, load=str(pp2_v2["save"] / f"step_{SAVE_AT:06d}")))}
    return launch(1, runs, timeout_s=400.0)


def test_pp2_v2_matches_one_process(pp2_v2, one_process, record_property):
    ours, reference = pp2_v2["pp2 V2"], one_process["(1,1,1)"]
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    rel = max_rel(ours["losses"], reference["losses"])
    record_property("max_rel_loss_diff", rel)
    print(f"pp 2 V 2: max relative loss difference to (1,1,1) over {STEPS} steps: {rel:.2e}")
    assert rel <= 1e-5, (ours["losses"], reference["losses"])
    assert reference["losses"][STEPS] < reference["losses"][1]
    # The held-out evaluation runs the forward-only interleaved path.
    assert ours["eval"].keys() == reference["eval"].keys()
    assert max_rel(ours["eval"], reference["eval"]) <= 1e-5


@pytest.mark.parametrize("name", ["pp2 V2 -> pp2 V1", "(1,1,1) -> pp2 V2", "pp2 V2 -> (1,1,1)"])
def test_checkpoints_reshard_between_virtual_stages(name, pp2_v2, one_process, resumed_in_one_process,
                                                    record_property):
    resumed = (resumed_in_one_process if name.endswith("(1,1,1)") else pp2_v2)[name]["losses"]
    source = (one_process["(1,1,1)"] if name.startswith("(1,1,1)") else pp2_v2["pp2 V2"])["losses"]
    check_resumed(name, resumed, source, SAVE_AT, record_property)


@pytest.fixture(scope="module")
def four_ranks(corpus):
    return launch(4, {"pp4 V2": Run(_job(corpus, pp=4, v=2, layers=8)),
                       "pp2 V2 dp2": Run(_job(corpus, pp=2, v=2)),
                       "tp2 pp2 V2": Run(_job(corpus, tp=2, pp=2, v=2))}, timeout_s=900)


@pytest.fixture(scope="module")
def one_process_8_layers(corpus):
    return launch(1, {"(1,1,1) 8 layers": Run(_job(corpus, layers=8))}, timeout_s=400.0)


@pytest.mark.slow
def test_pp4_v2_matches_one_process(four_ranks, one_process_8_layers, record_property):
    rel = max_rel(four_ranks["pp4 V2"]["losses"], one_process_8_layers["(1,1,1) 8 layers"]["losses"])
    record_property("max_rel_loss_diff", rel)
    print(f"pp 4 V 2 (8 layers): max relative loss difference to (1,1,1) over {STEPS} steps: {rel:.2e}")
    assert rel <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pp2 V2 dp2", "tp2 pp2 V2"])
def test_pp2_v2_with_dp_or_tp_matches_one_process(name, four_ranks, one_process, record_property):
    rel = max_rel(four_ranks[name]["losses"], one_process["(1,1,1)"]["losses"])
    record_property("max_rel_loss_diff", rel)
    print(f"{name}: max relative loss difference to (1,1,1) over {STEPS} steps: {rel:.2e}")
    assert rel <= 1e-5


@pytest.fixture(scope="module")
def zero_with_chunks(corpus):
    return launch(4, {f"pp2 V2 dp2 ZeRO-{z}": Run(_job(corpus, pp=2, v=2, zero_stage=z)) for z in (2, 3)},
                   timeout_s=600)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_pp2_v2_with_zero_matches_one_process(zero_stage, zero_with_chunks, one_process, record_property):
    # ZeRO-3 with chunks: the root bucket (embedding, head) is gathered by each chunk's forward
    # (the schedule never calls StageChunks.forward) and stays gathered until the step ends.
    name = f"pp2 V2 dp2 ZeRO-{zero_stage}"
    rel = max_rel(zero_with_chunks[name]["losses"], one_process["(1,1,1)"]["losses"])
    record_property("max_rel_loss_diff", rel)
    print(f"{name}: max relative loss difference to (1,1,1) over {STEPS} steps: {rel:.2e}")
    assert rel <= 1e-5


def _ranks_trainer_stage(job):
    """What the Trainer built on this rank for ``job``: its stage type, chunks' layers, and what
    one step's schedule ran (the interleaved executor or not)."""
    from m6_engine.parallel import interleaved
    from m6_engine.training import Trainer, make_datasets
    from tests.distributed import init_state

    state = init_state(job.parallel.tp, job.parallel.pp)
    train_data, _ = make_datasets(job, state)
    trainer = Trainer(job, state, train_data, log_rank_output=False)
    calls = []
    original = interleaved.schedule_table
    interleaved.schedule_table = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        trainer.train_step()
    finally:
        interleaved.schedule_table = original
    return {"stage": type(trainer.stage).__name__, "calls": calls,
            "layers": [list(c.layer_ids) for c in getattr(trainer.stage, "chunks", [trainer.stage])]}


def test_the_trainer_runs_chunks_when_virtual_stages_is_set(corpus):
    ranks = run_ranks(_ranks_trainer_stage, 2, _job(corpus, pp=2, v=2))
    assert [r["stage"] for r in ranks] == ["StageChunks"] * 2
    assert [r["layers"] for r in ranks] == [[[0], [2]], [[1], [3]]]
    assert all(r["calls"] == [(2, 2, 4)] for r in ranks), ranks


def test_microbatches_not_a_multiple_of_pp_are_refused(corpus):
    from m6_engine.training import check_job

    job = job_config_from_dict(_job(corpus, pp=2, v=2).to_dict(),
                               {"train.global_batch": "6", "train.micro_batch": "2"})
    with pytest.raises(ConfigError, match=r"virtual_stages = 2 \(interleaved 1F1B\) needs the "
                                          r"micro-batches per step, .* = 3, to be a multiple of pp = 2"):
        check_job(job, 2)
    with pytest.raises(ConfigError, match=r"fewer than pp \* ParallelConfig.virtual_stages = 2 \* 2"):
        check_job(_job(corpus, pp=2, v=2, layers=3), 2)
