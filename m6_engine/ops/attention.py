"""Fused attention under M6's prefix-LM mask: ``prefix_lm_attention`` and the backend choice.

    out = softmax(scale q k^T, mask) v          q (B, H, Sq, D), k / v (B, H, Sk, D) -> (B, H, Sq, D)

with the mask of ``masked_softmax`` (query i of sample b, at position q_offset[b] + i, sees key j
iff ``j < valid_len[b] and (j < prefix_len[b] or j <= q_offset[b] + i)``; padded rows give zeros).
Nothing of size Sq x Sk is kept for backward: the CPU op ``torch.ops.m6.prefix_lm_attention``
(csrc/attention/) saves the output and the per-row log-sum-exp and recomputes the probabilities
tile by tile in its backward (FlashAttention-2's scheme), skipping every tile the lengths say is
masked. Its output has the memory layout of a (B, Sq, H, D) tensor, so merging the heads afterwards
is a view.

Dropout runs inside the kernel from a counter-based RNG: the keep mask is a pure function of a
64-bit seed and the element's (b, h, i, j), regenerated in backward instead of stored. The seed is
drawn from torch's default CPU generator at the call, so under ``RNGTracker.fork()`` it comes from
the model-parallel stream, and activation recompute (which restores that stream) reproduces the
mask bit for bit.

On CUDA the same function runs what torch provides for this mask (``attention_torch``):
FlexAttention with a block mask built from the lengths (empty tiles skipped), or, with dropout,
which FlexAttention does not have, SDPA's memory-efficient kernel with the boolean mask. Our own
CUDA kernel can later take the op's CUDA dispatch key without changing any caller.

Backends the model chooses from (``ModelConfig.attention_backend``, :func:`resolve_attention_backend`):
``fused`` this function, ``sdpa`` torch's SDPA with the boolean mask, ``unfused`` matmul + the fused
masked softmax + matmul (keeps the (B, H, Sq, Sk) probabilities; the reference path), ``auto``
fused where it exists.
"""

import logging

import torch

from m6_engine.config import ATTENTION_BACKENDS
from m6_engine.ops._dtypes import kernel_dtype_ok, kernel_dtypes_text
from m6_engine.ops._extension import extension_available, require_extension
from m6_engine.ops.masked_softmax import q_offset_tensor

_LOG = logging.getLogger(__name__)


def _torch_backends():
    # Imported at first use: FlexAttention pulls in torch's compiler stack (about a second of
    # start-up), which a CPU run never needs.
    from m6_engine.ops import attention_torch
    return attention_torch


def _default_scale(q: torch.Tensor, scale) -> float:
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def _dropout_seed() -> int:
    """A 63-bit seed from torch's default CPU generator (the caller's RNG stream)."""
    return int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))


def prefix_lm_attention(q, k, v, prefix_len, valid_len, *, scale=None, q_offset=0, dropout_p: float = 0.0):
    """Attention of q (B, H, Sq, D) over k, v (B, H, Sk, D) under the prefix-LM mask -> (B, H, Sq, D).

    ``scale`` defaults to 1 / sqrt(D); ``q_offset`` is an int or a (B,) int tensor (query row i of
    sample b sits at position q_offset[b] + i: a decode step after a cache); ``dropout_p`` drops
    probabilities with that rate (kept ones divided by 1 - dropout_p), from the caller's RNG stream.
    Differentiable in q, k and v.
    """
    scale = _default_scale(q, scale)
    if q.device.type == "cuda":
        if dropout_p > 0:
            return _torch_backends().sdpa_prefix_lm_attention(q, k, v, prefix_len, valid_len, scale, q_offset,
                                                            dropout_p)
        return _torch_backends().flex_prefix_lm_attention(q, k, v, prefix_len, valid_len, scale, q_offset)
    require_extension()
    seed = _dropout_seed() if dropout_p > 0 else 0
    out, _ = torch.ops.m6.prefix_lm_attention(q, k, v, prefix_len, valid_len, q_offset_tensor(q_offset, q),
                                              scale, float(dropout_p), seed)
    return out


def sdpa_attention(q, k, v, prefix_len, valid_len, *, scale=None, q_offset=0, dropout_p: float = 0.0):
    """torch's SDPA with the boolean prefix-LM mask; the ``sdpa`` backend (same arguments as above)."""
    return _torch_backends().sdpa_prefix_lm_attention(q, k, v, prefix_len, valid_len, _default_scale(q, scale),
                                                    q_offset, dropout_p)


def resolve_attention_backend(requested: str, fused_kernels: bool, device) -> str:
    """The backend a model on ``device`` runs for ``ModelConfig.attention_backend = requested``.

    ``auto`` is ``fused`` when the fused path exists there (the built extension on the CPU;
    FlexAttention on CUDA) and ``unfused`` otherwise, or when ``fused_kernels`` is False (the
    plain reference path on purpose). Raises ValueError naming what is wrong for an unknown name or
    a ``fused`` that cannot run.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {requested!r}")
    device = torch.device(device)
    fused_here = _torch_backends().flex_attention_available() if device.type == "cuda" else extension_available()
    if requested == "auto":
        return "fused" if fused_kernels and fused_here else "unfused"
    if requested == "fused" and not fused_kernels:
        raise ValueError("attention_backend 'fused' contradicts fused_kernels=False (the reference path): "
                         "set attention_backend to 'unfused' or 'sdpa', or fused_kernels to True")
    if requested == "fused" and device.type == "cuda" and not fused_here:
        raise ValueError("attention_backend 'fused' on CUDA needs torch's FlexAttention "
                         "(torch.nn.attention.flex_attention), which this torch lacks: use 'sdpa' or 'auto'")
    if requested == "fused" and device.type != "cuda":
        require_extension()
    return requested


def log_attention_backend(requested: str, resolved: str, device) -> None:
    """One log line saying which attention a model runs (``auto`` picks silently otherwise)."""
    what = {"fused": "fused prefix-LM attention (m6::prefix_lm_attention)" if torch.device(device).type != "cuda"
            else "fused prefix-LM attention (FlexAttention block mask; SDPA memory-efficient with dropout)",
            "sdpa": "torch SDPA with the boolean prefix-LM mask",
            "unfused": "unfused attention (matmul, masked softmax, matmul)"}[resolved]
    _LOG.info("attention_backend=%s on %s: %s", requested, torch.device(device).type, what)


# --- torch.library registrations (fake kernels, autograd) --------------------------------------

def _check_meta(q, k, v, prefix_len, valid_len, q_offset):
    # Shapes and dtypes only: the real kernels check the length values.
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check(t.dim() == 4, lambda: f"prefix_lm_attention: {name} must be 4-D (B, H, S, D), got {t.dim()}-D")
        torch._check(t.dtype == q.dtype, lambda: f"prefix_lm_attention: {name} must have q's dtype {q.dtype}")
        torch._check(t.device == q.device, lambda: f"prefix_lm_attention: {name} must be on q's device {q.device}")
    torch._check(kernel_dtype_ok(q.dtype, q.device),
                 lambda: f"prefix_lm_attention: q, k, v must be {kernel_dtypes_text(q.device)}, got {q.dtype}")
    torch._check(k.shape == v.shape, lambda: f"prefix_lm_attention: k and v must have one shape, got "
                                             f"{tuple(k.shape)} and {tuple(v.shape)}")
    torch._check(k.shape[0] == q.shape[0] and k.shape[1] == q.shape[1] and k.shape[3] == q.shape[3],
                 lambda: f"prefix_lm_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in "
                         f"batch, heads and head dim")
    for name, t in (("prefix_len", prefix_len), ("valid_len", valid_len), ("q_offset", q_offset)):
        torch._check(t.dtype in (torch.int32, torch.int64),
                     lambda: f"prefix_lm_attention: {name} must be int32 or int64, got {t.dtype}")
        torch._check(t.dim() == 1 and t.shape[0] == q.shape[0],
                     lambda: f"prefix_lm_attention: {name} must have shape (B,) = ({q.shape[0]},), "
                             f"got {tuple(t.shape)}")
        torch._check(t.device == q.device,
                     lambda: f"prefix_lm_attention: {name} must be on q's device {q.device}, got {t.device}")


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, prefix_len, valid_len, q_offset, scale, dropout_p, dropout_seed):
    _check_meta(q, k, v, prefix_len, valid_len, q_offset)
    b, h, sq, d = q.shape
    out = q.new_empty((b, sq, h, d)).transpose(1, 2)      # the kernel's (B, Sq, H, D) memory layout
    return out, q.new_empty((b, h, sq), dtype=_lse_dtype(q.dtype))


def _fake_backward(grad_out, q, k, v, out, lse, prefix_len, valid_len, q_offset, scale, dropout_p, dropout_seed):
    _check_meta(q, k, v, prefix_len, valid_len, q_offset)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_len, valid_len, q_offset, scale, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, prefix_len, valid_len, q_offset)
    ctx.scale, ctx.dropout_p, ctx.dropout_seed = scale, dropout_p, dropout_seed


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, prefix_len, valid_len, q_offset = ctx.saved_tensors
    dq, dk, dv = torch.ops.m6.prefix_lm_attention_backward(
        grad_out, q, k, v, out, lse, prefix_len, valid_len, q_offset, ctx.scale, ctx.dropout_p, ctx.dropout_seed)
    return dq, dk, dv, None, None, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("prefix_lm_attention: double backward is not supported (the op is differentiable once)")


def _forward_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # Dense, as torch counts SDPA and as the unfused path's two products count: q k^T and p v.
    b, h, sq, d = q_shape
    return 4 * b * h * sq * k_shape[2] * d


def _backward_flops(grad_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    # The unfused backward's four products (dP, dV, dQ, dK); the recomputed q k^T is not model work.
    b, h, sq, d = q_shape
    return 8 * b * h * sq * k_shape[2] * d


def register():
    """Attach the fake kernels, autograd and FLOP formulas to the C++-defined ops (once, at import)."""
    from torch.utils.flop_counter import register_flop_formula
    register_flop_formula(torch.ops.m6.prefix_lm_attention, get_raw=False)(_forward_flops)
    register_flop_formula(torch.ops.m6.prefix_lm_attention_backward, get_raw=False)(_backward_flops)
    torch.library.register_fake("m6::prefix_lm_attention")(_fake_forward)
    torch.library.register_fake("m6::prefix_lm_attention_backward")(_fake_backward)
    torch.library.register_autograd("m6::prefix_lm_attention", _backward, setup_context=_setup_context)
    torch.library.register_autograd("m6::prefix_lm_attention_backward", _no_double_backward)


if extension_available():
    register()
