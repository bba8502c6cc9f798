"""Point-to-point transfers between neighbouring pipeline stages over the pp group.

Activations flow forward (stage k -> k + 1), their gradients backward (k + 1 -> k). Every tensor
crossing a stage boundary has one shape and dtype, given by the caller (:class:`TensorSpec`, from
the model config): receive buffers are allocated from it and nothing about shapes is exchanged on
the fast path. Sends are checked against the spec locally (free), so a stage that produces the
wrong shape fails with :class:`P2PShapeError` instead of corrupting its neighbour's buffer (gloo
silently accepts a short message). With ``check_shapes=True`` each transfer is preceded by a small
metadata message, which also catches stages configured with different specs (a debugging aid).
All transfers of one step are posted together with ``batch_isend_irecv``.

Neighbours call matching operations, as the schedules do: ``send_forward`` / ``recv_forward``,
``send_forward_recv_backward`` / ``send_backward_recv_forward``, ``send_backward`` /
``recv_backward``. (With ``check_shapes`` this is required: each side completes the metadata
exchange of an operation before its payload, so an operation whose counterpart comes later would
wait for it.)
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from m6_engine.parallel.state import ParallelState

_MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class P2PShapeError(RuntimeError):
    """A tensor crossing a stage boundary does not match the configured shape or dtype."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of every activation (and gradient) crossing a stage boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if len(self.shape) > _MAX_DIMS or any(int(s) < 0 for s in self.shape):
            raise ValueError(f"TensorSpec: shape must have at most {_MAX_DIMS} non-negative dims, "
                             f"got {self.shape}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"TensorSpec: dtype must be one of {_DTYPES}, got {self.dtype}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))


def _describe(shape, dtype) -> str:
    return f"{tuple(shape)} {str(dtype).replace('torch.', '')}"


def _encode(spec_shape, dtype, device) -> torch.Tensor:
    meta = torch.full((_MAX_DIMS + 2,), -1, dtype=torch.int64)
    meta[0], meta[1] = len(spec_shape), _DTYPES.index(dtype)
    meta[2:2 + len(spec_shape)] = torch.tensor(spec_shape, dtype=torch.int64)
    return meta.to(device)


def _decode(meta: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    values = meta.tolist()
    return tuple(values[2:2 + values[0]]), _DTYPES[values[1]]


@dataclass(frozen=True)
class PipeChannel:
    """This stage's links to its neighbours for tensors of one :class:`TensorSpec`."""

    state: ParallelState
    spec: TensorSpec
    check_shapes: bool = False

    def _check_outgoing(self, tensor: torch.Tensor, what: str) -> None:
        if tuple(tensor.shape) != self.spec.shape or tensor.dtype != self.spec.dtype:
            raise P2PShapeError(
                f"pipeline stage {self.state.pp_rank} is sending a {what} of "
                f"{_describe(tensor.shape, tensor.dtype)}, but the pipeline is configured for "
                f"{_describe(self.spec.shape, self.spec.dtype)} (forward_backward's tensor_spec)")

    def _check_metadata(self, metas: dict[int, torch.Tensor], received_from: dict[int, str]) -> None:
        for peer, what in received_from.items():
            shape, dtype = _decode(metas[peer])
            if shape != self.spec.shape or dtype != self.spec.dtype:
                raise P2PShapeError(
                    f"pipeline stage {self.state.pp_rank} expects a {what} of "
                    f"{_describe(self.spec.shape, self.spec.dtype)} from rank {peer}, which is "
                    f"sending {_describe(shape, dtype)}: the stages disagree on the TensorSpec")

    def _post(self, sends: list[tuple[int, torch.Tensor]], recvs) -> None:
        """Post sends and receives ({peer: buffer} or [(peer, buffer)]) together, then wait for all."""
        group = self.state.group("pp")
        ops = [dist.P2POp(dist.isend, t, peer, group) for peer, t in sends]
        recvs = recvs.items() if isinstance(recvs, dict) else recvs
        ops += [dist.P2POp(dist.irecv, t, peer, group) for peer, t in recvs]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def exchange(self, *, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """Post the requested transfers together; returns (from_prev, from_next), None if not asked.

        ``send_next`` is an activation for the next stage, ``send_prev`` a gradient for the
        previous one; ``recv_prev`` receives an activation, ``recv_next`` a gradient.
        """
        st, spec = self.state, self.spec
        sends, recvs, what_from = {}, {}, {}
        if send_next is not None:
            self._check_outgoing(send_next, "forward activation")
            sends[st.next_stage_rank] = send_next.contiguous()
        if send_prev is not None:
            self._check_outgoing(send_prev, "backward gradient")
            sends[st.prev_stage_rank] = send_prev.contiguous()
        if recv_prev:
            what_from[st.prev_stage_rank] = "forward activation"
        if recv_next:
            what_from[st.next_stage_rank] = "backward gradient"
        for peer in what_from:
            recvs[peer] = torch.empty(spec.shape, dtype=spec.dtype, device=st.device)
        if self.check_shapes:
            metas = {peer: torch.empty(_MAX_DIMS + 2, dtype=torch.int64, device=st.device)
                     for peer in recvs}
            self._post([(peer, _encode(t.shape, t.dtype, st.device)) for peer, t in sends.items()],
                       metas)
            self._check_metadata(metas, what_from)
        self._post(list(sends.items()), recvs)
        from_prev = recvs.get(st.prev_stage_rank) if recv_prev else None
        from_next = recvs.get(st.next_stage_rank) if recv_next else None
        return from_prev, from_next

    def transfer(self, sends: list[tuple[int, torch.Tensor, str]],
                 recvs: list[tuple[int, str]]) -> list[torch.Tensor]:
        """Post sends of (pp rank, tensor, what) and receives from (pp rank, what) together, to
        and from any rank of the pp group (interleaved 1F1B's ring: the last rank sends to the
        first); returns the received tensors in the order asked. Between one pair of ranks, the
        sender's sends and the receiver's receives of one call must be listed in the same order."""
        st, spec = self.state, self.spec
        peer = lambda pp_rank: st.layout.rank_of(pp_rank, st.dp_rank, st.tp_rank)  # noqa: E731
        outgoing = []
        for pp_rank, tensor, what in sends:
            self._check_outgoing(tensor, what)
            outgoing.append((peer(pp_rank), tensor.contiguous()))
        buffers = [(peer(pp_rank), torch.empty(spec.shape, dtype=spec.dtype, device=st.device))
                   for pp_rank, _ in recvs]
        if self.check_shapes:
            metas = [(r, torch.empty(_MAX_DIMS + 2, dtype=torch.int64, device=st.device))
                     for r, _ in buffers]
            self._post([(r, _encode(t.shape, t.dtype, st.device)) for r, t in outgoing], metas)
            for (r, meta), (_, what) in zip(metas, recvs):
                self._check_metadata({r: meta}, {r: what})
        self._post(outgoing, buffers)
        return [t for _, t in buffers]

    # The four directions the schedules use; each is a no-op at the pipeline's ends.
    def recv_forward(self):
        return None if self.state.is_first_stage else self.exchange(recv_prev=True)[0]

    def send_forward(self, output: torch.Tensor) -> None:
        if not self.state.is_last_stage:
            self.exchange(send_next=output)

    def recv_backward(self):
        return None if self.state.is_last_stage else self.exchange(recv_next=True)[1]

    def send_backward(self, input_grad) -> None:
        if not self.state.is_first_stage:
            self.exchange(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor):
        if self.state.is_last_stage:
            return None
        return self.exchange(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad):
        if self.state.is_first_stage:
            return None
        return self.exchange(send_prev=input_grad, recv_prev=True)[0]
