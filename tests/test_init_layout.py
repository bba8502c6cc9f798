"""The initial weights of M6 do not depend on the layout, and each rank draws only its shards.

One process (tp 1, pp 1) and four ranks (tp 2, pp 2) build the same model from the same seed; the
four ranks' shards, gathered (``convert.full_state_dict``), must equal the one process's weights
bit for bit, which must equal each full weight drawn whole by ``normal_init`` (the per-shard draw
against drawing the full tensor and slicing), in fp32 and drawn directly in bf16 (= the fp32 values
rounded). A custom InitMethod (here the former scheme, torch's mt19937 ``normal_`` of the full
master weight) keeps its full-draw-then-slice path, equally layout-independent. A resumed build
(``draw_weights=False``) and a meta build call no draw; the vocabulary's padding rows are zero.
"""

import pytest
import torch

from m6_engine.config import model_preset
from m6_engine.model.embeddings import WORD_EMBEDDING
from m6_engine.parallel.init import init_generator, master_weight, mt19937_normal_init, normal_init
from tests.distributed import init_state, run_ranks

# Two layers for pp 2; a vocabulary whose tp-2 padding (to a multiple of 2 * 64) leaves rank 1 with
# 24 padding rows.
CONFIG = model_preset("tiny", num_layers=2, vocab_size=1000, vocab_multiple=64, max_text_positions=32)
SEED = 11


def _padding_max(model) -> float:
    """The largest |value| in this stage's padding rows of the word embedding (0 without any)."""
    word = model.embedding.word if model.embedding is not None else None
    return word.weight[word.real_rows:].abs().max().item() if word is not None and word.shard_has_padding else 0.0


def _rank_builds(tp: int, pp: int) -> dict:
    from m6_engine import ops
    from m6_engine.convert import full_state_dict
    from m6_engine.model import M6Model

    state = init_state(tp, pp)
    calls, draw = [], ops.normal_shard_

    def counted(out, *args, **kwargs):   # every per-shard draw, by the shape of its block
        calls.append(tuple(out.shape))
        return draw(out, *args, **kwargs)

    ops.normal_shard_ = counted
    models = {name: M6Model(CONFIG, state, seed=SEED, dtype=dtype, init_method=method)
              for name, dtype, method in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                          ("mt19937", torch.float32, mt19937_normal_init(CONFIG.init_std)))}
    drawn_shapes = list(calls)
    calls.clear()
    resumed = M6Model(CONFIG, state, seed=SEED, draw_weights=False)
    M6Model(CONFIG, state, seed=SEED, device="meta")
    built = {name: full_state_dict(model) for name, model in models.items()}
    return {"built": built if state.rank == 0 else None, "drawn_shapes": drawn_shapes,
            "resume_and_meta_draws": len(calls), "tp_rank": state.tp_rank,
            "padding_max": [_padding_max(models["fp32"]), _padding_max(models["mt19937"]), _padding_max(resumed)],
            "has_padding": models["fp32"].embedding is not None and models["fp32"].embedding.word.shard_has_padding}


@pytest.fixture(scope="module")
def single():
    return run_ranks(_rank_builds, 1, 1, 1)[0]


@pytest.fixture(scope="module")
def layout():
    return run_ranks(_rank_builds, 4, 2, 2)


def test_the_weights_are_the_same_for_every_layout(single, layout):
    for name in ("fp32", "bf16", "mt19937"):
        want, got = single["built"][name], layout[0]["built"][name]
        assert set(want) == set(got)
        differing = [k for k in want if not torch.equal(want[k], got[k])]
        assert not differing, f"{name}: tp 2 x pp 2 differs from one process in {differing}"


def test_each_weight_is_the_full_weight_drawn_whole(single):
    fp32 = single["built"]["fp32"]
    for name, weight in fp32.items():
        if name.endswith("weight") and weight.dim() == 2:   # the N(0, std) matrices (LayerNorm gains are 1-D)
            whole = master_weight(tuple(weight.shape), init_generator(SEED, name), normal_init(CONFIG.init_std))
            assert torch.equal(weight, whole), name
            old = master_weight(tuple(weight.shape), init_generator(SEED, name), mt19937_normal_init(CONFIG.init_std))
            assert torch.equal(single["built"]["mt19937"][name], old), name
            assert not torch.equal(weight, old), f"{name}: the default draw should not be torch's mt19937 stream"
    assert {name: w.to(torch.bfloat16) for name, w in fp32.items()}.keys() == single["built"]["bf16"].keys()
    for name, weight in fp32.items():
        assert torch.equal(single["built"]["bf16"][name], weight.to(torch.bfloat16)), name


def test_each_rank_draws_only_its_shards(single, layout):
    whole = sum(torch.Size(s).numel() for s in single["drawn_shapes"])
    for rank in layout:
        drawn = sum(torch.Size(s).numel() for s in rank["drawn_shapes"])
        assert drawn < 0.6 * whole, (drawn, whole)   # about 1/4 of the blocks, 1/2 of the embedding
    word_rows = [s[0] for s in single["drawn_shapes"] if len(s) == 2 and s[1] == CONFIG.hidden_size]
    assert CONFIG.vocab_size in word_rows   # one process draws the real rows only, not the padding


def test_a_resumed_or_meta_build_draws_nothing_and_padding_is_zero(single, layout):
    for rank in [single, *layout]:
        assert rank["resume_and_meta_draws"] == 0
        assert all(p == 0.0 for p in rank["padding_max"]), rank["padding_max"]
    assert single["has_padding"] and any(rank["tp_rank"] == 1 and rank["has_padding"] for rank in layout)


def test_the_word_embedding_is_drawn_over_its_real_rows_only(single):
    word = single["built"]["fp32"][WORD_EMBEDDING]
    assert word.shape == (CONFIG.vocab_size, CONFIG.hidden_size)
    assert word.std().item() == pytest.approx(CONFIG.init_std, rel=0.02)
