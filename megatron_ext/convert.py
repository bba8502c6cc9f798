"""Checkpoint conversion between our full state dicts and megatron-core model state dicts.

Our side is a *full state dict* (``m6_engine.convert.full_state_dict`` / ``load_full_state_dict``):
global names, whole tensors, word embedding unpadded (vocab_size, d); it does not depend on the
layout. megatron-core's side is one ``state_dict()`` per model-parallel rank, for megatron-core's
``GPTModel`` (text-only M6 configs: ``num_patches = num_segments = 0``) or
:class:`megatron_ext.model.M6McoreModel` (any M6), given as ``shards[pp_rank][tp_rank]``. So any
(tp, pp) of ours converts to any (tp, pp) of megatron-core and back.

Names (ours -> megatron-core, ``L`` = layers per stage, layer g on stage g // L as local g % L):

    embedding.word.weight          embedding.word_embeddings.weight  (stage 0) and, with pp > 1,
                                   output_layer.weight (last stage: the tied copy)      rows / tp
    embedding.position.weight      embedding.position_embeddings.weight                 replicated
    embedding.segment.weight       embedding.tokentype_embeddings.weight                replicated
    embedding.patch.{weight,bias}  embedding.patch_projection.{weight,bias}             replicated
    layers.g.ln1 / ln2             decoder.layers.l.input_layernorm / pre_mlp_layernorm replicated
    layers.g.attention.qkv         decoder.layers.l.self_attention.linear_qkv           rows / tp
    layers.g.attention.out         decoder.layers.l.self_attention.linear_proj          weight cols / tp
    layers.g.mlp.fc1 / fc2         decoder.layers.l.mlp.linear_fc1 / linear_fc2         rows / cols / tp
    final_ln                       decoder.final_layernorm (last stage)                 replicated

Fused QKV: megatron-core's ``linear_qkv`` rows on a tp rank are (query group, [q heads of the group,
k, v], hd); with multi-head attention a group is one head, so a rank's rows are (local head, q|k|v,
hd) and the ranks' blocks stacked in order give (head, q|k|v, hd): our row order. The QKV tensors
are therefore split and concatenated along rows like any column-parallel weight; grouped-query
checkpoints (fewer k / v rows) have no M6 equivalent and fail the shape check.

The vocabulary is padded on the megatron-core side to ``padded_vocab_size`` (default: ours,
a multiple of ``vocab_multiple * tp``); padding rows are zero and dropped on the way back.
``_extra_state`` entries (Transformer Engine metadata, None in the local spec) are ignored.
"""

from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from m6_engine.config import ModelConfig
from m6_engine.model.embeddings import WORD_EMBEDDING
from m6_engine.progress import progress_bar

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
EXTRA_STATE = "_extra_state"

# (our name below layers.<g>., megatron-core's below decoder.layers.<l>., tp-split dim or None)
_LAYER_NAMES = (
    ("ln1.weight", "input_layernorm.weight", None), ("ln1.bias", "input_layernorm.bias", None),
    ("attention.qkv.weight", "self_attention.linear_qkv.weight", 0),
    ("attention.qkv.bias", "self_attention.linear_qkv.bias", 0),
    ("attention.out.weight", "self_attention.linear_proj.weight", 1),
    ("attention.out.bias", "self_attention.linear_proj.bias", None),
    ("ln2.weight", "pre_mlp_layernorm.weight", None), ("ln2.bias", "pre_mlp_layernorm.bias", None),
    ("mlp.fc1.weight", "mlp.linear_fc1.weight", 0), ("mlp.fc1.bias", "mlp.linear_fc1.bias", 0),
    ("mlp.fc2.weight", "mlp.linear_fc2.weight", 1), ("mlp.fc2.bias", "mlp.linear_fc2.bias", None),
)
# (our name, megatron-core's, stage: "first" | "last"); all replicated over tp.
_TOP_NAMES = (
    ("embedding.position.weight", "embedding.position_embeddings.weight", "first"),
    ("embedding.segment.weight", "embedding.tokentype_embeddings.weight", "first"),
    ("embedding.patch.weight", "embedding.patch_projection.weight", "first"),
    ("embedding.patch.bias", "embedding.patch_projection.bias", "first"),
    ("final_ln.weight", "decoder.final_layernorm.weight", "last"),
    ("final_ln.bias", "decoder.final_layernorm.bias", "last"),
)


def mcore_stage_layers(num_layers: int, pp: int) -> int:
    """Layers per megatron-core pipeline stage: it splits the block evenly."""
    if num_layers % pp:
        raise ValueError(f"megatron-core splits the {num_layers} layers evenly over pipeline stages: "
                         f"pp = {pp} must divide ModelConfig.num_layers")
    return num_layers // pp


def _names(model: ModelConfig, pp: int):
    """(our name, megatron-core name, pp_rank, tp-split dim) of every megatron-core tensor."""
    per_stage = mcore_stage_layers(model.num_layers, pp)
    rows = [(WORD_EMBEDDING, WORD_EMBEDDINGS, 0, 0)]
    if pp > 1:
        rows.append((WORD_EMBEDDING, OUTPUT_LAYER, pp - 1, 0))
    present = {"embedding.segment": model.num_segments > 0, "embedding.patch": model.num_patches > 0}
    for ours, theirs, where in _TOP_NAMES:
        if present.get(ours.rsplit(".", 1)[0], True):
            rows.append((ours, theirs, 0 if where == "first" else pp - 1, None))
    for g in range(model.num_layers):
        stage, local = divmod(g, per_stage)
        rows += [(f"layers.{g}.{ours}", f"decoder.layers.{local}.{theirs}", stage, dim)
                 for ours, theirs, dim in _LAYER_NAMES]
    return rows


def _padded(model: ModelConfig, tp: int, padded_vocab_size: int | None) -> int:
    padded = padded_vocab_size or model.padded_vocab_size(tp)
    if padded < model.vocab_size or padded % tp:
        raise ValueError(f"padded_vocab_size = {padded} must be >= ModelConfig.vocab_size = "
                         f"{model.vocab_size} and divisible by tp = {tp}")
    return padded


def to_mcore(full: Mapping[str, torch.Tensor], model: ModelConfig, *, tp: int, pp: int, tp_rank: int,
             pp_rank: int, padded_vocab_size: int | None = None) -> dict:
    """The megatron-core state dict of rank (tp_rank, pp_rank) from our full state dict."""
    padded = _padded(model, tp, padded_vocab_size)
    out = {}
    for ours, theirs, stage, dim in _names(model, pp):
        if stage != pp_rank:
            continue
        if ours not in full:
            raise KeyError(f"the full state dict lacks {ours!r} (for megatron-core's {theirs!r})")
        tensor = full[ours].detach()
        if ours == WORD_EMBEDDING:
            if tensor.shape[0] != model.vocab_size:
                raise ValueError(f"{ours} has {tensor.shape[0]} rows, ModelConfig.vocab_size = "
                                 f"{model.vocab_size}")
            tensor = torch.cat([tensor, tensor.new_zeros(padded - model.vocab_size, tensor.shape[1])])
        if dim is not None:
            tensor = tensor.chunk(tp, dim=dim)[tp_rank]
        out[theirs] = tensor.contiguous().clone()
    return out


def to_mcore_shards(full: Mapping[str, torch.Tensor], model: ModelConfig, *, tp: int, pp: int,
                    padded_vocab_size: int | None = None, progress: bool = False) -> list[list[dict]]:
    """Every rank's megatron-core state dict, as ``shards[pp_rank][tp_rank]`` (``progress``: a bar
    over the ranks, :mod:`m6_engine.progress`)."""
    ranks = progress_bar([(p, t) for p in range(pp) for t in range(tp)], desc="to megatron-core", unit="rank",
                         enabled=progress)
    shards = [[None] * tp for _ in range(pp)]
    for p, t in ranks:
        shards[p][t] = to_mcore(full, model, tp=tp, pp=pp, tp_rank=t, pp_rank=p, padded_vocab_size=padded_vocab_size)
    return shards


def _check_keys(shards: Sequence[Sequence[Mapping]], model: ModelConfig, pp: int):
    expected = [set() for _ in range(pp)]
    for _, theirs, stage, _ in _names(model, pp):
        expected[stage].add(theirs)
    for p, stage in enumerate(shards):
        for t, shard in enumerate(stage):
            keys = {k for k in shard if not k.endswith(EXTRA_STATE)}
            unknown, missing = sorted(keys - expected[p]), sorted(expected[p] - keys)
            if unknown or missing:
                raise KeyError(f"megatron-core shard (pp {p}, tp {t}) does not match the M6 config: "
                               f"unexpected {unknown[:5]}, missing {missing[:5]}")


def from_mcore(shards: Sequence[Sequence[Mapping[str, torch.Tensor]]], model: ModelConfig,
               progress: bool = False) -> dict:
    """Our full state dict from megatron-core state dicts ``shards[pp_rank][tp_rank]``.

    Replicated tensors must agree over tp (a checkpoint whose replicas diverged is an error); the
    tied copy on the last stage (``output_layer.weight``) is not read: stage 0's embedding is.
    ``progress``: a bar over the tensors (:mod:`m6_engine.progress`).
    """
    pp, tp = len(shards), len(shards[0])
    if any(len(stage) != tp for stage in shards):
        raise ValueError("every pipeline stage needs the same number of tp shards")
    _check_keys(shards, model, pp)
    full = {}
    for ours, theirs, stage, dim in progress_bar(_names(model, pp), desc="from megatron-core", unit="tensor",
                                                 enabled=progress):
        if theirs == OUTPUT_LAYER:
            continue
        parts = [shards[stage][t][theirs].detach().cpu() for t in range(tp)]
        if dim is None:
            if any(not torch.equal(parts[0], part) for part in parts[1:]):
                raise ValueError(f"{theirs} (pp {stage}) differs between tp ranks, but is replicated")
            tensor = parts[0]
        else:
            tensor = torch.cat(parts, dim=dim)
        if ours == WORD_EMBEDDING:
            tensor = tensor[:model.vocab_size]
        full[ours] = tensor.clone()
    return full


def load_mcore_state_dict(module: torch.nn.Module, shard: Mapping[str, torch.Tensor]) -> None:
    """Load one rank's converted shard into a megatron-core model (e.g. ``to_mcore``'s output):
    every parameter must be given with its shape, nothing else may be (``_extra_state`` aside)."""
    params = dict(module.named_parameters())
    keys = {k for k in shard if not k.endswith(EXTRA_STATE)}
    unknown, missing = sorted(keys - set(params)), sorted(set(params) - keys)
    if unknown or missing:
        raise KeyError(f"state dict does not fit the model: unexpected {unknown[:5]}, missing {missing[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(shard[name].shape) != tuple(param.shape):
                raise ValueError(f"{name}: shard {tuple(shard[name].shape)}, parameter {tuple(param.shape)}")
            param.copy_(shard[name])


def load_full_into_mcore(module: torch.nn.Module, full: Mapping[str, torch.Tensor], model: ModelConfig,
                         *, padded_vocab_size: int | None = None) -> None:
    """Load our full state dict into this rank's stage of a megatron-core model (its tp / pp layout
    and ranks read from megatron-core's ``parallel_state``). No communication."""
    from megatron.core import parallel_state as ps

    load_mcore_state_dict(module, to_mcore(
        full, model, tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), padded_vocab_size=padded_vocab_size))


def gather_mcore_shards(tensors: Mapping[str, torch.Tensor]) -> list[list[dict]]:
    """``shards[pp_rank][tp_rank]`` of this rank's model-parallel replica, on each of its ranks.

    ``tensors`` is this rank's ``state_dict()`` (or any mapping with its names, e.g. gradients);
    ranks and groups are megatron-core's (``parallel_state``). Collective on the replica's
    model-parallel group (its tp * pp ranks).
    """
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    local = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             {k: v.detach().cpu() for k, v in tensors.items()
              if isinstance(v, torch.Tensor) and not k.endswith(EXTRA_STATE)})
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, local, group=group)
    shards = [[None] * ps.get_tensor_model_parallel_world_size()
              for _ in range(ps.get_pipeline_model_parallel_world_size())]
    for p, t, state in everyone:
        shards[p][t] = state
    return shards


def mcore_full_state_dict(tensors: Mapping[str, torch.Tensor], model: ModelConfig) -> dict:
    """Our full state dict of a live megatron-core model (or of a mapping with its parameter names,
    e.g. its gradients), on every rank of its model-parallel group (collective there)."""
    return from_mcore(gather_mcore_shards(tensors), model)
