"""Progress bars of the offline jobs: rate and ETA on a terminal, nothing in a log file or when off."""

import io
import sys

import numpy as np
import pytest

from m6_engine.progress import progress_bar


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_only_on_a_terminal_and_when_asked():
    tty, log, off = Terminal(), io.StringIO(), Terminal()
    assert list(progress_bar(range(3), desc="job", file=tty)) == [0, 1, 2]
    assert "job" in tty.getvalue() and "3/3" in tty.getvalue() and "it/s" in tty.getvalue()
    assert list(progress_bar(range(3), desc="job", file=log)) == [0, 1, 2] and log.getvalue() == ""
    assert list(progress_bar(range(3), desc="job", file=off, enabled=False)) == [0, 1, 2] and off.getvalue() == ""


def test_the_sample_index_build_shows_its_bar(tmp_path, monkeypatch):
    from m6_engine.data import indexed, sample_index

    for name, kind, dtype, shape, item in (("c_text", "tokens", np.uint16, (), np.asarray([3, 1, 2], np.uint16)),
                                           ("c_image", "patches", np.float16, (4,), np.zeros((2, 4), np.float16))):
        with indexed.IndexedDatasetBuilder(tmp_path / name, kind, dtype, shape, vocab_size=10 if kind == "tokens" else 0) as b:
            b.add(item, 0) if kind == "tokens" else b.add(item)
            b.finalize()
    monkeypatch.setattr(sys, "stderr", Terminal())
    sample_index.build_sample_index(tmp_path / "c", [1, 2], progress=True)
    assert "sample index" in sys.stderr.getvalue()
    assert sample_index.open_sample_index(tmp_path / "c").sources.captions.tolist() == []   # [3, 1, 2] holds 1, 2


def test_checkpoint_conversion_shows_its_bars(monkeypatch):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install '.[megatron]')")
    from megatron_ext import convert
    from tests.test_megatron_ext_model import CONFIG, _random_full

    monkeypatch.setattr(sys, "stderr", Terminal())
    full = _random_full(CONFIG)
    back = convert.from_mcore(convert.to_mcore_shards(full, CONFIG, tp=2, pp=2, progress=True), CONFIG, progress=True)
    assert all(np.array_equal(back[k].numpy(), full[k].numpy()) for k in full)
    shown = sys.stderr.getvalue()
    assert "to megatron-core" in shown and "4/4" in shown and "from megatron-core" in shown
