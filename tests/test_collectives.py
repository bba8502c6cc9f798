"""m6_engine.parallel.collectives: the flat all-gather / reduce-scatter under the names this torch
has. Every implementation this torch offers gives the same results on a 4-rank gloo group (whole
world and, at tp = 2, a dp subgroup; synchronous, async, in place as ZeRO-1 uses them), the one
picked at import is the newest and prints no deprecation warning, and no engine code calls the
torch functions directly."""

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from m6_engine.parallel import collectives
from tests.distributed import init_state, run_ranks

ROOT = Path(__file__).resolve().parent.parent
N = 3   # elements per rank


def _exercise(all_gather, reduce_scatter, group):
    """What one implementation gives on ``group``: plain, async and in-place results."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    mine = torch.arange(N, dtype=torch.float32) + 10 * dist.get_rank()   # distinct per global rank
    out = {}
    gathered = torch.full((size * N,), -1.0)
    assert all_gather(gathered, mine, group=group) is None
    out["all_gather"] = gathered
    gathered = torch.full((size * N,), -1.0)
    work = all_gather(gathered, mine, group=group, async_op=True)
    work.wait()
    out["all_gather async"] = gathered
    buffer = torch.zeros(size * N)           # in place: the input is this rank's slice of the output
    buffer[rank * N:(rank + 1) * N] = mine
    all_gather(buffer, buffer[rank * N:(rank + 1) * N], group=group, async_op=True).wait()
    out["all_gather in place"] = buffer

    full = torch.arange(size * N, dtype=torch.float32) * (dist.get_rank() + 1)
    shard = torch.full((N,), -1.0)
    assert reduce_scatter(shard, full, group=group) is None
    out["reduce_scatter"] = shard
    shard = torch.full((N,), -1.0)
    reduce_scatter(shard, full, group=group, async_op=True).wait()
    out["reduce_scatter async"] = shard
    buffer = full.clone()                    # in place: the output is this rank's slice of the input
    reduce_scatter(buffer[rank * N:(rank + 1) * N], buffer, group=group, async_op=True).wait()
    out["reduce_scatter in place"] = buffer[rank * N:(rank + 1) * N].clone()
    return out


def _expected(group_ranks, rank_in_group):
    size = len(group_ranks)
    gathered = torch.cat([torch.arange(N, dtype=torch.float32) + 10 * r for r in group_ranks])
    reduced = torch.arange(size * N, dtype=torch.float32) * sum(r + 1 for r in group_ranks)
    shard = reduced[rank_in_group * N:(rank_in_group + 1) * N]
    return {"all_gather": gathered, "reduce_scatter": shard}


def _all_implementations():
    results = {"picked": collectives.IMPLEMENTATION, "available": collectives.available(),
               "torch": torch.__version__}
    state = init_state(tp=2)   # groups: the whole world (4 ranks) and this rank's dp group (2)
    for label, group, ranks in (("world", None, tuple(range(dist.get_world_size()))),
                                ("dp", state.group("dp"), state.group_ranks("dp"))):
        expected = _expected(ranks, ranks.index(dist.get_rank()))
        for name in collectives.available():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = _exercise(*collectives.implementation(name), group)
            results[(label, name)] = {
                "wrong": [k for k, v in got.items() if not torch.equal(v, expected[k.split()[0]])],
                "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
            }
    # The module-level functions are the picked implementation's.
    results["module"] = (collectives.all_gather_single, collectives.reduce_scatter_single) == \
        collectives.implementation(collectives.IMPLEMENTATION)
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_all_implementations, 4)


def test_every_implementation_gives_the_same_results(ranks):
    for rank, r in enumerate(ranks):
        assert r["available"] and r["module"], (rank, r)
        for group in ("world", "dp"):
            for name in r["available"]:
                assert r[(group, name)]["wrong"] == [], (rank, group, name, r[(group, name)])


def test_picked_the_newest_names_without_warnings(ranks):
    r = ranks[0]
    newest = "single" if hasattr(dist, "all_gather_single") else "tensor"
    assert r["picked"] == newest == r["available"][0], r
    for group in ("world", "dp"):
        assert r[(group, r["picked"])]["warnings"] == [], r[(group, r["picked"])]


def test_implementation_names_are_checked():
    with pytest.raises(ValueError, match="unknown collectives implementation"):
        collectives.implementation("nccl")
    missing = [n for n in collectives.IMPLEMENTATIONS if n not in collectives.available()]
    for name in missing:   # torch 2.11: no *_single names
        with pytest.raises(RuntimeError, match="has no"):
            collectives.implementation(name)


def test_engine_code_calls_the_collectives_only_through_the_module():
    names = [a for attrs in collectives.IMPLEMENTATIONS.values() for a in attrs]
    pattern = re.compile(r"\b(?:dist|distributed)\.(%s)\b" % "|".join(names))
    offenders = []
    for folder in ("m6_engine", "megatron_ext", "examples", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("collectives.py", "test_collectives.py"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "use m6_engine.parallel.collectives:\n" + "\n".join(offenders)
