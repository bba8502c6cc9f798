"""Prefix-LM attention from what torch provides: the CUDA side of ``prefix_lm_attention`` and the
``sdpa`` backend.

- :func:`flex_prefix_lm_attention`: FlexAttention with a ``BlockMask`` built from the three (B,)
  length tensors. The block mask records, per 128 x 128 tile, whether it is empty, full or partial,
  so the kernel skips empty tiles (above the causal diagonal, past valid_len) and evaluates the mask
  only on partial ones: the block-sparse tiling a fused prefix-LM kernel needs, with torch's
  generated Triton kernels on CUDA. It has no dropout.
- :func:`sdpa_prefix_lm_attention`: ``scaled_dot_product_attention`` with the boolean (B, 1, Sq, Sk)
  mask, with dropout (on CUDA the memory-efficient kernel takes both a mask and dropout; FlashAttention
  takes no mask). It keeps the mask for backward, but no probabilities.

Both are composites of torch ops, differentiated by torch's autograd. Rows with no allowed key
(padding) give zeros and zero gradients, as the m6 ops do.
"""

import functools

import torch
import torch.nn.functional as F

from m6_engine.ops.reference import prefix_lm_mask


def _check_inputs(op: str, q, k, v, prefix_len, valid_len, q_offset) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must agree in batch, "
                         f"heads and head dim, and k and v in every dim")
    lengths = [("prefix_len", prefix_len), ("valid_len", valid_len)]
    if isinstance(q_offset, torch.Tensor):
        lengths.append(("q_offset", q_offset))
    for name, t in lengths:
        if t.dim() != 1 or t.shape[0] != q.shape[0]:
            raise ValueError(f"{op}: {name} must have shape (B,) = ({q.shape[0]},), got {tuple(t.shape)}")


def _offsets(q_offset, q: torch.Tensor) -> torch.Tensor:
    """q_offset as a (B,) int64 tensor on q's device."""
    if isinstance(q_offset, torch.Tensor):
        return q_offset.to(device=q.device, dtype=torch.int64)
    return torch.full((q.shape[0],), int(q_offset), dtype=torch.int64, device=q.device)


def _padded_rows(valid_len, q_offset, q: torch.Tensor) -> torch.Tensor:
    """(B, 1, Sq, 1) True for query rows at or past valid_len (they attend nothing)."""
    valid = valid_len.to(device=q.device, dtype=torch.int64)
    q_abs = torch.minimum(_offsets(q_offset, q), valid).view(-1, 1) + torch.arange(q.shape[2], device=q.device)
    return (q_abs >= valid.view(-1, 1)).view(q.shape[0], 1, q.shape[2], 1)


def sdpa_prefix_lm_attention(q, k, v, prefix_len, valid_len, scale: float, q_offset=0,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA under the prefix-LM mask: q (B, H, Sq, D), k / v (B, H, Sk, D) -> (B, H, Sq, D).

    Dropout draws from torch's current generator (the model-parallel stream inside
    ``RNGTracker.fork()``).
    """
    _check_inputs("sdpa_prefix_lm_attention", q, k, v, prefix_len, valid_len, q_offset)
    sq, sk = q.shape[2], k.shape[2]
    allowed = prefix_lm_mask(prefix_len, valid_len, sq, sk, q_offset)                   # (B, 1, Sq, Sk)
    padded = _padded_rows(valid_len, q_offset, q)                                      # (B, 1, Sq, 1)
    # A row with no allowed key would be softmax over nothing: NaN in SDPA's output and gradients.
    # Such rows see key 0 instead, and their output is then zeroed, which also zeroes the
    # gradient flowing into them.
    if sk > 0:
        first_key = torch.zeros(1, 1, 1, sk, dtype=torch.bool, device=q.device)
        first_key[..., 0] = True
        allowed = allowed | (padded & first_key)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(padded, 0.0)


def flex_attention_available() -> bool:
    """True when this torch has FlexAttention (torch.nn.attention.flex_attention)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    # FlexAttention runs its fused kernel only when compiled (eager is a dense reference). The
    # compiled function is made once per process and reused: this cache is a compile cache, it
    # holds no state of any call.
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _flex_functions(device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    attend = _compiled_flex_attention() if device.type == "cuda" else flex_attention
    return create_block_mask, attend


def flex_prefix_lm_attention(q, k, v, prefix_len, valid_len, scale: float, q_offset=0) -> torch.Tensor:
    """FlexAttention under the prefix-LM mask, empty tiles skipped: q (B, H, Sq, D), k / v (B, H, Sk, D)
    -> (B, H, Sq, D). No dropout (use :func:`sdpa_prefix_lm_attention` for that)."""
    _check_inputs("flex_prefix_lm_attention", q, k, v, prefix_len, valid_len, q_offset)
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    device = q.device
    prefix = prefix_len.to(device=device, dtype=torch.int64)
    valid = valid_len.to(device=device, dtype=torch.int64)
    offset = torch.minimum(_offsets(q_offset, q), valid)          # clamped as in every implementation

    def mask_mod(batch, head, q_idx, kv_idx):
        q_abs = q_idx + offset[batch]
        return (kv_idx < valid[batch]) & ((kv_idx < prefix[batch]) | (kv_idx <= q_abs)) & (q_abs < valid[batch])

    create_block_mask, attend = _flex_functions(device)
    block_mask = create_block_mask(mask_mod, b, None, sq, sk, device=device)
    out = attend(q, k, v, block_mask=block_mask, scale=scale)
    # Rows with no allowed key: FlexAttention defines them as 0 (log-sum-exp -inf); zeroing them
    # again keeps that true whatever its version does, and zeroes their incoming gradient.
    return out.masked_fill(_padded_rows(valid_len, q_offset, q), 0.0)
