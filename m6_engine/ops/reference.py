"""Plain-PyTorch references of the fused ops: the test oracle and the model's unfused path.

They are written for clarity, not speed: the prefix-LM mask is materialised as a (B, 1, Sq, Sk)
boolean tensor, which is exactly what the fused kernels avoid; Philox runs in int64 tensor
arithmetic and the normal draws' transform in float64 with torch's log, sqrt, cos and sin.
"""

import math

import torch


def _math_dtype(dtype):
    """fp32 for fp32/fp16/bf16 inputs, float64 for float64 ones (the tests' exact oracle)."""
    return torch.promote_types(dtype, torch.float32)


def prefix_lm_mask(prefix_len, valid_len, sq: int, sk: int, q_offset=0):
    """Boolean mask (B, 1, Sq, Sk), True where query i may attend key j.

    Query i of sample b sits at absolute position ``q_offset[b] + i`` (``q_offset``: an int for
    every sample, or a (B,) integer tensor). It may attend key j iff
    ``j < valid_len[b] and (j < prefix_len[b] or j <= q_offset[b] + i)``; a padded query
    (``q_offset[b] + i >= valid_len[b]``) attends nothing.
    """
    device = prefix_len.device
    prefix = prefix_len.to(torch.long).view(-1, 1, 1)                # (B, 1, 1)
    valid = valid_len.to(torch.long).view(-1, 1, 1)                  # (B, 1, 1)
    # Clamped to valid_len, which changes no row (at or past valid_len it is padding either way)
    # and keeps q_offset + i inside int64 for any q_offset.
    offset = torch.as_tensor(q_offset, dtype=torch.long, device=device).view(-1, 1, 1)  # (B or 1, 1, 1)
    q = torch.arange(sq, device=device).view(1, sq, 1) + torch.minimum(offset, valid)  # (B, Sq, 1)
    k = torch.arange(sk, device=device).view(1, 1, sk)              # (1, 1, Sk)
    allowed = (k < valid) & ((k < prefix) | (k <= q)) & (q < valid)  # (B, Sq, Sk)
    return allowed.unsqueeze(1)


def masked_softmax_reference(scores, prefix_len, valid_len, scale: float = 1.0, q_offset=0):
    """softmax(scale * scores) over the allowed keys, zeros elsewhere; math in fp32 (fp64 for fp64).

    scores (B, H, Sq, Sk); returns the same shape and dtype. Rows that attend nothing are zeros.
    ``q_offset``: an int or a (B,) tensor, as for the fused op.
    """
    _, _, sq, sk = scores.shape
    allowed = prefix_lm_mask(prefix_len, valid_len, sq, sk, q_offset)      # (B, 1, Sq, Sk)
    logits = (scores.to(_math_dtype(scores.dtype)) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A row with no allowed key is softmax of all -inf = NaN: those rows are defined as zeros.
    probs = probs.masked_fill(~allowed, 0.0)
    return probs.to(scores.dtype)


def masked_softmax_backward_reference(grad_out, out, scale: float = 1.0):
    """scale * y * (dy - sum(dy * y, -1)) in fp32 (fp64 for fp64), cast to grad_out's dtype."""
    y = out.to(_math_dtype(out.dtype))
    dy = grad_out.to(y.dtype)
    return (scale * y * (dy - (dy * y).sum(-1, keepdim=True))).to(grad_out.dtype)


def prefix_lm_attention_reference(q, k, v, prefix_len, valid_len, scale: float | None = None, q_offset=0,
                                  keep=None, dropout_p: float = 0.0):
    """softmax(scale q k^T) v under the prefix-LM mask, math in fp32 (fp64 for fp64), q's dtype out.

    q (B, H, Sq, D), k / v (B, H, Sk, D); ``scale`` defaults to 1 / sqrt(D). Padded query rows (no
    allowed key) give zeros. ``keep`` (B, H, Sq, Sk) bool, optional: the dropout keep mask; kept
    probabilities are divided by (1 - dropout_p), as the fused op does.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    math = _math_dtype(q.dtype)
    scores = torch.matmul(q.to(math), k.to(math).transpose(-1, -2))
    probs = masked_softmax_reference(scores, prefix_len, valid_len, scale, q_offset)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs, v.to(math)).to(q.dtype)


def layer_norm_reference(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last dim with fp32 math (fp64 for fp64), result in x's dtype."""
    n = x.shape[-1]
    math = _math_dtype(x.dtype)
    y = torch.nn.functional.layer_norm(x.to(math), (n,), weight.to(math), bias.to(math), eps)
    return y.to(x.dtype)


@torch.no_grad()
def adamw_step_reference_(param, exp_avg, exp_avg_sq, grad, *, lr: float, betas, eps: float, weight_decay: float,
                          step: int, grad_scale: float = 1.0, param_copy=None) -> None:
    """One AdamW update in place, in the tensors' own precision (fp32, or fp64 for the exact answer),
    written as the formula of ``m6::adamw_step_`` reads (m6_engine/ops/adamw_step.py):
    g = grad * grad_scale; p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    p -= lr (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps); param_copy = p in its dtype."""
    beta1, beta2 = betas
    g = grad * grad_scale
    param.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
    if param_copy is not None:
        param_copy.copy_(param)


# Philox4x32-10 (Salmon et al., SC'11: Random123's and cuRAND's; csrc/init/philox_normal.h).
PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
_WORD = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32 bits of a * multiplier, for int64 a in [0, 2^32) and a 32-bit constant,
    in int64 without overflow: the multiplier is split into 16-bit halves (a m = high 2^16 + low)."""
    low = a * (multiplier & 0xFFFF)                      # < 2^48
    high = a * (multiplier >> 16)                        # < 2^48
    low_sum = low + ((high & 0xFFFF) << 16)              # < 2^49: a m mod 2^32, plus the carry
    return (high >> 16) + (low_sum >> 32), low_sum & _WORD


def philox4x32_10_reference(counters: torch.Tensor, key: int) -> torch.Tensor:
    """Philox4x32-10 of ``counters`` (..., 4) under ``key`` (an int in [0, 2^64): key words
    (key mod 2^32, key / 2^32)): the four output words (..., 4), int64 in [0, 2^32).

    ``counters`` holds four words per counter, int64 in [0, 2^32), word 0 first (Random123's ctr[0]).
    """
    if not 0 <= key < 2 ** 64:
        raise ValueError(f"philox4x32_10_reference: key must be in [0, 2^64), got {key}")
    c0, c1, c2, c3 = counters.to(torch.int64).unbind(-1)
    k0, k1 = key & _WORD, key >> 32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(c0, PHILOX_MULTIPLIERS[0])
        hi1, lo1 = _mulhilo32(c2, PHILOX_MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_WEYL[0]) & _WORD, (k1 + PHILOX_WEYL[1]) & _WORD
    return torch.stack([c0, c1, c2, c3], dim=-1)


def normal_shard_reference(rows: int, cols: int, key: int, *, full_cols: int, row0: int = 0, col0: int = 0,
                           std: float) -> torch.Tensor:
    """The block [row0, row0 + rows) x [col0, col0 + cols) of a full tensor with ``full_cols``
    columns drawn N(0, std) by ``m6::normal_shard_``, as float32 (rows, cols), from the definition
    (csrc/init/philox_normal.h): element i = 4 c + 2 p + s of the full tensor (flat) takes the words
    x of Philox4x32-10 of counter (c mod 2^32, c / 2^32, 0, 0); with u = ((x_2p >> 8) + 1) / 2^24
    and v = (x_2p+1 >> 8) / 2^24 it is std sqrt(-2 ln u) (cos if s = 0 else sin)(2 pi v), computed
    in float64 and rounded to float32 once."""
    flat = ((torch.arange(rows).view(-1, 1) + row0) * full_cols + col0 + torch.arange(cols)).reshape(-1)
    counter = flat // 4
    zeros = torch.zeros_like(counter)
    words = philox4x32_10_reference(torch.stack([counter & _WORD, counter >> 32, zeros, zeros], dim=-1), key)
    pair = (flat % 4) // 2                                                    # (R C,)
    radius_word = words.gather(1, (2 * pair).view(-1, 1)).squeeze(1)
    angle_word = words.gather(1, (2 * pair + 1).view(-1, 1)).squeeze(1)
    u = ((radius_word >> 8) + 1).to(torch.float64) / 2 ** 24                  # (0, 1]
    v = (angle_word >> 8).to(torch.float64) / 2 ** 24                         # [0, 1)
    radius = torch.sqrt(-2.0 * torch.log(u))
    angle = 2 * math.pi * v
    z = torch.where(flat % 2 == 0, torch.cos(angle), torch.sin(angle)) * radius
    return (std * z).to(torch.float32).view(rows, cols)
