"""Pretrain M6: ``torchrun --nproc_per_node=N examples/pretrain_m6.py --config CONFIG.yaml [flags]``.

The YAML file has the sections of ``m6_engine.config.JobConfig`` (model, parallel, optimizer,
train, data); the flags below override the common fields, ``--set section.field=value`` any field.
dp = world size / (tp * pp).

Finetuning is the same script with a ``examples/configs/finetune_*.yaml`` config and
``--init-from CKPT`` (model weights only, any layout; docs/finetuning.md). With ``--load auto``
as well, a restart resumes the finetuning run's own checkpoints instead (resume wins).

With ``torchrun --max-restarts=N`` use the c10d rendezvous (``--standalone`` or
``--rdzv-backend=c10d``) and set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: otherwise torchrun lends
its rendezvous TCPStore to the workers and keeps it across restarts, and a restarted job's process
groups read the dead attempt's addresses (pytorch/pytorch#135712).
"""

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

from m6_engine.checkpoint import CheckpointError
from m6_engine.config import ConfigError, job_config_from_dict, load_yaml
from m6_engine.data.dataset import DatasetError
from m6_engine.data.indexed import IndexFormatError
from m6_engine.parallel import initialize
from m6_engine.parallel.state import LayoutError
from m6_engine.training import Trainer, check_inputs, check_job, make_datasets

USER_ERRORS = (ConfigError, CheckpointError, DatasetError, IndexFormatError, LayoutError)
"""What a user's input causes (config, checkpoint, data files, layout): one ``error:`` line, no traceback."""



class UserErrorInJob(Exception):
    """A user error raised once the process groups existed, and whether this rank reports it: the
    first rank of the job to meet it does (:func:`first_to_report`), the others stay silent."""

    def __init__(self, error: Exception, report_here: bool):
        super().__init__(str(error))
        self.error = error
        self.report_here = report_here


def first_to_report(timeout_s: float = 5.0) -> bool:
    """Whether this rank is the first of the job to report an error, decided by an atomic counter
    in the job's TCPStore (MASTER_ADDR:MASTER_PORT, which torchrun sets). Keyed by run and restart,
    so a restarted job reports again. Where the store cannot be reached (the rank hosting it has
    exited, after it reported), RANK 0 is the one, as before the groups exist."""
    key = (f"m6/user_error/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
           f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        return store.add(key, 1) == 1
    except (KeyError, ValueError, RuntimeError, OSError):  # no store address, or no store there
        return os.environ.get("RANK", "0") == "0"

# flag -> "section.field"
FLAGS = {
    "tp": "parallel.tp", "pp": "parallel.pp", "schedule": "parallel.schedule",
    "train_steps": "train.train_steps", "micro_batch": "train.micro_batch",
    "global_batch": "train.global_batch", "recompute": "train.recompute", "seed": "train.seed",
    "log_interval": "train.log_interval", "eval_interval": "train.eval_interval",
    "save": "train.save_dir", "load": "train.load", "init_from": "train.init_from",
    "save_interval": "train.save_interval",
    "keep_last": "train.keep_last", "async_save": "train.async_save",
    "tensorboard_dir": "train.tensorboard_dir",
    "profile_steps": "train.profile_steps", "precision": "optimizer.precision",
    "lr": "optimizer.lr", "optimizer_sharding": "optimizer.optimizer_sharding",
    "zero_stage": "optimizer.zero_stage", "offload": "optimizer.offload",
    "sequence_parallel": "parallel.sequence_parallel", "virtual_stages": "parallel.virtual_stages",
    "data": "data.corpus", "data_path": "data.corpora", "eval_data": "data.eval_corpus",
    "vocab_file": "data.vocab_file",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML job config (examples/configs/)")
    for flag, target in FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, help=f"sets {target}")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field (repeatable)")
    return parser.parse_args(argv)


def overrides_of(args) -> dict:
    overrides = {FLAGS[k]: v for k, v in vars(args).items() if k in FLAGS and v is not None}
    if args.data_path is not None and args.data is None:
        overrides["data.corpus"] = ""   # the blend replaces the config's single corpus
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = value
    return overrides


def warn_if_restarts_cannot_reconnect() -> None:
    """The module docstring's torchrun caveat, said once at start-up rather than at the first restart."""
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("RANK") == "0"):
        print("warning: torchrun shares its rendezvous store with the workers, so a restart after a "
              "failure will not reconnect (pytorch/pytorch#135712); launch with "
              "--rdzv-backend=c10d and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr, flush=True)


def main(argv=None):
    """Train; a user error propagates (``cli`` prints it)."""
    args = parse_args(argv)
    warn_if_restarts_cannot_reconnect()
    job = job_config_from_dict(load_yaml(args.config), overrides_of(args))
    check_job(job, int(os.environ.get("WORLD_SIZE", "1")))
    check_inputs(job)
    torch.set_num_threads(int(os.environ.get("M6_THREADS_PER_RANK", torch.get_num_threads())))
    state = initialize(job.parallel.tp, job.parallel.pp, timeout=job.parallel.timeout_s)
    try:
        train_data, eval_factory = make_datasets(job, state)
        Trainer(job, state, train_data, eval_data_factory=eval_factory).run()
    except USER_ERRORS as error:
        # Decided while the store is up: the groups (and with them rank 0's store) go below.
        raise UserErrorInJob(error, first_to_report()) from error
    finally:
        dist.destroy_process_group()


def cli(argv=None) -> int:
    """``main`` as a command: a user error (:data:`USER_ERRORS`) is one ``error: ...`` line on
    stderr, printed once per job, and exit status 2. Before the process groups exist every rank
    meets the same error and RANK 0 prints it; afterwards the first rank to meet it does. Other
    exceptions keep their traceback."""
    try:
        main(argv)
    except UserErrorInJob as failed:
        if failed.report_here:
            print(f"error: {failed.error}", file=sys.stderr, flush=True)
        return 2
    except USER_ERRORS as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
