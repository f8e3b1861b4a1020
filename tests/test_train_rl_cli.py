"""scripts/train_rl.py end to end, in subprocesses: outputs, resume after a kill, clear config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_rl.py"
TINY = ["ppo.num_envs=8", "ppo.rollout_len=16", "ppo.seq_len=8", "ppo.minibatches=2", "ppo.epochs=2",
        "ppo.eval_episodes=8", "ppo.eval_interval=1024", "logger.progress_bar=false"]


def run(*args, timeout=240):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def scalar_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"]) | {f"text:{t}" for t in acc.Tags().get("tensors", [])}


def test_smoke_run_writes_all_outputs(tmp_path):
    out = run("agent=gru", "env=delayed_cue", "env.delay=2", "total_frames=2048", *TINY, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("frames", "wall_seconds", "fps", "eval_return", "eval_success"):
        assert key in metrics, key
    assert metrics["frames"] >= 2048 and metrics["fps"] > 0 and 0 <= metrics["eval_success"] <= 1
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["frames"] == metrics["frames"]
    tags = scalar_tags(tmp_path)
    for tag in ("charts/episodic_return", "charts/SPS", "charts/eval_return", "charts/eval_success",
                "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert any("hyperparameters" in t for t in tags)


def test_any_gymnasium_id_trains(tmp_path):
    out = run("agent=lstm", "env=gym", "env.id=CartPole-v1", "total_frames=1024", *TINY, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames"] >= 1024 and metrics["eval_return"] > 0


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    args = ["agent=gru", "env=delayed_cue", "env.delay=2", *TINY, "logger.checkpoint_interval=512",
            f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "total_frames=10000000"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_path = tmp_path / "checkpoints" / "last.pt"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if ckpt_path.exists() and torch.load(ckpt_path, weights_only=False)["frames"] >= 1024:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint within 180 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = torch.load(ckpt_path, weights_only=False)["frames"]
    out = run(*args, f"total_frames={killed_at + 1024}", "resume=true")
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["frames"] == killed_at + 1024, "resumed run did not continue from the checkpoint"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames"] == killed_at + 1024


def test_invalid_value_fails_before_training(tmp_path):
    out = run(*TINY, "env.delay=-1", "total_frames=1024", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    assert "delay must be in [0, inf], got -1" in out.stderr
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("env.n_cues=1", "n_cues"),
        ("ppo.num_envs=0", "num_envs"),
        ("agent.hidden_size=0", "hidden_size"),
        ("+agent.no_such_param=3", "valid"),
        ("env=gym env.id=NoSuchEnv-v0", "unknown env id"),
        ("env=gym env.id=Pendulum-v1", "Discrete action"),
        ("total_frames=0", "total_frames"),
    ],
)
def test_invalid_values_raise_in_build_trainer(tmp_path, override, expected):
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from train_rl import build_trainer
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with initialize_config_dir(str(SCRIPT.parent / "conf"), version_base="1.3"):
        cfg = compose("train_rl", overrides=[*TINY, *override.split()])
    with pytest.raises((ValueError, TypeError, KeyError), match=expected):
        build_trainer(cfg, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("group, valid", [("agent", "gru"), ("env", "delayed_cue")])
def test_unknown_names_list_the_valid_choices(tmp_path, group, valid):
    out = run(f"{group}=no_such_thing", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert f"Available options in '{group}'" in out.stderr and f"\t{valid}\n" in out.stderr
