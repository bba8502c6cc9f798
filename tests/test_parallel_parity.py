"""The engine's core test: every (tp, pp, dp) layout trains the toy LM like one process.

The toy LM (tests/toy_lm.py: vocab-parallel embedding, column/row-parallel blocks, fused ops,
tied head, vocab-parallel cross entropy) takes 10 SGD steps on the same global batches; the global
mean loss of every step must match the single-process run to a relative 1e-5 (fp32) for both
schedules, and the first and last stage's copies of the tied embedding must stay identical.
One launch per world size runs all of its layouts.
"""

import pytest

from tests.distributed import init_state, run_ranks
from tests.toy_lm import ToyLMConfig, tied_copies_differ, train

STEPS, GLOBAL_BATCH, MICRO_BATCH, LR = 10, 8, 2, 0.5
SCHEDULES = ("1f1b", "gpipe")
LAYOUTS = {  # world size -> (tp, pp) layouts; dp = world / (tp * pp)
    2: [(2, 1), (1, 2), (1, 1)],
    4: [(1, 4), (2, 2)],
    8: [(2, 2)],
}


def _train_layouts(layouts):
    results = {}
    for tp, pp in layouts:
        for schedule in SCHEDULES if pp > 1 else SCHEDULES[:1]:
            state = init_state(tp, pp)
            run = train(ToyLMConfig(), state, schedule=schedule, steps=STEPS,
                        global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, lr=LR)
            key = (tp, pp, state.dp_size, schedule)
            results[key] = {"losses": run["losses"], "tied_diff": tied_copies_differ(run["model"], state)}
    return results


def _merge(rank_results):
    """Per layout: the losses reported by the last-stage ranks (all equal) and the tied diffs."""
    merged = {}
    for per_rank in rank_results:
        for key, r in per_rank.items():
            entry = merged.setdefault(key, {"losses": [], "tied_diff": []})
            if r["losses"] is not None:
                entry["losses"].append(r["losses"])
            if r["tied_diff"] is not None:
                entry["tied_diff"].append(r["tied_diff"])
    return merged


@pytest.fixture(scope="module")
def reference():
    (single,) = run_ranks(_train_layouts, 1, [(1, 1)], torchrun_env=False)
    return single[(1, 1, 1, "1f1b")]["losses"]


@pytest.fixture(scope="module")
def layouts():
    merged = {}
    for world, layouts in LAYOUTS.items():
        merged.update(_merge(run_ranks(_train_layouts, world, layouts)))
    return merged


CASES = [(tp, pp, world // (tp * pp), s) for world, ls in LAYOUTS.items() for tp, pp in ls
         for s in (SCHEDULES if pp > 1 else SCHEDULES[:1])]


def test_reference_loss_moves(reference):
    assert len(reference) == STEPS
    assert max(reference) - min(reference) > 1e-3, reference   # the comparison below is not vacuous


@pytest.mark.parametrize("tp,pp,dp,schedule", CASES)
def test_layout_matches_single_process(reference, layouts, tp, pp, dp, schedule):
    entry = layouts[(tp, pp, dp, schedule)]
    assert len(entry["losses"]) == tp * dp           # every last-stage rank reported
    for losses in entry["losses"]:
        assert len(losses) == STEPS
        for step, (got, want) in enumerate(zip(losses, reference)):
            assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: {got} vs {want}"
    if pp > 1:
        assert entry["tied_diff"] and max(entry["tied_diff"]) == 0.0, entry["tied_diff"]
