"""What a training step reports: throughput, model FLOPs and MFU, memory; console and TensorBoard.

MFU = model FLOPs of the step / (step seconds x devices x peak FLOP/s of one device). Model FLOPs
come from :mod:`m6_engine.model.flops` (prefix mask accounted for: only allowed query-key pairs,
only valid tokens, the head on loss tokens only), times 3 for forward + backward; recomputation
is not counted, so it shows up as lower MFU, as in the PaLM / Megatron convention.
"""

import math
import resource
import time
from dataclasses import dataclass

import torch

from m6_engine.data.tasks import IMAGE_TEXT_MATCHING, TASKS

# Dense fp16/bf16 tensor-core peaks (TFLOP/s) by device-name fragment, checked in order.
GPU_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("V100", 125.0),
                   ("L40S", 362.0), ("A10", 125.0))


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                           repeats: int = 5) -> float:
    """Best-of-``repeats`` TFLOP/s of an n x n x n matmul: the CPU's practical peak for MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype, configured: float = 0.0) -> float:
    """Peak TFLOP/s of one device: ``configured`` when > 0, the table for a known GPU, else measured."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in GPU_PEAK_TFLOPS:
            if fragment in name:
                return tflops
    return measured_matmul_tflops(device, dtype)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank so far: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB -> GiB


N_TASKS = len(TASKS)
ITM_PARTS = slice(2 + 2 * N_TASKS, 5 + 2 * N_TASKS)
PARTS_SIZE = 5 + 2 * N_TASKS
"""Length of a parts vector: [loss sum, loss tokens, per-task loss sums, per-task tokens,
matching loss sum, matching correct, matching samples]."""


def empty_parts(device) -> torch.Tensor:
    """A zero parts vector (PARTS_SIZE,) fp64: what :func:`loss_parts` returns for no output."""
    return torch.zeros(PARTS_SIZE, dtype=torch.float64, device=device)


def loss_parts(outputs, device) -> torch.Tensor:
    """The micro-batches' M6Loss summed into one parts vector (:data:`PARTS_SIZE`,) fp64: decoding
    loss sum and tokens, the same per task, image-text matching loss sum, correct predictions and
    samples; zeros on stages without a loss. Sums, so they add over steps and data-parallel ranks."""
    parts = empty_parts(device)
    for out in outputs:
        parts[0] += out.loss_sum.double()
        parts[1] += out.num_tokens.double()
        if out.task_loss_sum is not None:
            parts[2:2 + N_TASKS] += out.task_loss_sum.double()
            parts[2 + N_TASKS:2 + 2 * N_TASKS] += out.task_num_tokens.double()
        if out.itm_count is not None:
            parts[ITM_PARTS] += torch.stack([out.itm_loss_sum, out.itm_correct, out.itm_count]).double()
    return parts


def losses_of(parts: torch.Tensor) -> dict:
    """Scalars of a parts vector: ``loss`` (the token-weighted mean decoding loss plus the mean
    matching loss, the objective the model backpropagates), ``loss/<task>`` per task seen, and
    with image-text matching samples ``accuracy/image_text_matching``."""
    values = parts.tolist()
    result = {"loss": values[0] / max(values[1], 1.0)}
    for i, task in enumerate(TASKS):
        if values[2 + N_TASKS + i] > 0:
            result[f"loss/{task}"] = values[2 + i] / values[2 + N_TASKS + i]
    itm_sum, itm_correct, itm_count = values[ITM_PARTS]
    if itm_count > 0:
        result["loss"] += itm_sum / itm_count
        result[f"loss/{IMAGE_TEXT_MATCHING}"] = itm_sum / itm_count
        result[f"accuracy/{IMAGE_TEXT_MATCHING}"] = itm_correct / itm_count
    return result


@dataclass
class IntervalTotals:
    """Sums over the steps since the last log line (this job, all data-parallel replicas)."""

    steps: int = 0
    seconds: float = 0.0
    tokens: float = 0.0
    model_flops: float = 0.0
    data_wait: float = 0.0
    """Seconds the steps waited for micro-batches (this rank)."""
    parts: torch.Tensor | None = None
    """loss_parts summed over the interval's steps."""


def interval_scalars(totals: IntervalTotals, *, world_size: int, peak: float) -> dict:
    """The logged scalars of an interval: mean loss (token-weighted), per-task losses, throughput."""
    seconds = max(totals.seconds, 1e-9)
    tflops = totals.model_flops / seconds / world_size / 1e12
    scalars = losses_of(totals.parts)
    scalars.update({
        "tokens_per_s": totals.tokens / seconds,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak > 0 else 0.0,
        "step_time_s": seconds / max(totals.steps, 1),
        "data_wait_ms": 1e3 * totals.data_wait / max(totals.steps, 1),
    })
    return scalars


def format_line(step: int, train_steps: int, scalars: dict) -> str:
    """One console line of a log interval."""
    tasks = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in scalars.items() if k.startswith("loss/"))
    accuracy = scalars.get(f"accuracy/{IMAGE_TEXT_MATCHING}")
    if accuracy is not None:
        tasks += f" itm_accuracy={accuracy:.3f}"
    return (f"step {step:>6}/{train_steps} | loss {scalars['loss']:.4f} [{tasks}] | "
            f"lr {scalars['lr']:.3e} | scale {scalars['loss_scale']:.1f} | "
            f"grad-norm {scalars['grad_norm']:.3f} | skipped {scalars['skipped_steps']} | "
            f"{scalars['tokens_per_s']:.0f} tok/s | {scalars['tflops_per_device']:.3f} TFLOP/s/dev | "
            f"MFU {100 * scalars['mfu']:.1f}% | {scalars['step_time_s'] * 1000:.0f} ms/step "
            f"(data wait {scalars.get('data_wait_ms', 0.0):.1f} ms) | "
            f"peak mem {scalars['peak_memory_gib']:.2f} GiB" + _samples_part(scalars))


def _samples_part(scalars: dict) -> str:
    """`` | samples a=N b=M``: the samples each training corpus has given (``samples/<name>``)."""
    counts = " ".join(f"{k.split('/', 1)[1]}={int(v)}" for k, v in scalars.items() if k.startswith("samples/"))
    return f" | samples {counts}" if counts else ""


class ScalarLog:
    """Console lines and TensorBoard scalars, on the one rank that logs (others hold a no-op)."""

    def __init__(self, enabled: bool, tensorboard_dir: str = ""):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
