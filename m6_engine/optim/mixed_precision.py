"""O2 mixed precision: half-precision model, fp32 master weights, loss scaling, AdamW, ZeRO-1/2.

The model's parameters have the training precision (fp16 / bf16; fp32 on the CPU). Their
gradients accumulate in the fp32 ``main_grad`` buffers of :class:`DataParallel`. The optimizer
keeps an fp32 master copy of what it updates (for fp32 parameters the master *is* the parameter)
and Adam's two fp32 moments. One :meth:`MixedPrecisionOptimizer.step`:

    g <- main_grad / loss_scale                          (this rank's pieces; fp32)
    ||g||, found_inf <- global norm and inf/NaN check     (one small all-reduce over "mp" [+ "dp"])
    if found_inf on any rank: every rank skips, the loss scaler backs off
    else: g <- g * min(1, clip / ||g||); AdamW on the masters at lr(step);
          params <- half(masters); with ZeRO-1 all-gather the params over dp

A *piece* is a flat element range of one parameter that this rank updates: the whole parameter
without sharding, the part inside this dp rank's shard with it (``optim.zero``). Masters, moments
and gradient views exist per piece (ZeRO-1 and ZeRO-2 own the same pieces; with ZeRO-2 the
gradient views point into the shard-only buffer, ``DataParallel.grad_piece``); the optimizer
state of a rank is 12 bytes per owned element (8 when the masters alias fp32 parameters).

The loss must be multiplied by ``loss_scale`` before backward (:meth:`scale_loss`); gradients
then carry the factor, which ``step`` removes. Only fp16 uses a scale other than 1.

ZeRO-Offload (``config.offload == "cpu"``, ``optim.offload``): the masters and moments of the
pieces live on the host and the update runs there (``m6::adamw_step_``); the gradients, streamed
to the host during backward, are never rewritten on the device: the norm is taken of the scaled
gradients and divided by the scale, and unscaling and clipping become the host op's grad_scale.
"""

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from m6_engine.optim.adamw import AdamW, decays
from m6_engine.optim.clip import clip_coefficient, clip_grads_, counts_in_norm, global_grad_norm
from m6_engine.config import OptimizerConfig
from m6_engine.optim.loss_scaler import make_loss_scaler
from m6_engine.optim.lr_schedule import LRSchedule
from m6_engine.optim.offload import HostAdamW, OffloadPiece
from m6_engine.optim.zero import ParamBuffer, gather_pieces
from m6_engine.parallel.data_parallel import DataParallel, grad_reduce_for
from m6_engine.parallel.roles import param_role
from m6_engine.parallel.state import ParallelState

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class StepStats:
    """What one step did, for logging."""

    skipped: bool
    """True when a non-finite gradient on some rank made every rank skip the update."""
    grad_norm: float
    """Global gradient 2-norm after unscaling, before clipping (NaN when skipped)."""
    lr: float
    """The learning rate of this update (the one it would have had, when skipped)."""
    loss_scale: float
    """The scale this step's gradients were computed with."""
    clip_coefficient: float
    """Factor the gradients were multiplied by to clip them (1.0 when not clipped)."""


class MixedPrecisionOptimizer:
    """AdamW with fp32 master weights for a :class:`DataParallel`-wrapped model stage.

    ``total_steps`` is the length of the learning-rate schedule. With
    ``config.zero_stage >= 1`` the model must be wrapped with the ``grad_reduce`` of that stage
    (``parallel.grad_reduce_for``: "reduce_scatter" for 1, "reduce_scatter_shard" for 2; the
    default all-reduce for 0), and every parameter must have one dtype.
    Collective: every rank of the job constructs one and calls :meth:`step` together.
    """

    def __init__(self, model: DataParallel, config: OptimizerConfig, state: ParallelState, *,
                 total_steps: int):
        if not isinstance(model, DataParallel):
            raise TypeError(f"MixedPrecisionOptimizer needs the DataParallel-wrapped stage (its fp32 "
                            f"main_grad buffers), got {type(model).__name__}")
        self.sharded = config.zero_stage >= 1
        wanted = grad_reduce_for(config.zero_stage)
        if model.grad_reduce != wanted:
            raise ValueError(f"zero_stage={config.zero_stage} needs DataParallel(..., "
                             f"grad_reduce={wanted!r}), the model has {model.grad_reduce!r}")
        if (config.zero_stage == 3) != (model.sharded_params is not None):
            raise ValueError(f"zero_stage={config.zero_stage}: the model must be wrapped "
                             f"{'with' if config.zero_stage == 3 else 'without'} param_units "
                             "(sharded parameters); use parallel.data_parallel_options")
        wrong = sorted({str(p.dtype) for p in model.params if p.dtype != config.param_dtype})
        if wrong:
            raise ValueError(f"precision {config.precision!r} needs {config.param_dtype} parameters, "
                             f"the model has {wrong}: cast the stage before wrapping it")
        self.model, self.config, self.state = model, config, state
        self.offload = config.offload == "cpu"
        self.scaler = make_loss_scaler(config)
        self.schedule = LRSchedule.from_config(config, total_steps)
        self.iterations = self.steps = self.skipped_steps = self.lr_position = 0
        # ZeRO-1/2 all-gather the updated parameters after a step; ZeRO-3 keeps them sharded
        # (each layer is gathered when it runs).
        self._param_buffer = ParamBuffer(model) if self.sharded and model.sharded_params is None else None
        self._build_pieces()

    def _build_pieces(self) -> None:
        model = self.model
        # What the model's reduction leaves valid: owned pieces under ZeRO, whole parameters without.
        self._pieces = model.reduced_pieces()
        params = model.params
        sharded_params = model.sharded_params
        self._param_views = [params[i].detach().view(-1)[lo:hi] if sharded_params is None
                             else sharded_params.param_piece(i, lo, hi) for i, lo, hi in self._pieces]
        # Views of the buffer that holds gradients between steps (with ZeRO-2 only the shards).
        self._grads = [model.grad_piece(i, lo, hi) for i, lo, hi in self._pieces]
        self._counted = [counts_in_norm(params[i], self.state) for i, _, _ in self._pieces]
        decay = [decays(params[i]) for i, _, _ in self._pieces]
        if self.offload:
            self._build_offloaded(decay)
            return
        self._copy_back = self.config.param_dtype != torch.float32
        # fp32 parameters are their own masters (the views above are leaves sharing their storage).
        self._masters = [v.float().clone() if self._copy_back else v for v in self._param_views]
        for master, grad in zip(self._masters, self._grads):
            master.grad = grad
        groups = [([m for m, d in zip(self._masters, decay) if d], self.config.weight_decay),
                  ([m for m, d in zip(self._masters, decay) if not d], 0.0)]
        self._adam = (AdamW(groups, betas=self.config.betas, eps=self.config.eps,
                            backend=self.config.adam_backend) if self._masters else None)

    def _build_offloaded(self, decay: list[bool]) -> None:
        """ZeRO-Offload (``optim.offload``): host masters and the host step, fed by gradients the
        model streams to the host as its buckets finish reducing."""
        model, params = self.model, self.model.params
        self._copy_back = True           # the masters are never the parameters
        self._masters = [v.detach().to("cpu", torch.float32, copy=True).view(-1) for v in self._param_views]
        # grad_sync sums these over tp / the embedding group after the dp reduction.
        tied_summed = len(self.state.group_ranks("embedding")) > 1
        late = [param_role(params[i]).sequence_parallel or (tied_summed and param_role(params[i]).tied_across_stages)
                for i, _, _ in self._pieces]
        pieces = [OffloadPiece(grad=g.view(-1), param=v.view(-1), bucket=model.bucket_of(i), late=lt,
                               weight_decay=self.config.weight_decay if d else 0.0)
                  for (i, _, _), g, v, lt, d in zip(self._pieces, self._grads, self._param_views, late, decay)]
        self._adam = (HostAdamW(pieces, self._masters, betas=self.config.betas, eps=self.config.eps)
                      if pieces else None)
        if self._adam is not None:
            adam = weakref.ref(self._adam)     # a replaced optimizer stops streaming

            def stream(bucket: int) -> None:
                live = adam()
                if live is not None:
                    live.stream_bucket(bucket)

            model.add_reduced_hook(stream)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    @property
    def adam_backend(self) -> str | None:
        """The AdamW kernel in use (None on a rank that owns no element)."""
        return None if self._adam is None else self._adam.backend

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * loss_scale: backpropagate this one."""
        return loss * self.scaler.scale

    def zero_grad(self) -> None:
        """Zero the gradient buffers before the first backward of a step."""
        self.model.zero_grad_buffer()

    def step(self) -> StepStats:
        """Unscale, check, clip and apply this step's gradients (see the module doc); collective."""
        scale = self.scaler.scale
        self.iterations += 1
        if self.offload:
            return self._offloaded_step(scale)
        if scale != 1.0 and self._grads:
            torch._foreach_mul_(self._grads, 1.0 / scale)
        norm, found_inf = global_grad_norm(self._grads, self._counted, self.state, sharded=self.sharded)
        lr = self.schedule.lr(self.lr_position)
        self.scaler.update(found_inf)
        if found_inf:
            self.skipped_steps += 1
            return StepStats(True, norm, lr, scale, 1.0)
        coefficient = clip_grads_(self._grads, self.config.clip_grad, norm)
        if self._adam is not None:
            self._adam.step(lr)
        self.steps += 1
        self.lr_position += 1
        if self._copy_back and self._masters:
            torch._foreach_copy_(self._param_views, self._masters)
        if self._param_buffer is not None:
            self._param_buffer.all_gather()
        return StepStats(False, norm, lr, scale, coefficient)

    def _offloaded_step(self, scale: float) -> StepStats:
        """The step with ZeRO-Offload: the norm of the still-scaled device gradients (divided by
        the scale), then the host step with unscaling and clipping folded into its grad_scale."""
        norm, found_inf = global_grad_norm(self._grads, self._counted, self.state, sharded=self.sharded)
        norm /= scale
        lr = self.schedule.lr(self.lr_position)
        self.scaler.update(found_inf)
        if found_inf:
            self.skipped_steps += 1
            if self._adam is not None:
                self._adam.discard()
            return StepStats(True, norm, lr, scale, 1.0)
        coefficient = clip_coefficient(self.config.clip_grad, norm)
        if self._adam is not None:
            self._adam.step(lr, grad_scale=coefficient / scale)
        self.steps += 1
        self.lr_position += 1
        if self._param_buffer is not None:
            self._param_buffer.all_gather()
        return StepStats(False, norm, lr, scale, coefficient)

    @property
    def host_copies(self) -> dict | None:
        """With offload, how the last step's gradients reached the host: {"streamed": pieces
        copied during backward, "at_step": pieces copied by the step}; else None."""
        return self._adam.last_copies if self.offload and self._adam is not None else None

    def host_state_bytes(self) -> int:
        """Host memory of the offloaded optimizer (0 without offload; ``HostAdamW.host_bytes``)."""
        return self._adam.host_bytes() if self.offload and self._adam is not None else 0

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: masters that are not the parameters themselves,
        plus Adam's moments (summed tensor nbytes)."""
        tensors = list(self._masters) if self._copy_back else []
        tensors += [] if self._adam is None else self._adam.state_tensors()
        return sum(t.nbytes for t in tensors)

    # ----- checkpoint contract ---------------------------------------------------------------

    def _indices(self, named_params) -> list[tuple[str, int]]:
        """(name, index into model.params) for every named parameter; all must be covered.
        ``named_params``: a {name: parameter} mapping or (name, parameter) pairs; a parameter
        listed under several names is taken under its first."""
        if isinstance(named_params, Mapping):
            named_params = named_params.items()
        position = {id(p): i for i, p in enumerate(self.model.params)}
        pairs, seen = [], set()
        for name, p in named_params:
            if id(p) not in position:
                raise KeyError(f"parameter {name!r} is not one this optimizer updates")
            if id(p) not in seen:
                pairs.append((name, position[id(p)]))
                seen.add(id(p))
        if len(seen) != len(position):
            raise KeyError(f"{len(position) - len(seen)} of the optimizer's parameters have no name "
                           "in named_params; pass model.named_parameters()")
        return pairs

    def _piece_values(self) -> dict[str, list[torch.Tensor]]:
        moments = [self._adam.moments(m) for m in self._masters] if self._adam else []
        return {"master": list(self._masters), "exp_avg": [m for m, _ in moments],
                "exp_avg_sq": [v for _, v in moments]}

    def param_states(self, named_params) -> dict[str, dict[str, torch.Tensor]]:
        """{name: {"master", "exp_avg", "exp_avg_sq"}}: fp32 tensors shaped like the (local tp
        shard of the) parameter, fresh copies, for inspection and comparisons (checkpoints save
        :meth:`state_pieces` instead, and never gather). With ZeRO-1 collective on "dp"
        (all-gathers)."""
        pairs = self._indices(named_params)
        values = self._piece_values()
        if self.sharded:
            full = {k: gather_pieces(self.model, self._pieces, values[k]) for k in STATE_KEYS}
        else:  # pieces are whole parameters, in model.params order
            full = {k: [v.detach().clone() for v in values[k]] for k in STATE_KEYS}
        params = self.model.params
        return {name: {k: full[k][i].view(params[i].shape) for k in STATE_KEYS} for name, i in pairs}

    def state_pieces(self, named_params) -> dict[str, list[tuple[int, int, dict[str, torch.Tensor]]]]:
        """{name: [(first, end, {"master" | "exp_avg" | "exp_avg_sq": fp32 tensor of end - first
        elements}), ...]}: the flat element ranges of the (local tp shard of the) parameter that
        this rank updates, in order, with their live state tensors (no copies, no communication).
        With ZeRO-1 these are this dp rank's pieces only, without it whole parameters: what a
        checkpoint saves and loads (``m6_engine.checkpoint.optimizer_state``)."""
        pairs = self._indices(named_params)
        name_of = {i: name for name, i in pairs}
        values = self._piece_values()
        pieces = {}
        for k, (i, lo, hi) in enumerate(self._pieces):
            pieces.setdefault(name_of[i], []).append((lo, hi, {key: values[key][k] for key in STATE_KEYS}))
        return pieces

    def load_state_pieces(self, named_params, pieces: dict) -> None:
        """Inverse of :meth:`state_pieces` (the same names and ranges, tensors copied): sets the
        masters and moments of this rank's pieces, then the parameters from the masters
        (all-gathered over dp with ZeRO-1: collective)."""
        mine = self.state_pieces(named_params)
        masters, moments = {}, {}
        for name, ranges in mine.items():
            given = pieces.get(name, [])
            if [(lo, hi) for lo, hi, _ in given] != [(lo, hi) for lo, hi, _ in ranges]:
                raise ValueError(f"pieces[{name!r}] cover {[(lo, hi) for lo, hi, _ in given]}, this "
                                 f"rank owns {[(lo, hi) for lo, hi, _ in ranges]}")
            for (_, _, live), (_, _, new) in zip(ranges, given):
                masters[id(live["master"])] = new["master"]
                moments[id(live["master"])] = (new["exp_avg"], new["exp_avg_sq"])
        with torch.no_grad():
            for master in self._masters:
                master.copy_(masters[id(master)])
            if self.offload:      # host masters -> device parameters, one copy per piece
                for view, master in zip(self._param_views, self._masters):
                    view.copy_(master)
            elif self._copy_back and self._masters:
                torch._foreach_copy_(self._param_views, self._masters)
        if self._adam is not None:
            self._adam.load(self.steps, [moments[id(t)] for t in self._adam.tensors])
        if self._param_buffer is not None:
            self._param_buffer.all_gather()

    def scalar_state(self) -> dict:
        """Counters, loss-scaler state and the schedule position as plain Python numbers.

        ``steps``: updates applied (Adam's step count); ``lr_position``: the schedule's position
        (advances with ``steps``); ``iterations``: calls to step, skipped ones included.
        """
        scaler = {f"loss_scaler.{k}": v for k, v in self.scaler.state_dict().items()}
        return {"iterations": self.iterations, "steps": self.steps, "skipped_steps": self.skipped_steps,
                "lr_position": self.lr_position, **scaler}

    def load_scalar_state(self, scalars: dict) -> None:
        """Inverse of :meth:`scalar_state`."""
        missing = {"iterations", "steps", "skipped_steps", "lr_position"} - set(scalars)
        if missing:
            raise KeyError(f"scalar optimizer state lacks {sorted(missing)}")
        self.iterations, self.steps = int(scalars["iterations"]), int(scalars["steps"])
        self.skipped_steps, self.lr_position = int(scalars["skipped_steps"]), int(scalars["lr_position"])
        prefix = "loss_scaler."
        self.scaler.load_state_dict({k[len(prefix):]: v for k, v in scalars.items()
                                     if k.startswith(prefix)})
        if self._adam is not None:
            self._adam.set_step(self.steps)
