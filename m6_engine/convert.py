"""Weight conversion: BERT word embeddings and GPT-2 into M6, M6 back to GPT-2, and full
(unsharded) state dicts into and out of a tp / pp-sharded :class:`~m6_engine.model.M6Model`.

A *full state dict* maps M6's global parameter names (``embedding.word.weight``,
``layers.7.attention.qkv.weight``, ..., see ``m6_engine.model``) to whole tensors, with the word
embedding unpadded (vocab_size, d). It is what every converter here produces and consumes, so
none of them depends on the parallel layout.

GPT-2 (Hugging Face ``GPT2LMHeadModel`` names) has M6's block design: pre-LN, GeLU tanh
(``gelu_new``), attention scaled by 1/sqrt(hd), tied head. As an M6 it has no patches and no
segments (``num_patches = num_segments = 0``), positions 0..S-1 and ``prefix_len = 0``. Its
``Conv1D`` weights are stored (in, out): M6's linears are (out, in), so they are transposed, and
its fused QKV columns are ordered (q|k|v, head, hd) while M6's rows are (head, q|k|v, hd).
"""

import re
from typing import Mapping

import torch
import torch.distributed as dist

from m6_engine.config import ConfigError, ModelConfig
from m6_engine.model.embeddings import WORD_EMBEDDING
from m6_engine.parallel.roles import param_role

_BERT_WORD_KEYS = ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight")
_GLOBAL_NAME = re.compile(r"^(embedding\.|final_ln\.|layers\.(\d+)\.)")


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------

def bert_word_embeddings(bert_state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict:
    """``{embedding.word.weight: (vocab_size, d)}`` from a BERT state dict (``BertModel`` or
    ``BertForPreTraining`` names), for M6's initialisation from BERT-base (appendix A.1).

    The vocabulary and width must match the config: BERT-base-chinese is 21128 x 768, so an M6
    of d = 768 takes it as is; another width is an error rather than a silent resize.
    """
    key = next((k for k in _BERT_WORD_KEYS if k in bert_state_dict), None)
    if key is None:
        raise KeyError(f"no BERT word embedding in the state dict: expected one of {_BERT_WORD_KEYS}")
    weight = bert_state_dict[key]
    if tuple(weight.shape) != (config.vocab_size, config.hidden_size):
        raise ConfigError(f"BERT word embedding {key} is {tuple(weight.shape)} but the model needs "
                          f"(ModelConfig.vocab_size, ModelConfig.hidden_size) = "
                          f"({config.vocab_size}, {config.hidden_size})")
    return {WORD_EMBEDDING: weight.detach().clone()}


# ---------------------------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------------------------

def gpt2_model_config(hf_config, **overrides) -> ModelConfig:
    """The ModelConfig of a GPT-2 (anything with ``transformers.GPT2Config``'s attributes).

    GPT-2's embedding and residual dropouts both map to ``hidden_dropout``, so they must agree.
    Options M6 does not implement (another activation, per-layer attention scaling, untied head,
    cross attention) are errors.
    """
    c = hf_config
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"GPT-2 activation_function {c.activation_function!r}: M6 uses the tanh "
                          "GeLU (gelu_new / gelu_pytorch_tanh)")
    unsupported = {"scale_attn_weights": not getattr(c, "scale_attn_weights", True),
                   "scale_attn_by_inverse_layer_idx": getattr(c, "scale_attn_by_inverse_layer_idx", False),
                   "add_cross_attention": getattr(c, "add_cross_attention", False),
                   "tie_word_embeddings": not getattr(c, "tie_word_embeddings", True)}
    for name, bad in unsupported.items():
        if bad:
            raise ConfigError(f"GPT-2 option {name} = {getattr(c, name)} has no M6 equivalent")
    if c.embd_pdrop != c.resid_pdrop:
        raise ConfigError(f"GPT-2 embd_pdrop = {c.embd_pdrop} and resid_pdrop = {c.resid_pdrop} "
                          "both map to ModelConfig.hidden_dropout; make them equal")
    fields = dict(num_layers=c.n_layer, hidden_size=c.n_embd, num_heads=c.n_head,
                  ffn_hidden_size=c.n_inner or 0, vocab_size=c.vocab_size,
                  max_text_positions=c.n_positions, num_patches=0, num_segments=0,
                  hidden_dropout=c.resid_pdrop, attention_dropout=c.attn_pdrop,
                  layernorm_eps=c.layer_norm_epsilon, init_std=c.initializer_range)
    return ModelConfig(**{**fields, **overrides})


def _swap_row_groups(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows of x (a * b * r, ...) ordered (a, b, r) -> ordered (b, a, r)."""
    rows = x.shape[0] // (a * b)
    return x.reshape(a, b, rows, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def _to_m6(t: torch.Tensor, how: str, heads: int) -> torch.Tensor:
    """A GPT-2 tensor as M6 stores it: Conv1D (in, out) -> (out, in); QKV rows (q|k|v, head, hd)
    -> (head, q|k|v, hd)."""
    if how in ("transpose", "qkv"):
        t = t.t() if t.dim() == 2 else t
    if how == "qkv":
        t = _swap_row_groups(t, 3, heads)
    return t.contiguous().clone()


def _to_gpt2(t: torch.Tensor, how: str, heads: int) -> torch.Tensor:
    """Inverse of :func:`_to_m6`."""
    if how == "qkv":
        t = _swap_row_groups(t, heads, 3)
    if how in ("transpose", "qkv"):
        t = t.t() if t.dim() == 2 else t
    return t.contiguous().clone()


# (M6 name, GPT-2 name, how): "same", "transpose" (Conv1D weight), "qkv" (fused QKV weight / bias).
_TOP_MAP = (("embedding.word.weight", "wte.weight", "same"),
            ("embedding.position.weight", "wpe.weight", "same"),
            ("final_ln.weight", "ln_f.weight", "same"), ("final_ln.bias", "ln_f.bias", "same"))
_BLOCK_MAP = (
    ("ln1.weight", "ln_1.weight", "same"), ("ln1.bias", "ln_1.bias", "same"),
    ("attention.qkv.weight", "attn.c_attn.weight", "qkv"),
    ("attention.qkv.bias", "attn.c_attn.bias", "qkv"),
    ("attention.out.weight", "attn.c_proj.weight", "transpose"),
    ("attention.out.bias", "attn.c_proj.bias", "same"),
    ("ln2.weight", "ln_2.weight", "same"), ("ln2.bias", "ln_2.bias", "same"),
    ("mlp.fc1.weight", "mlp.c_fc.weight", "transpose"), ("mlp.fc1.bias", "mlp.c_fc.bias", "same"),
    ("mlp.fc2.weight", "mlp.c_proj.weight", "transpose"), ("mlp.fc2.bias", "mlp.c_proj.bias", "same"),
)


def _name_pairs(config: ModelConfig):
    """(M6 name, GPT2LMHeadModel name without ``transformer.``, how) of every parameter."""
    pairs = list(_TOP_MAP)
    for i in range(config.num_layers):
        pairs += [(f"layers.{i}.{m}", f"h.{i}.{g}", how) for m, g, how in _BLOCK_MAP]
    return pairs


def _check_gpt2_shapes(sd: Mapping[str, torch.Tensor], config: ModelConfig):
    expect = {"wte.weight": (config.vocab_size, config.hidden_size),
              "wpe.weight": (config.max_text_positions, config.hidden_size)}
    for key, shape in expect.items():
        if tuple(sd[key].shape) != shape:
            raise ConfigError(f"GPT-2 {key} is {tuple(sd[key].shape)}, the config expects {shape}")
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"h\.(\d+)\.", k)] if m}
    if layers != set(range(config.num_layers)):
        raise ConfigError(f"GPT-2 state dict has blocks {sorted(layers)}, ModelConfig.num_layers = "
                          f"{config.num_layers}")


def _check_text_only(config: ModelConfig):
    if config.num_patches or config.num_segments:
        raise ConfigError("a GPT-2 is an M6 with ModelConfig.num_patches = 0 and ModelConfig."
                          f"num_segments = 0, got {config.num_patches} and {config.num_segments}")


def gpt2_to_m6(gpt2_state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict:
    """A full M6 state dict from a GPT-2 one (``GPT2LMHeadModel`` or ``GPT2Model`` names).

    ``config`` is :func:`gpt2_model_config` of the same model. Buffers (``attn.bias`` masks of
    old versions) and the tied ``lm_head.weight`` are not parameters of M6 and are skipped.
    """
    _check_text_only(config)
    sd = {k.removeprefix("transformer."): v.detach() for k, v in gpt2_state_dict.items()}
    _check_gpt2_shapes(sd, config)
    return {m6: _to_m6(sd[g], how, config.num_heads) for m6, g, how in _name_pairs(config)}


def m6_to_gpt2(m6_state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict:
    """A ``GPT2LMHeadModel`` state dict from a full M6 one (with the tied ``lm_head.weight``)."""
    _check_text_only(config)
    out = {f"transformer.{g}": _to_gpt2(m6_state_dict[m6].detach(), how, config.num_heads)
           for m6, g, how in _name_pairs(config)}
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


# ---------------------------------------------------------------------------------------------
# Full state dict <-> sharded model
# ---------------------------------------------------------------------------------------------

def _shard_of(full: torch.Tensor, param: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    dim = param_role(param).tp_dim
    if dim is None:
        return full
    chunk = full.shape[dim] // tp_size
    return full.narrow(dim, tp_rank * chunk, chunk)


def _is_m6_name(key: str, num_layers: int) -> bool:
    match = _GLOBAL_NAME.match(key)
    return match is not None and (match.group(2) is None or int(match.group(2)) < num_layers)


def load_full_state_dict(model, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a full state dict into this rank's shard of ``model`` (an M6Model or a wrapper of
    one, e.g. DataParallel): every parameter of the stage must be present; keys of other stages
    are ignored, keys that are no M6 parameter name are an error. No communication."""
    stage = getattr(model, "module", model)
    config, state = stage.config, stage.state
    foreign = [k for k in state_dict if not _is_m6_name(k, config.num_layers)]
    if foreign:
        raise KeyError(f"not M6 parameter names (convert first?): {foreign[:5]}")
    params = dict(stage.named_parameters())
    missing = sorted(set(params) - set(state_dict))
    if missing:
        raise KeyError(f"the state dict lacks parameters of this stage: {missing[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            full = state_dict[name]
            if name == WORD_EMBEDDING:
                if full.shape[0] != config.vocab_size:
                    raise ValueError(f"{name} has {full.shape[0]} rows, ModelConfig.vocab_size = "
                                     f"{config.vocab_size}")
                padded = torch.zeros(param.shape[0] * state.tp_size, full.shape[1], dtype=full.dtype)
                padded[:config.vocab_size] = full
                full = padded
            shard = _shard_of(full, param, state.tp_size, state.tp_rank)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: the state dict's shard is {tuple(shard.shape)}, the "
                                 f"parameter {tuple(param.shape)}")
            param.copy_(shard)


def _gather_tp(param: torch.Tensor, group) -> torch.Tensor:
    dim = param_role(param).tp_dim
    if dim is None or dist.get_world_size(group) == 1:
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def full_state_dict(model) -> dict:
    """The full state dict (CPU tensors) of the model spread over this rank's tp and pp groups,
    returned on every rank of them (collective on both). The tied word embedding is taken from
    the first stage; the padding rows of the vocabulary are dropped."""
    stage = getattr(model, "module", model)
    config, state = stage.config, stage.state
    local = {}
    for name, param in stage.named_parameters():
        full = _gather_tp(param, state.group("tp"))
        if name == WORD_EMBEDDING:
            full = full[:config.vocab_size]
        # A copy: with tp == 1 the "gathered" tensor is the live parameter itself.
        local[name] = full.to("cpu", copy=True)
    stages = [None] * state.pp_size
    if state.pp_size > 1:
        dist.all_gather_object(stages, local, group=state.group("pp"))
    else:
        stages = [local]
    merged = {}
    for stage_dict in stages:   # stage order: the first stage's word embedding wins
        for name, tensor in stage_dict.items():
            merged.setdefault(name, tensor)
    return merged
