"""A background loader: a thread builds the next micro-batches while the step computes.

:class:`PrefetchingLoader` wraps a micro-batch iterator (``PretrainDataset``): one daemon thread
calls ``next(source)`` up to ``depth`` micro-batches ahead (pinning their tensors when the step
runs on a GPU, so the copy to the device can be asynchronous) and, for a source with a
``state_dict``, records the source's state right after each micro-batch. The loader's own
``state_dict`` is the state after the last micro-batch *consumed*, so a checkpoint resumes exactly
where training was, not where the thread had got to; ``load_state_dict`` stops the thread, drops
what it had built, repositions the source and starts again. The order of micro-batches is the
source's: only the time they are built changes. ``wait_seconds`` adds up how long the consumer
waited for one (the step's data wait; ~0 when the thread keeps ahead).

The source must not use torch's global RNG (the dataset draws from its own numpy generators),
since the thread runs concurrently with the step's dropout.
"""

import dataclasses
import queue
import threading
import time

import torch

_END = object()


def pinned(batch):
    """``batch`` (a MicroBatch) with every tensor in pinned host memory."""
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dataclasses.replace(batch, **{k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                                         for k, v in fields.items()})


class PrefetchingLoader:
    """Iterator over ``source``'s micro-batches, built ``depth`` ahead by a thread (module doc)."""

    def __init__(self, source, *, depth: int = 2, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"PrefetchingLoader: depth must be >= 1, got {depth}")
        self.source, self.depth, self.pin_memory = source, depth, pin_memory
        self.wait_seconds = 0.0
        self._has_state = hasattr(source, "state_dict")
        self._state = source.state_dict() if self._has_state else None
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="m6-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = next(self.source)
                except StopIteration:
                    self._put((_END, None))
                    return
                if self.pin_memory:
                    batch = pinned(batch)
                state = self.source.state_dict() if self._has_state else None
                if not self._put((batch, state)):
                    return
        except BaseException as error:  # noqa: BLE001 -- handed to the consumer, raised there
            self._put((error, None))

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        start = time.perf_counter()
        item, state = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._state = state
        return item

    def state_dict(self) -> dict:
        """The source's state after the last micro-batch this loader returned."""
        if not self._has_state:
            raise AttributeError(f"{type(self.source).__name__} has no state_dict")
        return self._state

    def load_state_dict(self, state: dict) -> None:
        """Reposition the source (the thread's micro-batches built ahead are dropped)."""
        self.close()
        self.source.load_state_dict(state)
        self._state = self.source.state_dict()
        self._start()

    def close(self) -> None:
        """Stop the thread (it finishes the micro-batch it is building)."""
        self._stop.set()
        self._thread.join()
