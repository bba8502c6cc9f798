"""KV-cache storage and the cached forward of an M6 stage (pp = 1, any tp) under the prefix-LM mask.

The cache holds, for every block, this rank's keys and values of every position seen so far:
K, V (R, H/t, capacity, hd), row r filled up to ``lengths[r]`` (its cursor c_r). :func:`extend` runs
T new tokens per row through the model's own blocks (``TransformerBlock.forward`` with a
``LayerKVCache``: the residuals, MLP, norms and attention op of training), which write their K / V
at slots c_r .. c_r + T - 1 and attend over the cached keys. Row r's new tokens sit at absolute
positions c_r + i, so the fused op's per-sample ``q_offset`` is the cursor. The micro-batch of
new tokens gives its own lengths (n_r tokens kept, the first p_r of them bidirectional), and the
op gets those of the whole row:

    q_offset = c_r,  valid_len = c_r + n_r,  prefix_len = c_r + p_r

Each new query row is then exactly its row of the training mask: for the first pass over packed
prompts c_r = 0 and p_r is the prompts' prefix; a decoding step (one token per row, cursors that
differ between rows) and candidate texts appended to a cached prefix have p_r = 0, causal after
every cached position (the prompt's prefix ends before c_r, so it is all visible either way).

Slots past a row's cursor may hold stale K / V (pad of the first pass, dropped beams); they lie
beyond ``valid_len`` and get probability 0. They are always finite (the cache starts zeroed), as
the context product probs @ V still multiplies them by that 0.
"""

import torch

from m6_engine.data.batch import MicroBatch
from m6_engine.model.attention import LayerKVCache
from m6_engine.parallel.mappings import gather_from_tp


class KVCache:
    """Per-block keys and values of R rows: K, V (R, H/t, capacity, hd) in the model's dtype."""

    def __init__(self, model, rows: int, capacity: int):
        attention = next(iter(model.layers.values())).attention
        shape = (rows, attention.heads_per_rank, capacity, attention.head_dim)
        kwargs = dict(dtype=model.dtype, device=model.device)
        # Zeros, not empty: unattended slots still enter probs @ V with weight 0, and 0 * NaN
        # garbage would be NaN.
        self.keys = {i: torch.zeros(shape, **kwargs) for i in model.layers}
        self.values = {i: torch.zeros(shape, **kwargs) for i in model.layers}
        self.lengths = torch.zeros(rows, dtype=torch.long, device=model.device)
        self.capacity = capacity

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    def layer(self, layer: str, attended: int) -> LayerKVCache:
        """Block ``layer``'s cache for a step whose new tokens start at the rows' cursors."""
        return LayerKVCache(self.keys[layer], self.values[layer], self.lengths, attended)

    def reorder(self, rows: torch.Tensor, capacity: int | None = None) -> None:
        """Keep rows ``rows`` (R',) in that order (beam reordering, dropping finished rows,
        repeating a prefix for several candidates); ``capacity`` grows the slots."""
        rows = rows.to(self.lengths.device)
        capacity = self.capacity if capacity is None else capacity
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = old.index_select(0, rows)
                if capacity != self.capacity:
                    grown = old.new_zeros((*new.shape[:2], capacity, new.shape[3]))
                    keep = min(capacity, self.capacity)
                    grown[:, :, :keep] = new[:, :, :keep]
                    new = grown
                store[layer] = new
        self.lengths = self.lengths.index_select(0, rows)
        self.capacity = capacity


def check_decodable(model) -> None:
    """Decoding and scoring need the whole model (pp = 1) in eval mode."""
    if not (model.pre_process and model.post_process):
        raise RuntimeError("decoding runs on a whole model (pp = 1); load the checkpoint into a "
                           "pp = 1 layout (m6_engine.checkpoint reshards it)")
    if model.training:
        raise RuntimeError("put the model in eval mode (model.eval()) before decoding: dropout "
                           "would make every step random")


@torch.no_grad()
def extend(model, cache: KVCache, batch: MicroBatch) -> torch.Tensor:
    """Run T new tokens per row (``batch``: tokens, position_ids, segment_ids (R, T), optionally
    patches) through ``model``'s blocks with ``cache``; return the final-norm hidden (R, T, d).

    The batch's lengths are those of its new tokens, counted from each row's cursor: row r keeps
    ``valid_len[r]`` of the T tokens (the rest is pad), and the first ``prefix_len[r]`` of them
    are bidirectional (a first pass over prompts; 0 for decode steps and scored continuations,
    causal text after every cached position: module docstring).
    """
    check_decodable(model)
    batch = batch.to(cache.lengths.device)
    new_len, new_prefix_len = batch.valid_len, batch.prefix_len
    t = batch.seq_length
    start = cache.lengths
    if int(start.max()) + t > cache.capacity:
        raise ValueError(f"the cache holds {cache.capacity} positions; rows at {int(start.max())} "
                         f"cannot take {t} more")
    valid_len = start + new_len                # absolute positions: the cursor is q_offset
    prefix_len = start + new_prefix_len
    attended = int(valid_len.max())
    h = model.embedding(batch)                                                   # (R, T, d)
    for layer, block in model.layers.items():
        h = block(h, prefix_len, valid_len, cache=cache.layer(layer, attended))  # (R, T, d)
    cache.lengths = valid_len
    return model.final_ln(h)


@torch.no_grad()
def vocab_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary fp32 logits (..., vocab_size) of final-norm hidden states (..., d),
    gathered over tp (identical on every tp rank, so every rank makes the same choices)."""
    shard = model.embedding.word.logits(hidden)                                  # (..., V/t)
    full = gather_from_tp(shard, model.state.group("tp"))
    return full[..., :model.config.vocab_size].float()


def prefill(model, packed, capacity: int) -> tuple[KVCache, torch.Tensor]:
    """First pass over packed prompts (``inputs.pack_prompts``): a cache of ``capacity`` slots
    per row holding every prompt position, and the final-norm hidden state (R, d) of each row's
    last filled position (the one that predicts its next token)."""
    rows, width = packed.tokens.shape
    if capacity < width:
        raise ValueError(f"cache capacity {capacity} is shorter than the prompts ({width})")
    cache = KVCache(model, rows, capacity)
    hidden = extend(model, cache, packed)                                        # (R, T, d)
    last = (packed.valid_len - 1).to(hidden.device)
    return cache, hidden[torch.arange(rows, device=hidden.device), last]
