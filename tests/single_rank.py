"""Run a test module's named checks in one single-process rank (tests/distributed.py).

Tests that need a ParallelState but no peers keep process groups out of the pytest process this
way. The module defines ``CHECKS`` (name -> fn(state)) and ``FIGURES`` (a dict its checks fill
with measured values, printed by the parent).
"""

import importlib

from tests.distributed import Checks, init_state, run_ranks


def _run_checks(module_name: str) -> dict:
    module = importlib.import_module(module_name)
    state = init_state()
    checks = Checks()
    for name, fn in module.CHECKS.items():
        checks.run(name, fn, state)
    return {"checks": checks.results, "figures": dict(module.FIGURES)}


def run_module_checks(module_name: str) -> dict:
    """{"checks": name -> None or a failure traceback, "figures": ...}; figures are printed."""
    (result,) = run_ranks(_run_checks, 1, module_name, torchrun_env=False)
    for name, value in result["figures"].items():
        print(f"{name}: {value}")
    return result
