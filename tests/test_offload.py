"""ZeRO-Offload (``optimizer.offload: cpu``): the host AdamW against the on-device one, and Trainer
runs with offload at zero_stage 0, 1 and 2 (dp 2), with pp 2 (tied embedding), with tp 2 + SP +
dp 2 ZeRO-2, against one process without offload; checkpoints resume across offload; the
gradients of every piece that grad_sync does not change later reach the host during backward.
"""

import pytest
import torch

from m6_engine.config import ConfigError, job_config_from_dict
from m6_engine.optim import AdamW
from m6_engine.optim.offload import HostAdamW, OffloadPiece
from tests.training_job import Run, STEPS, launch, max_rel, small_job, check_resumed
from tests.training_job import corpus_fixture  # noqa: F401  (provides the module-scoped "corpus" fixture)

SAVE_AT = 5


# ---- the host optimizer -------------------------------------------------------------------------

def _pieces(dtype, sizes=(7, 100, 1033)):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    pieces = [OffloadPiece(grad=g, param=p, bucket=0, late=False, weight_decay=wd)
              for g, p, wd in zip(grads, params, (0.1, 0.0, 0.1))]
    return pieces, params, grads


def test_host_adamw_matches_adamw():
    pieces, params, grads = _pieces(torch.float32)
    masters = [p.clone() for p in params]
    host = HostAdamW(pieces, masters, betas=(0.9, 0.95), eps=1e-8)
    reference = [p.clone().requires_grad_() for p in params]
    torch_adam = AdamW([([reference[0], reference[2]], 0.1), ([reference[1]], 0.0)], betas=(0.9, 0.95),
                       eps=1e-8, backend="torch-foreach")
    for step in range(1, 6):
        scale = 0.5 if step % 2 else 1.0
        for g in grads:
            g.mul_(1.1)
        for r, g in zip(reference, grads):
            r.grad = g * scale
        torch_adam.step(1e-2)
        host.step(1e-2, grad_scale=scale)
    assert host.step_count == 5
    for master, param, r in zip(masters, params, reference):
        assert torch.allclose(master, r.detach(), rtol=1e-6, atol=1e-7), (master - r).abs().max()
        assert torch.equal(param, master)       # the CPU device: the op wrote the parameter itself
    exp_avg, exp_avg_sq = host.moments(masters[1])
    assert torch.allclose(exp_avg, torch_adam.moments(reference[1])[0], rtol=1e-6, atol=1e-9)
    assert torch.allclose(exp_avg_sq, torch_adam.moments(reference[1])[1], rtol=1e-6, atol=1e-12)


def test_host_adamw_writes_half_parameters_and_counts_copies():
    pieces, params, _ = _pieces(torch.bfloat16)
    masters = [p.float() for p in params]
    host = HostAdamW(pieces, masters)
    host.stream_bucket(0)
    host.step(1e-2)
    assert host.last_copies == {"streamed": 3, "at_step": 0}
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(params, masters))
    host.step(1e-2)        # nothing streamed: every piece copied at the step
    assert host.last_copies == {"streamed": 0, "at_step": 3}
    assert host.host_bytes() == sum(m.numel() for m in masters) * 16


def test_host_adamw_refuses_what_does_not_fit():
    pieces, params, _ = _pieces(torch.float32)
    with pytest.raises(ValueError, match="one master per piece"):
        HostAdamW(pieces, [p.clone() for p in params][:2])
    with pytest.raises(ValueError, match="must be a flat fp32 CPU tensor"):
        HostAdamW(pieces, [p.double() for p in params])
    with pytest.raises(ValueError, match="piece 1 has 100 gradient"):
        HostAdamW(pieces, [params[0].clone(), torch.zeros(5), params[2].clone()])


def test_offload_with_zero_3_is_a_config_error():
    from m6_engine.optim import OptimizerConfig

    with pytest.raises(ConfigError, match="works with zero_stage 0, 1 or 2, not 3"):
        OptimizerConfig(offload="cpu", zero_stage=3)


# ---- training -------------------------------------------------------------------------------------

def _job(corpus, *, tp=1, pp=1, sp=False, offload=True, zero_stage=0, save="", load="", precision="fp32"):
    job = small_job(corpus, tp=tp, pp=pp, steps=STEPS,
                    optimizer={"zero_stage": zero_stage, "offload": "cpu" if offload else "none",
                               "precision": precision},
                    train={"save_dir": save, "save_interval": SAVE_AT if save else 0, "load": load})
    return job_config_from_dict(job.to_dict(), {"parallel.sequence_parallel": str(sp).lower()})


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    plain, offloaded = tmp_path_factory.mktemp("ckpt_111"), tmp_path_factory.mktemp("ckpt_111_offload")
    runs = {"(1,1,1)": Run(_job(corpus, offload=False, save=str(plain))),
            "(1,1,1) offload": Run(_job(corpus, save=str(offloaded)))}
    return launch(1, runs, timeout_s=400.0) | {"save": plain, "save offload": offloaded}


@pytest.fixture(scope="module")
def two_ranks(corpus, one_process):
    step = f"step_{SAVE_AT:06d}"
    runs = {
        "dp2 offload": Run(_job(corpus)),
        "dp2 ZeRO-1 offload": Run(_job(corpus, zero_stage=1)),
        "dp2 ZeRO-2 offload": Run(_job(corpus, zero_stage=2)),
        "pp2 offload": Run(_job(corpus, pp=2)),
        "(1,1,1) -> dp2 ZeRO-2 offload": Run(_job(corpus, zero_stage=2, load=str(one_process["save"] / step))),
    }
    return launch(2, runs, timeout_s=600.0)


@pytest.fixture(scope="module")
def resumed_in_one_process(corpus, one_process):
    load = str(one_process["save offload"] / f"step_{SAVE_AT:06d}")
    return launch(1, {"(1,1,1) offload -> (1,1,1)": Run(_job(corpus, offload=False, load=load))},
                  timeout_s=400.0)


@pytest.fixture(scope="module")
def four_ranks(corpus):
    return launch(4, {"tp2 SP dp2 ZeRO-2 offload": Run(_job(corpus, tp=2, sp=True, zero_stage=2))},
                  timeout_s=600.0)


def _compare(name, ours, reference, record_property):
    rel = max_rel(ours["losses"], reference["losses"])
    record_property("max_rel_loss_diff", rel)
    print(f"{name}: max relative loss difference to (1,1,1) without offload over "
          f"{len(reference['losses'])} steps: {rel:.2e}; last step's host copies {ours['host_copies']}")
    assert rel <= 1e-5, (ours["losses"], reference["losses"])


def test_offload_in_one_process_matches(one_process, record_property):
    reference, ours = one_process["(1,1,1)"], one_process["(1,1,1) offload"]
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    assert reference["losses"][STEPS] < reference["losses"][1]
    assert reference["host_copies"] is None and ours["host_copies"]["streamed"] > 0
    _compare("(1,1,1) offload", ours, reference, record_property)


@pytest.mark.parametrize("name", ["dp2 offload", "dp2 ZeRO-1 offload", "dp2 ZeRO-2 offload", "pp2 offload"])
def test_offload_layouts_match_one_process(name, two_ranks, one_process, record_property):
    ours = two_ranks[name]
    _compare(name, ours, one_process["(1,1,1)"], record_property)
    copies = ours["host_copies"]
    # Only the tied word embedding (pp 2) waits for the step; everything else streamed in backward.
    assert copies["streamed"] > 0 and copies["at_step"] == (1 if name.startswith("pp2") else 0), copies


def test_offload_with_tp2_sp_dp2_zero2_matches_one_process(four_ranks, one_process, record_property):
    ours = four_ranks["tp2 SP dp2 ZeRO-2 offload"]
    _compare("tp2 SP dp2 ZeRO-2 offload", ours, one_process["(1,1,1)"], record_property)
    # The sequence-parallel parameters' pieces are summed over tp after the dp reduction.
    assert ours["host_copies"]["at_step"] > 0 and ours["host_copies"]["streamed"] > 0


@pytest.mark.parametrize("name", ["(1,1,1) -> dp2 ZeRO-2 offload", "(1,1,1) offload -> (1,1,1)"])
def test_checkpoints_resume_across_offload(name, two_ranks, one_process, resumed_in_one_process,
                                           record_property):
    resumed = (two_ranks if name.startswith("(1,1,1) ->") else resumed_in_one_process)[name]["losses"]
    source = one_process["(1,1,1)" if name.startswith("(1,1,1) ->") else "(1,1,1) offload"]["losses"]
    check_resumed(name, resumed, source, SAVE_AT, record_property)


def test_offload_with_bf16_weights_matches_the_device_step(corpus):
    runs = {"bf16": Run(_job(corpus, offload=False, precision="bf16")),
            "bf16 offload": Run(_job(corpus, precision="bf16"))}
    results = launch(1, runs, timeout_s=600.0)
    rel = max_rel(results["bf16 offload"]["losses"], results["bf16"]["losses"])
    print(f"bf16 weights, offload vs on-device AdamW: max relative loss difference {rel:.2e}")
    assert results["bf16 offload"]["param_dtype"] == "torch.bfloat16"
    assert rel <= 1e-3
