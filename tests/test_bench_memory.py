"""scripts/bench_memory.py --train-only: the training-pass table runs and measures something."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"


def test_train_only_prints_a_row_per_system_with_positive_costs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--train-only", "--systems", "gru", "mlp", "--rounds", "1"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = re.findall(r"^\| (\w+) \| ([\d,]+) \| ([\d.]+) \| (\d+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["gru", "mlp"]
    for _, params, ms, us in rows:
        assert int(params.replace(",", "")) > 0 and float(ms) > 0
        assert abs(float(ms) * 1e3 / (32 * 64) - int(us)) <= 1  # µs per frame = ms per pass / frames


def test_replayed_rows_hold_12_step_episodes_at_random_phases():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from bench_memory import replay_batch
    finally:
        sys.path.remove(str(SCRIPT.parent))
    is_init = replay_batch(32, 64, 12)
    for row in is_init:
        starts = row.nonzero().flatten()
        assert (starts.diff() == 12).all() and starts[0] < 12
    assert len({int(row.nonzero()[0]) for row in is_init}) > 1
