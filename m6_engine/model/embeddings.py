"""M6's input embedding (paper 3.1-3.2): words or image patches, plus positions and segments.

For a packed sample ``[patches][masked text][complete text][pad]`` (``m6_engine.data.tasks``):

    e_s = x_s + P[position_ids_s] + G[segment_ids_s],   then dropout(hidden_dropout)
    x_s = W_patch f_s + b_patch     for the sample's first ``num_image_patches`` slots (f_s 2048-d)
    x_s = E[tokens_s]               elsewhere (vocab-parallel word embedding, shared with the head)

Positions: one learned table of ``max_text_positions`` rows serves every part. Text positions
restart at 0 in each text part and the patches of a sample take positions 0..num_patches-1 of the
same table (the batch's ``position_ids`` say so); the segment embedding (image / masked text /
complete text) is what tells the parts apart, so no second position table is needed.
``num_segments = 0`` drops G and ``num_patches = 0`` the patch projection (an imported GPT-2).

Parameters (global names): ``embedding.word.weight`` (padded vocab, d) split over tp along the
vocabulary, ``embedding.position.weight`` (max_text_positions, d), ``embedding.segment.weight``
(num_segments, d), ``embedding.patch.weight`` (d, patch_feature_dim) and ``.bias`` (d,), the last
three replicated. All N(0, init_std), biases 0.

Sequence parallelism (tp > 1): the word lookup is reduce-scattered to this rank's positions
[r S/t, (r+1) S/t) and the position, segment and patch parts are added for those positions only,
so the output is (B, S/t, d); those three replicated tables then get partial gradients
(``ParamRole.sequence_parallel``), summed over tp by ``parallel.grad_sync``.
"""

import torch
from torch import nn

from m6_engine.config import ModelConfig
from m6_engine.data.batch import MicroBatch
from m6_engine.model.common import ParamInit, ReplicatedEmbedding, ReplicatedLinear, sequence_dropout
from m6_engine.parallel.layers import VocabParallelEmbedding
from m6_engine.parallel.mappings import sequence_chunk
from m6_engine.parallel.random import RNGTracker
from m6_engine.parallel.roles import mark_sequence_parallel
from m6_engine.parallel.state import ParallelState

WORD_EMBEDDING = "embedding.word.weight"
"""Global name of the word embedding, on the first stage and (tied copy) on the last."""


def word_embedding(config: ModelConfig, state: ParallelState, init: ParamInit, *,
                   single_use: bool = False, sequence_parallel: bool = False) -> VocabParallelEmbedding:
    """The vocab-parallel word embedding, drawn from the generator of :data:`WORD_EMBEDDING`;
    ``single_use``: only the lookup or only the head uses it on this stage (pp > 1)."""
    return VocabParallelEmbedding(config.vocab_size, config.hidden_size, state,
                                  generator=init.generator(WORD_EMBEDDING),
                                  init_method=init.init_method, vocab_multiple=config.vocab_multiple,
                                  dtype=init.dtype, device=init.device, single_use=single_use,
                                  sequence_parallel=sequence_parallel)


class M6Embeddings(nn.Module):
    """The first stage's input layer; on a last stage that is not the first, only ``word`` (the
    tied head's copy) is built (``word_only``), under the same parameter name."""

    def __init__(self, config: ModelConfig, state: ParallelState, init: ParamInit, *,
                 word_only: bool = False, head_on_stage: bool = True, sequence_parallel: bool = False,
                 rng_tracker: RNGTracker | None = None):
        super().__init__()
        self.config = config
        self.sequence_parallel = sequence_parallel and state.tp_size > 1
        self.tp_size, self.tp_rank, self.rng_tracker = state.tp_size, state.tp_rank, rng_tracker
        # The lookup and the head use one weight only when both are on this stage (pp = 1).
        self.word = word_embedding(config, state, init, single_use=word_only or not head_on_stage,
                                   sequence_parallel=self.sequence_parallel)
        self.word_only = word_only
        if word_only:
            return
        d = config.hidden_size
        self.position = ReplicatedEmbedding(config.max_text_positions, d, init, "embedding.position")
        self.segment = (ReplicatedEmbedding(config.num_segments, d, init, "embedding.segment")
                        if config.num_segments else None)
        self.patch = (ReplicatedLinear(config.patch_feature_dim, d, init, "embedding.patch")
                      if config.num_patches else None)
        if self.sequence_parallel:
            mark_sequence_parallel([p for m in (self.position, self.segment, self.patch)
                                    if m is not None for p in m.parameters()])

    def _patch_inputs(self, x: torch.Tensor, batch: MicroBatch, first: int) -> torch.Tensor:
        """Replace the first ``num_image_patches[b]`` slots of sample b by projected patches; x
        holds positions [first, first + x.shape[1]) of the sequence."""
        n = self.config.num_patches
        patches = batch.patches.to(dtype=x.dtype)                                   # (B, n, F)
        if patches.shape[1] != n or patches.shape[2] != self.config.patch_feature_dim:
            raise ValueError(f"MicroBatch.patches must be (B, {n}, {self.config.patch_feature_dim}), "
                             f"got {tuple(patches.shape)}")
        if batch.tokens.shape[1] < n:
            raise ValueError(f"sequence length {batch.tokens.shape[1]} is shorter than num_patches = {n}")
        lo, hi = first, min(first + x.shape[1], n)        # the patch slots among x's positions
        if hi <= lo:
            return x
        count = batch.num_image_patches                                             # (B,)
        slots = torch.arange(lo, hi, device=x.device)
        is_patch = slots.unsqueeze(0) < count.unsqueeze(1)                          # (B, hi - lo)
        head = torch.where(is_patch.unsqueeze(-1), self.patch(patches[:, lo:hi]), x[:, :hi - lo])
        return torch.cat([head, x[:, hi - lo:]], dim=1)

    def forward(self, batch: MicroBatch) -> torch.Tensor:
        """batch (on the parameters' device) -> (B, S, d) in the parameters' dtype. Reads tokens,
        position_ids, segment_ids (when num_segments > 0), and patches with num_image_patches (when
        num_patches > 0; a batch without them is text only)."""
        if self.word_only:
            raise RuntimeError("this stage holds only the tied word embedding of the output head")
        first, chunk = 0, batch.tokens.shape[1]
        if self.sequence_parallel:
            chunk = sequence_chunk(chunk, self.tp_size, "the micro-batch's sequence length")
            first = self.tp_rank * chunk
        x = self.word(batch.tokens)                               # (B, S, d), or (B, S/t, d) with SP
        if self.patch is not None and batch.patches is not None:   # none: a text-only batch
            x = self._patch_inputs(x, batch, first)
        x = x + self.position(batch.position_ids[:, first:first + chunk])
        if self.segment is not None:
            if batch.segment_ids is None:
                raise ValueError(f"the model has {self.config.num_segments} segment embeddings: the "
                                 "micro-batch needs segment_ids")
            x = x + self.segment(batch.segment_ids[:, first:first + chunk])
        # Replicated over tp, x's dropout mask comes from the default stream, seeded identically on
        # every tp rank; this rank's positions alone (SP) draw from the model-parallel stream.
        return sequence_dropout(x, self.config.hidden_dropout, self.training, self.rng_tracker,
                                self.sequence_parallel)
