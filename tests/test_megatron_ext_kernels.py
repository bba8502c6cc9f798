"""megatron_ext's drop-in kernels and norm, single process on the CPU, against megatron-core's own
torch paths: FusedScaleMaskSoftmax with fusion off (the oracle) vs with our kernels installed."""

import ast
import pathlib
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install '.[megatron]')")

from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.transformer.utils import attention_mask_func  # noqa: E402

import megatron_ext  # noqa: E402
from m6_engine.ops import prefix_lm_mask  # noqa: E402
from megatron_ext import kernels  # noqa: E402
from megatron_ext.config import no_deprecated_defaults  # noqa: E402
from megatron_ext.norm import M6LayerNorm  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
       torch.float16: dict(atol=1e-3, rtol=1e-3)}


def _softmax(mask_type, fused, dtype, scale=None):
    return FusedScaleMaskSoftmax(input_in_fp16=dtype == torch.float16, input_in_bf16=dtype == torch.bfloat16,
                                 attn_mask_type=mask_type, scaled_masked_softmax_fusion=fused,
                                 mask_func=attention_mask_func, softmax_in_fp32=True, scale=scale)


def _run(module, x0, mask, dy):
    x = x0.detach().clone().requires_grad_(True)
    y = module(x * 1, mask)     # attention_mask_func fills in place: never on the leaf
    y.backward(dy)
    return y.detach(), x.grad


def _lengths_mask(prefix, valid, sq, sk):
    """Megatron's boolean mask (B, 1, Sq, Sk), True = masked, of our prefix-LM rule."""
    return ~prefix_lm_mask(torch.tensor(prefix), torch.tensor(valid), sq, sk)


def _spy(module_name, calls):
    module = sys.modules[module_name]
    forward = module.forward

    def counting(*args):
        calls.append(module_name)
        return forward(*args)

    module.forward = counting


CASES = {
    # name: (mask type, mask builder (B, Sq, Sk) -> mask or None, module expected to run)
    # Megatron's torch path builds a missing causal mask on "cuda": the oracle gets it explicitly
    # (the fused causal path ignores it).
    "causal": (AttnMaskType.causal, lambda b, sq, sk: torch.triu(torch.ones(1, 1, sq, sk, dtype=torch.bool), 1),
               "scaled_upper_triang_masked_softmax_cuda"),
    "no_mask": (AttnMaskType.padding, lambda b, sq, sk: None, "scaled_softmax_cuda"),
    "prefix_and_padding": (AttnMaskType.padding,
                           lambda b, sq, sk: _lengths_mask([3, 0, 5][:b], [sk, sk - 4, 5][:b], sq, sk),
                           "scaled_masked_softmax_cuda"),
    "broadcast_causal_mask": (AttnMaskType.padding,
                              lambda b, sq, sk: torch.triu(torch.ones(1, 1, sq, sk, dtype=torch.bool), 1),
                              "scaled_masked_softmax_cuda"),
    "arbitrary_fallback": (AttnMaskType.padding,
                           lambda b, sq, sk: torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(1)) < 0.3,
                           "scaled_masked_softmax_cuda"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scale", [None, 0.125])
def test_fused_scale_mask_softmax_matches_megatron_torch_path(case, dtype, scale):
    mask_type, make_mask, expected_module = CASES[case]
    b, h, sq, sk = 3, 2, 12, 12
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randn(b, h, sq, sk, generator=gen) * 3).to(dtype)
    dy = torch.randn(b, h, sq, sk, generator=gen).to(dtype)
    mask = make_mask(b, sq, sk)
    y_ref, dx_ref = _run(_softmax(mask_type, False, dtype, scale), x0, mask, dy)
    calls = []
    with megatron_ext.installed_kernels():
        _spy(expected_module, calls)
        y, dx = _run(_softmax(mask_type, True, dtype, scale), x0, mask, dy)
    assert calls == [expected_module]
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    # Rows with no visible key: Megatron's torch path blocks their gradient (masked_fill), its
    # kernels (and ours) apply the softmax formula; elsewhere the gradients agree.
    seen = torch.ones(b, 1, sq, 1, dtype=torch.bool) if mask is None else ~mask.all(-1, keepdim=True)
    seen = seen.expand(b, h, sq, sk)
    torch.testing.assert_close(dx[seen], dx_ref[seen], **TOL[dtype])


def test_fully_masked_rows_are_uniform_as_in_megatron():
    x = torch.randn(2, 1, 6, 6)
    mask = _lengths_mask([2, 4], [4, 6], 6, 6)           # sample 0: queries 4, 5 see nothing
    with megatron_ext.installed_kernels():
        y = sys.modules["scaled_masked_softmax_cuda"].forward(x, mask, torch.tensor([1.0])[0])
    torch.testing.assert_close(y[0, 0, 4:], torch.full((2, 6), 1 / 6))
    assert torch.all(y[0, 0, :4, 4:] == 0)


def test_beyond_4096_keys_runs_fused_on_cpu_fp32():
    b, h, sq, sk = 1, 1, 4, 5000
    x0 = torch.randn(b, h, sq, sk)
    dy = torch.randn(b, h, sq, sk)
    mask = _lengths_mask([4200], [4500], sq, sk)
    oracle = _softmax(AttnMaskType.padding, False, torch.float32)
    y_ref, dx_ref = _run(oracle, x0, mask, dy)
    fused = _softmax(AttnMaskType.padding, True, torch.float32)
    assert not fused.is_kernel_available(mask, b, h, sq, sk)   # Megatron's own gate: Apex's limits
    calls = []
    with megatron_ext.installed_kernels():
        assert fused.is_kernel_available(mask, b, h, sq, sk)
        _spy("scaled_masked_softmax_cuda", calls)
        y, dx = _run(fused, x0, mask, dy)
    assert calls == ["scaled_masked_softmax_cuda"]
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float32])


def test_gate_keeps_megatron_unfused_cases():
    with megatron_ext.installed_kernels():
        off = _softmax(AttnMaskType.causal, False, torch.float32)
        assert not off.is_kernel_available(None, 1, 1, 8, 8)
        causal = _softmax(AttnMaskType.causal, True, torch.float32)
        assert causal.is_kernel_available(None, 1, 1, 8, 8)
        assert not causal.is_kernel_available(None, 1, 1, 1, 8)    # decoding step: Sq != Sk
        windowed = _softmax(AttnMaskType.causal, True, torch.float32)
        windowed.window_size = (4, 0)
        assert not windowed.is_kernel_available(None, 1, 1, 8, 8)


def test_installed_kernels_restores_state():
    gate = FusedScaleMaskSoftmax.__dict__["is_kernel_available"]
    assert all(name not in sys.modules for name in kernels.KERNEL_MODULES)
    with megatron_ext.installed_kernels():
        assert all(name in sys.modules for name in kernels.KERNEL_MODULES)
        assert FusedScaleMaskSoftmax.__dict__["is_kernel_available"] is not gate
    assert all(name not in sys.modules for name in kernels.KERNEL_MODULES)
    assert FusedScaleMaskSoftmax.__dict__["is_kernel_available"] is gate


@pytest.mark.parametrize("prefix, valid", [([0, 0], [7, 7]), ([7, 3], [7, 5]), ([2, 0], [2, 0]),
                                           ([5, 1], [6, 6])])
def test_mask_lengths_recovers_prefix_masks(prefix, valid):
    mask = _lengths_mask(prefix, valid, 7, 7)
    got = kernels.mask_lengths(mask, 2)
    assert got is not None
    rebuilt = _lengths_mask(got[0].tolist(), got[1].tolist(), 7, 7)
    assert torch.equal(rebuilt, mask)


def test_mask_lengths_rejects_other_masks():
    sq = sk = 6
    i = torch.arange(sq).view(sq, 1)
    j = torch.arange(sk).view(1, sk)
    window = ((j > i) | (j < i - 2)).view(1, 1, sq, sk)                  # sliding window of 3
    key_padding = (j >= 4).expand(sq, sk).reshape(1, 1, sq, sk)          # padded queries still see keys
    for mask in (window, key_padding):
        assert kernels.mask_lengths(mask, 1) is None
    with pytest.raises(ValueError, match=r"mask must be \(B or 1, 1, Sq, Sk\)"):
        kernels.mask_lengths(torch.zeros(2, 2, sq, sk, dtype=torch.bool), 2)


def test_upper_triang_module_checks_shape():
    with pytest.raises(ValueError, match="Sq == Sk"):
        kernels.upper_triang_forward(torch.randn(2, 3, 4), 1.0)


def _norm_config(**kw):
    return TransformerConfig(num_layers=1, hidden_size=48, num_attention_heads=4,
                             **{**no_deprecated_defaults(), **kw})


@pytest.mark.parametrize("zero_centered", [False, True])
def test_m6_layer_norm_through_module_spec_matches_torch(zero_centered):
    config = _norm_config(layernorm_zero_centered_gamma=zero_centered)
    ours = build_module(ModuleSpec(module=M6LayerNorm), config=config, hidden_size=48, eps=1e-5)
    reference = torch.nn.LayerNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(48) * 0.1 + (0.0 if zero_centered else 1.0))
        ours.bias.copy_(torch.randn(48) * 0.1)
        reference.weight.copy_(ours.weight + (1.0 if zero_centered else 0.0))
        reference.bias.copy_(ours.bias)
    x = torch.randn(5, 3, 48)
    dy = torch.randn(5, 3, 48)
    outputs = []
    for norm in (ours, reference):
        xi = x.clone().requires_grad_(True)
        y = norm(xi)
        y.backward(dy)
        outputs.append((y.detach(), xi.grad, norm.weight.grad, norm.bias.grad))
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_m6_layer_norm_marks_sequence_parallel_and_rejects_rmsnorm():
    norm = M6LayerNorm(_norm_config(sequence_parallel=False), 48)
    assert norm.weight.sequence_parallel is False and norm.bias.sequence_parallel is False
    with pytest.raises(ValueError, match="normalization is 'RMSNorm'"):
        M6LayerNorm(_norm_config(normalization="RMSNorm"), 48)


def test_engine_never_imports_megatron():
    """Everything but megatron_ext works without megatron-core: no engine module imports it."""
    offenders = []
    for path in sorted((ROOT / "m6_engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in ("megatron", "megatron_ext")]
    assert not offenders, offenders


def test_missing_megatron_core_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "megatron_ext" or n.startswith("megatron_ext.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "megatron", None)
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(ImportError, match=r"pip install 'megatron-core==0\.16\.1'"):
        import megatron_ext  # noqa: F401
