"""KV-cache forward passes of an M6 stage (pp = 1, any tp) under the prefix-LM mask.

The cache holds, for every block, this rank's keys and values of every position seen so far:
K, V (R, H/t, capacity, hd), row r filled up to ``lengths[r]`` (its cursor). :func:`extend` runs
T new tokens per row through the blocks, writes their K / V at slots ``lengths[r] .. + T - 1`` and
attends over the cached keys with the fused ``masked_softmax`` op. A new token may see every
cached key (each is an earlier position, in the prefix or causally before it), so the op's two
lengths and its ``q_offset`` follow from the cursors alone:

* a block of T tokens at a common start s (the first pass over packed prompts with s = 0, or
  candidate texts appended to a cached prefix): query i sits at absolute position s + i, so

      q_offset = s,  prefix_len = s + (bidirectional part of the new tokens),  valid_len = s + n_r

  which is the training mask of the whole row restricted to the new queries;
* one token per row at per-row cursors c_r (a decoding step over prompts of different
  lengths): one ``q_offset`` cannot place B different positions, but a single query row needs no
  causal split: it sees exactly keys 0..c_r, i.e. ``prefix_len = valid_len = c_r + 1`` (the row
  is "all prefix" up to and including itself) with ``q_offset = 0``. This is the causal row
  c_r of the training mask.

Slots past a row's cursor may hold stale K / V (pad of the first pass, dropped beams); they lie
beyond ``valid_len`` and get probability 0. They are always finite (the cache starts zeroed), as
the context product probs @ V still multiplies them by that 0. The block arithmetic mirrors
``TransformerBlock.forward`` in eval mode (no dropout); the tests hold the two equal.
"""

import torch

from m6_engine.data.batch import MicroBatch

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

    def write(self, layer: str, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> None:
        """Store k, v (R, H/t, T, hd) at slots start[r] .. start[r] + T - 1 of each row."""
        t = k.shape[2]
        if t == 1:
            rows = torch.arange(self.rows, device=k.device)
            self.keys[layer][rows, :, start] = k[:, :, 0]          # (R, H/t, hd)
            self.values[layer][rows, :, start] = v[:, :, 0]
        else:
            s = int(start[0])
            self.keys[layer][:, :, s:s + t] = k
            self.values[layer][:, :, s:s + t] = v

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


def mask_args(start: torch.Tensor, new_len: torch.Tensor, new_prefix_len: torch.Tensor | None,
              num_new: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(prefix_len, valid_len, q_offset) of ``num_new`` tokens appended at cursors ``start`` (R,),
    row r keeping ``new_len[r]`` of them, the first ``new_prefix_len[r]`` bidirectional (module
    docstring)."""
    if num_new == 1:
        visible = start + 1
        return visible, visible, 0
    s = int(start[0])
    if not bool((start == s).all()):
        raise ValueError("several new tokens per row need a common start (one q_offset); rows are "
                         f"at {start.tolist()}")
    prefix = start if new_prefix_len is None else start + new_prefix_len.to(start.device)
    return prefix, start + new_len.to(start.device), s


@torch.no_grad()
def extend(model, cache: KVCache, batch: MicroBatch) -> torch.Tensor:
    """Run T new tokens per row (``batch``: tokens, position_ids, segment_ids (R, T), optionally
    patches) through ``model``'s blocks with ``cache``; return the final-norm hidden (R, T, d).

    The batch's lengths are those of its new tokens: row r keeps ``valid_len[r]`` of the T tokens
    (the rest is pad), and the first ``prefix_len[r]`` of them are bidirectional (a first pass
    over prompts; 0 for decode steps and scored continuations).
    """
    check_decodable(model)
    batch = batch.to(cache.lengths.device)
    new_len, new_prefix_len = batch.valid_len, batch.prefix_len
    t = batch.seq_length
    start = cache.lengths
    if int(start.max()) + t > cache.capacity:
        raise ValueError(f"the cache holds {cache.capacity} positions; rows at {int(start.max())} "
                         f"cannot take {t} more")
    prefix_len, valid_len, q_offset = mask_args(start, new_len, new_prefix_len, t)
    keys_needed = int(valid_len.max())
    h = model.embedding(batch)                                                   # (R, T, d)
    for layer, block in model.layers.items():
        attention = block.attention
        q, k, v = attention.project_qkv(block.ln1(h))                            # (R, H/t, T, hd)
        cache.write(layer, k, v, start)
        context = attention.core(q, cache.keys[layer][:, :, :keys_needed],
                                 cache.values[layer][:, :, :keys_needed], prefix_len, valid_len,
                                 q_offset)                                        # (R, H/t, T, hd)
        h = h + attention.project_out(context)
        h = h + block.mlp(block.ln2(h))
    cache.lengths = start + new_len
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
