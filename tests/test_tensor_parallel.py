"""Tensor-parallel operators, layers, cross entropy and RNG against single-process torch.

One launch of 4 ranks runs every check for tp in {1, 2, 4} (dp = 4 / tp); each rank compares
its shard with an unsharded reference computed in the same process from the same seeds.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from m6_engine.parallel.roles import param_role
from m6_engine.parallel import (
    ColumnParallelLinear, DataParallel, RowParallelLinear, VocabParallelEmbedding, checkpoint,
    copy_to_tp, gather_from_tp, init_generator, reduce_from_tp, scatter_to_tp, seed_parallel_rng,
    vocab_parallel_cross_entropy,
)
from m6_engine.parallel.init import master_weight, normal_init
from tests.distributed import Checks, assert_checks, init_state, run_ranks

TPS = (1, 2, 4)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _chunk(x, dim, state):
    return x.chunk(state.tp_size, dim=dim)[state.tp_rank]


def _check_mappings(state):
    group, t, r = state.group("tp"), state.tp_size, state.tp_rank
    grads = [_randn(3, 8, seed=100 + i) for i in range(t)]        # upstream grad of rank i
    parts = [_randn(3, 8, seed=200 + i) for i in range(t)]        # per-rank input of rank i

    x = _randn(3, 8, seed=1).requires_grad_()
    y = copy_to_tp(x, group)
    y.backward(grads[r])
    assert torch.equal(y, x)
    assert_close(x.grad, sum(grads))

    x = parts[r].clone().requires_grad_()
    y = reduce_from_tp(x, group)
    y.backward(grads[0])
    assert_close(y, sum(parts))
    assert torch.equal(x.grad, grads[0])

    x = parts[r].clone().requires_grad_()
    fresh = x * 1.0                                # a layer's own partial output
    y = reduce_from_tp(fresh, group, in_place=True)
    y.backward(grads[0])
    assert_close(y, sum(parts))
    assert t == 1 or y.data_ptr() == fresh.data_ptr()
    assert torch.equal(x.grad, grads[0])

    x = _randn(3, 8 * t, seed=2).requires_grad_()
    y = scatter_to_tp(x, group)
    y.backward(grads[r])
    assert torch.equal(y, _chunk(x.detach(), -1, state))
    assert torch.equal(x.grad, torch.cat(grads, dim=-1))

    x = parts[r].clone().requires_grad_()
    y = gather_from_tp(x, group)
    full_grad = torch.cat(grads, dim=-1)
    y.backward(full_grad)
    assert torch.equal(y, torch.cat(parts, dim=-1))
    assert torch.equal(x.grad, _chunk(full_grad, -1, state))


def _reference_linear(in_f, out_f, name):
    ref = nn.Linear(in_f, out_f)
    with torch.no_grad():
        ref.weight.copy_(master_weight((out_f, in_f), init_generator(7, name), normal_init()))
        ref.bias.copy_(_randn(out_f, seed=3))
    return ref


def _check_column(state, gather_output):
    ref = _reference_linear(8, 12, "col")
    layer = ColumnParallelLinear(8, 12, state, generator=init_generator(7, "col"),
                                 gather_output=gather_output)
    assert layer.weight.shape == (12 // state.tp_size, 8) and param_role(layer.weight).tp_dim == 0
    with torch.no_grad():
        layer.bias.copy_(_chunk(ref.bias, 0, state))
    x, g = _randn(2, 5, 8, seed=4), _randn(2, 5, 12, seed=5)
    x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(g)
    y = layer(x_par)
    y.backward(g if gather_output else _chunk(g, -1, state))
    assert_close(y, y_ref if gather_output else _chunk(y_ref.detach(), -1, state))
    assert_close(x_par.grad, x_ref.grad)
    assert_close(layer.weight.grad, _chunk(ref.weight.grad, 0, state))
    assert_close(layer.bias.grad, _chunk(ref.bias.grad, 0, state))


def _check_row(state, input_is_parallel):
    ref = _reference_linear(12, 6, "row")
    layer = RowParallelLinear(12, 6, state, generator=init_generator(7, "row"),
                              input_is_parallel=input_is_parallel)
    assert layer.weight.shape == (6, 12 // state.tp_size) and param_role(layer.weight).tp_dim == 1
    with torch.no_grad():
        layer.bias.copy_(ref.bias)
    x, g = _randn(2, 5, 12, seed=6), _randn(2, 5, 6, seed=8)
    x_ref = x.clone().requires_grad_()
    x_par = (_chunk(x, -1, state) if input_is_parallel else x).clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(g)
    y = layer(x_par)
    y.backward(g)
    assert_close(y, y_ref)
    assert_close(x_par.grad, _chunk(x_ref.grad, -1, state) if input_is_parallel else x_ref.grad)
    assert_close(layer.weight.grad, _chunk(ref.weight.grad, 1, state))
    assert_close(layer.bias.grad, ref.bias.grad)


def _check_embedding(state):
    vocab, dim = 100, 8
    layer = VocabParallelEmbedding(vocab, dim, state, generator=init_generator(7, "emb"))
    padded = 128 * state.tp_size
    assert layer.padded_vocab_size == padded and layer.weight.shape == (padded // state.tp_size, dim)
    full = master_weight((vocab, dim), init_generator(7, "emb"), normal_init())
    ref = nn.Embedding(vocab, dim)
    with torch.no_grad():
        ref.weight.copy_(full)
    ids = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(9))
    g = _randn(3, 7, dim, seed=10)
    y = layer(ids)
    y.backward(g)
    y_ref = ref(ids)
    y_ref.backward(g)
    assert_close(y, y_ref)
    expected_grad = torch.zeros(padded, dim)
    expected_grad[:vocab] = ref.weight.grad
    assert_close(layer.weight.grad, _chunk(expected_grad, 0, state))
    # Tied head: real columns are hidden @ E^T, padding columns -inf.
    hidden = _randn(3, 7, dim, seed=11)
    logits = layer.logits(hidden)
    expected = torch.full((3, 7, padded), float("-inf"))
    expected[..., :vocab] = hidden @ full.T
    assert_close(logits, _chunk(expected, -1, state))


def _check_cross_entropy(state):
    logits = _randn(4, 6, 64, seed=12) * 3
    target = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(13))
    g = _randn(4, 6, seed=14)
    ref_logits = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 64), target.view(-1), reduction="none").view(4, 6)
    ref.backward(g)
    local = _chunk(logits, -1, state).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, state)
    loss.backward(g)
    assert loss.dtype == torch.float32
    assert_close(loss, ref)
    assert_close(local.grad, _chunk(ref_logits.grad, -1, state))


def _check_cross_entropy_skips_padding(state):
    vocab, dim = 100, 8
    layer = VocabParallelEmbedding(vocab, dim, state, generator=init_generator(7, "emb"))
    full = master_weight((vocab, dim), init_generator(7, "emb"), normal_init())
    hidden = _randn(2, 5, dim, seed=15) * 10
    target = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(16))
    h_ref, h_par = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ref = F.cross_entropy((h_ref @ full.T).view(-1, vocab), target.view(-1))
    ref.backward()
    loss = vocab_parallel_cross_entropy(layer.logits(h_par), target, state).mean()
    loss.backward()
    assert_close(loss, ref)
    assert_close(h_par.grad, h_ref.grad)
    assert torch.isfinite(layer.weight.grad).all()


def _check_cross_entropy_all_padding_shard(state):
    """vocab 60 padded to 128: at tp = 4 ranks 2 and 3 hold padding only (m_r = -inf, s_r = 0)."""
    vocab, dim = 60, 8
    layer = VocabParallelEmbedding(vocab, dim, state, generator=init_generator(7, "emb"),
                                   vocab_multiple=32)
    full = master_weight((vocab, dim), init_generator(7, "emb"), normal_init())
    hidden = _randn(3, 4, dim, seed=19) * 5
    target = torch.randint(0, vocab, (3, 4), generator=torch.Generator().manual_seed(20))
    h_ref, h_par = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ref = F.cross_entropy((h_ref @ full.T).view(-1, vocab), target.view(-1), reduction="none")
    ref.view(3, 4).backward(_randn(3, 4, seed=21))
    loss = vocab_parallel_cross_entropy(layer.logits(h_par), target, state)
    loss.backward(_randn(3, 4, seed=21))
    assert_close(loss, ref.view(3, 4))
    assert_close(h_par.grad, h_ref.grad)
    assert torch.isfinite(layer.weight.grad).all()


def _check_head_microbatches_in_flight(state, overwrite):
    """The head and the cross entropy (in place on the logits with ``overwrite``) run as a pipeline
    does: two micro-batches in flight (forward, forward, backward, backward), then a third. Losses
    and gradients match an unsharded reference: no micro-batch's saved tensors alias another's."""
    vocab, dim, tokens = 1000, 16, 96
    layer = VocabParallelEmbedding(vocab, dim, state, generator=init_generator(7, "emb"))
    full = master_weight((vocab, dim), init_generator(7, "emb"), normal_init())
    ref_weight = full.clone().requires_grad_()
    hiddens = [_randn(tokens, dim, seed=30 + i) for i in range(3)]
    targets = [torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(40 + i))
               for i in range(3)]
    grads = [_randn(tokens, seed=50 + i) for i in range(3)]
    inputs = [h.clone().requires_grad_() for h in hiddens]

    def forward(i):
        return vocab_parallel_cross_entropy(layer.logits(inputs[i]), targets[i], state,
                                            overwrite_logits=overwrite)

    loss0, loss1 = forward(0), forward(1)
    loss0.backward(grads[0])
    loss1.backward(grads[1])
    loss2 = forward(2)
    loss2.backward(grads[2])
    for i, loss in enumerate((loss0, loss1, loss2)):
        h_ref = hiddens[i].clone().requires_grad_()
        ref = F.cross_entropy(h_ref @ ref_weight.T, targets[i], reduction="none")
        ref.backward(grads[i])
        assert_close(loss, ref)
        assert_close(inputs[i].grad, h_ref.grad)
    expected = torch.zeros(layer.padded_vocab_size, dim)
    expected[:vocab] = ref_weight.grad
    assert_close(layer.weight.grad, _chunk(expected, 0, state))


def _check_embedding_grad_under_data_parallel(state):
    """Wrapped in DataParallel the lookup's gradient reaches main_grad dense, as it does unwrapped
    and on every device (one gradient path), and equals the sum of the micro-batches' gradients."""
    vocab, dim = 100, 8
    ids = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(9))
    g = _randn(3, 7, dim, seed=10)
    plain = VocabParallelEmbedding(vocab, dim, state, generator=init_generator(7, "emb"))
    plain(ids).backward(g)
    assert plain.weight.grad.layout == torch.strided
    inner = VocabParallelEmbedding(vocab, dim, state, generator=init_generator(7, "emb"))
    layouts = []                 # registered before DataParallel's hook, which frees the grad
    inner.weight.register_post_accumulate_grad_hook(lambda p: layouts.append(p.grad.layout))
    wrapped = DataParallel(inner, state)
    wrapped.zero_grad_buffer()
    with wrapped.no_sync():                         # two micro-batches accumulate
        wrapped(ids).backward(g)
    wrapped(ids).backward(g)
    wrapped.finish_grad_sync()
    assert layouts == [torch.strided, torch.strided]
    weight = wrapped.module.weight
    assert weight.grad is None
    assert_close(param_role(weight).main_grad, 2 * plain.weight.grad)


def _dropout_block(state, tracker):
    """x -> column -> dropout on the shard (model-parallel stream) -> gelu -> row -> dropout."""
    fc1 = ColumnParallelLinear(8, 16, state, generator=init_generator(7, "fc1"))
    fc2 = RowParallelLinear(16, 8, state, generator=init_generator(7, "fc2"))

    def fn(x):
        h = fc1(x)
        with tracker.fork():
            h = F.dropout(h, 0.5)
        return F.dropout(fc2(F.gelu(h)), 0.3)

    return fn, [fc1.weight, fc1.bias, fc2.weight, fc2.bias]


def _check_checkpointed_dropout(state):
    tracker = seed_parallel_rng(1234, state)
    fn, params = _dropout_block(state, tracker)
    x = _randn(4, 8, seed=17)
    start_default, start_tracked = torch.get_rng_state(), tracker.get_states()
    grads, after = [], []
    for use_checkpoint in (False, True):
        torch.set_rng_state(start_default)
        tracker.set_states(start_tracked)
        for p in params:
            p.grad = None
        xi = x.clone().requires_grad_()
        y = checkpoint(fn, xi, tracker=tracker) if use_checkpoint else fn(xi)
        (y * _randn(4, 8, seed=18)).sum().backward()
        grads.append([xi.grad] + [p.grad for p in params])
        after.append((torch.rand(3), _draw(tracker)))
    for plain, ckpt in zip(*grads):
        assert torch.equal(plain, ckpt)
    assert torch.equal(after[0][0], after[1][0]) and torch.equal(after[0][1], after[1][1])


def _draw(tracker):
    with tracker.fork():
        return torch.rand(3)


def _check_rng_streams(state):
    tracker = seed_parallel_rng(99, state)
    default, tracked = torch.rand(3), _draw(tracker)
    gathered = [torch.empty(6) for _ in range(state.tp_size)]
    torch.distributed.all_gather(gathered, torch.cat([default, tracked]), group=state.group("tp"))
    for other in gathered:
        assert torch.equal(other[:3], default)             # default stream: same on every tp rank
    tracked_draws = {tuple(g[3:].tolist()) for g in gathered}
    assert len(tracked_draws) == state.tp_size             # model-parallel: differs per tp rank


def _ranks_4():
    checks = Checks()
    for tp in TPS:
        state = init_state(tp=tp)
        checks.run(f"mappings tp={tp}", _check_mappings, state)
        for flag in (False, True):
            checks.run(f"column gather_output={flag} tp={tp}", _check_column, state, flag)
            checks.run(f"row input_is_parallel={flag} tp={tp}", _check_row, state, flag)
        checks.run(f"embedding tp={tp}", _check_embedding, state)
        checks.run(f"cross entropy tp={tp}", _check_cross_entropy, state)
        checks.run(f"cross entropy with padding tp={tp}", _check_cross_entropy_skips_padding, state)
        checks.run(f"cross entropy all-padding shard tp={tp}", _check_cross_entropy_all_padding_shard,
                   state)
        for overwrite in (False, True):
            checks.run(f"head in flight overwrite={overwrite} tp={tp}",
                       _check_head_microbatches_in_flight, state, overwrite)
        checks.run(f"embedding grad under dp tp={tp}", _check_embedding_grad_under_data_parallel,
                   state)
        checks.run(f"checkpointed dropout tp={tp}", _check_checkpointed_dropout, state)
        checks.run(f"rng streams tp={tp}", _check_rng_streams, state)
    return checks.results


@pytest.fixture(scope="module")
def results():
    return run_ranks(_ranks_4, 4)


@pytest.mark.parametrize("tp", TPS)
def test_region_operators(results, tp):
    assert_checks(results, f"mappings tp={tp}")


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_linear(results, tp, gather_output):
    assert_checks(results, f"column gather_output={gather_output} tp={tp}")


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("input_is_parallel", [False, True])
def test_row_parallel_linear(results, tp, input_is_parallel):
    assert_checks(results, f"row input_is_parallel={input_is_parallel} tp={tp}")


@pytest.mark.parametrize("tp", TPS)
def test_vocab_parallel_embedding(results, tp):
    assert_checks(results, f"embedding tp={tp}")


@pytest.mark.parametrize("tp", TPS)
def test_vocab_parallel_cross_entropy(results, tp):
    assert_checks(results, f"cross entropy tp={tp}")
    assert_checks(results, f"cross entropy with padding tp={tp}")


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("check", [
    "cross entropy all-padding shard",          # a shard of padding only: m_r = -inf, s_r = 0
    "head in flight overwrite=False",           # two micro-batches' logits alive at once
    "head in flight overwrite=True",            # ... and the loss overwriting its logits
    "embedding grad under dp",                  # dense into main_grad, as on every device
])
def test_head_and_embedding_under_a_schedule(results, tp, check):
    assert_checks(results, f"{check} tp={tp}")


@pytest.mark.parametrize("tp", TPS)
def test_checkpoint_reproduces_dropout(results, tp):
    assert_checks(results, f"checkpointed dropout tp={tp}")


@pytest.mark.parametrize("tp", TPS)
def test_rng_streams(results, tp):
    assert_checks(results, f"rng streams tp={tp}")


def test_bad_shapes_are_clear_errors():
    state = type("OneRank", (), {"tp_size": 3, "tp_rank": 0, "device": torch.device("cpu"),
                                 "group": lambda self, name: None})()
    with pytest.raises(ValueError, match="out_features = 8 is not divisible by the tensor-parallel size 3"):
        ColumnParallelLinear(4, 8, state, generator=init_generator(0, "x"))
    with pytest.raises(ValueError, match="in_features = 8 is not divisible"):
        RowParallelLinear(8, 4, state, generator=init_generator(0, "x"))
    with pytest.raises(ValueError, match="must share leading dims"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), state)
