"""CPU TEST SHIM: lets megatron-core 0.16 run on CPU ranks (gloo) for tests and the race.

megatron-core's parallel layers, transformer block and GPTModel compute fine on the CPU, but a
few of its code paths are CUDA-only by construction:

- ``torch.cuda.current_device()`` as the ``device=`` of buffers (global memory buffer, p2p receive
  buffers, tensor-parallel gathers, DDP grad buffers), ``torch.cuda.synchronize()`` in p2p;
- hard-coded ``device="cuda"`` tensors (the token count of ``pipeline_parallel/schedules.py``,
  the optimizer's scale / found-inf scalars, ``clip_grads.py``);
- ``weight.data.cuda()`` when the tied word embedding is synchronised with pp > 1;
- the CUDA RNG tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()``).

Inside ``with cpu_shim():`` those calls are redirected to the CPU: each listed megatron module
sees a stand-in for its global ``torch`` whose ``torch.cuda`` answers with the CPU device and the
CPU RNG, and whose tensor factories turn ``device="cuda"`` into the CPU; ``Tensor.cuda`` returns
the tensor itself; the RNG tracker saves and restores the CPU generator. Everything is restored on
exit. The redirection is for CPU tests only: on a GPU machine megatron-core needs none of it, and
nothing in ``m6_engine`` or the rest of ``megatron_ext`` imports this module.
"""

import contextlib
import importlib

import torch

# Modules whose global ``torch`` is replaced while the shim is active.
SHIMMED_MODULES = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.models.common.language_module.language_module",
)
_CPU = torch.device("cpu")
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")


def _on_cpu(device):
    """``device`` with any CUDA device replaced by the CPU."""
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return _CPU
    return device


class _CudaOnCpu:
    """Stand-in for ``torch.cuda``: the "current device" is the CPU and the RNG is the CPU's."""

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(device=None):
        return None

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """Stand-in for the ``torch`` module: tensor factories place "cuda" tensors on the CPU."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name not in _FACTORIES:
            return value

        def factory(*args, device=None, pin_memory=False, **kwargs):
            return value(*args, device=_on_cpu(device), **kwargs)

        return factory


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tensor_cuda_on_cpu(self, *args, **kwargs):
    return self


@contextlib.contextmanager
def cpu_shim():
    """Redirect megatron-core's CUDA-only calls to the CPU inside the block (module docstring)."""
    if torch.cuda.is_available():
        raise RuntimeError("megatron_ext.testing.cpu_shim is for CPU-only test machines; with a GPU "
                           "run megatron-core unpatched")
    stand_in = _TorchOnCpu()
    saved = []
    for name in SHIMMED_MODULES:
        module = importlib.import_module(name)
        saved.append((module, "torch", module.torch))
        module.torch = stand_in
    rng = importlib.import_module("megatron.core.tensor_parallel.random")
    for attr, replacement in (("_get_cuda_rng_state", _cpu_get_rng_state),
                              ("_set_cuda_rng_state", _cpu_set_rng_state)):
        saved.append((rng, attr, getattr(rng, attr)))
        setattr(rng, attr, replacement)
    saved.append((torch.Tensor, "cuda", torch.Tensor.cuda))
    torch.Tensor.cuda = _tensor_cuda_on_cpu
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)
