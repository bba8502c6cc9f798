"""Data-parallel gradient buffers: layout (pure) and bucketed all-reduce against one process."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from m6_engine.parallel.roles import param_role
from m6_engine.parallel import (
    ColumnParallelLinear, DataParallel, RowParallelLinear, VocabParallelEmbedding, init_generator, layout_grad_buffer,
)
from m6_engine.parallel.data_parallel import Bucket
from tests.distributed import Checks, assert_checks, init_state, run_ranks


def test_layout_buckets_are_padded_to_equal_aligned_shards():
    layout = layout_grad_buffer([10, 300, 5, 7], bucket_numel=256, dp_size=2, align=4)
    assert layout.param_ranges == ((0, 10), (10, 310), (312, 317), (317, 324))
    assert layout.bucket_ranges == ((0, 312), (312, 328))
    assert layout.bucket_members == ((0, 1), (2, 3))
    assert layout.numel == 328
    bucket = Bucket(1, 312, 328, (), dp_size=2)
    assert bucket.shard(0) == (312, 320) and bucket.shard(1) == (320, 328)


@pytest.mark.parametrize("seed", range(5))
def test_layout_invariants(seed):
    gen = torch.Generator().manual_seed(seed)
    numels = torch.randint(1, 500, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
    dp, align, bucket_numel = 4, 8, 700
    layout = layout_grad_buffer(numels, bucket_numel, dp, align)
    ends = [0] + [end for _, end in layout.param_ranges]
    for (start, end), n, previous_end in zip(layout.param_ranges, numels, ends):
        assert end - start == n and start >= previous_end            # in order, no overlap
    assert [i for m in layout.bucket_members for i in m] == list(range(len(numels)))
    assert layout.bucket_ranges[0][0] == 0 and layout.bucket_ranges[-1][1] == layout.numel
    for (start, end), members in zip(layout.bucket_ranges, layout.bucket_members):
        assert (end - start) % (dp * align) == 0
        assert all(start <= layout.param_ranges[i][0] < layout.param_ranges[i][1] <= end for i in members)
        assert sum(numels[i] for i in members[:-1]) < bucket_numel   # closed as soon as full


def test_layout_rejects_bad_sizes():
    with pytest.raises(ValueError, match="bucket_numel = 0"):
        layout_grad_buffer([3], bucket_numel=0, dp_size=1)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(5))   # never receives a gradient
        self.layers = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(),
                                    nn.Linear(16, 3))

    def forward(self, x):
        return self.layers(x)


def _mlp():
    torch.manual_seed(0)
    return MLP()


def _data(n=12):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)


def _reference_grads():
    ref = _mlp()
    x, y = _data()
    losses = [nn.functional.mse_loss(ref(xb), yb) for xb, yb in zip(x.split(2), y.split(2))]
    (torch.stack(losses).mean()).backward()
    return {name: p.grad for name, p in ref.named_parameters() if p.grad is not None}


def _backward_microbatches(model, state, sync_last=True):
    """This dp rank's 3 micro-batches of 2; all but the last in no_sync. Returns the buckets in
    flight seen after the no_sync backwards and after the last backward."""
    x, y = _data()
    half = x.shape[0] // state.dp_size
    xs = x[state.dp_rank * half:(state.dp_rank + 1) * half].split(2)
    ys = y[state.dp_rank * half:(state.dp_rank + 1) * half].split(2)
    in_flight = []
    for i, (xb, yb) in enumerate(zip(xs, ys)):
        loss = nn.functional.mse_loss(model(xb), yb) / len(xs)
        if i < len(xs) - 1 or not sync_last:
            with model.no_sync():
                loss.backward()
        else:
            loss.backward()
        in_flight.append(model.buckets_in_flight)
    return in_flight


def _check_grads(model, expected):
    for name, p in model.module.named_parameters():
        assert p.grad is None, f"{name}: param.grad should be freed into main_grad"
        assert param_role(p).main_grad.dtype == torch.float32
        want = expected.get(name, torch.zeros_like(p))
        assert_close(param_role(p).main_grad, want, msg=lambda m: f"{name}: {m}")


def _check_overlapped_step(state):
    model = DataParallel(_mlp(), state, bucket_numel=100)
    assert len(model.buckets) >= 3
    in_flight = _backward_microbatches(model, state)
    # No communication under no_sync; during the last backward every bucket but the one holding
    # the unused parameter was launched before finish_grad_sync.
    assert in_flight == [0, 0, len(model.buckets) - 1], in_flight
    model.finish_grad_sync()
    _check_grads(model, _reference_grads())
    # A second step after zeroing gives the same gradients again.
    model.zero_grad_buffer()
    _backward_microbatches(model, state)
    model.finish_grad_sync()
    _check_grads(model, _reference_grads())


def _check_all_no_sync(state):
    model = DataParallel(_mlp(), state, bucket_numel=100)
    assert _backward_microbatches(model, state, sync_last=False) == [0, 0, 0]
    model.finish_grad_sync()
    _check_grads(model, _reference_grads())


def _check_missing_zero_is_an_error(state):
    model = DataParallel(_mlp(), state, bucket_numel=100)
    _backward_microbatches(model, state)
    model.finish_grad_sync()
    try:
        model(torch.ones(2, 6)).sum().backward()
    except RuntimeError as error:
        assert "zero_grad_buffer()" in str(error), str(error)
    else:
        raise AssertionError("a backward after finish_grad_sync without zeroing was accepted")


def _check_half_params_accumulate_in_fp32(state):
    torch.manual_seed(0)
    model = DataParallel(nn.Linear(4, 4).to(torch.bfloat16), state)
    x = torch.ones(2, 4, dtype=torch.bfloat16) * (state.dp_rank + 1)
    model(x).float().sum().backward()
    model.finish_grad_sync()
    weight = model.module.weight
    assert param_role(weight).main_grad.dtype == torch.float32 and weight.grad is None
    assert_close(param_role(weight).main_grad, torch.full((4, 4), 3.0))     # mean over dp of 2 and 4


class _TwoParallelLinears(nn.Module):
    """A column- then a row-parallel linear (tp = 1 here: only their backward matters)."""

    def __init__(self, state, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.fc1 = ColumnParallelLinear(4, 8, state, generator=gen, dtype=dtype)
        self.fc2 = RowParallelLinear(8, 4, state, generator=gen, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _check_fused_weight_grads(state):
    """fp32: the tp linears add dW into main_grad inside the matmul (no .grad), and their buckets
    still launch during backward; bf16: the usual .grad and hook. Both give the plain gradient."""
    for dtype, fused in ((torch.float32, True), (torch.bfloat16, False)):
        module = _TwoParallelLinears(state, dtype)
        got_grad = []   # registered before DataParallel's hook, so it sees what autograd produced
        module.fc1.weight.register_post_accumulate_grad_hook(lambda p: got_grad.append(p.grad is not None))
        model = DataParallel(module, state, bucket_numel=16)
        plain = _TwoParallelLinears(state, torch.float32)
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(state.dp_rank))
        launched = []
        hook = model.module.fc1.weight.register_hook(lambda g: launched.append(model.buckets_in_flight))
        model.zero_grad_buffer()
        model(x.to(dtype)).float().square().sum().backward()
        hook.remove()
        in_flight = model.buckets_in_flight
        model.finish_grad_sync()
        plain(x).square().sum().backward()
        for name, p in plain.named_parameters():
            mine = param_role(dict(model.module.named_parameters())[name]).main_grad
            torch.distributed.all_reduce(p.grad)
            tol = dict(atol=1e-5, rtol=1e-5) if fused else dict(atol=0.05, rtol=0.05)
            assert_close(mine, p.grad / state.dp_size, **tol, msg=lambda m: f"{dtype} {name}: {m}")
        assert all(p.grad is None for p in model.module.parameters())
        assert got_grad == [not fused], (dtype, got_grad)   # fused: no dW tensor was made
        assert in_flight >= len(model.buckets) - 1, (dtype, in_flight, len(model.buckets))


def _check_fused_embedding_grads(state):
    """A single-use vocab-parallel embedding adds its rows into main_grad (no dense gradient);
    the same lookups' gradient as the plain embedding's dense one, repeated ids included."""
    ids = torch.tensor([[3, 5, 3, 0], [5, 5, 9, 1]]) + state.dp_rank
    plain = VocabParallelEmbedding(12, 6, state, generator=init_generator(7, "emb"))
    module = VocabParallelEmbedding(12, 6, state, generator=init_generator(7, "emb"), single_use=True)
    got_grad = []
    module.weight.register_post_accumulate_grad_hook(lambda p: got_grad.append(p.grad is not None))
    model = DataParallel(module, state)
    model.zero_grad_buffer()
    weights = torch.arange(48.0).view(2, 4, 6)
    (model(ids) * weights).sum().backward()
    model.finish_grad_sync()
    (plain(ids) * weights).sum().backward()
    torch.distributed.all_reduce(plain.weight.grad)
    assert got_grad == [False], got_grad
    assert_close(param_role(module.weight).main_grad, plain.weight.grad / state.dp_size, atol=0, rtol=0)


def _ranks_2():
    state = init_state()
    checks = Checks()
    checks.run("overlapped step", _check_overlapped_step, state)
    checks.run("all no_sync", _check_all_no_sync, state)
    checks.run("missing zero", _check_missing_zero_is_an_error, state)
    checks.run("half params", _check_half_params_accumulate_in_fp32, state)
    checks.run("fused weight grads", _check_fused_weight_grads, state)
    checks.run("fused embedding grads", _check_fused_embedding_grads, state)
    return checks.results


@pytest.fixture(scope="module")
def results():
    return run_ranks(_ranks_2, 2)


@pytest.mark.parametrize("name", ["overlapped step", "all no_sync", "missing zero", "half params",
                                  "fused weight grads", "fused embedding grads"])
def test_data_parallel(results, name):
    assert_checks(results, name)
