"""The one availability gate of the fused ops: select_ops, and the error without the extension."""

import os
import subprocess
import sys

import pytest
import torch

import m6_engine.ops as ops
from m6_engine.ops import _extension
from m6_engine.ops.reference import layer_norm_reference, masked_softmax_reference


def test_select_reference_ops():
    chosen = ops.select_ops(False)
    assert not chosen.fused
    assert chosen.masked_softmax is masked_softmax_reference
    assert chosen.layer_norm is layer_norm_reference


def test_select_fused_ops():
    chosen = ops.select_ops(True)
    assert chosen.fused
    assert chosen.masked_softmax is ops.masked_softmax
    assert chosen.layer_norm is ops.layer_norm


def test_fused_and_reference_agree():
    # Both sets are interchangeable in a model: same signature, same results.
    x = torch.randn(2, 3, 6, 6)
    prefix, valid = torch.tensor([2, 0]), torch.tensor([6, 4])
    fused, reference = ops.select_ops(True), ops.select_ops(False)
    torch.testing.assert_close(fused.masked_softmax(x, prefix, valid, 0.5, 0),
                               reference.masked_softmax(x, prefix, valid, 0.5, 0))
    h, w, b = torch.randn(5, 16), torch.randn(16), torch.randn(16)
    torch.testing.assert_close(fused.layer_norm(h, w, b, 1e-5), reference.layer_norm(h, w, b, 1e-5))


@pytest.fixture
def extension_missing(monkeypatch):
    """Make m6_engine.ops behave as if m6_engine._C had failed to import."""
    monkeypatch.setattr(_extension, "_MODULE", None)
    monkeypatch.setattr(_extension, "_LOAD_ERROR", "m6_engine._C is not built (simulated)")


def test_missing_extension_raises_with_build_hint(extension_missing):
    assert not ops.extension_available()
    assert not ops.cuda_kernels_built()
    x = torch.randn(1, 1, 2, 2)
    lengths = torch.tensor([2])
    calls = [lambda: ops.select_ops(True), lambda: ops.masked_softmax(x, lengths, lengths),
             lambda: ops.layer_norm(x, torch.ones(2), torch.zeros(2)), ops.cpu_capability]
    for call in calls:
        with pytest.raises(ops.ExtensionNotBuiltError, match=r"not built \(simulated\).*make install"):
            call()
    assert issubclass(ops.ExtensionNotBuiltError, RuntimeError)
    assert not ops.select_ops(False).fused  # the reference path needs no extension


def test_import_without_extension():
    # A fresh interpreter where importing m6_engine._C fails: the package still imports, and
    # says why the kernels are missing.
    code = (
        "import sys; sys.modules['m6_engine._C'] = None\n"
        "import m6_engine, m6_engine.ops as ops\n"
        "assert not ops.extension_available()\n"
        "try:\n"
        "    ops.require_extension()\n"
        "except ops.ExtensionNotBuiltError as error:\n"
        "    print(error)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "m6_engine._C is not built" in result.stdout and "make install" in result.stdout
