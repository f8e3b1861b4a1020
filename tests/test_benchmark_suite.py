"""The benchmark suite: planning runs from a suite config, skipping finished runs, refusing a suite dir
started with other settings, the results tables built from run dirs, and the smoke suite end to end
(including a SIGTERM in the middle and a rerun that continues)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlmem.suite import SuiteRun, check_settings, finished, long_episode_overrides, plan
from rlmem.suite_report import horizon, largest_solved, markdown, result_row
from rlmem.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR


def group(**spec):
    return {"g": {"script": "train_rl", "agents": ["gru"], "env": "delayed_cue", **spec}}


def test_plan_is_every_agent_knob_value_and_seed():
    runs = plan(group(agents=["gru", "mlp"], sweep={"delay": [5, 50], "n_cues": [2]}, seeds=[0, 1, 2],
                      overrides=["total_frames=1000"]))
    assert len(runs) == 2 * 2 * 1 * 3
    run = runs[0]
    assert run.name == "gru-delayed_cue-delay5-n_cues2-seed0"
    assert run.arguments() == ["agent=gru", "env=delayed_cue", "env.delay=5", "env.n_cues=2", "seed=0",
                               "total_frames=1000"]
    assert run.run_dir(Path("/s")) == Path("/s/runs/g/gru-delayed_cue-delay5-n_cues2-seed0")
    lm = plan({"lm": {"script": "train_lm", "agents": ["gru"], "env": "copy_memory", "sweep": {"delay": [3]}}})[0]
    assert lm.arguments() == ["model=gru", "task=copy_memory", "task.delay=3", "seed=0"]


def test_suite_runs_use_one_torch_thread_unless_their_overrides_say_otherwise():
    """Runs go side by side (jobs of them, or one per Ray CPU): train_rl's threads=auto would oversubscribe."""
    default, chosen = plan(group(seeds=[0])), plan(group(seeds=[0], overrides=["threads=2"]))
    assert default[0].command(Path("/s"))[-2:] == ["threads=1", f"hydra.run.dir={Path('/s/runs/g/gru-delayed_cue-seed0')}"]
    assert [a for a in chosen[0].command(Path("/s")) if a.startswith("threads=")] == ["threads=2"]
    assert "threads=1" not in default[0].arguments()  # the settings a run dir records are unchanged


def test_suite_runs_are_the_installed_commands_not_script_paths():
    """``python -m rlmem.commands.<script>``: a suite works from a non-editable install, in any directory."""
    rl, ref = plan(group(agents=["gru", "sb3_recurrent_ppo"], seeds=[0]))
    lm = plan({"lm": {"script": "train_lm", "agents": ["gru"], "env": "copy_memory"}})[0]
    for run, module in ((rl, "train_rl"), (ref, "sb3_reference"), (lm, "train_lm")):
        assert run.command(Path("/s"))[:3] == [sys.executable, "-m", f"rlmem.commands.{module}"]


def test_long_episodes_get_a_rollout_that_holds_two_episodes():
    runs = plan(group(agents=["gru", "transformer"], sweep={"delay": [10, 100]},
                      long_episodes={"knob": "delay", "extra_steps": 2}))
    by_name = {r.name: r.overrides for r in runs}
    assert by_name["gru-delayed_cue-delay10-seed0"] == ()  # 2 x 12 steps fit the default 64-step slice
    # 102-step episodes: 2 x 102 = 204 -> 256-step slices, 2048 // 256 = 8 envs; the window covers an episode
    assert by_name["gru-delayed_cue-delay100-seed0"] == ("ppo.rollout_len=256", "ppo.seq_len=256", "ppo.num_envs=8")
    assert by_name["transformer-delayed_cue-delay100-seed0"][-1] == "agent.window=102"
    assert long_episode_overrides("gru", 1002) == ["ppo.rollout_len=2048", "ppo.seq_len=2048", "ppo.num_envs=4"]


def test_the_reference_agent_runs_sb3_recurrent_ppo_with_the_overrides_it_knows(tmp_path):
    gru, ref = plan(group(agents=["gru", "sb3_recurrent_ppo"], sweep={"delay": [5]},
                          overrides=["total_frames=2048", "ppo.num_envs=8"]))
    assert gru.script == "train_rl" and ref.script == "sb3_reference"
    assert ref.arguments() == ["env=delayed_cue", "env.delay=5", "seed=0", "total_frames=2048"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*ref.command(tmp_path)[:-1], "eval_interval=1024", "eval_episodes=4",
                           f"hydra.run.dir={ref.run_dir(tmp_path)}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert finished(ref, tmp_path)
    row = result_row(ref, tmp_path)
    assert row["status"] == "finished" and row["frames"] >= 2048 and 0 <= row["eval_success"] <= 1
    assert row["parameters"] > 0 and row["score_name"] == "eval_success"


@pytest.mark.parametrize("spec, match", [
    (group(script="train_xx"), "valid choices: train_rl, train_lm"),
    (group(script="sb3_reference"), "valid choices: train_rl, train_lm"),
    (group(agents=["no_such_agent"]), "unknown agent 'no_such_agent'; valid choices: .*gru"),
    (group(env="no_such_env"), "unknown env 'no_such_env'; valid choices: .*delayed_cue"),
    (group(agents=[]), "no agents"),
    (group(sweep={"delay": 10}), "sweep.delay must be a non-empty list"),
    (group(seeds=[0, 0]), "the same run twice"),
    (group(typo=1), r"unknown keys \['typo'\]"),
    (group(long_episodes={"knob": "delay"}), "long_episodes needs"),
])
def test_plan_errors_name_the_valid_choices(spec, match):
    with pytest.raises(ValueError, match=match):
        plan(spec)


def write_metrics(run: SuiteRun, suite_dir: Path, **metrics):
    run_dir = run.run_dir(suite_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_finished_runs_and_changed_settings(tmp_path):
    rl, lm = SuiteRun("g", "train_rl", "gru", "delayed_cue", (), 0, ()), SuiteRun("l", "train_lm", "gru", "copy_memory", (), 0, ())
    assert not finished(rl, tmp_path)
    write_metrics(rl, tmp_path, frames=2048, total_frames=4096)  # a checkpoint's metrics: not done
    assert not finished(rl, tmp_path)
    write_metrics(rl, tmp_path, frames=4096, total_frames=4000)
    assert finished(rl, tmp_path)
    write_metrics(lm, tmp_path, steps=10)
    assert finished(lm, tmp_path)
    (rl.run_dir(tmp_path) / "suite_run.json").write_text(json.dumps(["agent=gru", "env=delayed_cue", "seed=0",
                                                                      "total_frames=9"]))
    with pytest.raises(ValueError, match="started with other settings"):
        check_settings([rl], tmp_path)


def test_results_tables_from_run_dirs(tmp_path):
    """Scores are laid out by hand; the table's bold cell, the horizon and the largest solved delay follow."""
    score = {("gru", 10): [1.0, 0.9], ("gru", 100): [0.95, 0.85], ("gru", 300): [0.9, 0.8], ("gru", 1000): [0.3, 0.2],
             ("mlp", 10): [0.25, 0.25], ("mlp", 100): [0.25, 0.3], ("mlp", 300): [0.2, 0.2], ("mlp", 1000): [0.25, 0.2]}
    runs, rows = [], []
    for (agent, delay), values in score.items():
        for seed, value in enumerate(values):
            run = SuiteRun("h", "train_rl", agent, "delayed_cue", (("delay", delay),), seed, ())
            write_metrics(run, tmp_path, frames=100, total_frames=100, wall_seconds=2.0, fps=50.0, eval_return=value,
                          eval_success=value, parameters=7)
            runs.append(run)
            rows.append(result_row(run, tmp_path))
    missing = SuiteRun("h", "train_rl", "gru", "delayed_cue", (("delay", 10),), 9, ())
    rows.append(result_row(missing, tmp_path))
    assert rows[-1]["status"] == "missing" and rows[0]["score"] == 1.0 and rows[0]["parameters"] == 7
    knob, curves = horizon(rows, "h")
    assert knob == "delay" and curves["gru"][300.0] == pytest.approx((0.85, 0.05))
    assert largest_solved(curves["gru"], 0.9) == 100 and largest_solved(curves["mlp"], 0.9) is None
    text = markdown("test", rows, 60.0, 2, 0.9, ["horizon_h.png"])
    # columns: chance, optimal, then the agents; the best is bold only above chance
    assert "| delayed_cue | delay=10 | 0.25 | 1 | **0.95 ± 0.05** | 0.25 ± 0 |" in text
    assert "| delayed_cue | delay=1000 | 0.25 | 1 | 0.25 ± 0.05 | 0.225 ± 0.025 |" in text
    assert "Largest `delay` with mean eval_success >= 0.9: gru 100, mlp not solved" in text
    assert "seed 9 (missing)" in text and "![horizon_h](horizon_h.png)" in text


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "suite").glob("*.yaml")))
def test_every_suite_config_plans(name):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("benchmark", overrides=[f"suite={name}"])
    suite = OmegaConf.to_container(cfg.suite, resolve=True)
    assert suite["name"] == name and plan(suite["groups"])


@pytest.mark.slow  # a whole suite of 9 runs, stopped and rerun (~1-2 min)
def test_smoke_suite_end_to_end_with_a_stop_and_a_rerun(tmp_path):
    """``benchmark.py suite=smoke``: SIGTERM after the first finished run stops the suite (the running script
    checkpoints); the same command again skips the finished run and writes results.csv, results.md, PNGs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "suite=smoke", "jobs=2",
               f"hydra.run.dir={tmp_path}"]
    log = tmp_path / "benchmark.log"
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and "[1/9]" in log.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0, out[-2000:]
    assert "rerun the same command to continue" in out
    first = tmp_path / "runs" / "delayed_cue" / "gru-delayed_cue-delay2-seed0"
    assert (first / "metrics.json").exists()
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "9 runs, 1 already finished" in log.read_text() or "9 runs, 2 already finished" in log.read_text()
    assert (first / "output.log").read_text().count("training gru") == 1, "the finished run was not retrained"
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 9 and all(",finished," in r for r in rows[1:])
    assert "## delayed_cue: eval_success" in (tmp_path / "results.md").read_text()
    assert {p.name for p in tmp_path.glob("*.png")} >= {"learning_delayed_cue.png", "horizon_delayed_cue.png"}
    (tmp_path / "results.md").unlink()
    report = subprocess.run([*command, "run=false"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Benchmark suite `smoke`") and "9 of 9 runs finished" in text
    assert "jobs=2" in text and "hydra.run.dir" not in text  # the command as typed, without the run dir


def test_publish_writes_a_section_per_suite_and_the_index(tmp_path):
    from rlmem.commands.benchmark import publish

    for suite in ("horizon", "smoke"):
        suite_dir = tmp_path / "runs" / suite
        suite_dir.mkdir(parents=True)
        (suite_dir / "results.md").write_text(f"# Benchmark suite `{suite}`\n\n## g: table\n\n![h](horizon_g.png)\n")
        (suite_dir / "horizon_g.png").write_bytes(b"png")
        publish(suite, suite_dir, root=tmp_path)
    index = (tmp_path / "docs" / "results.md").read_text()
    assert index.startswith("# Benchmark results")
    assert "## Benchmark suite `horizon`" in index and "## Benchmark suite `smoke`" in index
    assert "### g: table" in index and "![h](results/smoke_horizon_g.png)" in index
    assert (tmp_path / "docs" / "results" / "horizon_horizon_g.png").read_bytes() == b"png"


def test_variants_are_runs_of_every_agent_with_their_overrides_and_report_compute(tmp_path):
    """A group's variants multiply its runs; results show agent[variant]; runs with a gated path get
    eval FLOPs per episode (eval_length x (base + rate x path), computed here by hand) and a compute table."""
    runs = plan({"g": {"script": "train_rl", "agents": ["infinity"], "env": "delayed_cue", "seeds": [0],
                       "overrides": ["total_frames=9"],
                       "variants": {"never": ["trigger=never"],
                                    "learned": ["trigger=learned", "trigger.cost_coef=1"]}}})
    assert [r.name for r in runs] == ["infinity-never-delayed_cue-seed0", "infinity-learned-delayed_cue-seed0"]
    assert runs[1].arguments()[-3:] == ["total_frames=9", "trigger=learned", "trigger.cost_coef=1"]
    for run, rate, ret in zip(runs, (0.0, 0.25), (0.5, 1.0)):
        write_metrics(run, tmp_path, frames=9, total_frames=9, wall_seconds=1.0, fps=9.0, eval_return=ret,
                      eval_success=ret, eval_length=10.0, eval_trigger_rate=rate, flops_base=1000.0,
                      flops_path=400.0, compute={"trigger_rate": rate + 0.5})
    rows = [result_row(r, tmp_path) for r in runs]
    assert [r["agent"] for r in rows] == ["infinity[never]", "infinity[learned]"]
    assert rows[1]["eval_episode_flops"] == 10.0 * (1000.0 + 0.25 * 400.0)
    from rlmem.suite_report import compute_table, plot_return_vs_compute

    table = compute_table(rows)
    assert rows[1]["eval_path_flops"] == 10.0 * 0.25 * 400.0
    assert "| g | delayed_cue | infinity[learned] | 1.000 | 1.000 | 0.750 | 0.250 | 0.011 | 0.0010 |" in table
    assert plot_return_vs_compute(rows, "g", tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 0
    with pytest.raises(ValueError, match="variants must map names to lists"):
        plan({"g": {"script": "train_rl", "agents": ["gru"], "env": "delayed_cue", "variants": {"a": "trigger=never"}}})


def test_throughput_has_a_row_for_every_memory_system_with_gru_first():
    import argparse

    from rlmem.commands.benchmark import throughput_rows
    from rlmem.memory import available_memories

    ns = argparse.Namespace(num_envs=32, rollout_len=64, epochs=4, minibatches=4, hidden=64, delay=10, frames=2048,
                            threads=1, memories=["all"])
    rows = throughput_rows(ns, cores=2, auto_threads=2)
    memories = [args["memory"] for _, kind, args in rows]
    assert memories[0] == "gru" and sorted(memories) == sorted(available_memories())
    assert all(kind == "rlmem" and args["defaults"] and args["threads"] == 1 for _, kind, args in rows)
    reference = throughput_rows(argparse.Namespace(**{**vars(ns), "memories": [
        "cmrn", "cmrn@rlmem.memory.reference.cmrn:CMRNReference"]}), cores=2, auto_threads=2)
    assert [(args["memory"], args.get("memory_class")) for _, _, args in reference] == [
        ("gru", None), ("cmrn", None), ("cmrn", "rlmem.memory.reference.cmrn:CMRNReference")]
    with pytest.raises(SystemExit, match="'grux' is not a memory system; valid: all, adapter"):
        throughput_rows(argparse.Namespace(**{**vars(ns), "memories": ["grux"]}), cores=2, auto_threads=2)


def test_a_leaderboard_section_goes_after_the_header_of_results_md(tmp_path):
    from rlmem.commands.benchmark import insert_section

    path = tmp_path / "results.md"
    path.write_text("# Benchmark suite `x`\n\nheader line\n\n## g: eval_success\n\ntable\n")
    insert_section(path, "## Leaderboard\n\nrows\n")
    assert path.read_text() == ("# Benchmark suite `x`\n\nheader line\n\n## Leaderboard\n\nrows\n\n## g: eval_success\n\n"
                                "table\n")


def test_probe_tells_a_memory_that_carries_the_cue_from_one_that_cannot():
    """The supervised DelayedCue probe: gru learns a 3-step delay (accuracy >= 0.9 within 300 updates); mlp,
    which sees only the query flag at the query step, stays near chance (1/4) however long it trains."""
    from rlmem.commands.bench_workers import worker_probe

    args = {"delay": 3, "n_cues": 4, "batch": 32, "lr": 1e-3, "updates": 300, "seed": 0, "threads": 1}
    gru = worker_probe({**args, "agent": "gru"})
    mlp = worker_probe({**args, "agent": "mlp"})
    assert gru["updates_to_0.9"] is not None and gru["updates_to_0.9"] <= 300 and gru["accuracy"] >= 0.9
    assert mlp["updates_to_0.9"] is None and mlp["updates"] == 300 and mlp["accuracy"] < 0.45


def test_probe_is_a_measurement_form_of_the_benchmark_cli():
    from rlmem.commands.benchmark import MEASUREMENTS, measurement_parser

    ns = measurement_parser().parse_args(["probe", "--agents", "gru", "transformer", "--delays", "100", "300",
                                          "--seeds", "0", "1", "2"])
    assert "probe" in MEASUREMENTS and ns.command == "probe"
    assert (ns.agents, ns.delays, ns.seeds) == (["gru", "transformer"], [100, 300], [0, 1, 2])


@pytest.mark.parametrize("args, message", [
    (["--agents", "grux"], "'grux' is not an agent config; valid: "),
    (["--delays", "-1"], "needs --delays >= 0"),
    (["--n-cues", "1"], "--n-cues >= 2"),
])
def test_probe_refuses_bad_arguments_before_running_anything(args, message):
    from rlmem.commands.benchmark import main

    with pytest.raises(SystemExit) as err:
        main(["probe", *args])
    assert message in str(err.value)
    if "agent config" in message:  # every agent config on disk is named
        from rlmem.conf import CONF_DIR

        assert all(p.stem in str(err.value) for p in (CONF_DIR / "agent").glob("*.yaml"))


def test_memory_mflops_counts_one_acting_step_by_hand():
    """mlp: one Linear(encoder_dim -> hidden): 2 d h FLOPs; gru: three gates of [x; h]: 2 * 3 h (d + h); lstm's
    fused kernel counts nothing and the reference is no rlmem memory: unknown (None), never 0."""
    from rlmem.commands.benchmark import memory_mflops
    from rlmem.commands.overrides import group_config
    from rlmem.suite import REFERENCE_AGENT

    mlp, gru = group_config("agent", "mlp"), group_config("agent", "gru")
    d, h = mlp["encoder_dim"], mlp["hidden_size"]
    assert memory_mflops("mlp") == pytest.approx(2 * d * h / 1e6)
    d, h = gru["encoder_dim"], gru["hidden_size"]
    assert memory_mflops("gru") == pytest.approx(2 * 3 * h * (d + h) / 1e6)
    assert memory_mflops("lstm") is None and memory_mflops(REFERENCE_AGENT) is None
