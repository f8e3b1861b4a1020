"""suite_report reads honestly: rows and curves are built by hand, the markdown text and the matplotlib axes
are checked (no bold on a tie or at chance, one seed written as a seed, success plots on [chance, optimal]
with both levels drawn, overlapping agents distinguishable, no "solved up to none")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from rlmem import suite_report
from rlmem.suite import SuiteRun
from rlmem.suite_report import markdown, plot_horizon, plot_learning_curves

#: DelayedCue's defaults: 4 cues, so a random guess succeeds 1 time in 4
CHANCE, OPTIMAL = 0.25, 1.0


def row(agent, value, seed=0, group="g", knobs="-", env="delayed_cue"):
    return {"group": group, "script": "train_rl", "agent": agent, "env": env, "knobs": knobs, "seed": seed,
            "status": "finished", "frames": 100, "wall_seconds": 1.0, "fps": 100.0, "eval_return": value,
            "eval_success": value, "score_name": "eval_success", "score": value, "parameters": 7}


def table_line(text: str, knobs: str = "-") -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| delayed_cue | {knobs} |"))


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save (kept open for inspection instead of written)."""
    saved: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: saved.append(self))
    return saved


def test_chance_and_optimal_come_from_the_env():
    from rlmem.suite_report import score_bounds

    assert score_bounds("train_rl", "delayed_cue", "-", "eval_success") == (CHANCE, OPTIMAL)
    assert score_bounds("train_rl", "delayed_cue", "n_cues=8 delay=50", "eval_success") == (0.125, 1.0)
    assert score_bounds("train_rl", "delayed_cue", "-", "eval_return") == (0.25, 1.0)
    assert score_bounds("train_lm", "assoc_recall", "-", "eval_accuracy") is None
    # a continuous action space: the random policy's torques are drawn in the box (a measured rate, not a crash)
    chance, optimal = score_bounds("train_rl", "position_only_pendulum", "max_episode_length=20", "eval_success")
    assert 0.0 <= chance < optimal == 1.0


def test_a_tie_at_the_best_value_is_not_bold():
    """suite=smoke: every delayed_cue run scored 0.1875 and all were bolded as best. Here a tie above chance."""
    text = markdown("t", [row("gru", 0.75), row("mamba", 0.75), row("mlp", 0.5)], None, 1, 0.9, [])
    line = table_line(text)
    assert "**" not in line, line
    assert "0.75" in line and "Bold: the unique best mean of a row, if above chance" in text


def test_the_smoke_suites_all_equal_scores_are_not_bold():
    text = markdown("smoke", [row(a, 0.1875) for a in ("gru", "lstm", "mlp", "mamba")], None, 1, 0.9, [])
    assert "**" not in table_line(text)


def test_a_unique_best_at_chance_is_not_bold_and_one_above_is():
    at_chance = markdown("t", [row("gru", CHANCE), row("mlp", 0.125)], None, 1, 0.9, [])
    assert "**" not in table_line(at_chance)
    # 0.297 (19 of 64 episodes) is within the eval's noise of 0.25: within 10% of [chance, optimal] is at chance
    near_chance = markdown("t", [row("gru", 0.297), row("mlp", 0.125)], None, 1, 0.9, [])
    assert "**" not in table_line(near_chance)
    above = markdown("t", [row("gru", 0.5), row("mlp", 0.125)], None, 1, 0.9, [])
    assert "| 0.25 | 1 | **0.5** | 0.125 |" in table_line(above)  # chance and optimal shown beside the scores


def test_one_seed_is_written_as_seed_0_without_a_std():
    text = markdown("t", [row("gru", 0.5), row("mlp", 0.125)], None, 1, 0.9, [])
    assert "## g: eval_success (seed 0)" in text
    assert "over seeds" not in text and "±" not in table_line(text)
    several = markdown("t", [row("gru", 0.5), row("gru", 0.7, seed=1)], None, 1, 0.9, [])
    assert "## g: eval_success (mean ± std over seeds 0, 1)" in several and "0.6 ± 0.1" in several


def horizon_rows(seeds=(0,)):
    rows = []
    for seed in seeds:
        for delay, gru, mlp in [(10, 1.0, 0.25), (100, 0.5, 0.25), (1000, 0.25, 0.25)]:
            rows += [row("gru", gru, seed, "h", f"delay={delay}"), row("mlp", mlp, seed, "h", f"delay={delay}"),
                     row("lstm", mlp, seed, "h", f"delay={delay}")]  # lstm's line lies exactly on mlp's
    return rows


def levels(ax) -> set[float]:
    """y of the horizontal lines spanning the axes (axhline)."""
    return {float(line.get_ydata()[0]) for line in ax.get_lines()
            if list(line.get_xdata()) == [0, 1] and len(set(line.get_ydata())) == 1}


def test_horizon_plot_has_the_chance_to_optimal_axis_levels_and_distinct_lines(tmp_path, figures):
    assert plot_horizon(horizon_rows(), "h", tmp_path / "h.png", 0.9)
    (ax,) = figures[0].axes
    assert ax.get_ylim() == (CHANCE, OPTIMAL)
    assert {CHANCE, OPTIMAL} <= levels(ax)
    agents = [line for line in ax.get_lines() if line.get_label().split(" (")[0] in ("gru", "mlp", "lstm")]
    assert len(agents) == 3
    styles = {(line.get_marker(), line.get_linestyle()) for line in agents}
    assert len(styles) == 3 and all(line.get_alpha() is not None and line.get_alpha() < 1 for line in agents)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "gru (solved up to 10)" in legend and "mlp (not solved)" in legend
    assert not any("none" in text for text in legend)
    assert "seed 0" in ax.get_title() and "±" not in ax.get_title()


def curves(monkeypatch, found: dict[tuple[str, int], np.ndarray]) -> list[SuiteRun]:
    """Runs of group ``g`` whose eval_success curves are ``found[(agent, seed)]`` (no TensorBoard files)."""
    runs = [SuiteRun("g", "train_rl", agent, "delayed_cue", (), seed, ()) for agent, seed in found]
    x = np.arange(5) * 1000

    def fake(run, suite_dir):
        return "charts/eval_success", x, found[(run.agent, run.seed)]

    monkeypatch.setattr(suite_report, "learning_curve", fake)
    return runs


def test_learning_curves_have_the_chance_to_optimal_axis_levels_and_distinct_lines(tmp_path, monkeypatch, figures):
    same = np.array([0.25, 0.5, 0.75, 1.0, 1.0])
    runs = curves(monkeypatch, {("gru", 0): same, ("lstm", 0): same.copy(), ("mlp", 0): np.full(5, 0.1875)})
    assert plot_learning_curves(runs, Path(tmp_path), "g", tmp_path / "l.png")
    ax = figures[0].axes[0]
    assert ax.get_ylim() == (CHANCE, OPTIMAL)
    assert {CHANCE, OPTIMAL} <= levels(ax)
    agents = [line for line in ax.get_lines() if line.get_label() in ("gru", "lstm", "mlp")]
    assert len(agents) == 3  # gru and lstm overlap exactly: told apart by marker and line style
    assert len({(line.get_marker(), line.get_linestyle()) for line in agents}) == 3
    assert all(line.get_alpha() is not None and line.get_alpha() < 1 for line in agents)
    title = figures[0]._suptitle.get_text()
    assert "(seed 0)" in title and "mean" not in title
    # mlp's curve lies under chance, outside the axis: the panel names it
    assert any(t.get_text() == "below chance: mlp (min 0.188)" for t in ax.texts)


def test_learning_curves_of_several_seeds_say_mean_over_seeds(tmp_path, monkeypatch, figures):
    runs = curves(monkeypatch, {("gru", 0): np.full(5, 0.5), ("gru", 1): np.full(5, 0.7)})
    assert plot_learning_curves(runs, Path(tmp_path), "g", tmp_path / "l.png")
    assert "mean over seeds 0, 1, band = min..max" in figures[0]._suptitle.get_text()
