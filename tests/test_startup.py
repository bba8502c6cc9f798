"""Start-up: a run that resumes from a checkpoint builds its stage without drawing the initial
weights (the checkpoint overwrites every one of them), and ends up with exactly the saved weights."""

from tests.distributed import run_ranks
from tests.training_job import small_job
from tests.training_job import corpus_fixture  # noqa: F401  (provides the module-scoped "corpus" fixture)


def _ranks_resume_draws_nothing(job_dict, save_dir):
    import torch

    from m6_engine import ops
    from m6_engine.config import job_config_from_dict
    from m6_engine.training import Trainer, make_datasets
    from tests.distributed import init_state

    draws = []
    draw = ops.normal_shard_

    def counting(out, *args, **kwargs):   # every initial weight's draw goes through it (parallel/init.py)
        draws.append(out.numel())
        return draw(out, *args, **kwargs)

    ops.normal_shard_ = counting
    fresh_job = job_config_from_dict(job_dict, {"train.save_dir": save_dir})
    state = init_state(fresh_job.parallel.tp, fresh_job.parallel.pp)
    data, _ = make_datasets(fresh_job, state)
    fresh = Trainer(fresh_job, state, data, log_rank_output=False)
    fresh_draws = len(draws)
    fresh.train_step()
    fresh.step = 1
    fresh.save()
    saved = {n: p.detach().clone() for n, p in fresh.stage.named_parameters()}
    draws.clear()
    resumed_job = job_config_from_dict(job_dict, {"train.save_dir": save_dir, "train.load": "auto"})
    data, _ = make_datasets(resumed_job, state)
    resumed = Trainer(resumed_job, state, data, log_rank_output=False)
    resumed_draws = len(draws)
    assert resumed.resume() and resumed.step == 1
    same = all(torch.equal(p, saved[n]) for n, p in resumed.stage.named_parameters())
    return {"fresh_draws": fresh_draws, "resumed_draws": resumed_draws, "same": same,
            "source": resumed.resume_source}


def test_a_resumed_run_draws_no_initial_weights(corpus, tmp_path):
    job = small_job(corpus, tp=2, pp=1)
    ranks = run_ranks(_ranks_resume_draws_nothing, 2, job.to_dict(), str(tmp_path / "ckpt"))
    for rank in ranks:
        assert rank["fresh_draws"] > 0 and rank["resumed_draws"] == 0, rank
        assert rank["same"] and rank["source"] == str(tmp_path / "ckpt"), rank
