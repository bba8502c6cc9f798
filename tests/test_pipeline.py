"""Pipeline p2p and schedules: transfers, live activations of 1F1B vs GPipe, errors that do not hang."""

import contextlib
import itertools
import time

import pytest
import torch
import torch.distributed as dist

from m6_engine.parallel import (
    P2PShapeError, PipeChannel, TensorSpec, forward_backward, initialize, model_grad_sync,
)
from tests.distributed import Checks, RankFailure, assert_checks, init_state, run_ranks
from tests.toy_lm import ToyLMConfig, ToyLMStage, forward_step, microbatches, ops_for_tests

CFG = ToyLMConfig(layers=4)
MICRO_BATCH = 2
SPEC = TensorSpec((MICRO_BATCH, CFG.seq_len, CFG.hidden))


class LiveActivations:
    """Counts micro-batches that have tensors saved for backward, via saved-tensor hooks.

    Each saved tensor is wrapped in a holder that autograd keeps until the graph frees it (after
    that micro-batch's backward); the peak is taken whenever something is saved.
    """

    def __init__(self):
        self.per_microbatch: dict[int, int] = {}
        self.peak = 0

    def hooks(self, microbatch_id: int):
        tracker = self

        class Held:
            def __init__(self, tensor):
                self.tensor = tensor
                tracker.per_microbatch[microbatch_id] = tracker.per_microbatch.get(microbatch_id, 0) + 1
                tracker.peak = max(tracker.peak, sum(1 for n in tracker.per_microbatch.values() if n))

            def __del__(self):
                tracker.per_microbatch[microbatch_id] -= 1

        return Held, lambda held: held.tensor


def _instrumented_step(live, outputs):
    ids = itertools.count()

    def step(data_iterator, model, input_tensor):
        with torch.autograd.graph.saved_tensors_hooks(*live.hooks(next(ids))):
            out = forward_step(data_iterator, model, input_tensor)
        outputs.append(out)
        return out

    return step


def _run_instrumented(state, stage, schedule, m):
    live, outputs = LiveActivations(), []
    batches = microbatches(CFG, 0, m * MICRO_BATCH, MICRO_BATCH)
    result = forward_backward(schedule, forward_step=_instrumented_step(live, outputs),
                              data_iterator=iter(batches), model=stage, num_microbatches=m,
                              state=state, tensor_spec=SPEC, **model_grad_sync(stage, state))
    released = [o.untyped_storage().nbytes() <= o.element_size() for o in outputs]
    return {"live_peak": live.peak, "schedule_peak": result.peak_live_microbatches,
            "released": all(released) if not state.is_last_stage else None,
            "all_freed": sum(live.per_microbatch.values()) == 0, "losses": result.losses,
            "timers": result.timers}


def _check_forward_only(state, stage, train_losses):
    batches = microbatches(CFG, 0, 4 * MICRO_BATCH, MICRO_BATCH)
    for p in stage.parameters():
        p.grad = None
    for schedule in ("1f1b", "gpipe"):
        result = forward_backward(schedule, forward_step=forward_step, data_iterator=iter(batches),
                                  model=stage, num_microbatches=4, state=state, tensor_spec=SPEC,
                                  forward_only=True)
        assert result.peak_live_microbatches == 0
        assert all(p.grad is None for p in stage.parameters())
        if state.is_last_stage:
            assert [x.item() for x in result.losses] == [x.item() for x in train_losses], schedule


def _check_schedules_with_shape_checks(state, stage, train_losses):
    """The debug metadata exchange runs through both schedules without changing the result."""
    batches = microbatches(CFG, 0, 4 * MICRO_BATCH, MICRO_BATCH)
    for schedule in ("1f1b", "gpipe"):
        result = forward_backward(schedule, forward_step=forward_step, data_iterator=iter(batches),
                                  model=stage, num_microbatches=4, state=state, tensor_spec=SPEC,
                                  check_shapes=True, **model_grad_sync(stage, state))
        if state.is_last_stage:
            assert [x.item() for x in result.losses] == [x.item() for x in train_losses], schedule


def _ranks_pipeline_4():
    state = init_state(tp=1, pp=4)
    stage = ToyLMStage(CFG, state, ops_for_tests())
    out = {}
    for schedule in ("1f1b", "gpipe"):
        for m in (6, 2):
            out[(schedule, m)] = _run_instrumented(state, stage, schedule, m)
    checks = Checks()
    train_losses = _run_instrumented(state, stage, "1f1b", 4)["losses"]
    checks.run("forward_only", _check_forward_only, state, stage, train_losses)
    checks.run("check_shapes", _check_schedules_with_shape_checks, state, stage, train_losses)
    out["checks"] = checks.results
    return out


@pytest.fixture(scope="module")
def pipeline_4():
    return run_ranks(_ranks_pipeline_4, 4)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("m", [6, 2])
def test_live_microbatch_activations(pipeline_4, schedule, m):
    pp = 4
    for stage_id, results in enumerate(pipeline_4):
        r = results[(schedule, m)]
        expected = min(pp - stage_id, m) if schedule == "1f1b" else m
        assert r["live_peak"] == expected, (stage_id, r["live_peak"], expected)
        assert r["schedule_peak"] == expected, (stage_id, r["schedule_peak"], expected)
        assert r["all_freed"], stage_id
        if stage_id < pp - 1:
            assert r["released"], f"stage {stage_id} kept the storage of a sent activation"


def test_schedule_timers(pipeline_4):
    for results in pipeline_4:
        t = results[("1f1b", 6)]["timers"]
        assert t.forward_s > 0 and t.backward_s > 0 and t.total_s >= t.busy_s + t.p2p_s
        assert 0.0 < t.bubble_fraction < 1.0


@pytest.mark.parametrize("name", ["forward_only", "check_shapes"])
def test_schedule_modes(pipeline_4, name):
    assert_checks([r["checks"] for r in pipeline_4], name)


def _check_round_trip(state, check_shapes):
    """Each call on stage 0 is matched by its counterpart on stage 1, as in the schedules."""
    channel = PipeChannel(state, TensorSpec((3, 5)), check_shapes=check_shapes)
    a = torch.arange(15.0).view(3, 5)
    if state.is_first_stage:
        assert channel.recv_forward() is None and channel.send_backward_recv_forward(a) is None
        channel.send_forward(a)
        assert torch.equal(channel.send_forward_recv_backward(a * 2), -a)
        assert torch.equal(channel.recv_backward(), a + 1)
    else:
        assert channel.recv_backward() is None and channel.send_forward_recv_backward(a) is None
        assert torch.equal(channel.recv_forward(), a)
        assert torch.equal(channel.send_backward_recv_forward(-a), a * 2)
        channel.send_backward(a + 1)


def _check_sender_shape(state):
    channel = PipeChannel(state, TensorSpec((3, 5)))
    if state.is_first_stage:
        try:
            channel.send_forward(torch.zeros(3, 4))
        except P2PShapeError as error:
            assert "sending a forward activation of (3, 4) float32" in str(error), str(error)
            assert "configured for (3, 5) float32 (forward_backward's tensor_spec)" in str(error), str(error)
        else:
            raise AssertionError("a wrongly shaped send was not refused")


def _ranks_p2p_2():
    state = init_state(tp=1, pp=2)
    checks = Checks()
    checks.run("round trip", _check_round_trip, state, False)
    checks.run("round trip with shape check", _check_round_trip, state, True)
    checks.run("sender shape", _check_sender_shape, state)
    dist.barrier()
    return checks.results


@pytest.fixture(scope="module")
def p2p_2():
    return run_ranks(_ranks_p2p_2, 2)


@pytest.mark.parametrize("name", ["round trip", "round trip with shape check", "sender shape"])
def test_p2p(p2p_2, name):
    assert_checks(p2p_2, name)


def _ranks_wrong_stage_output():
    """Stage 0's forward_step returns the wrong shape inside a real 1F1B step."""
    state = init_state(tp=1, pp=2)

    def step(data_iterator, model, input_tensor):
        next(data_iterator)
        if state.is_first_stage:
            return torch.zeros(2, 3, requires_grad=True) * 1.0
        return input_tensor.sum()

    forward_backward("1f1b", forward_step=step, data_iterator=iter(range(4)), model=torch.nn.Module(),
                     num_microbatches=4, state=state, tensor_spec=TensorSpec((2, 4)),
                     finalize_grads=lambda: None, no_sync=contextlib.nullcontext)


def _ranks_disagreeing_specs():
    """The stages are configured with different activation shapes; check_shapes catches it."""
    state = init_state(tp=1, pp=2)
    shape = (2, 4) if state.is_first_stage else (2, 5)
    channel = PipeChannel(state, TensorSpec(shape), check_shapes=True)
    if state.is_first_stage:
        channel.send_forward(torch.zeros(shape))
    else:
        channel.recv_forward()


def _ranks_missing_peer():
    """Stage 1 waits for an activation stage 0 never sends: the group timeout ends the wait."""
    state = initialize(1, 2, backend="gloo", timeout=3.0)
    if state.is_first_stage:
        time.sleep(15)   # alive but silent
    else:
        PipeChannel(state, TensorSpec((4,))).recv_forward()


@pytest.mark.parametrize("fn,failing_rank,message", [
    (_ranks_wrong_stage_output, 0, "P2PShapeError: pipeline stage 0 is sending a forward activation of (2, 3)"),
    (_ranks_disagreeing_specs, 1, "P2PShapeError: pipeline stage 1 expects a forward activation of (2, 5)"),
    (_ranks_missing_peer, 1, "imed out"),
])
def test_pipeline_errors_do_not_hang(fn, failing_rank, message):
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_ranks(fn, 2, timeout_s=30)
    assert f"rank {failing_rank} of 2 raised" in str(failure.value), str(failure.value)
    assert message in str(failure.value), str(failure.value)
    assert time.monotonic() - start < 25


def test_forward_backward_argument_errors():
    state = type("Stages", (), {"pp_size": 2})()
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        forward_backward("zb", forward_step=None, data_iterator=None, model=None,
                         num_microbatches=1, state=state)
    with pytest.raises(ValueError, match="num_microbatches must be an integer >= 1"):
        forward_backward("1f1b", forward_step=None, data_iterator=None, model=None,
                         num_microbatches=0, state=state)
    with pytest.raises(ValueError, match="tensor_spec .* is required"):
        forward_backward("1f1b", forward_step=None, data_iterator=None, model=None,
                         num_microbatches=2, state=state)
    # Who reduces the gradients is the caller's to say; a training step without it is refused.
    one_stage = type("Stage", (), {"pp_size": 1})()
    with pytest.raises(ValueError, match="a training step needs finalize_grads and no_sync"):
        forward_backward("1f1b", forward_step=None, data_iterator=None, model=None,
                         num_microbatches=2, state=one_stage, finalize_grads=lambda: None)


def test_the_caller_owns_the_gradient_reduction():
    """no_sync wraps every backward but the last; finalize_grads runs once, after the last one."""
    state = type("OneStage", (), {"pp_size": 1, "is_last_stage": True, "device": torch.device("cpu")})()
    weight = torch.nn.Parameter(torch.ones(()))
    events = []

    @contextlib.contextmanager
    def no_sync():
        events.append("no_sync")
        yield

    def forward_step(data_iterator, model, input_tensor):
        return weight * next(data_iterator)

    def finalize():
        events.append(("finalize", weight.grad.item()))

    result = forward_backward("1f1b", forward_step=forward_step, data_iterator=iter([1.0, 2.0, 3.0, 6.0]),
                              model=None, num_microbatches=4, state=state, finalize_grads=finalize,
                              no_sync=no_sync)
    assert events == ["no_sync"] * 3 + [("finalize", 3.0)]   # mean of 1, 2, 3, 6: every backward done
    assert result.timers.grad_sync_s >= 0 and len(result.losses) == 4
