"""Checkpoints: bit-exact round trip, resharding across (tp, pp, dp), atomic saves, damage detection,
keep_last and the ``latest`` pointer.

The model is the real M6Model at a tiny size whose vocabulary (60 words, vocab_multiple 64) pads to
64 rows at tp = 1 and 128 at tp = 2, where tp rank 1 then holds no real row at all. The optimizer is
the real MixedPrecisionOptimizer (ZeRO-1 where dp > 1) after a few steps on synthetic gradients.
Saving and loading models are built from different seeds, so a tensor that is not loaded shows.
"""

import dataclasses
import math
import os
import shutil
import warnings
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist

from m6_engine.parallel.roles import param_role
from m6_engine.checkpoint import (
    CheckpointError, CheckpointNotFoundError, latest_checkpoint, load_checkpoint,
    resolve_checkpoint, resume_seed, save_checkpoint,
)
from m6_engine.checkpoint import chunks
from m6_engine.checkpoint import save as save_module
from m6_engine.checkpoint.folders import FORMAT, FORMAT_VERSION, write_manifest
from m6_engine.config import ModelConfig
from m6_engine.model.m6 import M6Model
from m6_engine.optim import MixedPrecisionOptimizer, OptimizerConfig
from m6_engine.parallel import DataParallel, seed_parallel_rng
from m6_engine.parallel import initialize
from tests.distributed import PG_TIMEOUT_S, RankFailure, init_state, run_ranks

CFG = ModelConfig(num_layers=4, hidden_size=32, num_heads=4, vocab_size=60, vocab_multiple=64,
                  max_text_positions=16, patch_feature_dim=8, hidden_dropout=0.0,
                  attention_dropout=0.0, fused_kernels=False)
WORD = "embedding.word.weight"
EXTRA = {"sampler": {"epoch": 1, "consumed_samples": 96}, "note": "resume me"}
SEED = 42


def build(state, seed, perturb=False, config=CFG, sharding=False, precision="fp32"):
    """(DataParallel-wrapped M6 stage drawn from ``seed``, its MixedPrecisionOptimizer)."""
    opt_cfg = OptimizerConfig(lr=1e-2, warmup_fraction=0.0, optimizer_sharding=sharding,
                              precision=precision)
    stage = M6Model(config, state, seed=seed, dtype=opt_cfg.param_dtype)
    if perturb:   # layout-independent change, so LayerNorm gains and biases differ from a fresh model
        with torch.no_grad():
            for name, p in stage.named_parameters():
                if name != WORD:
                    p.mul_(1.5).add_(0.125)
    model = DataParallel(stage, state, grad_reduce="reduce_scatter" if sharding else "all_reduce")
    return model, MixedPrecisionOptimizer(model, opt_cfg, state, total_steps=10)


def take_steps(model, optimizer, steps):
    """Optimizer steps on synthetic gradients g = 0.1 sin(7 p): identical on every copy of a
    shard, zero on the vocabulary padding (whose rows then stay zero)."""
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.no_grad():
            for p in model.params:
                param_role(p).main_grad.copy_(torch.sin(7.0 * p.float()) * 0.1)
        optimizer.step()


def draws(tracker):
    """Numbers drawn from the default stream and the model-parallel stream (on the tracker's
    device: with CUDA, from the CUDA generators; the CPU ones are drawn as well)."""
    device = tracker.device
    with tracker.fork():
        tracked = [torch.rand(4), torch.rand(4, device=device).cpu()]
    return torch.cat([torch.rand(4), torch.rand(4, device=device).cpu(), *tracked])


def local_state(model, optimizer, state):
    """This rank's tensors, with what is needed to assemble the global ones in the parent
    (collective over dp: ``param_states`` gathers ZeRO-1 shards)."""
    named = dict(model.module.named_parameters())
    tp_dims = {n: param_role(p).tp_dim for n, p in named.items()}
    states = optimizer.param_states(named)
    flat_opt = {f"{n}.{k}": v.cpu() for n, s in states.items() for k, v in s.items()}
    tp_dims.update({f"{n}.{k}": tp_dims[n] for n, s in states.items() for k in s})
    return {"coords": (state.pp_rank, state.dp_rank, state.tp_rank), "tp_dims": tp_dims,
            "params": {n: p.detach().cpu().clone() for n, p in named.items()},
            "optim": flat_opt, "scalars": optimizer.scalar_state()}


def assemble(results, part, loaded=True):
    """Global tensors of ``part`` ("params" / "optim") from every rank's local tensors; checks that
    every copy of a shard (dp replicas, tp-replicated tensors, tied copies) is identical and, for
    a loaded model, that vocabulary padding rows are zero."""
    pieces = defaultdict(dict)
    for r in results:
        tp_rank = r["coords"][2]
        for name, t in r[part].items():
            if tp_rank in pieces[name]:
                assert torch.equal(pieces[name][tp_rank], t), f"{name}: copies of one shard differ"
            pieces[name][tp_rank] = t
    tp_dims = {k: v for r in results for k, v in r["tp_dims"].items()}
    full = {}
    for name, by_rank in pieces.items():
        shards = [by_rank[i] for i in sorted(by_rank)]
        dim = tp_dims[name]
        if dim is None:
            assert all(torch.equal(s, shards[0]) for s in shards), f"{name}: tp replicas differ"
            full[name] = shards[0]
        else:
            full[name] = torch.cat(shards, dim)
        if name.startswith(WORD):
            if loaded:
                assert not full[name][CFG.vocab_size:].any(), f"{name}: padding rows are not zero"
            full[name] = full[name][:CFG.vocab_size]
    return full


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def assert_loaded_as_saved(results, saved):
    for part in ("params", "optim"):
        assert_same_tensors(assemble([r["loaded"] for r in results], part), saved[part])


# ---------------------------------------------------------------------------------------------
# Round trip at (tp, pp, dp) = (2, 2, 1), then resharding to (1, 1, 1), (1, 2, 2) and (2, 1, 1).

def _save_and_reload(ckpt_dir):
    state = init_state(tp=2, pp=2)
    tracker = seed_parallel_rng(SEED, state)
    model, opt = build(state, seed=1, perturb=True)
    take_steps(model, opt, 3)
    torch.rand(5)
    path = save_checkpoint(ckpt_dir, 7, model=model, optimizer=opt, state=state, extra=EXTRA,
                           rng_tracker=tracker, config={"model": CFG})
    saved, after_save = local_state(model, opt, state), draws(tracker)
    model2, opt2 = build(state, seed=2)
    torch.rand(7)
    loaded = load_checkpoint(ckpt_dir, model=model2, optimizer=opt2, state=state,
                             rng_tracker=tracker)
    return {"saved": saved, "loaded": local_state(model2, opt2, state), "path": str(path),
            "draws": (after_save, draws(tracker)), "step": loaded.step, "extra": loaded.extra,
            "rng": loaded.rng, "config": loaded.config, "layout": loaded.saved_layout,
            "files": sorted(os.listdir(ckpt_dir))}


def _load_elsewhere(loads):
    """Load each (checkpoint, tp, pp, resave_dir) in turn into a seed-3 model (with ZeRO-1 when
    dp > 1); resave if asked."""
    outs = []
    for ckpt_dir, tp, pp, resave_dir in loads:
        state = init_state(tp=tp, pp=pp)
        tracker = seed_parallel_rng(0, state)
        model, opt = build(state, seed=3, sharding=state.dp_size > 1)
        loaded = load_checkpoint(ckpt_dir, model=model, optimizer=opt, state=state,
                                 rng_tracker=tracker, seed=SEED)
        out = {"loaded": local_state(model, opt, state), "rng": loaded.rng, "step": loaded.step,
               "extra": loaded.extra, "draws": draws(tracker)}
        out["expected_draws"] = draws(seed_parallel_rng(resume_seed(SEED, loaded.step), state))
        if resave_dir is not None:
            save_checkpoint(resave_dir, loaded.step, model=model, optimizer=opt, state=state,
                            extra=loaded.extra, rng_tracker=tracker)
        outs.append(out)
    return outs


def saved_run(save_fn, ckpt_dir, *args):
    """(ckpt_dir, every rank's result, the saved global tensors by part) of ``save_fn`` on 4 ranks."""
    results = run_ranks(save_fn, 4, str(ckpt_dir), *args)
    return ckpt_dir, results, {part: assemble([r["saved"] for r in results], part, loaded=False)
                               for part in ("params", "optim")}


@pytest.fixture(scope="module")
def saved_221(tmp_path_factory):
    return saved_run(_save_and_reload, tmp_path_factory.mktemp("ckpt") / "run")


def test_round_trip_same_layout_is_bit_exact(saved_221):
    ckpt_dir, results, _ = saved_221
    for rank, r in enumerate(results):
        assert r["path"] == str(ckpt_dir / "step_000007")
        assert r["files"] == ["latest", "step_000007"], r["files"]
        assert_same_tensors(r["saved"]["params"], r["loaded"]["params"])
        assert_same_tensors(r["saved"]["optim"], r["loaded"]["optim"])
        assert r["loaded"]["scalars"] == r["saved"]["scalars"] and r["saved"]["scalars"]["steps"] == 3
        assert (r["step"], r["extra"], r["rng"]) == (7, EXTRA, "restored"), rank
        assert torch.equal(*r["draws"]), f"rank {rank}: RNG streams not restored"
        assert r["layout"] == {"tp": 2, "pp": 2, "dp": 1, "world_size": 4}
        assert r["config"]["model"]["vocab_size"] == CFG.vocab_size
    # Tied copies: the first and last stage hold the word embedding under one name (assemble
    # checks the copies are identical); a fresh model built from seed 2 differs from seed 1's.
    stages_with_word = {r["loaded"]["coords"][0] for r in results if WORD in r["loaded"]["params"]}
    assert stages_with_word == {0, 1}
    loaded = assemble([r["loaded"] for r in results], "params")
    assert torch.equal(loaded[WORD], saved_221[2]["params"][WORD])


@pytest.fixture(scope="module")
def resharded(saved_221, tmp_path_factory):
    """Load the (2, 2, 1) checkpoint at (1, 1, 1) (which saves it again at tp = 1), then at
    (1, 2, 2), and load the tp = 1 checkpoint at (2, 1, 2)."""
    ckpt_dir, tp1_dir = saved_221[0], tmp_path_factory.mktemp("tp1")
    ((single,),) = run_ranks(_load_elsewhere, 1, [(str(ckpt_dir), 1, 1, str(tp1_dir))],
                             torchrun_env=False)
    four = run_ranks(_load_elsewhere, 4, [(str(ckpt_dir), 1, 2, None), (str(tp1_dir), 2, 1, None)])
    return {"111": [single], "122": [r[0] for r in four], "212 from tp1": [r[1] for r in four]}


@pytest.mark.parametrize("layout", ["111", "122", "212 from tp1"])
def test_reshard_gives_identical_global_tensors(saved_221, resharded, layout):
    saved = saved_221[2]
    results = resharded[layout]
    assert_loaded_as_saved(results, saved)
    saved_scalars = saved_221[1][0]["saved"]["scalars"]
    for r in results:
        assert (r["step"], r["extra"], r["loaded"]["scalars"]) == (7, EXTRA, saved_scalars)
        # A new layout cannot take the saved RNG states: reseeded from (seed, step).
        assert r["rng"] == "reseeded" and torch.equal(r["draws"], r["expected_draws"])


# ---------------------------------------------------------------------------------------------
# ZeRO-1: each dp rank saves and loads its own pieces; the optimizer state is never gathered.

@pytest.mark.parametrize("shape", [(37,), (1, 9), (7, 9), (9, 1)])
def test_flat_ranges_become_rectangles_that_partition_them(shape):
    from m6_engine.checkpoint.sharding import flat_range_rectangles, piece_of, pieces_buffer_layout

    n = math.prod(shape)
    tensor = torch.arange(n).view(shape)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        first, end = sorted(torch.randint(0, n + 1, (2,), generator=gen).tolist())
        if first == end:
            continue
        buffer_shape, start, rectangles = flat_range_rectangles(first, end, shape)
        assert len(rectangles) <= 3 and buffer_shape[1:] == shape[1:]
        buffer = torch.full(buffer_shape, -1, dtype=torch.long)
        buffer.view(-1)[start:start + end - first] = tensor.view(-1)[first:end]
        covered = torch.zeros(shape, dtype=torch.int)
        for in_buffer, size, in_tensor in rectangles:
            b = tuple(slice(o, o + k) for o, k in zip(in_buffer, size))
            t = tuple(slice(o, o + k) for o, k in zip(in_tensor, size))
            assert torch.equal(buffer[b], tensor[t])
            covered[t] += 1
        expected = torch.zeros(n, dtype=torch.int)
        expected[first:end] = 1
        assert torch.equal(covered.view(-1), expected), (first, end, rectangles)
    # Two ranges stacked in one buffer, each found again where the layout put it.
    ranges = [(0, 3), (n // 2, n)] if n > 6 else [(0, 1), (2, n)]
    stacked_shape, placements = pieces_buffer_layout(ranges, shape)
    stacked = torch.zeros(stacked_shape, dtype=torch.long)
    for (first, end), placement in zip(ranges, placements):
        piece_of(stacked, placement, first, end).copy_(tensor.view(-1)[first:end])
    for (first, end), placement in zip(ranges, placements):
        assert torch.equal(piece_of(stacked, placement, first, end), tensor.view(-1)[first:end])
    with pytest.raises(ValueError, match="not a non-empty part"):
        flat_range_rectangles(3, 3, shape)


def _no_gather(*args, **kwargs):
    raise AssertionError("a ZeRO-1 checkpoint gathered the optimizer state (param_states)")


def _save_sharded(ckpt_dir, precision="fp32", sharding=True):
    """(tp, pp, dp) = (1, 2, 2) with ZeRO-1 (or without: ``sharding``; the tied word embedding on
    both stages): save, and load into a fresh model of the same layout, with param_states made to
    fail."""
    from m6_engine.checkpoint.optimizer_state import optimizer_entries
    from m6_engine.checkpoint.sharding import model_tensors

    state = init_state(tp=1, pp=2)
    tracker = seed_parallel_rng(SEED, state)
    model, opt = build(state, seed=1, perturb=True, sharding=sharding, precision=precision)
    take_steps(model, opt, 3)
    opt.param_states = _no_gather                       # shadows the method on this instance
    save_checkpoint(ckpt_dir, 5, model=model, optimizer=opt, state=state, extra=EXTRA, rng_tracker=tracker)
    # What the save held: the owned elements, plus at most two partial rows per piece, per key.
    buffers = optimizer_entries(opt, model_tensors(model), state, for_save=True).pieces
    held = sum(b.numel() for _, bufs, _ in buffers.values() for b in bufs.values())
    owned = sum(end - first for ranges, _, _ in buffers.values() for first, end in ranges)
    rows = sum(2 * p.shape[-1] for p in model.params)
    del opt.param_states
    model2, opt2 = build(state, seed=2, sharding=sharding, precision=precision)
    opt2.param_states = _no_gather
    load_checkpoint(ckpt_dir, model=model2, optimizer=opt2, state=state, rng_tracker=tracker)
    del opt2.param_states
    return {"saved": local_state(model, opt, state), "loaded": local_state(model2, opt2, state),
            "held": held, "owned": owned, "slack": 3 * rows,
            "stage_numel": sum(p.numel() for p in model.params)}


@pytest.fixture(scope="module")
def saved_zero(tmp_path_factory):
    return saved_run(_save_sharded, tmp_path_factory.mktemp("zero") / "run")


def test_zero_round_trip_saves_only_owned_pieces(saved_zero):
    _, results, saved = saved_zero
    assert_loaded_as_saved(results, saved)
    for r in results:   # 3 keys x (owned + partial rows), against 3 x the whole stage before
        assert 3 * r["owned"] <= r["held"] <= 3 * r["owned"] + r["slack"] < 3 * r["stage_numel"]
        assert r["owned"] < r["stage_numel"]


def test_zero_round_trip_with_bf16_params(tmp_path):
    # Separate fp32 masters: loading sets them, rounds them into the bf16 parameters and
    # all-gathers those over dp.
    _, results, saved = saved_run(_save_sharded, tmp_path / "run", "bf16")
    assert_loaded_as_saved(results, saved)
    assert all(t.dtype == torch.bfloat16 for t in results[0]["loaded"]["params"].values())


def test_data_parallel_replicas_without_zero_take_the_same_path(tmp_path):
    # Without ZeRO-1 every dp replica's pieces are whole parameters, the same chunks on each
    # (DCP's save planner keeps one copy of an item several ranks save); every replica reads them.
    _, results, saved = saved_run(_save_sharded, tmp_path / "run", "fp32", False)
    assert_loaded_as_saved(results, saved)
    for r in results:
        assert r["owned"] == r["stage_numel"] and r["held"] == 3 * r["stage_numel"]


def test_zero_checkpoint_reshards(saved_zero):
    # The pieces of (1, 2, 2) read back at (1, 1, 1) without ZeRO and at (2, 1, 2) with it.
    ckpt_dir, _, saved = saved_zero
    ((single,),) = run_ranks(_load_elsewhere, 1, [(str(ckpt_dir), 1, 1, None)], torchrun_env=False)
    four = [r[0] for r in run_ranks(_load_elsewhere, 4, [(str(ckpt_dir), 2, 1, None)])]
    for results in ([single], four):
        assert_loaded_as_saved(results, saved)
        assert all((r["step"], r["extra"]) == (5, EXTRA) for r in results)


# ---------------------------------------------------------------------------------------------
# Chunks of a global tensor (the vocabulary without its padding, ZeRO-1 pieces) reach DCP through
# the CheckpointableTensor protocol on torch 2.14 and through DCP's _Checkpointable hooks on torch
# 2.11, which has no such protocol (``m6_engine.checkpoint.chunks``): one stored format.

def _stored(folder):
    """The tensor entries of a checkpoint folder's .metadata (global size, chunks, properties)
    and the bytes of its data files."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(folder).read_metadata().state_dict_metadata
    entries = {k: (tuple(m.size), sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks), m.properties)
               for k, m in metadata.items() if isinstance(m, TensorStorageMetadata)}
    return entries, {p.name: p.read_bytes() for p in sorted(folder.glob("*.distcp"))}


# A (6, 4) local tensor whose last row is padding of a (5, 4) global tensor, and a flat piece
# [2, 8) of a (2, 4) tensor as three rectangles of a (2, 4) buffer, as ``sharding`` describes them.
_CHUNKS = {"word": ((6, 4), (5, 4), [((0, 0), (0, 0), (5, 4))]),
           "piece": ((2, 4), (2, 4), [((0, 2), (0, 2), (1, 2)), ((1, 0), (1, 0), (1, 4))])}


def _chunk_entries(make, fill):
    buffers, entries = {}, {}
    for key, (local_shape, global_shape, rectangles) in _CHUNKS.items():
        buffers[key] = fill(local_shape)
        entries[key] = make(buffers[key], global_shape, [g for g, _, _ in rectangles],
                            [b for _, b, _ in rectangles], [s for _, _, s in rectangles])
    return buffers, entries


@pytest.mark.parametrize("implementation", chunks.available())
def test_chunks_are_stored_as_the_global_tensor(implementation, tmp_path):
    # One process, DCP alone: the stored tensors have the global shapes (torch 2.11 stored the
    # local (6, 4) before), and every implementation reads every other's back in place.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

    saved, entries = _chunk_entries(chunks.IMPLEMENTATIONS[implementation],
                                    lambda shape: torch.arange(math.prod(shape), dtype=torch.float32).view(shape))
    with warnings.catch_warnings():   # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(entries, storage_writer=FileSystemWriter(tmp_path),
                 planner=DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
        stored, _ = _stored(tmp_path)
        assert {k: v[:2] for k, v in stored.items()} == {
            "word": ((5, 4), [((0, 0), (5, 4))]),
            "piece": ((2, 4), [((0, 2), (1, 2)), ((1, 0), (1, 4))])}
        for reader in chunks.available():
            loaded, entries = _chunk_entries(chunks.IMPLEMENTATIONS[reader], lambda shape: torch.full(shape, -1.0))
            dcp.load(entries, storage_reader=FileSystemReader(tmp_path),
                     planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
            for key, (_, _, rectangles) in _CHUNKS.items():
                written = torch.zeros_like(loaded[key], dtype=torch.bool)
                for _, (r, c), (h, w) in rectangles:
                    written[r:r + h, c:c + w] = True
                assert torch.equal(loaded[key][written], saved[key][written]), (reader, key)
                assert (loaded[key][~written] == -1).all(), (reader, key)   # nothing else touched


def _with_chunks_implementation(name, fn, *args):
    chunks.use(name)
    return fn(*args)


@pytest.mark.skipif(len(chunks.available()) < 2,
                    reason="this torch's DCP has only the _Checkpointable hooks, which every other test uses")
def test_chunk_implementations_write_the_same_checkpoint_and_read_each_other(saved_zero, tmp_path):
    # The ZeRO-1 save at (1, 2, 2) again, with the other implementation: byte-identical data
    # files and the same metadata; each implementation then reads the other's at (2, 1, 2).
    ckpt_dir, _, saved = saved_zero
    other = next(n for n in chunks.available() if n != chunks.IMPLEMENTATION)
    results = run_ranks(_with_chunks_implementation, 4, other, _save_sharded, str(tmp_path / "run"))
    assert_loaded_as_saved(results, saved)
    assert _stored(tmp_path / "run" / "step_000005") == _stored(ckpt_dir / "step_000005")
    by_other = run_ranks(_with_chunks_implementation, 4, other, _load_elsewhere, [(str(ckpt_dir), 2, 1, None)])
    by_default = run_ranks(_load_elsewhere, 4, [(str(tmp_path / "run"), 2, 1, None)])
    for four in (by_other, by_default):
        assert_loaded_as_saved([r[0] for r in four], saved)


def _cuda_round_trip(ckpt_dir):
    state = initialize(backend="nccl", timeout=PG_TIMEOUT_S)
    tracker = seed_parallel_rng(SEED, state)
    model, opt = build(state, seed=1, perturb=True)
    take_steps(model, opt, 2)
    save_checkpoint(ckpt_dir, 2, model=model, optimizer=opt, state=state, rng_tracker=tracker)
    saved, after_save = local_state(model, opt, state), draws(tracker)
    model2, opt2 = build(state, seed=2)
    torch.rand(3, device=state.device)
    loaded = load_checkpoint(ckpt_dir, model=model2, optimizer=opt2, state=state,
                             rng_tracker=tracker)
    return {"saved": saved, "loaded": local_state(model2, opt2, state), "rng": loaded.rng,
            "draws": (after_save, draws(tracker)),
            "on_cuda": all(p.is_cuda for p in model2.parameters())}


@pytest.mark.cuda
def test_round_trip_on_cuda(tmp_path):
    """One NCCL process on a GPU: tensors and the CUDA RNG streams come back bit-exact."""
    (r,) = run_ranks(_cuda_round_trip, 1, str(tmp_path), torchrun_env=False)
    assert r["on_cuda"] and r["rng"] == "restored"
    assert_same_tensors(r["saved"]["params"], r["loaded"]["params"])
    assert_same_tensors(r["saved"]["optim"], r["loaded"]["optim"])
    assert torch.equal(*r["draws"])


# ---------------------------------------------------------------------------------------------
# Atomicity: a save that fails on one rank, and a process killed in the middle of a save.

class _FailingWriter(save_module.DigestingWriter):
    def write_data(self, plan, planner):
        if dist.get_rank() == 1:
            raise OSError("no space left on device (injected)")
        return super().write_data(plan, planner)


class _DyingWriter(save_module.DigestingWriter):
    def write_data(self, plan, planner):
        super().write_data(plan, planner).wait()
        for name in os.listdir(self.path):   # half-written shards, then the process dies
            path = os.path.join(self.path, name)
            os.truncate(path, os.path.getsize(path) // 2)
        os._exit(3)


def _params(model):
    return {n: p.detach().clone() for n, p in model.module.named_parameters()}


def _failed_save(ckpt_dir):
    state = init_state(tp=2)
    model, _ = build(state, seed=1)
    save_checkpoint(ckpt_dir, 1, model=model, state=state, extra={"n": 1})
    good = _params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_module.DigestingWriter = _FailingWriter
    try:
        save_checkpoint(ckpt_dir, 2, model=model, state=state, extra={"n": 2})
        error = None
    except CheckpointError as exc:
        error = str(exc)
    finally:
        save_module.DigestingWriter = _FailingWriter.__base__
    listing = sorted(os.listdir(ckpt_dir))
    fresh, _ = build(state, seed=2)
    loaded = load_checkpoint(ckpt_dir, model=fresh, state=state)
    restored = all(torch.equal(p, good[n]) for n, p in _params(fresh).items())
    save_checkpoint(ckpt_dir, 3, model=model, state=state)
    return {"error": error, "listing": listing, "step": loaded.step, "extra": loaded.extra,
            "restored": restored, "after": sorted(os.listdir(ckpt_dir))}


def test_save_failing_on_one_rank_keeps_previous_checkpoint(tmp_path):
    for r in run_ranks(_failed_save, 2, str(tmp_path)):
        assert r["error"] is not None and "injected" in r["error"], r["error"]
        assert "untouched" in r["error"] or "rank 0 failed" in r["error"], r["error"]
        stale, *rest = r["listing"]
        assert rest == ["latest", "step_000001"] and stale.startswith(".tmp-step_000002-"), r["listing"]
        assert (tmp_path / "latest").exists()
        assert (r["step"], r["extra"], r["restored"]) == (1, {"n": 1}, True)
        # The next good save publishes and removes what the failed one left behind.
        assert r["after"] == ["latest", "step_000001", "step_000003"], r["after"]


def _save_then_die(ckpt_dir):
    state = init_state()
    model, _ = build(state, seed=1)
    save_checkpoint(ckpt_dir, 1, model=model, state=state, extra={"n": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_module.DigestingWriter = _DyingWriter
    save_checkpoint(ckpt_dir, 2, model=model, state=state, extra={"n": 2})


def _load_reference(ckpt_dir, seed):
    state = init_state()
    model, _ = build(state, seed=2)
    loaded = load_checkpoint(ckpt_dir, model=model, state=state)
    reference, _ = build(state, seed=seed)
    return {"step": loaded.step, "path": str(loaded.path),
            "restored": all(torch.equal(p, q) for p, q in zip(model.parameters(),
                                                                reference.parameters()))}


def test_process_killed_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    with pytest.raises(RankFailure, match="exited with code 3"):
        run_ranks(_save_then_die, 1, str(tmp_path), torchrun_env=False)
    stale, *rest = sorted(os.listdir(tmp_path))
    assert rest == ["latest", "step_000001"] and stale.startswith(".tmp-step_000002-"), rest
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000001"
    (r,) = run_ranks(_load_reference, 1, str(tmp_path), 1, torchrun_env=False)
    assert r == {"step": 1, "path": str(tmp_path / "step_000001"), "restored": True}


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints, mismatched models, keep_last and the latest pointer (one process).

def _load_error(target, state, **kwargs):
    model, opt = build(state, seed=2)
    try:
        load_checkpoint(target, model=model, optimizer=opt, state=state, **kwargs)
    except CheckpointError as exc:
        return type(exc).__name__, str(exc)
    return None


def _restore(folder, pristine):
    shutil.rmtree(folder)
    shutil.copytree(pristine, folder)


def _damage(folder, pristine, name, how):
    _restore(folder, pristine)
    path = os.path.join(folder, name)
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) - 100)
    elif how == "flip":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x55]))
    elif how == "remove":
        os.remove(path)


def _damaged_and_mismatched(ckpt_dir, state):
    model, opt = build(state, seed=1)
    folder = save_checkpoint(ckpt_dir, 5, model=model, optimizer=opt, state=state)
    pristine = str(folder) + ".pristine"
    shutil.copytree(folder, pristine)
    shard = max((n for n in os.listdir(folder) if n.endswith(".distcp")),
                key=lambda n: os.path.getsize(os.path.join(folder, n)))
    out = {"shard": shard}
    for name, how, target, kwargs in [
            (shard, "truncate", folder, {}), (shard, "truncate", folder, {"verify": False}),
            (shard, "flip", folder, {}), (".metadata", "flip", folder, {}),
            ("complete", "remove", folder, {}), ("complete", "remove", ckpt_dir, {})]:
        _damage(folder, pristine, name, how)
        out[(name, how, target == folder, bool(kwargs))] = _load_error(target, state, **kwargs)
    _restore(folder, pristine)
    smaller = dataclasses.replace(CFG, num_layers=2)
    wider = dataclasses.replace(CFG, hidden_size=48, ffn_hidden_size=128)
    for label, config in (("smaller", smaller), ("wider", wider)):
        other, _ = build(state, seed=2, config=config)
        try:
            load_checkpoint(folder, model=other, state=state)
            out[label] = None
        except CheckpointError as exc:
            out[label] = str(exc)
    no_opt = save_checkpoint(ckpt_dir, 6, model=model, state=state)
    out["no_optimizer"] = _load_error(no_opt, state)
    return out


def _keep_last(ckpt_dir, state):
    model, opt = build(state, seed=1)
    listings = []
    for step in (1, 2, 3, 4, 4):
        save_checkpoint(ckpt_dir, step, model=model, optimizer=opt, state=state, keep_last=2)
        listings.append(sorted(os.listdir(ckpt_dir)))
    return listings


def _bf16_round_trip(ckpt_dir, state):
    """O2: bf16 parameters and fp32 masters both come back bit-exact."""
    model, opt = build(state, seed=1, perturb=True, precision="bf16")
    take_steps(model, opt, 2)
    save_checkpoint(ckpt_dir, 2, model=model, optimizer=opt, state=state)
    model2, opt2 = build(state, seed=2, precision="bf16")
    load_checkpoint(ckpt_dir, model=model2, optimizer=opt2, state=state)
    return local_state(model, opt, state), local_state(model2, opt2, state)


def _single_process(root):
    state = init_state()
    return {"damaged": _damaged_and_mismatched(os.path.join(root, "damaged"), state),
            "keep_last": _keep_last(os.path.join(root, "keep_last"), state),
            "bf16": _bf16_round_trip(os.path.join(root, "bf16"), state)}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    (out,) = run_ranks(_single_process, 1, str(root), torchrun_env=False)
    return root, out


def test_damaged_checkpoint_errors_name_the_file(single):
    out = single[1]["damaged"]
    shard = out["shard"]
    kind, msg = out[(shard, "truncate", True, False)]
    assert kind == "CheckpointCorruptError" and shard in msg and "corrupt" in msg, msg
    kind, msg = out[(shard, "truncate", True, True)]
    assert kind == "CheckpointCorruptError" and shard in msg and "truncated" in msg, msg
    kind, msg = out[(shard, "flip", True, False)]
    assert kind == "CheckpointCorruptError" and shard in msg and "crc32" in msg, msg
    kind, msg = out[(".metadata", "flip", True, False)]
    assert kind == "CheckpointCorruptError" and ".metadata" in msg, msg
    kind, msg = out[("complete", "remove", True, False)]
    assert kind == "CheckpointCorruptError" and "incomplete" in msg and "step_000005" in msg, msg
    kind, msg = out[("complete", "remove", False, False)]
    assert kind == "CheckpointNotFoundError", msg


def test_model_mismatch_and_missing_optimizer_are_clear_errors(single):
    out = single[1]["damaged"]
    assert "model tensor(s) this model lacks" in out["smaller"] and "layers.2." in out["smaller"]
    assert "global shape" in out["wider"] and "(48,)" in out["wider"], out["wider"]
    kind, msg = out["no_optimizer"]
    assert kind == "CheckpointError" and "no optimizer state" in msg, msg


def test_keep_last_and_latest_pointer(single):
    root, out = single
    assert out["keep_last"] == [["latest", "step_000001"], ["latest", "step_000001", "step_000002"],
                                ["latest", "step_000002", "step_000003"],
                                ["latest", "step_000003", "step_000004"],
                                ["latest", "step_000003", "step_000004"]]   # step 4 saved again
    assert (root / "keep_last" / "latest").read_text().strip() == "step_000004"


def test_bf16_params_and_fp32_masters_round_trip(single):
    saved, loaded = single[1]["bf16"]
    assert {t.dtype for t in saved["params"].values()} == {torch.bfloat16}
    assert {t.dtype for t in saved["optim"].values()} == {torch.float32}
    assert_same_tensors(saved["params"], loaded["params"])
    assert_same_tensors(saved["optim"], loaded["optim"])
    assert saved["scalars"] == loaded["scalars"]


def _fake_checkpoint(folder, step):
    folder.mkdir(parents=True)
    write_manifest(folder, {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
                            "layout": {}, "files": {}})


def test_latest_checkpoint_falls_back_to_newest_complete(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (3, 10, 20):
        _fake_checkpoint(tmp_path / f"step_{step:06d}", step)
    (tmp_path / "step_000030").mkdir()                      # a save that never completed
    (tmp_path / ".tmp-step_000040-abc").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000020"     # no pointer
    (tmp_path / "latest").write_text("step_000010\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000010"     # the pointer wins
    for bad in ("step_000030", "step_000099", "../step_000003", "garbage", ""):
        (tmp_path / "latest").write_text(bad)
        assert latest_checkpoint(tmp_path) == tmp_path / "step_000020", bad
    (tmp_path / "step_000020" / "complete").write_text("{not json")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000010"
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "absent")
