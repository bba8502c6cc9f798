"""m6_engine.inference: KV-cache decoding equals recomputation (also several new tokens per row at
cursors that differ between rows), batches equal one-by-one runs,
Hugging Face GPT-2 ``generate`` parity (greedy, beam search), scoring equals the training loss,
tp = 2 equals tp = 1, and the ``python -m m6_engine.generate`` CLI on a checkpoint saved with pp = 2.

Checks that need a ParallelState run in single-rank / two-rank launches (tests/distributed.py).
Random models use init_std 0.2 so next-token distributions are peaked: ties that float noise could
flip between two equal computations are then far less likely than with 0.02.
"""

import contextlib
import dataclasses
import io

import numpy as np
import pytest
import torch

from m6_engine.config import ModelConfig
from m6_engine.data.batch import MicroBatch
from m6_engine.data.tasks import SEGMENT_COMPLETE, SampleLayout, collate, pack
from m6_engine.inference import (
    GenerationConfig, Prompt, complete_text, generate, m6_prompt, pack_prompts, score,
)
from m6_engine.inference.kv_cache import extend, vocab_logits
from m6_engine.inference.loading import recorded_config
from m6_engine.inference.processors import ban_repeated_ngrams, keep_top_k, keep_top_p
from m6_engine.inference.steppers import CachedStepper, RecomputeStepper
from tests.distributed import assert_checks, init_state, run_ranks
from tests.single_rank import run_module_checks

MICRO = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=300, max_text_positions=32,
                    num_patches=4, patch_feature_dim=16, vocab_multiple=8, hidden_dropout=0.0,
                    attention_dropout=0.0, init_std=0.2)
LAYOUT = SampleLayout(num_patches=4, patch_feature_dim=16, max_text_positions=32, pad_id=0, cls_id=1,
                      sep_id=2, mask_id=3)
GPT2_CONFIGS = {   # prompt_len: the prompt given to generate
    "2x64": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=48, prompt_len=7),
    "3x48": dict(n_layer=3, n_embd=48, n_head=3, vocab_size=257, n_positions=40, n_inner=80, prompt_len=1),
}
HF_SETTINGS = (dict(num_beams=1), dict(num_beams=5),
               dict(num_beams=5, length_penalty=0.5, early_stopping=True),
               dict(num_beams=4, no_repeat_ngram_size=2, early_stopping="never", length_penalty=1.5),
               dict(num_beams=1, no_repeat_ngram_size=3))
FIGURES = {}


def _patches(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.num_patches, LAYOUT.patch_feature_dim, generator=gen)


def mixed_prompts() -> list[Prompt]:
    """Prompts of every shape: image + question, text only, image only, forced answer start, plain LM."""
    return [m6_prompt(LAYOUT, [5, 6, 7], _patches(0)), m6_prompt(LAYOUT, list(range(10, 19))),
            m6_prompt(LAYOUT, (), _patches(1)), m6_prompt(LAYOUT, [40, 41], answer_start=[20, 21]),
            m6_prompt(LAYOUT)]


def _model(state, fused: bool = True, seed: int = 1, config: ModelConfig = MICRO):
    from m6_engine.model import M6Model

    return M6Model(dataclasses.replace(config, fused_kernels=fused), state, seed=seed).eval()


def _tokens(results) -> list:
    return [(r.tokens, r.stopped) for r in results]


def _stop_mid_way(model, prompts) -> int:
    """A stop id that ends some prompts early: the 4th greedy token of the first prompt."""
    return generate(model, prompts, GenerationConfig(max_new_tokens=6), None)[0].tokens[3]


DECODINGS = {"greedy": GenerationConfig(max_new_tokens=12),
             "beam3": GenerationConfig(max_new_tokens=12, num_beams=3),
             "sample": GenerationConfig(max_new_tokens=12, do_sample=True, top_k=40, top_p=0.9,
                                        temperature=0.8, seed=7),
             "greedy-no-repeat": GenerationConfig(max_new_tokens=12, no_repeat_ngram_size=2)}


# --------------------------------------------------------------------------- checks in the rank

def _check_stepper_logits(state, fused):
    """Cached and recomputed next-token logits agree at every step, across row drops and reorders."""
    model, prompts = _model(state, fused), mixed_prompts()
    cached, full = CachedStepper(model, 12), RecomputeStepper(model, 12)
    a, b = cached.start(prompts), full.start(prompts)
    worst = (a - b).abs().max().item()
    gen = torch.Generator().manual_seed(3)
    for step in range(10):
        tokens = torch.randint(4, 300, (a.shape[0],), generator=gen)
        if step in (3, 6):     # drop a row and reorder the rest, as finished rows and beams do
            rows = torch.randperm(a.shape[0], generator=gen)[:a.shape[0] - (step == 3)]
            cached.select(rows)
            full.select(rows)
            tokens = tokens[rows]
        a, b = cached.step(tokens), full.step(tokens)
        worst = max(worst, (a - b).abs().max().item())
    FIGURES[f"cache vs recompute max |logit diff| fused={fused}"] = worst
    assert worst <= 1e-4, worst


def _check_multi_token_extend(state, fused):
    """Three new tokens per row in one pass, at cursors that differ between rows (the op's
    per-sample q_offset places them), equal three one-token steps: logits and cache."""
    model, prompts = _model(state, fused), mixed_prompts()
    once, stepped = CachedStepper(model, 3), CachedStepper(model, 3)
    once.start(prompts)
    stepped.start(prompts)
    assert len(set(once.cache.lengths.tolist())) > 1, once.cache.lengths
    tokens = torch.randint(4, 300, (len(prompts), 3), generator=torch.Generator().manual_seed(5))
    step_logits = [stepped.step(tokens[:, j]) for j in range(3)]
    cursor = once.cache.lengths
    batch = MicroBatch(tokens=tokens, position_ids=(cursor - once.prefix_len)[:, None] + torch.arange(3),
                       segment_ids=torch.full_like(tokens, SEGMENT_COMPLETE),
                       prefix_len=torch.zeros_like(cursor), valid_len=torch.full_like(cursor, 3))  # causal
    hidden = extend(model, once.cache, batch)                                      # (R, 3, d)
    worst = max((vocab_logits(model, hidden[:, j]) - step_logits[j]).abs().max().item() for j in range(3))
    FIGURES[f"3-token extend vs 3 steps max |logit diff| fused={fused}"] = worst
    assert worst <= 1e-4, worst
    assert torch.equal(once.cache.lengths, stepped.cache.lengths)
    for layer in once.cache.keys:
        torch.testing.assert_close(once.cache.keys[layer], stepped.cache.keys[layer], atol=1e-5, rtol=0)


def _check_bf16(state):
    """Half-precision weights and cache (the GPU setting) at a tiny size: cached and recomputed
    logits agree to bf16 rounding; beam search and scoring run."""
    from m6_engine.model import M6Model

    model = M6Model(MICRO, state, seed=1, dtype=torch.bfloat16).eval()
    cached, full = CachedStepper(model, 4), RecomputeStepper(model, 4)
    a, b = cached.start(mixed_prompts()), full.start(mixed_prompts())
    tokens = torch.arange(5) + 50
    a2, b2 = cached.step(tokens), full.step(tokens)
    worst = max((a - b).abs().max().item(), (a2 - b2).abs().max().item())
    FIGURES["bf16 cache vs recompute max |logit diff|"] = worst
    assert worst <= 0.05 * a.abs().max().item(), worst
    assert model.dtype == torch.bfloat16 and cached.cache.keys["0"].dtype == torch.bfloat16
    results = generate(model, mixed_prompts(), GenerationConfig(max_new_tokens=4, num_beams=2), None)
    assert all(len(r.tokens) == 4 for r in results)
    assert np.isfinite(score(model, Prompt([5, 6]), [complete_text(LAYOUT, [7, 8])])[0].log_likelihood)


def _check_cache_equals_recompute(state, fused):
    model, prompts = _model(state, fused), mixed_prompts()
    stop = _stop_mid_way(model, prompts)
    for name, config in DECODINGS.items():
        with_cache = generate(model, prompts, config, stop)
        without = generate(model, prompts, dataclasses.replace(config, use_cache=False), stop)
        assert _tokens(with_cache) == _tokens(without), name
        assert np.allclose([r.score for r in with_cache], [r.score for r in without], atol=1e-3), name
    assert any(r.stopped for r in with_cache) and not all(r.stopped for r in with_cache), _tokens(with_cache)


def _check_batched_equals_single(state):
    model, prompts = _model(state), mixed_prompts()
    stop = _stop_mid_way(model, prompts)
    for name, config in DECODINGS.items():
        if config.do_sample:   # one random stream per batch: draws depend on the batch
            continue
        batched = generate(model, prompts, config, stop)
        single = [generate(model, [p], config, stop)[0] for p in prompts]
        assert _tokens(batched) == _tokens(single), (name, _tokens(batched), _tokens(single))
    lengths = [len(r.tokens) for r in batched]
    assert len(set(lengths)) > 1, lengths      # rows really finished at different steps


def _check_sampling(state):
    model, prompts = _model(state), mixed_prompts()
    base = GenerationConfig(max_new_tokens=10, do_sample=True, seed=11)
    first, again = generate(model, prompts, base, None), generate(model, prompts, base, None)
    assert _tokens(first) == _tokens(again)
    other = generate(model, prompts, dataclasses.replace(base, seed=12), None)
    assert _tokens(first) != _tokens(other)
    greedy = _tokens(generate(model, prompts, GenerationConfig(max_new_tokens=10), None))
    for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
        assert _tokens(generate(model, prompts, dataclasses.replace(base, **narrow), None)) == greedy, narrow


def _check_length_budget(state):
    """Generation stops inside the position table even when asked for more."""
    model = _model(state)
    long_start = m6_prompt(LAYOUT, [5], answer_start=list(range(10, 38)))    # 29 of 32 positions
    (result,) = generate(model, [long_start], GenerationConfig(max_new_tokens=50, num_beams=2), None)
    assert len(result.tokens) == MICRO.max_text_positions - 29 + 1, len(result.tokens)
    (result,) = generate(model, [m6_prompt(LAYOUT)], GenerationConfig(max_new_tokens=5), None)
    assert len(result.tokens) == 5 and not result.stopped


def _check_score_equals_loss(state):
    model = _model(state)
    samples = [pack(LAYOUT, "multimodal_to_text", [5, 6, 7], [30, 31, 32, 33], _patches(2).numpy()),
               pack(LAYOUT, "text_denoising", [8, 3, 9], [8, 10, 11, 9]),
               pack(LAYOUT, "language_modelling", [], list(range(50, 70))),
               pack(LAYOUT, "image_to_text", [], [12, 13], _patches(3).numpy())]
    texts = [[30, 31, 32, 33], [8, 10, 11, 9], list(range(50, 70)), [12, 13]]
    prefixes = [Prompt([5, 6, 7], _patches(2)), Prompt([8, 3, 9]), None, Prompt((), _patches(3))]
    with torch.no_grad():
        losses = [model(collate([s], LAYOUT)).loss.item() for s in samples]
    worst = 0.0
    for loss, prefix, text in zip(losses, prefixes, texts):
        # the true text among others: each candidate is scored on its own
        scores = score(model, prefix, [complete_text(LAYOUT, [99, 98, 97]), complete_text(LAYOUT, text)])
        worst = max(worst, abs(scores[1].mean_loss - loss))
        assert scores[1].num_tokens == len(text) + 1
        assert abs(scores[1].perplexity - np.exp(loss)) <= 1e-4 * np.exp(loss)
    FIGURES["score vs training loss max |diff|"] = worst
    assert worst <= 1e-5, worst


def _raises(kind, word: str, fn, *args) -> None:
    """fn(*args) raises ``kind`` with ``word`` in its message (an AssertionError otherwise: the
    rank's Checks record assertion failures)."""
    try:
        fn(*args)
    except kind as error:
        assert word in str(error), (word, str(error))
    else:
        raise AssertionError(f"no {kind.__name__} ({word})")


def _check_errors(state):
    model = _model(state)
    model.train()
    _raises(RuntimeError, "eval", generate, model, mixed_prompts(), GenerationConfig(max_new_tokens=2), None)
    model.eval()
    _raises(ValueError, "budget", m6_prompt, LAYOUT, list(range(4, 4 + 17)))
    _raises(ValueError, "complete-text opening", generate, model, [Prompt([5, 6])], GenerationConfig(), None)
    _raises(ValueError, "patches", pack_prompts, [Prompt([5], torch.zeros(3, 16), (1,))], 4, 16)
    _raises(ValueError, "prefix of score", score, model, Prompt([5], None, (1,)),
            [complete_text(LAYOUT, [5])])


def _hf_gpt2(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    fields = {k: v for k, v in GPT2_CONFIGS[name].items() if k != "prompt_len"}
    config = GPT2Config(**fields, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or ".ln_" in pname:
                p.add_(0.1 * torch.randn_like(p))
        model.transformer.wte.weight.mul_(5.0)     # peaked distributions (see the module doc)
    return config, model


def _check_hf_parity(state, name):
    from m6_engine.convert import gpt2_model_config, gpt2_to_m6, load_full_state_dict
    from m6_engine.model import M6Model

    hf_config, hf = _hf_gpt2(name)
    config = gpt2_model_config(hf_config)
    model = M6Model(config, state).eval()
    load_full_state_dict(model, gpt2_to_m6(hf.state_dict(), config))
    prompt_len = GPT2_CONFIGS[name]["prompt_len"]
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, hf_config.vocab_size, (1, prompt_len), generator=gen)
    compared = stops = 0
    for setting in HF_SETTINGS:
        free = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                           **setting)[0, prompt_len:].tolist()
        stop = free[5]                    # a stop that some beams reach mid-way
        stopped = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=stop,
                              pad_token_id=stop, **setting)[0, prompt_len:].tolist()
        for eos, theirs in ((None, free), (stop, stopped)):
            (ours,) = generate(model, [Prompt(complete_ids=prompt[0].tolist())],
                               GenerationConfig(max_new_tokens=20, **setting), eos)
            mine = list(ours.tokens) + ([eos] if ours.stopped else [])
            assert mine == theirs, (name, setting, eos, mine, theirs)
            compared, stops = compared + 1, stops + ours.stopped
    assert stops >= 2, stops                  # the stop token really ended some generations
    FIGURES[f"hf parity {name}: generations compared"] = compared


CHECKS = {
    **{f"stepper logits fused={f}": (lambda s, f=f: _check_stepper_logits(s, f)) for f in (True, False)},
    **{f"cache equals recompute fused={f}": (lambda s, f=f: _check_cache_equals_recompute(s, f))
       for f in (True, False)},
    **{f"multi-token extend fused={f}": (lambda s, f=f: _check_multi_token_extend(s, f)) for f in (True, False)},
    "bf16": _check_bf16,
    "batched equals single": _check_batched_equals_single,
    "sampling": _check_sampling,
    "length budget": _check_length_budget,
    "score equals loss": _check_score_equals_loss,
    "errors": _check_errors,
    **{f"hf parity {n}": (lambda s, n=n: _check_hf_parity(s, n)) for n in GPT2_CONFIGS},
}


@pytest.fixture(scope="module")
def single():
    pytest.importorskip("transformers")
    return run_module_checks(__name__)


@pytest.mark.parametrize("name", list(CHECKS))
def test_inference(single, name):
    assert_checks([single["checks"]], name)


# --------------------------------------------------------------------------- tp = 2 and the CLI

# The real vocabulary and 16 x 2048 patches (the pixels extractor's features).
CLI_CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_text_positions=32,
                         hidden_dropout=0.0, attention_dropout=0.0, init_std=0.2)


def _two_ranks(ckpt_dir: str) -> dict:
    """tp = 2 decoding and scoring vs tp = 1 (dp = 2) in the same ranks; then save a pp = 2 checkpoint."""
    from m6_engine.checkpoint import save_checkpoint
    from m6_engine.model import M6Model

    out = {}
    tp2, tp1 = init_state(tp=2), init_state(tp=1)
    big, small = _model(tp2), _model(tp1)
    prompts = mixed_prompts()
    for name, config in DECODINGS.items():
        out[name] = (_tokens(generate(big, prompts, config, 2)), _tokens(generate(small, prompts, config, 2)))
    candidates = [complete_text(LAYOUT, [30, 31]), complete_text(LAYOUT, [7, 8, 9])]
    out["score"] = [[s.log_likelihood for s in score(m, Prompt([5, 6], _patches(4)), candidates)]
                    for m in (big, small)]
    pp2 = init_state(tp=1, pp=2)
    save_checkpoint(ckpt_dir, 3, model=M6Model(CLI_CONFIG, pp2, seed=5), state=pp2, config=CLI_CONFIG)
    return out


def _cli_rank(argv: list) -> tuple[str, str]:
    """(what ``python -m m6_engine.generate`` prints, the text generate() gives the seed model)."""
    from m6_engine import generate as cli
    from m6_engine.data.tokenizer import BertWordPieceTokenizer, default_vocab_path
    from m6_engine.data.vision import ExtractorConfig
    from m6_engine.inference.loading import image_features

    state = init_state()
    tokenizer = BertWordPieceTokenizer(default_vocab_path())
    layout = SampleLayout.from_model(CLI_CONFIG, tokenizer)
    model = _model(state, seed=5, config=CLI_CONFIG)
    image = argv[argv.index("--image") + 1]
    patches = image_features(image, ExtractorConfig(name="pixels"))
    prompt = m6_prompt(layout, tokenizer.encode("图中是什么？答："), patches)
    (expected,) = generate(model, [prompt], GenerationConfig(max_new_tokens=8, num_beams=3), layout.sep_id)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    return printed.getvalue(), tokenizer.decode(expected.tokens, skip_special_tokens=True)


def test_tp2_and_pp2_checkpoint_cli(tmp_path):
    from PIL import Image

    (result, _) = run_ranks(_two_ranks, 2, str(tmp_path / "ckpt"))
    for name in DECODINGS:
        tp2, tp1 = result[name]
        assert tp2 == tp1, (name, tp2, tp1)
    assert np.allclose(*result["score"], atol=1e-4), result["score"]

    pixels = np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "image.png"),
            "--prompt", "图中是什么？答：", "--beams", "3", "--max-new-tokens", "8",
            "--extractor", "pixels"]  # save_checkpoint without inputs= records no extractor
    (printed, expected) = run_ranks(_cli_rank, 1, argv, torchrun_env=False)[0]
    assert printed == expected + "\n", (printed, expected)


# --------------------------------------------------------------------------- no process group

def test_processors():
    scores = torch.zeros(2, 6)
    banned = ban_repeated_ngrams(scores, [[1, 2, 3, 1, 2], [4, 4]], 3)
    assert torch.isinf(banned[0, 3]) and torch.isfinite(banned[0]).sum() == 5   # "1 2" was followed by 3
    assert torch.isfinite(banned[1]).all()                # [4, 4] holds no 3-gram yet
    assert torch.isinf(ban_repeated_ngrams(scores, [[4, 4]], 2)[0, 4])
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isfinite(keep_top_k(logits, 2)).tolist() == [[True, False, True, False]]
    probs = torch.softmax(logits, -1)[0]                    # 0.64, 0.09, 0.24, 0.03
    assert torch.isfinite(keep_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(keep_top_p(logits, float(probs[0] + 0.01))).tolist() == [[True, False, True, False]]


def test_recorded_config():
    job_like = {"model": dataclasses.asdict(MICRO), "data": {"vocab_file": "v.txt"}}
    assert recorded_config({"config": job_like}, "ckpt") == (MICRO, "v.txt")
    assert recorded_config({"config": dataclasses.asdict(MICRO)}, "ckpt") == (MICRO, "")
    with pytest.raises(Exception, match="records no model config"):
        recorded_config({"config": None}, "ckpt")


def test_generation_config_errors():
    from m6_engine.config import ConfigError

    for bad, word in ((dict(num_beams=2, do_sample=True), "do_sample"), (dict(top_p=0.0), "top_p"),
                      (dict(early_stopping="sometimes"), "early_stopping"),
                      (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(ConfigError, match=word):
            GenerationConfig(**bad)


def test_pack_prompts_layout():
    packed = pack_prompts(mixed_prompts(), LAYOUT.num_patches, LAYOUT.patch_feature_dim)
    assert packed.prefix_len.tolist() == [7, 9, 4, 2, 0]
    assert packed.valid_len.tolist() == [8, 10, 5, 5, 1]
    batch = packed
    assert batch.num_image_patches.tolist() == [4, 0, 4, 0, 0]
    assert batch.position_ids[0, :8].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert batch.segment_ids[3, :5].tolist() == [1, 1, 2, 2, 2]
    assert batch.tokens[3, :5].tolist() == [40, 41, 1, 20, 21]
    # The same layout as a training sample of the same parts.
    sample = pack(LAYOUT, "multimodal_to_text", [5, 6, 7], [], _patches(0).numpy())
    assert batch.position_ids[0, :8].tolist() == sample.position_ids[:8].tolist()
    assert batch.segment_ids[0, :8].tolist() == sample.segment_ids[:8].tolist()
