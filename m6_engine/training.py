"""The training loop: one M6 pipeline stage per rank, 1F1B over micro-batches, O2 optimizer step.

One step (``Trainer.train_step``), read top to bottom:

1. zero the fp32 gradient buffers;
2. ``forward_backward`` runs ``num_microbatches = global_batch / (micro_batch * dp)`` micro-batches
   through this stage with the pipeline schedule (with ``parallel.virtual_stages`` V > 1 the
   rank holds V model chunks, ``StageChunks``, and runs interleaved 1F1B); the last stage backpropagates the loss scaled by
   the optimizer's loss scale; data-parallel and tied-embedding gradients are reduced at the end;
3. the optimizer unscales, checks for inf/NaN on every model-parallel rank (skipping the step on
   all ranks when found), clips the global norm, steps AdamW on the fp32 masters and copies back.

Every ``log_interval`` steps the logging rank (last stage, dp 0, tp 0) prints one line and writes
the same scalars to TensorBoard: loss (token-weighted over the job) and loss per task, lr, loss
scale, grad norm, skipped steps, tokens/s, TFLOP/s per device, MFU, peak memory. Every
``eval_interval`` steps the held-out set is run forward-only. Checkpoints every
``save_interval`` steps and at the end; ``load="auto"`` resumes from the latest complete one,
with the data position, RNG streams, optimizer and loss scaler, so a resumed run continues bit
for bit (same layout, CPU fp32). With ``async_save`` the step that saves only copies the state
into host memory and a background thread writes it (``m6_engine.checkpoint.async_save``); the next
save, the end of the run and an exception out of the loop wait for that write, and its failure
raises there. Training is the same either way: the snapshot is taken before the next step.

A run that resumes (``load`` finds a checkpoint) builds its stage without drawing the initial
weights (``M6Model(draw_weights=False)``): the checkpoint overwrites every one of them.

Finetuning (docs/finetuning.md) is the same loop: ``init_from`` names a (pretraining) checkpoint
whose model weights alone, resharded to this layout, replace the initial weights; optimizer, LR
schedule, step and data position start fresh, and a matching head the checkpoint lacks keeps its
fresh initialisation. Resume wins: when ``load`` finds a checkpoint (a finetuning run restarted
with ``load="auto"`` finds its own), ``init_from`` is not read, so a restart never goes back to
the pretrained weights.
"""

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from m6_engine.checkpoint import (
    AsyncCheckpointer, CheckpointError, CommittedSave, latest_checkpoint, load_checkpoint,
    load_model_weights, save_checkpoint,
)
from m6_engine.config import ConfigError, JobConfig
from m6_engine.data.batch import MicroBatch
from m6_engine.data.model_inputs import VOCAB_FILE
from m6_engine.data.prefetch import PrefetchingLoader
from m6_engine.host_allocator import keep_freed_blocks_mapped
from m6_engine.metrics import (
    IntervalTotals, ScalarLog, empty_parts, format_line, interval_scalars, loss_parts, losses_of,
    peak_memory_gib, peak_tflops,
)
from m6_engine.model import M6Model
from m6_engine.model.flops import batch_forward_flops
from m6_engine.model.heads import MATCHING_HEAD_PREFIX
from m6_engine.model.m6 import ForwardStep, StageChunks
from m6_engine.optim import MixedPrecisionOptimizer
from m6_engine.parallel import (
    DataParallel, ParallelState, data_parallel_options, forward_backward, model_grad_sync,
    seed_parallel_rng,
)


class CountingIterator:
    """Wraps a micro-batch iterator and records, per micro-batch, what throughput and MFU need:
    valid tokens and model FLOPs (forward; the trainer multiplies by 3 for training)."""

    def __init__(self, source, config):
        self.source, self.config = source, config
        self.tokens = 0
        self.forward_flops = 0
        self.wait_seconds = 0.0
        """Time spent waiting for the source: the step's data wait."""

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        start = time.perf_counter()
        batch = next(self.source)   # still on the CPU: counting here reads no device memory
        self.wait_seconds += time.perf_counter() - start
        self.tokens += int(batch.valid_len.sum())
        self.forward_flops += batch_forward_flops(self.config, batch)
        return batch


@dataclass
class StepReport:
    """What one training step measured on this rank (loss parts on the last stage)."""

    seconds: float
    tokens: int
    model_flops: float
    loss_parts: torch.Tensor
    """``metrics.loss_parts`` of the step's micro-batches (zeros off the last stage)."""
    stats: object = None
    """The optimizer's StepStats (training only)."""
    data_wait: float = 0.0
    """Seconds the step waited for its micro-batches (the loader's thread was not ahead)."""


class Trainer:
    """Builds this rank's stage, optimizer and data, and runs the loop (module docstring).

    ``train_data`` / ``eval_data_factory``: the micro-batch iterator of this rank's data-parallel
    replica (``PretrainDataset.for_rank``), and a callable returning a fresh held-out iterator.
    """

    def __init__(self, job: JobConfig, state: ParallelState, train_data, *, eval_data_factory=None,
                 log_rank_output: bool = True):
        self.job, self.state = job, state
        # Before the first step allocates: large freed host blocks (the logits of each
        # micro-batch) are then reused instead of faulted in afresh (m6_engine.host_allocator).
        keep_freed_blocks_mapped()
        train, opt = job.train, job.optimizer
        virtual = job.parallel.virtual_stages
        job.model.check_layout(state.tp_size, state.pp_size, virtual)
        self.num_microbatches = train.num_microbatches(state.dp_size)
        check_virtual_stages(job, self.num_microbatches)
        check_sequence_parallel(job)
        self.tracker = seed_parallel_rng(train.seed, state)
        # Resuming overwrites every weight from the checkpoint: build the stage without drawing them.
        self.resume_source = _resume_source(train)
        chunks = [M6Model(job.model, state, seed=train.seed, dtype=opt.param_dtype,
                          recompute=train.recompute, rng_tracker=self.tracker, chunk=c,
                          virtual_stages=virtual, sequence_parallel=job.parallel.sequence_parallel,
                          draw_weights=self.resume_source is None)
                  for c in range(virtual)]
        # Interleaved 1F1B: the rank's chunks as one stage (one gradient buffer, optimizer and
        # checkpoint names of a plain stage); the schedule runs the chunks.
        stage = chunks[0] if virtual == 1 else StageChunks(chunks)
        self.stage = stage
        self.model = DataParallel(stage, state, **data_parallel_options(opt.zero_stage, stage))
        self.optimizer = self._new_optimizer()
        self.seq_length = job.model.num_patches + job.model.max_text_positions
        self.tensor_spec = stage.activation_spec(train.micro_batch, self.seq_length)
        # A thread builds the next micro-batches while the step computes (pinned for a GPU).
        self.train_data = (PrefetchingLoader(train_data, depth=train.prefetch,
                                             pin_memory=state.device.type == "cuda")
                           if train.prefetch else train_data)
        self.eval_data_factory = eval_data_factory
        # train.async_save: checkpoints written by a background thread, on a gloo group of its
        # own made here, at the same point on every rank.
        self.checkpointer = (AsyncCheckpointer(state.device, timeout_s=job.parallel.timeout_s)
                             if train.save_dir and train.async_save else None)
        self.step = 0
        self.logs_here = (state.is_last_stage and state.dp_rank == 0 and state.tp_rank == 0
                          and log_rank_output)
        self.log = ScalarLog(self.logs_here, train.tensorboard_dir)
        self.peak = peak_tflops(state.device, opt.param_dtype, train.peak_tflops)
        self.history: list[dict] = []
        self.step_callbacks: list = []
        """Called as ``callback(trainer)`` after every step (after its log line, evaluation and save)."""

    def _new_optimizer(self) -> MixedPrecisionOptimizer:
        """A fresh optimizer (step 0 of the LR schedule); its fp32 masters of half-precision
        weights are copies of the weights as they are now."""
        return MixedPrecisionOptimizer(self.model, self.job.optimizer, self.state,
                                       total_steps=self.job.train.train_steps)

    # ---- one step -------------------------------------------------------------------------------

    def _run_schedule(self, data, *, forward_only: bool) -> tuple[ForwardStep, CountingIterator]:
        forward_step = ForwardStep(loss_transform=None if forward_only else self.optimizer.scale_loss)
        counted = CountingIterator(data, self.job.model)
        # A list of chunks runs the interleaved schedule; their gradients land in self.model's buffer.
        model = list(self.stage.chunks) if isinstance(self.stage, StageChunks) else self.model
        forward_backward(self.job.parallel.schedule, forward_step=forward_step, data_iterator=counted,
                         model=model, num_microbatches=self.num_microbatches, state=self.state,
                         tensor_spec=self.tensor_spec, forward_only=forward_only,
                         **model_grad_sync(self.model, self.state))   # the Trainer owns the reduction
        return forward_step, counted

    def train_step(self) -> StepReport:
        """One optimizer step over ``num_microbatches`` micro-batches (module docstring)."""
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad()
        forward_step, counted = self._run_schedule(self.train_data, forward_only=False)
        stats = self.optimizer.step()
        self.step += 1
        if self.state.device.type == "cuda":
            torch.cuda.synchronize(self.state.device)
        return StepReport(time.perf_counter() - start, counted.tokens, 3.0 * counted.forward_flops,
                          loss_parts(forward_step.outputs, self.state.device), stats, counted.wait_seconds)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Forward-only over ``eval_iters`` global batches of a fresh held-out iterator: mean loss
        and loss per task (token-weighted over the job), image-text matching accuracy when it is
        evaluated (``metrics.losses_of``); meaningful on the logging rank."""
        data = self.eval_data_factory()
        self.model.eval()
        parts = empty_parts(self.state.device)
        for _ in range(self.job.train.eval_iters):
            forward_step, _ = self._run_schedule(data, forward_only=True)
            parts += loss_parts(forward_step.outputs, self.state.device)
        self.model.train()
        return losses_of(self._reduce_over_dp(parts))

    def _reduce_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.state.dp_size > 1:
            dist.all_reduce(tensor, group=self.state.group("dp"))
        return tensor

    # ---- checkpoints ----------------------------------------------------------------------------

    @functools.cached_property
    def _recorded_inputs(self) -> tuple[dict, dict]:
        """(manifest "inputs", attachments) of every checkpoint of this run: read once, on rank 0,
        which alone writes them (m6_engine.data.model_inputs)."""
        from m6_engine.data.tokenizer import default_vocab_path

        vocab = Path(self.job.data.vocab_file or default_vocab_path()).read_bytes()
        return job_model_inputs(self.job).to_dict(), {VOCAB_FILE: vocab}

    def save(self) -> None:
        """Checkpoint this step into save_dir: the whole write now, or with train.async_save a
        snapshot handed to the background writer (after the previous background save is
        published; its failure raises here)."""
        train = self.job.train
        inputs, attachments = self._recorded_inputs if self.state.rank == 0 else (None, None)
        arguments = dict(model=self.model, state=self.state, optimizer=self.optimizer,
                         rng_tracker=self.tracker, config=self.job.to_dict(),
                         extra={"step": self.step, "data": self.train_data.state_dict()},
                         keep_last=train.keep_last or None, inputs=inputs, attachments=attachments)
        if self.checkpointer is None:
            start = time.perf_counter()
            path = save_checkpoint(train.save_dir, self.step, **arguments)
            self.log.print(f"saved {path} in {time.perf_counter() - start:.2f} s")
            return
        self._log_published(self.checkpointer.wait())
        start = time.perf_counter()
        path = self.checkpointer.save(train.save_dir, self.step, **arguments)
        self.log.print(f"checkpoint {path}: staged in {time.perf_counter() - start:.2f} s, "
                       f"writing in the background")

    def _log_published(self, committed: CommittedSave | None) -> None:
        if committed is not None:
            self.log.print(f"checkpoint {committed.path} published: written in "
                           f"{committed.write_seconds:.2f} s while training went on")

    def _finish_background_save(self, failure: BaseException | None = None) -> None:
        """Wait for the background save in flight: neither the end of the run nor an exception
        leaves it half-written. Its own failure raises CheckpointError, or is noted on
        ``failure`` when the run is already ending with that."""
        if self.checkpointer is None:
            return
        if failure is None:
            self._log_published(self.checkpointer.close())
            return
        try:
            self._log_published(self.checkpointer.close())
        except CheckpointError as error:
            failure.add_note(f"the background checkpoint failed as well: {error}")

    def resume(self) -> bool:
        """Load ``train.load`` ("auto": the latest complete checkpoint of save_dir, if any)."""
        train = self.job.train
        source = self.resume_source
        if source is None:
            if train.load == "auto":
                self.log.print(f"load=auto: no complete checkpoint in {train.save_dir!r}, starting fresh")
            return False
        try:
            loaded = load_checkpoint(source, model=self.model, state=self.state, optimizer=self.optimizer,
                                     rng_tracker=self.tracker, seed=train.seed)
        except CheckpointError as error:
            raise type(error)(f"train.load = {train.load!r}: {error}") from error
        self.step = int(loaded.extra["step"])
        self.train_data.load_state_dict(loaded.extra["data"])
        self.log.print(f"resumed from {loaded.path} at step {self.step}")
        return True

    def initialize_from(self) -> bool:
        """Load ``train.init_from``'s model weights only (module docstring); False when unset."""
        source = self.job.train.init_from
        if not source:
            return False
        try:
            loaded = load_model_weights(source, model=self.model, state=self.state,
                                        fresh_prefixes=(MATCHING_HEAD_PREFIX,))
        except CheckpointError as error:
            raise CheckpointError(f"train.init_from = {source!r}: {error}") from error
        self.optimizer = self._new_optimizer()   # masters of half weights: copies of the loaded ones
        self.log.print(f"initialised the model from {loaded.path} (weights of step {loaded.step}); "
                       f"optimizer, LR schedule and data start fresh")
        if loaded.fresh:
            self.log.print(f"not in that checkpoint, freshly initialised: {', '.join(loaded.fresh)}")
        return True

    # ---- the loop -------------------------------------------------------------------------------

    def _profiler(self):
        """A torch.profiler tracing the steps of ``profile_steps`` still to run, else a null context.
        The loop calls ``prof.step()`` after each step, and runs steps ``self.step + 1, ...``."""
        steps = self.job.train.profile_range()
        first = max(steps.start, self.step + 1)          # first traced step
        if first >= steps.stop:
            return contextlib.nullcontext(None)
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if self.state.device.type == "cuda" else [])
        trace_dir = self.job.train.tensorboard_dir or "runs/profile"
        before = first - (self.step + 1)                  # steps run before the first traced one
        warmup = min(before, 1)
        return profile(activities=activities, schedule=schedule(wait=before - warmup, warmup=warmup,
                                                                 active=steps.stop - first, repeat=1),
                       on_trace_ready=tensorboard_trace_handler(trace_dir,
                                                                worker_name=f"rank{self.state.rank}"))

    def _log_interval(self, totals: IntervalTotals, report: StepReport) -> None:
        totals.parts = self._reduce_over_dp(totals.parts)
        scalars = interval_scalars(totals, world_size=self.state.world_size, peak=self.peak)
        stats = report.stats   # the interval's last step; skipped_steps counts the whole run
        scalars.update(lr=stats.lr, loss_scale=stats.loss_scale, grad_norm=stats.grad_norm,
                       skipped_steps=self.optimizer.skipped_steps,
                       peak_memory_gib=peak_memory_gib(self.state.device))
        scalars.update(self._samples_per_corpus())
        self.log.print(format_line(self.step, self.job.train.train_steps, scalars))
        self.log.scalars("train", scalars, self.step)
        self.history.append({"step": self.step, **scalars})

    def _samples_per_corpus(self) -> dict:
        """``samples/<corpus>``: what each training corpus has given so far, all replicas together
        (the data state of the micro-batches consumed); empty for data without per-corpus state."""
        state = self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None
        if not isinstance(state, dict) or "corpora" not in state:
            return {}
        from m6_engine.data.dataset import samples_per_corpus

        return {f"samples/{name}": count for name, count in samples_per_corpus(state).items()}

    def _new_totals(self) -> IntervalTotals:
        return IntervalTotals(parts=empty_parts(self.state.device))

    def run(self) -> list[dict]:
        """Train to ``train_steps`` (resuming first if asked, else starting from ``init_from`` when
        given); returns ``history``, the scalars of every log line (on every rank: the loss values
        are only meaningful on the logging rank)."""
        train = self.job.train
        if not self.resume():
            self.initialize_from()
        try:
            self._train_to_the_end()
            if train.save_dir and (not train.save_interval or self.step % train.save_interval):
                self.save()
        except BaseException as failure:
            self._finish_background_save(failure)
            raise
        self._finish_background_save()
        self.log.close()
        return self.history

    def _train_to_the_end(self) -> None:
        train = self.job.train
        totals = self._new_totals()
        with self._profiler() as prof:
            while self.step < train.train_steps:
                try:
                    report = self.train_step()
                except StopIteration:
                    self.log.print(f"data exhausted at step {self.step} (exhausted='stop'): stopping")
                    break
                if prof is not None:
                    prof.step()
                totals.steps += 1
                totals.seconds += report.seconds
                totals.tokens += report.tokens
                totals.model_flops += report.model_flops
                totals.data_wait += report.data_wait
                totals.parts += report.loss_parts
                if self.step % train.log_interval == 0 or self.step == train.train_steps:
                    self._log_interval(self._finish_totals(totals), report)
                    totals = self._new_totals()
                if train.eval_interval and self.eval_data_factory and self.step % train.eval_interval == 0:
                    result = self.evaluate()
                    self.log.print(f"eval at step {self.step}: " + " ".join(
                        f"{k}={v:.4f}" for k, v in result.items()))
                    self.log.scalars("eval", result, self.step)
                if train.save_dir and train.save_interval and self.step % train.save_interval == 0:
                    self.save()
                for callback in self.step_callbacks:
                    callback(self)

    def _finish_totals(self, totals: IntervalTotals) -> IntervalTotals:
        """Sum tokens and FLOPs over data-parallel replicas (each replica counted its own batches)."""
        counts = torch.tensor([totals.tokens, totals.model_flops], dtype=torch.float64,
                              device=self.state.device)
        counts = self._reduce_over_dp(counts)
        totals.tokens, totals.model_flops = float(counts[0]), float(counts[1])
        return totals


def make_datasets(job: JobConfig, state: ParallelState):
    """This rank's training iterator and a factory of fresh held-out iterators (None without
    ``data.eval_corpus``); a missing corpus or one tokenised with another vocab is a clear error."""
    from m6_engine.data.dataset import DatasetConfig, PretrainDataset
    from m6_engine.data.tasks import SampleLayout
    data = job.data
    check_training_corpora(job)
    tokenizer = job_tokenizer(job)
    check_text_positions(job)
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ConfigError(f"the tokenizer's vocabulary ({tokenizer.vocab_size} entries) is larger than "
                          f"model.vocab_size = {job.model.vocab_size}")
    layout = SampleLayout.from_model(job.model, tokenizer)

    def dataset(corpus: str, exhausted: str, corpora=()) -> PretrainDataset:
        config = DatasetConfig(corpus=corpus, corpora=corpora, task_weights=data.task_weights, seed=job.train.seed,
                               micro_batch_size=job.train.micro_batch,
                               num_microbatches=job.train.num_microbatches(state.dp_size),
                               exhausted=exhausted)
        return PretrainDataset.for_rank(config, layout, tokenizer, state)

    train = dataset(data.corpus, data.exhausted, data.corpora)
    eval_factory = (lambda: dataset(data.eval_corpus, "wrap")) if data.eval_corpus else None
    return train, eval_factory


def check_training_corpora(job: JobConfig) -> None:
    """ConfigError when the job names no training corpus."""
    if not job.data.training_corpora():
        raise ConfigError("data.corpus is empty: give the prefix written by `python -m m6_engine.data.preprocess` "
                          "(--data on the command line), or a blend in data.corpora (--data-path 'W1 P1 W2 P2')")


def _resume_source(train) -> str | None:
    """What :meth:`Trainer.resume` loads: ``train.load``, save_dir for "auto" when it holds a complete
    checkpoint, else None (a fresh start)."""
    if not train.load:
        return None
    if train.load == "auto":
        return train.save_dir if train.save_dir and latest_checkpoint(train.save_dir) is not None else None
    return train.load


def check_job(job: JobConfig, world_size: int) -> None:
    """Early, clear errors for a layout that cannot run (before any process group is built)."""
    tp, pp = job.parallel.tp, job.parallel.pp
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tp * pp = {tp} * {pp}")
    job.model.check_layout(tp, pp, job.parallel.virtual_stages)
    check_virtual_stages(job, job.train.num_microbatches(world_size // (tp * pp)))
    check_sequence_parallel(job)


def check_sequence_parallel(job: JobConfig) -> None:
    """Sequence parallelism splits every sample's num_patches + max_text_positions positions over
    tp: ConfigError when they do not split evenly."""
    tp, model = job.parallel.tp, job.model
    seq_length = model.num_patches + model.max_text_positions
    if job.parallel.sequence_parallel and tp > 1 and seq_length % tp:
        raise ConfigError(f"ParallelConfig.sequence_parallel splits the sequence over tp = {tp} ranks: "
                          f"model.num_patches + model.max_text_positions = {model.num_patches} + "
                          f"{model.max_text_positions} = {seq_length} is not divisible by {tp}")


def check_virtual_stages(job: JobConfig, num_microbatches: int) -> None:
    """Interleaved 1F1B (virtual_stages > 1) runs micro-batches in groups of pp: ConfigError when
    the step's micro-batches per replica are not a multiple of pp."""
    pp, virtual = job.parallel.pp, job.parallel.virtual_stages
    if virtual > 1 and num_microbatches % pp:
        raise ConfigError(f"ParallelConfig.virtual_stages = {virtual} (interleaved 1F1B) needs the "
                          f"micro-batches per step, global_batch / (micro_batch * dp) = "
                          f"{num_microbatches}, to be a multiple of pp = {pp}")


MIN_TEXT_POSITIONS = 5
"""Fewest text positions a training sample can be packed in: half for the masked text, and
[CLS], one target token and [SEP] for the complete text (``m6_engine.data.tasks.pack``)."""


def check_text_positions(job: JobConfig) -> None:
    """ConfigError naming model.max_text_positions when no training sample fits in it (else the
    first batch fails deep in the data pipeline)."""
    if job.model.max_text_positions < MIN_TEXT_POSITIONS:
        raise ConfigError(f"model.max_text_positions = {job.model.max_text_positions} is too small to "
                          f"train on: a sample needs at least {MIN_TEXT_POSITIONS} text positions (half "
                          f"for the masked text, [CLS] target [SEP] for the complete text)")


def job_tokenizer(job: JobConfig):
    """The tokenizer of ``data.vocab_file`` (or the default vocab); a missing, empty or malformed
    vocab is a ConfigError naming data.vocab_file and the file."""
    from m6_engine.data.tokenizer import BertWordPieceTokenizer, default_vocab_path

    try:
        return BertWordPieceTokenizer(job.data.vocab_file or default_vocab_path())
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.vocab_file = {job.data.vocab_file!r}: {error}") from None


def job_model_inputs(job: JobConfig):
    """The ModelInputs of the job's training corpus: what a checkpoint records of the inputs its
    model reads (m6_engine.data.model_inputs)."""
    from m6_engine.data.doc_tokens import tokenizer_fingerprint
    from m6_engine.data.model_inputs import ModelInputs, common_extractor, corpus_extractor

    corpora = list(job.data.training_corpora().values())
    extractor = corpus_extractor(corpora[0]) if len(corpora) == 1 else common_extractor(corpora)
    return ModelInputs(tokenizer_fingerprint(job_tokenizer(job)).hex(), extractor)


def check_init_from_inputs(job: JobConfig) -> None:
    """A finetuning job (``train.init_from``) must read its corpus the way the checkpoint's model
    was trained to: the same vocabulary and image features. ConfigError naming both otherwise;
    an init_from that cannot be read is left to Trainer.initialize_from."""
    from m6_engine.checkpoint import CheckpointError, read_manifest, resolve_checkpoint
    from m6_engine.data.model_inputs import ModelInputs, check_extractor, check_vocab

    try:
        folder = resolve_checkpoint(job.train.init_from)
        recorded = ModelInputs.from_manifest(read_manifest(folder))
    except CheckpointError:
        return
    if recorded is None:   # saved before checkpoints recorded their inputs
        return
    mine = job_model_inputs(job)
    where = f"train.init_from = {job.train.init_from!r}"
    check_vocab(mine.vocab_hash, recorded, chosen_what=f"data.vocab_file = {job.data.vocab_file!r}",
                recorded_what=where)
    chosen = ", ".join(f"data.{key} = {path!r}" for key, path in job.data.training_corpora().items())
    check_extractor(mine.extractor, recorded.extractor, chosen_what=chosen, recorded_what=where)


def check_inputs(job: JobConfig) -> None:
    """Early, clear errors for inputs that cannot be read (before any process group is built):
    the vocab, the headers of the training / held-out corpora's files, an explicit ``train.load``
    path (or, without one, ``train.init_from``) that does not exist, and an ``init_from`` whose
    model was trained on another vocabulary or other image features than this job's corpus."""
    from m6_engine.checkpoint.folders import CheckpointNotFoundError
    from m6_engine.data import indexed
    from m6_engine.data.preprocess import image_prefix, text_prefix
    from m6_engine.data.doc_tokens import tokenizer_fingerprint

    tokenizer = job_tokenizer(job)
    check_text_positions(job)
    check_training_corpora(job)
    corpora = {**job.data.training_corpora(), "eval_corpus": job.data.eval_corpus}
    for key, corpus in corpora.items():
        if not corpus:
            continue
        try:
            indexed.open_tokens(text_prefix(corpus), tokenizer.vocab_size, tokenizer_fingerprint(tokenizer))
            indexed.open_patches(image_prefix(corpus), job.model.num_patches,
                                 job.model.patch_feature_dim)
        except indexed.IndexFormatError as error:
            raise indexed.IndexFormatError(f"data.{key} = {corpus!r}: {error}") from None
    # init_from is not read when there is a checkpoint to resume (resume wins), so with train.load
    # set a missing init_from is left to Trainer.initialize_from.
    for key in ("load",) + (() if job.train.load else ("init_from",)):
        path = getattr(job.train, key)
        if path and path != "auto" and not os.path.exists(path):
            raise CheckpointNotFoundError(f"train.{key} = {path!r} does not exist: give a checkpoint "
                                          f"folder, a directory of checkpoints{' or auto' if key == 'load' else ''}")
    if job.train.init_from and not job.train.load:
        check_init_from_inputs(job)
