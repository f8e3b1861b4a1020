"""The run lifecycle both trainers share (rlmem.run, rlmem.callbacks) and the defects it fixed: stops within
an update, bootstrap values under the collector's exploration, the reward scaler and the learning rate after a
resume, stop_at, progress.csv, the progress line and the Python API's console output."""

from __future__ import annotations

import csv
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchrl.envs.utils import ExplorationType, exploration_type

from rlmem.agents import build_agent
from rlmem.callbacks import Callback, StopAt
from rlmem.interrupts import TrainingInterrupted
from rlmem.lm_training import run as run_lm
from rlmem.ppo import PPOConfig, RecurrentPPO
from rlmem.run import RunDirError, identity_diff
from rlmem.run_io import load_checkpoint
from test_ppo import ScaledMemory

ROOT = Path(__file__).resolve().parents[1]
ENV = {"id": "rlmem/DelayedCue-v0", "delay": 2}
GRU = {"memory": "gru", "encoder_dim": 8, "hidden_size": 8}
SMALL = {"num_envs": 4, "rollout_len": 16, "seq_len": 8, "minibatches": 2, "epochs": 1, "eval_episodes": 4}
FPB = 4 * 16  # frames per batch of SMALL


def trainer(run_dir, agent=GRU, env=ENV, ppo=None, **kwargs) -> RecurrentPPO:
    return RecurrentPPO(build_agent(agent, env, seed=0), env, PPOConfig(**{**SMALL, **(ppo or {})}), run_dir,
                        verbose=0, **kwargs)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- stops ----------------------------------------------------------------------------------------------
class SlowMemory(ScaledMemory):
    """test_ppo's ``h <- w h + x``, slow in sequence mode (the PPO replay); sends this process SIGTERM at its
    first replay, i.e. in the middle of the first update."""

    replays = 0
    signal_at_replay = 1
    delay = 0.5

    def forward(self, x, state, is_init):
        if x.shape[1] > 1:
            type(self).replays += 1
            if type(self).replays == self.signal_at_replay:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(self.delay)
        return super().forward(x, state, is_init)


def test_sigterm_mid_update_checkpoints_within_seconds_and_the_run_resumes(tmp_path, caplog):
    """16 slow replays per update; a SIGTERM at the first one stops at the next minibatch, discards the partial
    update and checkpoints the state from before the rollout."""
    SlowMemory.replays = 0
    agent = {"memory": "test_lifecycle:SlowMemory", "encoder_dim": 8}
    ppo = {"epochs": 4, "minibatches": 4, "seq_len": 4}
    t = trainer(tmp_path, agent=agent, ppo=ppo, total_frames=2 * FPB)
    initial = {k: v.clone() for k, v in t.agent.state_dict().items()}
    with caplog.at_level("INFO"), pytest.raises(TrainingInterrupted) as stop:
        t.train()
    assert stop.value.signum == signal.SIGTERM
    assert SlowMemory.replays <= 2  # stopped at the next minibatch, not after the 16 replays of a whole update
    assert any(r.getMessage().startswith("stopping: SIGTERM received") for r in caplog.records)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["frames"] == 0 and ckpt["iteration"] == 0  # the partial update was discarded
    for key, value in ckpt["agent"].items():
        torch.testing.assert_close(value, initial[key], rtol=0, atol=0)
    SlowMemory.delay, SlowMemory.signal_at_replay = 0.0, -1
    try:
        metrics = trainer(tmp_path, agent=agent, ppo=ppo, total_frames=2 * FPB).train()
    finally:
        SlowMemory.delay, SlowMemory.signal_at_replay = 0.5, 1
    assert metrics["frames"] == 2 * FPB and load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 2


def test_sigterm_during_collection_stops_before_the_rollout_ends(tmp_path):
    t = trainer(tmp_path, ppo={"rollout_len": 64, "seq_len": 8}, total_frames=4 * 4 * 64)
    steps = []

    def count(module, args):
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    t.acting_agent.policy.register_forward_pre_hook(count)
    with pytest.raises(TrainingInterrupted):
        t.train()
    assert len(steps) < 64  # stopped between collection steps, not at the end of the rollout
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["frames"] == 0


def test_sigterm_during_an_evaluation_stops_before_its_episodes_end(tmp_path):
    t = trainer(tmp_path, env={**ENV, "delay": 30}, total_frames=4 * FPB)  # evaluation episodes of 33 steps
    calls = []
    act_greedy = t.acting_agent.act_greedy

    def counted(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return act_greedy(*args)

    t.acting_agent.act_greedy = counted
    with pytest.raises(TrainingInterrupted):
        t.train()  # evaluates first, at frames 0
    assert len(calls) < 30
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["frames"] == 0 and ckpt["next_eval"] == 0  # the resumed run evaluates again


# --- bootstrap values -----------------------------------------------------------------------------------
def test_bootstrap_values_run_under_the_collectors_exploration_type(tmp_path):
    """The last-column and truncation bootstrap values go through the trigger head too: it must sample as in
    the rollout (RANDOM), not fire greedily."""
    t = trainer(tmp_path, total_frames=FPB)
    from torchrl.collectors import Collector

    from rlmem.env_factory import make_torchrl_env

    env = make_torchrl_env(ENV, 4, t.agent.memory_module.make_tensordict_primer())
    env.set_seed(0)
    collector = Collector(env, t.agent.policy, frames_per_batch=FPB, total_frames=-1)
    data = next(iter(collector)).reshape(4, 16)
    collector.shutdown()
    seen = []
    t.agent.backbone.register_forward_pre_hook(lambda module, args: seen.append(exploration_type()))
    t._add_bootstrap_values(data)
    assert seen and all(e == ExplorationType.RANDOM for e in seen), seen


# --- resume ---------------------------------------------------------------------------------------------
def test_resume_refuses_other_settings_naming_the_keys_that_differ(tmp_path):
    trainer(tmp_path, total_frames=FPB).train()
    with pytest.raises(RunDirError) as err:
        trainer(tmp_path, agent={**GRU, "hidden_size": 16}, env={**ENV, "delay": 3}, total_frames=2 * FPB)
    message = str(err.value)
    assert "agent.hidden_size: 8 -> 16" in message and "env.delay: 2 -> 3" in message
    assert "{" not in message  # keys, not two dumped dicts
    assert identity_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: '(unset)' -> 2"]


def test_the_reward_scalers_running_returns_restart_on_resume(tmp_path):
    """CartPole pays 1 per step and its episodes outlast a 16-step rollout: the checkpoint is taken mid-episode.
    The resumed envs start fresh episodes, so the scaler's per-env returns restart at 0 (before the fix they
    carried the aborted episodes' partial returns into the first new ones); its variance is kept."""
    env = {"id": "CartPole-v1"}
    t = trainer(tmp_path, env=env, total_frames=FPB)
    t.train()
    assert torch.count_nonzero(t.reward_scaler.returns) > 0  # mid-episode at the checkpoint
    resumed = trainer(tmp_path, env=env, total_frames=2 * FPB)
    assert torch.count_nonzero(resumed.reward_scaler.returns) == 0
    assert resumed.reward_scaler.var == t.reward_scaler.var and resumed.reward_scaler.count == t.reward_scaler.count


def test_a_longer_total_frames_continues_the_learning_rate_without_a_jump(tmp_path, caplog):
    trainer(tmp_path, total_frames=3 * FPB).train()
    with caplog.at_level("WARNING"):
        trainer(tmp_path, total_frames=6 * FPB).train()
    lrs = [float(row["charts/learning_rate"]) for row in read_csv(tmp_path / "progress.csv")
           if row["charts/learning_rate"]]  # (the row of the evaluation at frames 0 has none)
    assert len(lrs) == 6
    assert lrs[3] == pytest.approx(lrs[2])  # the extension starts where the run ended (1e-3 / 3) ...
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(lrs)), lrs  # ... and never jumps back up
    assert lrs[-1] > 0 and any("anneals from its current" in r.getMessage() for r in caplog.records)


# --- callbacks, stop_at, outputs -------------------------------------------------------------------------
class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_step(self, trainer):
        self.calls.append(("step", trainer.frames))

    def on_eval(self, trainer, metrics):
        self.calls.append(("eval", trainer.frames))

    def on_checkpoint(self, trainer, path):
        self.calls.append(("checkpoint", trainer.frames))
        return trainer.frames < 2 * FPB  # ends the run at its second checkpoint


def test_callbacks_are_called_and_can_end_the_run(tmp_path):
    rec = Recorder()
    t = trainer(tmp_path, total_frames=10 * FPB, checkpoint_interval=FPB, ppo={"eval_interval": 2 * FPB},
                callbacks=[rec])
    metrics = t.train()
    assert metrics["frames"] == 2 * FPB and metrics["stopped_by"] == "Recorder"
    assert rec.calls[:5] == [("eval", 0), ("step", FPB), ("checkpoint", FPB), ("step", 2 * FPB), ("eval", 2 * FPB)]
    again = trainer(tmp_path, total_frames=10 * FPB, ppo={"eval_interval": 2 * FPB})
    assert again.finished and again.train()["frames"] == 2 * FPB  # reported, not retrained


def test_stop_at_ends_the_run_after_n_consecutive_evaluations_reaching_the_target(tmp_path):
    t = trainer(tmp_path, total_frames=20 * FPB, ppo={"eval_interval": FPB},
                stop_at={"eval_return": -1e9, "evals": 3})  # always reached: the 3rd evaluation (frames 2 * FPB)
    metrics = t.train()
    assert metrics["frames"] == 2 * FPB and metrics["stopped_by"].startswith("stop_at (eval_return>=-1e+09 at 3")
    stop = StopAt({"eval_success": 0.9, "evals": 2})
    assert [stop.on_eval(None, {"eval_success": s}) for s in (0.95, 0.5, 0.95, 0.91)] == [True, True, True, False]
    assert StopAt({"eval_loss": 0.1}).reached({"eval_loss": 0.05}) and not StopAt({"x": 1}).reached({"x": math.nan})
    with pytest.raises(ValueError, match="stop_at.evals"):
        StopAt({"eval_success": 0.9, "evals": 0})


def test_lm_stop_at_and_its_progress_csv(tmp_path):
    cfg = {"model": {"memory": "gru", "d_model": 16, "hidden_size": 16},
           "task": {"name": "copy_memory", "n_items": 2, "delay": 1, "vocab_size": 5}, "steps": 20, "batch_size": 4,
           "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 4,
           "stop_at": {"eval_accuracy": 0.0, "evals": 2}}
    metrics = run_lm(cfg, tmp_path, progress=False, verbose=0)
    assert metrics["steps"] == 4 and metrics["stopped_by"].startswith("stop_at")
    rows = read_csv(tmp_path / "progress.csv")
    assert [int(r["steps"]) for r in rows] == [1, 2, 3, 4] and rows[1]["lm/eval_accuracy"] != ""


def test_progress_csv_rows_after_the_checkpoint_are_purged_on_resume(tmp_path):
    trainer(tmp_path, total_frames=4 * FPB, checkpoint_interval=2 * FPB).train()
    rows = read_csv(tmp_path / "progress.csv")
    assert [int(r["frames"]) for r in rows] == [0, FPB, 2 * FPB, 3 * FPB, 4 * FPB]  # eval at 0, then each batch
    assert {"charts/SPS", "losses/value_loss", "charts/eval_return"} <= set(rows[0])
    # a run killed after frames 3 * FPB, checkpointed at 2 * FPB: its rows after the checkpoint are dropped
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["frames"] == 4 * FPB
    t = trainer(tmp_path, total_frames=4 * FPB)
    with t.run.session(2 * FPB, 4 * FPB, "purge"):
        pass
    assert [int(r["frames"]) for r in read_csv(tmp_path / "progress.csv")] == [0, FPB, 2 * FPB]


def test_the_summary_says_no_episode_finished_yet_instead_of_nan(tmp_path):
    t = trainer(tmp_path, env={**ENV, "delay": 30}, total_frames=FPB)  # episodes longer than a rollout
    t.train()
    assert "no episode finished yet" in t.summary() and "nan" not in t.summary()


def test_the_python_api_prints_progress_and_a_summary_and_no_torchrl_colour_codes(tmp_path):
    script = f"""
import sys
from rlmem.agents import build_agent
from rlmem.ppo import PPOConfig, RecurrentPPO
env = {ENV!r}
for verbose in (0, 1):
    RecurrentPPO(build_agent({GRU!r}, env), env, PPOConfig(**{SMALL!r}), r"{tmp_path}/v" + str(verbose),
                 total_frames={2 * FPB}, verbose=verbose).train()
    print("=== end of verbose", verbose, file=sys.stderr, flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    silent, verbose = proc.stderr.split("=== end of verbose 0")
    assert silent.strip() == ""
    assert f"{2 * FPB}/{2 * FPB} frames (100%)" in verbose and "frames/s ETA" in verbose and "done: " in verbose
    assert "\x1b[" not in proc.stdout and "\x1b[" not in proc.stderr and proc.stdout.strip() == ""


def test_train_rl_stop_at_from_the_command_line_and_a_rerun_reports_it(tmp_path):
    args = [sys.executable, str(ROOT / "scripts" / "train_rl.py"), "agent=gru", "agent.hidden_size=8",
            "agent.encoder_dim=8", "env=delayed_cue", "env.delay=2", "total_frames=20000", "ppo.num_envs=4",
            "ppo.rollout_len=16", "ppo.seq_len=8", "ppo.minibatches=2", "ppo.epochs=1", "ppo.eval_episodes=4",
            f"ppo.eval_interval={FPB}", "logger.stop_at={eval_return:-1000,evals:2}", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopping: stop_at (eval_return>=-1000 at 2 consecutive evaluations) ended the run at frames=64" \
        in proc.stderr
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["frames"] == FPB
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "already finished (ended by stop_at" in again.stderr
