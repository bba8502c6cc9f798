"""AdamW on fp32 master tensors, through the fastest kernel available (one availability gate).

Update of a tensor p with gradient g at step t = 1, 2, ... (decoupled weight decay lambda, which
is 0 for vectors: biases and norm weights):

    p <- p * (1 - lr * lambda)
    m <- beta1 m + (1 - beta1) g          v <- beta2 v + (1 - beta2) g^2
    p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

Kernels: Apex's ``FusedAdam`` (``adam_w_mode=True``) when Apex is importable and the tensors are
on CUDA; otherwise ``torch.optim.AdamW`` with ``fused=True`` on CUDA and ``foreach=True`` on the
CPU. All compute the formula above in fp32; :class:`AdamW` hides their different ways of keeping
the step count (Apex: per group, torch: per tensor) behind ``step`` / ``moments`` / ``load``.
"""

import torch

BACKENDS = ("apex", "torch-fused", "torch-foreach")


def decays(param: torch.Tensor) -> bool:
    """The param-group rule: matrices (ndim >= 2) get weight decay, vectors (ndim == 1) none."""
    return param.dim() >= 2


def apex_fused_adam():
    """Apex's FusedAdam class, or None when Apex (with its CUDA extensions) is not installed."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    return FusedAdam


def choose_backend(requested: str, device: torch.device) -> str:
    """One of BACKENDS for ``requested`` ("auto", "apex", "torch") on ``device``."""
    on_cuda = torch.device(device).type == "cuda"
    if requested == "apex":
        if not on_cuda or apex_fused_adam() is None:
            raise RuntimeError("adam_backend 'apex' needs CUDA tensors and NVIDIA Apex installed with "
                               "its CUDA extensions (apex.optimizers.FusedAdam); use 'auto' or 'torch'")
        return "apex"
    if requested not in ("auto", "torch"):
        raise ValueError(f"unknown adam backend {requested!r}; choose 'auto', 'apex' or 'torch'")
    if requested == "auto" and on_cuda and apex_fused_adam() is not None:
        return "apex"
    return "torch-fused" if on_cuda else "torch-foreach"


class AdamW:
    """AdamW over fp32 tensors whose gradients are in ``.grad``.

    ``groups``: (tensors, weight_decay) pairs; empty groups are dropped. The tensors must be leaf
    fp32 tensors on one device. ``step(lr)`` applies one update to every tensor.
    """

    def __init__(self, groups: list[tuple[list[torch.Tensor], float]], *, betas=(0.9, 0.999),
                 eps: float = 1e-8, backend: str = "auto"):
        groups = [(list(tensors), wd) for tensors, wd in groups if tensors]
        self.tensors = [t for tensors, _ in groups for t in tensors]
        if not self.tensors:
            raise ValueError("AdamW needs at least one tensor")
        device = self.tensors[0].device
        for t in self.tensors:
            if t.dtype != torch.float32 or t.device != device:
                raise ValueError(f"AdamW steps fp32 tensors on one device; got {t.dtype} on {t.device} "
                                 f"next to float32 on {device}")
        self.backend = backend if backend in BACKENDS else choose_backend(backend, device)
        param_groups = [{"params": tensors, "weight_decay": wd} for tensors, wd in groups]
        if self.backend == "apex":
            self.optimizer = apex_fused_adam()(param_groups, lr=0.0, betas=betas, eps=eps,
                                               adam_w_mode=True)
        else:
            kind = {"fused": True} if self.backend == "torch-fused" else {"foreach": True}
            self.optimizer = torch.optim.AdamW(param_groups, lr=0.0, betas=betas, eps=eps, **kind)
        # Moments are allocated now, not at the first update: running out of memory shows at start-up.
        self._install(0, [(torch.zeros_like(t), torch.zeros_like(t)) for t in self.tensors])

    def step(self, lr: float) -> None:
        """One update of every tensor at learning rate ``lr``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def moments(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of ``tensor``: the live state tensors."""
        state = self.optimizer.state[tensor]
        return state["exp_avg"], state["exp_avg_sq"]

    def load(self, step: int, moments: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set the step count (updates applied so far) and every tensor's moments (copied),
        ``moments[i]`` for ``self.tensors[i]``."""
        self._install(step, [(m.detach().clone(), v.detach().clone()) for m, v in moments])

    def _install(self, step: int, moments: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``load`` without copying: the optimizer keeps the given tensors."""
        if len(moments) != len(self.tensors):
            raise ValueError(f"{len(moments)} moment pairs for {len(self.tensors)} tensors")
        state_dict = self.optimizer.state_dict()
        state = {}
        for i, (t, (exp_avg, exp_avg_sq)) in enumerate(zip(self.tensors, moments)):
            if exp_avg.shape != t.shape or exp_avg_sq.shape != t.shape:
                raise ValueError(f"moments of tensor {i} have shapes {tuple(exp_avg.shape)} and "
                                 f"{tuple(exp_avg_sq.shape)}, expected {tuple(t.shape)}")
            state[i] = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            if self.backend != "apex":
                state[i]["step"] = torch.tensor(float(step), dtype=torch.float32)
        state_dict["state"] = state
        for group in state_dict["param_groups"]:
            group.pop("step", None)
            if self.backend == "apex" and step > 0:
                group["step"] = int(step)
        self.optimizer.load_state_dict(state_dict)

    def set_step(self, step: int) -> None:
        """Set the step count, keeping the moments."""
        self._install(step, [self.moments(t) for t in self.tensors])

    def state_tensors(self) -> list[torch.Tensor]:
        """Every moment tensor (two per stepped tensor)."""
        return [self.optimizer.state[t][k] for t in self.tensors for k in ("exp_avg", "exp_avg_sq")]
