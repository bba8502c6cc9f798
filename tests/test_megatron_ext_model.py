"""M6 on megatron-core and checkpoint conversion, on 4 CPU ranks (tp = 2, pp = 2) against our engine.

One launch runs every multi-rank check (megatron-core's import costs each rank several seconds):
M6 on megatron-core trained one step by megatron-core's 1F1B schedule gives our engine's losses and
gradients from converted weights; logits agree after conversion into megatron-core at other
layouts (tp 4, pp 4, and GPTModel with megatron-core's local spec with and without M6LayerNorm);
our checkpoint survives the round trip bit for bit. Pure state-dict conversions run in-process.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install '.[megatron]')")

from m6_engine.config import ModelConfig  # noqa: E402
from m6_engine.data.batch import MicroBatch  # noqa: E402
from megatron_ext import convert  # noqa: E402
from tests.distributed import Checks, assert_checks, init_state, run_ranks  # noqa: E402

CONFIG = ModelConfig(num_layers=4, hidden_size=64, num_heads=4, vocab_size=500, max_text_positions=32,
                     num_patches=4, patch_feature_dim=16, num_segments=3, hidden_dropout=0.0,
                     attention_dropout=0.0)
GPT = dataclasses.replace(CONFIG, num_patches=0, num_segments=0)
SEQ = CONFIG.num_patches + CONFIG.max_text_positions
MB, MICROBATCHES = 2, 4
LAYOUTS = [(2, 2), (4, 1), (1, 4)]
CHECK_NAMES = ["m6_on_mcore_losses_and_grads", "m6_round_trip_bitwise",
               *(f"m6_logits_tp{t}_pp{p}" for t, p in LAYOUTS), "gpt_logits_local_spec_m6_norm",
               "gpt_logits_local_spec_torch_norm", "ours_at_other_layout_from_mcore"]


# ---- rank-side helpers ------------------------------------------------------------------------

def _m6_batches():
    from tests.m6_data import mixed_batch

    return [mixed_batch(CONFIG, i * MB, MB, seed=3) for i in range(MICROBATCHES)]


def _gpt_batch():
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, GPT.vocab_size, (MB, GPT.max_text_positions), generator=gen)
    return MicroBatch(tokens=tokens, position_ids=torch.arange(GPT.max_text_positions).expand(MB, -1),
                      prefix_len=torch.zeros(MB, dtype=torch.long),
                      valid_len=torch.full((MB,), GPT.max_text_positions))


def _full_grads(model):
    """Our full state dict of the gradients (collective over tp and pp)."""
    from m6_engine.convert import full_state_dict

    params = dict(model.named_parameters())
    saved = {name: p.data for name, p in params.items()}
    try:
        for p in params.values():
            p.data = p.grad
        return full_state_dict(model)
    finally:
        for name, p in params.items():
            p.data = saved[name]


def _pipeline_hidden(stage_forward, pp_prev, pp_next, spec_shape):
    """Run one pipeline forward by hand: receive from the previous stage, compute, send on."""
    import torch.distributed as dist

    received = None
    if pp_prev is not None:
        received = torch.empty(spec_shape)
        dist.recv(received, pp_prev)
    out = stage_forward(received)
    if pp_next is not None:
        dist.send(out.detach().contiguous(), pp_next)
    return out


def _our_logits(model, state, batch):
    """Full-vocabulary logits (B, S, V) of our pipelined model, on the last stage (None elsewhere)."""
    shape = (batch.tokens.shape[0], batch.tokens.shape[1], model.config.hidden_size)
    if state.is_last_stage:
        forward = lambda h: model.logits(batch, h)  # noqa: E731
    else:
        forward = lambda h: model.hidden_states(batch, h)  # noqa: E731
    with torch.no_grad():
        out = _pipeline_hidden(forward, state.prev_stage_rank, state.next_stage_rank, shape)
    return out if state.is_last_stage else None


def _mcore_logits(module, run, seq, vocab_size):
    """(B, S, V) logits of a megatron-core stage (GPTModel or M6McoreModel) on its last stage:
    ``run()`` calls the module on this rank's inputs (after the previous stage's activation)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    prev = None if first else ps.get_pipeline_model_parallel_prev_rank()
    nxt = None if last else ps.get_pipeline_model_parallel_next_rank()

    def forward(received):
        if received is not None:
            module.set_input_tensor(received)
        return run()

    with torch.no_grad():
        out = _pipeline_hidden(forward, prev, nxt, (seq, MB, module.config.hidden_size))
    if not last:
        return None
    return gather_from_tensor_model_parallel_region(out)[..., :vocab_size]


def _init_mcore(tp, pp):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(7)


def _m6_mcore(config, tp, pp, full):
    from megatron.core import parallel_state as ps

    from megatron_ext.config import transformer_config
    from megatron_ext.model import M6McoreModel

    _init_mcore(tp, pp)
    module = M6McoreModel(transformer_config(config, tp=tp, pp=pp), config,
                          pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    convert.load_full_into_mcore(module, full, config)
    return module


def _mcore_inputs(batch, config):
    """M6McoreModel's inputs without labels: it then returns logits."""
    from megatron_ext.model import batch_inputs

    inputs = batch_inputs(batch, config)
    del inputs["labels"]
    return inputs


# ---- checks -----------------------------------------------------------------------------------

def _check_training(state, ours, full):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from m6_engine.model import ForwardStep
    from m6_engine.parallel import forward_backward, model_grad_sync
    from megatron_ext.model import m6_forward_step
    from megatron_ext.training import wrap_ddp

    batches = _m6_batches()
    result = forward_backward("1f1b", forward_step=ForwardStep(), data_iterator=iter(batches),
                              model=ours, num_microbatches=MICROBATCHES, state=state,
                              tensor_spec=ours.activation_spec(MB, SEQ), **model_grad_sync(ours, state))
    our_grads = _full_grads(ours)

    module = _m6_mcore(CONFIG, 2, 2, full)
    ddp = wrap_ddp(module, module.config)
    losses = get_forward_backward_func()(
        forward_step_func=m6_forward_step(CONFIG), data_iterator=iter(batches), model=[ddp],
        num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=MB, forward_only=False)
    mcore_grads = convert.mcore_full_state_dict(
        {name: p.main_grad for name, p in module.named_parameters()}, CONFIG)   # megatron-core DDP's attribute
    if state.is_last_stage:
        ours_l = torch.stack(result.losses)
        theirs_l = torch.stack([d["lm loss"] for d in losses])
        assert len(losses) == MICROBATCHES
        torch.testing.assert_close(theirs_l, ours_l, atol=2e-6, rtol=1e-6)
    assert set(mcore_grads) == set(our_grads)
    for name, grad in our_grads.items():
        torch.testing.assert_close(mcore_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def _check_round_trip(full):
    back = convert.mcore_full_state_dict(_m6_mcore(CONFIG, 2, 2, full).state_dict(), CONFIG)
    assert set(back) == set(full)
    for name, tensor in full.items():
        assert torch.equal(back[name], tensor), name


def _check_m6_logits(state, ours, full, tp, pp):
    batch = _m6_batches()[0]
    reference = _our_logits(ours, state, batch)
    module = _m6_mcore(CONFIG, tp, pp, full)
    inputs = _mcore_inputs(batch, CONFIG)
    _compare_on_last_ranks(reference, _mcore_logits(module, lambda: module(**inputs), SEQ, CONFIG.vocab_size))


def _compare_on_last_ranks(reference, logits):
    """Our logits live on our last stage, megatron-core's on its last stage: gather both to rank 0."""
    import torch.distributed as dist

    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, (reference, logits))
    ours = next(r for r, _ in objects if r is not None)
    theirs = next(lg for _, lg in objects if lg is not None)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)


def _check_gpt_logits(state, gpt_ours, gpt_full, m6_norm):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ext.config import transformer_config
    from megatron_ext.spec import block_spec, local_gpt_layer_spec

    batch = _gpt_batch()
    reference = _our_logits(gpt_ours, state, batch)
    _init_mcore(2, 2)
    config = transformer_config(GPT, tp=2, pp=2)
    spec = block_spec(config, local_gpt_layer_spec()) if m6_norm else get_gpt_layer_local_spec()
    padded = GPT.padded_vocab_size(2)
    module = GPTModel(config, spec, vocab_size=padded, max_sequence_length=GPT.max_text_positions,
                      pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                      share_embeddings_and_output_weights=True)
    convert.load_full_into_mcore(module, gpt_full, GPT, padded_vocab_size=padded)
    logits = _mcore_logits(module, lambda: module(batch.tokens, batch.position_ids, None),
                           GPT.max_text_positions, GPT.vocab_size)
    _compare_on_last_ranks(reference, logits)


def _check_ours_from_mcore(full):
    """megatron-core (tp 2, pp 2) -> full -> our engine at tp 4, pp 1: the logits of tp 2, pp 2."""
    from m6_engine.convert import load_full_state_dict
    from m6_engine.model import M6Model

    module = _m6_mcore(CONFIG, 2, 2, full)
    converted = convert.mcore_full_state_dict(module.state_dict(), CONFIG)
    state = init_state(tp=4, pp=1)
    ours = M6Model(CONFIG, state, seed=99)
    load_full_state_dict(ours, converted)
    batch = _m6_batches()[0]
    reference = _our_logits(ours, state, batch)
    module = _m6_mcore(CONFIG, 2, 2, full)
    inputs = _mcore_inputs(batch, CONFIG)
    _compare_on_last_ranks(reference, _mcore_logits(module, lambda: module(**inputs), SEQ, CONFIG.vocab_size))


def _parity_rank():
    from megatron.core import parallel_state as ps

    from m6_engine.convert import full_state_dict
    from m6_engine.model import M6Model
    from megatron_ext.testing import cpu_shim

    checks = Checks()
    state = init_state(tp=2, pp=2)
    with cpu_shim():
        ours = M6Model(CONFIG, state, seed=11)
        full = full_state_dict(ours)
        gpt_ours = M6Model(GPT, state, seed=12)
        gpt_full = full_state_dict(gpt_ours)
        _init_mcore(2, 2)
        checks.run("m6_on_mcore_losses_and_grads", _check_training, state, ours, full)
        checks.run("m6_round_trip_bitwise", _check_round_trip, full)
        for tp, pp in LAYOUTS:
            checks.run(f"m6_logits_tp{tp}_pp{pp}", _check_m6_logits, state, ours, full, tp, pp)
        checks.run("gpt_logits_local_spec_m6_norm", _check_gpt_logits, state, gpt_ours, gpt_full, True)
        checks.run("gpt_logits_local_spec_torch_norm", _check_gpt_logits, state, gpt_ours, gpt_full, False)
        checks.run("ours_at_other_layout_from_mcore", _check_ours_from_mcore, full)
        ps.destroy_model_parallel()
    return checks.results


@pytest.fixture(scope="module")
def parity():
    return run_ranks(_parity_rank, 4, timeout_s=300)


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_megatron_parity(parity, name):
    assert_checks(parity, name)


# ---- pure conversions, in process -------------------------------------------------------------

def _random_full(config: ModelConfig, seed: int = 0) -> dict:
    """A full state dict with our global names (as M6Model names its parameters)."""
    gen = torch.Generator().manual_seed(seed)
    d, f = config.hidden_size, config.ffn_size
    shapes = {"embedding.word.weight": (config.vocab_size, d),
              "embedding.position.weight": (config.max_text_positions, d),
              "final_ln.weight": (d,), "final_ln.bias": (d,)}
    if config.num_segments:
        shapes["embedding.segment.weight"] = (config.num_segments, d)
    if config.num_patches:
        shapes.update({"embedding.patch.weight": (d, config.patch_feature_dim), "embedding.patch.bias": (d,)})
    for i in range(config.num_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in {
            "ln1.weight": (d,), "ln1.bias": (d,), "attention.qkv.weight": (3 * d, d),
            "attention.qkv.bias": (3 * d,), "attention.out.weight": (d, d), "attention.out.bias": (d,),
            "ln2.weight": (d,), "ln2.bias": (d,), "mlp.fc1.weight": (f, d), "mlp.fc1.bias": (f,),
            "mlp.fc2.weight": (d, f), "mlp.fc2.bias": (d,)}.items()})
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


@pytest.mark.parametrize("config", [CONFIG, GPT], ids=["m6", "gpt"])
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 4)])
def test_to_and_from_mcore_round_trip(config, tp, pp):
    full = _random_full(config)
    shards = convert.to_mcore_shards(full, config, tp=tp, pp=pp)
    back = convert.from_mcore(shards, config)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)
    per_stage = config.num_layers // pp
    assert all(f"decoder.layers.{per_stage - 1}.mlp.linear_fc1.weight" in shard for shard in shards[-1])
    word = shards[0][0][convert.WORD_EMBEDDINGS]
    assert word.shape[0] == config.padded_vocab_size(tp) // tp
    assert (convert.OUTPUT_LAYER in shards[-1][0]) == (pp > 1)
    if tp > 1:   # row-split QKV: each rank holds whole heads, (head, q|k|v, hd) rows
        hd, heads = config.head_dim, config.num_heads // tp
        rows = full["layers.0.attention.qkv.weight"].view(config.num_heads, 3, hd, -1)
        rank1 = shards[0][1]["decoder.layers.0.self_attention.linear_qkv.weight"].view(heads, 3, hd, -1)
        assert torch.equal(rank1, rows[heads:2 * heads])


def test_conversion_errors_name_the_problem():
    full = _random_full(CONFIG)
    with pytest.raises(ValueError, match="pp = 3 must divide"):
        convert.to_mcore_shards(full, CONFIG, tp=1, pp=3)
    with pytest.raises(ValueError, match="padded_vocab_size = 499"):
        convert.to_mcore(full, CONFIG, tp=1, pp=1, tp_rank=0, pp_rank=0, padded_vocab_size=499)
    shards = convert.to_mcore_shards(full, CONFIG, tp=2, pp=1)
    shards[0][1]["decoder.final_layernorm.bias"] += 1
    with pytest.raises(ValueError, match="differs between tp ranks"):
        convert.from_mcore(shards, CONFIG)
    shards = convert.to_mcore_shards(full, CONFIG, tp=1, pp=1)
    shards[0][0]["rotary_pos_emb.inv_freq"] = torch.ones(2)
    with pytest.raises(KeyError, match="rotary_pos_emb"):
        convert.from_mcore(shards, CONFIG)
    with pytest.raises(KeyError, match="embedding.segment.weight"):
        convert.to_mcore({k: v for k, v in full.items() if "segment" not in k}, CONFIG, tp=1, pp=1,
                         tp_rank=0, pp_rank=0)
