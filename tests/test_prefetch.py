"""The background loader: the source's micro-batches in the source's order, a state that is the
consumed position (not the thread's), repositioning, the end and errors of the source, the wait."""

import time

import pytest
import torch

from m6_engine.data.batch import MicroBatch
from m6_engine.data.prefetch import PrefetchingLoader


class Counting:
    """A source of numbered micro-batches with a position state, ending after ``stop``."""

    def __init__(self, stop=100, fail_at=None, delay=0.0):
        self.position, self.stop, self.fail_at, self.delay = 0, stop, fail_at, delay
        self.built = 0

    def __next__(self):
        if self.position == self.fail_at:
            raise ValueError(f"bad sample {self.position}")
        if self.position >= self.stop:
            raise StopIteration
        time.sleep(self.delay)
        value = self.position
        self.position += 1
        self.built += 1
        zeros = torch.zeros(1, 4, dtype=torch.int64)
        return MicroBatch(tokens=zeros + value, position_ids=zeros, prefix_len=torch.ones(1, dtype=torch.int64),
                          valid_len=torch.full((1,), 4))

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _value(batch):
    return int(batch.tokens[0, 0])


def test_same_order_and_the_consumed_state():
    source = Counting()
    loader = PrefetchingLoader(source, depth=3)
    assert loader.state_dict() == {"position": 0}
    assert [_value(next(loader)) for _ in range(5)] == [0, 1, 2, 3, 4]
    deadline = time.monotonic() + 5
    while source.built < 8 and time.monotonic() < deadline:   # the thread runs ahead
        time.sleep(0.01)
    time.sleep(0.05)
    assert source.built in (8, 9)     # 5 consumed + depth 3 queued (+ 1 waiting for a free slot)
    assert loader.state_dict() == {"position": 5}              # what a checkpoint must record
    loader.close()


def test_reposition_drops_what_was_built_ahead():
    loader = PrefetchingLoader(Counting(), depth=2)
    [next(loader) for _ in range(3)]
    loader.load_state_dict({"position": 40})
    assert loader.state_dict() == {"position": 40}
    assert [_value(next(loader)) for _ in range(3)] == [40, 41, 42]
    loader.close()


def test_end_and_errors_of_the_source_reach_the_consumer():
    loader = PrefetchingLoader(Counting(stop=2))
    assert [_value(b) for b in loader] == [0, 1]
    with pytest.raises(StopIteration):
        next(loader)
    failing = PrefetchingLoader(Counting(fail_at=1))
    next(failing)
    with pytest.raises(ValueError, match="bad sample 1"):
        next(failing)


def test_the_wait_is_measured_and_small_when_ahead():
    loader = PrefetchingLoader(Counting(delay=0.05), depth=2)
    next(loader)
    assert loader.wait_seconds >= 0.03                         # the first one is waited for
    time.sleep(0.3)                                            # the thread fills its queue
    waited = loader.wait_seconds
    next(loader), next(loader)
    assert loader.wait_seconds - waited < 0.03
    loader.close()


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        PrefetchingLoader(Counting(), depth=0)
