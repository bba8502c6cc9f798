"""Rank layout (pure), ParallelState over real gloo groups, and layout validation."""

import datetime

import pytest
import torch
import torch.distributed as dist

from m6_engine.parallel import GROUP_NAMES, LayoutError, initialize, rank_layout
from tests.distributed import Checks, assert_checks, init_state, run_ranks


def test_layout_tp_fastest_then_dp_then_pp():
    layout = rank_layout(8, tp=2, pp=2)
    assert layout.dp == 2
    assert layout.mesh() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert layout.groups("tp") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert layout.groups("dp") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert layout.groups("pp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert layout.groups("mp") == ((0, 1, 4, 5), (2, 3, 6, 7))
    assert layout.groups("embedding") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert layout.coords(6) == (1, 1, 0)


def test_layout_embedding_group_is_first_and_last_stage():
    layout = rank_layout(8, tp=1, pp=4)
    assert layout.groups("pp") == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert layout.groups("embedding") == ((0, 6), (1, 7))
    assert layout.group_of("embedding", 2) == ()          # a middle stage holds no tied weights
    assert rank_layout(2, tp=2).groups("embedding") == ((0,), (1,))   # pp == 1: itself


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (8, 2, 2), (8, 1, 4), (12, 2, 3), (16, 4, 2)])
def test_layout_groups_partition_the_world(world, tp, pp):
    layout = rank_layout(world, tp, pp)
    sizes = {"tp": tp, "pp": pp, "dp": world // (tp * pp), "mp": tp * pp}
    for name, size in sizes.items():
        groups = layout.groups(name)
        assert sorted(r for g in groups for r in g) == list(range(world)), name
        assert all(len(g) == size for g in groups), name
    for rank in range(world):
        assert layout.rank_of(*layout.coords(rank)) == rank
        pp_rank, dp_rank, tp_rank = layout.coords(rank)
        assert layout.group_of("tp", rank)[tp_rank] == rank
        assert layout.group_of("pp", rank)[pp_rank] == rank
        assert layout.group_of("dp", rank)[dp_rank] == rank


@pytest.mark.parametrize("world,tp,pp,message", [
    (6, 4, 1, "not divisible by tp \\* pp"),
    (4, 4, 2, "does not fit"),
    (4, 0, 1, "tp must be an integer >= 1"),
    (4, 1, -2, "pp must be an integer >= 1"),
    (4, 1.5, 1, "tp must be an integer"),
    (0, 1, 1, "world_size must be"),
])
def test_bad_layouts_are_clear_errors(world, tp, pp, message):
    with pytest.raises(LayoutError, match=message):
        rank_layout(world, tp, pp)


def test_half_torchrun_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LayoutError, match="only RANK is set"):
        initialize()
    assert not dist.is_initialized()


def _check_state(state, expected_coords):
    layout = state.layout
    assert (state.pp_rank, state.dp_rank, state.tp_rank) == expected_coords
    assert tuple(state.mesh.get_coordinate()) == expected_coords, state.mesh.get_coordinate()
    for name in GROUP_NAMES:
        ranks = state.group_ranks(name)
        if name == "embedding" and not (state.is_first_stage or state.is_last_stage):
            assert ranks == () and state.group(name) is None, (ranks, state.group(name))
            continue
        assert dist.get_process_group_ranks(state.group(name)) == list(ranks), name
        value = torch.tensor([float(state.rank)])
        dist.all_reduce(value, group=state.group(name))
        assert value.item() == sum(ranks), name
        timeout = state.group(name)._get_backend(torch.device("cpu")).options._timeout
        assert timeout == datetime.timedelta(seconds=60), (name, timeout)
    assert state.prev_stage_rank == (None if state.is_first_stage else
                                     layout.rank_of(state.pp_rank - 1, state.dp_rank, state.tp_rank))
    assert state.next_stage_rank == (None if state.is_last_stage else
                                     layout.rank_of(state.pp_rank + 1, state.dp_rank, state.tp_rank))


def _check_bad_layout_before_collectives(tp, pp, message):
    try:
        init_state(tp, pp)
    except LayoutError as error:
        assert message in str(error), str(error)
    else:
        raise AssertionError(f"initialize(tp={tp}, pp={pp}) did not raise")
    # No rank entered a collective: the world group still works in lockstep.
    value = torch.ones(1)
    dist.all_reduce(value)
    assert value.item() == dist.get_world_size()


def _ranks_8():
    checks = Checks()
    state = init_state(tp=2, pp=2)
    checks.run("groups tp=2 pp=2 dp=2", _check_state, state, state.layout.coords(state.rank))
    state = init_state(tp=1, pp=4)
    checks.run("groups tp=1 pp=4 dp=2", _check_state, state, state.layout.coords(state.rank))
    checks.run("bad layout: tp=3", _check_bad_layout_before_collectives, 3, 1, "not divisible")
    checks.run("bad layout: too big", _check_bad_layout_before_collectives, 4, 4, "does not fit")
    return checks.results


def _single_process():
    checks = Checks()
    state = initialize()   # no torchrun variables, no existing group
    checks.run("single process", _check_sizes_one, state)
    return checks.results


def _check_sizes_one(state):
    assert (state.world_size, state.tp_size, state.pp_size, state.dp_size) == (1, 1, 1, 1)
    assert state.is_first_stage and state.is_last_stage and state.device.type == "cpu"
    value = torch.full((2,), 3.0)
    dist.all_reduce(value, group=state.group("tp"))
    assert value.tolist() == [3.0, 3.0]
    try:
        initialize(tp=2)
    except LayoutError as error:
        assert "does not fit in 1 rank" in str(error)
    else:
        raise AssertionError("initialize(tp=2) in one process did not raise")


@pytest.fixture(scope="module")
def results_8():
    return run_ranks(_ranks_8, 8)


@pytest.mark.parametrize("name", ["groups tp=2 pp=2 dp=2", "groups tp=1 pp=4 dp=2",
                                  "bad layout: tp=3", "bad layout: too big"])
def test_initialize_on_8_ranks(results_8, name):
    assert_checks(results_8, name)


def test_initialize_single_process_without_torchrun():
    assert_checks(run_ranks(_single_process, 1, torchrun_env=False), "single process")
