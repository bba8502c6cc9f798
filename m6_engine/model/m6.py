"""M6Model: the layers of one pipeline stage of M6 (paper 3.2), tensor-parallel inside.

Stage ``k`` of ``pp`` holds the contiguous blocks :func:`stage_layer_range` gives it (earlier
stages take the remainder); the first stage also the input embedding (``embedding.*``), the last
the final LayerNorm (``final_ln.*``) and the output head, tied to the word embedding. Blocks live
in ``layers`` keyed by their *global* index, so parameter names (``layers.7.mlp.fc1.weight``) do
not depend on pp. With pp > 1 the last stage holds a copy of the word embedding under the first
stage's name, ``embedding.word.weight``, marked tied (``m6_engine.parallel.tied``): a checkpoint
stores it once and loads it into both; both copies are drawn from the same generator, so they
start equal without communication.

Last stage, per micro-batch (``loss_mask`` selects the N complete-text tokens that carry a loss):

    logits_r = final_ln(h)[loss tokens] E_r^T                    (N, V/t), vocab-parallel
    loss_n   = vocab_parallel_cross_entropy(logits, labels)      (N,) fp32
    loss     = sum_n w_n loss_n / max(sum_n w_n, 1)              w = loss_mask (0 / 1)

Logits are computed for the loss tokens only (prefix and pad rows never reach the head).

With ``config.itm_head`` the last stage also holds the image-text matching head
(``m6_engine.model.heads``): on the M samples with ``itm_labels >= 0`` it classifies the final
hidden state at ``valid_len - 1``, and the micro-batch's loss becomes

    loss = sum_n w_n loss_n / max(sum_n w_n, 1) + sum_m itm_loss_m / max(M, 1)

(either term 0 when the micro-batch has none of its samples: the schedule averages this over
micro-batches and DataParallel over dp, as for the decoding loss alone).

With ``sequence_parallel`` (tp > 1) the hidden state between blocks and between stages holds this
tp rank's S/t positions (``m6_engine.model.block``); the last stage all-gathers it before the final
LayerNorm, whose consumers (the vocab-parallel head, the matching head) give every tp rank the
whole gradient, so the gather's backward keeps this rank's positions.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from m6_engine import ops as m6_ops
from m6_engine.config import ModelConfig
from m6_engine.data.batch import MicroBatch, check_on_device
from m6_engine.data.tasks import TASKS
from m6_engine.model.block import TransformerBlock, check_recompute, run_blocks
from m6_engine.model.common import LayerNorm, ParamInit
from m6_engine.model.embeddings import M6Embeddings
from m6_engine.model.heads import MatchingHead, last_valid_states, matching_loss
from m6_engine.parallel.cross_entropy import vocab_parallel_cross_entropy
from m6_engine.parallel.init import InitMethod
from m6_engine.parallel.mappings import gather_from_sequence, gather_from_tp, sequence_chunk
from m6_engine.parallel.p2p import TensorSpec
from m6_engine.parallel.random import RNGTracker
from m6_engine.parallel.state import ParallelState
from m6_engine.parallel.tied import mark_tied


def stage_layer_range(num_layers: int, pp: int, stage_id: int, virtual_stages: int = 1,
                      chunk: int = 0) -> range:
    """Global indices of the blocks of pipeline stage ``stage_id``, or with ``virtual_stages`` V > 1
    of its model chunk ``chunk``: virtual stage ``chunk * pp + stage_id`` of ``V * pp``. Earlier
    (virtual) stages take the remainder."""
    stages = pp * virtual_stages
    if not (0 <= stage_id < pp and 0 <= chunk < virtual_stages) or num_layers < stages:
        where = f"stage {stage_id} of {pp}" + (
            f", chunk {chunk} of {virtual_stages}" if virtual_stages > 1 else "")
        raise ValueError(f"cannot place {num_layers} layers on {where}")
    stage_id = chunk * pp + stage_id
    base, extra = divmod(num_layers, stages)
    start = stage_id * base + min(stage_id, extra)
    return range(start, start + base + (1 if stage_id < extra else 0))


@dataclass(frozen=True)
class M6Loss:
    """The last stage's output for one micro-batch. Only ``loss`` carries a graph.

    ``task_*`` are indexed by task id (``m6_engine.data.tasks.TASKS``); None when the batch has no
    ``task_ids``. Token-weighted means: ``loss_sum / num_tokens``, ``task_loss_sum / task_num_tokens``.
    ``itm_*`` describe the image-text matching samples (None when the model has no matching head):
    mean loss ``itm_loss_sum / itm_count``, accuracy ``itm_correct / itm_count``.
    """

    loss: torch.Tensor
    """Scalar fp32 (what the schedule backpropagates): mean loss over the micro-batch's loss tokens,
    plus the mean matching loss over its matching samples when the model has the head."""
    loss_sum: torch.Tensor
    """Scalar fp32: sum of the loss-mask-weighted token losses."""
    num_tokens: torch.Tensor
    """Scalar fp32: sum of loss_mask."""
    task_loss_sum: torch.Tensor | None
    """(len(TASKS),) fp32 per-task sum of token losses."""
    task_num_tokens: torch.Tensor | None
    """(len(TASKS),) fp32 per-task loss tokens."""
    itm_loss_sum: torch.Tensor | None = None
    """Scalar fp32: sum of the matching samples' cross entropies."""
    itm_correct: torch.Tensor | None = None
    """Scalar fp32: matching samples classified right (argmax)."""
    itm_count: torch.Tensor | None = None
    """Scalar fp32: matching samples."""

    def detach(self) -> "M6Loss":
        return dataclasses.replace(self, loss=self.loss.detach())


class M6Model(nn.Module):
    """One pipeline stage of M6. See the module docstring for layout and names.

    ``forward(batch, input_tensor=None)`` returns the hidden state (B, S, d) on a stage that is not
    the last, else an :class:`M6Loss`. ``logits(batch, input_tensor=None)`` (last stage) returns
    the vocabulary logits of every position. ``batch`` is a micro-batch of
    ``m6_engine.data.tasks.collate``; tensors may be on the CPU (they are moved to the device).

    Arguments: ``chunk`` of ``virtual_stages`` (interleaved 1F1B: this module is virtual stage
    ``chunk * pp + pp_rank``; :class:`StageChunks` holds a rank's chunks as one stage);
    ``pre_process`` / ``post_process`` (default: first / last (virtual) stage) build the input
    embedding / final norm and head; ``seed`` drives every weight (same model for every layout);
    ``dtype`` of the weights (fp32, or fp16 / bf16 for O2 training); ``device`` (default
    ``state.device``; "meta" builds shapes only); ``recompute`` "none" | "selective" | "full";
    ``rng_tracker`` (``parallel.seed_parallel_rng``) holds the model-parallel dropout stream,
    required when training with attention dropout and tp > 1 (any dropout with sequence
    parallelism); ``sequence_parallel`` (a no-op at tp = 1; training only, not KV-cache decoding)
    shards the hidden state along the sequence over tp (module docstring); ``draw_weights=False``
    allocates the matrices without drawing them (LayerNorm and bias constants are still set), for a
    stage whose every weight a checkpoint is about to overwrite; ``init_method``: a custom
    ``InitMethod`` for the N(0, init_std) weights (``m6_engine.parallel.init``; default: each rank
    draws its shards alone from the counter-based stream), given each full master weight on the CPU.
    """

    def __init__(self, config: ModelConfig, state: ParallelState, *, pre_process: bool | None = None,
                 post_process: bool | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, recompute: str = "none",
                 rng_tracker: RNGTracker | None = None, chunk: int = 0, virtual_stages: int = 1,
                 sequence_parallel: bool = False, draw_weights: bool = True,
                 init_method: InitMethod | None = None):
        super().__init__()
        config.check_layout(state.tp_size, state.pp_size, virtual_stages)
        self.config, self.state = config, state
        first, last = chunk == 0, chunk == virtual_stages - 1
        self.pre_process = state.is_first_stage and first if pre_process is None else pre_process
        self.post_process = state.is_last_stage and last if post_process is None else post_process
        self.recompute = check_recompute(recompute)
        self.rng_tracker = rng_tracker
        self.sequence_parallel = sequence_parallel and state.tp_size > 1
        device = torch.device(state.device if device is None else device)
        self.ops = m6_ops.select_ops(config.fused_kernels, config.attention_backend, device)
        m6_ops.log_attention_backend(config.attention_backend, self.ops.attention_backend, device)
        init = ParamInit(seed=seed, std=config.init_std, dtype=dtype, device=device, draw=draw_weights,
                         custom=init_method)
        self.layer_ids = stage_layer_range(config.num_layers, state.pp_size, state.pp_rank,
                                           virtual_stages, chunk)

        self.embedding = None
        if self.pre_process or self.post_process:
            self.embedding = M6Embeddings(config, state, init, word_only=not self.pre_process,
                                          head_on_stage=self.post_process,
                                          sequence_parallel=self.sequence_parallel, rng_tracker=rng_tracker)
            mark_tied(self.embedding.word.weight)
        self.layers = nn.ModuleDict({
            str(i): TransformerBlock(config, state, init, self.ops, f"layers.{i}.", rng_tracker,
                                     sequence_parallel=self.sequence_parallel)
            for i in self.layer_ids})
        self.final_ln = (LayerNorm(config.hidden_size, config.layernorm_eps, self.ops, init)
                         if self.post_process else None)
        self.itm_head = (MatchingHead(config.hidden_size, init)
                         if self.post_process and config.itm_head else None)

    def activation_spec(self, micro_batch: int, seq_length: int) -> TensorSpec:
        """Shape and dtype of the activation between stages (the schedules' ``tensor_spec``):
        (B, S, d), or this rank's positions (B, S/t, d) with sequence parallelism."""
        if self.sequence_parallel:
            seq_length = sequence_chunk(seq_length, self.state.tp_size)
        return TensorSpec((micro_batch, seq_length, self.config.hidden_size), self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def hidden_states(self, batch: MicroBatch, input_tensor: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's blocks on the embedded batch (first stage) or on ``input_tensor``: (B, S, d)
        ((B, S/t, d) with sequence parallelism). ``batch`` must be on this stage's device."""
        check_on_device(batch, self.device, f"pipeline stage {self.state.pp_rank}")
        if self.sequence_parallel:
            sequence_chunk(batch.tokens.shape[1], self.state.tp_size, "the micro-batch's sequence length")
        if self.pre_process:
            h = self.embedding(batch)
        elif input_tensor is None:
            raise ValueError(f"pipeline stage {self.state.pp_rank} needs the previous stage's "
                             "activation as input_tensor")
        else:
            h = input_tensor
        return run_blocks(self.layers.values(), h, batch.prefix_len, batch.valid_len, self.recompute,
                          self.rng_tracker)

    def forward(self, batch: MicroBatch, input_tensor: torch.Tensor | None = None):
        """(B, S, d) activation on a stage that is not the last, else the micro-batch's M6Loss."""
        h = self.hidden_states(batch, input_tensor)
        return self.loss(self._whole_sequence(h), batch) if self.post_process else h

    def _whole_sequence(self, h: torch.Tensor) -> torch.Tensor:
        """The last stage's hidden state over all S positions (gathered under sequence parallelism)."""
        return gather_from_sequence(h, self.state.group("tp")) if self.sequence_parallel else h

    def _require_head(self, what: str):
        if not self.post_process:
            raise RuntimeError(f"{what} runs on the last pipeline stage only (post_process=True)")

    def loss(self, hidden: torch.Tensor, batch: MicroBatch) -> M6Loss:
        """Final norm, tied head and vocab-parallel cross entropy on the loss tokens."""
        self._require_head("the loss")
        if batch.labels is None:
            raise ValueError("the loss needs a micro-batch with labels and loss_mask (collate makes them)")
        device = hidden.device
        weights = batch.loss_mask.to(dtype=torch.float32)                           # (B, S)
        rows = weights.nonzero(as_tuple=True)                                       # (N,), (N,)
        logits = self.embedding.word.logits(self.final_ln(hidden[rows]))            # (N, V/t)
        # The logits are this call's own fresh head output, read by nothing after the loss: the CE
        # may turn them into its saved softmax numerator in place instead of a 4 B/logit copy.
        token_loss = vocab_parallel_cross_entropy(logits, batch.labels[rows], self.state,
                                                  overwrite_logits=True)
        w = weights[rows]
        weighted = token_loss * w                                                   # (N,) fp32
        loss_sum, num_tokens = weighted.sum(), w.sum()
        task_loss_sum = task_num_tokens = None
        if batch.task_ids is not None:
            task_of_token = batch.task_ids[rows[0]]                                 # (N,)
            zeros = torch.zeros(len(TASKS), dtype=torch.float32, device=device)
            task_loss_sum = zeros.index_add(0, task_of_token, weighted.detach())
            task_num_tokens = zeros.index_add(0, task_of_token, w)
        loss = loss_sum / num_tokens.clamp(min=1.0)
        if self.itm_head is None:
            if batch.itm_labels is not None and bool((batch.itm_labels >= 0).any()):
                raise ValueError("the batch holds image-text matching samples but the model has no "
                                 "matching head: set model.itm_head: true")
            return M6Loss(loss, loss_sum.detach(), num_tokens, task_loss_sum, task_num_tokens)
        itm_sum, itm_correct, itm_count = self._matching_terms(hidden, batch)
        return M6Loss(loss + itm_sum / itm_count.clamp(min=1.0), loss_sum.detach(), num_tokens,
                      task_loss_sum, task_num_tokens, itm_sum.detach(), itm_correct, itm_count)

    def _matching_terms(self, hidden: torch.Tensor, batch: MicroBatch):
        """(summed matching loss with its graph, correct predictions, matching samples) over the
        samples with ``itm_labels >= 0``; zeros, still connected to the head, when there are none."""
        device = hidden.device
        labels = batch.itm_labels if batch.itm_labels is not None else \
            torch.full((hidden.shape[0],), -1, dtype=torch.int64, device=device)
        rows = (labels >= 0).nonzero(as_tuple=True)[0]                              # (M,)
        z = self.final_ln(last_valid_states(hidden, batch.valid_len, rows))        # (M, d)
        per_sample, correct = matching_loss(self.itm_head(z), labels[rows])
        return per_sample.sum(), correct, torch.tensor(float(rows.numel()), device=device)

    def logits(self, batch: MicroBatch, input_tensor: torch.Tensor | None = None, *,
               gather: bool = True) -> torch.Tensor:
        """Logits of every position: (B, S, vocab_size) gathered over tp, or with ``gather=False``
        this rank's vocab-parallel shard (B, S, V/t) with padding columns at -inf."""
        self._require_head("logits")
        h = self.final_ln(self._whole_sequence(self.hidden_states(batch, input_tensor)))
        logits = self.embedding.word.logits(h)
        if not gather:
            return logits
        return gather_from_tp(logits, self.state.group("tp"))[..., :self.config.vocab_size]

    def match_logits(self, batch: MicroBatch, input_tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Image-text matching logits (B, 2) of every sample of ``batch`` (last stage, with the
        head): class 1 scores "this text belongs to this image"."""
        self._require_head("match_logits")
        if self.itm_head is None:
            raise RuntimeError("match_logits needs the matching head (model.itm_head: true)")
        h = self._whole_sequence(self.hidden_states(batch, input_tensor))
        rows = torch.arange(h.shape[0], device=h.device)
        return self.itm_head(self.final_ln(last_valid_states(h, batch.valid_len, rows)))


class StageChunks(nn.Module):
    """The V model chunks of one pipeline rank under interleaved 1F1B, seen as one stage.

    The chunks' modules are registered here under the names a plain stage gives them
    (``embedding``, ``layers.<global index>``, ``final_ln``, ``itm_head``), in the same order, and
    the chunks themselves are not registered: parameter names do not depend on pp or V, so
    DataParallel (one gradient buffer for the rank), the optimizer, ZeRO and checkpoints see one
    ordinary stage, and a checkpoint reshards between V values and plain 1F1B with nothing to map.
    ``chunks`` (the M6Model of each virtual stage, in chunk order) are what the schedule runs.
    """

    def __init__(self, chunks: list[M6Model]):
        super().__init__()
        if len(chunks) < 1:
            raise ValueError("StageChunks needs at least one chunk")
        self.chunks = tuple(chunks)

        def only(name):
            found = [getattr(c, name) for c in chunks if getattr(c, name) is not None]
            if len(found) > 1:
                raise ValueError(f"{len(found)} chunks of one rank hold a {name}: only virtual stage "
                                 "0 and the last virtual stage do, and with pp >= 2 they are on "
                                 "different ranks")
            return found[0] if found else None

        self.embedding = only("embedding")
        self.layers = nn.ModuleDict({k: b for c in chunks for k, b in c.layers.items()})
        self.final_ln = only("final_ln")
        self.itm_head = only("itm_head")

    def train(self, mode: bool = True):
        super().train(mode)
        for chunk in self.chunks:   # not registered: their own flags follow here
            chunk.train(mode)
        return self

    def activation_spec(self, micro_batch: int, seq_length: int) -> TensorSpec:
        return self.chunks[0].activation_spec(micro_batch, seq_length)

    @property
    def dtype(self) -> torch.dtype:
        return self.chunks[0].dtype

    @property
    def device(self) -> torch.device:
        return self.chunks[0].device

    def forward(self, *args, **kwargs):
        raise RuntimeError("StageChunks is not run as one module: the interleaved schedule runs "
                           "its chunks (forward_backward(model=stage.chunks))")


class ForwardStep:
    """The ``forward_step`` of ``m6_engine.parallel.schedules`` for an M6 stage.

    Returns the stage's activation, or on the last stage the micro-batch's scalar loss, passed
    through ``loss_transform`` when given (e.g. the O2 optimizer's ``scale_loss``: the schedule
    backpropagates what is returned). Keeps that stage's detached, untransformed :class:`M6Loss`
    of every micro-batch in ``outputs`` (loss and per-task logging).
    """

    def __init__(self, *, loss_transform=None):
        self.loss_transform = loss_transform
        self.outputs: list[M6Loss] = []

    def __call__(self, data_iterator, model, input_tensor):
        # Moved once, here; asynchronously when the loader pinned it (a no-op flag otherwise).
        batch = next(data_iterator).to(next(model.parameters()).device, non_blocking=True)
        output = model(batch, input_tensor)
        if not isinstance(output, M6Loss):
            return output
        self.outputs.append(output.detach())
        return output.loss if self.loss_transform is None else self.loss_transform(output.loss)
