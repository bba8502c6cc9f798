"""The engine's core test on M6 itself: the ``tiny`` M6 trained a few SGD steps on mixed tasks
(all four, tokenizer-free ids) gives the same losses for every (tp, pp) layout as one process.

Each layout builds M6Model from the same seed, checks that its shards gather to the single
process's full initial weights (``convert.full_state_dict``) and that ``convert.load_full_state_dict``
puts them back shard by shard, then takes SGD steps with the 1F1B schedule (``ForwardStep``,
DataParallel gradient buffers, tied-embedding gradient sum). Step losses and per-task losses must
match the single process to a relative 1e-5 (fp32), the trained weights closely, and the first and
last stage's copies of the word embedding must stay identical. (1, 2) and (2, 2) also run with
activation recomputation, which must not change a thing.
"""

import pytest
import torch

from m6_engine.parallel.roles import param_role
from m6_engine.config import model_preset
from m6_engine.convert import full_state_dict, load_full_state_dict
from m6_engine.model import ForwardStep, M6Model
from m6_engine.parallel import DataParallel, forward_backward, model_grad_sync
from tests.distributed import init_state, run_ranks
from tests.m6_data import mixed_batch

CONFIG = model_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
SEQ = CONFIG.num_patches + CONFIG.max_text_positions
STEPS, GLOBAL_BATCH, MICRO_BATCH, LR, SEED = 4, 4, 2, 1.0, 17
LAYOUTS = {  # world size -> (tp, pp, recompute)
    2: [(2, 1, "none"), (1, 2, "none"), (1, 2, "full")],
    4: [(2, 2, "none"), (2, 2, "selective")],
}


def _check_init(model, state, reference_init) -> float:
    """Largest difference of the gathered initial weights from the single process's (0 when
    the layout does not change the model), after a load into a model of another seed."""
    full = full_state_dict(model)
    other = M6Model(CONFIG, state, seed=SEED + 1)
    load_full_state_dict(other, full)
    for (name, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), f"load_full_state_dict changed {name}"
    if reference_init is None:
        return 0.0
    assert set(full) == set(reference_init), set(full) ^ set(reference_init)
    return max((full[k] - v).abs().max().item() for k, v in reference_init.items())


def _train(tp, pp, recompute, reference_init=None):
    state = init_state(tp, pp)
    stage = M6Model(CONFIG, state, seed=SEED, recompute=recompute)
    init_diff = _check_init(stage, state, reference_init)
    initial = full_state_dict(stage) if reference_init is None else None
    model = DataParallel(stage, state, bucket_numel=200_000)
    spec = stage.activation_spec(MICRO_BATCH, SEQ)
    losses, task_losses = [], []
    for step in range(STEPS):
        model.zero_grad_buffer()
        batches = [mixed_batch(CONFIG, step * GLOBAL_BATCH + k, MICRO_BATCH, seed=SEED)
                   for k in range(0, GLOBAL_BATCH, MICRO_BATCH)]
        forward_step = ForwardStep()
        result = forward_backward("1f1b", forward_step=forward_step, data_iterator=iter(batches),
                                  model=model, num_microbatches=len(batches), state=state,
                                  tensor_spec=spec, **model_grad_sync(model, state))
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(param_role(p).main_grad, alpha=LR)
        if state.is_last_stage:
            losses.append(result.loss.item())
            sums = sum(o.task_loss_sum for o in forward_step.outputs)
            counts = sum(o.task_num_tokens for o in forward_step.outputs)
            task_losses.append((sums / counts.clamp(min=1)).tolist())
    final = full_state_dict(stage)
    tied = None
    if pp > 1 and (state.is_first_stage or state.is_last_stage):
        w = stage.embedding.word.weight.detach()
        copies = [torch.empty_like(w) for _ in range(2)]
        torch.distributed.all_gather(copies, w, group=state.group("embedding"))
        tied = (copies[0] - copies[1]).abs().max().item()
    keep_weights = state.rank == 0
    return {"losses": losses if state.is_last_stage else None, "task_losses": task_losses,
            "init_diff": init_diff, "tied_diff": tied,
            "final": final if keep_weights else None, "initial": initial if keep_weights else None}


def _train_layouts(layouts, reference_init):
    return {layout: _train(*layout, reference_init=reference_init) for layout in layouts}


@pytest.fixture(scope="module")
def reference():
    (single,) = run_ranks(_train_layouts, 1, [(1, 1, "none")], None, torchrun_env=False)
    return single[(1, 1, "none")]


@pytest.fixture(scope="module")
def layouts(reference):
    merged = {}
    for world, layouts in LAYOUTS.items():
        per_rank = run_ranks(_train_layouts, world, layouts, reference["initial"])
        for layout in layouts:
            merged[layout] = [r[layout] for r in per_rank]
    return merged


CASES = [layout for layouts in LAYOUTS.values() for layout in layouts]


def test_reference_learns(reference):
    losses = reference["losses"]
    print("single-process losses:", losses)
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.05, losses          # the comparison below is not vacuous
    assert len(reference["task_losses"][0]) == 4


@pytest.mark.parametrize("tp,pp,recompute", CASES)
def test_layout_matches_single_process(reference, layouts, tp, pp, recompute):
    ranks = layouts[(tp, pp, recompute)]
    assert max(r["init_diff"] for r in ranks) == 0.0
    last = [r for r in ranks if r["losses"] is not None]
    assert len(last) == tp                                   # every last-stage rank reported
    rel = max(abs(g - w) / abs(w) for r in last for g, w in zip(r["losses"], reference["losses"]))
    print(f"tp={tp} pp={pp} {recompute}: max relative loss difference {rel:.2e}")
    for r in last:
        for step, (got, want) in enumerate(zip(r["losses"], reference["losses"], strict=True)):
            assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: {got} vs {want}"
        for got, want in zip(r["task_losses"], reference["task_losses"], strict=True):
            assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0), (got, want)
    final = ranks[0]["final"]
    worst = max(((final[k] - v).abs().max() / v.abs().max().clamp(min=1e-12)).item()
                for k, v in reference["final"].items())
    print(f"tp={tp} pp={pp} {recompute}: max relative weight difference after training {worst:.2e}")
    assert worst <= 1e-5, worst
    if pp > 1:
        tied = [r["tied_diff"] for r in ranks if r["tied_diff"] is not None]
        assert tied and max(tied) == 0.0, tied
