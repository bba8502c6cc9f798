"""Drop-in softmax kernels for Megatron without Apex, backed by ``m6_engine.ops.masked_softmax``.

Megatron's ``FusedScaleMaskSoftmax`` (``megatron.core.fusions.fused_softmax``) imports three
compiled modules at call time, the ones Apex builds:

    scaled_upper_triang_masked_softmax_cuda   causal:     forward(x (AB, Sq, Sk), scale)
    scaled_masked_softmax_cuda                 mask:       forward(x (B, H, Sq, Sk), mask, scale)
    scaled_softmax_cuda                        no mask:    forward(x (B, H, Sq, Sk), scale)

each with ``backward(dy, y, scale)`` and, for the masked one, ``get_batch_per_block(sq, sk, b, np)``.
This module provides them (:data:`KERNEL_MODULES`) on our kernel, which runs on the CPU and the GPU
in fp32, fp16 and bf16, for any number of keys:

    forward:   y = softmax(scale * x) over the keys a query may see; masked keys get 0
    backward:  dx = scale * y * (dy - sum(dy * y, -1))          (from y alone, as Apex's kernels)

Masks, in our terms (``m6_engine.ops``: query i sees key j iff j < valid_len and
(j < prefix_len or j <= i)):

- causal: ``prefix_len = 0``, ``valid_len = Sk``;
- no mask: ``prefix_len = valid_len = Sk``;
- Megatron's boolean mask (B or 1, 1, Sq, Sk), True = masked: when every sample's mask is a
  prefix-LM / padding mask, i.e. expressible by two integers per sample, it is mapped to them
  (:func:`mask_lengths`) and our kernel runs without reading the mask again. Any other mask
  (sliding windows, document masks, key-only padding that leaves padded queries attending, ...)
  falls back to the plain PyTorch computation Megatron itself uses, ``softmax(masked_fill(scale * x,
  mask, -10000))`` in fp32: correct for every mask, just not fused. Recognising the mask costs one
  pass over the booleans and one host sync per call.

Fully masked query rows: Megatron's kernels and its torch path fill masked scores with -10000, so a
row with no visible key comes out uniform (1 / Sk); ours gives such rows zeros, so the masked
module fills them with 1 / Sk to return exactly what Megatron returns. Their gradient follows the
kernel formula above (as Apex's does), where Megatron's torch path gives zero.

:func:`install_kernels` puts the three modules into ``sys.modules`` and, by default, widens
``FusedScaleMaskSoftmax.is_kernel_available`` (Megatron's gate admits fp16/bf16 inputs with
16 < Sk <= 4096 and sizes divisible by 4 only: limits of Apex's kernels, not of ours) so the fused
path runs for fp32 inputs on the CPU and beyond 4096 keys. :func:`installed_kernels` is the same as
a context manager that restores everything on exit.
"""

import contextlib
import sys
import types

import torch
from megatron.core.transformer.enums import AttnMaskType

from m6_engine import ops as m6_ops

KERNEL_MODULES = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
                  "scaled_softmax_cuda")
MASK_FILL = -10000.0
"""The score Megatron gives masked positions (``megatron.core.transformer.utils.attention_mask_func``)."""


def _scale(scale) -> float:
    """Megatron passes the scale as a 0-d tensor (``torch.tensor([scale])[0]``)."""
    return float(scale)


def _lengths(batch: int, fill: int, device) -> torch.Tensor:
    return torch.full((batch,), fill, dtype=torch.int64, device=device)


def _softmax_4d(x: torch.Tensor, prefix_len: torch.Tensor, valid_len: torch.Tensor, scale) -> torch.Tensor:
    """Our kernel on x (B, H, Sq, Sk) with the lengths (B,); no autograd graph (the caller's
    autograd.Function owns the backward)."""
    with torch.no_grad():
        return m6_ops.masked_softmax(x.contiguous(), prefix_len, valid_len, _scale(scale))


def _backward_4d(dy: torch.Tensor, y: torch.Tensor, scale) -> torch.Tensor:
    """dx = scale * y * (dy - sum(dy * y, -1)) over every key of the row (dy, y (B, H, Sq, Sk)).

    Masked keys have y = 0 and so dx = 0; with prefix_len = valid_len = Sk the kernel treats every
    key as visible, which is the row-wise formula Apex's backward kernels compute."""
    m6_ops.require_extension()
    full = _lengths(y.shape[0], y.shape[-1], y.device)
    return torch.ops.m6.masked_softmax_backward(dy.contiguous(), y.contiguous(), full, full,
                                                 _scale(scale), torch.zeros_like(full))


# ---- scaled_upper_triang_masked_softmax_cuda: causal, x (attn_batches, Sq, Sk) ---------------

def upper_triang_forward(inputs: torch.Tensor, scale) -> torch.Tensor:
    """Causal softmax of inputs (attn_batches, Sq, Sk), Sq == Sk: prefix_len 0, valid_len Sk."""
    if inputs.dim() != 3 or inputs.shape[1] != inputs.shape[2]:
        raise ValueError(f"scaled_upper_triang_masked_softmax: inputs must be (attn_batches, Sq, Sk) "
                         f"with Sq == Sk, got {tuple(inputs.shape)}")
    n, _, sk = inputs.shape
    x = inputs.unsqueeze(1)                                                     # (AB, 1, Sq, Sk)
    y = _softmax_4d(x, _lengths(n, 0, x.device), _lengths(n, sk, x.device), scale)
    return y.squeeze(1)


def upper_triang_backward(output_grads: torch.Tensor, softmax_results: torch.Tensor, scale) -> torch.Tensor:
    """Gradient of the causal softmax; tensors (attn_batches, Sq, Sk)."""
    return _backward_4d(output_grads.unsqueeze(1), softmax_results.unsqueeze(1), scale).squeeze(1)


# ---- scaled_softmax_cuda: no mask, x (B, H, Sq, Sk) ------------------------------------------

def _as_4d(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 3:   # Megatron's ScaledSoftmax documents (attn_batches, Sq, Sk) too
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"{what}: inputs must be (B, H, Sq, Sk) or (attn_batches, Sq, Sk), "
                         f"got {tuple(x.shape)}")
    return x


def scaled_forward(inputs: torch.Tensor, scale) -> torch.Tensor:
    """Unmasked softmax(scale * inputs) over the last dim: prefix_len = valid_len = Sk."""
    x = _as_4d(inputs, "scaled_softmax")
    full = _lengths(x.shape[0], x.shape[-1], x.device)
    return _softmax_4d(x, full, full, scale).view(inputs.shape)


def scaled_backward(output_grads: torch.Tensor, softmax_results: torch.Tensor, scale) -> torch.Tensor:
    """Gradient of the unmasked softmax."""
    dx = _backward_4d(_as_4d(output_grads, "scaled_softmax"), _as_4d(softmax_results, "scaled_softmax"),
                      scale)
    return dx.view(output_grads.shape)


# ---- scaled_masked_softmax_cuda: Megatron's boolean mask -------------------------------------

def mask_lengths(mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(prefix_len, valid_len) (batch,) int64 that reproduce ``mask`` exactly, or None.

    ``mask`` (batch or 1, 1, Sq, Sk), True (or nonzero) = masked. Under our rule the keys seen by
    any query are [0, valid_len) and query 0 sees [0, max(prefix_len, 1)) of them, which gives
    the candidates; the mask they generate is then compared with ``mask`` element by element.
    """
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch):
        raise ValueError(f"scaled_masked_softmax: mask must be (B or 1, 1, Sq, Sk) with B = {batch}, "
                         f"got {tuple(mask.shape)}")
    allowed = ~mask[:, 0].bool()                                                 # (Bm, Sq, Sk)
    valid = allowed.any(dim=1).sum(-1)                                           # (Bm,)
    prefix = torch.minimum(allowed[:, 0].sum(-1), valid)                         # (Bm,)
    expected = m6_ops.prefix_lm_mask(prefix, valid, mask.shape[2], mask.shape[3])[:, 0]
    if not bool(torch.equal(expected, allowed)):
        return None
    return prefix.expand(batch).contiguous(), valid.expand(batch).contiguous()


def torch_masked_softmax(inputs: torch.Tensor, mask: torch.Tensor, scale) -> torch.Tensor:
    """Megatron's own unfused computation, in fp32: softmax(masked_fill(scale * x, mask, -10000))."""
    x = inputs.float() * _scale(scale)
    return torch.softmax(x.masked_fill(mask.bool(), MASK_FILL), dim=-1).to(inputs.dtype)


def masked_forward(inputs: torch.Tensor, mask: torch.Tensor, scale) -> torch.Tensor:
    """Masked softmax of inputs (B, H, Sq, Sk) under Megatron's mask (module docstring)."""
    if inputs.dim() != 4:
        raise ValueError(f"scaled_masked_softmax: inputs must be (B, H, Sq, Sk), got {tuple(inputs.shape)}")
    b, _, sq, sk = inputs.shape
    lengths = mask_lengths(mask, b)
    if lengths is None:
        return torch_masked_softmax(inputs, mask, scale)
    prefix_len, valid_len = lengths
    y = _softmax_4d(inputs, prefix_len, valid_len, scale)
    # Rows with no visible key (i >= valid_len): Megatron's -10000 fill makes them uniform.
    no_key = torch.arange(sq, device=y.device).view(1, sq) >= valid_len.view(b, 1)   # (B, Sq)
    return y.masked_fill_(no_key.view(b, 1, sq, 1), 1.0 / sk)


def masked_backward(output_grads: torch.Tensor, softmax_results: torch.Tensor, scale) -> torch.Tensor:
    """Gradient of the masked softmax, from its output (masked keys have y = 0, so dx = 0)."""
    return _backward_4d(output_grads, softmax_results, scale)


def get_batch_per_block(sq: int, sk: int, b: int, np: int) -> int:
    """Apex's kernels process a fixed number of rows per CUDA block and Megatron checks that the
    batch divides into blocks; ours take any shape, so the answer is 1 (every size divides)."""
    return 1


def kernel_modules() -> dict[str, types.ModuleType]:
    """The three modules, by the names Megatron imports."""
    spec = {
        "scaled_upper_triang_masked_softmax_cuda": dict(forward=upper_triang_forward,
                                                        backward=upper_triang_backward),
        "scaled_masked_softmax_cuda": dict(forward=masked_forward, backward=masked_backward,
                                           get_batch_per_block=get_batch_per_block),
        "scaled_softmax_cuda": dict(forward=scaled_forward, backward=scaled_backward,
                                    get_batch_per_block=get_batch_per_block),
    }
    modules = {}
    for name, functions in spec.items():
        module = types.ModuleType(name, f"m6-engine's drop-in for Apex's {name} (megatron_ext.kernels)")
        for attr, fn in functions.items():
            setattr(module, attr, fn)
        modules[name] = module
    return modules


def _widened_gate(self, mask, b, np, sq, sk):
    """``FusedScaleMaskSoftmax.is_kernel_available`` for our kernels: any float dtype on any device,
    any Sq and Sk >= 1, no divisibility rule. Still unfused: when fusion is off, a causal mask with
    Sq != Sk (the fused causal path needs a square), and sliding-window attention (the fused path
    would ignore the window)."""
    if not self.scaled_masked_softmax_fusion or sk < 1 or self.window_size is not None:
        return False
    return not (self.attn_mask_type == AttnMaskType.causal and sq != sk)


def install_kernels(*, widen_gate: bool = True) -> None:
    """Register the drop-in modules in ``sys.modules`` (so Megatron's imports find them) and, with
    ``widen_gate``, let ``FusedScaleMaskSoftmax`` take its fused path wherever ours can run.
    Requires the built extension (raises ``ExtensionNotBuiltError`` with build instructions)."""
    m6_ops.require_extension()
    sys.modules.update(kernel_modules())
    if widen_gate:
        from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

        FusedScaleMaskSoftmax.is_kernel_available = _widened_gate


@contextlib.contextmanager
def installed_kernels(*, widen_gate: bool = True):
    """:func:`install_kernels` for the duration of a block; the previous state is restored after."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    saved_modules = {name: sys.modules.get(name) for name in KERNEL_MODULES}
    saved_gate = FusedScaleMaskSoftmax.__dict__["is_kernel_available"]
    install_kernels(widen_gate=widen_gate)
    try:
        yield
    finally:
        FusedScaleMaskSoftmax.is_kernel_available = saved_gate
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
