"""Sequence parallelism (``parallel.sequence_parallel``): the sequence-dim mappings, an SP stage
against the same stage without SP on the same tp ranks (losses, every gradient after the step's
reduction), recomputation replaying SP dropout, and Trainer runs at tp 2 and 4, with pp 2, with
recompute and with dp 2 ZeRO-2 against one process, with checkpoints resumed across SP and (1,1,1).
"""

import dataclasses

import pytest
import torch

from m6_engine.config import ConfigError, ModelConfig, job_config_from_dict
from tests.distributed import assert_checks, run_ranks
from tests.training_job import Run, STEPS, launch, max_rel, small_job, check_resumed
from tests.training_job import corpus_fixture  # noqa: F401  (provides the module-scoped "corpus" fixture)

# Sequence 6 patches + 14 text positions = 20: at tp 4 rank 0 holds patch slots 0-4, rank 1 slot 5
# and four text positions, ranks 2-3 text only, so every case of the patch split runs.
MICRO = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=300, max_text_positions=14,
                    num_patches=6, patch_feature_dim=16, vocab_multiple=8, hidden_dropout=0.0,
                    attention_dropout=0.0)
SAVE_AT = 5


# ---- the mappings ---------------------------------------------------------------------------------

def _check_sequence_mappings(state):
    from m6_engine.parallel.mappings import (
        gather_from_sequence, reduce_scatter_to_sequence, scatter_to_sequence,
    )

    t, r, group = state.tp_size, state.tp_rank, state.group("tp")
    full = torch.arange(2 * 4 * t * 3, dtype=torch.float64).view(2, 4 * t, 3)      # (B, S, d)
    mine = full[:, 4 * r:4 * (r + 1)]
    x = full.clone().requires_grad_()
    y = scatter_to_sequence(x, group)
    assert torch.equal(y, mine)
    (y * (r + 1)).sum().backward()          # backward all-gathers: every rank's positions, scaled
    expected = torch.cat([torch.full((2, 4, 3), float(k + 1), dtype=torch.float64) for k in range(t)], 1)
    assert torch.equal(x.grad, expected), x.grad

    part = mine.clone().requires_grad_()
    gathered = gather_from_sequence(part, group)
    assert torch.equal(gathered, full)
    gathered.mul(2.0).sum().backward()      # a replicated consumer: keep this rank's positions
    assert torch.equal(part.grad, torch.full_like(mine, 2.0))

    partial = (full * (r + 1)).requires_grad_()
    summed = reduce_scatter_to_sequence(partial, group)
    assert torch.equal(summed, mine * (t * (t + 1) / 2))
    summed.sum().backward()
    assert torch.equal(partial.grad, torch.ones_like(full))


def _ranks_mappings(tp):
    from tests.distributed import Checks, init_state

    state = init_state(tp=tp)
    checks = Checks()
    checks.run("sequence mappings", _check_sequence_mappings, state)
    return checks.results


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_mappings(tp):
    assert_checks(run_ranks(_ranks_mappings, tp, tp), "sequence mappings")


def test_sequence_chunk_names_what_does_not_split():
    from m6_engine.parallel.mappings import sequence_chunk

    assert sequence_chunk(16, 4) == 4
    with pytest.raises(ValueError, match="the micro-batch's sequence length 18 is not divisible by 4"):
        sequence_chunk(18, 4, "the micro-batch's sequence length")


# ---- an SP stage against the same stage without SP --------------------------------------------------

def _stage_step(config, state, *, sequence_parallel, recompute="none", split_reduction=False):
    """One forward and backward of an M6 stage under DataParallel and the step's gradient
    reduction: (loss, {name: gradient}, {name: SP-parameter gradient before the tp sum})."""
    from m6_engine.model import M6Model
    from m6_engine.parallel import DataParallel, seed_parallel_rng
    from m6_engine.parallel.grad_sync import allreduce_sequence_parallel_grads, finalize_model_grads
    from m6_engine.parallel.roles import param_role
    from tests.m6_data import mixed_batch

    tracker = seed_parallel_rng(11, state)
    stage = M6Model(config, state, seed=5, recompute=recompute, rng_tracker=tracker,
                    sequence_parallel=sequence_parallel).train()
    model = DataParallel(stage, state)
    batch = mixed_batch(config, 0, 4)
    loss = model(batch).loss
    loss.backward()
    before = {}
    if split_reduction:
        model.finish_grad_sync()
        before = {n: param_role(p).main_grad.clone() for n, p in stage.named_parameters()
                  if param_role(p).sequence_parallel}
        allreduce_sequence_parallel_grads(model, state)
    else:
        finalize_model_grads(model, state)
    grads = {n: param_role(p).main_grad.clone() for n, p in stage.named_parameters()}
    return loss.detach(), grads, before


def _max_grad_diff(a, b):
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12)).item() for n in b)


def _check_sp_matches_tp(state):
    plain_loss, plain, _ = _stage_step(MICRO, state, sequence_parallel=False)
    loss, grads, before = _stage_step(MICRO, state, sequence_parallel=True, split_reduction=True)
    assert abs(loss - plain_loss) <= 1e-6 * abs(plain_loss), (loss, plain_loss)
    assert grads.keys() == plain.keys()
    diff = _max_grad_diff(grads, plain)
    assert diff <= 1e-5, diff
    # LayerNorms and the position / segment / patch tables are sequence-parallel; the row-parallel
    # biases and the final LayerNorm are not (they see every position).
    marked = sorted(before)
    assert "layers.0.ln1.weight" in marked and "embedding.position.weight" in marked, marked
    assert "embedding.patch.weight" in marked and "layers.0.mlp.fc2.bias" not in marked, marked
    assert "final_ln.weight" not in marked, marked
    # Without the tp sum each rank holds a partial gradient: the reduction is what makes them match.
    assert _max_grad_diff(before, {n: plain[n] for n in before}) > 1e-2


def _check_sp_recompute_replays_dropout(state):
    config = dataclasses.replace(MICRO, hidden_dropout=0.1, attention_dropout=0.1)
    none_loss, none, _ = _stage_step(config, state, sequence_parallel=True)
    plain_loss, _, _ = _stage_step(MICRO, state, sequence_parallel=True)
    assert abs(none_loss - plain_loss) > 1e-4, "dropout had no effect: the check is vacuous"
    for mode in ("selective", "full"):
        loss, grads, _ = _stage_step(config, state, sequence_parallel=True, recompute=mode)
        assert torch.equal(loss, none_loss), (mode, loss, none_loss)
        assert _max_grad_diff(grads, none) <= 1e-6, mode


def _check_sp_dropout_masks_differ_across_tp(state):
    """Each tp rank draws the dropout of its own positions: the same-shaped masks differ."""
    import torch.distributed as dist

    from m6_engine.model.common import sequence_dropout
    from m6_engine.parallel import seed_parallel_rng

    tracker = seed_parallel_rng(11, state)
    mask = sequence_dropout(torch.ones(2, 8, 16), 0.5, True, tracker, True)
    masks = [torch.empty_like(mask) for _ in range(state.tp_size)]
    dist.all_gather(masks, mask, group=state.group("tp"))
    assert not torch.equal(masks[0], masks[1])
    with pytest.raises(RuntimeError, match="needs the model-parallel RNG stream"):
        sequence_dropout(torch.ones(2, 8, 16), 0.5, True, None, True)


def _check_sp_shapes_and_errors(state):
    from m6_engine.model import M6Model
    from tests.m6_data import mixed_batch

    model = M6Model(MICRO, state, sequence_parallel=True)
    assert model.activation_spec(2, 20).shape == (2, 20 // state.tp_size, MICRO.hidden_size)
    assert M6Model(MICRO, state).activation_spec(2, 20).shape == (2, 20, MICRO.hidden_size)
    odd = dataclasses.replace(MICRO, max_text_positions=15)      # 21 positions
    with pytest.raises(ValueError, match="sequence length 21 is not divisible"):
        M6Model(odd, state, sequence_parallel=True)(mixed_batch(odd, 0, 2))
    block = model.layers["0"]
    with pytest.raises(RuntimeError, match="KV-cache decoding runs without sequence parallelism"):
        block(torch.zeros(1, 4, 32), torch.ones(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64),
              cache=object())


SP_CHECKS = {
    "SP matches tp without SP": _check_sp_matches_tp,
    "SP recompute replays dropout": _check_sp_recompute_replays_dropout,
    "SP dropout masks differ across tp": _check_sp_dropout_masks_differ_across_tp,
    "SP shapes and errors": _check_sp_shapes_and_errors,
}


def _ranks_sp_checks(tp):
    from tests.distributed import Checks, init_state

    state = init_state(tp=tp)
    checks = Checks()
    for name, fn in SP_CHECKS.items():
        checks.run(name, fn, state)
    return checks.results


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def sp_checks(request):
    return run_ranks(_ranks_sp_checks, request.param, request.param)


@pytest.mark.parametrize("name", list(SP_CHECKS))
def test_sp_stage(sp_checks, name):
    assert_checks(sp_checks, name)


# ---- training ---------------------------------------------------------------------------------------

def _job(corpus, *, tp=1, pp=1, sp=False, recompute="none", zero_stage=0, save="", load="", v=1, layers=2):
    job = small_job(corpus, tp=tp, pp=pp, steps=STEPS, optimizer={"zero_stage": zero_stage},
                    model={"num_layers": layers},
                    train={"recompute": recompute, "save_dir": save, "save_interval": SAVE_AT if save else 0,
                           "load": load})
    return job_config_from_dict(job.to_dict(), {"parallel.sequence_parallel": str(sp).lower(),
                                                "parallel.virtual_stages": str(v)})


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt_111")
    runs = {"(1,1,1)": Run(_job(corpus, save=str(save))), "(1,1,1) 4 layers": Run(_job(corpus, layers=4))}
    return launch(1, runs, timeout_s=400.0) | {"save": save}


@pytest.fixture(scope="module")
def two_ranks(corpus, one_process, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt_tp2_sp")
    step = f"step_{SAVE_AT:06d}"
    runs = {
        "tp2 SP": Run(_job(corpus, tp=2, sp=True, save=str(save))),
        "tp2 SP selective": Run(_job(corpus, tp=2, sp=True, recompute="selective")),
        "(1,1,1) -> tp2 SP": Run(_job(corpus, tp=2, sp=True, load=str(one_process["save"] / step))),
    }
    return launch(2, runs, timeout_s=600.0) | {"save": save}


@pytest.fixture(scope="module")
def resumed_in_one_process(corpus, two_ranks):
    runs = {"tp2 SP -> (1,1,1)": Run(_job(corpus, load=str(two_ranks["save"] / f"step_{SAVE_AT:06d}")))}
    return launch(1, runs, timeout_s=400.0)


@pytest.fixture(scope="module")
def four_ranks(corpus):
    runs = {"tp4 SP": Run(_job(corpus, tp=4, sp=True)),
            "tp2 SP pp2 full recompute": Run(_job(corpus, tp=2, pp=2, sp=True, recompute="full")),
            "tp2 SP dp2 ZeRO-2": Run(_job(corpus, tp=2, sp=True, zero_stage=2)),
            "tp2 SP pp2 V2": Run(_job(corpus, tp=2, pp=2, sp=True, v=2, layers=4))}
    return launch(4, runs, timeout_s=900.0)


def _compare(name, ours, reference, record_property):
    rel = max_rel(ours["losses"], reference["losses"])
    record_property("max_rel_loss_diff", rel)
    print(f"{name}: max relative loss difference to (1,1,1) over {len(reference['losses'])} steps: {rel:.2e}")
    assert rel <= 1e-5, (ours["losses"], reference["losses"])


@pytest.mark.parametrize("name", ["tp2 SP", "tp2 SP selective"])
def test_tp2_sp_matches_one_process(name, two_ranks, one_process, record_property):
    reference = one_process["(1,1,1)"]
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    assert reference["losses"][STEPS] < reference["losses"][1]
    _compare(name, two_ranks[name], reference, record_property)


@pytest.mark.parametrize("name", ["tp4 SP", "tp2 SP pp2 full recompute", "tp2 SP dp2 ZeRO-2"])
def test_sp_layouts_match_one_process(name, four_ranks, one_process, record_property):
    _compare(name, four_ranks[name], one_process["(1,1,1)"], record_property)


def test_sp_with_interleaved_chunks_matches_one_process(four_ranks, one_process, record_property):
    _compare("tp2 SP pp2 V2 (4 layers)", four_ranks["tp2 SP pp2 V2"], one_process["(1,1,1) 4 layers"],
             record_property)


@pytest.mark.parametrize("name", ["(1,1,1) -> tp2 SP", "tp2 SP -> (1,1,1)"])
def test_checkpoints_resume_across_sequence_parallelism(name, two_ranks, one_process,
                                                        resumed_in_one_process, record_property):
    resumed = (two_ranks if name.startswith("(1,1,1)") else resumed_in_one_process)[name]["losses"]
    source = (one_process["(1,1,1)"] if name.startswith("(1,1,1)") else two_ranks["tp2 SP"])["losses"]
    check_resumed(name, resumed, source, SAVE_AT, record_property)


def test_a_sequence_that_does_not_split_over_tp_is_a_config_error(corpus):
    from m6_engine.training import check_job

    job = job_config_from_dict(_job(corpus, tp=4, sp=True).to_dict(), {"model.max_text_positions": "62"})
    with pytest.raises(ConfigError, match=r"model.num_patches \+ model.max_text_positions = 16 \+ 62 = 78 "
                                          r"is not divisible by 4"):
        check_job(job, 4)
    check_job(job_config_from_dict(job.to_dict(), {"parallel.sequence_parallel": "false"}), 4)


def _ranks_trainer_layout(job):
    from m6_engine.training import Trainer, make_datasets
    from tests.distributed import init_state

    state = init_state(job.parallel.tp, job.parallel.pp)
    train_data, _ = make_datasets(job, state)
    trainer = Trainer(job, state, train_data, log_rank_output=False)
    return tuple(trainer.tensor_spec.shape), trainer.stage.sequence_parallel


def test_the_trainer_builds_sequence_parallel_stages(corpus):
    # 16 patches + 64 text positions over tp 2 and pp 2: 40 positions pass between the stages.
    ranks = run_ranks(_ranks_trainer_layout, 4, _job(corpus, tp=2, pp=2, sp=True))
    assert ranks == [((2, 40, 64), True)] * 4, ranks
