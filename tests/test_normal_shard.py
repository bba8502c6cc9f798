"""m6::normal_shard_ and m6::philox4x32_10_ against their plain reference and their definition.

- Philox4x32-10: the reference gives Random123's published known answers (kat_vectors, 10 rounds);
  the kernels' words equal the reference's bit for bit (the integer part), across the 2^32 carry
  of the counter and for both CPU paths (groups of eight counters, the scalar rest).
- The floats: within 1 ulp of the float64 reference (|ours - ref| <= ulp_fp32(ref), or 1e-15 std
  where ref is a zero of cos or sin that float64's cos(pi/2) = 6e-17 misses), and equal to the
  reference's own fp32 rounding in nearly all elements (the kernels' transform is float64 too:
  they differ only where the exact value lies within ~1e-3 ulp of a rounding midpoint).
- Shard = slice of the full tensor, bit for bit, for blocks whose rows start and end anywhere in a
  counter (so the CPU's AVX2 and scalar paths draw the same element in different calls), in every
  dtype (fp16 / bf16: the fp32 value rounded), with strided rows, at any thread count.
- The draws look like N(0, std): mean, standard deviation and tail mass of a million.
CUDA variants (marked `cuda`) compare the GPU's words and floats with the CPU's.
"""

import math

import pytest
import torch

import m6_engine.ops as ops
from m6_engine.ops.reference import normal_shard_reference, philox4x32_10_reference
from tests.conftest import DEVICES

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter words, key words, output words).
PHILOX_KATS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
KEYS = [0, 1, 0x299F31D0A4093822, 2 ** 64 - 1, 7071067811865475]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The fp32 spacing at |x| (float64 in, float64 out)."""
    x32 = x.abs().to(torch.float32)
    return (torch.nextafter(x32, torch.tensor(float("inf"))) - x32).to(torch.float64)


def _within_one_ulp(ours: torch.Tensor, want: torch.Tensor, std: float) -> torch.Tensor:
    """Where ``ours`` (fp32) is within 1 ulp of the float64-rounded ``want`` (see the module doc)."""
    exact = want.to(torch.float64)
    return (ours.to(torch.float64) - exact).abs() <= _ulp(exact) + 1e-15 * std


@pytest.mark.parametrize("counter,key,want", PHILOX_KATS)
def test_philox_reference_gives_the_random123_known_answers(counter, key, want):
    words = philox4x32_10_reference(torch.tensor([counter]), key[0] | key[1] << 32)
    assert words[0].tolist() == list(want)


@pytest.mark.parametrize("device", DEVICES)
def test_philox_kernel_words_equal_the_reference(device):
    assert ops.philox4x32_10(0, 0, 1, device)[0].tolist() == list(PHILOX_KATS[0][2])
    for key in KEYS:
        for counter, count in ((0, 1), (5, 7), (11, 8), (2 ** 32 - 5, 27), (2 ** 40 + 3, 100)):
            c = torch.arange(counter, counter + count)
            counters = torch.stack([c & 0xFFFFFFFF, c >> 32, torch.zeros_like(c), torch.zeros_like(c)], -1)
            got = ops.philox4x32_10(key, counter, count, device).cpu()
            assert torch.equal(got, philox4x32_10_reference(counters, key)), (key, counter, count)


def test_philox_reference_is_the_definition_in_python_integers():
    """The int64 split multiply against Python's exact integers, on random words."""
    gen = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2 ** 32, (64, 4), generator=gen, dtype=torch.int64)
    key = 0xDEADBEEF12345678
    for row, got in zip(counters.tolist(), philox4x32_10_reference(counters, key).tolist()):
        c, (k0, k1) = list(row), (key & 0xFFFFFFFF, key >> 32)
        for _ in range(10):
            p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
            c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        assert got == c


# (rows, cols, full_cols, row0, col0): aligned rows, rows starting and ending inside a counter,
# one-row and one-column blocks, narrow and wide (several AVX2 groups and a partial last one).
BLOCKS = [(1, 1, 1, 0, 0), (3, 5, 7, 2, 1), (16, 64, 64, 0, 0), (33, 37, 101, 5, 63), (4, 1000, 1003, 1, 3),
          (2, 8195, 8200, 0, 5), (64, 250, 250, 9, 0)]


@pytest.mark.parametrize("rows,cols,full_cols,row0,col0", BLOCKS)
def test_floats_within_one_ulp_of_the_float64_reference(rows, cols, full_cols, row0, col0):
    for key, std in ((KEYS[2], 0.02), (KEYS[3], 1.0), (KEYS[4], 3.7)):
        want = normal_shard_reference(rows, cols, key, full_cols=full_cols, row0=row0, col0=col0, std=std)
        ours = ops.normal_shard_(torch.empty(rows, cols), key, full_cols=full_cols, row0=row0, col0=col0, std=std)
        close = _within_one_ulp(ours, want, std)
        assert close.all(), f"{(~close).sum().item()} elements more than 1 ulp away, e.g. {ours[~close][:4]} vs " \
                            f"{want[~close][:4]}"


def test_a_million_floats_within_one_ulp_and_nearly_all_equal_to_the_reference_rounding():
    rows, cols, key, std = 1024, 1024, KEYS[2], 0.02
    want = normal_shard_reference(rows, cols, key, full_cols=cols, std=std)
    ours = ops.normal_shard_(torch.empty(rows, cols), key, full_cols=cols, std=std)
    assert _within_one_ulp(ours, want, std).all()
    assert (ours == want).double().mean().item() > 0.999, "the kernels' float64 transform should round as the reference's"


def test_the_draws_look_normal():
    z = ops.normal_shard_(torch.empty(1000, 1000), KEYS[1], full_cols=1000, std=1.0).double()
    assert abs(z.mean().item()) < 0.005 and abs(z.std().item() - 1) < 0.005
    tail = (z.abs() > 2).double().mean().item()                  # 4.55% for N(0, 1)
    assert abs(tail - math.erfc(2 / math.sqrt(2))) < 0.002
    assert z.abs().max().item() < math.sqrt(-2 * math.log(2 ** -24)) + 1e-6   # u >= 2^-24: |z| <= 5.77


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_a_block_equals_that_block_of_the_full_tensor(device, dtype):
    gen = torch.Generator().manual_seed(1)
    for full_rows, full_cols in ((9, 1), (7, 3), (12, 37), (5, 64), (6, 67), (3, 1000), (2, 8200)):
        full = ops.normal_shard_(torch.empty(full_rows, full_cols, dtype=torch.float32, device=device), KEYS[2],
                                 full_cols=full_cols, std=0.02)
        for _ in range(6):
            row0 = int(torch.randint(0, full_rows, (1,), generator=gen))
            col0 = int(torch.randint(0, full_cols, (1,), generator=gen))
            rows = int(torch.randint(1, full_rows - row0 + 1, (1,), generator=gen))
            cols = int(torch.randint(1, full_cols - col0 + 1, (1,), generator=gen))
            block = ops.normal_shard_(torch.empty(rows, cols, dtype=dtype, device=device), KEYS[2],
                                      full_cols=full_cols, row0=row0, col0=col0, std=0.02)
            want = full[row0:row0 + rows, col0:col0 + cols].to(dtype)
            assert torch.equal(block, want), (full_rows, full_cols, row0, col0, rows, cols)


def test_the_scalar_and_vector_paths_agree_bit_for_bit():
    """Rows of 256 aligned columns go through the CPU's AVX2 groups only; a one-column block is
    always a partial counter, which the scalar definition draws."""
    full = ops.normal_shard_(torch.empty(3, 256), KEYS[4], full_cols=256, std=0.02)
    columns = [ops.normal_shard_(torch.empty(3, 1), KEYS[4], full_cols=256, col0=c, std=0.02) for c in range(256)]
    assert torch.equal(torch.cat(columns, dim=1), full)


@pytest.mark.parametrize("device", DEVICES)
def test_one_dimensional_and_strided_blocks(device):
    full = ops.normal_shard_(torch.empty(4, 50, device=device), 3, full_cols=50, std=1.0)
    row = ops.normal_shard_(torch.empty(50, device=device), 3, full_cols=50, row0=2, std=1.0)
    assert torch.equal(row, full[2])
    wide = torch.full((4, 60), 7.0, device=device)
    ops.normal_shard_(wide[:, 5:30], 3, full_cols=50, col0=11, std=1.0)   # rows 60 apart
    assert torch.equal(wide[:, 5:30], full[:, 11:36])
    assert (wide[:, :5] == 7).all() and (wide[:, 30:] == 7).all()


def test_values_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.normal_shard_(torch.empty(64, 9000), 5, full_cols=9001, col0=1, std=1.0)
        torch.set_num_threads(2)
        two = ops.normal_shard_(torch.empty(64, 9000), 5, full_cols=9001, col0=1, std=1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_keys_and_std_select_the_stream_and_scale():
    a = ops.normal_shard_(torch.empty(100), 1, full_cols=100, std=1.0)
    assert not torch.equal(a, ops.normal_shard_(torch.empty(100), 2, full_cols=100, std=1.0))
    assert not torch.equal(a, ops.normal_shard_(torch.empty(100), 1 + 2 ** 32, full_cols=100, std=1.0))
    scaled = ops.normal_shard_(torch.empty(100), 1, full_cols=100, std=0.5)
    assert torch.allclose(scaled, a * 0.5, rtol=2e-7, atol=0)


@pytest.mark.parametrize("make,args,message", [
    (lambda: torch.empty(2, 3, 4), dict(full_cols=4), "out must be 1-D or 2-D"),
    (lambda: torch.empty(2, 3, dtype=torch.float64), dict(full_cols=3), "out must be float32, float16 or bfloat16"),
    (lambda: torch.empty(3, 2).t(), dict(full_cols=3), "rows must be contiguous"),
    (lambda: torch.empty(1, 3).expand(2, 3), dict(full_cols=3), "rows must not overlap"),
    (lambda: torch.empty(2, 3), dict(full_cols=0), "full_cols must be >= 1"),
    (lambda: torch.empty(2, 3), dict(full_cols=3, row0=-1), "row0 and col0 must be >= 0"),
    (lambda: torch.empty(2, 3), dict(full_cols=4, col0=2), r"columns \[2, 2 \+ 3\) must lie within"),
    (lambda: torch.empty(2, 3), dict(full_cols=2 ** 40, row0=2 ** 22), "fewer than 2\\^62 elements"),
    (lambda: torch.empty(2, 3), dict(full_cols=3, std=0.0), "std must be a finite number > 0"),
    (lambda: torch.empty(2, 3), dict(full_cols=3, std=float("nan")), "std must be a finite number > 0"),
])
def test_bad_arguments_are_refused(make, args, message):
    args = {"std": 1.0, **args}
    with pytest.raises(RuntimeError, match=message):
        ops.normal_shard_(make(), 1, **args)


def test_bad_keys_and_philox_outputs_are_refused():
    with pytest.raises(ValueError, match=r"key must be in \[0, 2\^64\)"):
        ops.normal_shard_(torch.empty(3), -1, full_cols=3, std=1.0)
    with pytest.raises(RuntimeError, match="out must be int32"):
        torch.ops.m6.philox4x32_10_(torch.empty(2, 4), 0, 0)
    with pytest.raises(RuntimeError, match=r"out must have shape \(N, 4\)"):
        torch.ops.m6.philox4x32_10_(torch.empty(2, 3, dtype=torch.int32), 0, 0)
    with pytest.raises(RuntimeError, match=r"counters .* must lie in \[0, 2\^60\)"):
        torch.ops.m6.philox4x32_10_(torch.empty(2, 4, dtype=torch.int32), 0, 2 ** 60)


def test_opcheck_and_meta():
    torch.library.opcheck(torch.ops.m6.normal_shard_.default, (torch.empty(5, 7), 9, 11, 2, 3, 0.5))
    torch.library.opcheck(torch.ops.m6.philox4x32_10_.default, (torch.empty(5, 4, dtype=torch.int32), 9, 3))
    ops.normal_shard_(torch.empty(5, 7, device="meta"), 9, full_cols=11, std=0.5)   # the fake kernel: checks only
    with pytest.raises(RuntimeError, match="must lie within"):
        ops.normal_shard_(torch.empty(5, 7, device="meta"), 9, full_cols=6, std=0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_cuda_floats_match_the_cpu(dtype):
    for rows, cols, full_cols, row0, col0 in BLOCKS:
        cpu = ops.normal_shard_(torch.empty(rows, cols, dtype=dtype), KEYS[2], full_cols=full_cols, row0=row0,
                                col0=col0, std=0.02)
        cuda = ops.normal_shard_(torch.empty(rows, cols, dtype=dtype, device="cuda"), KEYS[2], full_cols=full_cols,
                                 row0=row0, col0=col0, std=0.02).cpu()
        if dtype == torch.float32:
            assert _within_one_ulp(cuda, cpu.double(), 0.02).all()
        # Same operations in the same order on both devices: the bits agree (csrc/init/philox_normal.h).
        assert torch.equal(cuda, cpu), (rows, cols, (cuda != cpu).sum().item())
