"""The shortened `make demo`: real data pipeline, 4 ranks (tp=2, pp=2) under torchrun, held-out decoding.

Checks that the whole chain runs from the command line and that training lowered the loss; the
accuracy target of the full demo is a figure for the closing note, not a test (minutes of CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parent.parent


def test_short_demo_trains_and_decodes(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, DEMO_STEPS="20", DEMO_IMAGES="120", DEMO_TEXT_DOCS="300", DEMO_EVAL_LIMIT="4")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), "--out", str(out),
                           "--set", "train.log_interval=5", "--set", "train.eval_interval=0",
                           "--set", "train.save_interval=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "caption accuracy" in proc.stdout

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses

    result = json.loads((out / "demo_result.json").read_text(encoding="utf-8"))
    assert result["caption"]["count"] == 4 and result["question"]["count"] == 4
    assert 0.0 <= result["caption"]["accuracy"] <= 1.0
    assert (out / "checkpoints" / "latest").exists()
