"""The leaderboard suite: its config covers every memory system with an agent config and the reference with
three seeds, and its report, built from run dirs with known scores, shows the numbers computed here by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlmem import leaderboard
from rlmem.conf import CONF_DIR, available
from rlmem.memory import available_memories
from rlmem.suite import REFERENCE_AGENT, SuiteRun, plan
from rlmem.suite_report import result_row


def leaderboard_suite() -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("benchmark", overrides=["suite=leaderboard"])
    return OmegaConf.to_container(cfg.suite, resolve=True)


def test_every_memory_with_an_agent_config_and_the_reference_run_every_core_env_with_three_seeds():
    suite = leaderboard_suite()
    assert suite["name"] == "leaderboard" and suite[leaderboard.SUITE_KEY]
    runs = plan(suite["groups"])
    expected = {m for m in available_memories() if m in available("agent")} | {REFERENCE_AGENT}
    assert len(expected) >= 14  # the registry's systems, not an empty intersection
    core = ["delayed_cue", "repeat_first", "repeat_previous", "count_recall", "autoencode", "position_only_cartpole",
            "position_only_pendulum", "assoc_recall", "babi"]
    for group in core:
        seeds = {}
        for r in runs:
            if r.group == group:
                seeds.setdefault((r.agent, r.knobs), set()).add(r.seed)
        assert {agent for agent, _ in seeds} == expected, group
        assert all(len(s) >= 3 for s in seeds.values()), group
    # one frame budget for the core groups; every group states its budget
    budgets = {g: [o for o in spec["overrides"] if o.startswith("total_frames=")] for g, spec in suite["groups"].items()}
    assert all(len(b) == 1 for b in budgets.values())
    assert len({budgets[g][0] for g in core}) == 1
    delays = {dict(r.knobs).get("delay") for r in runs if r.env == "delayed_cue"}
    assert {10, 100, 1000} <= delays
    assert any(r.env == "tmaze_passive" for r in runs)


#: (agent, delay) -> eval_success per seed; None = the run did not finish
SCORES = {("gru", 10): [1.0, 0.95, 0.9], ("gru", 100): [0.85, 0.55, 0.4],
          ("mlp", 10): [0.25, 0.4, 0.25], ("mlp", 100): [0.25, 0.25, None],
          (REFERENCE_AGENT, 10): [0.55, 0.7, 0.85], (REFERENCE_AGENT, 100): [None, None, None]}


def write_runs(suite_dir: Path) -> list[dict]:
    rows = []
    for (agent, delay), values in SCORES.items():
        for seed, value in enumerate(values):
            script = "sb3_reference" if agent == REFERENCE_AGENT else "train_rl"
            run = SuiteRun("dc", script, agent, "delayed_cue", (("delay", delay),), seed, ())
            run_dir = run.run_dir(suite_dir)
            run_dir.mkdir(parents=True)
            if value is not None:
                (run_dir / "metrics.json").write_text(json.dumps(
                    {"frames": 100, "total_frames": 100, "wall_seconds": 1.0, "fps": 1000.0 + seed,
                     "eval_return": value, "eval_success": value, "parameters": 100}))
            rows.append(result_row(run, suite_dir))
    return rows


def row_of(text: str, agent: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.split("|")[2:3] == [f" {agent} "])
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_from_run_dirs_has_the_hand_computed_numbers(tmp_path):
    rows = write_runs(tmp_path)
    suite = {"name": "t", "groups": {"dc": {"script": "train_rl", "agents": ["gru", "mlp"], "env": "delayed_cue",
                                            "sweep": {"delay": [10, 100]}, "seeds": [0, 1, 2],
                                            "overrides": ["total_frames=100"]}}}
    text, images = leaderboard.report(suite, rows, tmp_path, 0.9, mflops={"gru": 0.05, "mlp": 0.01}.get)
    normalized = {k: [(v - 0.25) / 0.75 for v in values if v is not None] for k, values in SCORES.items()}

    def iqm(values):  # an explicit sort-and-slice: floor(n / 4) cut at each end
        values, cut = sorted(values), len(values) // 4
        return np.mean(values[cut:len(values) - cut])

    gru, mlp, ref = row_of(text, "gru"), row_of(text, "mlp"), row_of(text, REFERENCE_AGENT)
    # columns: rank, memory, IQM, delay 10, delay 100, largest delay solved, frames/s, parameters, MFLOPs
    assert gru[0] == "1" and mlp[0] == "2" and ref[0] == "-"  # ranked by IQM; no aggregate is no rank
    assert gru[2].startswith(f"{iqm(normalized['gru', 10] + normalized['gru', 100]):.2f} [")
    assert mlp[2].startswith(f"{iqm(normalized['mlp', 10] + normalized['mlp', 100]):.2f} [")
    assert mlp[2].endswith("(5/6 runs)")
    assert gru[3].startswith(f"{np.mean(normalized['gru', 10]):.2f} [") and "runs" not in gru[3]
    assert gru[4].startswith(f"{np.mean(normalized['gru', 100]):.2f} [")
    assert mlp[4].startswith(f"{np.mean(normalized['mlp', 100]):.2f} [") and mlp[4].endswith("(2/3 runs)")
    # the reference's unfinished runs are missing, not zero: no cell value and no aggregate
    assert ref[2] == "-" and ref[4] == "- (0/3 runs)"
    assert ref[3].startswith(f"{np.mean(normalized[REFERENCE_AGENT, 10]):.2f} [")
    # every gru seed at delay 10 is >= 0.9, one at delay 100 is not; mlp solves none
    assert gru[5] == "10" and mlp[5] == "none"
    assert gru[6] == "1,001" and gru[7] == "100" and gru[8] == "0.05" and ref[8] == "-"
    lo, hi = (float(x) for x in gru[2].split("[")[1].split("]")[0].split(","))
    assert lo <= iqm(normalized["gru", 10] + normalized["gru", 100]) <= hi
    assert "4 of 18 runs without results" in text and "`dc` (delayed_cue, delay 10, 100): 100 frames" in text
    assert "Ranked by IQM over the 2 core tasks: gru" in text and f"aggregate (no finished run on some core task): " \
        f"{REFERENCE_AGENT}" in text
    assert "mean over seeds [95% bootstrap CI]" in text and "{" not in text  # every placeholder filled
    assert images == ["leaderboard_horizon.png", "leaderboard_cost.png"]
    assert all((tmp_path / i).stat().st_size > 0 for i in images)


@pytest.mark.parametrize("threshold, solved", [(0.9, 10.0), (0.95, None)])
def test_a_delay_is_solved_only_in_every_seed(threshold, solved):
    rows = [{"env": "delayed_cue", "knobs": "delay=10", "status": "finished", "eval_success": v} for v in (1.0, 0.9)]
    assert leaderboard.delay_solved(rows, threshold) == (solved, True)
    missing = rows + [{"env": "delayed_cue", "knobs": "delay=10", "status": "missing"}]
    assert leaderboard.delay_solved(missing, threshold) == (None, True)  # a missing seed is no success
    assert leaderboard.delay_solved(missing[-1:], threshold) == (None, False)  # no results: not "none solved"
