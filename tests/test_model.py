"""M6Model on one process: parameter counts, initialisation by global name, fused vs reference
kernels, the prefix-LM mask seen from the outputs, recomputation, per-task losses, FLOPs, config
errors. Everything that needs a ParallelState runs in one single-rank launch (tests/distributed.py)."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from m6_engine.parallel.roles import param_role
from m6_engine.config import ConfigError, ModelConfig, model_preset
from m6_engine.data.tasks import TASK_IDS
from m6_engine.model import (
    ForwardStep, M6Model, allowed_pairs, batch_forward_flops, check_recompute, forward_flops,
    parameter_count, stage_layer_range,
)
from m6_engine.ops import prefix_lm_mask
from m6_engine.parallel import init_generator, master_weight, normal_init, seed_parallel_rng
from tests.distributed import assert_checks
from tests.single_rank import run_module_checks
from tests.m6_data import mixed_batch, task_batch

TINY = model_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
MICRO = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, vocab_size=300, max_text_positions=32,
                    num_patches=4, patch_feature_dim=16, vocab_multiple=8, hidden_dropout=0.0,
                    attention_dropout=0.0)
FIGURES = {}


# --------------------------------------------------------------------------- checks in the rank

def _check_param_counts(state):
    for name, paper in (("m6-base", 327e6), ("m6-large", 10e9)):
        config = model_preset(name)
        model = M6Model(config, state, device="meta")
        count = sum(p.numel() for p in model.parameters())
        FIGURES[f"{name} parameters"] = count
        assert count == parameter_count(config), (count, parameter_count(config))
        assert abs(count - paper) <= 0.03 * paper, f"{name}: {count} vs the paper's {paper:.3g}"
        assert all(p.device.type == "meta" for p in model.parameters())
    for config in (TINY, dataclasses.replace(TINY, itm_head=True)):
        model = M6Model(config, state)
        assert sum(p.numel() for p in model.parameters()) == parameter_count(config)


def _check_init_by_global_name(state):
    """Every N(0, std) weight is the master drawn from its own global name: names are the global
    ones and no two parameters share a generator."""
    model = M6Model(TINY, state, seed=3)
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "embedding.word.weight" and "layers.3.mlp.fc2.weight" in names, names
    assert "final_ln.weight" in names
    sharded = {n for n, p in model.named_parameters() if param_role(p).tp_dim is not None}
    assert sharded == {"embedding.word.weight"} | {
        f"layers.{i}.{m}" for i in range(4) for m in ("attention.qkv.weight", "attention.qkv.bias",
                                                      "attention.out.weight", "mlp.fc1.weight",
                                                      "mlp.fc1.bias", "mlp.fc2.weight")}, sharded
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".ln" in name or name.startswith("final_ln"):
            assert torch.all(p == (1.0 if name.endswith("ln1.weight") or name.endswith("ln2.weight")
                                   or name == "final_ln.weight" else 0.0)), name
            continue
        want = master_weight(tuple(p.shape), init_generator(3, name), normal_init(TINY.init_std))
        if name == "embedding.word.weight":
            assert torch.all(p[TINY.vocab_size:] == 0)
            p, want = p[:TINY.vocab_size], master_weight((TINY.vocab_size, p.shape[1]),
                                                         init_generator(3, name), normal_init(0.02))
        assert torch.equal(p.detach(), want), name


def _check_fused_matches_reference(state):
    batch = mixed_batch(TINY, 0, 4)
    outs = {}
    for fused in (True, False):
        model = M6Model(dataclasses.replace(TINY, fused_kernels=fused), state, seed=1).eval()
        logits = model.logits(batch)
        loss = model(batch).loss
        loss.backward()
        outs[fused] = (logits.detach(), loss.detach(),
                       {n: p.grad for n, p in model.named_parameters()})
    diff = (outs[True][0] - outs[False][0]).abs().max().item()
    FIGURES["fused vs reference max |logit diff|"] = diff
    assert outs[True][0].shape == (4, TINY.num_patches + TINY.max_text_positions, TINY.vocab_size)
    assert diff <= 1e-5, diff
    assert abs(outs[True][1] - outs[False][1]) <= 1e-6 * outs[False][1]
    grad_diff = max((outs[True][2][n] - g).abs().max().item() for n, g in outs[False][2].items())
    FIGURES["fused vs reference max |grad diff|"] = grad_diff
    assert grad_diff <= 1e-6, grad_diff


def _changed_rows(a, b, tol):
    """Per position of one sample: does the output differ by more than tol?"""
    return ((a - b).abs().amax(dim=-1) > tol).tolist()


def _check_mask_observable(state, fused):
    """Outputs change exactly where the prefix-LM mask says information may flow."""
    model = M6Model(dataclasses.replace(TINY, fused_kernels=fused), state, seed=2).eval()
    batch = task_batch(TINY, ["multimodal_to_text", "language_modelling", "text_denoising"])
    base = model.hidden_states(batch)
    unchanged_tol, changed_tol = 1e-6, 1e-5
    prefix, valid = batch.prefix_len.tolist(), batch.valid_len.tolist()

    def edit(sample, key, position, fn):
        edited = dataclasses.replace(batch, **{key: getattr(batch, key).clone()})
        fn(getattr(edited, key)[sample], position)
        out = model.hidden_states(edited)
        others = [i for i in range(len(prefix)) if i != sample]
        assert (out[others] - base[others]).abs().max() <= unchanged_tol, "another sample changed"
        return _changed_rows(out[sample, :valid[sample]], base[sample, :valid[sample]], changed_tol)

    def new_token(row, p):
        row[p] = 104 + (int(row[p]) + 7) % 150

    for sample in range(3):
        p, v = prefix[sample], valid[sample]
        c = p + 3                                     # a complete-text position
        changed = edit(sample, "tokens", c, new_token)
        assert changed == [False] * c + [True] * (v - c), (sample, changed)
        if p > 0:                                     # a prefix token reaches every valid position
            changed = edit(sample, "tokens", p - 1, new_token)
            assert changed == [True] * v, (sample, changed)
        if v + 1 < batch.tokens.shape[1]:          # a pad token reaches none
            changed = edit(sample, "tokens", v + 1, new_token)
            assert changed == [False] * v, (sample, changed)
    # A patch feature (sample 0 has an image) reaches every valid position.
    changed = edit(0, "patches", 5, lambda row, i: row[i].add_(1.0))
    assert changed == [True] * valid[0], changed


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_recompute_replays_dropout(state, backend):
    # Each backend draws its attention dropout its own way (the fused op from a seed it takes off the
    # stream, the others from the generator); recompute must replay every one of them.
    config = dataclasses.replace(TINY, hidden_dropout=0.1, attention_dropout=0.1, attention_backend=backend)
    batch = mixed_batch(config, 8, 2)
    results = {}
    for mode in ("none", "selective", "full"):
        tracker = seed_parallel_rng(11, state)
        model = M6Model(config, state, seed=5, recompute=mode, rng_tracker=tracker).train()
        loss = model(batch).loss
        loss.backward()
        results[mode] = (loss.detach(), _grads(model))
    eval_loss = M6Model(config, state, seed=5).eval()(batch).loss.detach()
    assert abs(eval_loss - results["none"][0]) > 1e-3, "dropout had no effect: the check is vacuous"
    attention_only = dataclasses.replace(config, hidden_dropout=0.0)
    tracker = seed_parallel_rng(11, state)
    attention_loss = M6Model(attention_only, state, seed=5, rng_tracker=tracker).train()(batch).loss.detach()
    assert abs(eval_loss - attention_loss) > 1e-4, "attention dropout had no effect: the check is vacuous"
    for mode in ("selective", "full"):
        assert torch.equal(results[mode][0], results["none"][0]), mode
        diff = max((g - results["none"][1][n]).abs().max().item() for n, g in results[mode][1].items())
        FIGURES[f"recompute {mode} ({backend}) max |grad diff|"] = diff
        assert diff <= 1e-7, (mode, diff)


def _check_attention_backends_agree(state):
    batch = mixed_batch(TINY, 20, 4)
    results = {}
    for backend in ("unfused", "fused", "sdpa"):
        model = M6Model(dataclasses.replace(TINY, attention_backend=backend), state, seed=3).train()
        assert model.ops.attention_backend == backend
        loss = model(batch).loss
        loss.backward()
        results[backend] = (loss.detach(), _grads(model))
    for backend in ("fused", "sdpa"):
        loss_diff = (results[backend][0] - results["unfused"][0]).abs().item()
        grad_diff = max((g - results["unfused"][1][n]).abs().max().item() for n, g in results[backend][1].items())
        FIGURES[f"{backend} vs unfused |loss diff|, max |grad diff|"] = (loss_diff, grad_diff)
        assert loss_diff <= 1e-5 and grad_diff <= 1e-5, (backend, loss_diff, grad_diff)
    assert M6Model(TINY, state).ops.attention_backend == "fused"                  # auto, with the extension
    assert M6Model(dataclasses.replace(TINY, fused_kernels=False), state).ops.attention_backend == "unfused"


def _check_loss_outputs(state):
    batch = mixed_batch(TINY, 20, 6)
    model = M6Model(TINY, state, seed=1).eval()
    out = model(batch)
    mask = batch.loss_mask
    assert out.num_tokens.item() == mask.sum().item()
    assert abs(out.loss.item() - out.loss_sum.item() / out.num_tokens.item()) < 1e-6
    assert torch.allclose(out.task_loss_sum.sum(), out.loss_sum)
    for task, i in TASK_IDS.items():
        rows = batch.task_ids == i
        assert out.task_num_tokens[i].item() == mask[rows].sum().item(), task
    # The per-token loss equals a plain cross entropy over the full logits.
    logits = model.logits(batch)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
    want = (ce * mask.flatten()).sum() / mask.sum()
    assert abs(out.loss.item() - want.item()) <= 1e-5 * want.item(), (out.loss, want)
    assert 0.9 * torch.log(torch.tensor(21128.0)) < out.loss < 1.1 * torch.log(torch.tensor(21128.0))
    # ForwardStep returns the transformed loss to the schedule and keeps the plain one.
    step = ForwardStep(loss_transform=lambda loss: 8.0 * loss)
    returned = step(iter([batch]), model, None)
    assert torch.equal(returned, 8.0 * out.loss) and torch.equal(step.outputs[0].loss, out.loss)
    # A text-only batch may leave out the patch inputs.
    text = task_batch(TINY, ["language_modelling", "text_denoising"])
    without = dataclasses.replace(text, patches=None, num_image_patches=None)
    assert torch.equal(model(text).loss, model(without).loss)


def _check_flops(state):
    batch = mixed_batch(TINY, 30, 3)
    model = M6Model(TINY, state).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch)
    want = batch_forward_flops(TINY, batch, dense=True)
    FIGURES["tiny dense forward FLOPs (counted, formula)"] = (counter.get_total_flops(), want)
    assert counter.get_total_flops() == want, (counter.get_total_flops(), want)
    model_flops = batch_forward_flops(TINY, batch)
    assert 0 < model_flops < want
    for p, v, s in ((0, 7, 9), (4, 4, 6), (3, 10, 12), (0, 0, 3)):
        mask = prefix_lm_mask(torch.tensor([p]), torch.tensor([v]), s, s)
        assert allowed_pairs(p, v) == int(mask.sum()), (p, v)
    one = forward_flops(TINY, prefix_len=0, valid_len=10, loss_tokens=9, image_patches=0)
    d, f, L = TINY.hidden_size, TINY.ffn_size, TINY.num_layers
    assert one == L * (2 * 10 * (4 * d * d + 2 * d * f) + 4 * d * 55) + 2 * 9 * d * TINY.vocab_size


def _check_half_precision(state):
    batch = mixed_batch(MICRO, 0, 3)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = M6Model(MICRO, state, seed=4, dtype=dtype).eval()
        out = model(batch)
        out.loss.backward()
        assert out.loss.dtype == torch.float32
        assert all(p.dtype == dtype and p.grad.dtype == dtype for p in model.parameters())
        losses[dtype] = out.loss.item()
    FIGURES["bf16 vs fp32 loss"] = (losses[torch.bfloat16], losses[torch.float32])
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) < 2e-2 * losses[torch.float32], losses


def _check_stage_input_errors(state):
    model = M6Model(TINY, state, pre_process=False, post_process=False)
    assert model.embedding is None and model.final_ln is None
    try:
        model(mixed_batch(TINY, 0, 1))
    except ValueError as error:
        assert "input_tensor" in str(error)
    else:
        raise AssertionError("a stage without embedding ran without input_tensor")
    hidden = model(mixed_batch(TINY, 0, 1), torch.zeros(1, 144, TINY.hidden_size))
    assert hidden.shape == (1, 144, TINY.hidden_size)
    assert model.activation_spec(2, 144).shape == (2, 144, TINY.hidden_size)


CHECKS = {
    "param counts": _check_param_counts,
    "init by global name": _check_init_by_global_name,
    "fused matches reference": _check_fused_matches_reference,
    "mask observable fused": lambda s: _check_mask_observable(s, True),
    "mask observable reference": lambda s: _check_mask_observable(s, False),
    "recompute replays dropout (fused)": lambda s: _check_recompute_replays_dropout(s, "fused"),
    "recompute replays dropout (unfused)": lambda s: _check_recompute_replays_dropout(s, "unfused"),
    "recompute replays dropout (sdpa)": lambda s: _check_recompute_replays_dropout(s, "sdpa"),
    "attention backends agree": _check_attention_backends_agree,
    "loss outputs": _check_loss_outputs,
    "flops": _check_flops,
    "half precision": _check_half_precision,
    "stage input errors": _check_stage_input_errors,
}


@pytest.fixture(scope="module")
def single():
    return run_module_checks(__name__)


@pytest.mark.parametrize("name", list(CHECKS))
def test_model(single, name):
    assert_checks([single["checks"]], name)


# --------------------------------------------------------------------------- pure (no processes)

@pytest.mark.parametrize("fields, tp, pp, field", [
    (dict(num_heads=5), 1, 1, "num_heads"),
    (dict(num_segments=-1), 1, 1, "num_segments"),
    (dict(num_patches=-2), 1, 1, "num_patches"),
    (dict(attention_dropout=1.0), 1, 1, "attention_dropout"),
    (dict(attention_backend="flash"), 1, 1, "attention_backend"),
    ({}, 3, 1, "hidden_size"),
    (dict(num_heads=2, hidden_size=128), 4, 1, "num_heads"),
    (dict(ffn_hidden_size=100), 8, 1, "num_heads"),
    (dict(ffn_hidden_size=100), 4, 1, None),
    (dict(ffn_hidden_size=100, hidden_size=96, num_heads=3), 3, 1, "ffn_hidden_size"),
    ({}, 1, 5, "num_layers"),
])
def test_config_errors_name_the_field(fields, tp, pp, field):
    def build():
        model_preset("tiny", **fields).check_layout(tp, pp)
    if field is None:
        build()
        return
    with pytest.raises(ConfigError, match=field):
        build()


def test_recompute_mode_is_checked():
    assert check_recompute("selective") == "selective"
    with pytest.raises(ConfigError, match="recompute"):
        check_recompute("everything")


def test_stage_layer_range_covers_every_layer_once():
    for layers in (4, 5, 24, 50):
        for pp in range(1, min(layers, 8) + 1):
            ranges = [stage_layer_range(layers, pp, k) for k in range(pp)]
            assert [i for r in ranges for i in r] == list(range(layers))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError):
        stage_layer_range(2, 3, 0)


def test_parameter_count_formula_pads_vocab_for_tp():
    config = model_preset("m6-base")
    assert parameter_count(config, tp=4) - parameter_count(config) == \
        (config.padded_vocab_size(4) - config.padded_vocab_size(1)) * config.hidden_size


def test_attention_backend_that_cannot_run_names_the_field():
    from m6_engine import ops
    with pytest.raises(ValueError, match="attention_backend 'fused' contradicts fused_kernels=False"):
        ops.select_ops(False, "fused", "cpu")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        ops.resolve_attention_backend("flash", True, "cpu")
    assert ops.select_ops(False, "sdpa", "cpu").attention is ops.sdpa_attention
    assert ops.select_ops(True, "unfused", "cpu").attention is None
