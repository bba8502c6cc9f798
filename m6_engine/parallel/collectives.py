"""The flat-tensor all-gather and reduce-scatter, under the names the installed torch gives them.

torch 2.14 calls them ``dist.all_gather_single`` and ``dist.reduce_scatter_single``, and keeps
``all_gather_into_tensor`` / ``reduce_scatter_tensor`` only as deprecated aliases that print a
FutureWarning; torch 2.11 has only the old names. Both pairs take the same arguments,
``(output, input[, op], group=None, async_op=False)``, and behave the same: with ``async_op=True``
they return a ``Work`` to wait on, else ``None`` once the collective is done. One pair is picked
here, once, at import (``IMPLEMENTATION``): the new names where torch has them. Every caller in the
engine uses :func:`all_gather_single` and :func:`reduce_scatter_single` from this module, never
``torch.distributed`` directly (once torch 2.11 is no longer supported, drop the module prefix).
"""

import torch.distributed as dist

# name -> (all-gather, reduce-scatter) attribute names in torch.distributed
IMPLEMENTATIONS = {
    "single": ("all_gather_single", "reduce_scatter_single"),   # torch >= 2.14
    "tensor": ("all_gather_into_tensor", "reduce_scatter_tensor"),   # torch 2.11 (deprecated later)
}


def available() -> list[str]:
    """The implementations this torch has, preferred first."""
    return [name for name, attrs in IMPLEMENTATIONS.items() if all(hasattr(dist, a) for a in attrs)]


def implementation(name: str):
    """(all_gather_single, reduce_scatter_single) of implementation ``name`` (a key of
    ``IMPLEMENTATIONS``); raises if this torch lacks it. For tests and for :data:`IMPLEMENTATION`."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown collectives implementation {name!r}; one of {sorted(IMPLEMENTATIONS)}")
    if name not in available():
        raise RuntimeError(f"torch.distributed has no {' / '.join(IMPLEMENTATIONS[name])} in this torch")
    return tuple(getattr(dist, a) for a in IMPLEMENTATIONS[name])


def _pick() -> str:
    names = available()
    if not names:
        raise ImportError("torch.distributed has neither all_gather_single/reduce_scatter_single nor "
                          "all_gather_into_tensor/reduce_scatter_tensor: torch is too old (m6-engine needs 2.11+)")
    return names[0]


IMPLEMENTATION = _pick()
all_gather_single, reduce_scatter_single = implementation(IMPLEMENTATION)

__all__ = ["IMPLEMENTATION", "IMPLEMENTATIONS", "all_gather_single", "available", "implementation",
           "reduce_scatter_single"]
