"""m6_engine.convert against Hugging Face transformers (a test dependency only): a GPT-2 imported
into M6 gives GPT2LMHeadModel's logits (fp32, within 1e-5) on the fused and the reference path,
export gives GPT-2's weights back, and BERT's word embedding lands in M6's vocab-parallel table.
The checks that need a ParallelState run in one single-rank launch (tests/distributed.py)."""

import dataclasses

import pytest
import torch

from m6_engine.config import ConfigError, model_preset
from m6_engine.data.batch import MicroBatch
from m6_engine.convert import (
    bert_word_embeddings, full_state_dict, gpt2_model_config, gpt2_to_m6, load_full_state_dict,
    m6_to_gpt2,
)
from tests.distributed import assert_checks
from tests.single_rank import run_module_checks

# Small random GPT-2s: the default shape, and one with an odd vocabulary (not a multiple of 128),
# an explicit FFN width and 3 heads.
GPT2_CONFIGS = {
    "2x64": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=32,
                 bos_token_id=0, eos_token_id=0),
    "3x48": dict(n_layer=3, n_embd=48, n_head=3, vocab_size=257, n_positions=24, n_inner=80,
                 bos_token_id=0, eos_token_id=0),
}
FIGURES = {}


def _gpt2(name: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**GPT2_CONFIGS[name])
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():   # random LayerNorm and bias values too, so every mapping is exercised
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or ".ln_" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return config, model


def _causal_batch(tokens, valid_len=None):
    b, s = tokens.shape
    return MicroBatch(tokens=tokens, position_ids=torch.arange(s).expand(b, s),
                      prefix_len=torch.zeros(b, dtype=torch.long),
                      valid_len=torch.full((b,), s) if valid_len is None else valid_len)


def _m6_from_gpt2(state, hf_config, hf_model, fused: bool):
    from m6_engine.model import M6Model

    config = dataclasses.replace(gpt2_model_config(hf_config), fused_kernels=fused)
    model = M6Model(config, state).eval()
    load_full_state_dict(model, gpt2_to_m6(hf_model.state_dict(), config))
    return config, model


def _check_gpt2_logits(state, name, fused):
    hf_config, hf = _gpt2(name)
    config, model = _m6_from_gpt2(state, hf_config, hf, fused)
    gen = torch.Generator().manual_seed(1)
    s = hf_config.n_positions
    tokens = torch.randint(0, hf_config.vocab_size, (3, s), generator=gen)
    with torch.no_grad():
        ours, theirs = model.logits(_causal_batch(tokens)), hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    FIGURES[f"gpt2 {name} fused={fused} max |logit diff|"] = diff
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert diff <= 1e-5, diff
    # Right padding: valid positions equal GPT-2 run on the unpadded sequences.
    valid = torch.tensor([s, s - 5, 7])
    with torch.no_grad():
        padded = model.logits(_causal_batch(tokens, valid))
        for b, v in enumerate(valid.tolist()):
            d = (padded[b, :v] - hf(tokens[b:b + 1, :v]).logits[0]).abs().max().item()
            assert d <= 1e-5, (b, v, d)


def _check_round_trips(state):
    from transformers import GPT2LMHeadModel

    from m6_engine.model import M6Model

    hf_config, hf = _gpt2("3x48", seed=3)
    config = gpt2_model_config(hf_config)
    original = hf.state_dict()
    exported = m6_to_gpt2(gpt2_to_m6(original, config), config)
    assert set(exported) == set(original), set(exported) ^ set(original)
    for key, value in original.items():
        assert torch.equal(exported[key], value), key
    # An M6 initialised by the engine exports to a GPT-2 that loads strictly and agrees with it.
    model = M6Model(config, state, seed=9).eval()
    full = full_state_dict(model)
    assert full["embedding.word.weight"].shape == (257, 48)   # vocabulary padding dropped
    fresh = GPT2LMHeadModel(hf_config).eval()
    fresh.load_state_dict(m6_to_gpt2(full, config), strict=True)
    tokens = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model.logits(_causal_batch(tokens)) - fresh(tokens).logits).abs().max().item()
    FIGURES["exported M6 -> GPT-2 max |logit diff|"] = diff
    assert diff <= 1e-5, diff
    back = gpt2_to_m6(m6_to_gpt2(full, config), config)
    assert set(back) == set(full) and all(torch.equal(back[k], v) for k, v in full.items())


def _check_bert_embeddings(state):
    from transformers import BertConfig, BertModel

    from m6_engine.model import M6Model

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_size=128))
    config = model_preset("tiny", vocab_size=500, hidden_size=64, num_heads=4, num_layers=2)
    model = M6Model(config, state)
    full = full_state_dict(model)
    full.update(bert_word_embeddings(bert.state_dict(), config))
    load_full_state_dict(model, full)
    word = model.embedding.word
    ids = torch.arange(500)
    assert torch.equal(word(ids), bert.embeddings.word_embeddings(ids).detach())
    assert torch.all(word.weight[500:] == 0)                 # padding rows stay zero
    # BertForPreTraining names ("bert." prefix) work too.
    prefixed = {f"bert.{k}": v for k, v in bert.state_dict().items()}
    assert torch.equal(bert_word_embeddings(prefixed, config)["embedding.word.weight"],
                       bert.embeddings.word_embeddings.weight.detach())
    wider = dataclasses.replace(config, hidden_size=128)
    try:
        bert_word_embeddings(bert.state_dict(), wider)
    except ConfigError as error:
        assert "hidden_size" in str(error)
    else:
        raise AssertionError("a BERT of another width was accepted")


def _check_load_errors(state):
    from m6_engine.model import M6Model

    hf_config, hf = _gpt2("2x64")
    config = gpt2_model_config(hf_config)
    model = M6Model(config, state)
    for bad, word in ((hf.state_dict(), "convert first"),
                      ({k: v for k, v in gpt2_to_m6(hf.state_dict(), config).items()
                        if k != "layers.1.mlp.fc1.bias"}, "lacks")):
        try:
            load_full_state_dict(model, bad)
        except KeyError as error:
            assert word in str(error), error
        else:
            raise AssertionError(f"load_full_state_dict accepted a bad state dict ({word})")


CHECKS = {
    **{f"gpt2 {name} logits fused={fused}": (lambda s, n=name, f=fused: _check_gpt2_logits(s, n, f))
       for name in GPT2_CONFIGS for fused in (True, False)},
    "round trips": _check_round_trips,
    "bert embeddings": _check_bert_embeddings,
    "load errors": _check_load_errors,
}


@pytest.fixture(scope="module")
def single():
    return run_module_checks(__name__)


@pytest.mark.parametrize("name", list(CHECKS))
def test_convert(single, name):
    assert_checks([single["checks"]], name)


def test_gpt2_config_mapping_and_errors():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(**GPT2_CONFIGS["3x48"])
    config = gpt2_model_config(hf_config)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.ffn_size) == (3, 48, 3, 80)
    assert (config.num_patches, config.num_segments, config.max_text_positions) == (0, 0, 24)
    for change, word in ((dict(activation_function="relu"), "activation_function"),
                         (dict(embd_pdrop=0.0), "embd_pdrop"),
                         (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx")):
        bad = transformers.GPT2Config(**{**GPT2_CONFIGS["2x64"], **change})
        with pytest.raises(ConfigError, match=word):
            gpt2_model_config(bad)
    with pytest.raises(ConfigError, match="num_patches"):
        gpt2_to_m6({}, model_preset("tiny"))
