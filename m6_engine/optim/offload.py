"""ZeRO-Offload (``optimizer.offload: cpu``): the fp32 masters, Adam moments and AdamW step of this
rank's pieces live on the host; the device keeps only the (half-precision) weights and gradients.

Per owned piece k (``optim.mixed_precision``: a flat element range of one parameter) the host holds
master_k, m_k, v_k (fp32, 12 bytes per element) and a gradient buffer g_k (fp32, 4 bytes), and,
when the device is a GPU, a copy-out buffer w_k in the parameter dtype; g_k and w_k are pinned
there, so the copies are DMA transfers that overlap compute. One step:

- during backward, as each bucket's dp reduction finishes (``DataParallel.add_reduced_hook``), its
  pieces' gradients go device -> host (non-blocking, on a side stream on CUDA), overlapping the rest
  of backward. Pieces of parameters that ``parallel.grad_sync`` still changes after the dp
  reduction (sequence-parallel ones, summed over tp; tied ones, summed over the embedding group)
  are copied at the step instead, as is anything a hook did not reach;
- :meth:`HostAdamW.step` waits for the copies and runs, per piece, one ``m6::adamw_step_`` with
  ``grad_scale`` = clip coefficient / loss scale (unscaling and clipping folded into the op: the
  device gradients are read once, by the copy, and never rewritten), which writes the updated
  weights into w_k in the same pass; w_k -> the device parameter (non-blocking, so the next
  piece's host step overlaps it). Where the device *is* the CPU the op writes the parameter itself.

The DeepSpeed CPU-Adam design, with the op in ``csrc/optim`` (``m6_engine.ops.adamw_step``). The
interface is :class:`m6_engine.optim.adamw.AdamW`'s (``tensors``, ``moments``, ``load``,
``set_step``, ``state_tensors``), so checkpoints store the same pieces with and without offload.
"""

from dataclasses import dataclass

import torch

from m6_engine.ops.adamw_step import adamw_step_
from m6_engine.ops._extension import require_extension

BACKEND = "m6-cpu"
"""``MixedPrecisionOptimizer.adam_backend`` under offload."""


@dataclass(frozen=True)
class OffloadPiece:
    """What the host step needs of one owned piece on the device."""

    grad: torch.Tensor
    """The piece's dp-reduced fp32 gradient (a view of DataParallel's buffer)."""
    param: torch.Tensor
    """The piece's elements of the parameter (a flat view), written after the step."""
    bucket: int
    """DataParallel bucket holding it: its gradient is final when that bucket's reduction is."""
    late: bool
    """grad_sync changes the gradient after the dp reduction: copied at the step, not streamed."""
    weight_decay: float


def _host_empty(numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device="cpu", pin_memory=pinned)


class HostAdamW:
    """AdamW of host-resident fp32 masters for device pieces (module docstring).

    ``masters[k]`` (fp32, CPU, flat) is piece ``pieces[k]``'s master, updated in place.
    """

    backend = BACKEND

    def __init__(self, pieces: list[OffloadPiece], masters: list[torch.Tensor], *, betas=(0.9, 0.999),
                 eps: float = 1e-8):
        require_extension()      # the op is the point of offloading: never silently a slower path
        if len(pieces) != len(masters) or not masters:
            raise ValueError(f"HostAdamW needs one master per piece and at least one: got "
                             f"{len(masters)} masters for {len(pieces)} pieces")
        for k, (piece, master) in enumerate(zip(pieces, masters)):
            if master.device.type != "cpu" or master.dtype != torch.float32 or master.dim() != 1:
                raise ValueError(f"HostAdamW: master {k} must be a flat fp32 CPU tensor, got "
                                 f"{master.dtype} {tuple(master.shape)} on {master.device}")
            if piece.grad.numel() != master.numel() or piece.param.numel() != master.numel():
                raise ValueError(f"HostAdamW: piece {k} has {piece.grad.numel()} gradient and "
                                 f"{piece.param.numel()} parameter elements for {master.numel()} master ones")
        self.tensors = list(masters)
        self.pieces = list(pieces)
        self.betas, self.eps = tuple(betas), eps
        self._index = {id(m): k for k, m in enumerate(masters)}
        device = pieces[0].param.device
        self._on_device = device.type != "cpu"
        pinned = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if pinned else None
        # Allocated now, not at the first step: running out of host memory shows at start-up.
        self._moments = [(torch.zeros_like(m), torch.zeros_like(m)) for m in masters]
        self._host_grads = [_host_empty(m.numel(), torch.float32, pinned) for m in masters]
        self._copy_out = [_host_empty(m.numel(), p.param.dtype, pinned) if self._on_device else p.param
                          for m, p in zip(masters, pieces)]
        self._by_bucket: dict[int, list[int]] = {}
        for k, piece in enumerate(pieces):
            if not piece.late:
                self._by_bucket.setdefault(piece.bucket, []).append(k)
        self._copied: set[int] = set()
        self.step_count = 0
        self.last_copies = {"streamed": 0, "at_step": 0}
        """Pieces whose gradient the last step took from the backward-time stream / copied at the step."""

    # ----- gradients to the host ---------------------------------------------------------------

    def _copy_grad(self, k: int) -> None:
        source, target = self.pieces[k].grad, self._host_grads[k]
        if self._stream is None:
            target.copy_(source.view(-1))
            return
        # The gradient is complete in the compute stream's order: the side stream waits for it.
        self._stream.wait_stream(torch.cuda.current_stream(source.device))
        with torch.cuda.stream(self._stream):
            target.copy_(source.view(-1), non_blocking=True)

    def stream_bucket(self, bucket: int) -> None:
        """Copy the gradients of ``bucket``'s pieces to the host (DataParallel's reduced hook)."""
        for k in self._by_bucket.get(bucket, ()):
            self._copy_grad(k)
            self._copied.add(k)

    def discard(self) -> None:
        """Forget this step's copies (a skipped step): the next step streams afresh."""
        if self._stream is not None:
            self._stream.synchronize()
        self._copied.clear()

    # ----- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """One update of every master at ``lr``, with gradients multiplied by ``grad_scale``; the
        device parameters hold the updated weights when this returns."""
        streamed = len(self._copied)
        for k in range(len(self.pieces)):
            if k not in self._copied:
                self._copy_grad(k)
        if self._stream is not None:
            self._stream.synchronize()
        self.last_copies = {"streamed": streamed, "at_step": len(self.pieces) - streamed}
        self._copied.clear()
        self.step_count += 1
        for k, (master, piece) in enumerate(zip(self.tensors, self.pieces)):
            exp_avg, exp_avg_sq = self._moments[k]
            adamw_step_(master, exp_avg, exp_avg_sq, self._host_grads[k], lr=lr, betas=self.betas,
                        eps=self.eps, weight_decay=piece.weight_decay, step=self.step_count,
                        grad_scale=grad_scale, param_copy=self._copy_out[k])
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    piece.param.copy_(self._copy_out[k], non_blocking=True)
        if self._stream is not None:
            # The copy-out buffers are rewritten by the next step's host work: wait here (the next
            # forward needs the weights anyway).
            self._stream.synchronize()

    # ----- AdamW's state interface --------------------------------------------------------------

    def moments(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of master ``tensor``: the live host tensors."""
        return self._moments[self._index[id(tensor)]]

    def load(self, step: int, moments: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set the step count and every master's moments (copied), ``moments[k]`` for ``tensors[k]``."""
        if len(moments) != len(self.tensors):
            raise ValueError(f"{len(moments)} moment pairs for {len(self.tensors)} tensors")
        for k, ((exp_avg, exp_avg_sq), master) in enumerate(zip(moments, self.tensors)):
            if exp_avg.numel() != master.numel() or exp_avg_sq.numel() != master.numel():
                raise ValueError(f"moments of tensor {k} have {exp_avg.numel()} and {exp_avg_sq.numel()} "
                                 f"elements, expected {master.numel()}")
            self._moments[k][0].copy_(exp_avg.reshape(-1))
            self._moments[k][1].copy_(exp_avg_sq.reshape(-1))
        self.step_count = int(step)

    def set_step(self, step: int) -> None:
        self.step_count = int(step)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every moment tensor (two per master)."""
        return [t for pair in self._moments for t in pair]

    def host_bytes(self) -> int:
        """Host memory this rank's offloaded step holds: masters, moments, gradient and copy-out
        buffers (the last only when the device is not the CPU)."""
        tensors = self.tensors + self.state_tensors() + self._host_grads
        tensors += self._copy_out if self._on_device else []
        return sum(t.nbytes for t in tensors)
