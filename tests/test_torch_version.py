"""m6_engine refuses, at import, a torch older than the supported range, naming both."""

import subprocess
import sys

import m6_engine


def test_supported_versions_pass():
    for version in ("2.11.0", "2.11.0+cpu", "2.14.1+cu130", "2.15.0.dev20270101", "2.16.0"):
        assert m6_engine._torch_version_problem(version) is None, version


def test_older_torch_is_named_with_the_range():
    message = m6_engine._torch_version_problem("2.10.1+cpu")
    assert "2.10.1+cpu" in message and "2.11 to 2.15" in message


def test_import_raises_for_an_older_torch():
    # A stand-in torch module of version 2.9.0, already imported: the check reads its version.
    code = ("import sys, types; t = types.ModuleType('torch'); t.__version__ = '2.9.0'; "
            "sys.modules['torch'] = t\n"
            "try:\n    import m6_engine\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch 2.9.0 is installed" in out and "2.11 to 2.15" in out
