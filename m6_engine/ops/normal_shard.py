"""Counter-based N(0, std) draws of one block of a full tensor: ``torch.ops.m6.normal_shard_``.

``normal_shard_(out, key, full_cols=C, row0=r, col0=c, std=s)`` fills out (R, Cb) with the block
[r, r + R) x [c, c + Cb) of a full tensor with C columns whose element i (flat, row-major) is
``s * z(key, i)``: Philox4x32-10 of counter i / 4 under the 64-bit key gives four 32-bit words,
two Box-Muller pairs for elements 4 (i / 4) .. + 3 (the definition, its accuracy and why float64:
csrc/init/philox_normal.h). A value depends on the key and its index in the full tensor alone, so
each rank draws its shard alone, on its device and in its dtype (fp32, fp16, bf16: the fp32 value
rounded), and gets the values the whole tensor would have there, for any sharding and device.
CPU kernel: AVX2, eight counters at a time, threaded over rows; CUDA: a thread per counter.

The plain twin is ``m6_engine.ops.reference.normal_shard_reference`` (int64 Philox, float64 torch
math): the kernels' integers equal its integers, their floats are within 1 ulp of its floats
(tests/test_normal_shard.py). ``philox4x32_10`` exposes the integers.
"""

import torch

from m6_engine.ops._extension import extension_available, require_extension

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ELEMENTS = 2 ** 62      # csrc/init/normal_shard.h: flat indices of the full tensor stay below


def key_as_int64(key: int) -> int:
    """The op's int64 argument for a key in [0, 2^64): the same 64 bits, signed."""
    if not 0 <= key < 2 ** 64:
        raise ValueError(f"normal_shard_: key must be in [0, 2^64), got {key}")
    return key - 2 ** 64 if key >= 2 ** 63 else key


def normal_shard_(out: torch.Tensor, key: int, *, full_cols: int, row0: int = 0, col0: int = 0,
                  std: float) -> torch.Tensor:
    """Fill ``out`` (R, C), or a 1-D out as one row, with the block at (row0, col0) of the full
    tensor of ``full_cols`` columns drawn N(0, std) from ``key``'s stream; returns out."""
    require_extension()
    torch.ops.m6.normal_shard_(out, key_as_int64(key), int(full_cols), int(row0), int(col0), float(std))
    return out


def philox4x32_10(key: int, counter: int, count: int, device="cpu") -> torch.Tensor:
    """The Philox4x32-10 words of counters ``counter`` .. ``counter + count - 1`` under ``key``
    (counter word 0 = c mod 2^32, word 1 = c / 2^32, words 2 and 3 zero): (count, 4) int64 in
    [0, 2^32), by the kernels ``normal_shard_`` runs on ``device``."""
    require_extension()
    out = torch.empty(count, 4, dtype=torch.int32, device=device)
    torch.ops.m6.philox4x32_10_(out, key_as_int64(key), int(counter))
    return out.to(torch.int64) & 0xFFFFFFFF


def _fake_normal_shard(out, key, full_cols, row0, col0, std):
    """The C++ checks that need no data (csrc/init/normal_shard.h), worded as there."""
    torch._check(out.dim() in (1, 2), lambda: f"normal_shard_: out must be 1-D or 2-D (a block of a full "
                                              f"tensor's rows), got {out.dim()}-D")
    torch._check(out.dtype in _DTYPES,
                 lambda: f"normal_shard_: out must be float32, float16 or bfloat16, got {out.dtype}")
    rows, cols = (out.shape[0] if out.dim() == 2 else 1), out.shape[-1]
    torch._check(full_cols >= 1, lambda: f"normal_shard_: full_cols must be >= 1, got {full_cols}")
    torch._check(row0 >= 0 and col0 >= 0,
                 lambda: f"normal_shard_: row0 and col0 must be >= 0, got {row0} and {col0}")
    torch._check(col0 + cols <= full_cols, lambda: f"normal_shard_: the block's columns [{col0}, {col0} + {cols}) "
                                                   f"must lie within the full tensor's {full_cols} columns")
    torch._check((row0 + rows) * full_cols <= _MAX_ELEMENTS,
                 lambda: "normal_shard_: the full tensor must have fewer than 2^62 elements")
    torch._check(std > 0 and std != float("inf"), lambda: f"normal_shard_: std must be a finite number > 0, got {std}")


def _fake_philox(out, key, counter):
    torch._check(out.dtype == torch.int32, lambda: f"philox4x32_10_: out must be int32, got {out.dtype}")
    torch._check(out.dim() == 2 and out.shape[1] == 4,
                 lambda: f"philox4x32_10_: out must have shape (N, 4), got {tuple(out.shape)}")


def register():
    """Attach the fake kernels to the C++-defined ops (once, at import)."""
    torch.library.register_fake("m6::normal_shard_")(_fake_normal_shard)
    torch.library.register_fake("m6::philox4x32_10_")(_fake_philox)


if extension_available():
    register()
